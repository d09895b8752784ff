"""Encoders with keys the attacker samples itself (the architecture is public: Kerckhoffs)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ncbench.challenge.encoders import Encoder, EncoderConfig


def self_keyed_encoder(
    config: EncoderConfig, *, width: int, seed: int, device: str, bf16_activations: bool = False
) -> Encoder:
    """The public architecture at ``width`` with a fresh key, in the precision the hardware does
    well (bf16 suffices for statistics; emulated bf16 on an AVX2 CPU is 64x slower than fp32).

    ``bf16_activations`` (where bf16 products are native) keeps the activations in bf16 too
    (512 images at width 512: 2.2 s instead of 2.9 s): enough for Gram statistics of a shallow
    encoder, not for whitened features (nc7 transfer by distribution-alignment fell from 46-48%
    to 24-37% with them)."""
    own = dataclasses.replace(config, width=width, precision="auto", shuffle=False)
    return Encoder.from_seed(own, seed, device, bf16_activations=bf16_activations)


def insider_encoder(path: str, config: EncoderConfig, *, device: str) -> Encoder:
    """Another site's key (a :class:`~ncbench.challenge.files.SiteKey` file), unshuffled, in the
    precision the hardware does well; it must have the release's architecture."""
    from ncbench.challenge.files import SiteKey
    from ncbench.errors import NcbenchError

    with SiteKey(path) as key:
        own = dataclasses.replace(key.config, precision="auto", shuffle=False)
        if dataclasses.replace(own, precision=config.precision, shuffle=config.shuffle, dtype=config.dtype) != config:
            raise NcbenchError(f"{path}: the insider key has another architecture than the release")
        tensors = {name: torch.from_numpy(values) for name, values in key.tensors().items()}
    return Encoder(own, tensors, device)


def self_encode(
    images: np.ndarray,
    config: EncoderConfig,
    *,
    width: int,
    seed: int,
    device: str = "cpu",
    advance: Callable[[int], None] = lambda k: None,
    encoder: Encoder | None = None,
    bf16_activations: bool = False,
    mean_images: int | None = None,
    on_images: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[list[tuple[int, torch.Tensor]] | Iterator[tuple[int, torch.Tensor]], torch.Tensor]:
    """Encode ``images`` (M, S, S) uint8 unshuffled with a self-sampled key (or ``encoder``: an
    insider's), in the release's BatchNorm batch size so batch statistics behave alike.

    Returns blocks [(start, (b, P, width) float16)] in position order and the mean (P, width).
    Memory: M * P * width * 2 bytes. ``mean_images``: hold only the first that many images (whole
    batches) and take the mean over them; the blocks are then an iterator that encodes the rest
    as it is consumed, so a consumer that reduces each block holds a fixed amount whatever M is
    (``images`` may then be a :class:`~ncbench.challenge.files.RowReader`). ``on_images``: see
    :meth:`~ncbench.challenge.encoders.Encoder.encode_stream`.
    """
    if encoder is None:
        encoder = self_keyed_encoder(config, width=width, seed=seed, device=device, bf16_activations=bf16_activations)
    width = encoder.config.width
    stream = encoder.encode_stream(images, None, on_batch=advance, on_images=on_images)
    held, total = [], torch.zeros(config.n_patches, width, device=device)
    for start, encoded in stream:
        total += encoded.sum(0, dtype=torch.float32).to(device)
        held.append((start, encoded.to(torch.float16)))
        if mean_images is not None and start + len(encoded) >= mean_images:
            break
    mean = total / max(sum(len(block) for _, block in held), 1)
    if mean_images is None:
        return held, mean
    return itertools.chain(held, ((start, encoded.to(torch.float16)) for start, encoded in stream)), mean
