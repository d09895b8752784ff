"""Image folders as hospitals keep them (CheXpert / MIMIC-CXR-JPG layout): which files are
images, and their findings from a CheXpert-style labels CSV. Used by the ``folder:`` image
source and by ``ncbench challenge manifest``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ncbench.errors import NcbenchError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")


def has_dicom_preamble(path: Path) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble (what pydicom looks for)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def find_image_files(folder: Path) -> list[tuple[str, Path]]:
    """``(id, path)`` of every PNG / JPEG / DICOM file below ``folder``, sorted by id.

    ids are the relative paths with ``/`` separators. DICOM files are found by suffix
    (``.dcm``, ``.dicom``) or by their ``DICM`` preamble; hidden files and folders are skipped.
    """
    found = []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            path = Path(directory) / name
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES or (suffix != ".csv" and has_dicom_preamble(path)):
                found.append((path.relative_to(folder).as_posix(), path))
    return sorted(found)


# CheXpert's CSVs carry these patient / view columns beside the findings; they are not labels.
CHEXPERT_METADATA_COLUMNS = ("Sex", "Age", "Frontal/Lateral", "AP/PA")


def read_labels_csv(csv_path: Path, ids: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels for ``ids`` from a CheXpert-style CSV -> ((N, K) int8, K finding names).

    The ``Path`` column names each image relative to the folder, or ends with that relative path
    (CheXpert writes ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``).
    Every other column except CheXpert's metadata is a finding: 1.0 -> 1, 0.0 -> 0, and both
    -1.0 (uncertain) and blank -> -1 (unknown). Rows for files outside the set are ignored;
    images without a row get -1 everywhere.
    """
    import pandas as pd

    try:
        table = pd.read_csv(csv_path, dtype={"Path": str})
    except FileNotFoundError:
        raise NcbenchError(f"labels CSV {csv_path} does not exist") from None
    except Exception as error:  # noqa: BLE001 - pandas raises many parser error types
        reason = " ".join(str(error).split())
        raise NcbenchError(f"cannot read labels CSV {csv_path}: {reason}") from None
    if "Path" not in table.columns:
        raise NcbenchError(f"labels CSV {csv_path} has no 'Path' column")
    names = tuple(str(c) for c in table.columns if c != "Path" and c not in CHEXPERT_METADATA_COLUMNS)
    values = table[list(names)].apply(pd.to_numeric, errors="coerce")
    findings = values.to_numpy(dtype=np.float64, na_value=np.nan)
    raw_blank = table[list(names)].isna().to_numpy()
    bad = ~np.isin(findings, (1.0, 0.0, -1.0)) & ~raw_blank
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise NcbenchError(
            f"labels CSV {csv_path}: column {names[col]!r} row {row + 2} holds "
            f"{table[names[col]].iloc[row]!r}; expected 1.0, 0.0, -1.0 or blank"
        )
    position = {image_id: i for i, image_id in enumerate(ids)}
    labels = np.full((len(ids), len(names)), -1, dtype=np.int8)
    matched: set[int] = set()
    for row, listed in enumerate(table["Path"].fillna("").astype(str)):
        parts = listed.replace("\\", "/").strip("/").split("/")
        # Strip leading components until the rest is one of ours (CheXpert's dataset prefix).
        index = next((position[key] for k in range(len(parts)) if (key := "/".join(parts[k:])) in position), None)
        if index is None:
            continue
        if index in matched:
            raise NcbenchError(f"labels CSV {csv_path} lists {ids[index]} more than once")
        matched.add(index)
        labels[index] = np.where(findings[row] == 1.0, 1, np.where(findings[row] == 0.0, 0, -1))
    return labels, names
