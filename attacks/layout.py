"""Place a key's slots on the image grid, and compare images decoded there at the best sub-patch shift.

An attack that undoes the shuffles knows which rows of two encodings hold the same patch position,
not which position: the slot -> position layout is the key's own. The covariances of the slots,
``S[i, j]`` = the mean over a site's images of the inner product of slot i's and slot j's centred
rows, hardly depend on the key: a wide random ReLU network nearly preserves inner products (on
nc7 releases two keys' matrices correlate 0.98, and the attacker's own key on its own phantoms
0.98 with either). The attacker computes the same matrix, by position, for images of the same
kind under a key it samples itself, and the layout is the permutation that matches the two
(a quadratic assignment, :func:`slot_layout`).

With the layout, each encoding's patch contents are decoded to a thumbnail (:func:`moment_decoder`:
an affine map fitted so that the slots' decoded means and covariances are those of the attacker's
images by position), and a second acquisition, shifted by a fraction of a patch, is found by
comparing thumbnails at the best of a grid of sub-patch shifts (:func:`shifted_similarity`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import shift as shifted
from scipy.optimize import linear_sum_assignment

SWAP_STEPS = 5000  # steepest swaps per descent (first descents took 90-270 on the releases measured)
HOP_SWAPS = 16  # slots permuted at random by a hop that is not a reflection
# The decoder's covariance term against its mean term, both relative to their targets' size. On
# four nc7 releases of 2 x 200 (median over a site's images of the correlation of decoded and true
# sub-means, less the site's mean thumbnail): 4 x 4 sub-means 0.870 with the means alone, 0.922 at
# 1.0; 2 x 2 sub-means 0.905 with the means alone, 0.934 at 0.3, 0.937 at 1.0, 0.931 at 3, 0.916 at 10.
COVARIANCE_WEIGHT = 1.0
DECODER_ITERATIONS = 300


def slot_layout(
    site: np.ndarray, reference: np.ndarray, *, grid: int, hops: int, rng: np.random.Generator
) -> np.ndarray:
    """(P,) the grid position (row-major in a ``grid`` x ``grid`` square) of each slot: the
    permutation that best matches the ``site``'s (P, P) slot covariances to the ``reference``'s by
    position, maximising sum_ij site[i, j] reference[pos_i, pos_j] over both standardised.

    Each slot first goes where its sorted row of covariances fits best (one assignment: 40-60% of
    slots right on nc7, most others on their mirror position, the images being nearly left-right
    symmetric). Steepest swaps climb from there and from its mirror image, and ``hops`` restarts
    from the best layout so far, each followed by swaps, keep what scores higher: the slots of a
    random rectangle exchanged with those of its mirror image, a few slots permuted, or every tenth
    the whole layout mirrored (on one nc7 key the restarts had drifted into a layout 65% mirrored
    that scored below the true one). On nc7 releases 82-96% of slots end at their position, and the
    true layout scores no higher than the one found."""
    if grid < 2:
        return np.arange(len(site))
    site, reference = _standardised(site), _standardised(reference)
    signatures = _standardised(np.sort(site, 1)), _standardised(np.sort(reference, 1))
    distances = ((signatures[0][:, None, :] - signatures[1][None, :, :]) ** 2).sum(-1)
    assigned = linear_sum_assignment(distances)[1]
    best, best_fit = None, -np.inf
    n_slots = len(assigned)
    for hop in range(-2, hops):
        if hop < 0:  # the assignment and its mirror image
            start = assigned if hop == -2 else _mirrored(assigned, grid)
        elif hop % 10 == 9:  # the whole layout mirrored: the restarts can drift into the mirror image
            start = _mirrored(best, grid)
        elif rng.random() < 0.5:
            start = _reflected_rectangle(best, grid, rng)
        else:
            start = best.copy()
            chosen = rng.choice(n_slots, min(HOP_SWAPS, n_slots), replace=False)
            start[chosen] = start[rng.permutation(chosen)]
        candidate = _climbed(site, reference, start)
        fit = layout_fit(site, reference, candidate)
        if fit > best_fit + 1e-9:
            best, best_fit = candidate, fit
    return best


def layout_fit(site: np.ndarray, reference: np.ndarray, positions: np.ndarray) -> float:
    """sum_ij site[i, j] reference[positions_i, positions_j]: what :func:`slot_layout` maximises."""
    return float((site * reference[np.ix_(positions, positions)]).sum())


def swap_gains(site: np.ndarray, placed: np.ndarray, products: np.ndarray | None = None) -> np.ndarray:
    """(P, P) how much :func:`layout_fit` gains when slots k and l exchange positions, for
    symmetric ``site`` and ``placed`` (the reference at the current positions, (P, P));
    ``products``: ``site @ placed``, where the caller keeps it."""
    products = site @ placed if products is None else products  # [k, l]: sum_j site[k, j] placed[l, j]
    own = np.diag(products)
    site_diagonal, placed_diagonal = np.diag(site), np.diag(placed)
    rows = products + products.T - own[:, None] - own[None, :]
    # the terms j = k and j = l, which the exchange moves with the pair
    at_k = (site_diagonal[:, None] - site) * (placed - placed_diagonal[:, None])
    at_l = (site - site_diagonal[None, :]) * (placed_diagonal[None, :] - placed)
    diagonal = site_diagonal[:, None] * (placed_diagonal[None, :] - placed_diagonal[:, None])
    return 2 * (rows - at_k - at_l) + diagonal + diagonal.T


def _climbed(site: np.ndarray, reference: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``positions`` after steepest swaps (:func:`swap_gains`) up to a local maximum. An exchange
    of slots k and l changes ``site @ placed`` by one outer product and the exchange of its columns
    k and l, so each step costs O(P^2), not a product of two (P, P) matrices."""
    positions = positions.copy()
    placed = reference[np.ix_(positions, positions)]
    products = site @ placed
    for _ in range(SWAP_STEPS):
        gains = swap_gains(site, placed, products)
        np.fill_diagonal(gains, 0.0)
        first, second = np.unravel_index(np.argmax(gains), gains.shape)
        if gains[first, second] <= 1e-9:
            break
        pair, exchanged = [first, second], [second, first]
        products += np.outer(site[:, second] - site[:, first], placed[first] - placed[second])
        products[:, pair] = products[:, exchanged]
        positions[pair] = positions[exchanged]
        placed[pair] = placed[exchanged]
        placed[:, pair] = placed[:, exchanged]
    return positions


def _mirrored(positions: np.ndarray, grid: int) -> np.ndarray:
    """``positions`` reflected left <-> right."""
    rows, columns = np.divmod(positions, grid)
    return rows * grid + grid - 1 - columns


def _reflected_rectangle(positions: np.ndarray, grid: int, rng: np.random.Generator) -> np.ndarray:
    """``positions`` with the slots of a random rectangle of the grid's left half and those at its
    mirror image (left <-> right) exchanged."""
    slot_at = np.empty_like(positions)
    slot_at[positions] = np.arange(len(positions))
    top, bottom = np.sort(rng.integers(0, grid, 2))
    left = rng.integers(0, grid // 2)
    right = rng.integers(left, grid // 2)
    rows, columns = np.meshgrid(np.arange(top, bottom + 1), np.arange(left, right + 1), indexing="ij")
    here = (rows * grid + columns).ravel()
    mirrored = (rows * grid + grid - 1 - columns).ravel()
    out = positions.copy()
    out[slot_at[here]], out[slot_at[mirrored]] = mirrored, here
    return out


def _standardised(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / max(float(values.std()), 1e-30)


def slot_covariances(components: np.ndarray) -> np.ndarray:
    """(P, P) float64 the mean over images of the inner products of two slots' centred
    ``components`` (N, P, K)."""
    values = torch.from_numpy(np.ascontiguousarray(components, dtype=np.float64))
    return (torch.einsum("npk,nqk->pq", values, values) / len(values)).numpy()


def moment_decoder(
    components: np.ndarray,
    slot_means: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    *,
    weight: float = COVARIANCE_WEIGHT,
    iterations: int = DECODER_ITERATIONS,
) -> np.ndarray:
    """(K + 1, q) float64 an affine map from one site's components to its patches' contents (the
    last row: the constant), fitted without a single pair of encoding and image.

    Each slot, placed at a grid position, has a mean (``slot_means`` (P, K)) and a covariance of
    its ``components`` (N, P, K, less their slot means); the attacker's images of the same kind
    have, at that position, a mean content (``means`` (P, q)) and a covariance of it
    (``covariances`` (P, q, q)). The map D minimises the squared error of the decoded slot means
    plus ``weight`` times that of the decoded covariances D' C D, each relative to its target's
    size: least squares on the means first, then L-BFGS on both. The means fix D only along the
    directions in which the slots' means differ; the covariances also fix it along those in which
    one slot's images differ from each other, which is what tells two patients apart."""
    values = torch.from_numpy(np.ascontiguousarray(components, dtype=np.float64))
    spread = torch.einsum("npk,npl->pkl", values, values) / len(values)  # (P, K, K)
    design = torch.cat([torch.from_numpy(slot_means), torch.ones(len(slot_means), 1, dtype=torch.float64)], 1)
    target_means, target_spread = torch.from_numpy(means), torch.from_numpy(covariances)
    mean_scale = (target_means - target_means.mean(0)).pow(2).sum().clamp_min(1e-30)
    spread_scale = target_spread.pow(2).sum().clamp_min(1e-30)
    decoder = torch.linalg.lstsq(design, target_means).solution.contiguous().requires_grad_(True)
    if weight and iterations:
        optimiser = torch.optim.LBFGS([decoder], max_iter=iterations, line_search_fn="strong_wolfe")

        def loss() -> torch.Tensor:
            optimiser.zero_grad()
            linear = decoder[:-1]
            decoded = torch.einsum("ka,pkl,lb->pab", linear, spread, linear)
            total = (design @ decoder - target_means).pow(2).sum() / mean_scale
            total = total + weight * (decoded - target_spread).pow(2).sum() / spread_scale
            total.backward()
            return total

        optimiser.step(loss)
    return decoder.detach().numpy()


def placed_thumbnails(decoded: np.ndarray, positions: np.ndarray, grid: int) -> np.ndarray:
    """(N, f grid, f grid) images from ``decoded`` (N, P, f^2) f x f sub-means per slot (row-major
    within the patch), each slot at its grid position (``positions`` (P,))."""
    fine = int(round(np.sqrt(decoded.shape[-1])))
    by_position = np.empty_like(decoded)
    by_position[:, positions] = decoded
    n = len(decoded)
    return by_position.reshape(n, grid, grid, fine, fine).transpose(0, 1, 3, 2, 4).reshape(n, fine * grid, fine * grid)


def shift_operators(size: int, offsets: np.ndarray) -> np.ndarray:
    """(S, size, size) the cubic-spline shift of a line of ``size`` values by each offset (edges
    repeated): a 2-D shift by (dy, dx) is ``ops[dy] @ image @ ops[dx].T``, as the spline is a
    tensor product."""
    identity = np.eye(size)
    return np.stack([shifted(identity, (offset, 0), order=3, mode="nearest") for offset in offsets])


def shifted_similarity(left: np.ndarray, right: np.ndarray, *, reach: float, steps: int, border: int) -> np.ndarray:
    """(L, R) float64 the best correlation of each ``left`` thumbnail (L, H, H) with each ``right``
    one (R, H, H) shifted by (dy, dx) on a ``steps`` x ``steps`` grid within +-``reach`` cells,
    both without a ``border`` of cells (what a shift moves in from outside the image)."""
    size = left.shape[-1]
    inner = slice(border, size - border)
    operators = torch.from_numpy(shift_operators(size, np.linspace(-reach, reach, steps)))
    fixed = _unit_rows(torch.from_numpy(np.ascontiguousarray(left[:, inner, inner], np.float64)))
    moving = torch.from_numpy(np.ascontiguousarray(right, np.float64))
    best = torch.full((len(left), len(right)), -torch.inf, dtype=torch.float64)
    for down in operators:
        vertical = down @ moving  # (R, H, H)
        for across in operators:
            moved = (vertical @ across.T)[:, inner, inner]
            best = torch.maximum(best, fixed @ _unit_rows(moved).T)
    return best.numpy()


def oriented_similarity(left: np.ndarray, right: np.ndarray, **shifts) -> tuple[np.ndarray, bool]:
    """:func:`shifted_similarity` of ``left`` with ``right`` as placed or mirrored left-right,
    whichever gives the higher mean best score per left thumbnail, and whether it was mirrored.
    Images of one kind are nearly symmetric, so a layout is found up to that mirror where a site
    holds few images (on a test release of 40 images per site and 64 slots, one site's layout
    came out mirrored and scored higher than the true one); what matters for linking is only
    that both sites agree."""
    placed = shifted_similarity(left, right, **shifts)
    mirrored = shifted_similarity(left, right[..., ::-1], **shifts)
    flip = bool(mirrored.max(1).mean() > placed.max(1).mean())
    return (mirrored if flip else placed), flip


def _unit_rows(images: torch.Tensor) -> torch.Tensor:
    """(n, h, w) -> (n, h * w) each image less its mean, scaled to unit length."""
    flat = images.reshape(len(images), -1)
    centred = flat - flat.mean(1, keepdim=True)
    return centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-30)
