"""Image sources: ``folder:PATH``, ``manifest:FILE``, ``sample`` and ``phantom`` (SPEC section 2b).

Every source returns an :class:`ImageSet` of 8-bit grayscale images already resized to
``image_size`` x ``image_size`` (aspect ratio not kept, as in the original challenge).

Spec strings::

    sample                                  seeded views of 2 real radiographs (pydicom-data)
    phantom                                 seeded procedural chest phantoms with findings
    folder:PATH[?labels=FILE.csv]           PNG / JPEG / DICOM files below PATH
    manifest:FILE[?root=DIR&split=NAME]     a data manifest (data_manifest/SCHEMA.md)
"""

from __future__ import annotations

import importlib.resources
import io
import math
import os
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from challenge.errors import NcbenchError
from challenge.progress import progress


@dataclass(frozen=True)
class ImageSet:
    """Images plus what may be published about them.

    images: (N, S, S) uint8; ids: N stable source-level ids (never local paths);
    labels: (N, K) int8 with 1 / 0 and -1 for unknown; label_names: K names;
    description: one public sentence on what the images are (recorded in the release).
    """

    images: np.ndarray
    ids: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    description: str

    def __len__(self) -> int:
        return len(self.ids)


VALID_FORMS = (
    "sample, phantom, folder:PATH[?labels=FILE.csv], manifest:FILE[?root=DIR&split=NAME]"
)


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
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size < 1:
        raise NcbenchError(f"image size must be a positive integer, got {image_size!r}")
    n, seed, image_size = int(n), int(seed), int(image_size)
    kind, _, rest = spec.partition(":")
    if spec == "sample":
        return _load_sample(n, seed, image_size)
    if spec == "phantom":
        return _load_phantom(n, seed, image_size)
    if kind == "folder" and rest:
        path, options = _split_options(spec, rest, allowed=("labels",))
        return _load_folder(Path(path), options.get("labels"), n, seed, image_size)
    if kind == "manifest" and rest:
        path, options = _split_options(spec, rest, allowed=("root", "split"))
        return _load_manifest(Path(path), options.get("root"), options.get("split"), n, seed,
                              image_size)
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
            raise NcbenchError(f"image source {spec!r}: unknown option {key!r} "
                               f"(allowed: {', '.join(allowed)})")
        if key in options or not value:
            raise NcbenchError(f"image source {spec!r}: option {key!r} must be given once, "
                               "with a value")
        options[key] = value
    if not path:
        raise NcbenchError(f"image source {spec!r}: missing path; valid forms: {VALID_FORMS}")
    return path, options


def _choose(available: int, n: int, seed: int) -> np.ndarray:
    """A seeded subset of ``n`` of ``range(available)``, sorted (so sorted by id)."""
    return np.sort(np.random.default_rng(seed).choice(available, size=n, replace=False))


# --------------------------------------------------------------------------------------------
# Decoding and resizing (shared by folder, manifest and sample)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")


def _has_dicom_preamble(path: Path) -> bool:
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
            if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES \
                    or (suffix != ".csv" and _has_dicom_preamble(path)):
                found.append((path.relative_to(folder).as_posix(), path))
    return sorted(found)


def _dicom_to_unit(dataset) -> np.ndarray:
    """Stored DICOM pixels -> (H, W) float32 in [0, 1], bright = dense (bone white).

    Applies the modality rescale, inverts MONOCHROME1 (where low values are white) and windows
    to the 0.5 / 99.5 percentiles, which drops burnt-in markers and collimator edges.
    """
    from pydicom.pixels import apply_modality_lut

    pixels = dataset.pixel_array
    if int(getattr(dataset, "SamplesPerPixel", 1)) == 3:
        pixels = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif pixels.ndim != 2:
        raise ValueError(f"{pixels.shape[0]} frames; only single-frame images are supported")
    values = np.asarray(apply_modality_lut(pixels, dataset), dtype=np.float32)
    if str(getattr(dataset, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        values = -values
    low, high = np.percentile(values, [0.5, 99.5])
    return np.clip((values - low) / max(float(high - low), 1e-12), 0.0, 1.0).astype(np.float32)


def _pillow_to_unit(image) -> np.ndarray:
    """A Pillow image -> (H, W) float32 in [0, 1]; 16-bit grayscale is scaled to 8 bits."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float32)
        return (np.clip(values, 0, 65535) / 65535.0 * 255.0).round().astype(np.float32) / 255.0
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def decode_image(content: bytes, name: str) -> np.ndarray:
    """Encoded file bytes -> (H, W) float32 grayscale in [0, 1].

    DICOM (by suffix or preamble) goes through pydicom, anything else through Pillow.
    Raises NcbenchError naming ``name`` when the file cannot be decoded.
    """
    try:
        if Path(name).suffix.lower() in DICOM_SUFFIXES or content[128:132] == b"DICM":
            import pydicom

            return _dicom_to_unit(pydicom.dcmread(io.BytesIO(content), force=True))
        from PIL import Image

        with Image.open(io.BytesIO(content)) as image:
            image.load()
            return _pillow_to_unit(image)
    except NcbenchError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure is a bad file
        reason = " ".join(str(error).split()) or type(error).__name__
        raise NcbenchError(f"cannot read image {name}: {reason}") from None


def resize_unit(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W) float in [0, 1] -> (B, size, size): bilinear with antialias, aspect not kept."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images[:, None], size=(size, size), mode="bilinear",
                         antialias=True, align_corners=False)[:, 0]


def to_uint8(unit: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 on 0..255 (rounded, clipped)."""
    unit = torch.as_tensor(unit)
    return (unit.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _decode_resized(content: bytes, name: str, size: int) -> np.ndarray:
    unit = torch.from_numpy(decode_image(content, name))
    return to_uint8(resize_unit(unit[None], size)[0])


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise NcbenchError(f"cannot read image {path}: {error.strerror or error}") from None


# --------------------------------------------------------------------------------------------
# folder:PATH

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
    names = tuple(str(c) for c in table.columns
                  if c != "Path" and c not in CHEXPERT_METADATA_COLUMNS)
    values = table[list(names)].apply(pd.to_numeric, errors="coerce")
    findings = values.to_numpy(dtype=np.float64, na_value=np.nan)
    raw_blank = table[list(names)].isna().to_numpy()
    bad = ~np.isin(findings, (1.0, 0.0, -1.0)) & ~raw_blank
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise NcbenchError(f"labels CSV {csv_path}: column {names[col]!r} row {row + 2} holds "
                           f"{table[names[col]].iloc[row]!r}; expected 1.0, 0.0, -1.0 or blank")
    position = {image_id: i for i, image_id in enumerate(ids)}
    labels = np.full((len(ids), len(names)), -1, dtype=np.int8)
    matched: set[int] = set()
    for row, listed in enumerate(table["Path"].fillna("").astype(str)):
        parts = listed.replace("\\", "/").strip("/").split("/")
        # Strip leading components until the rest is one of ours (CheXpert's dataset prefix).
        index = next((position[key] for k in range(len(parts))
                      if (key := "/".join(parts[k:])) in position), None)
        if index is None:
            continue
        if index in matched:
            raise NcbenchError(f"labels CSV {csv_path} lists {ids[index]} more than once")
        matched.add(index)
        labels[index] = np.where(findings[row] == 1.0, 1, np.where(findings[row] == 0.0, 0, -1))
    return labels, names


def _load_folder(folder: Path, labels_csv: str | None, n: int, seed: int,
                 image_size: int) -> ImageSet:
    if not folder.is_dir():
        raise NcbenchError(f"folder {folder} does not exist")
    files = find_image_files(folder)
    if not files:
        raise NcbenchError(f"folder {folder} holds no PNG, JPEG or DICOM images")
    if n > len(files):
        raise NcbenchError(f"folder {folder} holds {len(files)} images, {n} requested")
    chosen = [files[i] for i in _choose(len(files), n, seed)]
    ids = [image_id for image_id, _ in chosen]
    images = np.empty((n, image_size, image_size), dtype=np.uint8)
    with progress(f"reading images from {folder.name or folder}", n) as advance:
        for row, (_, path) in enumerate(chosen):
            images[row] = _decode_resized(_read_bytes(path), str(path), image_size)
            advance(1)
    csv_path = Path(labels_csv) if labels_csv else folder / "labels.csv"
    if labels_csv or csv_path.is_file():
        labels, names = read_labels_csv(csv_path, ids)
        labelled = f", findings from {csv_path.name}"
    else:
        labels, names, labelled = np.zeros((n, 0), dtype=np.int8), (), ""
    description = (f"{n} images from folder {folder.resolve().name} "
                   f"(seeded choice of {len(files)}){labelled}")
    return ImageSet(images, tuple(ids), labels, names, description)


# --------------------------------------------------------------------------------------------
# manifest:FILE

def _load_manifest(csv_path: Path, root: str | None, split: str | None, n: int, seed: int,
                   image_size: int) -> ImageSet:
    from data_manifest.manifest import read_manifest, verify_content

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
    images = np.empty((n, image_size, image_size), dtype=np.uint8)
    with progress(f"reading images of manifest {sidecar['name']}", n) as advance:
        for row, record in enumerate(frame.itertuples(index=False)):
            content = _read_bytes(Path(record.file))
            verify_content(content, record.sha256, record.file, csv_path)
            images[row] = _decode_resized(content, record.file, image_size)
            advance(1)
    labels = frame[list(label_names)].to_numpy(dtype=np.int8).reshape(n, len(label_names))
    chosen_from = f" split {split}" if split else ""
    description = (f"{n} images from data manifest {sidecar['name']!r}{chosen_from} "
                   f"({sidecar['source']}; licence {sidecar['licence']})")
    return ImageSet(images, tuple(frame["id"]), labels, label_names, description)


# --------------------------------------------------------------------------------------------
# sample: seeded views of two real radiographs from pydicom-data

SAMPLE_MANIFEST = Path(str(importlib.resources.files("data_manifest").joinpath("sample.csv")))


@dataclass(frozen=True)
class ViewTransform:
    """One seeded transform of the sample views, driven by one uniform number u in [0, 1).

    kind ``uniform``: low + u (high - low); ``bernoulli``: applied when u < p.
    """

    name: str
    kind: str
    description: str
    low: float | None = None
    high: float | None = None
    p: float | None = None
    unit: str | None = None

    def draw(self, u: np.ndarray) -> np.ndarray:
        if self.kind == "bernoulli":
            return u < self.p
        return self.low + u * (self.high - self.low)

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


# View k of seed s uses rng = np.random.default_rng(np.random.SeedSequence(s, spawn_key=(k,)))
# (= SeedSequence(s).spawn(k + 1)[k]): first rng.random(len(SAMPLE_VIEW_TRANSFORMS)), one number
# per row below in this order, then rng.standard_normal((S, S), float32) for the film noise.
# So view k is the same whatever n is. The sidecar data_manifest/sample.json records this table.
SAMPLE_VIEW_TRANSFORMS = (
    ViewTransform("film", "bernoulli", "RG1 (adult PA chest) when drawn, else RG3 (lower leg)",
                  p=0.8),
    ViewTransform("rotation", "uniform", "rotation about the image centre",
                  low=-7.0, high=7.0, unit="degrees"),
    ViewTransform("scale", "uniform", "isotropic zoom; above 1 enlarges the anatomy",
                  low=0.9, high=1.15, unit="factor"),
    ViewTransform("stretch", "uniform",
                  "anisotropic stretch: width times sqrt(s), height divided by sqrt(s)",
                  low=0.92, high=1.08, unit="factor"),
    ViewTransform("shift_x", "uniform", "horizontal translation",
                  low=-0.06, high=0.06, unit="fraction of width"),
    ViewTransform("shift_y", "uniform", "vertical translation",
                  low=-0.06, high=0.06, unit="fraction of height"),
    ViewTransform("horizontal_flip", "bernoulli", "mirror left-right", p=0.05),
    ViewTransform("gamma", "uniform", "intensity x on [0, 1] becomes x ** gamma",
                  low=0.7, high=1.4, unit="exponent"),
    ViewTransform("contrast", "uniform", "intensity scaled about mid-grey",
                  low=0.85, high=1.15, unit="factor"),
    ViewTransform("brightness", "uniform", "intensity offset",
                  low=-0.06, high=0.06, unit="fraction of full scale"),
    ViewTransform("blur", "uniform",
                  "x + a (gaussian(x) - x) with sigma = S/256 pixels: a > 0 blurs, a < 0 "
                  "sharpens (unsharp mask)", low=-0.6, high=0.6, unit="amount a"),
    ViewTransform("noise", "uniform", "standard deviation of additive gaussian film noise",
                  low=0.004, high=0.02, unit="fraction of full scale"),
)
SAMPLE_FILMS = ("RG1", "RG3")  # film index 0 = chest (drawn), 1 = lower leg
SAMPLE_BATCH_PIXELS = 1 << 22  # views rendered together: ~16 MB per float32 batch tensor


def sample_description(n: int) -> str:
    return (f"{n} views (seeded geometric and photometric transforms) of 2 real radiographs from "
            "pydicom-data (RG1 adult PA chest film, RG3 lower-leg film): views of few patients, "
            "not a cohort")


def _sample_film_files() -> dict[str, tuple[Path, str]]:
    """``{RG1: (path, sha256), RG3: ...}`` after checking each file against the sample manifest."""
    import pydicom.data

    from data_manifest.manifest import read_manifest, verify_content

    frame = read_manifest(SAMPLE_MANIFEST)
    films = {}
    for record in frame.itertuples(index=False):
        found = pydicom.data.get_testdata_file(record.path, download=False)
        if found is None:
            raise NcbenchError(f"{record.path} not found: install pydicom-data "
                               "(pip install pydicom-data) for the sample source")
        verify_content(Path(found).read_bytes(), record.sha256, found, SAMPLE_MANIFEST)
        films[record.id] = (Path(found), record.sha256)
    missing = set(SAMPLE_FILMS) - set(films)
    if missing:
        raise NcbenchError(f"sample manifest {SAMPLE_MANIFEST} lacks {', '.join(sorted(missing))}")
    return films


_FILM_CACHE: dict[tuple[str, int], torch.Tensor] = {}


def _film_base(path: Path, sha256: str, size: int) -> torch.Tensor:
    """The whole film, decoded and downsampled once (antialiased) to (size, size) float32."""
    key = (sha256, size)
    if key not in _FILM_CACHE:
        unit = torch.from_numpy(decode_image(path.read_bytes(), str(path)))
        _FILM_CACHE[key] = resize_unit(unit[None], size)[0].contiguous()
    return _FILM_CACHE[key]


def sample_view_parameters(seed: int, views: range, size: int) -> tuple[dict, np.ndarray]:
    """Draw the transforms of ``views`` -> ({name: (V,) values}, noise (V, S, S) float32).

    Each view has its own generator (see SAMPLE_VIEW_TRANSFORMS), so any view range can be
    drawn on its own and agrees with the same views drawn as part of a longer range.
    """
    uniforms = np.empty((len(views), len(SAMPLE_VIEW_TRANSFORMS)))
    noise = np.empty((len(views), size, size), dtype=np.float32)
    for row, view in enumerate(views):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(view,)))
        uniforms[row] = rng.random(len(SAMPLE_VIEW_TRANSFORMS))
        noise[row] = rng.standard_normal((size, size), dtype=np.float32)
    params = {t.name: t.draw(uniforms[:, j]) for j, t in enumerate(SAMPLE_VIEW_TRANSFORMS)}
    return params, noise


def render_views(bases: torch.Tensor, params: dict, noise: np.ndarray) -> np.ndarray:
    """Apply drawn view transforms to base films.

    bases: (F, S, S) float in [0, 1], one per film (index 0 = RG1 when ``film`` is drawn);
    params: {name: (V,)} from :func:`sample_view_parameters`; noise: (V, S, S) standard normal.
    Returns (V, S, S) uint8. Geometry: one ``affine_grid`` + ``grid_sample`` (bilinear, zeros
    outside the film, like an off-centre cassette) per batch; then gamma, contrast / brightness,
    blur or sharpen, and noise, all batched.
    """
    views, size = noise.shape[0], bases.shape[-1]
    film = torch.from_numpy(np.where(params["film"], 0, 1))
    source = bases[film][:, None]                                     # (V, 1, S, S)
    as_tensor = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in params.items()}
    angle = torch.deg2rad(as_tensor["rotation"])
    stretch = as_tensor["stretch"].sqrt()
    scale_x, scale_y = as_tensor["scale"] * stretch, as_tensor["scale"] / stretch
    mirror = 1.0 - 2.0 * as_tensor["horizontal_flip"]
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates ([-1, 1]) to film coordinates: rotate, then zoom / stretch,
    # mirror and shift the output grid, i.e. the anatomy moves by +shift and grows by +scale.
    theta = torch.stack([
        torch.stack([cos * mirror / scale_x, -sin / scale_y, -2 * as_tensor["shift_x"]], -1),
        torch.stack([sin * mirror / scale_x, cos / scale_y, -2 * as_tensor["shift_y"]], -1),
    ], 1)
    grid = F.affine_grid(theta, [views, 1, size, size], align_corners=False)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)                          # (V, 1, S, S)
    column = {k: v[:, None, None, None] for k, v in as_tensor.items()}
    out = out.clamp_(0, 1).pow_(column["gamma"])
    out = out.mul_(column["contrast"]).add_(0.5 - 0.5 * column["contrast"] + column["brightness"])
    out = out.lerp_(_gaussian_blur(out, sigma=size / 256), column["blur"])  # a < 0 sharpens
    out = out.addcmul_(column["noise"], torch.from_numpy(noise)[:, None])
    return to_uint8(out[:, 0])


def _gaussian_blur(images: torch.Tensor, *, sigma: float) -> torch.Tensor:
    """(B, 1, S, S) -> same shape; separable gaussian, edges replicated.

    Written as sums of shifted slices: a single-channel conv2d is several times slower on CPU.
    """
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).tolist()
    size = images.shape[-1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    rows = torch.zeros(padded.shape[:-1] + (size,), dtype=images.dtype)
    for shift, weight in enumerate(kernel):
        rows.add_(padded[..., :, shift:shift + size], alpha=weight)
    blurred = torch.zeros_like(images)
    for shift, weight in enumerate(kernel):
        blurred.add_(rows[..., shift:shift + size, :], alpha=weight)
    return blurred


def _load_sample(n: int, seed: int, image_size: int) -> ImageSet:
    films = _sample_film_files()
    bases = torch.stack([_film_base(*films[name], image_size) for name in SAMPLE_FILMS])
    images = np.empty((n, image_size, image_size), dtype=np.uint8)
    ids = []
    batch = max(1, SAMPLE_BATCH_PIXELS // (image_size * image_size))
    with progress("rendering sample views", n) as advance:
        for start in range(0, n, batch):
            views = range(start, min(n, start + batch))
            params, noise = sample_view_parameters(seed, views, image_size)
            images[views.start:views.stop] = render_views(bases, params, noise)
            ids += [f"sample-{SAMPLE_FILMS[0] if chest else SAMPLE_FILMS[1]}-v{view:06d}"
                    for view, chest in zip(views, params["film"])]
            advance(len(views))
    return ImageSet(images, tuple(ids), np.zeros((n, 0), dtype=np.int8), (),
                    sample_description(n))


# --------------------------------------------------------------------------------------------
# phantom

def _load_phantom(n: int, seed: int, image_size: int) -> ImageSet:
    from challenge.phantom import LABEL_NAMES, render_phantoms

    images, labels = render_phantoms(n, seed=seed, image_size=image_size)
    description = (f"{n} synthetic chest-radiograph phantoms (seeded procedural generator: lung "
                   "fields, heart, ribs, spine, diaphragm, noise) with ground-truth findings; "
                   "no real patients")
    return ImageSet(np.asarray(images, dtype=np.uint8), tuple(f"phantom-{k:06d}" for k in range(n)),
                    np.asarray(labels, dtype=np.int8), tuple(LABEL_NAMES), description)
