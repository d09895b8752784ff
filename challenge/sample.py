"""The embedded ``sample`` source: seeded views of two real radiographs from pydicom-data.

RG1 (an adult PA chest film) and RG3 (a lower leg), checked against data_manifest/sample.csv,
rendered under documented geometric and photometric transforms (SAMPLE_VIEW_TRANSFORMS): views of
few patients, not a cohort.
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ncbench.challenge.images import ImageSet, decode_image, resize_unit, to_uint8
from ncbench.errors import NcbenchError
from ncbench.progress import progress

SAMPLE_MANIFEST = Path(str(importlib.resources.files("ncbench.data_manifest").joinpath("sample.csv")))


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
    ViewTransform("film", "bernoulli", "RG1 (adult PA chest) when drawn, else RG3 (lower leg)", p=0.8),
    ViewTransform("rotation", "uniform", "rotation about the image centre", low=-7.0, high=7.0, unit="degrees"),
    ViewTransform(
        "scale", "uniform", "isotropic zoom; above 1 enlarges the anatomy", low=0.9, high=1.15, unit="factor"
    ),
    ViewTransform(
        "stretch",
        "uniform",
        "anisotropic stretch: width times sqrt(s), height divided by sqrt(s)",
        low=0.92,
        high=1.08,
        unit="factor",
    ),
    ViewTransform("shift_x", "uniform", "horizontal translation", low=-0.06, high=0.06, unit="fraction of width"),
    ViewTransform("shift_y", "uniform", "vertical translation", low=-0.06, high=0.06, unit="fraction of height"),
    ViewTransform("horizontal_flip", "bernoulli", "mirror left-right", p=0.05),
    ViewTransform("gamma", "uniform", "intensity x on [0, 1] becomes x ** gamma", low=0.7, high=1.4, unit="exponent"),
    ViewTransform("contrast", "uniform", "intensity scaled about mid-grey", low=0.85, high=1.15, unit="factor"),
    ViewTransform("brightness", "uniform", "intensity offset", low=-0.06, high=0.06, unit="fraction of full scale"),
    ViewTransform(
        "blur",
        "uniform",
        "x + a (gaussian(x) - x) with sigma = S/256 pixels: a > 0 blurs, a < 0 sharpens (unsharp mask)",
        low=-0.6,
        high=0.6,
        unit="amount a",
    ),
    ViewTransform(
        "noise",
        "uniform",
        "standard deviation of additive gaussian film noise",
        low=0.004,
        high=0.02,
        unit="fraction of full scale",
    ),
)
SAMPLE_FILMS = ("RG1", "RG3")  # film index 0 = chest (drawn), 1 = lower leg
SAMPLE_BATCH_PIXELS = 1 << 22  # views rendered together: ~16 MB per float32 batch tensor


def sample_description(n: int) -> str:
    return (
        f"{n} views (seeded geometric and photometric transforms) of 2 real radiographs from "
        "pydicom-data (RG1 adult PA chest film, RG3 lower-leg film): views of few patients, "
        "not a cohort"
    )


def _sample_film_files() -> dict[str, tuple[Path, str]]:
    """``{RG1: (path, sha256), RG3: ...}`` after checking each file against the sample manifest."""
    import pydicom.data

    from ncbench.data_manifest.manifest import read_manifest, verify_content

    frame = read_manifest(SAMPLE_MANIFEST)
    films = {}
    for record in frame.itertuples(index=False):
        found = pydicom.data.get_testdata_file(record.path, download=False)
        if found is None:
            raise NcbenchError(
                f"{record.path} not found: install pydicom-data (pip install pydicom-data) for the sample source"
            )
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
    source = bases[film][:, None]  # (V, 1, S, S)
    as_tensor = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in params.items()}
    angle = torch.deg2rad(as_tensor["rotation"])
    stretch = as_tensor["stretch"].sqrt()
    scale_x, scale_y = as_tensor["scale"] * stretch, as_tensor["scale"] / stretch
    mirror = 1.0 - 2.0 * as_tensor["horizontal_flip"]
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates ([-1, 1]) to film coordinates: rotate, then zoom / stretch,
    # mirror and shift the output grid, i.e. the anatomy moves by +shift and grows by +scale.
    theta = torch.stack(
        [
            torch.stack([cos * mirror / scale_x, -sin / scale_y, -2 * as_tensor["shift_x"]], -1),
            torch.stack([sin * mirror / scale_x, cos / scale_y, -2 * as_tensor["shift_y"]], -1),
        ],
        1,
    )
    grid = F.affine_grid(theta, [views, 1, size, size], align_corners=False)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (V, 1, S, S)
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
        rows.add_(padded[..., :, shift : shift + size], alpha=weight)
    blurred = torch.zeros_like(images)
    for shift, weight in enumerate(kernel):
        blurred.add_(rows[..., shift : shift + size, :], alpha=weight)
    return blurred


def load_sample(n: int, seed: int, image_size: int) -> ImageSet:
    films = _sample_film_files()
    bases = torch.stack([_film_base(*films[name], image_size) for name in SAMPLE_FILMS])
    images = np.empty((n, image_size, image_size), dtype=np.uint8)
    ids = []
    batch = max(1, SAMPLE_BATCH_PIXELS // (image_size * image_size))
    with progress("rendering sample views", n) as advance:
        for start in range(0, n, batch):
            views = range(start, min(n, start + batch))
            params, noise = sample_view_parameters(seed, views, image_size)
            images[views.start : views.stop] = render_views(bases, params, noise)
            ids += [
                f"sample-{SAMPLE_FILMS[0] if chest else SAMPLE_FILMS[1]}-v{view:06d}"
                for view, chest in zip(views, params["film"])
            ]
            advance(len(views))
    return ImageSet(images, tuple(ids), np.zeros((n, 0), dtype=np.int8), (), sample_description(n))
