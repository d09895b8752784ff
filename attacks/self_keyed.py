"""Encoders with keys the attacker samples itself (the architecture is public: Kerckhoffs)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from ncbench.challenge.encoders import Encoder, EncoderConfig


def self_keyed_encoder(config: EncoderConfig, *, width: int, seed: int, device: str) -> Encoder:
    """The public architecture at ``width`` with a fresh key, in the precision the hardware does
    well (bf16 suffices for statistics; emulated bf16 on an AVX2 CPU is 64x slower than fp32)."""
    own = dataclasses.replace(config, width=width, precision="auto", shuffle=False)
    return Encoder.from_seed(own, seed, device)


def self_encode(
    images: np.ndarray,
    config: EncoderConfig,
    *,
    width: int,
    seed: int,
    device: str = "cpu",
    advance: Callable[[int], None] = lambda k: None,
) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor]:
    """Encode ``images`` (M, S, S) uint8 unshuffled with a self-sampled key, in the release's
    BatchNorm batch size so batch statistics behave alike.

    Returns blocks [(start, (b, P, width) float16)] in position order and the mean (P, width).
    Memory: M * P * width * 2 bytes.
    """
    encoder = self_keyed_encoder(config, width=width, seed=seed, device=device)
    blocks, total = [], torch.zeros(config.n_patches, width, device=device)
    for start, encoded in encoder.encode_stream(images, None, on_batch=advance):
        total += encoded.sum(0).to(device)
        blocks.append((start, encoded.to(torch.float16)))
    return blocks, total / max(len(images), 1)
