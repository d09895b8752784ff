"""Per-image patch statistics that several attacks compare: norms and Gram matrices of
slot-centred patches, and the correlations between two populations of them.

Wide random ReLU networks nearly preserve the kernel (geometry) of their inputs whatever the key,
so these statistics of an encoding resemble those of its plaintext encoded with any other key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ncbench.hardware import matmul_dtype

INT8_UNIT = 1 / 127  # the cosine of one step of int8 Gram entries
ROUGH_ENTRIES = 4096  # Gram entries a rough product samples (of 32,640 at 256 patches)
# The shortlist's first, coarsest product: every step-th sampled entry, PRUNED_ENTRIES in all
# (its error about 1 / sqrt(512) = 0.044), keeps PRUNED_CANDIDATES per row for the finer one.
# Gathering those candidates' rows costs a fixed 76 ms per 256 rows on 2 Zen 4 cores (bf16),
# the product it spares 4.6 ms per 1,000 plaintexts: pruning pays from about 17,000 on.
PRUNED_ENTRIES = 512
PRUNED_CANDIDATES = 64
PRUNED_FROM = 20_000
EXACT_PAIRS = 512  # (encoding, candidate) pairs whose exact correlations are taken at once: 67 MB


@dataclass(frozen=True)
class PatchStatistics:
    """Per-image statistics of slot-centred patches.

    norms: (N, P) float32 centred patch norms; gram: (N, P(P-1)/2) the upper triangle of the
    Gram matrix of the centred, unit-normalised patches, as float16, or as int8 in units of
    :data:`INT8_UNIT` (see :func:`collect_statistics`). Correlations of ``gram`` rows are the same
    in either unit; :meth:`full_grams` and :meth:`mean_gram` give the cosines themselves.
    """

    norms: np.ndarray
    gram: np.ndarray

    @property
    def unit(self) -> float:
        """The cosine one step of ``gram`` stands for."""
        return INT8_UNIT if self.gram.dtype == np.int8 else 1.0

    def full_grams(self, rows=slice(None)) -> torch.Tensor:
        """(K, P, P) symmetric Gram matrices of the selected images, rebuilt from the upper triangle."""
        return symmetric_grams(torch.from_numpy(self.gram[rows]).float() * self.unit)

    def mean_gram(self) -> torch.Tensor:
        """(1, P, P) the population's mean Gram matrix."""
        return symmetric_grams(torch.from_numpy(self.gram.mean(0, dtype=np.float32) * self.unit)[None])


@dataclass(frozen=True)
class SampledStatistics:
    """Plaintext statistics of a pool too large to hold its Gram matrices.

    norms: (M, P) float32 centred patch norms; rough: (M, R) each image's Gram row standardised
    over every entry, kept at the R entries a rough product samples (:data:`ROUGH_ENTRIES`), in
    the rough product's dtype; spread: (M,) float32 each row's |g - mean(g)| over every entry;
    recompute(rows): yields (offset into ``rows``, (b, P(P-1)/2) float32 Gram entries) for the
    images ``rows`` (sorted; None: the whole pool, in the BatchNorm batches of its statistics),
    encoding them again. An image takes 4P + 2R + 4 bytes with bf16 rough rows (9.2 KB at 256
    patches; 17 KB with fp32 ones), where its whole Gram row takes 32 KB in int8.
    """

    norms: np.ndarray
    rough: torch.Tensor
    spread: torch.Tensor
    recompute: Callable[[np.ndarray | None], Iterator[tuple[int, torch.Tensor]]]

    def full_grams(self, rows) -> torch.Tensor:
        """(K, P, P) Gram matrices of the images ``rows`` (any order), computed again as one batch."""
        unique, inverse = np.unique(np.asarray(rows, np.int64), return_inverse=True)
        entries = torch.cat([block for _, block in self.recompute(unique)])
        return symmetric_grams(entries[torch.from_numpy(inverse)])


def symmetric_grams(values: torch.Tensor) -> torch.Tensor:
    """(K, P, P) symmetric matrices with a zero diagonal from their upper triangles (K, P(P-1)/2)."""
    n_patches = round((1 + math.sqrt(1 + 8 * values.shape[1])) / 2)
    upper = torch.triu_indices(n_patches, n_patches, 1)
    full = torch.zeros(len(values), n_patches, n_patches)
    full[:, upper[0], upper[1]] = values
    full[:, upper[1], upper[0]] = values
    return full


def patch_statistics(
    blocks, mean: torch.Tensor, n: int, *, dtype: torch.dtype = torch.float32, storage=np.float16
) -> PatchStatistics:
    """Statistics of ``n`` images given as blocks (start, (b, P, D) in slot/position order), the
    Gram products in ``dtype``, the Gram entries stored as ``storage`` (:func:`collect_statistics`)."""
    grams = ((start, centred_grams(block, mean, dtype=dtype)) for start, block in blocks)
    return collect_statistics(grams, n, mean.shape[0], storage=storage)


def centred_grams(block: torch.Tensor, mean: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(b, P, P) float32 Gram matrices of ``block`` (b, P, D) centred by ``mean`` (P, D), row by
    row; the product in ``dtype`` (centred first, so a bf16 product rounds the deviations, not
    the means they would cancel)."""
    centred = (block.to(mean.device).float() - mean).to(dtype)  # self-keyed blocks come back on the CPU
    return torch.bmm(centred, centred.transpose(1, 2)).float()


def collect_statistics(blocks, n: int, n_patches: int, *, storage=np.float16) -> PatchStatistics:
    """:class:`PatchStatistics` of ``n`` images from blocks (start, centred Gram matrices (b, P, P)).

    ``storage``: float16, or int8 (cosines rounded to steps of :data:`INT8_UNIT`: half the memory,
    64 KB instead of 128 KB per image with 256 patches; the rounding error is uniform, about
    0.002 root mean square, where the entries of a shallow release spread far wider)."""
    norms = np.empty((n, n_patches), np.float32)
    gram = np.empty((n, n_patches * (n_patches - 1) // 2), storage)
    int8 = gram.dtype == np.int8
    for start, grams in blocks:
        block_norms, entries = unit_entries(grams)
        norms[start : start + len(grams)] = block_norms.cpu().numpy()
        entries = entries.cpu()
        if int8:
            entries = entries.div_(INT8_UNIT).round_().clamp_(-127, 127)
        # Cast by torch straight into the array: numpy's float16 cast is not vectorised.
        torch.from_numpy(gram[start : start + len(grams)]).copy_(entries)
    return PatchStatistics(norms, gram)


def sampled_statistics(blocks, n: int, n_patches: int, *, dtype: torch.dtype, recompute) -> SampledStatistics:
    """:class:`SampledStatistics` of ``n`` images from blocks (start, centred Gram matrices (b, P, P)),
    the rough rows in ``dtype``; ``recompute`` as that class takes it."""
    entries = _sampled_entries(n_patches * (n_patches - 1) // 2)
    norms = np.empty((n, n_patches), np.float32)
    rough = torch.empty(n, n_patches * (n_patches - 1) // 2 if entries is None else len(entries), dtype=dtype)
    spread = torch.empty(n)
    for start, grams in blocks:
        block_norms, values = unit_entries(grams)
        norms[start : start + len(grams)] = block_norms.cpu().numpy()
        kept, block_spread = _standardise_plain(values.cpu(), entries)
        rough[start : start + len(grams)], spread[start : start + len(grams)] = kept, block_spread
    return SampledStatistics(norms, rough, spread, recompute)


def unit_entries(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred Gram matrices (b, P, P) -> the patches' norms (b, P) and the upper triangles
    (b, P(P-1)/2) of the matrices of the unit-normalised patches (cosines)."""
    n_patches = grams.shape[1]
    upper = torch.triu_indices(n_patches, n_patches, 1, device=grams.device)
    norms = grams.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    inverse = 1 / norms.clamp_min(1e-12)
    unit = (grams * inverse[:, :, None]).mul_(inverse[:, None, :])
    return norms, unit.flatten(1).index_select(1, upper[0] * n_patches + upper[1])


def _sampled_entries(n_entries: int, sampled: int = ROUGH_ENTRIES) -> torch.Tensor | None:
    """The Gram entries a rough product estimates from (sorted, drawn once with a fixed seed), or
    None where there are no more than ``sampled``."""
    if sampled >= n_entries:
        return None
    return torch.from_numpy(np.sort(np.random.default_rng(0).permutation(n_entries)[:sampled]))


def standardise_rows(values: torch.Tensor) -> torch.Tensor:
    """Rows centred and scaled to unit length: their products are Pearson correlations."""
    values = values - values.mean(1, keepdim=True)
    return values / values.norm(dim=1, keepdim=True).clamp_min(1e-12)


def sorted_norm_scores(encoded: PatchStatistics, plain: PatchStatistics) -> np.ndarray:
    """(N, M) correlation of sorted patch norms: blind to the patch order, so usable before any
    slot -> position permutation is known."""
    left = standardise_rows(torch.from_numpy(np.sort(encoded.norms, axis=1)))
    right = standardise_rows(torch.from_numpy(np.sort(plain.norms, axis=1)))
    return (left @ right.T).numpy()


def sorted_norm_mutual_best(
    encoded: PatchStatistics, plain: PatchStatistics, *, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the pairs that are each other's best by :func:`sorted_norm_scores`,
    computed ``chunk`` encoded rows at a time: the (N, M) matrix is never held (40 GB at
    N = M = 100,000), only each row's best column and each column's best row so far."""
    left = standardise_rows(torch.from_numpy(np.sort(encoded.norms, axis=1)))
    right = standardise_rows(torch.from_numpy(np.sort(plain.norms, axis=1)))
    best_column = np.empty(len(left), np.int64)
    column_best = torch.full((len(right),), -torch.inf)
    column_best_row = torch.zeros(len(right), dtype=torch.int64)
    for start in range(0, len(left), chunk):
        block = left[start : start + chunk] @ right.T
        best_column[start : start + len(block)] = block.argmax(1).numpy()
        values, rows = block.max(0)
        better = values > column_best  # strictly: the first row wins a tie, as argmax does
        column_best[better], column_best_row[better] = values[better], rows[better] + start
    rows = np.flatnonzero(column_best_row.numpy()[best_column] == np.arange(len(left)))
    return rows, best_column[rows]


def gram_scores(
    encoded: PatchStatistics, plain: PatchStatistics, slot_positions: np.ndarray, *, device: str = "cpu"
) -> np.ndarray:
    """(N, M) correlation of Gram matrices, with the plaintext's positions put in slot order
    (one exact :meth:`GramComparison.scores`). slot_positions: (P,) position of each encoded slot."""
    return GramComparison(encoded, plain, device=device).scores(slot_positions)


@dataclass(frozen=True)
class Shortlist:
    """Each encoded image's best plaintext candidates (:meth:`GramComparison.shortlist`).

    columns: (N, k) int64 candidate plaintext rows, best first by the rough product; values:
    (N, k) float32 their exact fp32 correlations; scores: (N, M) float32 rough correlations of
    every pair with the candidates' exact values put in, or None when not kept.
    """

    columns: np.ndarray
    values: np.ndarray
    scores: np.ndarray | None


class GramComparison:
    """Correlations of encoded Gram matrices (slot order) with plaintext ones (position order),
    for one population of each, compared again and again as the slot order improves.

    The plaintext side is standardised once and kept on ``device`` (1.3 GB in fp32 at
    M = 10,000); each comparison puts the encoded entries in position order instead, which
    permutes the P(P-1)/2 entries of both sides alike and leaves each correlation as it was.
    Rough products (trusted pairs, shortlists) estimate each correlation from ``rough_entries``
    entries drawn once at random, scaled to the whole: the error is about 1 / sqrt(rough_entries)
    for unit rows, and the product costs that fraction of the exact one.
    Results come back as numpy arrays whatever the device.
    """

    def __init__(
        self,
        encoded: PatchStatistics,
        plain: PatchStatistics,
        *,
        chunk: int = 1024,
        device: str = "cpu",
        rough_entries: int = ROUGH_ENTRIES,
    ):
        self.encoded, self.plain, self.chunk = encoded, plain, chunk
        self.sampled = isinstance(plain, SampledStatistics)  # rough products only, exact ones recomputed
        self.device = torch.device(device)
        self._standardised: tuple[tuple[torch.dtype, bool], torch.Tensor] | None = None
        self._spread: torch.Tensor | None = None  # (M,) set with the standardised copy
        n_entries = encoded.gram.shape[1]
        self._entries = _sampled_entries(n_entries, rough_entries)
        if self._entries is not None:
            self._entries = self._entries.to(self.device)
        self._entry_scale = n_entries / rough_entries if self._entries is not None else 1.0
        if self.sampled and plain.rough.shape[1] != (n_entries if self._entries is None else len(self._entries)):
            raise ValueError("sampled plaintext statistics hold other entries than this comparison samples")

    def scores(
        self,
        slot_positions: np.ndarray,
        *,
        subset: np.ndarray | None = None,
        columns: np.ndarray | None = None,
        rough: bool = False,
    ) -> np.ndarray:
        """(N, M) correlations, or (len(subset), len(columns)) for the encoded rows ``subset`` and
        the plaintext rows ``columns`` (exact ones standardised for this call only; rough only
        against :class:`SampledStatistics`).

        ``rough``: estimate from the sampled entries and multiply in :func:`matmul_dtype` (bf16
        where native: 2.4x faster, but torch's CPU bf16 product rounds its output to bf16 too,
        steps of 0.004 near 1): enough to pick trusted pairs, too coarse to rank (see
        :meth:`shortlist`).
        """
        if self.sampled and not rough:
            raise ValueError("sampled plaintext statistics give rough products only")
        dtype = matmul_dtype(self.device) if rough else torch.float32
        if columns is None or rough:
            right = self._plain(dtype, rough=rough)
            right = right if columns is None else right[torch.as_tensor(columns, device=self.device)]
        else:
            right = _standardise_plain(torch.from_numpy(self.plain.gram[columns]).to(self.device).float())[0]
        encoded_gram = self.encoded.gram if subset is None else self.encoded.gram[subset]
        scores = np.empty((len(encoded_gram), len(right)), np.float32)
        for s, left in self._encoded_blocks(encoded_gram, slot_positions, self.chunk):
            left = self._rough_rows(left, dtype) if rough else left
            scores[s : s + len(left)] = (left @ right.T).float().cpu().numpy()
        return scores

    def shortlist(
        self,
        slot_positions: np.ndarray,
        *,
        candidates: int = 8,
        keep_scores: bool = True,
        chunk: int = 256,
        exact: bool = True,
    ) -> Shortlist:
        """Each encoded image's ``candidates`` best plaintexts by the rough product (sampled
        entries, bf16 where native), their correlations recomputed in fp32 on every entry: exact
        where a matching or a ranking is decided, at the rough product's cost. ``chunk`` rows of
        the (N, M) product exist at a time; the whole matrix only when ``keep_scores`` (10 GB at
        N = M = 50,000). Against :class:`SampledStatistics` the exact correlations come from one
        more pass that encodes the pool again (:meth:`_recomputed_exact`). ``exact=False``: the
        rough values stay (for a matching that only seeds another step)."""
        dtype = matmul_dtype(self.device)
        right = self._plain(dtype, rough=True)
        # A standardised left row sums to zero, so its correlation with a plaintext row p is
        # <left, p> / |p - mean(p)|: the candidates' raw rows suffice.
        spread = self._spread if dtype != torch.float32 or self._entries is not None else None
        later = self.sampled and spread is not None and exact  # exact values after the loop
        n, m = len(self.encoded.gram), len(right)
        k = min(candidates, m)
        columns = np.empty((n, k), np.int64)
        values = np.empty((n, k), np.float32)
        scores = np.empty((n, m), np.float32) if keep_scores else None
        # Beyond PRUNED_FROM plaintexts a first product on every step-th sampled entry keeps each
        # row's PRUNED_CANDIDATES best, and only those get the product on every sampled entry.
        step = right.shape[1] // PRUNED_ENTRIES if m > max(PRUNED_FROM, PRUNED_CANDIDATES) else 0
        coarse = right[:, ::step].contiguous() if step > 1 else None
        for s, left in self._encoded_blocks(self.encoded.gram, slot_positions, chunk):
            rough_left = self._rough_rows(left, dtype)
            if coarse is None:
                rough = rough_left @ right.T
                best = rough.topk(k, dim=1)
                best_columns, best_values = best.indices, best.values
            else:
                rough = (rough_left[:, ::step] @ coarse.T) * step
                kept = rough.topk(PRUNED_CANDIDATES, dim=1).indices
                finer = torch.bmm(right[kept], rough_left[:, :, None]).squeeze(-1)
                if scores is not None:  # the submitted scores: the finer values where there are any
                    rough.scatter_(1, kept, finer)
                best = finer.topk(k, dim=1)
                best_columns, best_values = kept.gather(1, best.indices), best.values
            columns[s : s + len(left)] = best_columns.cpu().numpy()
            if scores is not None:
                scores[s : s + len(left)] = rough.float().cpu().numpy()
            if later:
                continue
            if spread is None or not exact:
                values[s : s + len(left)] = best_values.float().cpu().numpy()
            else:
                values[s : s + len(left)] = (self._exact(left, best_columns) / spread[best_columns]).cpu().numpy()
        self._standardised = None  # the standardised copy is not needed any more
        if later:
            values = self._recomputed_exact(slot_positions, columns)
        if scores is not None:
            np.put_along_axis(scores, columns, values, axis=1)
        return Shortlist(columns, values, scores)

    def _recomputed_exact(self, slot_positions: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """(N, k) fp32 correlations of each encoded row with its candidate plaintexts ``columns``
        (N, k), the plaintexts' Gram rows computed again a batch at a time (:class:`SampledStatistics`)
        and put in slot order, where the encoded rows are as stored; :data:`EXACT_PAIRS` at a time."""
        to_slot_order = torch.from_numpy(np.argsort(_position_order(slot_positions))).to(self.device)
        spread = torch.cat([_row_spread(rows.float()) for _, rows in self._encoded_rows(self.encoded.gram, self.chunk)])
        flat = columns.ravel()
        order = np.argsort(flat, kind="stable")
        by_column = flat[order]
        values = np.empty(len(flat), np.float32)
        for start, block in self.plain.recompute(None):
            block = block.to(self.device).index_select(1, to_slot_order)
            block = (block - block.mean(1, keepdim=True)) / _row_spread(block)[:, None]
            first, stop = np.searchsorted(by_column, [start, start + len(block)])
            for at in range(first, stop, EXACT_PAIRS):
                pairs = order[at : min(at + EXACT_PAIRS, stop)]
                rows = pairs // columns.shape[1]
                left = torch.from_numpy(self.encoded.gram[rows]).to(self.device).float()
                right = block[torch.from_numpy(flat[pairs] - start).to(self.device)]
                # The right rows sum to zero: the left rows' means drop out of the product.
                values[pairs] = ((left * right).sum(1) / spread[rows]).cpu().numpy()
        return values.reshape(columns.shape)

    def _exact(self, left: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """(b, k) fp32 products of ``left`` (b, entries) with the raw plaintext rows ``columns``
        (b, k). On a CPU 8 left rows at a time: their candidates widened to fp32 (8 MB at k = 8)
        stay in cache for the product (all at once: 2.3x slower, at the memory's pace)."""
        plain = torch.from_numpy(self.plain.gram)
        rows_at_once = 8 if self.device.type == "cpu" else len(left)
        exact = torch.empty(columns.shape, dtype=torch.float32, device=self.device)
        for s in range(0, len(left), rows_at_once):
            block = columns[s : s + rows_at_once]
            candidates = plain.index_select(0, block.cpu().reshape(-1)).to(self.device).float()
            exact[s : s + len(block)] = torch.bmm(
                candidates.view(*block.shape, -1), left[s : s + len(block), :, None]
            ).squeeze(-1)
        return exact

    def _encoded_blocks(self, encoded_gram: np.ndarray, slot_positions: np.ndarray, chunk: int):
        """Yield (start, standardised fp32 rows in position order, on the device) of ``encoded_gram``."""
        take = torch.from_numpy(_position_order(slot_positions)).to(self.device)
        for s, rows in self._encoded_rows(encoded_gram, chunk):
            yield s, standardise_rows(rows.index_select(1, take).float())

    def _encoded_rows(self, encoded_gram: np.ndarray, chunk: int):
        """Yield (start, rows as stored, on the device) of ``encoded_gram``."""
        for s in range(0, len(encoded_gram), chunk):
            yield s, torch.from_numpy(encoded_gram[s : s + chunk]).to(self.device)

    def _plain_blocks(self):
        gram = self.plain.gram
        for s in range(0, len(gram), self.chunk):
            yield torch.from_numpy(gram[s : s + self.chunk]).to(self.device).float()

    def _rough_rows(self, left: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Standardised encoded rows as a rough product takes them: the sampled entries, scaled."""
        if self._entries is None:
            return left.to(dtype)
        return (left.index_select(1, self._entries) * self._entry_scale).to(dtype)

    def _plain(self, dtype: torch.dtype, *, rough: bool = False) -> torch.Tensor:
        """(M, entries) standardised plaintext rows in ``dtype``: every entry, or a rough product's.
        Sets ``_spread`` (M,): each raw row's |p - mean(p)|."""
        if self.sampled:
            self._spread = self.plain.spread.to(self.device)
            return self.plain.rough.to(self.device, dtype)
        entries = self._entries if rough else None
        if self._standardised is None or self._standardised[0] != (dtype, entries is not None):
            self._standardised = None  # one copy at a time
            n, n_entries = self.plain.gram.shape
            n_entries = n_entries if entries is None else len(entries)
            standardised = torch.empty(n, n_entries, dtype=dtype, device=self.device)  # filled: no second copy
            self._spread = torch.empty(n, device=self.device)
            for s, rows in enumerate(self._plain_blocks()):
                block = slice(s * self.chunk, s * self.chunk + len(rows))
                standardised[block], self._spread[block] = _standardise_plain(rows, entries)
            self._standardised = ((dtype, entries is not None), standardised)
        return self._standardised[1]


def _standardise_plain(rows: torch.Tensor, entries: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plaintext Gram rows (b, E) fp32 standardised over every entry, keeping ``entries`` only
    (all when None), and each row's spread (b,) |p - mean(p)|. Uses |p - mean|^2 = |p|^2 -
    E mean^2: no centred copy of every entry where a rough product needs only the sampled ones."""
    mean = rows.mean(1, keepdim=True)
    square = torch.linalg.vector_norm(rows, dim=1, keepdim=True).square() - rows.shape[1] * mean.square()
    spread = square.clamp_min(1e-24).sqrt()
    kept = rows if entries is None else rows.index_select(1, entries)
    return (kept - mean) / spread, spread[:, 0]


def _row_spread(rows: torch.Tensor) -> torch.Tensor:
    """(b,) |r - mean(r)| of each row of ``rows`` (b, E)."""
    return (rows - rows.mean(1, keepdim=True)).norm(dim=1).clamp_min(1e-12)


def _position_order(slot_positions: np.ndarray) -> np.ndarray:
    """(P(P-1)/2,) for each upper-triangle entry (p, q) of a plaintext Gram, the upper-triangle
    entry of the encoded Gram that pairs with it: slots (s, t) with pos[s] = p, pos[t] = q (the
    encoded Gram is symmetric, so whichever triangle holds it)."""
    n_patches = len(slot_positions)
    slot_of = np.argsort(slot_positions)
    upper = np.triu_indices(n_patches, 1)
    rows, cols = slot_of[upper[0]], slot_of[upper[1]]
    flat = np.full((n_patches, n_patches), -1, np.int64)
    flat[upper] = np.arange(len(upper[0]))
    return flat[np.minimum(rows, cols), np.maximum(rows, cols)]
