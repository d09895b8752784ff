"""Per-image patch statistics that several attacks compare: norms and Gram matrices of
slot-centred patches, and the correlations between two populations of them.

Wide random ReLU networks nearly preserve the kernel (geometry) of their inputs whatever the key,
so these statistics of an encoding resemble those of its plaintext encoded with any other key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


def gram_scores(
    encoded: PatchStatistics, plain: PatchStatistics, slot_positions: np.ndarray, *, chunk: int = 1024
) -> np.ndarray:
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
    right = torch.cat(
        [
            _standardise_rows(torch.from_numpy(plain.gram[s : s + chunk][:, take]).float())
            for s in range(0, len(plain.gram), chunk)
        ]
    )
    scores = np.empty((len(encoded.gram), len(plain.gram)), np.float32)
    for s in range(0, len(encoded.gram), chunk):
        left = _standardise_rows(torch.from_numpy(encoded.gram[s : s + chunk]).float())
        scores[s : s + chunk] = (left @ right.T).numpy()
    return scores
