"""The Gram pairing that ``gram-hungarian`` submits, ``linear-inversion`` fits on and
``gram-link`` uses between two sites.

1. undo each image's patch shuffle by assignment against a reference (:mod:`attacks.alignment`):
   one reference per key, so per site; beyond :data:`SHALLOW_DEPTH` blocks blind to the direction
   along which a patch's content moves its row in every slot (:func:`content_direction`);
2. per image, the Gram matrix of its slot-centred, unit-normalised patches (P x P), and the same
   for every plaintext encoded with a self-sampled key of the public architecture (at a smaller
   width: the kernel, not the key, is what matters);
3. first matching on a shuffle-invariant statistic (each image's sorted patch norms);
4. boost: recover the global slot -> position permutation from the matched pairs, compare the
   Gram matrices in that order, re-solve the assignment; repeat;
5. from 10,000 encodings, up to nc7's depth: re-match by thumbnails decoded with a ridge map
   fitted on the matching's own pairs (:mod:`attacks.decoding`).

Where repeated patches give exact pairs (:mod:`attacks.duplicates`), they replace the first
matching. At depth and full width they start instead, with no Gram statistics at all, the
comparison of each slot's leading principal components against a function of the plaintext patch
(:func:`principal_matching`), on rows the alignment's pass holds (:class:`SlotRows`). Where that
comparison finds too few mutual best pairs, and on narrower or shallower keys, boosting runs, and
where it stalls the comparison starts from its matching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch

from ncbench.assignment import match, match_shortlists
from ncbench.attacks.alignment import (
    align,
    consensus_start,
    content_direction,
    iter_release,
    recover_slot_positions,
    refine_slot_positions,
    slot_moments,
    to_slot_order,
    without,
)
from ncbench.attacks.base import Attack
from ncbench.attacks.decoding import DECODE_FROM, DECODE_PAIRS, HeldRows, PoolThumbnails, rematch_by_decoding
from ncbench.attacks.duplicates import exact_pairs, patch_hashes, row_hashes, shared_groups
from ncbench.attacks.self_keyed import insider_encoder, self_encode
from ncbench.attacks.statistics import (
    GramComparison,
    PatchStatistics,
    SampledStatistics,
    centred_grams,
    collect_statistics,
    patch_statistics,
    sampled_statistics,
    sorted_norm_mutual_best,
    sorted_norm_scores,
    standardise_rows,
    unit_entries,
)
from ncbench.challenge.config import EncoderConfig
from ncbench.challenge.encoders import images_to_patches
from ncbench.challenge.files import Release, SiteView
from ncbench.h5io import prefetch
from ncbench.hardware import matmul_dtype

# Boosting stops once a round adds under CONVERGED of mutual best pairs, after at most
# BOOST_ROUNDS rounds: nc3 / nc7 converge in 2 (about 90% mutual), nc47 needs about 6 (93.0% at
# N = 200 where 2 rounds gave 15%, benchmarks/RESULTS.md).
BOOST_ROUNDS = 8
CONVERGED = 0.01
# Beyond ASSIGN_MAX the rounds start from few trusted pairs, and from a weak start they can stall:
# nc7 at full width, N = 20,000, one seed of three ended at 45% mutual best pairs (1.4%
# re-identified) where the others reached 95% (benchmarks/RESULTS.md). Rounds that end under
# STALLED_BELOW start again from the first pairs with another sample of rows, at most
# BOOST_RESTARTS times, and the attempt that ends with the most mutual best pairs is kept.
STALLED_BELOW = 0.8
BOOST_RESTARTS = 2
REFINE_PAIRS = 256  # matched pairs whose Gram matrices refine the slot permutation
ASSIGN_MAX = 2048  # rows up to which a boosting round's pairs come from an assignment
# Beyond ASSIGN_MAX the final matching is a sparse assignment on each encoding's CANDIDATES best
# plaintexts; the full (N, M) scores are kept (and submitted) up to SCORES_MAX encodings only
# (float32: 1.6 GB at 20,000 x 20,000, 40 GB at 100,000).
CANDIDATES = 8
SCORES_MAX = 20_000
# Encodings whose mean (in slot order) is the alignment reference. The mean of the first 256 is
# as good as that of all (nc7, N = 1,000: 100% either way, patch positions 97.4% vs 97.8%) and
# makes the first of the two passes over the encodings a fixed cost instead of one per image.
REFERENCE_IMAGES = 256
# Likewise the self-keyed pool is centred by the mean of its first 2,048 images (all of a smaller
# pool), so the rest can be encoded and reduced a batch at a time: no pool of M images, nor their
# encodings, is held (6.5 GB each at M = 100,000: the images, and their encodings at width 128).
POOL_MEAN_IMAGES = 2048
# Up to this many plaintexts their Gram matrices are held (32 KB each in int8 at 256 patches);
# beyond, only what the rough products need (9.2 KB), and the exact correlations of the final
# candidates come from encoding the pool a second time (:class:`SampledStatistics`).
HELD_MAX = 20_000
# Up to this depth (nc7 and shallower) the statistics survive cheaper arithmetic; over nc47's 44
# blocks every error compounds. There the self-keyed encoder keeps bf16 activations where bf16 is
# native (nc7, N = 1,000: 5.7 s instead of 9.0 s; nc47's Gram statistic with the true slot order
# fell from 87.5% to 86.0%). Where the images also have at least SHALLOW_MIN_PATCHES patches, each
# Gram statistic averages over enough entries (32,640 at 256) for more:
# - the self-keyed encoder is SHALLOW_SELF_WIDTH wide instead of DEEP_SELF_WIDTH: at nc7 one key's
#   kernel is close enough even that narrow (N = 1,000: 100% with widths 64, 128 and 512, and
#   not with 32);
# - the alignment and the encoded Gram statistics use the first SHALLOW_CHANNELS channels of each
#   encoding. The final linear layer is random, so any of its channels are random projections of
#   the same hidden patches and keep their geometry (nc7, N = 1,000: 100% with 128, 256, 512 and
#   all 2,048; N = 10,000: 100% with 512, 99.97% with 256), for a quarter of the products. The
#   alignment places fewer rows right from them (two fresh nc7 releases, N = 1,000: patch
#   positions 96.7% and 97.0% with 512, 98.1% and 98.6% with 1,024, 98.8% with all; N = 10,000:
#   100% with 512), and 1,024 channels took N = 10,000 from 52 s to 68.5 s. Weighting each
#   channel by its spread in the alignment (:func:`aligned_statistics`) gives 98.4% and 98.8%;
# - those products (the final alignment's and the Gram matrices') are in bf16 where it is native
#   (nc7, N = 10,000: still 100%, and the stage took 27.3 s instead of 31-33 s);
# - the Gram entries of both sides are kept as int8 (:func:`collect_statistics`): half the
#   memory, the largest share per image (nc7, N = 1,000: 100% and the same patch positions; on
#   nc47's N = 200 release the positions fell from 59.4% to 57.3%, so nc47 keeps float16).
# With 64 patches (2,016 entries; nc3, 2 sites x 40 images) the narrow key and the bf16 products
# each left the sites at 58-80% where the full arithmetic placed all.
SHALLOW_DEPTH = 8
SHALLOW_MIN_PATCHES = 256
SHALLOW_SELF_WIDTH = 128
DEEP_SELF_WIDTH = 512
SHALLOW_CHANNELS = 512
# Beyond SHALLOW_DEPTH the slot reference starts from the encoding, among the first
# ALIGNMENT_STARTS, whose alignment of the first START_SAMPLE the others agree with most
# (:func:`~ncbench.attacks.alignment.consensus_start`): from the first encoding, the reference
# mixed slots (nc47, N = 1,000: 92.5% of rows in a slot of one position, 99.7% from the start chosen).
# Those alignments compare START_CHANNELS channels: on ten nc47 keys the same start as all 2,048,
# in 0.6-0.9 s instead of 1.1-1.3 s.
ALIGNMENT_STARTS = 8
START_SAMPLE = 64
START_CHANNELS = 512
# ... and its alignment of every encoding leaves out the direction along which a patch's content
# moves its row in every slot (:func:`~ncbench.attacks.alignment.content_direction`), taken from the
# first CONTENT_SAMPLE encodings: rows in their position's slot on nc47-1000p 97.8% -> 100%, and
# re-identified 98.7% -> 99.1% (eight keys at N = 1,000: 67 wrong -> 57). 32 encodings and 10 steps
# gave what 64 and 20 gave (about 0.2 s instead of 0.45 s).
CONTENT_SAMPLE = 32
# Exact pairs from repeated patches replace the first matching from this many on. On a fresh nc47
# key (N = 200: 45 exact pairs) gram-hungarian went from 1.0% to 96.0% with them.
MIN_EXACT_PAIRS = 8
# The comparison with exact pairs replaces the Gram scores only where boosting ended with fewer
# mutual best pairs than this: nc47 ended at 0.375-0.5 on two fresh keys, nc7 at 0.998 (N = 1,000),
# where the Gram scores re-identify everything and the comparison would only cost time.
ANCHORED_BELOW = 0.9
# Beyond COMPARE_FIRST_BEYOND blocks and from COMPARE_FIRST_WIDTH channels, enough exact pairs
# start the comparison themselves, with no self-keyed Gram statistics and no boosting (nc47,
# N = 1,000: those took 29 s of 47 s). At width 2,048 it re-identified as many: 16 and 28 blocks at
# N = 200 and nc47 at N = 128, 100% either way, in 3.2-4.4 s instead of 6.1-7.8 s. At widths 256
# and 512 the boosted matching was the better start (nc47, N = 128-256: 1-7 points more).
COMPARE_FIRST_BEYOND = SHALLOW_DEPTH
COMPARE_FIRST_WIDTH = 2048
# The comparison started from the exact pairs stands where at least COMPARED_FIRST_ENOUGH of its
# pairs are mutual best (nc47: 0.78-0.89 at N = 1,000, 0.90-0.95 at N = 200); below, boosting
# goes on from the exact pairs (nc47 at 64 x 64 pixels and width 256: 0.19-0.5, where the
# comparison from the exact pairs alone re-identified 7-16% and from the boosted matching 27-47%).
COMPARED_FIRST_ENOUGH = 0.6
# Rows are compared by their first this many channels (a tenth of the hashing time at width 2,048):
# two different encodings that agree on 128 channels to the bit would disagree with the plaintext
# structure, and exact_pairs gives no pairs when the structures disagree.
HASHED_CHANNELS = 128
# The comparison with exact pairs (:func:`principal_matching`). Past 44 blocks an encoded row still
# says about one number about its patch: its score on the slot's first principal component (nc47,
# N = 1,000: each slot's similarities to the exact pairs cut to their leading direction
# re-identified as many as the whole profiles, 95.8% against 95.7%), and a quadratic in the
# patch's mean and spread predicts it (R^2 0.96 of what 64 self-sampled keys averaged to). Fitted
# on the matching instead of predicted by self-sampled keys, it re-identified 96.5-99.1% on four
# fresh keys at N = 1,000 where 64 averaged keys gave 93.6-97.1%; with each slot placed by the
# fit itself instead of the boosting, 97.0-99.3% on five. Fitted on the true pairs, the same one
# number left as many wrong (nc47-1000p 30, k 13, q 10): the fit was not what stopped it. A slot's
# next components carry the same patch with errors of their own; regressed on the same quadratic
# and whitened by their residual covariance within the slot (the correlated errors count once, a
# noisy component little), COMPARED_COMPONENTS = 8 took eight keys at N = 1,000 from 114 wrong to
# 67, two fresh ones from 16 and 21 to 8 each (on six keys' saved components, 8: 42 wrong against
# 77; 4: 55; 12 and 16: 58-59; the first component alone so weighted: 86).
# COMPONENT_PROBES random directions and POWER_ITERATIONS find each slot's leading components,
# SLOT_CHUNK slots at a time; the fit is ridge-regularised by COMPARISON_RIDGE of its mean
# diagonal and done again REFITS times on its own matching on the first component, then
# WHITENED_FITS times on all of them, the slots placed again each time. From the exact pairs
# straight to the whitened fit, 8 x 6 coefficients and an 8 x 8 covariance per slot from a few
# hundred pairs, left more wrong (nc47-1000k 21 against 8).
COMPONENT_PROBES = 32
POWER_ITERATIONS = 3
SLOT_CHUNK = 16
COMPARED_COMPONENTS = 8
COMPARISON_RIDGE = 1e-4
REFITS = 1
WHITENED_FITS = 2


@dataclass(frozen=True)
class Aligned:
    """One key's encodings in a common slot order: their statistics and the slot of each row."""

    statistics: PatchStatistics | None  # None when not asked
    slots: np.ndarray  # (N, P) int16: the slot each encoded row was assigned to
    reference: torch.Tensor  # (P, D) the mean encoding in slot order (first REFERENCE_IMAGES)
    hashes: np.ndarray | None = None  # (N, P, 2) int64 hashes of the encoded rows, when asked
    rows: SlotRows | None = None  # the rows themselves, when asked


class SlotRows:
    """Every encoding's rows in slot order, centred by the slot reference and scaled to unit
    length, held slot-major: (P, N, D) in ``dtype`` (16 bits: 1 GB at N = 1,000 and width 2,048),
    with their norms before scaling (N, P) and their sum over the encodings (P, D)."""

    def __init__(self, reference: torch.Tensor, n: int, dtype: torch.dtype):
        self.reference = reference
        n_slots, channels = reference.shape
        self.rows = torch.empty(n_slots, n, channels, dtype=dtype)
        self.norms = torch.empty(n, n_slots)
        self.total = torch.zeros(n_slots, channels, dtype=torch.float64)

    @classmethod
    def read(
        cls, view: Release | SiteView, aligned: Aligned, *, chunk: int, device: str, dtype: torch.dtype
    ) -> SlotRows:
        """A pass over ``view``'s encodings in ``aligned``'s slot order."""
        held = cls(aligned.reference, view.n_encoded, dtype)
        for start, block in iter_release(view, chunk, device, channels=aligned.reference.shape[1]):
            held.add(start, to_slot_order(block, aligned.slots[start : start + len(block)]))
        return held

    def add(self, start: int, in_slot_order: torch.Tensor) -> None:
        """Hold the encodings ``start``, ... given as (b, P, D) rows in slot order."""
        centred = in_slot_order.float() - self.reference
        norms = centred.norm(dim=2, keepdim=True).clamp_min(1e-12)
        unit = centred.div_(norms)
        self.rows[:, start : start + len(unit)] = unit.transpose(0, 1).cpu().to(self.rows.dtype)
        self.norms[start : start + len(unit)] = norms.squeeze(-1).cpu()
        self.total += unit.sum(0).cpu()

    def mean(self) -> torch.Tensor:
        """(P, D) the unit rows' mean over the encodings."""
        return (self.total / self.rows.shape[1]).float()

    def grams(self, chunk: int, device: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, (b, P, P)) the rows' Gram matrices, centred by the reference, as
        :func:`~ncbench.attacks.statistics.centred_grams` gives them from the encodings."""
        for start in range(0, self.rows.shape[1], chunk):
            unit = self.rows[:, start : start + chunk].to(device).float().transpose(0, 1)
            centred = unit * self.norms[start : start + chunk, :, None].to(device)
            yield start, torch.bmm(centred, centred.transpose(1, 2))


@dataclass(frozen=True)
class Boosted:
    """A boosted matching of left items (rows) to right items (columns).

    matched: (L,) right item of each left item; scores: (L, R) Gram correlations of the last
    round, or None beyond ``scores_max`` left items; slot_positions: (P,) right slot (or
    position) of each left slot; mutual_fraction: per round, the fraction of left items whose
    best partner has them as its best too; unplaced: left items the candidate shortlists could
    not place, assigned by the dense fallback; set_aside: the mutual fractions per round of the
    attempts that stalled and were not kept (:data:`STALLED_BELOW`), in the order they ran.
    """

    matched: np.ndarray
    scores: np.ndarray | None
    slot_positions: np.ndarray
    mutual_fraction: list[float]
    unplaced: int = 0
    set_aside: list[list[float]] = field(default_factory=list)


class _Attempt(NamedTuple):
    """One run of :func:`boost`'s rounds: the last round's scores, slot order, mutual fractions."""

    scores: np.ndarray
    slot_positions: np.ndarray
    history: list[float]


@dataclass(frozen=True)
class Pairing:
    """A one-to-one pairing of a ``reid`` release's encodings with its plaintext pool.

    matched: (N,) plaintext row of each encoding; scores: (N, M) float32 Gram correlations of the
    last round (or the comparison with exact pairs, :func:`principal_scores`), or None beyond
    ``scores_max`` encodings (single site); patch_positions: (N, P) original position of each encoded row;
    mutual_fraction: per boosting round (and site), the fraction of mutual best pairs;
    exact: pairs found from repeated patches (they start the boosting and are held in the final assignment);
    rematched: encodings whose plaintext the decoded thumbnails changed (then ``matched`` is no
    longer the assignment of ``scores``); set_aside: the boosting attempts that stalled and were not
    kept (:attr:`Boosted.set_aside`), of every site in turn.
    """

    matched: np.ndarray
    scores: np.ndarray | None
    patch_positions: np.ndarray
    mutual_fraction: list[float]
    unplaced: int = 0
    exact: int = 0
    rematched: int = 0
    set_aside: list[list[float]] = field(default_factory=list)


def aligned_statistics(
    view: Release | SiteView,
    attack: Attack,
    *,
    chunk: int,
    hashes: bool = False,
    channels: int | None = None,
    dtype: torch.dtype = torch.float32,
    weighted: bool = False,
    starts: int = 1,
    storage=np.float16,
    on_rows: Callable[[int, torch.Tensor], None] | None = None,
    on_reference_rows: Callable[[int, torch.Tensor], None] | None = None,
    grams: bool = True,
    hold: torch.dtype | None = None,
    content_out: bool = False,
) -> Aligned:
    """Undo the shuffles of one key's encodings and take their patch statistics (two passes), on
    their first ``channels`` channels (all when None), with the products of the final alignment
    and of the Gram matrices in ``dtype``, the Gram entries stored as ``storage``
    (:func:`collect_statistics`); ``hashes``: also hash every encoded row's first
    :data:`HASHED_CHANNELS` channels (:func:`attacks.duplicates.row_hashes`).

    ``weighted``: the final alignment divides each channel by its spread around the slot means,
    so a row goes to the nearest slot mean under a pooled diagonal covariance (linear discriminant
    analysis) instead of the plain Euclidean distance. ``starts``: the reference starts from the
    one of the first that many encodings that the others agree with most (:func:`consensus_start`),
    else from the first. ``on_rows(start, rows)``: called with each block of rows the final pass
    reads ((b, P, channels) float32, release order); ``on_reference_rows(start, rows)``: with each
    block of the first encodings the slot reference is the mean of (the same, in the reference's
    slot order). ``grams``: take the statistics (else
    ``statistics`` is None); ``hold``: also hold the rows in slot order as :class:`SlotRows` of that dtype.
    ``content_out``: the final alignment compares rows and reference with their leading direction
    around the slot means projected out (:func:`~ncbench.attacks.alignment.content_direction`)."""
    n = view.n_encoded
    moments = dict(chunk=chunk, device=attack.device, limit=REFERENCE_IMAGES, channels=channels)
    with attack.stage("slot reference", min(n, REFERENCE_IMAGES) * (1 + weighted)) as advance:
        start = 0
        if starts > 1 and view.config.shuffle:
            start = consensus_start(
                view,
                candidates=starts,
                sample=START_SAMPLE,
                channels=min(channels or START_CHANNELS, START_CHANNELS),
                device=attack.device,
            )
        against = torch.from_numpy(view.encoded_rows([start], channels=channels)[0]).to(attack.device)
        reference = slot_moments(view, advance=advance, against=against, on_block=on_reference_rows, **moments)[0]
        weight = None
        if weighted:  # the spread around slots assigned by the reference, far less noisy than one encoding
            spread = slot_moments(view, advance=advance, against=reference, **moments)[1]
            weight = 1 / spread.clamp_min(1e-3 * spread.mean())
        direction = None
        if content_out and view.config.shuffle:
            direction = content_direction(
                view, reference, sample=CONTENT_SAMPLE, channels=channels, device=attack.device
            )
    weighted_reference = reference if weight is None else reference * weight
    if direction is not None:
        weighted_reference = without(weighted_reference, direction)
    n_patches = view.config.n_patches
    slots = np.empty((n, n_patches), np.int16)  # 512 bytes an image
    row_hash = np.empty((n, n_patches, 2), np.int64) if hashes else None
    held = SlotRows(reference, n, hold) if hold is not None else None

    def aligned_blocks():
        for start, block in iter_release(view, chunk, attack.device, channels=channels):
            if on_rows is not None:
                on_rows(start, block)
            scaled = block if weight is None else block * weight
            if direction is not None:
                scaled = without(scaled, direction)
            block_slots, _ = align(scaled, weighted_reference, shuffle=view.config.shuffle, dtype=dtype)
            slots[start : start + len(block)] = block_slots
            if row_hash is not None:
                row_hash[start : start + len(block)] = row_hashes(block[..., :HASHED_CHANNELS].cpu())
            in_slot_order = to_slot_order(block, block_slots) if view.config.shuffle else block
            if held is not None:
                held.add(start, in_slot_order)
            yield start, in_slot_order

    statistics = None
    with attack.stage("align + encoded statistics" if grams else "align", n):
        if grams:
            blocks = ((start, centred_grams(block, reference, dtype=dtype)) for start, block in aligned_blocks())
            statistics = collect_statistics(blocks, n, n_patches, storage=storage)
        else:
            for _ in aligned_blocks():  # the slots, hashes and held rows only
                pass
    return Aligned(statistics, slots, reference, row_hash, held)


def slot_components(held: SlotRows, *, device: str, rng: np.random.Generator) -> torch.Tensor:
    """(N, P, K) each encoding's scores on the :data:`COMPARED_COMPONENTS` leading principal
    components of its slot, largest first: the ``held`` unit rows, centred over the encodings (K
    principal directions per slot, their signs arbitrary).

    Each slot's components are found by subspace iteration (Halko et al. 2011):
    :data:`COMPONENT_PROBES` random directions, :data:`POWER_ITERATIONS` products with the rows
    and their transpose, then the leading singular pairs of the rows projected on that basis. The
    first component holds only a few percent of a slot's variance at nc47, so a single random
    sketch (or a random projection of the channels) would not find it; the iterations do. The
    rows are centred inside the products ((X - 1 m^T) V = X V - 1 m^T V), which run in bf16
    where the rows are held so, else in fp32. :data:`SLOT_CHUNK` slots at a time go through every
    iteration, so 16-bit rows are converted to fp32 once, not once per product.
    """
    rows, means = held.rows, held.mean()
    dtype = rows.dtype if rows.dtype == torch.bfloat16 else torch.float32
    probes = torch.from_numpy(rng.standard_normal((rows.shape[2], COMPONENT_PROBES), dtype=np.float32)).to(device)
    scores = [
        _leading_scores(
            rows[first : first + SLOT_CHUNK].to(device=device, dtype=dtype),
            means[first : first + SLOT_CHUNK].to(device),
            probes,
        ).cpu()
        for first in range(0, rows.shape[0], SLOT_CHUNK)
    ]
    return torch.cat(scores).transpose(0, 1)


def _leading_scores(rows: torch.Tensor, mean: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """(p, N, K) scores of ``rows`` (p, N, D) minus their ``mean`` (p, D) on their K leading
    principal components, from the random ``probes`` (D, k) (:func:`slot_components`)."""

    def times(directions: torch.Tensor) -> torch.Tensor:  # (p, D, k) -> (p, N, k)
        return (rows @ directions.to(rows.dtype)).float() - mean.unsqueeze(1) @ directions

    def transposed_times(basis: torch.Tensor) -> torch.Tensor:  # (p, N, k) -> (p, D, k)
        return (rows.transpose(1, 2) @ basis.to(rows.dtype)).float() - mean.unsqueeze(2) * basis.sum(1, keepdim=True)

    basis = torch.linalg.qr(times(probes.expand(len(rows), -1, -1))).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(times(transposed_times(basis))).Q
    # The rows ~ basis (basis^T rows) = basis W S V^T: the leading components' scores are basis W[:, :K] S[:K].
    left, singular, _ = torch.linalg.svd(transposed_times(basis).transpose(1, 2), full_matrices=False)
    return basis @ (left[:, :, :COMPARED_COMPONENTS] * singular[:, None, :COMPARED_COMPONENTS])


def patch_moments(images: np.ndarray, config: EncoderConfig, *, chunk: int = 256) -> torch.Tensor:
    """(M, P, 6) a quadratic in each plaintext patch's mean a and spread b (each standardised over
    all patches): 1, a, b, a^2, b^2, ab. Normalised as the encoder's input, ``chunk`` images at a time."""
    moments = torch.empty(len(images), config.n_patches, 2)
    for start in range(0, len(images), chunk):
        patches = images_to_patches(torch.from_numpy(np.asarray(images[start : start + chunk])), config)
        moments[start : start + len(patches)] = torch.stack([patches.mean(2), patches.std(2)], -1)
    moments = (moments - moments.mean((0, 1))) / moments.std((0, 1)).clamp_min(1e-12)
    mean, spread = moments.unbind(-1)
    return torch.stack([torch.ones_like(mean), mean, spread, mean * mean, spread * spread, mean * spread], -1)


def principal_scores(
    components: torch.Tensor,
    moments: torch.Tensor,
    slot_positions: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray],
    *,
    ridge: float = COMPARISON_RIDGE,
    whiten: bool = True,
) -> np.ndarray:
    """(N, M) correlation, over the slots and their components, of each encoding's whitened
    ``components`` (N, P, K) with each plaintext's whitened prediction of them (as they are where
    not ``whiten``).

    Per slot s, a ridge regression of the encodings' K components on the ``moments`` (M, P, F) of
    their partners' patch at s's position (``slot_positions`` (P,)), fitted on ``pairs``
    (encodings, plaintexts), ``ridge`` times the mean diagonal; the components and their
    predictions are then multiplied by a square root of the inverse of the fit's K x K residual
    covariance over the pairs, so that each slot counts as a Gaussian likelihood would weigh it
    and the components' correlated errors count once."""
    rows, columns = (torch.as_tensor(np.asarray(side, np.int64)) for side in pairs)
    in_slot_order = moments[:, torch.as_tensor(np.asarray(slot_positions, np.int64))].double()  # (M, P, F)
    features = in_slot_order[columns].transpose(0, 1)  # (P, pairs, F)
    targets = components[rows].transpose(0, 1).double()  # (P, pairs, K)
    gram = features.transpose(1, 2) @ features
    penalty = ridge * gram.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(gram.shape[-1])
    coefficients = torch.linalg.solve(gram + penalty, features.transpose(1, 2) @ targets)  # (P, F, K)
    encoded = components.double()  # (N, P, K)
    predicted = torch.einsum("mpf,pfk->mpk", in_slot_order, coefficients)  # (M, P, K)
    if whiten:
        residuals = targets - features @ coefficients
        covariance = residuals.transpose(1, 2) @ residuals / len(rows)
        floor = 1e-9 * covariance.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-30)
        whitening = torch.linalg.cholesky(torch.linalg.inv(covariance + floor * torch.eye(covariance.shape[-1])))
        encoded = torch.einsum("npk,pkl->npl", encoded, whitening)
        predicted = torch.einsum("mpk,pkl->mpl", predicted, whitening)
    return (standardise_rows(encoded.flatten(1)) @ standardise_rows(predicted.flatten(1)).T).float().numpy()


def place_slots(components: torch.Tensor, moments: torch.Tensor, pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(P,) the position of each slot: the one whose plaintext ``moments`` (M, P, F) best fit
    (R^2 of a least-squares fit) the slot's first component (``components`` (N, P, K)) over
    ``pairs`` (encodings, plaintexts), one assignment of slots to positions maximising the total."""
    rows, columns = (torch.as_tensor(np.asarray(side, np.int64)) for side in pairs)
    basis = torch.linalg.qr(moments[columns].transpose(0, 1).double()).Q  # (positions, pairs, F)
    targets = components[rows, :, 0].double()
    targets = targets - targets.mean(0)
    explained = torch.einsum("qnf,ns->sqf", basis, targets).square().sum(-1)  # (slots, positions)
    return match((explained / targets.square().sum(0).clamp_min(1e-30)[:, None]).numpy())


def principal_matching(
    components: torch.Tensor,
    moments: torch.Tensor,
    exact: tuple[np.ndarray, np.ndarray],
    start: np.ndarray | None = None,
    positions: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The comparison with exact pairs: (N, M) :func:`principal_scores` of the encodings'
    ``components`` (:func:`slot_components`) and the plaintexts' ``moments``
    (:func:`patch_moments`); fitted first on the ``exact`` pairs (put into the matching ``start``
    (N,) when given), then :data:`REFITS` times on its own matching, on each slot's first
    component as it is; then :data:`WHITENED_FITS` times on its own matching, on all of them
    whitened. Each fit places the slots by :func:`place_slots` on the pairs it is fitted on,
    except the first where slot ``positions`` (P,) are given. Returns the last scores, their
    matching (the exact pairs held) and the slot positions it was fitted at.

    After boosting, its slot positions start the fit: on nine small nc47 test releases (48-512
    images, widths 256-512) 2.2 points more on average than placing the slots on the boosted
    matching (from -2.5 to +7.8)."""
    pairs = exact
    if start is not None:
        partners = np.array(start, copy=True)
        partners[exact[0]] = exact[1]
        pairs = (np.arange(len(partners)), partners)
    for fit in range(REFITS + 1 + WHITENED_FITS):
        if positions is None or fit > 0:
            positions = place_slots(components, moments, pairs)
        whiten = fit > REFITS
        scores = principal_scores(
            components if whiten else components[..., :1], moments, positions, pairs, whiten=whiten
        )
        matched = match_with_pairs(scores, exact)
        pairs = (np.arange(len(matched)), matched)
    return scores, matched, positions


def find_exact_pairs(aligned: Aligned, plain_images: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (encoding, plaintext) pairs from the rows repeated within the encodings (hashed in
    ``aligned``) and the (position, patch) pairs repeated within ``plain_images``
    (:mod:`attacks.duplicates`)."""
    left = shared_groups(aligned.hashes)
    right = shared_groups(patch_hashes(plain_images, patch_size))
    return exact_pairs(left, right, len(aligned.slots), len(plain_images))


def mutual_best(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the pairs that are each other's best: row i's best column j has i as
    its best row."""
    best_column = scores.argmax(1)
    rows = np.flatnonzero(scores.argmax(0)[best_column] == np.arange(len(scores)))
    return rows, best_column[rows]


def trusted_pairs(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs a boosting round recovers the slot order from: an assignment of every row up to
    :data:`ASSIGN_MAX` rows and columns, the mutual best pairs beyond. An assignment on noisy first-round
    scores costs 0.8 s at N = 1,000 but minutes at 10,000, and the slot order needs only pairs
    that are right more often than chance (nc7, N = 1,000: mutual best pairs of the first round,
    3% of them right, already give 93.6% after one round, 100% after two)."""
    if max(scores.shape) <= ASSIGN_MAX:
        return np.arange(len(scores)), match(scores)
    return mutual_best(scores)


def boost(
    left: PatchStatistics,
    right: PatchStatistics | SampledStatistics,
    scores: np.ndarray | None,
    *,
    rounds: int,
    refine_pairs: int,
    rng: np.random.Generator,
    shuffle: bool = True,
    trusted: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] = trusted_pairs,
    advance: Callable[[int], None] = lambda k: None,
    assign_max: int = ASSIGN_MAX,
    candidates: int = CANDIDATES,
    scores_max: int = SCORES_MAX,
    device: str = "cpu",
    first_pairs: tuple[np.ndarray, np.ndarray] | None = None,
    exact_final: bool = True,
) -> Boosted:
    """From first-round ``scores`` (L, R), up to ``rounds`` times: recover the slot permutation
    from the pairs ``trusted(scores)`` picks (rows, columns), and compare Gram matrices in that
    order (``first_pairs`` instead of ``trusted(scores)`` in the first round: then ``scores``
    may be None); stop after two rounds once a round raises the fraction of mutual best pairs by less than
    :data:`CONVERGED`. One assignment on the last round's scores gives the matching.

    Beyond ``assign_max`` left items the rounds score a fixed random sample of that many
    against every right item, in bf16 where it is native (the slot order needs pairs, not all of
    them, and the mutual fractions are the sample's); the final comparison keeps each left item's
    ``candidates`` best right items, exact in fp32 (:meth:`GramComparison.shortlist`), and a
    sparse assignment on those shortlists gives the matching (:func:`match_shortlists`): no
    N x N assignment, and the (L, R) scores are kept only up to ``scores_max`` left items.
    Rounds on a sample that end under :data:`STALLED_BELOW` mutual best pairs start again from
    the first pairs on another sample (:data:`BOOST_RESTARTS`), keeping the best attempt.
    ``right`` may be :class:`SampledStatistics` only beyond ``assign_max`` left items.
    ``exact_final=False``: the final shortlists keep their rough values (:meth:`GramComparison.shortlist`).
    """
    comparison = GramComparison(left, right, device=device)
    n_left = len(left.norms)
    sample = np.sort(rng.permutation(n_left)[:assign_max]) if n_left > assign_max else None
    first_scores = scores

    def rounds_from(sample: np.ndarray | None, advance: Callable[[int], None]):
        scores_, slot_positions = first_scores, np.arange(left.norms.shape[1])
        scored = np.arange(n_left)  # the left items the rows of ``scores_`` are
        history: list[float] = []
        for round_ in range(rounds):
            if shuffle:
                rows, partners = first_pairs if round_ == 0 and first_pairs is not None else trusted(scores_)
                slot_positions = _slot_positions(left, right, scored[rows], partners, rng, refine_pairs)
            if sample is not None:
                scored = sample
            scores_ = comparison.scores(slot_positions, subset=sample, rough=sample is not None)
            history.append(len(mutual_best(scores_)[0]) / len(scores_))
            advance(1)
            if not shuffle or (len(history) >= 2 and history[-1] - history[-2] < CONVERGED):
                break
        return _Attempt(scores_, slot_positions, history)

    kept, set_aside = rounds_from(sample, advance), []
    for _ in range(BOOST_RESTARTS if sample is not None and shuffle else 0):
        if kept.history[-1] >= STALLED_BELOW:
            break
        again = rounds_from(np.sort(rng.permutation(n_left)[:assign_max]), lambda k: None)
        if again.history[-1] > kept.history[-1]:
            kept, again = again, kept
        set_aside.append(again.history)
        del again  # its scores of the sample, (assign_max, R)
    scores, slot_positions, history = kept
    del kept
    if sample is None:
        return Boosted(match(scores), scores.astype(np.float32, copy=False), slot_positions, history)
    del scores
    final = comparison.shortlist(
        slot_positions, candidates=candidates, keep_scores=n_left <= scores_max, exact=exact_final
    )
    matched = match_shortlists(final.columns, final.values, len(right.norms))
    unplaced = np.flatnonzero(matched < 0)
    if len(unplaced):
        # Exact dense assignment only where the shortlists cannot place everyone: the unplaced
        # rows against the columns nobody took.
        # (Rough against sampled plaintext statistics, which hold no whole Gram rows.)
        free = np.setdiff1d(np.arange(len(right.norms)), matched[matched >= 0])
        left_over = comparison.scores(slot_positions, subset=unplaced, columns=free, rough=comparison.sampled)
        matched[unplaced] = free[match(left_over)]
    return Boosted(matched, final.scores, slot_positions, history, unplaced=len(unplaced), set_aside=set_aside)


def cheap_statistics(config: EncoderConfig) -> bool:
    """Whether a release's Gram statistics survive a narrow self-keyed encoder, a subset of the
    channels and bf16 products (:data:`SHALLOW_DEPTH`, :data:`SHALLOW_MIN_PATCHES`)."""
    return config.depth <= SHALLOW_DEPTH and config.n_patches >= SHALLOW_MIN_PATCHES


def statistics_widths(config: EncoderConfig, *, self_width: int = 0, channels: int = 0) -> tuple[int, int]:
    """(self-keyed width, encoding channels) of the Gram statistics for a release of ``config``:
    those given, or where 0, what it affords (:func:`cheap_statistics`)."""
    cheap = cheap_statistics(config)
    self_width = self_width or (SHALLOW_SELF_WIDTH if cheap else DEEP_SELF_WIDTH)
    channels = channels or (SHALLOW_CHANNELS if cheap else config.width)
    return self_width, min(channels, config.width)


def gram_pairing(
    release: Release,
    attack: Attack,
    *,
    chunk: int,
    self_width: int = 0,
    channels: int = 0,
    boost_rounds: int = BOOST_ROUNDS,
    refine_pairs: int = REFINE_PAIRS,
    insider_key: str = "",
    assign_max: int = ASSIGN_MAX,
    candidates: int = CANDIDATES,
    scores_max: int = SCORES_MAX,
    duplicates: bool = True,
    held_max: int = HELD_MAX,
    decode_pairs: int = DECODE_PAIRS,
    decode_from: int = DECODE_FROM,
) -> Pairing:
    """Pair every encoding of ``release`` with a plaintext; stages and randomness come from
    ``attack`` (its progress, stage times, device, seed).

    ``duplicates``: on a release of one site and at most ``assign_max`` encodings, when there are
    at least :data:`MIN_EXACT_PAIRS` exact pairs of repeated patches (:func:`find_exact_pairs`):
    start from them and hold them in the final assignment. Beyond :data:`COMPARE_FIRST_BEYOND`
    blocks and from :data:`COMPARE_FIRST_WIDTH` channels, they start the comparison of each slot's
    leading principal components with their prediction from the plaintexts' patches
    (:func:`principal_matching`), with no self-keyed statistics and no boosting, unless under
    :data:`COMPARED_FIRST_ENOUGH` of its pairs are mutual best; otherwise they start the boosting,
    and where it ends under :data:`ANCHORED_BELOW` mutual best pairs the comparison starts from
    its matching with the exact pairs put in.

    A release of several sites is attacked site by site (each key has its own slot order), every
    site against the whole pool; one assignment over the stacked scores then keeps the pairing
    one-to-one across sites. ``insider_key``: a site key file (another hospital's key) that
    encodes the plaintexts instead of a self-sampled key. ``self_width`` and ``channels``: see
    :func:`statistics_widths`. ``assign_max``, ``candidates`` and ``scores_max``: see
    :func:`boost` (a release of several sites keeps every score, to stack them). ``held_max``:
    beyond that many plaintexts (one site, beyond ``assign_max`` encodings) the plaintexts' Gram
    matrices are not held but computed again where they are needed (:class:`SampledStatistics`).
    ``decode_pairs``: on one site of at least ``decode_from`` encodings, up to
    :data:`SHALLOW_DEPTH` blocks (where a ridge map still decodes), re-match by thumbnails decoded
    with a ridge map fitted on that many of the matching's pairs (:func:`rematch_by_decoding`),
    from the alignment's rows where they fit :data:`~ncbench.attacks.decoding.HELD_ROWS_BYTES`
    (:class:`~ncbench.attacks.decoding.HeldRows`), else from a second pass; 0: never.
    """
    # Without the positional embedding (``mix``) a patch encodes alike at every position, so
    # repeated rows would not say where: no exact pairs there.
    look_for_pairs = duplicates and release.config.mix and release.n_sites == 1 and release.n_encoded <= assign_max
    # The exact pairs and the comparison read the pool's images again: held then. Where the pool's
    # self-keyed statistics are taken, it is encoded and reduced a batch at a time.
    plain_images = release.plain_pool[:] if look_for_pairs else release.plain_pool
    sampled = release.n_sites == 1 and release.n_encoded > assign_max and len(plain_images) > held_max
    shallow = release.config.depth <= SHALLOW_DEPTH
    decoding = decode_pairs > 0 and release.n_sites == 1 and release.n_encoded >= decode_from and shallow
    pool_thumbnails = PoolThumbnails(len(plain_images), release.config) if decoding else None
    self_width, channels = statistics_widths(release.config, self_width=self_width, channels=channels)
    # The encodings reach the page cache while the pool is encoded, where every stored byte of
    # them is read: of a release that stores its channels in blocks, a prefetch would read the
    # blocks not asked for too, and the blocks asked for read as fast cold as warm.
    if channels >= release.config.width or release.encoded.chunks[-1] >= release.config.width:
        prefetch(release.path)
    held_rows = HeldRows(release, channels) if decoding and HeldRows.fits(release, channels) else None
    cheap = cheap_statistics(release.config)
    products_dtype = matmul_dtype(attack.device) if cheap else torch.float32
    storage = np.int8 if cheap else np.float16
    insider = insider_encoder(insider_key, release.config, device=attack.device) if insider_key else None

    def encode_plain(
        seed: int,
        encoder=None,
        advance=lambda k: None,
        *,
        images=None,
        on_images=None,
    ):
        return self_encode(
            plain_images if images is None else images,
            release.config,
            width=self_width,
            seed=seed,
            device=attack.device,
            advance=advance,
            encoder=encoder,
            bf16_activations=shallow,
            mean_images=POOL_MEAN_IMAGES,
            on_images=on_images,
        )

    def recompute_plain(rows: np.ndarray | None):  # see SampledStatistics
        images = plain_images if rows is None else plain_images.take(rows)
        blocks, _ = encode_plain(attack.seed, insider, images=images)
        for start, block in blocks:
            yield start, unit_entries(centred_grams(block, mean, dtype=products_dtype))[1]

    def plaintext_statistics() -> PatchStatistics | SampledStatistics:
        nonlocal mean
        with attack.stage("self-keyed plaintext statistics", len(plain_images)) as advance:
            on_images = pool_thumbnails.add if pool_thumbnails is not None else None  # the decoding's, from this read
            features, mean = encode_plain(attack.seed, insider, advance, on_images=on_images)
            if sampled:
                grams = ((start, centred_grams(block, mean, dtype=products_dtype)) for start, block in features)
                size = (len(plain_images), release.config.n_patches)
                return sampled_statistics(grams, *size, dtype=matmul_dtype(attack.device), recompute=recompute_plain)
            return patch_statistics(features, mean, len(plain_images), dtype=products_dtype, storage=storage)

    compare_first = (
        look_for_pairs and release.config.depth > COMPARE_FIRST_BEYOND and release.config.width >= COMPARE_FIRST_WIDTH
    )

    # At depth the comparison will run: the alignment holds the rows it needs, 16 bits each.
    held_dtype = torch.bfloat16 if matmul_dtype(attack.device) == torch.bfloat16 else torch.float16
    hold = held_dtype if look_for_pairs and not shallow else None

    def principal_inputs(view: Release | SiteView, aligned: Aligned) -> tuple[torch.Tensor, torch.Tensor]:
        with attack.stage("slot principal components"):
            held = aligned.rows
            if held is None:
                held = SlotRows.read(view, aligned, chunk=chunk, device=attack.device, dtype=held_dtype)
            components = slot_components(held, device=attack.device, rng=attack.rng("components"))
            return components, patch_moments(plain_images, release.config)

    mean = None
    plain = None if compare_first else plaintext_statistics()
    sites = release.sites
    several = release.n_sites > 1
    keep_scores = several or release.n_encoded <= scores_max
    scores = np.empty((release.n_encoded, len(plain_images)), np.float32) if keep_scores else None
    positions = np.empty((release.n_encoded, release.config.n_patches), np.int16)
    history: list[float] = []
    set_aside: list[list[float]] = []
    unplaced = 0
    refine_rng = attack.rng("refine")
    exact = (np.empty(0, np.int64),) * 2
    for site in range(release.n_sites):
        view = release.site(site) if release.n_sites > 1 else release
        rows = np.flatnonzero(sites == site)
        aligned = aligned_statistics(
            view,
            attack,
            chunk=chunk,
            hashes=look_for_pairs,
            channels=channels,
            dtype=products_dtype,
            weighted=cheap and release.config.shuffle,
            starts=1 if shallow else ALIGNMENT_STARTS,
            content_out=not shallow,
            storage=storage,
            on_rows=held_rows.add if held_rows is not None else None,  # the decoding's, from this read
            grams=not compare_first,
            hold=hold,
        )
        first, first_pairs = None, None
        if look_for_pairs:
            with attack.stage("exact pairs from repeated patches"):
                exact = find_exact_pairs(aligned, plain_images, release.config.patch_size)
        enough_pairs = len(exact[0]) >= MIN_EXACT_PAIRS
        boosted, principal = None, None
        if enough_pairs and compare_first:
            principal = principal_inputs(view, aligned)
            with attack.stage("compare principal components fitted on exact pairs"):
                final, matched, slot_positions = principal_matching(*principal, exact)
            if len(mutual_best(final)[0]) >= COMPARED_FIRST_ENOUGH * len(final):
                boosted = Boosted(matched, final, slot_positions, [])
        if boosted is None:
            if plain is None:
                plain = plaintext_statistics()
            if aligned.statistics is None:  # the comparison did not stand: the Gram statistics from the held rows
                grams = aligned.rows.grams(chunk, attack.device)
                aligned = replace(
                    aligned,
                    statistics=collect_statistics(grams, view.n_encoded, release.config.n_patches, storage=storage),
                )
            if enough_pairs:
                first_pairs = exact
            else:
                with attack.stage("match sorted norms"):
                    if len(rows) > assign_max:  # the first round keeps mutual best pairs only
                        first_pairs = sorted_norm_mutual_best(aligned.statistics, plain)
                    else:
                        first = sorted_norm_scores(aligned.statistics, plain)
            with attack.stage("boost", boost_rounds) as advance:
                boosted = boost(
                    aligned.statistics,
                    plain,
                    first,
                    first_pairs=first_pairs,
                    rounds=boost_rounds,
                    refine_pairs=refine_pairs,
                    rng=refine_rng,
                    shuffle=release.config.shuffle,
                    advance=advance,
                    assign_max=assign_max,
                    candidates=candidates,
                    scores_max=release.n_encoded if several else scores_max,
                    device=attack.device,
                    exact_final=not decoding,  # the decoded thumbnails decide the matching then
                )
            if enough_pairs and boosted.mutual_fraction[-1] < ANCHORED_BELOW:
                if principal is None:
                    principal = principal_inputs(view, aligned)
                with attack.stage("compare principal components fitted on the matching"):
                    final, matched, slot_positions = principal_matching(
                        *principal, exact, boosted.matched, boosted.slot_positions
                    )
                boosted = replace(boosted, matched=matched, scores=final, slot_positions=slot_positions)
            elif enough_pairs:
                boosted = replace(boosted, matched=match_with_pairs(boosted.scores, exact))
        if scores is not None:
            scores[rows] = boosted.scores
        positions[rows] = boosted.slot_positions[aligned.slots]
        history += boosted.mutual_fraction
        set_aside += boosted.set_aside
        unplaced += boosted.unplaced
    matched = match(scores) if several else boosted.matched
    rematched = 0
    if decoding:
        del aligned, plain  # the Gram statistics: 3.2 GB and 0.9 GB at N = 100,000
        thumbs = pool_thumbnails.thumbnails()
        del pool_thumbnails  # their pixel sums: 820 MB at 100,000
        with attack.stage("re-match by decoded thumbnails", release.n_encoded) as advance:
            decoded = rematch_by_decoding(
                release if held_rows is None else held_rows,
                thumbs,
                matched,
                positions,
                channels=channels,
                chunk=chunk,
                device=attack.device,
                rng=attack.rng("decode"),
                pairs=decode_pairs,
                advance=advance,
            )
        rematched = int(np.sum(decoded != matched))
        matched = decoded
    return Pairing(
        matched, scores, positions, history, unplaced, exact=len(exact[0]), rematched=rematched, set_aside=set_aside
    )


def match_with_pairs(scores: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """:func:`match` on ``scores`` with the given (rows, columns) pairs held."""
    held = np.asarray(scores, np.float64).copy()
    rows, columns = pairs
    held[rows] = -np.inf
    held[:, columns] = -np.inf
    held[rows, columns] = 0
    held[~np.isfinite(held)] = np.nanmin(held[np.isfinite(held)], initial=0) - 1e6
    return match(held)


def _slot_positions(
    left: PatchStatistics,
    right: PatchStatistics | SampledStatistics,
    rows: np.ndarray,
    partners: np.ndarray,
    rng: np.random.Generator,
    refine_pairs: int,
) -> np.ndarray:
    """Boosting step: slot -> position permutation from matched pairs (left ``rows`` with right
    ``partners``): norm correlation over all of them, refined on the Gram matrices of a random
    subset."""
    slot_positions = recover_slot_positions(left.norms[rows], right.norms[partners])
    subset = np.sort(rng.permutation(len(rows))[:refine_pairs])
    return refine_slot_positions(left.full_grams(rows[subset]), right.full_grams(partners[subset]), slot_positions)
