"""``linear-inversion``: regularised least squares from encoded patches back to pixel patches.

From pairs of (plaintext, encoding) - the known pairs of an ``invert`` release, or the pairs a
``gram-hungarian`` matching produces on a ``reid`` release - fit a ridge map from each encoded
patch (D,) to its pixel patch (patch*patch,), reconstruct every image, and re-identify by the
nearest reconstruction. Exact (up to float16 storage) for the ``linear`` preset, whose encoder is
one affine map per patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ncbench.assignment import match
from ncbench.attacks.alignment import (
    iter_aligned,
    iter_release,
    recover_slot_positions,
    refine_slot_positions,
    slot_reference,
    to_slot_order,
)
from ncbench.attacks.base import Attack, chunk_param, param
from ncbench.attacks.pairing import gram_pairing
from ncbench.attacks.self_keyed import self_encode
from ncbench.attacks.statistics import patch_statistics
from ncbench.attacks.submission import Submission
from ncbench.challenge.encoders import (
    PIXEL_MEAN,
    PIXEL_STD,
    EncoderConfig,
    images_to_patches,
)
from ncbench.challenge.files import Release


def fit_ridge(encoded: torch.Tensor, pixels: torch.Tensor, *, ridge: float, per_position: bool) -> dict:
    """Fit pixels ~ encoded patches.

    encoded: (K, P, D) paired encodings in position order; pixels: (K, P, Q) normalised pixel
    patches. Both are centred per position first (the positional embedding makes each position's
    offset its own). Shared: one (D, Q) map for all positions, solved in the primal. Per position:
    one map per position, solved in the dual (K x K systems, batched), since K << D.
    ``ridge`` is relative to the mean feature energy, so it is scale-free.
    """
    enc_mean, pix_mean = encoded.mean(0), pixels.mean(0)
    enc, pix = (encoded - enc_mean).double(), (pixels - pix_mean).double()
    k, n_patches, width = enc.shape
    if per_position:
        kernel = torch.einsum("kpd,lpd->pkl", enc, enc)  # (P, K, K)
        scale = kernel.diagonal(dim1=1, dim2=2).mean() * ridge + 1e-12
        alpha = torch.linalg.solve(kernel + scale * torch.eye(k, dtype=enc.dtype), pix.transpose(0, 1))
        weights = torch.einsum("kpd,pkq->pdq", enc, alpha)  # (P, D, Q)
    else:
        rows = enc.reshape(k * n_patches, width)
        covariance = rows.T @ rows
        scale = covariance.diagonal().mean() * ridge + 1e-12
        weights = torch.linalg.solve(
            covariance + scale * torch.eye(width, dtype=enc.dtype), rows.T @ pix.reshape(k * n_patches, -1)
        )  # (D, Q)
    return {"weights": weights.float(), "enc_mean": enc_mean, "pix_mean": pix_mean, "per_position": per_position}


def reconstruct(model: dict, encoded: torch.Tensor, config: EncoderConfig) -> np.ndarray:
    """(B, P, D) encodings in position order -> (B, S, S) float32 images on the 0-255 scale."""
    centred = encoded - model["enc_mean"]
    if model["per_position"]:
        pixels = torch.einsum("bpd,pdq->bpq", centred, model["weights"])
    else:
        pixels = centred @ model["weights"]
    pixels = (pixels + model["pix_mean"]) * PIXEL_STD + PIXEL_MEAN
    batch, grid, patch = len(encoded), config.image_size // config.patch_size, config.patch_size
    images = pixels.reshape(batch, grid, grid, patch, patch).permute(0, 1, 3, 2, 4)
    return images.reshape(batch, config.image_size, config.image_size).clamp(0, 255).cpu().numpy()


def reconstruction_scores(reconstructions: np.ndarray, plain_images: np.ndarray) -> np.ndarray:
    """(N, M) negative mean squared error between every reconstruction and every plaintext."""
    recon = torch.from_numpy(reconstructions.reshape(len(reconstructions), -1)).double()
    plain = torch.from_numpy(plain_images.reshape(len(plain_images), -1).astype(np.float64))
    distances = (recon**2).sum(1, keepdim=True) - 2 * recon @ plain.T + (plain**2).sum(1)
    return (-distances / recon.shape[1]).float().cpu().numpy()


class LinearInversion(Attack):
    name = "linear-inversion"
    version = "1.0"
    tasks = ("invert", "reid")
    knowledge = ("architecture", "self-sampled-keys", "known-pairs", "plaintext-pool")
    description = "Ridge map from encoded to pixel patches fitted on known (or matched) pairs; reconstruct all."

    @dataclass
    class Params:
        ridge: float = param(1e-3, "ridge strength relative to the mean feature energy", min=0.0, max=1e6)
        mode: str = param(
            "shared", "one map for all positions, or one per position", choices=("shared", "per-position")
        )
        max_pairs: int = param(256, "at most this many pairs are used for the fit (memory bound)", min=1, max=100000)
        self_width: int = param(512, "self-keyed width used to place slots (shuffled presets)", min=16, max=8192)
        chunk: int = chunk_param()

    def run(self, release: Release) -> Submission:
        p, config = self.params, release.config
        if release.task == "reid":
            # Pairs from the Gram pairing: every encoding with its matched plaintext.
            pairing = gram_pairing(release, self, self_width=p.self_width, chunk=p.chunk)
            pair_rows, pair_plain_rows = np.arange(release.n_encoded), pairing.matched
            positions = pairing.patch_positions
        else:
            encoded_row = {eid: i for i, eid in enumerate(release.encoded_ids)}
            pair_rows = np.array([encoded_row[eid] for eid in release.pair_encoded_ids])
            pair_plain_rows = np.arange(len(pair_rows))
            positions = self._positions_from_known_pairs(release, pair_rows)
        chosen = np.sort(self.rng("pairs").permutation(len(pair_rows))[: p.max_pairs])
        pair_rows, pair_plain_rows = pair_rows[chosen], pair_plain_rows[chosen]
        with self.stage("fit ridge map"):
            paired = to_slot_order(torch.from_numpy(release.encoded_rows(pair_rows)), positions[pair_rows])
            pixels = images_to_patches(torch.from_numpy(release.plain_images[pair_plain_rows]), config)
            model = fit_ridge(paired, pixels, ridge=p.ridge, per_position=p.mode == "per-position")
        reconstructions = np.empty((release.n_encoded, config.image_size, config.image_size), np.float32)
        with self.stage("reconstruct", release.n_encoded) as advance:
            for start, block in iter_release(release, p.chunk, self.device):
                ordered = to_slot_order(block, positions[start : start + len(block)])
                reconstructions[start : start + len(block)] = reconstruct(model, ordered, config)
                advance(len(block))
        submission = self.answer(
            release,
            reconstructions=reconstructions,
            patch_positions=positions.astype(np.int16),
        )
        if release.task == "reid":
            with self.stage("nearest reconstruction"):
                scores = reconstruction_scores(reconstructions, release.plain_images)
            submission.scores, submission.plain_ids = scores, release.plain_ids
            submission.mapping = [release.plain_ids[j] for j in match(scores)]
        return submission

    def _positions_from_known_pairs(self, release: Release, pair_rows: np.ndarray) -> np.ndarray:
        """(N, P) original position of every encoded row: slots by alignment, then the slot ->
        position permutation from the known pairs (norm correlation, refined on Gram matrices)."""
        p, n = self.params, release.n_encoded
        with self.stage("align slots", 2 * n) as advance:
            reference = slot_reference(release, chunk=p.chunk, device=self.device, advance=advance)
            slots = np.empty((n, release.config.n_patches), np.int64)
            for start, block_slots, block in iter_aligned(release, reference, chunk=p.chunk, device=self.device):
                slots[start : start + len(block)] = block_slots
                advance(len(block))
        if not release.config.shuffle:
            return slots
        with self.stage("place slots from known pairs"):
            known = to_slot_order(torch.from_numpy(release.encoded_rows(pair_rows)), slots[pair_rows])
            encoded = patch_statistics([(0, known)], reference, len(pair_rows))
            features, mean = self_encode(
                release.plain_images, release.config, width=p.self_width, seed=self.seed, device=self.device
            )
            plain = patch_statistics(features, mean, len(pair_rows))
            slot_positions = recover_slot_positions(encoded.norms, plain.norms)
            slot_positions = refine_slot_positions(encoded.full_grams(), plain.full_grams(), slot_positions)
        return slot_positions[slots]
