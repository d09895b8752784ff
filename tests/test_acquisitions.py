"""Comparing a patient's two acquisitions without the slot -> position layout: the per-pair fits,
the smooth target directions, and the per-pair fits on features a shift moves."""

import numpy as np

from ncbench.attacks.acquisitions import (
    log_unexplained,
    population_modes,
    smooth_directions,
    unexplained,
)
from ncbench.challenge.phantom import render_phantoms
from ncbench.challenge.release import reacquire


def test_a_target_linear_in_the_design_is_explained_and_noise_is_not():
    rng = np.random.default_rng(0)
    design = rng.standard_normal((3, 256, 5))
    exact = design[1] @ rng.standard_normal(5) + 2.0  # right 0 is a linear function of left 1
    target = np.stack([exact, rng.standard_normal(256)])
    left_over = unexplained(design, target)
    assert left_over.shape == (3, 2)
    assert left_over[1, 0] < 1e-9
    assert left_over[[0, 2], 0].min() > 0.8 and left_over[:, 1].min() > 0.9


def test_the_fits_in_float32_leave_what_they_leave_in_float64():
    rng = np.random.default_rng(3)
    design = rng.standard_normal((6, 256, 40))
    target = design[:4, :, :3].sum(2) + 0.3 * rng.standard_normal((4, 256))  # partners 0-3 of lefts 0-3
    exact = unexplained(design, target)
    single = unexplained(design.astype(np.float32), target)
    assert single.dtype == np.float64
    np.testing.assert_allclose(single, exact, atol=1e-5)
    assert exact[np.arange(4), np.arange(4)].max() < 0.1 < exact[4:].min()


def test_population_modes_are_the_maps_leading_directions():
    rng = np.random.default_rng(1)
    pattern = rng.standard_normal(64)
    maps = rng.standard_normal((100, 1)) * 5 * pattern + rng.standard_normal((100, 64))
    (mode,) = population_modes(maps, 1).T
    assert abs(mode @ pattern) / np.linalg.norm(pattern) > 0.99


def test_smooth_directions_find_the_components_whose_maps_the_modes_explain():
    """Two of six components carry maps drawn from a few population patterns, the rest noise of
    the same variance, all mixed by a random rotation: the directions found span the two."""
    rng = np.random.default_rng(2)
    n, slots = 200, 256
    patterns = rng.standard_normal((4, slots))
    smooth = np.stack([rng.standard_normal((n, 4)) @ patterns for _ in range(2)], 2)
    smooth /= smooth.std()
    planted = np.concatenate([smooth, rng.standard_normal((n, slots, 4))], 2)
    rotation = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    chosen = smooth_directions(planted @ rotation, directions=2, modes=8, iterations=20, rng=rng)
    recovered = np.linalg.qr(rotation @ chosen)[0]  # in the planted coordinates
    assert np.linalg.svd(recovered[:2], compute_uv=False).min() > 0.95


def _r_precision(scores: np.ndarray, true_pairs: int) -> float:
    """Share of true pairs (row i with column i, i < true_pairs) among the true_pairs best scores."""
    rows, columns = np.unravel_index(np.argsort(-scores, axis=None)[:true_pairs], scores.shape)
    return float(np.mean((rows == columns) & (rows < true_pairs)))


def _sub_means(images: np.ndarray, cells: int) -> np.ndarray:
    """(N, 256, cells^2) each 16 x 16 patch's cells x cells sub-means, patches in row-major order."""
    n, side = images.shape[0], 16 // cells
    grid = images.astype(np.float64).reshape(n, 16, cells, side, 16, cells, side).mean((3, 6))
    return grid.transpose(0, 1, 3, 2, 4).reshape(n, 256, cells * cells)


def test_second_acquisitions_are_found_from_patch_contents_at_their_own_slots():
    """Each site's design: every patch's 4 x 4 sub-means; its targets: the 2 x 2 sub-means; all
    centred per slot, as site components are. Site B holds second acquisitions (shift up to 10 px)
    of half of site A's 80 phantoms. No positions are used: the fit predicts what the shift brings
    from within the patch, the population modes the shift of the average image."""
    rng = np.random.default_rng(3)
    images, _ = render_phantoms(120, seed=24)
    sites = images[:80], np.concatenate([reacquire(images[:40], rng), images[80:120]])
    design, targets = ([cells - cells.mean(0) for cells in map(_sub_means, sites, [k, k])] for k in (4, 2))

    def scores(modes: int) -> np.ndarray:
        forward = log_unexplained(design[0], targets[1], modes=modes)
        return -(forward + log_unexplained(design[1], targets[0], modes=modes).T)

    # The patch means compared at their own slots, without any fit: the shift breaks them.
    means = [(m - m.mean(0)) / (m - m.mean(0)).std(1, keepdims=True) for m in (_sub_means(s, 1)[..., 0] for s in sites)]
    # Measured: 0.75 with 8 modes, 0.50 with 1, 0.05 for the means.
    assert _r_precision(scores(8), 40) >= 0.6
    assert _r_precision(scores(8), 40) >= _r_precision(scores(1), 40) + 0.1
    assert _r_precision(means[0] @ means[1].T, 40) <= 0.2
