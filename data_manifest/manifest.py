"""Data manifests: a CSV of image files with checksums, splits and labels, plus a JSON sidecar.

Layout and meaning of every column and key: data_manifest/SCHEMA.md; the sidecar's JSON Schema:
data_manifest/schema.json (mirrored by hand in :func:`validate_sidecar`, so reading a manifest
needs no jsonschema dependency).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

from ncbench.data_manifest.folders import find_image_files, read_labels_csv
from ncbench.errors import NcbenchError
from ncbench.h5io import atomic_path, sha256_file
from ncbench.progress import progress

MANIFEST_COLUMNS = ("id", "path", "sha256", "split")
SCHEMA_VERSION = 1
SIDECAR_KEYS = (
    "schema_version",
    "name",
    "source",
    "licence",
    "derived_from",
    "transforms",
    "counts_per_split",
    "label_names",
    "created_utc",
)
OPTIONAL_SIDECAR_KEYS = ("description",)
TRANSFORM_KEYS = {"name": str, "description": str, "kind": str, "low": float, "high": float, "p": float, "unit": str}
SPLIT_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
UTC_PATTERN = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
# Label cells: 1 / 0 / -1 (unknown); blank also means unknown.
LABEL_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": -1}


def sidecar_path(csv_path: str | os.PathLike) -> Path:
    """The sidecar of a manifest CSV: same stem, ``.json``."""
    return Path(csv_path).with_suffix(".json")


def validate_sidecar(sidecar: dict, *, where: str = "sidecar") -> None:
    """Check a sidecar dict against data_manifest/schema.json; NcbenchError on the first fault."""

    def fail(message: str) -> None:
        raise NcbenchError(f"{where}: {message}")

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(sidecar, dict):
        fail("must be a JSON object")
    missing = [key for key in SIDECAR_KEYS if key not in sidecar]
    if missing:
        fail(f"missing key(s) {', '.join(missing)}")
    extra = sorted(set(sidecar) - set(SIDECAR_KEYS) - set(OPTIONAL_SIDECAR_KEYS))
    if extra:
        fail(f"unknown key(s) {', '.join(extra)}")
    if not is_int(sidecar["schema_version"]) or sidecar["schema_version"] != SCHEMA_VERSION:
        fail(f"schema_version {sidecar['schema_version']!r} is not supported (this version reads {SCHEMA_VERSION})")
    for key in ("name", "source", "licence", "derived_from"):
        if not isinstance(sidecar[key], str) or not sidecar[key]:
            fail(f"{key} must be a non-empty string")
    if "description" in sidecar and not isinstance(sidecar["description"], str):
        fail("description must be a string")
    if not isinstance(sidecar["transforms"], list):
        fail("transforms must be a list")
    for index, transform in enumerate(sidecar["transforms"]):
        if not isinstance(transform, dict):
            fail(f"transforms[{index}] must be an object")
        for key in ("name", "description"):
            if key not in transform:
                fail(f"transforms[{index}] lacks {key!r}")
        for key, value in transform.items():
            expected = TRANSFORM_KEYS.get(key)
            if expected is None:
                fail(f"transforms[{index}] has unknown key {key!r}")
            if not (is_number(value) if expected is float else isinstance(value, str)):
                fail(f"transforms[{index}].{key} must be a {'number' if expected is float else 'string'}")
        if not transform["name"]:
            fail(f"transforms[{index}].name must be non-empty")
        if transform.get("kind", "uniform") not in ("uniform", "bernoulli"):
            fail(f"transforms[{index}].kind must be 'uniform' or 'bernoulli'")
        if "p" in transform and not 0 <= transform["p"] <= 1:
            fail(f"transforms[{index}].p must lie in [0, 1]")
    counts = sidecar["counts_per_split"]
    if not isinstance(counts, dict):
        fail("counts_per_split must be an object")
    for split, count in counts.items():
        if not SPLIT_PATTERN.match(split):
            fail(f"split name {split!r} must match {SPLIT_PATTERN.pattern}")
        if not is_int(count) or count < 0:
            fail(f"counts_per_split[{split!r}] must be a non-negative integer")
    names = sidecar["label_names"]
    if not isinstance(names, list) or not all(isinstance(x, str) and x for x in names):
        fail("label_names must be a list of non-empty strings")
    if len(set(names)) != len(names):
        fail("label_names must not repeat")
    if not isinstance(sidecar["created_utc"], str) or not UTC_PATTERN.match(sidecar["created_utc"]):
        fail("created_utc must look like 2026-01-31T12:00:00Z")


def read_sidecar(csv_path: str | os.PathLike) -> dict:
    """Load and validate the sidecar of ``csv_path``."""
    path = sidecar_path(csv_path)
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NcbenchError(f"manifest sidecar {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NcbenchError(f"cannot read manifest sidecar {path}: {error}") from None
    validate_sidecar(sidecar, where=f"manifest sidecar {path}")
    return sidecar


def read_manifest(csv_path: str | os.PathLike, root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read and validate a manifest -> one row per image.

    Columns: ``id, path, sha256, split`` (str), one int8 column per label (1 / 0 / -1) and
    ``file``: ``path`` resolved against ``root`` (default: the manifest's directory). Files are
    not opened here; check each with :func:`verify_content` when it is used. ``attrs`` holds
    ``sidecar`` (the validated sidecar dict) and ``label_names``.
    """
    csv_path = Path(csv_path)
    where = f"manifest {csv_path}"
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise NcbenchError(f"{where} does not exist") from None
    except Exception as error:  # noqa: BLE001 - pandas raises many parser error types
        raise NcbenchError(f"cannot read {where}: {' '.join(str(error).split())}") from None
    columns = [str(c) for c in frame.columns]
    if tuple(columns[:4]) != MANIFEST_COLUMNS:
        raise NcbenchError(
            f"{where}: columns must start with {', '.join(MANIFEST_COLUMNS)} (found {', '.join(columns[:4]) or 'none'})"
        )
    label_names = columns[4:]
    sidecar = read_sidecar(csv_path)
    if sidecar["label_names"] != label_names:
        raise NcbenchError(
            f"{where}: label columns {label_names} differ from the sidecar's label_names {sidecar['label_names']}"
        )
    _check_rows(frame, where)
    counts = frame["split"].value_counts().to_dict()
    declared = {k: v for k, v in sidecar["counts_per_split"].items() if v}
    if counts != declared:
        raise NcbenchError(f"{where}: rows per split {counts} differ from the sidecar's counts_per_split {declared}")
    for name in label_names:
        values = frame[name].str.strip().map(LABEL_VALUES)
        if values.isna().any():
            bad = frame.loc[values.isna(), ["id", name]].iloc[0]
            raise NcbenchError(f"{where}: label {name!r} of {bad['id']} is {bad[name]!r}; expected 1, 0, -1 or blank")
        frame[name] = values.astype(np.int8)
    base = Path(root) if root is not None else csv_path.parent
    frame["file"] = [str(base.joinpath(*PurePosixPath(p).parts)) for p in frame["path"]]
    frame.attrs["sidecar"] = sidecar
    frame.attrs["label_names"] = label_names
    return frame


def _check_rows(frame: pd.DataFrame, where: str) -> None:
    for column in MANIFEST_COLUMNS:
        empty = frame[column] == ""
        if empty.any():
            raise NcbenchError(f"{where}: row {int(np.argmax(empty)) + 2} has an empty {column}")
    duplicated = frame["id"].duplicated()
    if duplicated.any():
        raise NcbenchError(f"{where}: id {frame['id'][duplicated].iloc[0]!r} appears twice")
    for path in frame["path"]:
        if (
            PurePosixPath(path).is_absolute()
            or PureWindowsPath(path).drive
            or "\\" in path
            or ".." in PurePosixPath(path).parts
        ):
            raise NcbenchError(f"{where}: path {path!r} must be relative to the root, with / separators and no ..")
    bad_sha = ~frame["sha256"].str.fullmatch(SHA256_PATTERN)
    if bad_sha.any():
        raise NcbenchError(f"{where}: sha256 of {frame['id'][bad_sha].iloc[0]!r} is not 64 lowercase hex digits")
    bad_split = ~frame["split"].str.fullmatch(SPLIT_PATTERN)
    if bad_split.any():
        raise NcbenchError(f"{where}: split {frame['split'][bad_split].iloc[0]!r} must match {SPLIT_PATTERN.pattern}")


def verify_content(content: bytes, expected_sha256: str, file: str | os.PathLike, manifest: str | os.PathLike) -> None:
    """NcbenchError naming ``file`` unless ``content`` hashes to ``expected_sha256``."""
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise NcbenchError(f"{file}: sha256 {actual} does not match {expected_sha256} recorded in {manifest}")


def assign_splits(count: int, fractions: Mapping[str, float] | None, seed: int) -> np.ndarray:
    """(count,) split names: a seeded shuffle cut by ``fractions`` (largest remainder), in the
    order the fractions are given; everything ``test`` when ``fractions`` is None."""
    if fractions is None:
        return np.full(count, "test", dtype=object)
    fractions = dict(fractions)
    if not fractions:
        raise NcbenchError("split fractions must name at least one split")
    for split, fraction in fractions.items():
        if not isinstance(split, str) or not SPLIT_PATTERN.match(split):
            raise NcbenchError(f"split name {split!r} must match {SPLIT_PATTERN.pattern}")
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
            raise NcbenchError(f"split fraction of {split!r} must lie in [0, 1], got {fraction!r}")
    if abs(sum(fractions.values()) - 1) > 1e-6:
        raise NcbenchError(f"split fractions must sum to 1, got {sum(fractions.values())}")
    exact = np.array(list(fractions.values()), dtype=np.float64) * count
    sizes = np.floor(exact).astype(int)
    sizes[np.argsort(-(exact - sizes), kind="stable")[: count - sizes.sum()]] += 1
    labels = np.repeat(np.array(list(fractions), dtype=object), sizes)
    return labels[np.argsort(np.random.default_rng(seed).permutation(count), kind="stable")]


def write_manifest(
    folder: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    name: str,
    licence: str,
    split_fractions: Mapping[str, float] | None = None,
    labels_csv: str | os.PathLike | None = None,
    seed: int = 0,
    source: str | None = None,
    derived_from: str | None = None,
    description: str | None = None,
    force: bool = False,
) -> Path:
    """Write the manifest of every image below ``folder`` (found as the ``folder:`` source does):
    ``out_csv`` plus its sidecar, each atomically. Paths (and ids) are relative to ``folder``,
    so the manifest is used as ``manifest:OUT?root=FOLDER`` unless it sits in ``folder``.

    split_fractions: e.g. ``{"train": 0.8, "val": 0.1, "test": 0.1}``, assigned by a seeded
    shuffle; None puts every image in ``test``. labels_csv: CheXpert-style labels (default:
    ``folder/labels.csv`` when present). Returns the CSV path.
    """
    folder, out_csv = Path(folder), Path(out_csv)
    if not folder.is_dir():
        raise NcbenchError(f"folder {folder} does not exist")
    files = find_image_files(folder)
    if not files:
        raise NcbenchError(f"folder {folder} holds no PNG, JPEG or DICOM images")
    ids = [image_id for image_id, _ in files]
    csv_given = labels_csv is not None
    labels_csv = Path(labels_csv) if csv_given else folder / "labels.csv"
    if csv_given or labels_csv.is_file():
        labels, label_names = read_labels_csv(labels_csv, ids)
    else:
        labels, label_names = np.zeros((len(ids), 0), dtype=np.int8), ()
    clash = set(label_names) & set(MANIFEST_COLUMNS + ("file",))
    if clash:
        raise NcbenchError(f"labels CSV {labels_csv}: column(s) {', '.join(sorted(clash))} clash with manifest columns")
    digests = []
    with progress(f"hashing images of {folder.name or folder}", len(files)) as advance:
        for _, path in files:
            digests.append(sha256_file(path))
            advance(1)
    splits = assign_splits(len(files), split_fractions, seed)
    frame = pd.DataFrame({"id": ids, "path": ids, "sha256": digests, "split": splits})
    for column, label in enumerate(label_names):
        frame[label] = labels[:, column].astype(int)
    order = list(split_fractions) if split_fractions else ["test"]
    counts = {split: int((splits == split).sum()) for split in order}
    labelled = f", findings from {labels_csv.name}" if label_names else ""
    sidecar = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "source": source or f"folder {folder.resolve().name}",
        "licence": licence,
        "derived_from": derived_from
        or (f"the PNG / JPEG / DICOM files below folder {folder.resolve().name}, unchanged{labelled}"),
        "transforms": [],
        "counts_per_split": counts,
        "label_names": list(label_names),
        "created_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if description:
        sidecar["description"] = description
    validate_sidecar(sidecar, where=f"sidecar for {out_csv}")
    with atomic_path(out_csv, force=force) as csv_tmp, atomic_path(sidecar_path(out_csv), force=force) as json_tmp:
        frame.to_csv(csv_tmp, index=False, lineterminator="\n")
        json_tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return out_csv
