"""Decoding encodings back to pixels: the ridge map ``linear-inversion`` fits, and the re-matching
by decoded thumbnails that ``gram-hungarian`` ends with at large N.

Gram statistics compare an image with itself, under two different keys; at large N many views
of the same film have nearly the same statistics (nc7 at width 512: 4 wrong at N = 10,000, 123
at 30,000, 2,652 at 100,000). Once a matching is mostly right, its own pairs are known pairs: a
ridge map fitted on a sample of them decodes every encoding, and each decoded thumbnail is
compared with the plaintexts' thumbnails directly, block by block: coarse blocks find the
candidates, finer ones rank them, and a dense assignment of the few encodings left off their
nearest candidate undoes the chains of wrong matches that sparse shortlists leave.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from ncbench.assignment import match_shortlists
from ncbench.attacks.alignment import iter_release, to_slot_order
from ncbench.challenge.encoders import PIXEL_MEAN, PIXEL_STD, EncoderConfig
from ncbench.challenge.files import Release, RowReader, SiteView, iter_blocks
from ncbench.hardware import matmul_dtype

# Matched pairs the decoder is fitted on (0.4% of them wrong at nc7 width 512, N = 30,000): 1,024
# left 6 of the 30,000 wrong, 512 left 7-15 and 2,048 left 5-6.
DECODE_PAIRS = 1024
# Encodings from which gram-hungarian re-matches by default. At nc7 N = 10,000 the Gram matching
# alone leaves 0-7 wrong (fresh keys); the decoding placed all on an AMD Zen 5 (2 cores), in 37 s
# -> 60 s with a second pass over the release, 43-48 s with the alignment's rows held.
DECODE_FROM = 10_000
# The alignment's rows (the channels it reads, as stored) are kept for the decoding up
# to this size (N = 12,288 at 512 channels of 256 patches), so it does not read the release
# again; beyond, it streams a second pass (of those channels only, where the release stores its
# channels in blocks: a release of one encoding per chunk has each inflated whole, 4x at full width).
HELD_ROWS_BYTES = 3 << 30
DECODE_RIDGE = 0.1  # linear-inversion's cross-validation picks 0.1 at nc7
# Thumbnails: means of sub x sub pixel blocks of each patch. The candidates are sought among the
# coarse ones (SUBPATCH = 8: 2 x 2 values per 16-pixel patch, 32 x 32 of a 256 x 256 image) and
# ranked by the fine ones (FINE_SUBPATCH = 4: 4 x 4 values per patch), which tell near-identical
# views apart better (nc7 N = 10,000: the 1st percentile of the truth's relative margin 0.46 ->
# 0.61). The ridge solution is linear in its targets, so fitting to block means is the full
# decoder followed by the pooling, and the coarse decoded values are the fine ones pooled.
SUBPATCH = 8
FINE_SUBPATCH = 4
# Each encoding's DECODE_CANDIDATES nearest plaintexts by fine thumbnails (and its current match)
# are the assignment's candidates, taken among the ROUGH_CANDIDATES nearest by coarse thumbnails
# (in bf16 products where bf16 is native).
DECODE_CANDIDATES = 16
ROUGH_CANDIDATES = 32
# At most this many encodings whose match is not their nearest candidate are assigned again, densely
# (a float32 square of 256 MB; 2,600 of them at N = 100,000).
RESOLVE_MAX = 8192
_QUERY_BLOCK = 1024
_POOL_BLOCK = 4096
_PAIR_BLOCK = 256
_EXACT_ROWS = 16
_FIT_BLOCK = 64


def fit_ridge(encoded: torch.Tensor, pixels: torch.Tensor, *, ridge: float, per_position: bool) -> dict:
    """Fit pixels ~ encoded patches.

    encoded: (K, P, D) paired encodings in position order; pixels: (K, P, Q) normalised pixel
    patches. Both are centred per position first (the positional embedding makes each position's
    offset its own). Shared: one (D, Q) map for all positions, solved in the primal. Per position:
    one map per position, solved in the dual (K x K systems, batched), since K << D.
    ``ridge`` is relative to the mean feature energy, so it is scale-free.
    """
    enc_mean, pix_mean = encoded.mean(0), pixels.mean(0)
    k, n_patches, width = encoded.shape
    if per_position:
        enc, pix = (encoded - enc_mean).double(), (pixels - pix_mean).double()
        kernel = torch.einsum("kpd,lpd->pkl", enc, enc)  # (P, K, K)
        scale = kernel.diagonal(dim1=1, dim2=2).mean() * ridge + 1e-12
        alpha = torch.linalg.solve(kernel + scale * torch.eye(k, dtype=enc.dtype), pix.transpose(0, 1))
        weights = torch.einsum("kpd,pkq->pdq", enc, alpha)  # (P, D, Q)
    else:
        # The normal equations summed _FIT_BLOCK pairs at a time: no float64 copy of all the
        # pairs (2.1 GB at 1,024 pairs of 512 channels), the same sums.
        covariance = torch.zeros(width, width, dtype=torch.float64, device=encoded.device)
        cross = torch.zeros(width, pixels.shape[-1], dtype=torch.float64, device=encoded.device)
        for start in range(0, k, _FIT_BLOCK):
            rows = (encoded[start : start + _FIT_BLOCK] - enc_mean).double().reshape(-1, width)
            covariance += rows.T @ rows
            cross += rows.T @ (pixels[start : start + _FIT_BLOCK] - pix_mean).double().reshape(len(rows), -1)
        scale = covariance.diagonal().mean() * ridge + 1e-12
        weights = torch.linalg.solve(
            covariance + scale * torch.eye(width, dtype=covariance.dtype, device=covariance.device), cross
        )  # (D, Q)
    return {"weights": weights.float(), "enc_mean": enc_mean, "pix_mean": pix_mean, "per_position": per_position}


class Thumbnails(NamedTuple):
    """The plaintext pool's thumbnails (:func:`thumbnail_patches`), flattened per image: ``coarse``
    (M, P * q) float32 at :data:`SUBPATCH`, ``fine`` (M, P * q') float16 at :data:`FINE_SUBPATCH`."""

    coarse: torch.Tensor
    fine: torch.Tensor


def thumbnail_patches(images: torch.Tensor, config: EncoderConfig, sub: int = SUBPATCH) -> torch.Tensor:
    """(B, S, S) uint8 images -> (B, P, (patch / sub)^2) float32: the normalised pixels' means
    over sub x sub blocks of each patch, by position, row-major within the patch (the whole patch
    where it is smaller)."""
    return _normalised(_block_sums(images, config, sub), config, sub)


def _block_sums(images: torch.Tensor, config: EncoderConfig, sub: int) -> torch.Tensor:
    """(B, S, S) uint8 -> (B, P, q) int32 pixel sums of the blocks :func:`thumbnail_patches` averages
    (summed as integers, then normalised: the same values as normalising every pixel first, in
    a third of the time)."""
    batch, size, patch = len(images), config.image_size, config.patch_size
    sub = min(sub, patch)
    sums = images.reshape(batch, size // sub, sub, size // sub, sub).sum((2, 4), dtype=torch.int32)
    grid, per = size // patch, patch // sub
    return sums.reshape(batch, grid, per, grid, per).permute(0, 1, 3, 2, 4).reshape(batch, grid * grid, per * per)


def _normalised(sums: torch.Tensor, config: EncoderConfig, sub: int) -> torch.Tensor:
    block = min(sub, config.patch_size) ** 2
    return sums.float().div_(block).sub_(PIXEL_MEAN).div_(PIXEL_STD)


def coarsened(fine: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    """(B, P, q') values of :data:`FINE_SUBPATCH` blocks (sums or means) -> (B, P, q) of
    :data:`SUBPATCH` blocks: sums of sums, means of means."""
    patch = config.patch_size
    per, ratio = patch // min(SUBPATCH, patch), min(SUBPATCH, patch) // min(FINE_SUBPATCH, patch)
    blocks = fine.reshape(len(fine), config.n_patches, per, ratio, per, ratio)
    pooled = blocks.sum((3, 5)) if not fine.is_floating_point() else blocks.mean((3, 5))
    return pooled.flatten(2)


class PoolThumbnails:
    """The plaintext pool's :class:`Thumbnails`, taken from its batches of images while another
    pass reads them: :meth:`add` is an ``on_images`` callback
    (:func:`~ncbench.attacks.self_keyed.self_encode`), so the pool is not read a second time for
    them (6.5 GB at M = 100,000). Held as the fine blocks' uint16 pixel sums, exact, 2 bytes a
    value (820 MB at 100,000 images of 256 x 256); the coarse ones are their sums."""

    def __init__(self, n_images: int, config: EncoderConfig):
        per = config.patch_size // min(FINE_SUBPATCH, config.patch_size)
        self.config = config
        self.sums = np.empty((n_images, config.n_patches * per * per), np.uint16)
        self.added = 0

    def add(self, start: int, images: torch.Tensor) -> None:
        self.sums[start : start + len(images)] = _block_sums(images, self.config, FINE_SUBPATCH).flatten(1).numpy()
        self.added += len(images)

    def thumbnails(self) -> Thumbnails:
        """Both resolutions, once every image was added."""
        if self.added != len(self.sums):
            raise RuntimeError(f"thumbnails of {self.added} of {len(self.sums)} pool images")
        config, coarse, fine = self.config, [], []
        for start in range(0, len(self.sums), _POOL_BLOCK):  # float copies a block at a time
            sums = torch.from_numpy(self.sums[start : start + _POOL_BLOCK].astype(np.int32))
            sums = sums.unflatten(1, (config.n_patches, -1))
            coarse.append(_normalised(coarsened(sums, config), config, SUBPATCH).flatten(1))
            fine.append(_normalised(sums, config, FINE_SUBPATCH).flatten(1).half())
        return Thumbnails(torch.cat(coarse), torch.cat(fine))


class HeldRows:
    """An encoded view's rows as the alignment's pass reads them: their first ``channels``
    channels, in the release's storage dtype (widened from it, so narrowed back exactly).
    :meth:`add` is that pass's ``on_rows`` callback
    (:func:`~ncbench.attacks.pairing.aligned_statistics`); it then reads like the view
    (``encoded_rows``, ``iter_encoded``) without touching the file."""

    def __init__(self, view: Release | SiteView, channels: int):
        self.config, self.n_encoded = view.config, view.n_encoded
        shape = (view.n_encoded, view.config.n_patches, channels)
        self.rows = np.empty(shape, np.dtype(view.config.dtype))

    @staticmethod
    def fits(view: Release | SiteView, channels: int) -> bool:
        """Whether ``view``'s rows at ``channels`` channels fit :data:`HELD_ROWS_BYTES`."""
        itemsize = np.dtype(view.config.dtype).itemsize
        return view.n_encoded * view.config.n_patches * channels * itemsize <= HELD_ROWS_BYTES

    def add(self, start: int, block: torch.Tensor) -> None:
        # Narrowed by torch: numpy's float32 -> float16 cast took 8 s of 64 at N = 10,000 (34x slower).
        torch.from_numpy(self.rows[start : start + len(block)]).copy_(block)

    def encoded_rows(self, rows, *, dtype=np.float32, channels: int | None = None) -> np.ndarray:
        return self.rows[np.asarray(rows, np.int64), :, :channels].astype(dtype or self.rows.dtype, copy=False)

    def iter_encoded(self, chunk: int = 64, *, dtype=np.float32, reverse: bool = False, channels: int | None = None):
        return iter_blocks(self, chunk, dtype, reverse, channels)


def plain_thumbnails(plain_images: RowReader, config: EncoderConfig, *, block: int = 4096) -> Thumbnails:
    """The plaintext pool's :class:`Thumbnails`, read ``block`` images at a time."""
    pool = PoolThumbnails(len(plain_images), config)
    for start in range(0, len(plain_images), block):
        pool.add(start, torch.from_numpy(plain_images[start : start + block]))
    return pool.thumbnails()


def rematch_by_decoding(
    view: Release | SiteView | HeldRows,
    thumbs: Thumbnails,
    matched: np.ndarray,
    positions: np.ndarray,
    *,
    channels: int,
    chunk: int,
    device: str,
    rng: np.random.Generator,
    pairs: int = DECODE_PAIRS,
    advance: Callable[[int], None] = lambda k: None,
) -> np.ndarray:
    """A new matching of ``view``'s encodings with the plaintext pool by decoded thumbnails.

    view: the encodings, or their rows held from the alignment (:class:`HeldRows`);
    thumbs: the pool's (:class:`PoolThumbnails`, :func:`plain_thumbnails`);
    matched: (N,) plaintext row of each encoding, mostly right; positions: (N, P) original
    position of each encoded row. The shared ridge map from an encoded row's first ``channels``
    channels to its fine thumbnail values is fitted on ``pairs`` random matched pairs, every
    encoding is decoded in one streamed pass, and a sparse assignment (:func:`match_shortlists`)
    over each encoding's candidates (:func:`nearest_plaintexts`) plus its current match maximises
    the negative squared distances: the current matching is among the assignments it chooses
    from, so every encoding is placed. The encodings it leaves off their nearest candidate are
    then assigned again densely (:func:`resolve_displaced`). ``advance``: called with the number
    of encodings decoded.
    """
    n_patches = view.config.n_patches
    sample = np.sort(rng.permutation(len(matched))[:pairs])
    known = torch.cat(  # a block at a time: a release of one encoding per chunk is read in whole rows
        [
            torch.from_numpy(view.encoded_rows(sample[start : start + _PAIR_BLOCK], channels=channels))
            for start in range(0, len(sample), _PAIR_BLOCK)
        ]
    )
    targets = thumbs.fine[torch.from_numpy(matched[sample])].float().reshape(len(sample), n_patches, -1)
    model = fit_ridge(to_slot_order(known, positions[sample]), targets, ridge=DECODE_RIDGE, per_position=False)
    weights, enc_mean = model["weights"].to(device), model["enc_mean"].to(device)
    pix_mean = model["pix_mean"].to(device)
    fine = torch.empty(len(matched), thumbs.fine.shape[1], dtype=thumbs.fine.dtype)
    coarse = torch.empty(len(matched), thumbs.coarse.shape[1])
    # Last block first: the end of the alignment's pass may still be in the page cache.
    for start, block in iter_release(view, chunk, device, channels=channels, reverse=True):
        decoded = (to_slot_order(block, positions[start : start + len(block)]) - enc_mean) @ weights + pix_mean
        fine[start : start + len(block)] = decoded.flatten(1).cpu()
        coarse[start : start + len(block)] = coarsened(decoded, view.config).flatten(1).cpu()
        advance(len(block))
    columns, distances = nearest_plaintexts(Thumbnails(coarse, fine), thumbs, current=matched, device=device)
    rematched = match_shortlists(columns, -distances, len(thumbs.fine))
    return resolve_displaced(rematched, columns, distances, fine, thumbs.fine, device=device)


def resolve_displaced(
    matched: np.ndarray,
    columns: np.ndarray,
    distances: np.ndarray,
    decoded: torch.Tensor,
    thumbs: torch.Tensor,
    *,
    device: str,
) -> np.ndarray:
    """``matched`` (N,) with the encodings that did not get their nearest candidate assigned
    again, densely, among the plaintexts they hold.

    columns, distances: (N, k) each encoding's candidates, nearest first, and their squared
    distances (:func:`nearest_plaintexts`); decoded: (N, T) the decoded thumbnails; thumbs: (M, T)
    the plaintexts'. An encoding whose true plaintext is missing from its candidates takes
    another's, which takes a third's: a chain of wrong matches, each off its nearest candidate.
    Among the plaintexts the chain holds is the one the first was missing, so a dense
    assignment over all their distances undoes it (nc7 at N = 100,000, width 512: 2,582
    encodings, 17 of them wrong before, none after). It can only lower their total distance.
    At most :data:`RESOLVE_MAX` of them, those whose match is furthest behind their nearest."""
    from scipy.optimize import linear_sum_assignment

    held_at = np.argmax(columns == matched[:, None], 1)  # every match is among its row's candidates
    behind = distances[np.arange(len(matched)), held_at] - distances[:, 0]
    rows = np.flatnonzero(matched != columns[:, 0])
    rows = rows[np.argsort(-behind[rows], kind="stable")[:RESOLVE_MAX]]
    if len(rows) == 0:
        return matched
    held = matched[rows]
    keys = thumbs[held].float()
    centre = keys.mean(0)
    queries, keys = (decoded[rows].float() - centre).to(device), (keys - centre).to(device)
    dense = (queries**2).sum(1, keepdim=True) - 2 * queries @ keys.T + (keys**2).sum(1)
    order, assigned = linear_sum_assignment(dense.cpu().numpy())
    resolved = matched.copy()
    resolved[rows[order]] = held[assigned]
    return resolved


def nearest_plaintexts(
    decoded: Thumbnails, thumbs: Thumbnails, *, current: np.ndarray, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates for each decoded thumbnail (N of them) among the plaintexts' (M): (N, k + 1)
    distinct plaintext rows, its k = :data:`DECODE_CANDIDATES` nearest by fine thumbnails with
    ``current`` (N,) in the last column where it is not among them, and (N, k + 1) float64 their
    squared distances.

    The nearest are sought among the :data:`ROUGH_CANDIDATES` nearest by coarse thumbnails, from
    one product in bf16 where it is native (on thumbnails centred by the plaintexts' mean, so
    that rounding hides less of the small distances between near-identical views), and ranked by
    their fp32 distances on the fine thumbnails."""
    dtype = matmul_dtype(device)
    centre = thumbs.coarse.mean(0)
    keys = (thumbs.coarse - centre).to(device)
    fine_keys = thumbs.fine.to(device)
    # 2 <query, key> - |key|^2 = |query|^2 - |query - key|^2: the nearest keys have the largest
    # values of one product, with the queries extended by a column of ones.
    rough_keys = torch.cat([2 * keys, -(keys**2).sum(1, keepdim=True)], 1).to(dtype)
    k = min(DECODE_CANDIDATES, len(keys) - 1)
    rough_k = min(max(ROUGH_CANDIDATES, k + 1), len(keys))
    columns = np.empty((len(current), k + 1), np.int64)
    distances = np.empty((len(current), k + 1))
    for start in range(0, len(current), _QUERY_BLOCK):
        queries = (decoded.coarse[start : start + _QUERY_BLOCK] - centre).to(device)
        extended = torch.cat([queries, torch.ones(len(queries), 1, device=device)], 1).to(dtype)
        shortlist = (extended @ rough_keys.T).topk(rough_k, dim=1).indices
        fine_queries = decoded.fine[start : start + len(queries)].to(device)
        exact = _squared_distances(fine_queries, fine_keys, shortlist)
        order = exact.topk(k + 1, dim=1, largest=False).indices
        nearest = shortlist.gather(1, order).cpu().numpy()
        found = exact.gather(1, order).double().cpu().numpy()
        own = current[start : start + len(queries)]
        own_distance = _squared_distances(fine_queries, fine_keys, torch.from_numpy(own[:, None]).to(device))
        missing = ~(nearest[:, :k] == own[:, None]).any(1)
        nearest[missing, k], found[missing, k] = own[missing], own_distance[missing, 0].double().cpu().numpy()
        columns[start : start + len(queries)] = nearest
        distances[start : start + len(queries)] = found
    return columns, distances


def _squared_distances(queries: torch.Tensor, keys: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(b, c) fp32 squared distances of ``queries`` (b, T) to their ``keys`` rows ``columns`` (b, c),
    of any float dtype.
    On a CPU :data:`_EXACT_ROWS` queries at a time, so that their gathered keys stay in cache (all
    1,024 at once: 4x slower, at the memory's pace)."""
    rows_at_once = _EXACT_ROWS if queries.device.type == "cpu" else len(queries)
    out = torch.empty(columns.shape, device=queries.device)
    for s in range(0, len(queries), rows_at_once):
        block = columns[s : s + rows_at_once]
        out[s : s + len(block)] = ((queries[s : s + len(block), None].float() - keys[block].float()) ** 2).sum(2)
    return out
