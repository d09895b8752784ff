"""Submission files (docs/format.md): what an attack produces and the scorer reads.

HDF5 (``format = "ncbench-submission"``) with attrs ``challenge_id``, ``attack``,
``attack_version``, ``params`` (JSON), ``runtime_s``, ``knowledge`` (JSON list), optional
``team``; datasets ``encoded_ids`` (N,) and any of

- ``mapping`` (N,): predicted plaintext id for each encoding (``encoded_ids`` order);
- ``scores`` (N, M) float32 with ``plain_ids`` (M,): higher means more likely;
- ``patch_positions`` (N, P) int16: predicted original position of each encoded row;
- ``reconstructions`` (N, H, W) uint8 or float32 on the 0-255 scale;
- ``encodings`` (M, P, D) or (M, D) with ``target_ids`` (M,): predicted target encodings;
- ``link_scores`` (L,) float with ``link_left`` and ``link_right`` (L,): candidate pairs of
  encodings (of two sites) claimed to be the same image or patient, higher meaning surer.

A two-column CSV ``encoded_id,plain_id`` is accepted as a ``reid`` mapping. The writer picks the
form by the file name's suffix; the reader by the content, since the server keeps uploads under
their sha256, with no suffix.

A submission comes from outside: the reader checks its size, layout and declared shapes before
reading, and reads only the parts it is asked for (:class:`ReadLimits`, set by the scorer).
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ncbench.errors import NcbenchError
from ncbench.h5io import (
    MAX_ATTRIBUTE_BYTES,
    DatasetInfo,
    atomic_path,
    check_chunks,
    decode_strings,
    format_bytes,
    has_hdf5_signature,
    open_untrusted,
    set_root_attrs,
    write_dataset,
)

SUBMISSION_FORMAT = "ncbench-submission"
SCHEMA_VERSION = 1
ARRAY_PARTS = ("scores", "patch_positions", "reconstructions", "encodings", "link_scores")
STRING_PARTS = ("encoded_ids", "mapping", "plain_ids", "target_ids", "link_left", "link_right")
ID_BYTES = 256  # the longest id a reader budgets for; release ids are about 10 bytes
CSV_HEADER_BYTES = 4096

# What an attack may declare it used (the ``knowledge`` attribute of a submission and of an
# attack class). Here, beside the file format, so that the scorer reads it without torch.
KNOWLEDGE = {
    "architecture": "the public encoder architecture and preset configuration",
    "self-sampled-keys": "encoders with keys the attacker draws itself",
    "plaintext-pool": "the unordered plaintexts of the encoded images (reid)",
    "known-pairs": "some (plaintext, encoding) pairs (invert)",
    "auxiliary-data": "plaintexts from the same distribution, disjoint from the encoded set",
    "labels": "the public labels of the encodings",
    "insider-key": "the key of another site of a multi-site release (a colluding hospital)",
    "key": "the organizer's secret key (oracle only: refused by the leaderboard)",
}


@dataclass(frozen=True)
class ReadLimits:
    """How much of one submission may be read. The scorer derives them from the challenge.

    ``file_bytes``: a larger file is refused before it is opened. ``part_bytes``: for every
    dataset of the format, the most bytes its declared shape x item size may come to; all
    datasets together, named or not, may declare at most their sum. Anything larger is refused
    before reading. ``read``: the datasets actually read; an answer part left out is listed in
    ``Submission.unread``. ``csv_rows``: the most data lines of a CSV, whose size is capped at
    ``csv_rows`` lines of two ids.
    """

    file_bytes: int
    part_bytes: dict[str, int]
    read: frozenset[str]
    csv_rows: int

    @property
    def csv_bytes(self) -> int:
        return min(self.file_bytes, CSV_HEADER_BYTES + self.csv_rows * (2 * ID_BYTES + 4))


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
    link_left: list[str] | None = None
    link_right: list[str] | None = None
    link_scores: np.ndarray | None = None
    diagnostics: dict = field(default_factory=dict)  # attack-side numbers (stage times, ...)
    unread: tuple[str, ...] = ()  # answer parts in the file that the reader was not asked to read

    def parts(self) -> list[str]:
        """Names of the answer parts present."""
        names = ["mapping"] if self.mapping is not None else []
        return names + [name for name in ARRAY_PARTS if getattr(self, name) is not None]


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def write_submission(path: str | os.PathLike, submission: Submission, *, force: bool = True) -> Path:
    """Write ``submission`` atomically to ``path`` (HDF5, or CSV when the suffix is .csv)."""
    path = Path(path)
    if not submission.parts():
        raise NcbenchError(
            "a submission needs at least one of mapping, scores, reconstructions, encodings, link_scores"
        )
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
                challenge_id=submission.challenge_id,
                attack=submission.attack,
                attack_version=submission.attack_version,
                params=json.dumps(submission.params, sort_keys=True),
                knowledge=json.dumps(list(submission.knowledge)),
                runtime_s=float(submission.runtime_s),
                diagnostics=json.dumps(submission.diagnostics, sort_keys=True),
            )
            if submission.team:
                attrs["team"] = submission.team
            set_root_attrs(h5, SUBMISSION_FORMAT, SCHEMA_VERSION, **attrs)
            write_dataset(h5, "encoded_ids", submission.encoded_ids)
            for name in STRING_PARTS[1:]:
                if getattr(submission, name) is not None:
                    write_dataset(h5, name, getattr(submission, name))
            for name in ARRAY_PARTS:
                if getattr(submission, name) is not None:
                    write_dataset(h5, name, np.asarray(getattr(submission, name)))
    return path


def read_submission(
    path: str | os.PathLike, *, challenge_id: str | None = None, limits: ReadLimits | None = None
) -> Submission:
    """Read a submission file; structural problems raise NcbenchError with one precise line.

    The form is told by the content: a file with HDF5's signature is read as HDF5; any other is
    read as CSV when it is named .csv or its first bytes are UTF-8 text, and refused otherwise.
    ``challenge_id`` is needed for the CSV form, which does not carry one. ``limits``: what may be
    read (the scorer's); without them every part is read, whatever its size. Either way the file's
    layout is checked before anything is read (:func:`ncbench.h5io.inspect_untrusted`: no links to
    other files, no virtual or external datasets, only our filters) and so is every chunk
    (:func:`ncbench.h5io.check_chunks`: none inflating past its declared size).
    """
    path = Path(path)
    if _form(path) == "csv":
        return _read_csv(path, challenge_id, limits)
    handle, datasets = open_untrusted(
        path, SUBMISSION_FORMAT, SCHEMA_VERSION, max_bytes=None if limits is None else limits.file_bytes
    )
    try:
        return _read_h5(path, handle, datasets, limits)
    except (OSError, KeyError, ValueError, TypeError, RecursionError) as error:
        raise NcbenchError(f"{path}: unreadable submission ({type(error).__name__}: {error})") from None
    finally:
        handle.close()


def _read_h5(path: Path, h5: h5py.File, datasets: dict[str, DatasetInfo], limits: ReadLimits | None) -> Submission:
    attrs = h5.attrs
    for name in ("challenge_id", "attack", "attack_version"):
        if name not in attrs:
            raise NcbenchError(f"{path}: missing attribute {name!r}")
    if "encoded_ids" not in h5:
        raise NcbenchError(f"{path}: missing dataset 'encoded_ids'")
    for name in (*STRING_PARTS, *ARRAY_PARTS):
        if name in h5 and name not in datasets:
            raise NcbenchError(f"{path}: {name} must be a dataset")
    if limits is not None:
        _check_declared_sizes(path, datasets, limits)
    for name, info in datasets.items():  # every one, read or not: a bomb is refused wherever it sits
        check_chunks(h5[name], info, path)
    unread = tuple(
        name
        for name in ("mapping", *ARRAY_PARTS)
        if name in datasets and limits is not None and name not in limits.read
    )

    def readable(name) -> DatasetInfo | None:
        """The dataset's metadata when it is present and is to be read."""
        if limits is not None and name not in limits.read:
            return None
        return datasets.get(name)

    def strings(name):
        info = readable(name)
        if info is None:
            return None
        if len(info.shape) != 1 or not _is_string(info.dtype):
            raise NcbenchError(f"{path}: {name} must be a 1-D array of strings")
        return decode_strings(h5[name][()])

    def text_attr(name, default=None):
        value = attrs.get(name, default)
        if isinstance(value, (str, bytes)) and len(value) > MAX_ATTRIBUTE_BYTES:
            raise NcbenchError(
                f"{path}: attribute {name!r} holds {format_bytes(len(value))} of text; "
                f"at most {format_bytes(MAX_ATTRIBUTE_BYTES)} is accepted"
            )
        return value

    def json_attr(name, default, *, strict=False):
        # NaN and Infinity are not JSON: params are stored, and would break every strict reader.
        constant = _refuse_constant if strict else None
        try:
            return json.loads(text_attr(name, json.dumps(default)), parse_constant=constant)
        except (TypeError, ValueError, RecursionError):
            raise NcbenchError(f"{path}: attribute {name!r} is not valid JSON") from None

    team = text_attr("team")
    submission = Submission(
        challenge_id=str(text_attr("challenge_id")),
        attack=str(text_attr("attack")),
        attack_version=str(text_attr("attack_version")),
        encoded_ids=strings("encoded_ids"),
        params=json_attr("params", {}, strict=True),
        knowledge=_string_list(path, json_attr("knowledge", [])),
        runtime_s=float(attrs.get("runtime_s", 0.0)),
        team=None if team is None else str(team),
        mapping=strings("mapping"),
        plain_ids=strings("plain_ids"),
        target_ids=strings("target_ids"),
        link_left=strings("link_left"),
        link_right=strings("link_right"),
        diagnostics=json_attr("diagnostics", {}),
        unread=unread,
    )
    if submission.encoded_ids is None:
        raise NcbenchError(f"{path}: encoded_ids cannot be read within this challenge's limits")
    for name in ARRAY_PARTS:
        info = readable(name)
        if info is None:
            continue
        if info.dtype.kind not in "fiu":
            raise NcbenchError(f"{path}: {name} must be numeric, found {info.dtype}")
        setattr(submission, name, h5[name][()])
    if not submission.parts() and not submission.unread:
        raise NcbenchError(f"{path}: holds no answer (mapping, scores, reconstructions, encodings or link_scores)")
    return submission


def _check_declared_sizes(path: Path, datasets: dict[str, DatasetInfo], limits: ReadLimits) -> None:
    """Refuse, from metadata alone, any part declaring more than the challenge allows it, and
    datasets that together declare more than a whole legitimate submission could."""
    for name, allowed in limits.part_bytes.items():
        info = datasets.get(name)
        if info is not None and info.declared_bytes > allowed:
            raise NcbenchError(
                f"{path}: {name} declares shape {info.shape} of {info.dtype} "
                f"({format_bytes(info.declared_bytes)}); this challenge accepts at most "
                f"{format_bytes(allowed)} (refused before reading)"
            )
    total, allowed = sum(info.declared_bytes for info in datasets.values()), sum(limits.part_bytes.values())
    if total > allowed:
        largest = max(datasets.values(), key=lambda info: info.declared_bytes)
        raise NcbenchError(
            f"{path}: its datasets declare {format_bytes(total)} (the largest: {largest.name}, "
            f"shape {largest.shape}); a submission to this challenge holds at most "
            f"{format_bytes(allowed)} (refused before reading)"
        )


def _is_string(dtype: np.dtype) -> bool:
    return dtype.kind in "SU" or (dtype.kind == "O" and h5py.check_string_dtype(dtype) is not None)


def _string_list(path: Path, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NcbenchError(f"{path}: attribute 'knowledge' must be a JSON list of strings")
    return tuple(value)


def _form(path: Path) -> str:
    """``"hdf5"`` or ``"csv"``: HDF5 when the file carries HDF5's signature, else CSV when it is
    named .csv or starts as UTF-8 text; anything else is refused in one line."""
    if not path.is_file():
        raise NcbenchError(f"{path}: no such file")
    try:
        if has_hdf5_signature(path):
            return "hdf5"
        if path.suffix.lower() == ".csv" or _starts_as_text(path):
            return "csv"
    except OSError as error:
        raise NcbenchError(f"{path}: cannot be read ({error.strerror or error})") from None
    raise NcbenchError(f"{path}: not a submission (neither an HDF5 file nor a UTF-8 CSV)")


def _starts_as_text(path: Path) -> bool:
    """Whether the first :data:`CSV_HEADER_BYTES` of ``path`` are UTF-8 text (a character cut at
    the end of the sample allowed) with no control characters but tab and line ends."""
    with open(path, "rb") as handle:
        head = handle.read(CSV_HEADER_BYTES)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return bool(text) and not any(char < " " and char not in "\t\r\n" for char in text)


def _read_csv(path: Path, challenge_id: str | None, limits: ReadLimits | None) -> Submission:
    if limits is not None and path.stat().st_size > limits.csv_bytes:
        raise NcbenchError(
            f"{path}: file is {format_bytes(path.stat().st_size)}; a CSV for this challenge "
            f"({limits.csv_rows} encodings) is at most {format_bytes(limits.csv_bytes)}"
        )
    body: list[list[str]] = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or [c.strip() for c in header] != ["encoded_id", "plain_id"]:
                raise NcbenchError(f"{path}: CSV header must be exactly 'encoded_id,plain_id'")
            for number, row in enumerate(reader, start=2):
                if len(row) != 2:
                    raise NcbenchError(f"{path}: line {number} has {len(row)} fields, expected 2")
                if limits is not None and len(body) == limits.csv_rows:
                    raise NcbenchError(
                        f"{path}: more than {limits.csv_rows} data lines, one per encoding of this challenge"
                    )
                body.append(row)
    except (UnicodeDecodeError, csv.Error) as error:
        raise NcbenchError(f"{path}: not a readable CSV ({error})") from None
    return Submission(
        challenge_id=challenge_id or "",
        attack="csv",
        attack_version="",
        params={},
        encoded_ids=[r[0].strip() for r in body],
        mapping=[r[1].strip() for r in body],
    )
