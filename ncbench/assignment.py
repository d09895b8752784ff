"""The one-to-one assignment every attack and the scorer share."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def match(scores: np.ndarray) -> np.ndarray:
    """One-to-one matching that maximises the total score.

    scores: (N, M) with N <= M, higher means more likely. Returns (N,) int64: the column matched
    to each row (all distinct), found by ``scipy.optimize.linear_sum_assignment``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] > scores.shape[1]:
        raise ValueError(f"scores must be (N, M) with N <= M, got {scores.shape}")
    rows, cols = linear_sum_assignment(scores, maximize=True)
    matched = np.empty(scores.shape[0], dtype=np.int64)
    matched[rows] = cols
    return matched
