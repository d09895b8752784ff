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
site's leading principal directions (:class:`SiteComponents`): two wide random ReLU networks
give nearly the same components up to a rotation, and they carry a patch's 2 x 2 sub-means
linearly (R^2 0.97 with 32 components, nc7). The targets are the directions of a few leading
components whose maps over the slots the population's modes explain best
(:func:`smooth_directions`): a patch's sub-means vary over a site's images in a few shared patterns
(the anatomy, where it lies, the exposure), its texture does not.
"""

from __future__ import annotations

import numpy as np
import torch

from ncbench.attacks.alignment import to_slot_order
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


class SiteComponents:
    """A site's rows, centred per slot, on the site's K leading principal directions, without a
    pass over the encodings of their own.

    The directions come from the second moment of the rows the slot reference is taken from (the
    first encodings, :meth:`gather`: ``on_reference_rows`` of
    :func:`~ncbench.attacks.pairing.aligned_statistics`), less their slot means; the alignment's
    pass then projects every encoding's rows as it reads them (:meth:`project`, its ``on_rows``),
    and :meth:`values` puts them in slot order once the slots are known. The products run in bf16
    where it is native (the directions it gives, not their last bits, matter)."""

    def __init__(self, count: int, device: str):
        self.count = count
        self.device = device
        self.dtype = matmul_dtype(device)
        self.second: torch.Tensor | None = None  # (D, D) float64 sum of the rows' outer products
        self.sums: torch.Tensor | None = None  # (P, D) float64 per slot
        self.images = 0
        self.directions: torch.Tensor | None = None  # (D, K) largest first
        self.projected: np.ndarray | None = None  # (N, P, K) float32 in release order

    def gather(self, start: int, block: torch.Tensor) -> None:
        """Add a block (b, P, D) of rows in slot order."""
        rows = block.reshape(-1, block.shape[-1]).to(self.dtype)
        product = (rows.T @ rows).double()
        slot_sums = block.double().sum(0)
        self.second = product if self.second is None else self.second + product
        self.sums = slot_sums if self.sums is None else self.sums + slot_sums
        self.images += len(block)

    def project(self, start: int, block: torch.Tensor, *, n_encoded: int) -> None:
        """Project a block (b, P, D) of ``n_encoded`` encodings' rows in release order."""
        if self.directions is None:
            self.directions = self._fit()
            self.projected = np.empty((n_encoded, block.shape[1], self.directions.shape[1]), np.float32)
        self.projected[start : start + len(block)] = (block @ self.directions).cpu().numpy()

    def values(self, slots: np.ndarray) -> np.ndarray:
        """(N, P, K) float32 the projected rows in slot order (``slots`` (N, P): the slot of each
        row), less their slot means."""
        in_slot_order = to_slot_order(torch.from_numpy(self.projected), slots)
        return (in_slot_order - torch.from_numpy(self.slot_means()).float()).numpy()

    def slot_means(self) -> np.ndarray:
        """(P, K) float64 the slot means of the gathered rows, projected."""
        return ((self.sums.cpu() / self.images).float() @ self.directions.cpu()).double().numpy()

    def _fit(self) -> torch.Tensor:
        means = self.sums.cpu() / self.images
        n_slots = len(means)
        covariance = self.second.cpu() / (self.images * n_slots) - means.T @ means / n_slots
        count = max(1, min(self.count, n_slots // 4))
        return torch.linalg.eigh(covariance.float())[1][:, -count:].flip(1).to(self.device)


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
    """(L, R) float64 the fraction of each right ``target`` (R, P)'s variance over the slots that a
    least-squares fit on each left ``design`` (L, P, k), plus a constant, leaves; computed in
    ``design``'s precision."""
    n_left, n_slots, _ = design.shape
    constant = np.ones((n_left, n_slots, 1), design.dtype)
    basis = np.linalg.qr(np.concatenate([design, constant], 2))[0]  # (L, P, k + 1)
    target = target.astype(design.dtype)
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
        shared = np.broadcast_to(shared.astype(components.dtype), (len(components), *shared.shape))
        design = np.concatenate([components, shared], 2)
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
    (:class:`SiteComponents`) and their :func:`acquisition_targets`, ``right``'s slots in
    ``left``'s slot order. The fits run in float32: on nine nc7 releases of second acquisitions
    they gave the same claims as in float64, in two thirds of the time at 2 x 1,000 encodings."""
    forward = log_unexplained(left.astype(np.float32), right_targets, modes=TARGET_MODES)
    backward = log_unexplained(right.astype(np.float32), left_targets, modes=TARGET_MODES)
    return -(forward + backward.T)
