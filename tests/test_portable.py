"""challenge/portable.py: transcendental functions from correctly rounded operations only."""

from __future__ import annotations

import numpy as np
import pytest

from ncbench.challenge import portable


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(3)


@pytest.mark.parametrize(
    ("ours", "numpy", "low", "high"),
    [
        (portable.exp, np.exp, -60.0, 5.0),
        (portable.sin, np.sin, -100.0, 100.0),
        (portable.cos, np.cos, -100.0, 100.0),
    ],
)
def test_one_argument_functions_agree_with_numpy_to_1e_12(ours, numpy, low, high, rng):
    x = rng.uniform(low, high, 100_000)
    np.testing.assert_allclose(ours(x), numpy(x), rtol=1e-12, atol=1e-13)


def test_power_agrees_with_numpy_and_zero_to_any_positive_power_is_zero(rng):
    base, exponent = rng.uniform(0.0, 1.0, 100_000), rng.uniform(0.8, 1.25, 100_000)
    np.testing.assert_allclose(portable.power(base, exponent), np.power(base, exponent), rtol=1e-12)
    assert portable.power(np.array([0.0, 1.0]), 0.9).tolist() == [0.0, 1.0]


def test_arctan2_agrees_with_numpy_in_every_quadrant_and_on_signed_zeros(rng):
    y, x = rng.normal(size=100_000), rng.normal(size=100_000)
    np.testing.assert_allclose(portable.arctan2(y, x), np.arctan2(y, x), rtol=0, atol=1e-13)
    edges = np.array([0.0, -0.0, 1.0, -1.0])
    ys, xs = np.meshgrid(edges, edges)
    ours = portable.arctan2(ys, xs)
    np.testing.assert_allclose(ours, np.arctan2(ys, xs), rtol=0, atol=1e-13)
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(np.arctan2(ys, xs)))


def test_float32_in_float32_out_rounded_once_from_float64(rng):
    x = rng.uniform(-3.0, 3.0, 100_000).astype(np.float32)
    result = portable.sin(x)
    assert result.dtype == np.float32
    # Rounding float64 sin once to float32 gives the same bits (numpy's float32 sin does not).
    np.testing.assert_array_equal(result, np.sin(x.astype(np.float64)).astype(np.float32))
