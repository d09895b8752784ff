"""Transcendental functions that every CPU computes to the same bits.

numpy's ``exp``, ``log``, ``sin``, ``cos``, ``arctan2`` and ``power`` are vectorised per CPU
(AVX-512, AVX2, SSE, or the C library) and are not correctly rounded, so the same call can differ
in the last bit between two machines; one such bit is enough to move a pixel of a phantom image
and, through BatchNorm, the encodings of its whole batch. These use only the operations IEEE 754
rounds correctly everywhere (+ - * / sqrt, rint, frexp, ldexp and comparisons), each as its own
numpy call so that no compiler can fuse them, in float64: a range reduction, then a truncated
series. They are accurate to about 1e-13 (relative) and, above all, reproducible; each returns an
array of its (first) argument's floating dtype (float32 stays float32, rounded once at the end).
"""

from __future__ import annotations

import math

import numpy as np

# Cody and Waite's split constants (fdlibm): the high parts carry few bits, so k * HI is exact for
# the multiples k used here and the reduced argument loses nothing before the series.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_PIO2_HI = 1.57079632673412561417e00
_PIO2_LO = 6.07710050650619224932e-11
# Series coefficients, each a correctly rounded Python division, truncated where the relative
# error falls below 1e-13 on the reduced range: far below float32's half ulp (3e-8).
_EXP = tuple(1.0 / math.factorial(n) for n in range(11))  # |r| <= ln 2 / 2
_SIN = tuple((-1.0) ** j / math.factorial(2 * j + 1) for j in range(7))  # |r| <= pi / 4
_COS = tuple((-1.0) ** j / math.factorial(2 * j) for j in range(8))
_ATANH = tuple(1.0 / (2 * j + 1) for j in range(8))  # |s| <= 0.172
_ATAN = tuple((-1.0) ** j / (2 * j + 1) for j in range(9))  # |t| <= tan(pi / 16)


def _float64(values) -> tuple[np.ndarray, np.dtype]:
    array = np.asarray(values)
    dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.dtype(np.float64)
    return array.astype(np.float64), dtype


def _horner(z: np.ndarray, coefficients: tuple[float, ...]) -> np.ndarray:
    """sum_j coefficients[j] z^j, from the highest power down."""
    total = np.full_like(z, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        total = total * z + c
    return total


def _exp64(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, -708.0, 709.0)
    k = np.rint(x * (1.0 / math.log(2.0)))
    r = (x - k * _LN2_HI) - k * _LN2_LO
    return np.ldexp(_horner(r, _EXP), k.astype(np.int32))


def _log64(x: np.ndarray) -> np.ndarray:
    """log x for x > 0: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m-1)/(m+1))."""
    m, e = np.frexp(x)
    low = m < math.sqrt(0.5)
    m = np.where(low, m * 2.0, m)
    e = (e - low).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    return e * _LN2_HI + (2.0 * s * _horner(s * s, _ATANH) + e * _LN2_LO)


def exp(x) -> np.ndarray:
    """e ** x, elementwise."""
    x64, dtype = _float64(x)
    return _exp64(x64).astype(dtype)


def power(base, exponent) -> np.ndarray:
    """base ** exponent for base >= 0 (0 ** exponent is 0), elementwise with broadcasting."""
    base64, dtype = _float64(base)
    exponent64 = np.asarray(exponent, dtype=np.float64)
    positive = base64 > 0
    logs = _log64(np.where(positive, base64, 1.0))
    return np.where(positive, _exp64(exponent64 * logs), 0.0).astype(dtype)


def _sin_cos64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = np.rint(x * (2.0 / math.pi))
    r = (x - k * _PIO2_HI) - k * _PIO2_LO  # |r| <= pi / 4 (plus rounding)
    z = r * r
    sin_r, cos_r = r * _horner(z, _SIN), _horner(z, _COS)
    # x = r + k pi / 2: odd k swaps sin and cos, and the quadrant sets the signs (exact flips).
    quadrant = k.astype(np.int64) & 3
    odd = (quadrant & 1).astype(bool)
    sin = np.where(odd, cos_r, sin_r) * (1.0 - (quadrant & 2))
    cos = np.where(odd, sin_r, cos_r) * (1.0 - ((quadrant + 1) & 2))
    return sin, cos


def sin(x) -> np.ndarray:
    """sin x (radians), elementwise; for |x| up to about 1e5."""
    x64, dtype = _float64(x)
    return _sin_cos64(x64)[0].astype(dtype)


def cos(x) -> np.ndarray:
    """cos x (radians), elementwise; for |x| up to about 1e5."""
    x64, dtype = _float64(x)
    return _sin_cos64(x64)[1].astype(dtype)


def arctan2(y, x) -> np.ndarray:
    """The angle of the point (x, y) in [-pi, pi], elementwise, as numpy's arctan2 (0 at the
    origin, the sign of y's zero kept)."""
    y64, dtype = _float64(y)
    x64 = np.asarray(x, dtype=np.float64)
    ax, ay = np.abs(x64), np.abs(y64)
    big, small = np.maximum(ax, ay), np.minimum(ax, ay)
    t = np.where(big > 0, small / np.where(big > 0, big, 1.0), 0.0)  # tan of an angle in [0, pi/4]
    # atan t = 2 atan(t / (1 + sqrt(1 + t^2))), twice: the angle drops below pi / 16.
    for _ in range(2):
        t = t / (1.0 + np.sqrt(1.0 + t * t))
    angle = 4.0 * (t * _horner(t * t, _ATAN))
    angle = np.where(ay > ax, math.pi / 2 - angle, angle)
    angle = np.where(np.signbit(x64), math.pi - angle, angle)
    return np.where(np.signbit(y64), -angle, angle).astype(dtype)
