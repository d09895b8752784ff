"""The one HDF5 reader/writer for every ncbench file (release, key, submission).

Every dataset is chunked one item per chunk with gzip + shuffle + fletcher32 and no timestamps,
so the same inputs give the same bytes and a flipped byte in the data is caught on read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ncbench import __version__
from ncbench.errors import NcbenchError

NCBENCH_VERSION = __version__
# gzip level 1: float encodings barely compress, and level 4 costs 3x the time for 2% smaller files.
FILTERS = dict(compression="gzip", compression_opts=1, shuffle=True, fletcher32=True)


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if not shape or 0 in shape:
        return None
    return (1, *shape[1:])


def write_dataset(group: h5py.Group, name: str, values) -> h5py.Dataset:
    """Write ``values`` (array or list of str) under ``name`` with the project's filters."""
    if isinstance(values, (list, tuple)) or (
        isinstance(values, np.ndarray) and values.dtype.kind in "UO"
    ):
        # Fixed-length UTF-8: variable-length strings cannot carry the gzip / fletcher32 filters.
        encoded = [str(v).encode("utf-8") for v in values]
        dtype = h5py.string_dtype("utf-8", length=max([len(v) for v in encoded] + [1]))
        values = np.array(encoded, dtype=dtype)
    else:
        values = np.ascontiguousarray(values)
        dtype = values.dtype
    chunks = _chunks(values.shape)
    filters = FILTERS if chunks else {}
    return group.create_dataset(
        name, data=values, dtype=dtype, chunks=chunks, track_times=False, **filters
    )


def create_streamed(group: h5py.Group, name: str, shape: tuple[int, ...], dtype) -> h5py.Dataset:
    """An empty dataset to be filled chunk by chunk (large encodings)."""
    return group.create_dataset(
        name, shape=shape, dtype=dtype, chunks=_chunks(shape), track_times=False,
        **(FILTERS if _chunks(shape) else {}),
    )


def read_strings(dataset: h5py.Dataset) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in dataset[()]]


def set_root_attrs(handle: h5py.File, fmt: str, schema_version: int, **attrs) -> None:
    handle.attrs["format"] = fmt
    handle.attrs["schema_version"] = np.int64(schema_version)
    handle.attrs["ncbench_version"] = NCBENCH_VERSION
    for key, value in attrs.items():
        handle.attrs[key] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value


def open_checked(path: str | os.PathLike, fmt: str, schema_version: int) -> h5py.File:
    """Open an ncbench HDF5 file read-only, refusing anything that is not ``fmt`` at our version."""
    path = Path(path)
    if not path.is_file():
        raise NcbenchError(f"{path}: no such file")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise NcbenchError(f"{path}: not an HDF5 file (corrupt or truncated?)") from None
    found = handle.attrs.get("format")
    if found != fmt:
        handle.close()
        raise NcbenchError(f"{path}: expected an {fmt} file, found format {found!r}")
    version = handle.attrs.get("schema_version")
    if version is None or int(version) != schema_version:
        handle.close()
        raise NcbenchError(
            f"{path}: {fmt} schema version {version} is not supported (this ncbench reads {schema_version})"
        )
    return handle


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; move it onto ``final`` only if the block succeeds.

    Works for files and directories, so a crash never leaves a half-written artefact.
    """
    final = Path(final)
    if final.exists() and not force:
        raise NcbenchError(f"{final} already exists (use --force to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.exists():
            _remove(final)
        os.replace(target, final)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
