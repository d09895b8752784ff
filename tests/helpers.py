"""Helpers shared by several test files (not part of the package: nothing outside tests needs them)."""

from pathlib import Path

import numpy as np
import pytest

from ncbench.challenge.encoders import Encoder


def encode_all(encoder: Encoder, images: np.ndarray, perms: np.ndarray | None) -> np.ndarray:
    """Encode everything in memory (small sets, tests): (N, P, D) float32."""
    parts = [encoded.float().numpy() for _, encoded in encoder.encode_stream(images, perms)]
    if not parts:
        return np.zeros((0, encoder.config.n_patches, encoder.config.width), np.float32)
    return np.concatenate(parts)


def png_folder(folder: Path, count: int, side: int) -> Path:
    """A new ``folder`` of ``count`` flat grey PNGs of ``side`` x ``side`` pixels, each another
    grey (the test is skipped without Pillow)."""
    pil = pytest.importorskip("PIL.Image")
    folder.mkdir()
    for k in range(count):
        pil.fromarray(np.full((side, side), 40 * k, np.uint8)).save(folder / f"{k}.png")
    return folder
