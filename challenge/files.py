"""Typed readers for the two organizer files of docs/format.md: ``release.h5`` and ``key.h5``.

Everything else (attacks, scoring, verification) reads releases and keys through these classes,
so a format check lives in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ncbench.challenge.config import SITE_TASKS as SITE_TASKS
from ncbench.challenge.config import TASKS as TASKS
from ncbench.challenge.config import EncoderConfig, key_tensor_names
from ncbench.errors import NcbenchError
from ncbench.h5io import (
    DatasetInfo,
    check_chunks,
    open_checked,
    open_untrusted,
    read_rows,
    read_strings,
    unreadable_layout,
)
from ncbench.private import create_private_file

RELEASE_FORMAT = "ncbench-release"
KEY_FORMAT = "ncbench-key"
SITE_KEY_FORMAT = "ncbench-site-key"
SCHEMA_VERSION = 1


class _H5File:
    """Shared plumbing: an open, format-checked HDF5 file used as a context manager.

    Releases travel to attackers and may arrive damaged: every read of metadata (attributes, the
    link table, object headers) goes through :meth:`_layout`, so a corrupt file is one NcbenchError
    line, as :func:`ncbench.h5io.inspect_untrusted` reports a submission's."""

    FORMAT = ""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with self._layout():
            self.h5 = open_checked(self.path, self.FORMAT, SCHEMA_VERSION)
        try:
            with self._layout():
                self._check()
        except BaseException:
            self.close()
            raise

    def _check(self) -> None:
        """Refuse, once opened, a file whose attributes or datasets this class cannot use."""

    def _layout(self) -> contextlib.AbstractContextManager[None]:
        return unreadable_layout(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.h5.close()

    def _require(self, name: str) -> h5py.Dataset:
        with self._layout():
            if name not in self.h5:
                raise NcbenchError(f"{self.path}: missing dataset {name!r}")
            return self.h5[name]

    def read(self, name: str) -> np.ndarray:
        """A whole dataset, with corrupt chunks reported as one line."""
        dataset = self._require(name)
        if dataset.ndim and dataset.shape[0] > 1:
            return self._rows(name, np.arange(dataset.shape[0]))
        try:
            return dataset[()]
        except OSError as error:
            raise NcbenchError(f"{self.path}: {name} is corrupt ({error})") from None

    def _rows(self, name: str, rows: np.ndarray, *, dtype=None, columns: int | None = None) -> np.ndarray:
        """Rows ``rows`` (sorted, unique) of a dataset as ``dtype`` (None: as stored), their first
        ``columns`` on the last axis (None: all), with corrupt chunks reported as one line."""
        try:
            return read_rows(self._require(name), rows, dtype=dtype, columns=columns)
        except OSError as error:
            raise NcbenchError(f"{self.path}: {name} is corrupt ({error})") from None

    def strings(self, name: str) -> list[str]:
        dataset = self._require(name)
        try:
            return read_strings(dataset)
        except OSError as error:
            raise NcbenchError(f"{self.path}: {name} is corrupt ({error})") from None

    @property
    def config(self) -> EncoderConfig:
        with self._layout():
            return EncoderConfig.from_json(self.h5.attrs["encoder_config"])

    @property
    def test_release(self) -> bool:
        """True for a test release: built from a guessable seed or marked so, its key is public."""
        with self._layout():
            return bool(self.h5.attrs.get("test_release", 0))


class RowReader:
    """The rows of one dataset of an open file, read when sliced: ``len`` and ``reader[a:b]``
    (an ndarray) as an array gives them, without holding the rest."""

    def __init__(self, owner: _H5File, name: str):
        self.owner, self.name = owner, name
        self.dataset = owner._require(name)

    def __len__(self) -> int:
        return self.dataset.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("RowReader takes slices of consecutive rows")
        return self.take(np.arange(*index.indices(len(self))))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (sorted, unique)."""
        return self.owner._rows(self.name, rows)


class Release(_H5File):
    """A public release (``public/release.h5``), opened read-only.

    Large encodings are never loaded whole by accident: use :meth:`iter_encoded` or slice
    ``self.encoded`` (an h5py dataset of shape (N, P, D)).
    """

    FORMAT = RELEASE_FORMAT

    def _check(self) -> None:
        attrs = self.h5.attrs
        for name in ("challenge_id", "task", "encoder_config", "n_encoded", "key_commitment"):
            if name not in attrs:
                raise NcbenchError(f"{self.path}: missing attribute {name!r}")
        self.challenge_id: str = str(attrs["challenge_id"])
        self.task: str = str(attrs["task"])
        if self.task not in TASKS:
            raise NcbenchError(f"{self.path}: unknown task {self.task!r}")
        self.encoded: h5py.Dataset = self._require("encoded/data")
        self.n_sites: int = int(attrs.get("n_sites", 1))
        if self.n_sites < 1 or (self.n_sites > 1) != ("encoded/site" in self.h5):
            raise NcbenchError(f"{self.path}: n_sites and encoded/site disagree")

    @property
    def n_encoded(self) -> int:
        return int(self.encoded.shape[0])

    @property
    def sites(self) -> np.ndarray:
        """(N,) int64: the site (hospital, key) of each encoding; all 0 in a single-site release."""
        if self.n_sites == 1:
            return np.zeros(self.n_encoded, np.int64)
        sites = self.read("encoded/site").astype(np.int64)
        if sites.shape != (self.n_encoded,) or sites.min() < 0 or sites.max() >= self.n_sites:
            raise NcbenchError(f"{self.path}: encoded/site must hold one site in 0..{self.n_sites - 1} per encoding")
        return sites

    def site(self, site: int) -> SiteView:
        """The encodings of one site, read like a release of their own (see :class:`SiteView`)."""
        return SiteView(self, np.flatnonzero(self.sites == site))

    @property
    def encoded_ids(self) -> list[str]:
        return self.strings("encoded/ids")

    @property
    def plain_ids(self) -> list[str]:
        return self.strings("plain/ids")

    @property
    def plain_images(self) -> np.ndarray:
        """(M, H, W) uint8: the plaintext pool / auxiliary set / known pairs' plaintexts."""
        return self.read("plain/images")

    @property
    def plain_pool(self) -> RowReader:
        """:attr:`plain_images` read only as sliced (64 KB per 256 x 256 image: 6.5 GB at
        M = 100,000)."""
        return RowReader(self, "plain/images")

    @property
    def label_names(self) -> list[str]:
        labels = self._require("encoded/labels")
        with self._layout():
            return json.loads(labels.attrs.get("label_names", "[]"))

    @property
    def labels(self) -> np.ndarray:
        return self.read("encoded/labels")

    @property
    def target_ids(self) -> list[str]:
        return self.strings("target/ids")

    @property
    def target_images(self) -> np.ndarray:
        return self.read("target/images")

    @property
    def pair_encoded_ids(self) -> list[str]:
        """``invert`` only: the encoded ids whose plaintexts are ``plain/images`` (same order)."""
        return self.strings("pairs/encoded_ids")

    def encoded_rows(self, rows, *, dtype=np.float32, channels: int | None = None) -> np.ndarray:
        """Encodings (len(rows), P, D) at ``rows``, in the order given (any order, repeats allowed),
        as ``dtype`` (None: as stored); ``channels``: their first that many only, (len(rows), P,
        channels), of which a full-width release stores blocks apart (docs/format.md)."""
        unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        encoded = self._rows("encoded/data", unique, dtype=dtype, columns=channels)
        return encoded if np.array_equal(inverse, np.arange(len(unique))) else encoded[inverse]

    def iter_encoded(
        self, chunk: int = 64, *, dtype=np.float32, reverse: bool = False, channels: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, encodings (b, P, D)), ``chunk`` items at a time, in row order or, with
        ``reverse``, last block first: a second pass over a release larger than the page cache
        then finds the end of the first pass still cached (in row order it would evict each page
        just before reading it). ``channels``: as in :meth:`encoded_rows`."""
        return iter_blocks(self, chunk, dtype, reverse, channels)

    def describe(self) -> dict:
        """What ``ncbench challenge info`` prints: attributes and dataset shapes."""
        with self._layout():
            return _describe(self.h5)


class SiteView:
    """The encodings of one site of a release (rows ``rows``, in release order), with the reading
    interface attacks use on a whole release: one key, so one slot order and one kernel."""

    def __init__(self, release: Release, rows: np.ndarray):
        self.release, self.rows = release, np.asarray(rows, np.int64)
        self.config, self.challenge_id, self.task = release.config, release.challenge_id, release.task

    @property
    def n_encoded(self) -> int:
        return len(self.rows)

    @property
    def encoded_ids(self) -> list[str]:
        ids = self.release.encoded_ids
        return [ids[r] for r in self.rows]

    @property
    def plain_images(self) -> np.ndarray:
        return self.release.plain_images

    def encoded_rows(self, rows, *, dtype=np.float32, channels: int | None = None) -> np.ndarray:
        return self.release.encoded_rows(self.rows[np.asarray(rows, np.int64)], dtype=dtype, channels=channels)

    def iter_encoded(
        self, chunk: int = 64, *, dtype=np.float32, reverse: bool = False, channels: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        return iter_blocks(self, chunk, dtype, reverse, channels)


def iter_blocks(
    view, chunk: int, dtype, reverse: bool, channels: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """``view.iter_encoded`` for anything with ``n_encoded`` and ``encoded_rows(rows, dtype=, channels=)``."""
    starts = range(0, view.n_encoded, chunk)
    for start in reversed(starts) if reverse else starts:
        rows = np.arange(start, min(start + chunk, view.n_encoded))
        yield start, view.encoded_rows(rows, dtype=dtype, channels=channels)


class Key(_H5File):
    """An organizer's private key (``private/key.h5``). Only organizer tools open it."""

    FORMAT = KEY_FORMAT

    @property
    def challenge_id(self) -> str:
        with self._layout():
            return str(self.h5.attrs["challenge_id"])

    @property
    def config(self) -> EncoderConfig:
        encoder = self._require("encoder")
        with self._layout():
            return EncoderConfig.from_json(encoder.attrs["encoder_config"])

    @property
    def seed(self) -> str:
        """The build seed as text: lowercase hex, or decimal for an integer test seed."""
        encoder = self._require("encoder")
        with self._layout():
            return str(encoder.attrs["seed"])

    def tensors(self, site: int = 0) -> dict[str, np.ndarray]:
        """The key tensors of ``site``: site 0 in ``encoder/``, site k > 0 in ``sites/k/``."""
        group = "encoder" if site == 0 else f"sites/{site}"
        return {name: self.read(f"{group}/{name}") for name in key_tensor_names(self.config)}

    def commitment(self) -> str:
        """sha256 of the salt plus the key's canonical content (see :func:`canonical_digest`)."""
        salt = self.read("commitment/salt").tobytes()
        return hashlib.sha256(salt + canonical_digest(self.h5)).hexdigest()

    def describe(self, *, secrets: bool = False) -> dict:
        with self._layout():
            info = _describe(self.h5)
        if not secrets:
            info["attrs"] = {k: v for k, v in info["attrs"].items() if k != "seed"}
            info.get("encoder", {}).get("attrs", {}).pop("seed", None)
        return info


class SiteKey(_H5File):
    """One site's encoder weights and nothing else (``ncbench challenge site-key``): what a
    hospital colluding with an attacker could hand over. No seed, no truth, no other site."""

    FORMAT = SITE_KEY_FORMAT

    def tensors(self) -> dict[str, np.ndarray]:
        return {name: self.read(f"encoder/{name}") for name in key_tensor_names(self.config)}


def write_site_key(key: Key, site: int, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write site ``site``'s key tensors of ``key`` to ``out`` (a :class:`SiteKey` file), atomically."""
    from ncbench.h5io import atomic_path, set_root_attrs, write_dataset

    n_sites = int(key.h5.attrs.get("n_sites", 1))
    if not 0 <= site < n_sites:
        raise NcbenchError(f"--site must be between 0 and {n_sites - 1} for challenge {key.challenge_id}")
    out = Path(out)
    with atomic_path(out, force=force) as tmp, _private(tmp), h5py.File(tmp, "w") as h5:
        set_root_attrs(
            h5,
            SITE_KEY_FORMAT,
            SCHEMA_VERSION,
            challenge_id=key.challenge_id,
            site=np.int64(site),
            encoder_config=key.config.to_json(),
        )
        group = h5.create_group("encoder")
        for name, values in key.tensors(site).items():
            write_dataset(group, name, values)
    return out


@contextlib.contextmanager
def _private(path: Path) -> Iterator[None]:
    """Create ``path`` 0600 before h5py truncates it (a site's key is a secret, whatever the umask)."""
    create_private_file(path)
    yield


DIGEST_CANONICAL = "canonical-json"  # a key's root attribute ``digest``: how its attributes are hashed


def canonical_digest(handle: h5py.File) -> bytes:
    """sha256 over every dataset (name, dtype, shape, bytes) and every attribute, sorted by name.

    Excludes ``commitment/salt`` (it is mixed in separately) and the root attribute
    ``release_sha256`` (written after the release, which itself records this commitment).
    Attribute values are hashed in their canonical JSON (:mod:`ncbench.canonical`), the same on
    every machine; a key without the root attribute ``digest`` predates that and is hashed with
    ``repr()`` of each value, which depends on the numpy version that reads it.
    """
    from ncbench.canonical import canonical_json

    canonical = handle.attrs.get("digest") == DIGEST_CANONICAL
    digest = hashlib.sha256()
    items: list[tuple[str, h5py.HLObject]] = []
    handle.visititems(lambda name, obj: items.append((name, obj)))
    for name, obj in sorted([("", handle), *items], key=lambda item: item[0]):
        for attr in sorted(obj.attrs):
            if name == "" and attr == "release_sha256":
                continue
            value = obj.attrs[attr]
            if canonical:
                digest.update(b"attr " + canonical_json([name, attr, value]) + b"\n")
            else:
                digest.update(f"attr {name}/{attr}={value!r}\n".encode())
        if isinstance(obj, h5py.Dataset) and name != "commitment/salt":
            values = obj[()]
            if values.dtype.kind == "O":
                values = np.asarray([str(v) for v in values]).astype("U")
            digest.update(f"data {name} {values.dtype.str} {values.shape}\n".encode())
            digest.update(np.ascontiguousarray(values).tobytes())
    return digest.digest()


def _describe(handle: h5py.File) -> dict:
    def attrs_of(obj) -> dict:
        return {_text(k): (v.item() if isinstance(v, np.generic) else v) for k, v in obj.attrs.items()}

    info: dict = {"attrs": attrs_of(handle)}

    def visit(name, obj):
        entry = {"attrs": attrs_of(obj)} if obj.attrs else {}
        if isinstance(obj, h5py.Dataset):
            entry.update(shape=list(obj.shape), dtype=str(obj.dtype))
        info[_text(name)] = entry

    handle.visititems(visit)
    return info


def _text(name: str | bytes) -> str:
    """An HDF5 name as text: h5py hands back bytes for a name that is not UTF-8 (a damaged file)."""
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else name


@dataclass(frozen=True)
class ReleaseLayout:
    """Where the files of a release directory live (docs/format.md#release-directory)."""

    root: Path

    @property
    def public(self) -> Path:
        return self.root / "public"

    @property
    def private(self) -> Path:
        return self.root / "private"

    @property
    def release(self) -> Path:
        return self.public / "release.h5"

    @property
    def key(self) -> Path:
        return self.private / "key.h5"

    @classmethod
    def of_key(cls, key_file: Path) -> ReleaseLayout:
        """The directory a ``private/key.h5`` sits in."""
        return cls(Path(key_file).parent.parent)


def release_file(path: str | os.PathLike) -> Path:
    """A release file as given, or the ``public/release.h5`` of a release directory (or a bare
    ``release.h5`` in a folder, as attackers receive it)."""
    path = Path(path)
    if path.is_dir():
        layout = ReleaseLayout(path)
        return layout.release if layout.public.is_dir() else path / "release.h5"
    return path


def key_file(path: str | os.PathLike) -> Path:
    """A key file as given, or the ``private/key.h5`` of a release directory."""
    path = Path(path)
    return ReleaseLayout(path).key if path.is_dir() else path


def open_release(path: str | os.PathLike) -> Release:
    """Open a release file, or the ``public/release.h5`` inside a release directory."""
    return Release(release_file(path))


# What a release from outside may declare: no preset is deeper than 47 blocks or wider than 2,048
# channels, and attacks build encoders of a release's depth and width.
FETCHED_DEPTH_MAX = 1024
FETCHED_WIDTH_MAX = 16384


def check_untrusted_release(path: str | os.PathLike) -> None:
    """Refuse a release file from outside (one that a server sent) unless reading it costs what
    its bytes say: its layout checked before anything is read, as a submission's is
    (:func:`ncbench.h5io.open_untrusted`: no links to other files, only our filters, bounded
    metadata); every dataset stored whole (a declared shape without its chunks would read back
    as fill values of any size) and every chunk inflated at most to its declared size
    (:func:`ncbench.h5io.check_chunks`); then its attributes as :class:`Release` reads them, an
    encoder of at most :data:`FETCHED_DEPTH_MAX` blocks and :data:`FETCHED_WIDTH_MAX` channels,
    and encodings and images of the shapes that encoder makes."""
    path = Path(path)
    handle, datasets = open_untrusted(path, RELEASE_FORMAT, SCHEMA_VERSION)
    try:
        for name, info in datasets.items():
            _stored_whole(handle[name], info, path)
            check_chunks(handle[name], info, path)
    finally:
        handle.close()
    with Release(path) as release, release._layout():
        config = release.config
        if config.depth > FETCHED_DEPTH_MAX or config.width > FETCHED_WIDTH_MAX:
            raise NcbenchError(
                f"{path}: an encoder of {config.depth:,} blocks and {config.width:,} channels; a release from "
                f"outside may have at most {FETCHED_DEPTH_MAX:,} and {FETCHED_WIDTH_MAX:,}"
            )
        shapes = {"encoded/data": (config.n_patches, config.width), "plain/images": (config.image_size,) * 2}
        for name, rest in shapes.items():
            if name in release.h5 and release.h5[name].shape[1:] != rest:
                made = ", ".join(map(str, rest))
                raise NcbenchError(f"{path}: {name} has shape {release.h5[name].shape}; its encoder makes (N, {made})")


def _stored_whole(dataset: h5py.Dataset, info: DatasetInfo, path: Path) -> None:
    if info.declared_bytes == 0:
        return
    if info.chunks is None:
        whole = info.stored_bytes == info.declared_bytes
    else:
        whole = dataset.id.get_num_chunks() == math.prod(-(-n // c) for n, c in zip(info.shape, info.chunks))
    if not whole:
        raise NcbenchError(f"{path}: {info.name} declares {info.shape} but does not store all of it")


def open_key(path: str | os.PathLike) -> Key:
    """Open a key file, or the ``private/key.h5`` inside a release directory."""
    return Key(key_file(path))
