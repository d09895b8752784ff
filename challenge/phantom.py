"""Synthetic PA chest radiographs with exact finding labels: the ``phantom`` image source.

These images are synthetic: no patient is behind any of them. Each one is drawn by a seeded
procedural model of a displayed PA chest film (bright = dense): body outline, arms and soft
tissue, dark lung fields with vascular markings, heart, mediastinum, trachea and aortic knob,
spine, posterior and anterior ribs, clavicles, diaphragm domes with a gastric bubble, then
exposure, gamma, film noise and a slight blur. Anatomy, pose (a few degrees of rotation, zoom,
shift) and exposure vary per image, so every image is distinct.

Findings are drawn independently per image (probability 0.4 each), so their labels are exact:

- ``cardiomegaly``: cardiothoracic ratio (heart width / inner thoracic width) drawn in
  0.50-0.63 instead of the normal 0.39-0.50 (on a PA film a ratio above 0.5 is the usual cut).
- ``effusion``: an opaque fluid layer at one or both lung bases with a meniscus climbing the
  lateral chest wall, from a blunted costophrenic angle up to about a third of the lung height.
- ``nodule``: one to three small round opacities (radius 1.5-3.5 % of the image side) inside a
  lung field, of varied contrast.

Used for scale tests and for the utility baseline, which trains a small classifier on encoded
images and reports AUC per label; sizes and contrasts vary so that is learnable but not trivial.

Geometry is in body coordinates: x and y in about [-1, 1] across the image, x growing to the
image right (the patient's left on a PA film), y growing downward; ``q = |x|`` is the distance
from the midline, so paired structures share one formula. Every length below is in these units.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ncbench.challenge import portable
from ncbench.errors import NcbenchError

LABEL_NAMES: tuple[str, ...] = ("cardiomegaly", "effusion", "nodule")

_FINDING_PROBABILITY = 0.4
_MAX_NODULES = 3
# Images rendered together. Small on purpose: the dozens of (B, S/2, S/2) float32 temporaries
# then stay in cache, which on one core is about twice as fast as batches of 32 or 64.
_BATCH = 4
# Per-image random textures have fixed sizes, so only the film-noise draw depends on image_size.
_MOTTLE_CELLS = 12  # (12, 12) low-frequency lung mottle
_VESSEL_ANGLES = 40  # polar vessel texture: angle cells per hemithorax ...
_VESSEL_RADII = 6  # ... and radial cells


def render_phantoms(n: int, *, seed: int, image_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` synthetic PA chest radiographs and their finding labels.

    Returns ``images`` (n, image_size, image_size) uint8, bright = dense as on a displayed film,
    and ``labels`` (n, K) int8 in {0, 1}, K = len(LABEL_NAMES), columns in LABEL_NAMES order.
    Image i depends only on ``seed``, i and ``image_size`` (one child seed per image), its labels
    only on ``seed`` and i, so a prefix of a larger render equals the smaller render.
    """
    if n < 0:
        raise NcbenchError(f"phantom: the number of images must be >= 0, got {n}")
    if image_size < 16:
        raise NcbenchError(f"phantom: image size must be >= 16 pixels, got {image_size}")
    # SeedSequence.spawn numbers its children 0, 1, ...: child i is the same for any n > i.
    children = np.random.SeedSequence(seed).spawn(n)
    images = np.empty((n, image_size, image_size), dtype=np.uint8)
    labels = np.empty((n, len(LABEL_NAMES)), dtype=np.int8)
    for start in range(0, n, _BATCH):
        draws = [_draw_image(np.random.default_rng(child), image_size) for child in children[start : start + _BATCH]]
        stop = start + len(draws)
        # Pad the last batch to full size so image i always sits at the same place in a batch of
        # the same shape: vectorised maths may round an array's tail differently, and this keeps
        # prefixes bit-identical whatever n is.
        draws += [draws[-1]] * (_BATCH - len(draws))
        params = {name: np.array([d[0][name] for d in draws], dtype=np.float32) for name in draws[0][0]}
        mottle, vessels, film = (np.stack([d[k] for d in draws]) for k in (1, 2, 3))
        images[start:stop] = _render_batch(params, mottle, vessels, film)[: stop - start]
        labels[start:stop] = np.stack([params[name] for name in LABEL_NAMES], axis=1)[: stop - start]
    return images, labels


def _draw_image(
    rng: np.random.Generator, image_size: int
) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image's parameters and random textures.

    Returns (params: name -> float, mottle (C, C), vessels (R, 2A) standard normal, film (S, S)
    uniform in [0, 1)).
    The same draws happen in the same order whatever the findings, so the stream layout is fixed.
    """
    u = rng.uniform
    p: dict[str, float] = {}
    # Pose: positioning varies between films.
    p["angle"] = np.deg2rad(u(-4.0, 4.0))
    p["zoom"] = u(0.9, 1.04)
    p["shift_x"], p["shift_y"] = u(-0.05, 0.05), u(-0.05, 0.04)
    # Body and lungs.
    p["body_half_width"] = u(0.86, 0.97)
    p["lung_center"] = u(0.36, 0.40)  # q of each lung's centre
    p["lung_half_width"] = u(0.30, 0.34)
    p["lung_apex"] = u(-0.80, -0.72)
    p["dome_right"] = u(0.26, 0.36)  # top of the right (image-left) dome, liver-lifted
    p["dome_left"] = p["dome_right"] + u(0.02, 0.08)
    p["dome_depth"] = u(0.16, 0.24)  # costophrenic angle's drop below the dome top
    # Bones.
    p["rib_spacing"] = u(0.115, 0.135)
    p["rib_first"] = u(-0.86, -0.80)
    p["rib_droop"] = u(0.55, 0.75)  # lateral downward curvature of posterior ribs
    p["rib_width"] = u(0.40, 0.52)  # fraction of the spacing a rib covers
    p["rib_density"] = u(0.05, 0.09)
    p["spine_half_width"] = u(0.050, 0.062)
    p["clavicle_y"] = u(-0.64, -0.56)  # medial (sternal) end
    p["clavicle_rise"] = u(0.12, 0.22)  # per unit of q, up to the shoulder
    # Heart and mediastinum.
    p["cardiomegaly"] = float(u() < _FINDING_PROBABILITY)
    # The two ranges meet at the 0.5 cut, so borderline hearts keep the label from being trivial.
    p["ctr"] = u(0.50, 0.63) if p["cardiomegaly"] else u(0.39, 0.50)
    p["heart_shift"] = u(0.12, 0.22)  # centre, in heart widths to the patient's left
    p["heart_height"] = u(0.21, 0.29)
    p["heart_tilt"] = u(0.25, 0.5)  # radians, apex down and to the patient's left
    p["mediastinum_half_width"] = u(0.11, 0.14)
    # Pleural effusion on the right, the left or both sides (fluid depth 0 = none).
    p["effusion"] = float(u() < _FINDING_PROBABILITY)
    side = rng.integers(0, 3)  # 0 right (image left), 1 left (image right), 2 both
    depth = p["effusion"] * u(0.04, 0.36)
    # Bilateral effusions are seldom symmetric: the right one gets a fraction of the depth.
    right_fraction = u(0.5, 1.0)
    if side != 2:
        right_fraction = 1.0
    p["effusion_depth_right"] = depth * right_fraction * (side != 1)
    p["effusion_depth_left"] = depth * (side != 0)
    p["effusion_meniscus"] = u(0.4, 1.0)
    # Nodules: _MAX_NODULES slots are always drawn, unused ones get zero density.
    p["nodule"] = float(u() < _FINDING_PROBABILITY)
    count = rng.integers(1, _MAX_NODULES + 1)
    for k in range(_MAX_NODULES):
        p[f"nodule{k}_side"] = float(rng.choice((-1.0, 1.0)))
        p[f"nodule{k}_across"] = u(-0.3, 0.75)  # from the lung's centre, in lung half-widths
        p[f"nodule{k}_down"] = u(0.2, 0.9)  # from apex (0) to dome (1)
        p[f"nodule{k}_radius"] = u(0.03, 0.07)
        p[f"nodule{k}_density"] = u(0.10, 0.28) * p["nodule"] * (k < count)
    # Tissue, exposure and film.
    p["tissue_density"] = u(0.50, 0.60)
    p["lung_air"] = u(0.32, 0.42)
    p["vessel_density"] = u(0.07, 0.12)
    p["contrast"] = u(0.85, 1.15)
    p["brightness"] = u(-0.06, 0.06)
    p["gamma"] = u(0.8, 1.25)
    p["noise"] = u(0.006, 0.02)  # grain standard deviation, in display units
    mottle = rng.standard_normal((_MOTTLE_CELLS, _MOTTLE_CELLS), dtype=np.float32)
    vessels = rng.standard_normal((_VESSEL_RADII, 2 * _VESSEL_ANGLES), dtype=np.float32)
    # Uniform grain is four times cheaper to draw than Gaussian; the neighbour mixing in
    # _render_batch makes its sum close to Gaussian anyway.
    film = rng.random((image_size, image_size), dtype=np.float32)
    return p, mottle, vessels, film


def _ramp(t: np.ndarray) -> np.ndarray:
    """Smoothstep of t clipped to [0, 1]: a soft 0 -> 1 edge, cheaper than a sigmoid."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _norm(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Euclidean length; np.hypot is several times slower on float32 arrays."""
    return np.sqrt(dx * dx + dy * dy)


def _dome(q: np.ndarray, dome_top: np.ndarray, b: dict[str, np.ndarray]) -> np.ndarray:
    """y of the diaphragm at distance q from the midline: highest mid-lung, falling steeply to
    the costophrenic angle laterally and gently to the cardiophrenic angle medially."""
    across = (q - b["lung_center"]) / b["lung_half_width"]
    lateral = (across > 0).astype(np.float32)
    return dome_top + b["dome_depth"] * across**2 * (0.45 + 0.55 * lateral)


def _render_batch(p: dict[str, np.ndarray], mottle: np.ndarray, vessels: np.ndarray, film: np.ndarray) -> np.ndarray:
    """Render B images from per-image parameters.

    p: name -> (B,) float32; mottle (B, C, C), vessels (B, R, 2A) standard normal; film (B, S, S)
    uniform in [0, 1).
    Returns (B, S, S) uint8. Anatomy is rendered at S / 2 and upsampled: it has no detail finer
    than its soft edges, the upsampling is the film blur, and it quarters the cost.
    """
    b = {k: v[:, None, None] for k, v in p.items()}  # (B, 1, 1), broadcasts over the grid
    size = film.shape[-1]
    work = max(16, size // 2)
    axis = (np.arange(work, dtype=np.float32) + 0.5) / work * 2.0 - 1.0
    # Image grid -> body coordinates: undo the per-image shift, zoom and rotation.
    gx, gy = axis[None, None, :] - b["shift_x"], axis[None, :, None] - b["shift_y"]
    cos, sin = portable.cos(b["angle"]) / b["zoom"], portable.sin(b["angle"]) / b["zoom"]
    x = cos * gx + sin * gy
    y = cos * gy - sin * gx
    q = np.abs(x)
    # 1 on the image right (the patient's left), else 0. Per-side values are blended with it
    # rather than picked with np.where, which is ten times slower on these arrays.
    right = (x > 0).astype(np.float32)
    edge = 0.02  # soft edge width of organ outlines

    # Body: neck widening into the shoulders, chest narrowing a little below; soft tissue is
    # thicker near the midline, so the body edge shows darker.
    shoulders = 0.24 + (b["body_half_width"] - 0.12) * _ramp((y + 1.02) / 0.24)
    body_w = shoulders - 0.12 * _ramp((y + 0.75) / 0.5)
    body = _ramp((body_w - q) / 0.03)
    centrality = np.sqrt(np.clip(1.0 - (q / body_w) ** 2, 0.0, 1.0))
    density = body * b["tissue_density"] * (0.75 + 0.25 * centrality)

    # Lung fields: an ellipse narrowing to the apex, straight-sided below its centre, cut by
    # the dome.
    lung_c, lung_a = b["lung_center"], b["lung_half_width"]
    dome_top = b["dome_right"] + right * (b["dome_left"] - b["dome_right"])
    below_dome = _ramp((y - _dome(q, dome_top, b)) / edge + 0.5)
    across = (q - lung_c) / lung_a  # -1 medial .. 1 lateral edge of the lung
    vertical = np.minimum(y - b["lung_apex"] - 0.6, 0.0) / 0.6
    radial = np.sqrt(across**2 + vertical**2)
    lung = _ramp((1.0 - radial) / (edge / lung_a) + 0.5) * (1.0 - below_dome)

    # Heart: a tilted ellipse resting on the domes whose horizontal extent is ctr times the inner
    # thoracic width, lying mostly to the patient's left.
    thorax = lung_c + lung_a  # inner thoracic half-width
    heart_w = b["ctr"] * 2.0 * thorax
    heart_cy = b["dome_right"] - 0.08
    hx, hy = x - b["heart_shift"] * heart_w, y - heart_cy
    ct, st = portable.cos(b["heart_tilt"]), portable.sin(b["heart_tilt"])
    height = b["heart_height"] * (0.85 + 0.3 * b["ctr"])  # big hearts are a little taller too
    # A tilted ellipse with semi-axes (a, h) spans sqrt(a^2 cos^2 + h^2 sin^2) either side.
    semi_w = np.sqrt(np.maximum((heart_w / 2) ** 2 - (st * height) ** 2, 1e-4)) / ct
    heart_radial = _norm((ct * hx + st * hy) / semi_w, (ct * hy - st * hx) / height)
    heart = _ramp((1.0 - heart_radial) / 0.08 + 0.5)
    # Mediastinum above the heart, widening a little downward, with the aortic knob bulging to
    # the patient's left.
    med_w = b["mediastinum_half_width"] + 0.03 * _ramp((y + 0.5) / 0.6)
    mediastinum = _ramp((med_w - np.abs(x - 0.03 * (y + 0.3))) / edge + 0.5) * _ramp((heart_cy + 0.1 - y) / 0.2)
    knob = _ramp((0.06 - _norm(x - med_w + 0.015, (y + 0.28) * 0.7)) / 0.03 + 0.5)
    central = np.maximum(np.maximum(heart, mediastinum), knob)

    # Effusion: fluid fills the lung base up to a meniscus that climbs the lateral chest wall
    # (upright film); it is as dense as soft tissue, so it hides the dome and the angle.
    depth_right, depth_left = b["effusion_depth_right"], b["effusion_depth_left"]
    depth = depth_right + right * (depth_left - depth_right)
    lateral = (np.clip(across, -1.0, 1.0) + 1.0) / 2.0  # 0 medial .. 1 lateral
    meniscus = 1.0 + 1.5 * b["effusion_meniscus"] * lateral**2
    fluid_top = dome_top + b["dome_depth"] - depth * meniscus
    fluid = _ramp((y - fluid_top) / 0.06) * lung * (depth > 0)

    # Air: lungs minus what the heart, mediastinum and fluid hide. Air is deepest mid-field;
    # breasts and chest-wall muscle overlie the lower zones.
    thickness = (0.8 + 0.2 * np.sqrt(np.clip(1.0 - radial, 0.0, 1.0))) * (1.0 - 0.2 * _ramp((y + 0.1) / 0.5))
    density -= b["lung_air"] * lung * (1.0 - central) * (1.0 - fluid) * thickness
    # Heart and great vessels stand out against lung only; below the domes they merge.
    density += 0.05 * central * body * (1.0 - below_dome)
    # Trachea: an air column down the upper mediastinum to the carina.
    density -= 0.08 * _ramp((0.035 - np.abs(x - 0.01)) / 0.015 + 0.5) * _ramp((-0.32 - y) / 0.08)

    # Vascular markings: wiggly ridges radiating from each hilum (zero crossings of a polar noise
    # texture that varies fast across angle and slowly along radius), thinning outward.
    dx, dy = q - (0.17 + 0.1 * right), y + 0.1
    r = _norm(dx, dy)
    theta = portable.arctan2(dy, dx) / np.pi  # -1 .. 1 around each hilum
    tex_x = (theta - 1.0) / 2.0 + right  # each side samples its own texture half
    tex_y = np.clip(r / 0.8, 0.0, 1.0) * 2.0 - 1.0
    # torch's resampling kernels are vectorised per CPU (ATEN_CPU_CAPABILITY): in float64 the
    # float32 result is the same bytes on any CPU.
    grid = torch.from_numpy(np.stack([tex_x, tex_y], axis=-1)).double()
    texture = (
        F.grid_sample(
            torch.from_numpy(vessels).double()[:, None],
            grid,
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )[:, 0]
        .float()
        .numpy()
    )
    ridges = np.clip(1.0 - np.abs(texture) / (0.5 * portable.exp(-r / 0.3)), 0.0, 1.0)
    blobs = (
        F.interpolate(
            torch.from_numpy(mottle).double()[:, None], size=(work, work), mode="bicubic", align_corners=False
        )[:, 0]
        .float()
        .numpy()
    )
    hilum = portable.exp(-((r / 0.1) ** 2))
    density += lung * b["vessel_density"] * (ridges * portable.exp(-r / 0.4) + 0.35 * blobs + 1.5 * hilum)

    # Spine: vertebral bodies with darker disc spaces, seen faintly through the mediastinum.
    disc = 0.5 + 0.5 * portable.cos(2 * np.pi * (y / 0.105))
    density += 0.07 * _ramp((b["spine_half_width"] - q) / 0.015 + 0.5) * (0.75 + 0.25 * disc) * body

    # Posterior ribs: one phase field draws them all; rib k lies where the phase is in [k, k + w].
    # Each rises slightly from the spine then curves down the lateral wall; lower ribs lie
    # further apart.
    s = np.maximum(q - 0.05, 0.0)
    along = y - b["rib_first"] + 0.3 * s - b["rib_droop"] * s * s
    phase = along * (1.0 - 0.12 * along) / b["rib_spacing"]
    t = phase - np.floor(phase)
    band = _ramp(np.minimum(t, b["rib_width"] - t) / (0.35 * b["rib_width"]))
    ribcage = (phase > 0) * (phase < 10) * _ramp((thorax + 0.06 - q) / 0.05) * _ramp((q - 0.06) / 0.03)
    density += b["rib_density"] * band * ribcage
    # Anterior ribs: fainter, running down and medially from the lateral wall, fading before the
    # sternum (costal cartilage does not show).
    phase = (y - b["rib_first"] - 0.25 + 0.55 * (s - thorax)) / (1.15 * b["rib_spacing"])
    t = phase - np.floor(phase)
    front = (phase > 0) * (phase < 6) * ribcage * _ramp((q - 0.2) / 0.15)
    density += 0.5 * b["rib_density"] * _ramp(np.minimum(t, 0.4 - t) / 0.12) * front

    # Clavicles: a gentle S from the sternal notch up to the shoulder.
    sc = np.maximum(q - 0.06, 0.0)
    clav_y = b["clavicle_y"] - b["clavicle_rise"] * sc + 0.025 * portable.sin(2 * np.pi * sc / 0.6)
    density += 0.16 * (_ramp((0.04 - np.abs(y - clav_y)) / 0.015) * _ramp((q - 0.04) / 0.03) * _ramp((0.7 - q) / 0.05))
    # Arms beside the chest wall, past a dark axillary gap, with the humerus inside.
    arm_q = b["body_half_width"] + 0.2
    arm = _ramp((0.13 - np.abs(q - arm_q)) / 0.03) * _ramp((y + 0.82) / 0.1)
    humerus = np.maximum(
        _ramp((0.045 - np.abs(q - arm_q)) / 0.015) * (y > -0.8), _ramp((0.12 - _norm(q - arm_q + 0.04, y + 0.8)) / 0.03)
    )
    density += arm * b["tissue_density"] * 0.7 * (1.0 - body) + 0.14 * humerus
    # Gastric bubble under the left dome (image right).
    bubble = _ramp((0.06 - _norm(x - 0.4, (y - b["dome_left"] - 0.12) * 1.4)) / 0.02)
    density -= 0.18 * bubble * below_dome * body

    # Nodules: projected spheres, so density follows sqrt(1 - (d / radius)^2).
    for k in range(_MAX_NODULES):
        side = b[f"nodule{k}_side"]
        n_x = side * (lung_c + b[f"nodule{k}_across"] * lung_a)
        n_dome = _dome(np.abs(n_x), np.where(side > 0, b["dome_left"], b["dome_right"]), b)
        n_y = b["lung_apex"] + b[f"nodule{k}_down"] * (n_dome - 0.05 - b["lung_apex"])
        d2 = ((x - n_x) ** 2 + (y - n_y) ** 2) / b[f"nodule{k}_radius"] ** 2
        density += b[f"nodule{k}_density"] * np.sqrt(np.maximum(1.0 - d2, 0.0))

    # Exposure: contrast, brightness and gamma vary as the film and display window do.
    shown = np.clip(b["brightness"] + b["contrast"] * (0.06 + 1.2 * density), 0.0, 1.0)
    shown = (
        F.interpolate(
            torch.from_numpy(portable.power(shown, b["gamma"])).double()[:, None],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
        )[:, 0]
        .float()
        .numpy()
    )
    # Film noise, lightly correlated between neighbouring pixels like screen-film grain.
    grain = film - 0.5  # variance 1/12
    grain[:, 1:-1, :] += 0.5 * (grain[:, :-2, :] + grain[:, 2:, :])
    grain[:, :, 1:-1] += 0.5 * (grain[:, :, :-2] + grain[:, :, 2:])
    shown += (b["noise"] * 2.3) * grain  # grain's std is about 1 / 2.3
    return np.clip(np.rint(shown * 255.0), 0, 255).astype(np.uint8)
