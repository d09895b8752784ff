"""``linear-inversion``: regularised least squares from encoded patches back to pixel patches.

From pairs of (plaintext, encoding) - the known pairs of an ``invert`` release, or the pairs a
``gram-hungarian`` matching produces on a ``reid`` release - fit a ridge map from each encoded
patch (D,) to its pixel patch (patch*patch,), reconstruct every image, and re-identify by the
nearest reconstruction. Exact (up to float16 storage) for the ``linear`` preset, whose encoder is
one affine map per patch. On invert releases the slots are placed by the known pairs' Gram
statistics, then by the ridge map itself and by the seams of reconstructed images, and the ridge
is chosen by cross-validation over the known pairs (the affine encoder wants none, ReLU ones some).
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
from ncbench.attacks.decoding import fit_ridge
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

CONTINUITY_SAMPLE = 256  # encodings whose reconstructed seams place the slots
RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 0.1, 1.0)  # the candidates of ``ridge_search``
RIDGE_FOLDS = 4
RIDGE_IMAGES = 32  # pairs the choice is made on (a reid matching offers hundreds; each fold costs D x D work)


def choose_ridge(encoded: torch.Tensor, pixels: torch.Tensor, *, ridges: tuple[float, ...], folds: int) -> float:
    """The shared map's ``ridge`` (relative, as in :func:`fit_ridge`) with the least held-out error.

    encoded: (K, P, D) paired encodings in position order; pixels: (K, P, Q). The K images are
    split into ``folds`` (whole images held out: an image's patches are not independent); per fold
    one eigendecomposition of the training covariance serves every candidate. The affine
    ``linear`` encoder wants almost none (62 dB at 1e-3, 38 dB at 0.1), a ReLU encoder more.
    """
    k = len(encoded)
    errors = np.zeros(len(ridges))
    for held in np.array_split(np.arange(k), min(folds, k)):
        train = np.setdiff1d(np.arange(k), held)
        enc_mean, pix_mean = encoded[train].mean(0), pixels[train].mean(0)
        rows = (encoded[train] - enc_mean).reshape(-1, encoded.shape[-1])
        targets = (pixels[train] - pix_mean).reshape(len(rows), -1)
        values, vectors = torch.linalg.eigh((rows.T @ rows).double())
        projected = vectors.T @ (rows.T @ targets).double()  # (D, Q)
        test = (encoded[held] - enc_mean).double().reshape(-1, encoded.shape[-1]) @ vectors
        truth = (pixels[held] - pix_mean).double().reshape(len(test), -1)
        for i, ridge in enumerate(ridges):
            scale = values.mean() * ridge + 1e-12  # = the covariance's mean diagonal, as fit_ridge
            errors[i] += ((test @ (projected / (values + scale)[:, None]) - truth) ** 2).sum().item()
    return ridges[int(errors.argmin())]


def predict_patches(
    known: torch.Tensor,
    pixels: torch.Tensor,
    slot_positions: np.ndarray,
    encoded: torch.Tensor,
    *,
    ridge: float,
    centred: bool = False,
) -> torch.Tensor:
    """(M, P, Q) normalised pixel patches of ``encoded`` (M, P, D), both in slot order, from the
    shared ridge map fitted on ``known`` (K, P, D, slot order) and ``pixels`` (K, P, Q, position
    order) with slots placed at ``slot_positions`` (P,). ``centred``: without the per-position
    mean pixels (so that no placement is favoured by its own offsets)."""
    in_position_order = torch.empty_like(known)
    in_position_order[:, torch.from_numpy(slot_positions)] = known
    model = fit_ridge(in_position_order, pixels, ridge=ridge, per_position=False)
    index = torch.from_numpy(slot_positions)
    predicted = (encoded - model["enc_mean"][index]) @ model["weights"]
    return predicted if centred else predicted + model["pix_mean"][index]


def place_slots_by_inversion(
    known: torch.Tensor, pixels: torch.Tensor, slot_positions: np.ndarray, *, ridge: float, rounds: int
) -> np.ndarray:
    """Improve a slot -> position permutation with the inverse map itself.

    known: (K, P, D) known encodings in slot order; pixels: (K, P, Q) their normalised pixel
    patches by position; slot_positions: (P,) the current position of each slot. Each round fits
    the shared ridge map under the current placement, predicts every slot's pixels, and solves
    the P x P assignment of slots to the positions whose known pixels they reproduce best (summed
    over the K pairs). Both sides are centred (per slot, per position), so the placement the map
    was fitted under adds no offset in its own favour.
    """
    centred_pixels = pixels - pixels.mean(0)
    for _ in range(rounds):
        predicted = predict_patches(known, pixels, slot_positions, known, ridge=ridge, centred=True)
        # (P slots, P positions) summed squared error, as a similarity for the assignment
        cross = torch.einsum("ksq,kpq->sp", predicted.double(), centred_pixels.double())
        error = (predicted.double() ** 2).sum((0, 2))[:, None] - 2 * cross + (centred_pixels.double() ** 2).sum((0, 2))
        placed = match(-error.numpy())
        if np.array_equal(placed, slot_positions):
            break
        slot_positions = placed
    return slot_positions


def place_slots_by_continuity(patches: torch.Tensor, slot_positions: np.ndarray, *, rounds: int) -> np.ndarray:
    """Improve a slot -> position permutation so that reconstructed images have no seams.

    patches: (M, P, S, S) predicted pixel patches of M encodings in slot order (the grid is
    square); slot_positions: (P,) the current position of each slot. Positions whose known pairs
    all hold the same pixels (a black border) cannot be told apart from the known pairs; across
    many encodings, the slot that belongs at a position continues its neighbours' edges. Each
    round scores every slot at every position by the mean squared difference between its border
    pixels and the facing border pixels of the position's neighbours under the current placement,
    summed over the M encodings, and solves the P x P assignment.
    """
    m, n_patches, size, _ = patches.shape
    grid = round(n_patches**0.5)
    patches = patches.double()
    # (side of the slot's own patch, side of the neighbour facing it, neighbour offset)
    sides = (
        (lambda x: x[..., :, 0], lambda x: x[..., :, -1], (0, -1)),
        (lambda x: x[..., :, -1], lambda x: x[..., :, 0], (0, 1)),
        (lambda x: x[..., 0, :], lambda x: x[..., -1, :], (-1, 0)),
        (lambda x: x[..., -1, :], lambda x: x[..., 0, :], (1, 0)),
    )
    rows, cols = np.divmod(np.arange(n_patches), grid)
    for _ in range(rounds):
        by_position = torch.empty_like(patches)
        by_position[:, torch.from_numpy(slot_positions)] = patches
        error = torch.zeros(n_patches, n_patches, dtype=torch.float64)
        count = np.zeros(n_patches)
        for own_edge, facing_edge, (dr, dc) in sides:
            r, c = rows + dr, cols + dc
            present = (r >= 0) & (r < grid) & (c >= 0) & (c < grid)
            neighbour = np.where(present, r * grid + c, 0)
            own = own_edge(patches)  # (M, P slots, S)
            facing = facing_edge(by_position[:, neighbour])  # (M, P positions, S)
            side = (
                (own**2).sum((0, 2))[:, None] - 2 * torch.einsum("msk,mqk->sq", own, facing) + (facing**2).sum((0, 2))
            )
            error += side * torch.from_numpy(present)
            count += present
        placed = match(-(error / torch.from_numpy(count)).numpy())
        if np.array_equal(placed, slot_positions):
            break
        slot_positions = placed
    return slot_positions


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
    version = "1.3"
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
        ridge_search: bool = param(
            True, "choose the ridge by cross-validation over the known pairs (then ridge is unused)"
        )
        placement_rounds: int = param(
            3, "rounds placing slots where the inverse map reproduces the known pairs best", min=0, max=20
        )
        chunk: int = chunk_param()

    def run(self, release: Release) -> Submission:
        p, config = self.params, release.config
        self.ridge = None  # chosen from the pairs once they are placed (or p.ridge)
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
            if self.ridge is None:
                self.ridge = self._chosen_ridge(paired, pixels)
            model = fit_ridge(paired, pixels, ridge=self.ridge, per_position=p.mode == "per-position")
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
        submission.diagnostics = {**submission.diagnostics, "ridge": self.ridge}
        if release.task == "reid":
            with self.stage("nearest reconstruction"):
                scores = reconstruction_scores(reconstructions, release.plain_images)
            submission.scores, submission.plain_ids = scores, release.plain_ids
            submission.mapping = [release.plain_ids[j] for j in match(scores)]
        return submission

    def _chosen_ridge(self, paired: torch.Tensor, pixels: torch.Tensor) -> float:
        """``ridge``, or with ``ridge_search`` the cross-validated choice on (K, P, D) pairs in
        position order and their (K, P, Q) pixels."""
        if not self.params.ridge_search or len(paired) < 2:
            return self.params.ridge
        chosen = np.sort(self.rng("ridge").permutation(len(paired))[:RIDGE_IMAGES])
        with self.stage("choose ridge"):
            return choose_ridge(paired[chosen].float(), pixels[chosen].float(), ridges=RIDGES, folds=RIDGE_FOLDS)

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
        if p.placement_rounds:
            with self.stage("place slots by inversion"):
                pixels = images_to_patches(torch.from_numpy(release.plain_images), release.config)
                in_position_order = torch.empty_like(known)
                in_position_order[:, torch.from_numpy(slot_positions)] = known
                self.ridge = self._chosen_ridge(in_position_order.float(), pixels.float())
                slot_positions = place_slots_by_inversion(
                    known.float(), pixels.float(), slot_positions, ridge=self.ridge, rounds=p.placement_rounds
                )
                sample = np.sort(self.rng("continuity").permutation(n)[:CONTINUITY_SAMPLE])
                in_slot_order = to_slot_order(torch.from_numpy(release.encoded_rows(sample)), slots[sample]).float()
                patches = predict_patches(
                    known.float(), pixels.float(), slot_positions, in_slot_order, ridge=self.ridge
                )
                size = release.config.patch_size
                patches = patches.reshape(len(sample), release.config.n_patches, size, size)
                slot_positions = place_slots_by_continuity(patches, slot_positions, rounds=p.placement_rounds)
        return slot_positions[slots]
