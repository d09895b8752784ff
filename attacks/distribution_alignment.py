"""``distribution-alignment``: predict encodings without any (plaintext, encoding) pair.

The attacker sees the released encodings and plaintexts from the same distribution (auxiliary
images, or the unordered pool of a ``reid`` release) but never which goes with which. It aligns
population moments, as NeuraCrypt's own MMD attack aligns distributions:

1. undo the shuffle up to one global slot permutation (:mod:`attacks.alignment`), and place slots
   on positions by matching the population's mean Gram matrix with that of self-keyed plaintexts;
2. model each encoded patch as an affine map ``e = W x + b`` of its plaintext patch's features
   x: by default its encoding under a self-sampled key of the architecture (random features of
   one architecture share their kernel's leading eigenfunctions, so the leading whitened
   components of two keys' encoders differ by about a rotation), or its pixels (exact for the
   ``linear`` preset). Whitening both sides in their top ``rank`` components of the pooled
   within-position covariances leaves ``W`` unknown up to one orthogonal matrix R; R is found by
   a joint orthogonal Procrustes fit of every position's mean and covariance (a fixed-point
   iteration on the polar factor);
3. predict each target's mean patch vector (``transfer``, scored on exactly that) or match the
   pool's predictions to the encodings (``reid``). The MMD between predicted and released mean
   vectors is reported as a diagnostic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ncbench.assignment import match
from ncbench.attacks.alignment import (
    iter_aligned,
    refine_slot_positions,
    slot_reference,
)
from ncbench.attacks.base import Attack, chunk_param, param
from ncbench.attacks.self_keyed import self_encode
from ncbench.attacks.statistics import patch_statistics
from ncbench.attacks.submission import Submission
from ncbench.challenge.encoders import images_to_patches
from ncbench.challenge.files import Release


@dataclass(frozen=True)
class Moments:
    """Per-position moments of patches, in some coordinates of dimension Q.

    means: (P, Q); covariances: (P, Q, Q) within-position covariances across images.
    """

    means: torch.Tensor
    covariances: torch.Tensor


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run dense eigen / SVD problems on one thread: threaded CPU LAPACK stalls when other jobs share
    the cores (a 256 x 256 SVD took 0.05-1.3 s on two busy cores, 6 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def whitening(covariance: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenvectors (D, rank) and eigenvalues (rank,) of a symmetric (D, D) matrix."""
    with _single_threaded():
        values, vectors = torch.linalg.eigh(covariance)
    return vectors[:, -rank:], values[-rank:].clamp_min(1e-12)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of ``matrix`` (closest orthogonal matrix in Frobenius norm)."""
    with _single_threaded():
        left, _, right = torch.linalg.svd(matrix)
    return left @ right


def joint_procrustes(encoded: Moments, pixels: Moments, *, mean_weight: float, iterations: int) -> torch.Tensor:
    """Orthogonal R (Q, Q) with encoded ~ R pixels for every position's mean and covariance.

    Both moment sets are whitened. Maximises sum_p tr(B_p R A_p R^T) + w * sum_p e_p^T R m_p by
    iterating R <- polar(sum_p B_p R A_p + w * sum_p e_p m_p^T), started from the means-only fit.
    """
    # float32 products: this loop is P * 2 Q^3 flops per iteration (17 GFLOP at P = Q = 256), done as
    # two single GEMMs: B laid out (Q, P, Q) so that sum_p (B_p R) A_p is one (Q, PQ) @ (PQ, Q) product.
    n_positions, dim = encoded.covariances.shape[:2]
    cross = (encoded.means.T @ pixels.means).float()
    left = encoded.covariances.float().transpose(0, 1).contiguous()  # [i, p, k] = B_p[i, k]
    right = pixels.covariances.float().reshape(n_positions * dim, dim)  # rows (p, k) of A_p
    rotation = polar(cross)
    for _ in range(iterations):
        rotation = polar((left @ rotation).reshape(dim, n_positions * dim) @ right + mean_weight * cross)
    return rotation.double()


def plaintext_moments(blocks: list[torch.Tensor], rank: int) -> tuple[Moments, torch.Tensor, torch.Tensor]:
    """Whitened per-position moments of plaintext patch features, given as blocks (b, P, Q) of
    images (pixel patches, or their self-keyed encodings), in the top ``rank`` principal
    components of the pooled within-position covariance C.

    Returns the moments, the whitening map (Q, rank) (C's top eigenvectors over the square roots
    of their eigenvalues) and the grand mean patch (Q,).
    """
    count = sum(len(block) for block in blocks)
    means = sum(block.double().sum(0) for block in blocks) / count
    covariance = sum(torch.einsum("bpq,bpr->qr", c, c) for c in (block.double() - means for block in blocks))
    vectors, values = whitening(covariance / (count * means.shape[0]), rank)
    white_map = vectors / values.sqrt()
    covariances = sum(torch.einsum("bpq,bpr->pqr", w, w) for w in ((b.double() - means) @ white_map for b in blocks))
    grand = means.mean(0)
    return Moments((means - grand) @ white_map, covariances / count), white_map, grand


def mmd(left: torch.Tensor, right: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Squared MMD between samples (A, D) and (B, D), summed over Gaussian kernel widths."""

    def kernel(a, b):
        distances = torch.cdist(a, b).square()
        return torch.exp(-distances[None] / (2 * widths[:, None, None] ** 2)).sum(0)

    return kernel(left, left).mean() + kernel(right, right).mean() - 2 * kernel(left, right).mean()


def _median_width(samples: torch.Tensor) -> torch.Tensor:
    """Median pairwise distance (on up to 512 samples), times a few factors: the usual MMD widths."""
    subset = samples[:512]
    return torch.cdist(subset, subset).median().clamp_min(1e-6) * torch.tensor([0.5, 1.0, 2.0], dtype=samples.dtype)


class DistributionAlignment(Attack):
    name = "distribution-alignment"
    version = "1.2"
    tasks = ("transfer", "reid")
    knowledge = ("architecture", "self-sampled-keys", "auxiliary-data")
    description = "No pairs: whiten and Procrustes-align per-position moments of plaintexts and encodings; predict."

    @dataclass
    class Params:
        mean_weight: float = param(30.0, "weight of the per-position means against the covariances", min=0.0, max=1e6)
        iterations: int = param(60, "Procrustes fixed-point iterations", min=0, max=10000)
        covariance_images: int = param(128, "encodings used for the pooled covariance (D x D)", min=2, max=100000)
        # As wide as the release: a narrower self-keyed encoder's kernel estimate is noisier (at nc7,
        # N = 400, width 512 gave 22% on average over releases and keys, the release's 2048 36%).
        self_width: int = param(
            0, "self-keyed width (slot placement, self-keyed features); 0: the release's width", min=0, max=8192
        )
        features: str = param(
            "self-keyed",
            "a plaintext patch as its encoding under a self-sampled key, or as its pixels (exact for linear)",
            choices=("self-keyed", "pixels"),
        )
        rank: int = param(0, "principal components aligned; 0: the patch dimension", min=0, max=8192)
        chunk: int = chunk_param()

    def run(self, release: Release) -> Submission:
        p, config = self.params, release.config
        self_keyed = p.features == "self-keyed"
        n = release.n_encoded
        self_width = p.self_width or config.width
        rank = min(p.rank or config.patch_dim, config.width, self_width if self_keyed else config.patch_dim)
        aux = release.plain_images
        with self.stage("slot reference", n) as advance:
            reference = slot_reference(release, chunk=p.chunk, device=self.device, advance=advance).double()
        grand = reference.mean(0)
        with self.stage("pooled covariance", min(n, p.covariance_images)):
            rows = torch.from_numpy(release.encoded_rows(np.arange(min(n, p.covariance_images)))).double()
            # Shuffled rows are centred by the grand mean here; slot means are not known per row yet.
            centred = (rows - (reference if not config.shuffle else grand)).reshape(-1, config.width)
            basis, scales = whitening(centred.T @ centred / len(centred), rank)
        project = basis / scales.sqrt()  # (D, Q): whitened coordinates of an encoded patch
        sums = torch.zeros(config.n_patches, rank, rank, dtype=torch.float64)
        encoded_means = torch.empty(n, config.width, dtype=torch.float64)

        def aligned():
            for start, _, block in iter_aligned(release, reference.float(), chunk=p.chunk, device=self.device):
                white = (block.double() - reference) @ project
                sums.add_(torch.einsum("bpq,bpr->pqr", white, white))
                encoded_means[start : start + len(block)] = block.double().mean(1)
                yield start, block

        with self.stage("encoded moments", n):
            encoded_stats = patch_statistics(aligned(), reference.float(), n)
        slot_positions = np.arange(config.n_patches)

        def features(images: np.ndarray) -> list[torch.Tensor]:
            """Blocks (b, P, Q) of plaintext patch features in position order."""
            if not self_keyed:
                return [images_to_patches(torch.from_numpy(images), config)]
            blocks, _ = self_encode(images, config, width=self_width, seed=self.seed, device=self.device)
            return [block.cpu() for _, block in blocks]

        aux_features = None
        if config.shuffle or self_keyed:
            with self.stage("self-keyed plaintexts", len(aux)) as advance:
                blocks, mean = self_encode(
                    aux, config, width=self_width, seed=self.seed, device=self.device, advance=advance
                )
            if config.shuffle:
                with self.stage("place slots"):
                    slot_positions = self._place_slots(encoded_stats, patch_statistics(blocks, mean, len(aux)))
            if self_keyed:
                aux_features = [block.cpu() for _, block in blocks]
            del blocks
        by_position = np.argsort(slot_positions)  # slot held at each position
        encoded = Moments(((reference - grand) @ project)[by_position], (sums / n)[by_position])
        aux_features = aux_features or features(aux)
        with self.stage("joint Procrustes", p.iterations):
            plain, plain_whitening, plain_grand = plaintext_moments(aux_features, rank)
            rotation = joint_procrustes(encoded, plain, mean_weight=p.mean_weight, iterations=p.iterations)
            weight = plain_whitening @ rotation.T @ (basis * scales.sqrt()).T  # (Q, D): e = x W + b
            bias = grand - plain_grand @ weight

        def predict(blocks: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([block.double().mean(1) for block in blocks]) @ weight + bias

        submission = self.answer(release)
        predicted_aux = predict(aux_features)
        submission.diagnostics = {
            "mmd_aux_vs_release": float(mmd(predicted_aux, encoded_means, _median_width(encoded_means)))
        }
        if release.task == "transfer":
            submission.encodings = predict(features(release.target_images)).float().cpu().numpy()
            submission.target_ids = release.target_ids
        else:
            scores = -torch.cdist(encoded_means, predicted_aux).square().float().cpu().numpy()
            submission.scores, submission.plain_ids = scores, release.plain_ids
            submission.mapping = [release.plain_ids[j] for j in match(scores)]
        return submission

    def _place_slots(self, encoded, plain) -> np.ndarray:
        """Slot -> position from population statistics alone: mean centred patch norms give a
        first guess, the mean Gram matrices (a graph-matching problem) refine it."""

        def standardise(values):
            return (values - values.mean()) / values.std()

        slot_profile = standardise(encoded.norms.mean(0))
        position_profile = standardise(plain.norms.mean(0))
        guess = match(-np.square(slot_profile[:, None] - position_profile[None, :]))
        return refine_slot_positions(encoded.mean_gram(), plain.mean_gram(), guess, rounds=20)
