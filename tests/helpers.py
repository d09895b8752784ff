"""Helpers shared by several test files (not part of the package: nothing outside tests needs them)."""

import numpy as np

from ncbench.challenge.encoders import Encoder


def encode_all(encoder: Encoder, images: np.ndarray, perms: np.ndarray | None) -> np.ndarray:
    """Encode everything in memory (small sets, tests): (N, P, D) float32."""
    parts = [encoded.float().numpy() for _, encoded in encoder.encode_stream(images, perms)]
    if not parts:
        return np.zeros((0, encoder.config.n_patches, encoder.config.width), np.float32)
    return np.concatenate(parts)
