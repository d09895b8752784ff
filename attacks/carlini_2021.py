"""``carlini-2021``: the published attack on NeuraCrypt, at CPU size.

Carlini, Garg, Jha, Mahloujifar, Mahmoody and Tramer (2021), "NeuraCrypt is not private", solved
the challenge with a chain of boosting steps. Written here from the paper's description:

1. **Align.** Every image shares one positional embedding, so an image's shuffled rows can be
   assigned (Hungarian) to the slots of a reference encoding, then of the mean aligned encoding
   (:mod:`attacks.alignment`). One global slot -> position permutation stays unknown.
2. **Patch similarity.** Per-patch moment features (mean, spread, skew, tails of a patch vector,
   raw and slot-centred) are computed for encodings and for plaintext patches. Two small networks
   map them to a shared embedding, trained with a contrastive loss on pairs the attacker makes
   itself: pool plaintexts encoded with self-sampled keys of the public architecture.
3. **Global assignment.** Each (encoding, plaintext) pair is scored by a P x P assignment of
   its patches on those similarities, and the N x M assignment matches images.
4. **Boost.** From the current matching, recover the slot -> position permutation (assignment on
   similarities summed over matched pairs), score pairs slot by slot in that order, re-match.
5. **Extract the key.** Fit a clone encoder of the public architecture to the matched pairs with
   an L1 loss, re-encode the plaintexts with it, re-match by distance; repeat for a few rounds.

CPU-sized (the authors used about 96 cores and 2 GPUs): the patch assignment of step 3 scores
only the ``pair_candidates`` best candidates of each encoding (by its sorted patch embeddings)
instead of every pair; the clone has hidden width ``clone_width`` and fits ``clone_dims`` of the
D output coordinates; the patch networks train on ``train_images`` pool images under
``train_keys`` keys of width ``self_width``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ncbench.assignment import match
from ncbench.attacks.alignment import iter_aligned, slot_reference
from ncbench.attacks.base import Attack, chunk_param, param
from ncbench.attacks.self_keyed import self_encode
from ncbench.attacks.submission import Submission
from ncbench.challenge.encoders import BN_EPS, EncoderConfig, derive_seed, images_to_patches
from ncbench.challenge.files import Release

N_MOMENTS = 8  # per patch: 4 moments of the raw vector, 4 of the slot- (or position-) centred one
TEMPERATURE = 0.1  # of the contrastive (InfoNCE) loss on cosine similarities


class Carlini2021(Attack):
    name = "carlini-2021"
    version = "1.0"
    tasks = ("reid",)
    knowledge = ("architecture", "self-sampled-keys", "plaintext-pool")
    description = (
        "Carlini et al. 2021: align, learned patch similarity, global assignment, boosting, "
        "clone-encoder extraction (CPU-sized)."
    )

    @dataclass
    class Params:
        self_width: int = param(512, "width of the self-sampled encoders that make training pairs", min=16, max=8192)
        train_keys: int = param(2, "self-sampled keys for training pairs", min=1, max=16)
        train_images: int = param(256, "pool images encoded under each self-sampled key", min=8, max=100000)
        train_steps: int = param(300, "contrastive training steps of the patch networks", min=1, max=100000)
        embedding: int = param(16, "patch embedding size", min=2, max=256)
        pair_candidates: int = param(
            2, "candidates per encoding scored by a P x P patch assignment (0: none)", min=0, max=100000
        )
        boost_rounds: int = param(3, "rounds of permutation recovery + re-matching", min=1, max=20)
        clone_rounds: int = param(
            1, "rounds of clone-encoder fitting + re-matching (0: stop after boosting)", min=0, max=10
        )
        clone_width: int = param(128, "hidden width of the clone", min=8, max=8192)
        clone_dims: int = param(128, "output coordinates the clone fits (of D)", min=1, max=8192)
        clone_steps: int = param(40, "L1 fitting steps per round", min=1, max=100000)
        clone_batch: int = param(64, "images per fitting step (drawn from one release batch)", min=2, max=4096)
        chunk: int = chunk_param()

    def run(self, release: Release) -> Submission:
        p, config = self.params, release.config
        n, n_patches = release.n_encoded, config.n_patches
        rng = self.rng("carlini-2021")
        dims = np.sort(rng.permutation(config.width)[: min(p.clone_dims, config.width)])

        with self.stage("slot reference", n) as advance:
            reference = slot_reference(release, chunk=p.chunk, device=self.device, advance=advance)
        slots = np.empty((n, n_patches), np.int64)
        encoded_features = np.empty((n, n_patches, N_MOMENTS), np.float32)
        kept = np.empty((n, n_patches, len(dims)), np.float16)  # clone targets, slot order
        with self.stage("align + moment features", n) as advance:
            for start, block_slots, block in iter_aligned(release, reference, chunk=p.chunk, device=self.device):
                rows = slice(start, start + len(block))
                slots[rows] = block_slots
                encoded_features[rows] = patch_moments(block, reference).cpu().numpy()
                kept[rows] = block[:, :, torch.from_numpy(dims)].cpu().numpy()
                advance(len(block))
        encoded_features = standardise_per_slot(encoded_features)

        plain_images = release.plain_images
        with self.stage("plaintext moment features"):
            plain_features = standardise_per_slot(plaintext_moments(plain_images, config, chunk=p.chunk))
        with self.stage("self-keyed training pairs", p.train_keys * min(p.train_images, len(plain_images))) as advance:
            train_rows = np.sort(rng.permutation(len(plain_images))[: p.train_images])
            own = [
                self_keyed_moments(
                    plain_images[train_rows],
                    config,
                    width=p.self_width,
                    seed=derive_seed(self.seed, f"carlini-2021-key-{k}"),
                    device=self.device,
                    advance=advance,
                )
                for k in range(p.train_keys)
            ]
        with self.stage("train patch networks", p.train_steps) as advance, _one_thread():
            networks = train_patch_networks(
                np.concatenate(own),
                np.concatenate([plain_features[train_rows]] * p.train_keys),
                embedding=p.embedding,
                steps=p.train_steps,
                rng=rng,
                advance=advance,
            )
            with torch.no_grad():
                encoded_embedded = networks.embed_encoded(torch.from_numpy(encoded_features))
                plain_embedded = networks.embed_plain(torch.from_numpy(plain_features))

        with self.stage("pair scores + global assignment", n) as advance:
            scores = candidate_scores(encoded_embedded, plain_embedded, p.pair_candidates, advance=advance)
            matched = match(scores)
        history = []
        slot_positions = np.arange(n_patches)
        with self.stage("boost", p.boost_rounds) as advance:
            for _ in range(p.boost_rounds):
                if config.shuffle:
                    slot_positions = recover_permutation(encoded_embedded, plain_embedded, matched)
                scores = permuted_scores(encoded_embedded, plain_embedded, slot_positions)
                previous, matched = matched, match(scores)
                history.append(float((previous == matched).mean()))
                advance(1)

        if p.clone_rounds:
            targets = torch.from_numpy(kept[:, np.argsort(slot_positions)])  # position order
            clone = CloneEncoder(config, hidden=p.clone_width, outputs=len(dims))
            with self.stage("clone encoder", p.clone_rounds) as advance, _one_thread():
                for _ in range(p.clone_rounds):
                    fit_clone(
                        clone, plain_images, targets, matched, config, steps=p.clone_steps, batch=p.clone_batch, rng=rng
                    )
                    scores = clone_scores(clone, plain_images, targets, matched, config)
                    previous, matched = matched, match(scores)
                    history.append(float((previous == matched).mean()))
                    advance(1)

        plain_ids = release.plain_ids
        return self.answer(
            release,
            mapping=[plain_ids[j] for j in matched],
            scores=scores.astype(np.float32),
            plain_ids=plain_ids,
            patch_positions=slot_positions[slots].astype(np.int16),
            diagnostics={"matching_stable_fraction_per_round": history},
        )


# -- step 2: moment features and the contrastive patch networks --------------------------------


def moments(values: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (..., 4): mean, standard deviation, skewness and excess kurtosis over K."""
    mean = values.mean(-1, keepdim=True)
    centred = values - mean
    square = centred.square()
    std = square.mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    skew = (square * centred).mean(-1, keepdim=True) / std.pow(3)
    kurtosis = square.square_().mean(-1, keepdim=True) / std.pow(4) - 3.0
    return torch.cat([mean, std, skew, kurtosis], dim=-1)


def patch_moments(patches: torch.Tensor, slot_mean: torch.Tensor) -> torch.Tensor:
    """(B, P, K) patch vectors -> (B, P, 8) moments of each vector and of it minus its slot's mean
    (P, K). The positional embedding dominates a raw encoded patch; centring leaves the content."""
    patches = patches.float()
    return torch.cat([moments(patches), moments(patches - slot_mean)], dim=-1)


def plaintext_moments(images: np.ndarray, config: EncoderConfig, *, chunk: int) -> np.ndarray:
    """(M, S, S) uint8 -> (M, P, 8) moment features of the normalised pixel patches."""

    def blocks():
        for start in range(0, len(images), chunk):
            yield images_to_patches(torch.from_numpy(images[start : start + chunk]), config)

    total = torch.zeros(config.n_patches, config.patch_dim)
    for block in blocks():
        total += block.sum(0)
    mean = total / max(len(images), 1)
    return torch.cat([patch_moments(block, mean) for block in blocks()]).cpu().numpy()


def self_keyed_moments(
    images: np.ndarray, config: EncoderConfig, *, width: int, seed: int, device: str, advance
) -> np.ndarray:
    """(T, P, 8) standardised moment features of ``images`` encoded with a self-sampled key."""
    blocks, mean = self_encode(images, config, width=width, seed=seed, device=device, advance=advance)
    features = torch.cat([patch_moments(block.to(device), mean) for _, block in blocks]).cpu().numpy()
    return standardise_per_slot(features)


def standardise_per_slot(features: np.ndarray) -> np.ndarray:
    """(N, P, F) -> z-scores over the N images, per slot and feature: a key scales each slot's
    moments differently, so only their variation across images carries over between keys."""
    mean = features.mean(0, keepdims=True)
    std = features.std(0, keepdims=True)
    return ((features - mean) / np.maximum(std, 1e-6)).astype(np.float32)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small networks: a second thread mostly adds synchronisation. Measured on 2 shared cores:
    a contrastive step 147 ms with 2 threads, 19 ms with 1; a clone step 1.2 s against 0.21 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class PatchNetworks(nn.Module):
    """Two small MLPs: encoded-patch moments and plaintext-patch moments -> unit embeddings."""

    def __init__(self, embedding: int, hidden: int = 64):
        super().__init__()

        def mlp():
            return nn.Sequential(
                nn.Linear(N_MOMENTS, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, embedding),
            )

        self.encoded, self.plain = mlp(), mlp()

    def embed_encoded(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.encoded(features), dim=-1)

    def embed_plain(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.plain(features), dim=-1)


def train_patch_networks(
    encoded: np.ndarray,
    plain: np.ndarray,
    *,
    embedding: int,
    steps: int,
    rng: np.random.Generator,
    batch: int = 512,
    advance=lambda k: None,
) -> PatchNetworks:
    """Contrastive training on (T, P, 8) encoded / plaintext features of the same patches: in a
    batch of patch pairs, each encoded patch must pick its own plaintext patch (and back)."""
    networks = PatchNetworks(embedding)
    optimiser = torch.optim.Adam(networks.parameters(), lr=1e-3)
    encoded = torch.from_numpy(encoded.reshape(-1, N_MOMENTS))
    plain = torch.from_numpy(plain.reshape(-1, N_MOMENTS))
    labels = torch.arange(min(batch, len(encoded)))
    for _ in range(steps):
        pick = torch.from_numpy(rng.choice(len(encoded), size=len(labels), replace=False))
        logits = networks.embed_encoded(encoded[pick]) @ networks.embed_plain(plain[pick]).T / TEMPERATURE
        loss = nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        advance(1)
    return networks.eval()


# -- steps 3 and 4: global assignment and boosting -------------------------------------------------


def candidate_scores(encoded: torch.Tensor, plain: torch.Tensor, candidates: int, advance=lambda k: None) -> np.ndarray:
    """(N, M) first-round scores before the slot permutation is known.

    encoded: (N, P, E) slot order, plain: (M, P, E) position order, unit embeddings. All pairs get
    the correlation of their sorted embeddings (blind to patch order); each encoding's
    ``candidates`` best are re-scored by the paper's P x P patch assignment (mean matched cosine
    in [-1, 1]) and ranked above every other pair.
    """
    descriptor_encoded = _unit_rows(encoded.sort(dim=1).values.flatten(1))
    descriptor_plain = _unit_rows(plain.sort(dim=1).values.flatten(1))
    scores = (descriptor_encoded @ descriptor_plain.T).cpu().numpy()
    if candidates == 0:
        return scores
    candidates = min(candidates, scores.shape[1])
    shortlist = np.argpartition(-scores, candidates - 1, axis=1)[:, :candidates]
    refined = scores - 4.0  # below any assignment score
    for i, row in enumerate(shortlist):
        similarity = torch.einsum("sk,mpk->msp", encoded[i], plain[torch.from_numpy(row)]).cpu().numpy()
        for j, block in zip(row, similarity):
            rows, cols = linear_sum_assignment(block, maximize=True)
            refined[i, j] = block[rows, cols].mean()
        advance(1)
    return refined


def recover_permutation(encoded: torch.Tensor, plain: torch.Tensor, matched: np.ndarray) -> np.ndarray:
    """(P,) position of each slot: the P x P assignment on patch similarities summed over the
    matched pairs (correct pairs add up, wrong ones average out)."""
    agreement = torch.einsum("nsk,npk->sp", encoded, plain[torch.from_numpy(matched)])
    return match(agreement.cpu().numpy())


def permuted_scores(encoded: torch.Tensor, plain: torch.Tensor, slot_positions: np.ndarray) -> np.ndarray:
    """(N, M) sum over slots s of cos(encoded[i, s], plain[j, position of s])."""
    in_slot_order = plain[:, torch.from_numpy(slot_positions)]
    return (encoded.flatten(1) @ in_slot_order.flatten(1).T).cpu().numpy()


def _unit_rows(values: torch.Tensor) -> torch.Tensor:
    values = values - values.mean(1, keepdim=True)
    return values / values.norm(dim=1, keepdim=True).clamp_min(1e-12)


# -- step 5: the clone encoder ---------------------------------------------------------------------


class CloneEncoder(nn.Module):
    """The public architecture (stem, depth x [1x1 conv, batch-statistics BatchNorm, ReLU], pos,
    ReLU, mix) at hidden width ``hidden``, predicting ``outputs`` of the D output coordinates."""

    def __init__(self, config: EncoderConfig, *, hidden: int, outputs: int):
        super().__init__()
        self.config = config
        # Without mix the last layer (the stem for ``linear``) is the output layer.
        self.stem = nn.Linear(config.patch_dim, hidden if config.mix or config.depth else outputs)
        block_outputs = [hidden] * config.depth
        if block_outputs and not config.mix:
            block_outputs[-1] = outputs
        self.blocks = nn.ModuleList(nn.Linear(hidden, width) for width in block_outputs)
        if config.mix:
            self.pos = nn.Parameter(torch.randn(config.n_patches, hidden))
            self.mix = nn.Linear(hidden, outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, S, S) uint8 -> (B, P, outputs), patches in position order, BatchNorm over the batch."""
        config = self.config
        rows = self.stem(images_to_patches(images, config))
        if config.stem_relu:
            rows = torch.relu(rows)
        for block in self.blocks:
            rows = block(rows)
            mean = rows.mean(dim=(0, 1))
            var = (rows - mean).square().mean(dim=(0, 1))
            rows = torch.relu((rows - mean) * torch.rsqrt(var + BN_EPS))
        if config.mix:
            rows = self.mix(torch.relu(rows + self.pos))
        return rows


def _release_batches(n: int, config: EncoderConfig) -> list[np.ndarray]:
    return [np.arange(start, min(start + config.bn_batch, n)) for start in range(0, n, config.bn_batch)]


def fit_clone(
    clone: CloneEncoder,
    plain_images: np.ndarray,
    targets: torch.Tensor,
    matched: np.ndarray,
    config: EncoderConfig,
    *,
    steps: int,
    batch: int,
    rng: np.random.Generator,
    lr: float = 3e-3,
) -> None:
    """L1 fit of ``clone`` to the encodings (N, P, K) in position order of the matched plaintexts.

    Each step draws ``batch`` rows of one release BatchNorm batch, so the clone's batch statistics
    come from the same kind of company as the true encoder's.
    """
    optimiser = torch.optim.Adam(clone.parameters(), lr=lr)
    batches = _release_batches(len(matched), config)
    clone.train()
    for _ in range(steps):
        rows = batches[rng.integers(len(batches))]
        rows = np.sort(rng.choice(rows, size=min(batch, len(rows)), replace=False))
        predicted = clone(torch.from_numpy(plain_images[matched[rows]]))
        loss = (predicted - targets[rows].float()).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


@torch.no_grad()
def clone_scores(
    clone: CloneEncoder, plain_images: np.ndarray, targets: torch.Tensor, matched: np.ndarray, config: EncoderConfig
) -> np.ndarray:
    """(N, M) minus the squared distance between each encoding and each plaintext's clone
    encoding. Each plaintext is encoded in the release batch of the encoding it is matched to."""
    n, m = len(matched), len(plain_images)
    cloned = torch.empty(m, targets.shape[1] * targets.shape[2])
    for rows in _release_batches(n, config):
        cloned[matched[rows]] = clone(torch.from_numpy(plain_images[matched[rows]])).flatten(1)
    unmatched = np.setdiff1d(np.arange(m), matched)
    for start in range(0, len(unmatched), config.bn_batch):
        rows = unmatched[start : start + config.bn_batch]
        cloned[rows] = clone(torch.from_numpy(plain_images[rows])).flatten(1)
    encoded = targets.flatten(1).float()
    distance = encoded.square().sum(1, keepdim=True) - 2 * encoded @ cloned.T + cloned.square().sum(1)[None]
    return (-distance).cpu().numpy()
