"""Submission files (docs/format.md): what an attack produces and the scorer reads.

HDF5 (``format = "ncbench-submission"``) with attrs ``challenge_id``, ``attack``,
``attack_version``, ``params`` (JSON), ``runtime_s``, ``knowledge`` (JSON list), optional
``team``; datasets ``encoded_ids`` (N,) and any of

- ``mapping`` (N,): predicted plaintext id for each encoding (``encoded_ids`` order);
- ``scores`` (N, M) float32 with ``plain_ids`` (M,): higher means more likely;
- ``patch_positions`` (N, P) int16: predicted original position of each encoded row;
- ``reconstructions`` (N, H, W) uint8 or float32 on the 0-255 scale;
- ``encodings`` (M, P, D) or (M, D) with ``target_ids`` (M,): predicted target encodings.

A two-column CSV ``encoded_id,plain_id`` is accepted as a ``reid`` mapping.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ncbench.errors import NcbenchError
from ncbench.h5io import (
    atomic_path,
    open_checked,
    read_strings,
    set_root_attrs,
    write_dataset,
)

SUBMISSION_FORMAT = "ncbench-submission"
SCHEMA_VERSION = 1
ARRAY_PARTS = ("scores", "patch_positions", "reconstructions", "encodings")


@dataclass
class Submission:
    """An attack's answer for one challenge. Shapes: N encodings, M plaintexts or targets."""

    challenge_id: str
    attack: str
    attack_version: str
    encoded_ids: list[str]
    params: dict = field(default_factory=dict)
    knowledge: tuple[str, ...] = ()
    runtime_s: float = 0.0
    team: str | None = None
    mapping: list[str] | None = None
    scores: np.ndarray | None = None
    plain_ids: list[str] | None = None
    patch_positions: np.ndarray | None = None
    reconstructions: np.ndarray | None = None
    encodings: np.ndarray | None = None
    target_ids: list[str] | None = None
    diagnostics: dict = field(default_factory=dict)  # attack-side numbers (stage times, ...)

    def parts(self) -> list[str]:
        """Names of the answer parts present."""
        names = ["mapping"] if self.mapping is not None else []
        return names + [name for name in ARRAY_PARTS if getattr(self, name) is not None]


def write_submission(path: str | os.PathLike, submission: Submission, *, force: bool = True) -> Path:
    """Write ``submission`` atomically to ``path`` (HDF5, or CSV when the suffix is .csv)."""
    path = Path(path)
    if not submission.parts():
        raise NcbenchError("a submission needs at least one of mapping, scores, reconstructions, encodings")
    with atomic_path(path, force=force) as tmp:
        if path.suffix.lower() == ".csv":
            if submission.mapping is None:
                raise NcbenchError("a CSV submission holds a mapping only; write .h5 for other parts")
            with open(tmp, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["encoded_id", "plain_id"])
                writer.writerows(zip(submission.encoded_ids, submission.mapping))
            return path
        with h5py.File(tmp, "w") as h5:
            attrs = dict(
                challenge_id=submission.challenge_id, attack=submission.attack,
                attack_version=submission.attack_version, params=json.dumps(submission.params, sort_keys=True),
                knowledge=json.dumps(list(submission.knowledge)), runtime_s=float(submission.runtime_s),
                diagnostics=json.dumps(submission.diagnostics, sort_keys=True),
            )
            if submission.team:
                attrs["team"] = submission.team
            set_root_attrs(h5, SUBMISSION_FORMAT, SCHEMA_VERSION, **attrs)
            write_dataset(h5, "encoded_ids", submission.encoded_ids)
            for name in ("mapping", "plain_ids", "target_ids"):
                if getattr(submission, name) is not None:
                    write_dataset(h5, name, getattr(submission, name))
            for name in ARRAY_PARTS:
                if getattr(submission, name) is not None:
                    write_dataset(h5, name, np.asarray(getattr(submission, name)))
    return path


def read_submission(path: str | os.PathLike, *, challenge_id: str | None = None) -> Submission:
    """Read a submission file; structural problems raise NcbenchError with one precise line.

    ``challenge_id`` is needed for the CSV form, which does not carry one.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path, challenge_id)
    handle = open_checked(path, SUBMISSION_FORMAT, SCHEMA_VERSION)
    try:
        return _read_h5(path, handle)
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise NcbenchError(f"{path}: unreadable submission ({error})") from None
    finally:
        handle.close()


def _read_h5(path: Path, h5: h5py.File) -> Submission:
    attrs = h5.attrs
    for name in ("challenge_id", "attack", "attack_version"):
        if name not in attrs:
            raise NcbenchError(f"{path}: missing attribute {name!r}")
    if "encoded_ids" not in h5:
        raise NcbenchError(f"{path}: missing dataset 'encoded_ids'")

    def strings(name):
        if name not in h5:
            return None
        if h5[name].ndim != 1 or h5[name].dtype.kind not in "OSU":
            raise NcbenchError(f"{path}: {name} must be a 1-D array of strings")
        return read_strings(h5[name])

    def json_attr(name, default):
        try:
            return json.loads(attrs.get(name, json.dumps(default)))
        except (TypeError, ValueError):
            raise NcbenchError(f"{path}: attribute {name!r} is not valid JSON") from None

    submission = Submission(
        challenge_id=str(attrs["challenge_id"]), attack=str(attrs["attack"]),
        attack_version=str(attrs["attack_version"]), encoded_ids=strings("encoded_ids"),
        params=json_attr("params", {}), knowledge=_string_list(path, json_attr("knowledge", [])),
        runtime_s=float(attrs.get("runtime_s", 0.0)), team=attrs.get("team"),
        mapping=strings("mapping"), plain_ids=strings("plain_ids"), target_ids=strings("target_ids"),
        diagnostics=json_attr("diagnostics", {}),
    )
    for name in ARRAY_PARTS:
        if name in h5:
            values = h5[name][()]
            if values.dtype.kind not in "fiu":
                raise NcbenchError(f"{path}: {name} must be numeric, found {values.dtype}")
            setattr(submission, name, values)
    if not submission.parts():
        raise NcbenchError(f"{path}: holds no answer (mapping, scores, reconstructions or encodings)")
    return submission


def _string_list(path: Path, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NcbenchError(f"{path}: attribute 'knowledge' must be a JSON list of strings")
    return tuple(value)


def _read_csv(path: Path, challenge_id: str | None) -> Submission:
    if not path.is_file():
        raise NcbenchError(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise NcbenchError(f"{path}: not a readable CSV ({error})") from None
    if not rows or [c.strip() for c in rows[0]] != ["encoded_id", "plain_id"]:
        raise NcbenchError(f"{path}: CSV header must be exactly 'encoded_id,plain_id'")
    body = rows[1:]
    for number, row in enumerate(body, start=2):
        if len(row) != 2:
            raise NcbenchError(f"{path}: line {number} has {len(row)} fields, expected 2")
    return Submission(
        challenge_id=challenge_id or "", attack="csv", attack_version="", params={},
        encoded_ids=[r[0].strip() for r in body], mapping=[r[1].strip() for r in body],
    )
