"""Image sources: ``folder:PATH``, ``manifest:FILE``, ``sample`` and ``phantom`` (docs/format.md#data-manifests).

This module dispatches a spec string to its source; the sample source lives in
:mod:`challenge.sample`, the phantom generator in :mod:`challenge.phantom`. Every source returns an :class:`ImageSet` of 8-bit grayscale images already resized to
``image_size`` x ``image_size`` (aspect ratio not kept, as in the original challenge).

Spec strings::

    sample                                  seeded views of 2 real radiographs (pydicom-data)
    phantom                                 seeded procedural chest phantoms with findings
    folder:PATH[?labels=FILE.csv]           PNG / JPEG / DICOM files below PATH
    manifest:FILE[?root=DIR&split=NAME]     a data manifest (data_manifest/SCHEMA.md)
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ncbench.challenge.images import ImageSet, decode_resized, read_image_bytes
from ncbench.challenge.sample import load_sample
from ncbench.data_manifest.folders import find_image_files, read_labels_csv
from ncbench.errors import NcbenchError
from ncbench.h5io import usable_cores
from ncbench.progress import progress

VALID_FORMS = "sample, phantom, folder:PATH[?labels=FILE.csv], manifest:FILE[?root=DIR&split=NAME]"


def load_images(spec: str, *, n: int, seed: int, image_size: int = 256) -> ImageSet:
    """Load ``n`` distinct images from the source named by ``spec``.

    spec: ``sample``, ``phantom``, ``folder:PATH`` or ``manifest:FILE``. ``seed`` makes any
    random choice (which files, which views) reproducible. Raises NcbenchError for user mistakes
    (unknown source, missing or empty folder, unreadable image, ``n`` beyond what the source holds,
    a manifest checksum mismatch).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise NcbenchError(f"the number of images must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise NcbenchError(f"the seed must be a non-negative integer, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise NcbenchError(f"image size must be a positive integer, got {image_size!r}")
    n, seed, image_size = int(n), int(seed), int(image_size)
    kind, _, rest = spec.partition(":")
    if spec == "sample":
        return load_sample(n, seed, image_size)
    if spec == "phantom":
        return _load_phantom(n, seed, image_size)
    if kind == "folder" and rest:
        path, options = _split_options(spec, rest, allowed=("labels",))
        return _load_folder(Path(path), options.get("labels"), n, seed, image_size)
    if kind == "manifest" and rest:
        path, options = _split_options(spec, rest, allowed=("root", "split"))
        return _load_manifest(Path(path), options.get("root"), options.get("split"), n, seed, image_size)
    raise NcbenchError(f"unknown image source {spec!r}; valid forms: {VALID_FORMS}")


def _split_options(spec: str, rest: str, *, allowed: tuple[str, ...]) -> tuple[str, dict]:
    """``PATH?key=value&...`` -> (PATH, {key: value}); only ``allowed`` keys, each once."""
    path, sep, query = rest.rpartition("?")
    if not sep:
        return rest, {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise NcbenchError(f"image source {spec!r}: cannot parse options {query!r}") from None
    options: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            raise NcbenchError(f"image source {spec!r}: unknown option {key!r} (allowed: {', '.join(allowed)})")
        if key in options or not value:
            raise NcbenchError(f"image source {spec!r}: option {key!r} must be given once, with a value")
        options[key] = value
    if not path:
        raise NcbenchError(f"image source {spec!r}: missing path; valid forms: {VALID_FORMS}")
    return path, options


def _choose(available: int, n: int, seed: int) -> np.ndarray:
    """A seeded subset of ``n`` of ``range(available)``, sorted (so sorted by id)."""
    return np.sort(np.random.default_rng(seed).choice(available, size=n, replace=False))


DECODE_THREADS_MAX = 8  # a full-size radiograph takes about 80 MB while it is decoded and resized


def _decoded(label: str, records: list, decode: Callable[[object], np.ndarray], image_size: int) -> np.ndarray:
    """``decode(record)`` of every record, stacked in order, on a pool of threads: the decoders
    and the resizing release the GIL (full-size 2320 x 2828 JPEGs, on 2 cores: 46 ms an image
    one at a time, 21 ms on two threads). The first bad file (in order) raises; on an error or
    Ctrl-C the images not yet started are dropped, not decoded."""
    pool = ThreadPoolExecutor(min(DECODE_THREADS_MAX, usable_cores()), thread_name_prefix="ncbench-decode")
    try:
        images = np.empty((len(records), image_size, image_size), dtype=np.uint8)
        with progress(label, len(records)) as advance:
            for row, image in enumerate(pool.map(decode, records)):
                images[row] = image
                advance(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return images


def _load_folder(folder: Path, labels_csv: str | None, n: int, seed: int, image_size: int) -> ImageSet:
    if not folder.is_dir():
        raise NcbenchError(f"folder {folder} does not exist")
    files = find_image_files(folder)
    if not files:
        raise NcbenchError(f"folder {folder} holds no PNG, JPEG or DICOM images")
    if n > len(files):
        raise NcbenchError(f"folder {folder} holds {len(files)} images, {n} requested")
    chosen = [files[i] for i in _choose(len(files), n, seed)]
    ids = [image_id for image_id, _ in chosen]

    def decode(path: Path) -> np.ndarray:
        return decode_resized(read_image_bytes(path), str(path), image_size)

    images = _decoded(f"reading images from {folder.name or folder}", [path for _, path in chosen], decode, image_size)
    csv_path = Path(labels_csv) if labels_csv else folder / "labels.csv"
    if labels_csv or csv_path.is_file():
        labels, names = read_labels_csv(csv_path, ids)
        labelled = f", findings from {csv_path.name}"
    else:
        labels, names, labelled = np.zeros((n, 0), dtype=np.int8), (), ""
    description = f"{n} images from folder {folder.resolve().name} (seeded choice of {len(files)}){labelled}"
    return ImageSet(images, tuple(ids), labels, names, description)


# --------------------------------------------------------------------------------------------
# manifest:FILE


def _load_manifest(csv_path: Path, root: str | None, split: str | None, n: int, seed: int, image_size: int) -> ImageSet:
    from ncbench.data_manifest.manifest import read_manifest, verify_content

    frame = read_manifest(csv_path, root=root)
    sidecar = frame.attrs["sidecar"]
    label_names = tuple(frame.attrs["label_names"])
    where = f"manifest {csv_path}"
    frame = frame.sort_values("id", kind="stable")  # choice independent of the CSV's row order
    if split is not None:
        splits = sorted(set(frame["split"]))
        frame = frame[frame["split"] == split]
        if frame.empty:
            raise NcbenchError(f"{where} has no split {split!r} (splits: {', '.join(splits)})")
        where += f" (split {split})"
    if n > len(frame):
        raise NcbenchError(f"{where} holds {len(frame)} images, {n} requested")
    frame = frame.iloc[_choose(len(frame), n, seed)]

    def decode(record) -> np.ndarray:
        content = read_image_bytes(Path(record.file))
        verify_content(content, record.sha256, record.file, csv_path)
        return decode_resized(content, record.file, image_size)

    images = _decoded(
        f"reading images of manifest {sidecar['name']}", list(frame.itertuples(index=False)), decode, image_size
    )
    labels = frame[list(label_names)].to_numpy(dtype=np.int8).reshape(n, len(label_names))
    chosen_from = f" split {split}" if split else ""
    description = (
        f"{n} images from data manifest {sidecar['name']!r}{chosen_from} "
        f"({sidecar['source']}; licence {sidecar['licence']})"
    )
    return ImageSet(images, tuple(frame["id"]), labels, label_names, description)


# --------------------------------------------------------------------------------------------
# phantom


def _load_phantom(n: int, seed: int, image_size: int) -> ImageSet:
    from ncbench.challenge.phantom import LABEL_NAMES, render_phantoms

    images, labels = render_phantoms(n, seed=seed, image_size=image_size)
    description = (
        f"{n} synthetic chest-radiograph phantoms (seeded procedural generator: lung "
        "fields, heart, ribs, spine, diaphragm, noise) with ground-truth findings; "
        "no real patients"
    )
    return ImageSet(
        np.asarray(images, dtype=np.uint8),
        tuple(f"phantom-{k:06d}" for k in range(n)),
        np.asarray(labels, dtype=np.int8),
        tuple(LABEL_NAMES),
        description,
    )
