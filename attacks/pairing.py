"""The Gram pairing that ``gram-hungarian`` submits and ``linear-inversion`` fits on.

1. undo each image's patch shuffle by assignment against a reference (:mod:`attacks.alignment`);
2. per image, the Gram matrix of its slot-centred, unit-normalised patches (P x P), and the same
   for every plaintext encoded with a self-sampled key of the public architecture (at a smaller
   width: the kernel, not the key, is what matters);
3. first matching on a shuffle-invariant statistic (each image's sorted patch norms);
4. boost: recover the global slot -> position permutation from the matched pairs, compare the
   Gram matrices in that order, re-solve the N x N assignment; repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ncbench.assignment import match
from ncbench.attacks.alignment import (
    iter_aligned,
    recover_slot_positions,
    refine_slot_positions,
    slot_reference,
)
from ncbench.attacks.base import Attack
from ncbench.attacks.self_keyed import self_encode
from ncbench.attacks.statistics import (
    PatchStatistics,
    gram_scores,
    patch_statistics,
    sorted_norm_scores,
)
from ncbench.challenge.files import Release

BOOST_ROUNDS = 2  # the second round rarely changes a pair on nc3 / nc7 (stable_fraction ~1)
REFINE_PAIRS = 256  # matched pairs whose Gram matrices refine the slot permutation


@dataclass(frozen=True)
class Pairing:
    """A one-to-one pairing of a ``reid`` release's encodings with its plaintext pool.

    matched: (N,) plaintext row of each encoding; scores: (N, M) float32 Gram correlations of the
    last round; patch_positions: (N, P) original position of each encoded row;
    stable_fraction: per boosting round, the fraction of pairs the round left unchanged.
    """

    matched: np.ndarray
    scores: np.ndarray
    patch_positions: np.ndarray
    stable_fraction: list[float]


def gram_pairing(
    release: Release,
    attack: Attack,
    *,
    self_width: int,
    chunk: int,
    boost_rounds: int = BOOST_ROUNDS,
    refine_pairs: int = REFINE_PAIRS,
) -> Pairing:
    """Pair every encoding of ``release`` with a plaintext; stages and randomness come from
    ``attack`` (its progress, stage times, device, seed)."""
    n = release.n_encoded
    with attack.stage("slot reference", n) as advance:
        reference = slot_reference(release, chunk=chunk, device=attack.device, advance=advance)
    slots = np.empty((n, release.config.n_patches), np.int64)

    def aligned_blocks():
        for start, block_slots, block in iter_aligned(release, reference, chunk=chunk, device=attack.device):
            slots[start : start + len(block)] = block_slots
            yield start, block

    with attack.stage("align + encoded statistics", n):
        encoded = patch_statistics(aligned_blocks(), reference, n)
    plain_images = release.plain_images
    with attack.stage("self-keyed plaintext statistics", len(plain_images)) as advance:
        features, mean = self_encode(
            plain_images, release.config, width=self_width, seed=attack.seed, device=attack.device, advance=advance
        )
        plain = patch_statistics(features, mean, len(plain_images))
    history = []
    with attack.stage("match sorted norms"):
        matched = match(sorted_norm_scores(encoded, plain))
    refine_rng = attack.rng("refine")
    with attack.stage("boost", boost_rounds) as advance:
        for _ in range(boost_rounds):
            slot_positions = (
                _slot_positions(encoded, plain, matched, refine_rng, refine_pairs)
                if release.config.shuffle
                else np.arange(len(reference))
            )
            scores = gram_scores(encoded, plain, slot_positions)
            previous, matched = matched, match(scores)
            history.append(float((previous == matched).mean()))
            advance(1)
    return Pairing(matched, scores.astype(np.float32), slot_positions[slots], history)


def _slot_positions(
    encoded: PatchStatistics, plain: PatchStatistics, matched: np.ndarray, rng: np.random.Generator, refine_pairs: int
) -> np.ndarray:
    """Boosting step: slot -> position permutation from the current matching (norm correlation
    over all pairs, refined on the Gram matrices of a random subset of pairs)."""
    slot_positions = recover_slot_positions(encoded.norms, plain.norms[matched])
    subset = np.sort(rng.permutation(len(matched))[:refine_pairs])
    return refine_slot_positions(encoded.full_grams(subset), plain.full_grams(matched[subset]), slot_positions)
