"""``gram-hungarian``: re-identify NeuraCrypt encodings by Gram statistics and assignment solvers.

Carlini et al. (2021) broke the challenge with learned patch similarity networks; here plain
statistics suffice, because wide random ReLU networks nearly preserve the kernel (geometry) of
their inputs whatever the key:

1. undo each image's patch shuffle by assignment against a reference (:mod:`attacks.alignment`);
2. per image, the Gram matrix of its slot-centred, unit-normalised patches (P x P), and the same
   for every plaintext encoded with a self-sampled key of the public architecture (at a smaller
   width: the kernel, not the key, is what matters);
3. first matching on a shuffle-invariant statistic (each image's sorted patch norms);
4. boost: recover the global slot -> position permutation from the matched pairs, compare the
   Gram matrices in that order, re-solve the N x N assignment; repeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from attacks.alignment import iter_aligned, match, recover_slot_positions, refine_slot_positions, slot_reference
from attacks.base import Attack
from attacks.self_keyed import self_encode
from attacks.submission import Submission
from challenge.files import Release


@dataclass(frozen=True)
class PatchStatistics:
    """Per-image statistics of slot-centred patches.

    norms: (N, P) float32 centred patch norms; gram: (N, P(P-1)/2) float16, the upper triangle
    of the Gram matrix of the centred, unit-normalised patches.
    """

    norms: np.ndarray
    gram: np.ndarray

    def full_grams(self, rows=slice(None)) -> torch.Tensor:
        """(K, P, P) symmetric Gram matrices of the selected images, rebuilt from the upper triangle."""
        return self._symmetric(torch.from_numpy(self.gram[rows]).float())

    def mean_gram(self) -> torch.Tensor:
        """(1, P, P) the population's mean Gram matrix."""
        return self._symmetric(torch.from_numpy(self.gram.mean(0, dtype=np.float32))[None])

    def _symmetric(self, values: torch.Tensor) -> torch.Tensor:
        n_patches = self.norms.shape[1]
        upper = torch.triu_indices(n_patches, n_patches, 1)
        full = torch.zeros(len(values), n_patches, n_patches)
        full[:, upper[0], upper[1]] = values
        full[:, upper[1], upper[0]] = values
        return full


def patch_statistics(blocks, mean: torch.Tensor, n: int) -> PatchStatistics:
    """Statistics of ``n`` images given as blocks (start, (b, P, D) in slot/position order)."""
    n_patches = mean.shape[0]
    upper = torch.triu_indices(n_patches, n_patches, 1, device=mean.device)
    norms = np.empty((n, n_patches), np.float32)
    gram = np.empty((n, upper.shape[1]), np.float16)
    for start, block in blocks:
        centred = block.float() - mean
        block_norms = centred.norm(dim=2, keepdim=True)
        unit = centred / block_norms.clamp_min(1e-12)
        grams = torch.bmm(unit, unit.transpose(1, 2))[:, upper[0], upper[1]]
        norms[start : start + len(block)] = block_norms.squeeze(-1).cpu().numpy()
        gram[start : start + len(block)] = grams.cpu().numpy()
    return PatchStatistics(norms, gram)


def _standardise_rows(values: torch.Tensor) -> torch.Tensor:
    values = values - values.mean(1, keepdim=True)
    return values / values.norm(dim=1, keepdim=True).clamp_min(1e-12)


def sorted_norm_scores(encoded: PatchStatistics, plain: PatchStatistics) -> np.ndarray:
    """(N, M) correlation of sorted patch norms: blind to the patch order, so usable before any
    slot -> position permutation is known."""
    left = _standardise_rows(torch.from_numpy(np.sort(encoded.norms, axis=1)))
    right = _standardise_rows(torch.from_numpy(np.sort(plain.norms, axis=1)))
    return (left @ right.T).numpy()


def gram_scores(encoded: PatchStatistics, plain: PatchStatistics, slot_positions: np.ndarray,
                *, chunk: int = 1024) -> np.ndarray:
    """(N, M) correlation of Gram matrices, with the plaintext's positions put in slot order.

    slot_positions: (P,) position held by each encoded slot.
    """
    n_patches = len(slot_positions)
    upper = np.triu_indices(n_patches, 1)
    # Entry (s, t) of an encoded Gram pairs with plaintext entry (pos[s], pos[t]); the plaintext
    # Gram is symmetric, so look it up in whichever triangle holds it.
    rows, cols = slot_positions[upper[0]], slot_positions[upper[1]]
    flat = np.full((n_patches, n_patches), -1, np.int64)
    flat[upper] = np.arange(len(upper[0]))
    take = flat[np.minimum(rows, cols), np.maximum(rows, cols)]
    right = torch.cat([_standardise_rows(torch.from_numpy(plain.gram[s : s + chunk][:, take]).float())
                       for s in range(0, len(plain.gram), chunk)])
    scores = np.empty((len(encoded.gram), len(plain.gram)), np.float32)
    for s in range(0, len(encoded.gram), chunk):
        left = _standardise_rows(torch.from_numpy(encoded.gram[s : s + chunk]).float())
        scores[s : s + chunk] = (left @ right.T).numpy()
    return scores


class GramHungarian(Attack):
    name = "gram-hungarian"
    version = "1.0"
    tasks = ("reid",)
    knowledge = ("architecture", "self-sampled-keys", "plaintext-pool")
    description = "Undo shuffles by assignment, match Gram statistics of a self-keyed encoding, boost."

    @dataclass
    class Params:
        self_width: int = field(default=512, metadata={"min": 16, "max": 8192,
                                "help": "width of the self-sampled encoder for the plaintext pool"})
        boost_rounds: int = field(default=2, metadata={"min": 1, "max": 20,
                                  "help": "rounds of permutation recovery + Gram re-matching"})
        refine_pairs: int = field(default=256, metadata={"min": 1, "max": 100000,
                                  "help": "matched pairs whose Gram matrices refine the slot permutation"})
        chunk: int = field(default=32, metadata={"min": 1, "max": 4096, "help": "images per streamed block"})

    def run(self, release: Release) -> Submission:
        p = self.params
        n = release.n_encoded
        with self.stage("slot reference", n) as advance:
            reference = slot_reference(release, chunk=p.chunk, device=self.device, advance=advance)
        slots = np.empty((n, release.config.n_patches), np.int64)

        def aligned_blocks():
            for start, block_slots, block in iter_aligned(release, reference, chunk=p.chunk, device=self.device):
                slots[start : start + len(block)] = block_slots
                yield start, block

        with self.stage("align + encoded statistics", n):
            encoded = patch_statistics(aligned_blocks(), reference, n)
        plain_images = release.plain_images
        with self.stage("self-keyed plaintext statistics", len(plain_images)) as advance:
            features, mean = self_encode(plain_images, release.config, width=p.self_width,
                                         seed=self.seed, device=self.device, advance=advance)
            plain = patch_statistics(features, mean, len(plain_images))
        history = []
        with self.stage("match sorted norms"):
            matched = match(sorted_norm_scores(encoded, plain))
        with self.stage("boost", p.boost_rounds) as advance:
            for _ in range(p.boost_rounds):
                slot_positions = (self._slot_positions(encoded, plain, matched)
                                  if release.config.shuffle else np.arange(len(reference)))
                scores = gram_scores(encoded, plain, slot_positions)
                previous, matched = matched, match(scores)
                history.append(float((previous == matched).mean()))
                advance(1)
        plain_ids = release.plain_ids
        return Submission(
            challenge_id=release.challenge_id, attack=self.name, attack_version=self.version,
            encoded_ids=release.encoded_ids, mapping=[plain_ids[j] for j in matched],
            scores=scores.astype(np.float32), plain_ids=plain_ids,
            patch_positions=slot_positions[slots].astype(np.int16),
            diagnostics={"matching_stable_fraction_per_round": history},
        )

    def _slot_positions(self, encoded: PatchStatistics, plain: PatchStatistics, matched: np.ndarray) -> np.ndarray:
        """Boosting step: slot -> position permutation from the current matching (norm
        correlation over all pairs, refined on the Gram matrices of a random subset of pairs)."""
        slot_positions = recover_slot_positions(encoded.norms, plain.norms[matched])
        subset = np.sort(self.rng("refine").permutation(len(matched))[: self.params.refine_pairs])
        return refine_slot_positions(encoded.full_grams(subset), plain.full_grams(matched[subset]), slot_positions)
