"""Undo NeuraCrypt's per-image patch shuffle, and the assignment steps every attack shares.

Every image gets the same positional embedding, so each patch slot is recognisable across images
(Carlini et al. 2021, step 1): assigning an image's rows to a reference encoding by similarity
recovers a common slot order. What remains unknown is one global slot -> position permutation,
recovered later from matched pairs (:func:`recover_slot_positions`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ncbench.assignment import match
from ncbench.challenge.files import Release, SiteView


def assign_rows(similarity: torch.Tensor) -> np.ndarray:
    """Per-image assignment of encoded rows to reference slots.

    similarity: (B, P, P), ``[b, r, s]`` = how well row r of image b fits slot s.
    Returns (B, P) int64: the slot of each row. One 256 x 256 assignment costs about 2 ms on one
    core; scipy releases the GIL, so the images are solved on torch's threads at once.
    """
    values = similarity.float().cpu().numpy()
    # Where every row's best slot is a different slot, those best slots are the assignment: no
    # assignment scores more than each row's own maximum.
    slots = values.argmax(2)
    taken = np.zeros_like(slots, dtype=bool)
    np.put_along_axis(taken, slots, True, axis=1)
    ambiguous = np.flatnonzero(~taken.all(1))

    def solve(b: int) -> None:
        rows, cols = linear_sum_assignment(values[b], maximize=True)
        slots[b, rows] = cols

    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        list(pool.map(solve, ambiguous))
    return slots


def to_slot_order(encoded: torch.Tensor, slots: np.ndarray) -> torch.Tensor:
    """(B, P, D) rows in release order -> (B, P, D) rows in slot order (one batched scatter)."""
    index = torch.as_tensor(slots, dtype=torch.int64, device=encoded.device).unsqueeze(-1).expand_as(encoded)
    return torch.empty_like(encoded).scatter_(1, index, encoded)


def align(
    encoded: torch.Tensor, reference: torch.Tensor, *, shuffle: bool = True, dtype: torch.dtype = torch.float32
) -> tuple[np.ndarray, torch.Tensor]:
    """Assign each row of ``encoded`` (b, P, D), in release order, to a slot of ``reference`` (P, D).

    Returns the slots (b, P) int64 and the float32 products (b, P, P) ``<e_r, ref_s>`` they came
    from, multiplied in ``dtype``. Maximising ``<e_r, ref_s> - |ref_s|^2 / 2`` is minimising
    ``|e_r - ref_s|^2`` (``|e_r|`` is fixed per row). Without shuffle every row keeps its own slot.
    """
    products = torch.einsum("bpd,sd->bps", encoded.to(dtype), reference.to(dtype)).float()
    if not shuffle:
        return np.tile(np.arange(encoded.shape[1]), (len(encoded), 1)), products
    return assign_rows(products - 0.5 * (reference * reference).sum(1)), products


def iter_release(
    release: Release | SiteView, chunk: int, device: str, *, channels: int | None = None, reverse: bool = False
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, encodings (b, P, D) float32), or only their first ``channels`` channels;
    ``reverse``: last block first (see :meth:`~ncbench.challenge.files.Release.iter_encoded`)."""
    # Read as stored (float16) and widened by torch: numpy's float16 cast is 2x slower. (Reading
    # the next block on a thread while this one is worked on saved nothing on 2 cores.)
    for start, block in release.iter_encoded(chunk, dtype=None, reverse=reverse, channels=channels):
        yield start, torch.from_numpy(block).to(device).float()


def slot_reference(
    release: Release | SiteView,
    *,
    chunk: int = 64,
    device: str = "cpu",
    advance: Callable[[int], None] = lambda k: None,
    limit: int | None = None,
    channels: int | None = None,
) -> torch.Tensor:
    """The mean encoding in slot order (P, D) float32, over the first ``limit`` encodings (all
    when None): one streamed pass. ``channels``: of the first that many channels only.

    Rows are assigned to the first encoding's slots; the mean of that alignment is a far less noisy
    reference for the final alignment (:func:`iter_aligned`). Releases without shuffle keep row order.
    """
    return slot_moments(release, chunk=chunk, device=device, advance=advance, limit=limit, channels=channels)[0]


def slot_moments(
    release: Release | SiteView,
    *,
    chunk: int = 64,
    device: str = "cpu",
    advance: Callable[[int], None] = lambda k: None,
    limit: int | None = None,
    channels: int | None = None,
    against: torch.Tensor | None = None,
    on_block: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`slot_reference` (P, D), and how far each channel spreads around the slot means (D,)
    float32: the within-slot standard deviation, pooled over the slots (float64 sums). Rows are
    assigned to the slots of ``against`` (P, D) where given, else of the first encoding.
    ``on_block(start, rows)``: called with each block the means are taken from ((b, P, D) float32,
    in slot order)."""
    n = release.n_encoded if limit is None else min(limit, release.n_encoded)
    if against is None:
        against = torch.from_numpy(release.encoded_rows([0], channels=channels)[0]).to(device)
    total = torch.zeros_like(against, dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start, block in iter_release(release, chunk, device, channels=channels):
        block = block[: n - start]
        if release.config.shuffle:
            block = to_slot_order(block, align(block, against)[0])
        if on_block is not None:
            on_block(start, block)
        block = block.double()
        total += block.sum(0)
        squares += (block * block).sum(0)
        advance(len(block))
        if start + len(block) >= n:
            break
    mean = total / n
    spread = (squares / n - mean * mean).clamp_min(0).mean(0).sqrt()
    return mean.float(), spread.float()


def consensus_start(
    release: Release | SiteView, *, candidates: int, sample: int, channels: int | None = None, device: str = "cpu"
) -> int:
    """Which of the first ``candidates`` encodings to start the slot reference from: the one whose
    alignment of the first ``sample`` encodings agrees most (rows in the same slots, under the best
    relabelling) with the alignments the other candidates give.

    A reference is the mean of encodings aligned to one encoding; where that encoding's rows are
    atypical, rows of other positions join their slots. On a fresh nc47 key (N = 1,000) the first
    encoding gave 92.5% of rows in a slot of one position, the candidate chosen this way 99.7%."""
    rows = torch.from_numpy(release.encoded_rows(np.arange(min(sample, release.n_encoded)), channels=channels))
    rows = rows.to(device).float()
    starts = range(min(candidates, len(rows)))
    alignments = [align(rows, rows[start])[0] for start in starts]
    n_slots = rows.shape[1]
    agreement = np.zeros((len(starts), len(starts)))
    for i, j in itertools.combinations(starts, 2):
        counts = np.zeros((n_slots, n_slots))
        np.add.at(counts, (alignments[i].ravel(), alignments[j].ravel()), 1)
        agreement[i, j] = agreement[j, i] = counts[np.arange(n_slots), match(counts)].sum()
    return int(agreement.sum(1).argmax())


CONTENT_ITERATIONS = 10


def content_direction(
    release: Release | SiteView,
    reference: torch.Tensor,
    *,
    sample: int,
    channels: int | None = None,
    device: str = "cpu",
) -> torch.Tensor:
    """(D,) unit vector: the leading direction of the first ``sample`` encodings' rows around the
    slot means of ``reference`` (P, D) they are aligned to, pooled over the slots (power iteration,
    :data:`CONTENT_ITERATIONS` steps from a fixed start).

    Every position shares the blocks and the final layer, so what a patch holds moves its row the
    same way in every slot; at depth that one direction outweighs what tells two slots apart. With
    it projected out of rows and reference, the alignment put 100% of an nc47 key's rows (N =
    1,000) in their position's slot, against 97.8% in the full space."""
    rows = torch.from_numpy(release.encoded_rows(np.arange(min(sample, release.n_encoded)), channels=channels))
    rows = rows.to(device).float()
    if release.config.shuffle:
        rows = to_slot_order(rows, align(rows, reference)[0])
    around = (rows - reference).reshape(-1, rows.shape[-1])
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(rows.shape[-1], generator=generator).to(device)
    for _ in range(CONTENT_ITERATIONS):
        direction = around.T @ (around @ direction)
        direction = direction / direction.norm().clamp_min(1e-30)
    return direction


def without(rows: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``rows`` (..., D) with their component along the unit ``direction`` (D,) removed."""
    return rows - (rows @ direction).unsqueeze(-1) * direction


def iter_aligned(
    release: Release | SiteView, reference: torch.Tensor, *, chunk: int = 64, device: str = "cpu"
) -> Iterator[tuple[int, np.ndarray, torch.Tensor]]:
    """Yield (start, slots (b, P) int64, encodings in slot order (b, P, D)) for the whole release."""
    for start, block in iter_release(release, chunk, device):
        slots, _ = align(block, reference, shuffle=release.config.shuffle)
        yield start, slots, to_slot_order(block, slots) if release.config.shuffle else block


def recover_slot_positions(slot_stats: np.ndarray, position_stats: np.ndarray) -> np.ndarray:
    """The global slot -> position permutation from matched pairs (boosting step).

    slot_stats: (N, P) a per-slot statistic of each encoding; position_stats: (N, P) the same
    statistic of the plaintext each encoding is currently matched to, by position. Correlating
    slot s with position p across images and solving the P x P assignment tolerates many wrong
    matches: correct pairs add up, wrong ones average out. Returns (P,): position of each slot.
    """
    return match(_column_correlation(slot_stats, position_stats))


def _column_correlation(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """(P, Q) Pearson correlation between the columns of left (N, P) and right (N, Q)."""
    left = left - left.mean(0)
    right = right - right.mean(0)
    left = left / np.maximum(np.linalg.norm(left, axis=0), 1e-12)
    right = right / np.maximum(np.linalg.norm(right, axis=0), 1e-12)
    return left.T @ right


def refine_slot_positions(
    slot_grams: torch.Tensor, position_grams: torch.Tensor, slot_positions: np.ndarray, *, rounds: int = 3
) -> np.ndarray:
    """Improve a slot -> position permutation with whole Gram matrices of matched pairs.

    slot_grams: (K, P, P) encoded Gram matrices in slot order; position_grams: (K, P, P)
    the matched plaintexts' Gram matrices in position order. Slot s should sit at the position p
    whose Gram row agrees with slot s's row under the current permutation: score
    C[s, p] = sum_k sum_t G_k[s, t] H_k[p, pos[t]], solve the P x P assignment, repeat
    (a projected power iteration for this graph-matching problem).
    """
    slot_grams = slot_grams.float()
    position_grams = position_grams.float()
    for _ in range(rounds):
        index = torch.as_tensor(slot_positions, device=position_grams.device)
        agreement = torch.einsum("kst,kpt->sp", slot_grams, position_grams[:, :, index])
        updated = match(agreement.cpu().numpy())
        if np.array_equal(updated, slot_positions):
            break
        slot_positions = updated
    return slot_positions
