"""Scoring metrics as plain functions on arrays (docs/tasks.md#metrics): no files, no database.

Shapes: N encodings being scored, M candidates (plaintexts or targets), P patches, D width,
H x W image pixels. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np

# Bands of the original NeuraCrypt challenge: < 5% good, 5-20% moderate, > 20% bad.
BAND_GOOD_BELOW = 0.05
BAND_BAD_ABOVE = 0.20
BANDS = ("good", "moderate", "bad")

# The key's truth/split values: each encoding is scored in the public or the hidden half.
SPLIT_NAMES = {0: "public", 1: "private"}

# The re-identification number each task is ranked by (docs/tasks.md#metrics); chance and effective
# k-anonymity are reported beside it.
HEADLINE_METRIC = {
    "reid": "reid_accuracy",
    "invert": "reid_accuracy",
    "transfer": "nn_accuracy",
    "link": "link_r_precision",
}

# A perfect reconstruction has infinite PSNR; capping each image keeps the mean finite. 100 dB is
# above any finite PSNR of an 8-bit image up to 4096 x 4096 pixels (one grey level off somewhere).
PSNR_CAP_DB = 100.0

# Wang et al. (2004) SSIM: Gaussian window sigma 1.5, constants K1 = 0.01, K2 = 0.03.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # window radius 3.5 sigma (11 x 11 at sigma 1.5), as scikit-image does
SSIM_K1, SSIM_K2 = 0.01, 0.03

NEAREST_BLOCK = 256  # query rows per block in nearest-neighbour searches
SCORE_BLOCK = 256  # rows of an (N, M) score matrix per block: N = M = 10,000 never makes N x M temporaries

# Confidence-ranked reid metrics, as membership-inference competitions rank attacks (MICO: TPR at
# low FPR): name -> the false-positive rate allowed over all (encoding, candidate) claims.
TPR_AT_FPR = {"tpr_at_0.1pct_fpr": 0.001, "tpr_at_1pct_fpr": 0.01}


def true_ranks(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N,) 1-based rank of the true column in each row of ``scores`` (N, M).

    Ties count against the submitter: a true column tied with k others ranks k + 1 places below
    the strictly better ones, so a constant score matrix earns no credit.
    """
    scores = np.asarray(scores)
    truth = np.asarray(truth, dtype=np.int64)
    true_scores = scores[np.arange(len(truth)), truth]
    ranks = np.empty(len(truth), dtype=np.int64)
    for start in range(0, len(truth), SCORE_BLOCK):
        block = slice(start, start + SCORE_BLOCK)
        ranks[block] = (scores[block] >= true_scores[block, None]).sum(axis=1)
    return ranks


def top_k_accuracy(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Fraction of rows whose true column (``truth`` (N,)) ranks within the top ``k`` of (N, M)."""
    return float(np.mean(true_ranks(scores, truth) <= k)) if len(truth) else math.nan


def mean_reciprocal_rank(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of 1 / rank of the true column; scores (N, M), truth (N,)."""
    return float(np.mean(1.0 / true_ranks(scores, truth))) if len(truth) else math.nan


def tpr_at_fpr(scores: np.ndarray, truth: np.ndarray, fprs: tuple[float, ...] | list[float]) -> np.ndarray:
    """True-positive rate at each false-positive rate of ``fprs``, over all (row, column) claims.

    scores: (N, M); truth: (N,) true column of each row. Every pair (i, j) is a claim "row i is
    candidate j", made when ``scores[i, j] >= t``: the N true pairs are the positives, the other
    N (M - 1) pairs the negatives. TPR at FPR a is the largest TPR(t) over thresholds with
    FPR(t) <= a. With f = floor(a N (M - 1)) false claims allowed, the best threshold lies just
    above the (f + 1)-th largest negative score v, so TPR = mean(true score > v). Ties count
    against the submitter (a true score equal to v is not claimed), so a constant matrix gets 0.
    NaN without rows; 1 when there are no negatives (M = 1).

    Streams :data:`SCORE_BLOCK` rows at a time in the scores' precision (at least float32), and
    keeps only the f + 1 largest negatives: at N = M = 10,000 and 1% that is 10^6 values.
    """
    scores = np.asarray(scores)
    truth = np.asarray(truth, dtype=np.int64)
    n, m = scores.shape
    if n == 0:
        return np.full(len(fprs), math.nan)
    n_negatives = n * (m - 1)
    # false claims allowed at each rate (the epsilon keeps 0.29 * 100 from flooring to 28)
    allowed = np.array([math.floor(rate * n_negatives + 1e-9) for rate in fprs], dtype=np.int64)
    dtype = np.result_type(scores.dtype, np.float32)
    positives = scores[np.arange(n), truth].astype(dtype)
    keep = int(min(allowed.max() + 1, n_negatives))
    largest = np.empty(0, dtype)  # the ``keep`` largest negatives seen so far
    for start in range(0, n, SCORE_BLOCK):
        block = scores[start : start + SCORE_BLOCK].astype(dtype)
        negative = np.ones(block.shape, dtype=bool)
        negative[np.arange(len(block)), truth[start : start + SCORE_BLOCK]] = False
        values = np.concatenate([largest, block[negative]])
        largest = np.partition(values, len(values) - keep)[len(values) - keep :] if len(values) > keep else values
    largest = np.sort(largest)[::-1]
    rates = [1.0 if f >= n_negatives else float(np.mean(positives > largest[f])) for f in allowed]
    return np.array(rates)


def reid_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of encodings matched to their own plaintext; predicted, truth (N,) indices."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} differ")
    return float(np.mean(predicted == truth)) if len(truth) else math.nan


def chance_level(n_candidates: int) -> float:
    """Accuracy of a uniformly random guess among ``n_candidates``: 1 / n."""
    return 1.0 / n_candidates if n_candidates > 0 else math.nan


def effective_k_anonymity(accuracy: float) -> float:
    """1 / accuracy: the size of the crowd an encoding effectively hides in (inf when never found)."""
    if math.isnan(accuracy):
        return math.nan
    return math.inf if accuracy <= 0 else 1.0 / accuracy


def privacy_band(accuracy: float) -> str:
    """'good' below 5% re-identification, 'moderate' from 5% to 20%, 'bad' above 20%."""
    if math.isnan(accuracy):
        return "n/a"
    if accuracy < BAND_GOOD_BELOW:
        return "good"
    return "bad" if accuracy > BAND_BAD_ABOVE else "moderate"


def duplicate_count(predicted: np.ndarray) -> int:
    """How many entries of a mapping (N,) repeat an earlier one (0 for a one-to-one mapping)."""
    predicted = np.asarray(predicted)
    return int(len(predicted) - len(np.unique(predicted)))


LINK_RECALL_DEPTH = 16  # link_recall counts the true pairs among the 16 T best-ranked claims


def link_ranking(claimed: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Ranking metrics of claimed links (pairs of encodings said to be one image or patient).

    claimed: (L, 2) distinct pairs of rows, each ordered (smaller, larger); scores: (L,), higher
    surer; truth: (T, 2) the true pairs, ordered alike. Claims are ranked by score, and a true
    claim tied with false ones ranks after them (ties count against the submitter).

    - ``link_r_precision``: the fraction of true claims among the T best ranked (R-precision:
      equal to the recall at that rank; a submitter needs no idea of T);
    - ``link_average_precision``: the mean over the T true pairs of the precision at the rank
      where each is claimed (0 for a pair never claimed);
    - ``link_recall``: the fraction of true pairs among the LINK_RECALL_DEPTH * T best ranked
      claims. Ranked like the others, so a claim of every pair with one score finds none of them
      (the true ones rank last) once the false pairs outnumber that depth.
    NaN without true pairs.
    """
    n_true = len(truth)
    if n_true == 0:
        return dict.fromkeys(("link_r_precision", "link_average_precision", "link_recall"), math.nan)
    width = int(max(claimed.max(initial=0), truth.max(initial=0))) + 1
    hit = np.isin(claimed[:, 0] * width + claimed[:, 1], truth[:, 0] * width + truth[:, 1])
    order = np.lexsort((hit, -np.asarray(scores, np.float64)))  # by score, false first within a tie
    ranked = hit[order]
    found = np.cumsum(ranked)
    ranks = np.flatnonzero(ranked) + 1
    return {
        "link_r_precision": float(ranked[:n_true].sum() / n_true),
        "link_average_precision": float((found[ranks - 1] / ranks).sum() / n_true),
        "link_recall": float(ranked[: LINK_RECALL_DEPTH * n_true].sum() / n_true),
    }


def patch_position_accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of encoded patch rows whose original position is predicted right.

    predicted, truth: (N, P) integer, the original patch position held by each encoded row.
    """
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} differ")
    return float(np.mean(predicted == truth)) if truth.size else math.nan


def psnr(reconstructed: np.ndarray, truth: np.ndarray, *, data_range: float = 255.0) -> np.ndarray:
    """(N,) peak signal-to-noise ratio in dB of each image, capped at :data:`PSNR_CAP_DB`.

    reconstructed, truth: (N, H, W) on the 0-``data_range`` scale. PSNR = 10 log10(range^2 / MSE).
    """
    reconstructed, truth = _as_float_pair(reconstructed, truth)
    mse = ((reconstructed - truth) ** 2).reshape(len(truth), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        value = 10.0 * np.log10(data_range**2 / mse)
    return np.minimum(value, PSNR_CAP_DB)


def ssim(
    reconstructed: np.ndarray, truth: np.ndarray, *, data_range: float = 255.0, sigma: float = SSIM_SIGMA
) -> np.ndarray:
    """(N,) mean structural similarity of each image (Wang et al. 2004).

    reconstructed, truth: (N, H, W) on the 0-``data_range`` scale. Local means, variances and
    covariance come from a Gaussian window (``scipy.ndimage.gaussian_filter``, reflected borders,
    population statistics); C1 = (0.01 range)^2, C2 = (0.03 range)^2; the SSIM map is averaged
    away from a border of the window's radius, as scikit-image does.
    """
    from scipy import ndimage  # here, not at the top: the scorer's child loads this module for every upload

    x, y = _as_float_pair(reconstructed, truth)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2

    def blur(image: np.ndarray) -> np.ndarray:
        # sigma 0 on the batch axis: each image is filtered on its own.
        return ndimage.gaussian_filter(image, sigma=(0, sigma, sigma), truncate=SSIM_TRUNCATE, mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    pad = int(SSIM_TRUNCATE * sigma + 0.5)
    if x.shape[1] > 2 * pad and x.shape[2] > 2 * pad:
        ssim_map = ssim_map[:, pad:-pad, pad:-pad]
    return ssim_map.reshape(len(x), -1).mean(axis=1)


def nearest_candidates(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(N,) index of the candidate nearest (squared Euclidean distance) to each query.

    queries: (N, ...) and candidates: (M, ...) of the same trailing shape, flattened per item.
    """
    queries = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1)
    candidates = np.asarray(candidates, dtype=np.float64).reshape(len(candidates), -1)
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"queries {queries.shape} and candidates {candidates.shape} differ in size")
    # |q - c|^2 = |q|^2 - 2 q.c + |c|^2; |q|^2 is the same for every candidate of a row.
    # Rows go in blocks so that N x M distances of large images never sit in memory at once.
    norms = (candidates**2).sum(axis=1)[None, :]
    nearest = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), NEAREST_BLOCK):
        block = queries[start : start + NEAREST_BLOCK]
        nearest[start : start + len(block)] = np.argmin(norms - 2.0 * block @ candidates.T, axis=1)
    return nearest


def mean_patch_vectors(encodings: np.ndarray) -> np.ndarray:
    """(M, D) mean over patches of (M, P, D) encodings (already (M, D): returned as float64).

    The mean patch vector ignores patch order, so shuffled encodings compare fairly (the metric of
    the original challenge 2).
    """
    encodings = np.asarray(encodings, dtype=np.float64)
    if encodings.ndim == 3:
        return encodings.mean(axis=1)
    if encodings.ndim == 2:
        return encodings
    raise ValueError(f"encodings must be (M, P, D) or (M, D), got {encodings.shape}")


def transfer_nearest_predictions(predicted: np.ndarray, true_encodings: np.ndarray) -> np.ndarray:
    """(M',) index of the true target encoding nearest to each predicted one.

    predicted: (M', P, D) or (M', D) predicted encodings; true_encodings: (M, P, D) of all targets.
    Distance: squared Euclidean between mean patch vectors.
    """
    return nearest_candidates(mean_patch_vectors(predicted), mean_patch_vectors(true_encodings))


# -- intervals over seeds (the utility baseline: one AUC per seed) --------------------------------

CONFIDENCE = 0.95  # two-sided level of every interval the board and the CLI print


def t_interval(values, *, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the S ``values`` ((S,) floats, NaN ignored) and its
    two-sided Student-t confidence interval, mean -+ t_{S-1, (1+confidence)/2} * sd / sqrt(S)
    with the sample standard deviation (ddof 1). Seeds are few, so t, not the normal quantile:
    with 5 seeds the half-width is 2.78 standard errors, not 1.96. (mean, nan, nan) for one
    value, all NaN for none.
    """
    finite = np.asarray(values, dtype=np.float64).ravel()
    finite = finite[~np.isnan(finite)]
    if finite.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(finite.mean())
    if finite.size == 1:
        return mean, math.nan, math.nan
    from scipy import stats

    half = float(stats.t.ppf((1 + confidence) / 2, finite.size - 1) * finite.std(ddof=1) / math.sqrt(finite.size))
    return mean, mean - half, mean + half


def paired_interval(treated, reference, *, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """:func:`t_interval` of the per-seed differences ``treated - reference`` ((S,) each, entry s
    of both from seed s). Pairing removes what the two models share at a seed (the images, the
    split, the test set), which is most of the spread: a difference whose interval excludes 0
    is significant at ``1 - confidence`` even when the two unpaired intervals overlap."""
    treated, reference = np.asarray(treated, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if treated.shape != reference.shape:
        raise ValueError(f"paired values need one shape, got {treated.shape} and {reference.shape}")
    return t_interval(treated - reference, confidence=confidence)


def _as_float_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"images must be two (N, H, W) arrays of one shape, got {a.shape} and {b.shape}")
    return a, b
