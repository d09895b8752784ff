import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def tiny_images():
    """(12, 32, 32) uint8 random-texture images for tiny encoder configurations."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 32, 32), dtype=np.uint8)
