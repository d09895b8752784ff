"""Compare two keys' encodings of one patient's two acquisitions, without the slot -> position layout.

A second acquisition is the first shifted by a fraction of a patch (with a gain, an offset and
noise). The shift moves every patch's mean by what enters it from one side and leaves it on the
other, so no statistic of whole patches taken at their own positions survives it, and an attack
that cannot place the slots cannot shift a thumbnail back. What it can do, per pair of encodings:
fit one site's patch means (a target per slot) as a linear function of the other site's patch
contents at the same slots, whose within-patch gradients predict most of what the shift brings,
and of a few population modes of the target, which carry the shift of the average image (every
slot-centred statistic has lost it). The fraction of the target left unexplained ranks the pairs.

Two things stand in for the layout. Each site's rows, centred per slot, are projected on the
site's leading principal directions (:func:`site_components`): two wide random ReLU networks
give nearly the same components up to a rotation, and they carry a patch's 2 x 2 sub-means
linearly (R^2 0.97 with 32 components, nc7). The targets are the directions of a few leading
components whose maps over the slots the population's modes explain best
(:func:`smooth_directions`): a patch's sub-means vary over a site's images in a few shared patterns
(the anatomy, where it lies, the exposure), its texture does not.
"""

from __future__ import annotations

import numpy as np
import torch

from ncbench.attacks.alignment import iter_release, to_slot_order
from ncbench.challenge.files import Release, SiteView
from ncbench.hardware import matmul_dtype

COMPONENTS = 32  # per slot, the design of every fit (at most a quarter of the slots)
TARGET_COMPONENTS = 12  # the targets are directions in the span of this many leading components
TARGETS = 4
# On one nc7 release of second acquisitions (2 x 200 phantom images, true slot order), targets
# along these directions gave R-precision 0.54-0.60 against 0.40 for the leading components
# themselves and 0.74-0.80 for the sub-means decoded with the plaintexts (a bound).
DIRECTION_MODES = 32
TARGET_MODES = 8
DIRECTION_ITERATIONS = 40
UNEXPLAINED_FLOOR = 1e-6  # a fit with as many columns as slots explains everything
PAIR_ENTRIES = 1 << 24  # (left, right, column) products per chunk of left encodings


class RowMoments:
    """The second moment (D, D) of the rows of a site's first ``images`` encodings, gathered while
    they are read (as ``on_rows`` of :func:`~ncbench.attacks.pairing.aligned_statistics`): the
    order of the rows does not matter to it, and the leading directions need no more images (the
    slot reference is taken from as many). The products run in bf16 where it is native (the
    directions it gives, not their last bits, matter)."""

    def __init__(self, device: str, images: int):
        self.dtype = matmul_dtype(device)
        self.images = images
        self.total: torch.Tensor | None = None
        self.rows = 0

    def add(self, start: int, block: torch.Tensor) -> None:
        block = block[: max(0, self.images - start)]
        if not len(block):
            return
        rows = block.reshape(-1, block.shape[-1]).to(self.dtype)
        product = (rows.T @ rows).double()
        self.total = product if self.total is None else self.total + product
        self.rows += len(rows)


def site_components(
    view: Release | SiteView,
    slots: np.ndarray,
    slot_means: torch.Tensor,
    moments: RowMoments,
    *,
    count: int,
    chunk: int,
    device: str,
) -> np.ndarray:
    """(N, P, K) float32: every encoding's rows in slot order (``slots`` (N, P): the slot of each
    encoded row), less the ``slot_means`` (P, D), on the K = min(``count``, P / 4) leading
    principal directions of all of them together (one basis for the site), from the rows'
    second ``moments``. One more pass over the encodings."""
    n_slots = slots.shape[1]
    count = max(1, min(count, n_slots // 4))
    means = slot_means.double().cpu()
    covariance = moments.total.cpu() / moments.rows - means.T @ means / n_slots
    directions = torch.linalg.eigh(covariance.float())[1][:, -count:].flip(1).to(device)  # (D, K) largest first
    slot_means = slot_means.float().to(device)
    out = np.empty((len(slots), n_slots, count), np.float32)
    for start, block in iter_release(view, chunk, device):
        in_slot_order = to_slot_order(block, slots[start : start + len(block)]) if view.config.shuffle else block
        out[start : start + len(block)] = ((in_slot_order - slot_means) @ directions).cpu().numpy()
    return out


def population_modes(maps: np.ndarray, count: int) -> np.ndarray:
    """(P, r) the ``count`` leading principal directions of ``maps`` (M, P) over their M rows
    (at most M - 1 and P / 16 of them)."""
    count = max(1, min(count, len(maps) - 1, maps.shape[1] // 16))
    centred = maps - maps.mean(0)
    return np.linalg.eigh(centred.T @ centred)[1][:, ::-1][:, :count]


def smooth_directions(
    components: np.ndarray, *, directions: int, modes: int, iterations: int, rng: np.random.Generator
) -> np.ndarray:
    """(K, q) the ``directions`` directions u in the span of ``components`` (N, P, K) whose maps
    c_n(s) . u over the slots the population's ``modes`` leading modes explain best.

    Alternating: the modes of the current directions' maps, then the generalised eigenvectors
    of the variance they explain against the total variance."""
    _, n_slots, k = components.shape
    directions = min(directions, k)
    total = np.einsum("npk,npl->kl", components, components, dtype=np.float64)
    inverse = np.linalg.inv(np.linalg.cholesky(total + (1e-9 * np.trace(total) + 1e-12) * np.eye(k)))
    chosen = np.linalg.qr(rng.standard_normal((k, directions)))[0]
    for _ in range(iterations):
        maps = (components @ chosen).transpose(0, 2, 1).reshape(-1, n_slots)
        along = np.einsum("pr,npk->nrk", population_modes(maps, modes), components)
        explained = np.einsum("nrk,nrl->kl", along, along)
        vectors = np.linalg.eigh(inverse @ explained @ inverse.T)[1]
        chosen = inverse.T @ vectors[:, ::-1][:, :directions]
    return chosen


def unexplained(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(L, R) the fraction of each right ``target`` (R, P)'s variance over the slots that a
    least-squares fit on each left ``design`` (L, P, k), plus a constant, leaves."""
    n_left, n_slots, _ = design.shape
    basis = np.linalg.qr(np.concatenate([design, np.ones((n_left, n_slots, 1))], 2))[0]  # (L, P, k + 1)
    centred = target - target.mean(1, keepdims=True)
    variance = np.maximum((centred**2).sum(1), 1e-30)
    out = np.empty((n_left, len(target)))
    step = max(1, PAIR_ENTRIES // max(1, len(target) * basis.shape[2]))
    for first in range(0, n_left, step):
        explained = basis[first : first + step].transpose(0, 2, 1) @ centred.T  # (l, k + 1, R)
        out[first : first + step] = 1 - (explained**2).sum(1) / variance
    return out


def log_unexplained(components: np.ndarray, targets: np.ndarray, *, modes: int) -> np.ndarray:
    """(L, R) summed over the targets (R, P, q): the log of what each fit on the left
    ``components`` (L, P, K) and the target's own population modes leaves of it (:func:`unexplained`)."""
    total = np.zeros((len(components), len(targets)))
    for j in range(targets.shape[2]):
        target = targets[..., j]
        shared = population_modes(target, modes)
        design = np.concatenate([components, np.broadcast_to(shared, (len(components), *shared.shape))], 2)
        total += np.log(np.maximum(unexplained(design, target), UNEXPLAINED_FLOOR))
    return total


def acquisition_targets(components: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """(N, P, q) float64 a site's targets: its leading components along their
    :func:`smooth_directions`. The slot order does not change them."""
    leading = components[..., :TARGET_COMPONENTS].astype(np.float64)
    chosen = smooth_directions(
        leading, directions=TARGETS, modes=DIRECTION_MODES, iterations=DIRECTION_ITERATIONS, rng=rng
    )
    return leading @ chosen


def acquisition_scores(
    left: np.ndarray, left_targets: np.ndarray, right: np.ndarray, right_targets: np.ndarray
) -> np.ndarray:
    """(L, R) how well each pair's patch contents predict each other's, both ways (minus the summed
    log fractions left unexplained): ``left`` (L, P, K) and ``right`` (R, P, K) site components
    (:func:`site_components`) and their :func:`acquisition_targets`, ``right``'s slots in
    ``left``'s slot order."""
    forward = log_unexplained(left.astype(np.float64), right_targets, modes=TARGET_MODES)
    backward = log_unexplained(right.astype(np.float64), left_targets, modes=TARGET_MODES)
    return -(forward + backward.T)
