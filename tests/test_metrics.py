"""Scoring metrics against cases worked out by hand."""

import math

import numpy as np
import pytest

from ncbench.assignment import match
from ncbench.leaderboard import metrics


def test_assignment_maximises_total_score_not_greedy_choice():
    # Greedy takes row 0 -> column 0 (5) then row 1 -> column 1 (1): total 6.
    # The best one-to-one matching crosses over: 4 + 4 = 8.
    scores = np.array([[5.0, 4.0], [4.0, 1.0]])
    assert match(scores).tolist() == [1, 0]


def test_assignment_of_fewer_rows_than_columns():
    scores = np.array([[0.0, 1.0, 5.0], [0.0, 9.0, 8.0]])
    assert match(scores).tolist() == [2, 1]


def test_assignment_refuses_more_rows_than_columns():
    with pytest.raises(ValueError):
        match(np.zeros((3, 2)))


def test_ranks_count_ties_against_the_submitter():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.3]])
    truth = np.array([0, 0])
    # Row 0: the truth scores highest -> rank 1. Row 1: 0.3 beats it and 0.2 ties it -> rank 3.
    assert metrics.true_ranks(scores, truth).tolist() == [1, 3]


def test_top_k_and_mean_reciprocal_rank():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.3]])
    truth = np.array([0, 0])
    assert metrics.top_k_accuracy(scores, truth, 1) == 0.5
    assert metrics.top_k_accuracy(scores, truth, 2) == 0.5
    assert metrics.top_k_accuracy(scores, truth, 5) == 1.0
    assert metrics.mean_reciprocal_rank(scores, truth) == pytest.approx((1 + 1 / 3) / 2)


def test_constant_scores_earn_nothing_at_top_1():
    assert metrics.top_k_accuracy(np.ones((4, 4)), np.arange(4), 1) == 0.0


# -- TPR at low FPR over all (encoding, candidate) claims -------------------------------------

# Row 0: truth 0.9, negatives 0.5, 0.1. Row 1: truth 0.7, negatives 0.8, 0.3.
# Negatives in order: 0.8, 0.5, 0.3, 0.1 (four of them).
HAND_SCORES = np.array([[0.9, 0.5, 0.1], [0.8, 0.3, 0.7]])
HAND_TRUTH = np.array([0, 2])


@pytest.mark.parametrize(
    "fpr, tpr",
    [
        (0.0, 0.5),  # no false claim: threshold above 0.8, only 0.9 is claimed
        (0.24, 0.5),  # 0.24 * 4 = 0.96 false claims: still none allowed
        (0.25, 1.0),  # one false claim (0.8): threshold above 0.5 claims 0.9 and 0.7
        (0.5, 1.0),
    ],
)
def test_tpr_at_fpr_worked_by_hand(fpr, tpr):
    assert metrics.tpr_at_fpr(HAND_SCORES, HAND_TRUTH, [fpr]).tolist() == [tpr]


def test_tpr_at_fpr_counts_ties_against_the_submitter():
    # The true score 0.5 ties the largest negative: claiming it would also claim that negative.
    scores = np.array([[0.5, 0.5], [0.2, 0.9]])
    assert metrics.tpr_at_fpr(scores, np.array([0, 1]), [0.0]).tolist() == [0.5]
    assert metrics.tpr_at_fpr(np.ones((4, 4)), np.arange(4), [0.001, 0.01, 0.5]).tolist() == [0.0, 0.0, 0.0]


def test_tpr_at_fpr_sees_a_sure_minority_that_top1_misses():
    # 10 of 100 rows are found with a large margin; the other 90 rows' truths are lost in noise.
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(100, 100))
    truth = rng.permutation(100)
    scores[np.arange(10), truth[:10]] = 10.0
    scores[np.arange(10, 100), truth[10:]] = -10.0
    assert metrics.top_k_accuracy(scores, truth, 1) == 0.1
    assert metrics.tpr_at_fpr(scores, truth, [0.001]).tolist() == [0.1]


def test_tpr_at_fpr_equals_a_brute_force_threshold_sweep_whatever_the_block(monkeypatch):
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 30, size=(23, 17)).astype(np.float32)  # many ties
    truth = rng.integers(0, 17, size=23)
    scores[np.arange(23), truth] += rng.integers(0, 10, size=23)
    positive = np.zeros(scores.shape, dtype=bool)
    positive[np.arange(23), truth] = True
    fprs = [0.0, 0.001, 0.01, 0.05, 0.2, 1.0]

    def brute(rate):
        best = 0.0
        for threshold in np.unique(scores):
            claimed = scores >= threshold
            if (claimed & ~positive).sum() <= rate * (~positive).sum():
                best = max(best, (claimed & positive).sum() / 23)
        return best

    expected = [brute(rate) for rate in fprs]
    for block in (1, 5, 1000):
        monkeypatch.setattr(metrics, "SCORE_BLOCK", block)
        assert metrics.tpr_at_fpr(scores, truth, fprs).tolist() == pytest.approx(expected)


def test_tpr_at_fpr_of_an_empty_half_is_nan_and_without_negatives_is_one():
    assert math.isnan(metrics.tpr_at_fpr(np.zeros((0, 5)), np.zeros(0, dtype=int), [0.01])[0])
    assert metrics.tpr_at_fpr(np.zeros((1, 1)), np.zeros(1, dtype=int), [0.01]).tolist() == [1.0]


def test_ranks_are_the_same_whatever_the_block(monkeypatch):
    rng = np.random.default_rng(2)
    scores, truth = rng.integers(0, 5, size=(11, 7)), rng.integers(0, 7, size=11)
    whole = metrics.true_ranks(scores, truth)
    monkeypatch.setattr(metrics, "SCORE_BLOCK", 3)
    assert metrics.true_ranks(scores, truth).tolist() == whole.tolist()


def test_reid_accuracy_is_the_fraction_matched():
    assert metrics.reid_accuracy(np.array([0, 1, 2, 0]), np.array([0, 1, 1, 0])) == 0.75


def test_chance_level_is_one_over_n():
    assert metrics.chance_level(20) == 0.05


def test_effective_k_anonymity_is_inverse_accuracy_and_infinite_at_zero():
    assert metrics.effective_k_anonymity(0.25) == 4.0
    assert metrics.effective_k_anonymity(1.0) == 1.0
    assert metrics.effective_k_anonymity(0.0) == math.inf


@pytest.mark.parametrize(
    "accuracy, band",
    [
        (0.0, "good"),
        (0.049, "good"),
        (0.05, "moderate"),
        (0.2, "moderate"),
        (0.2001, "bad"),
        (1.0, "bad"),
    ],
)
def test_privacy_bands_of_the_original_challenge(accuracy, band):
    assert metrics.privacy_band(accuracy) == band


def test_duplicate_count_of_a_mapping():
    assert metrics.duplicate_count(np.array([1, 1, 2, 1])) == 2
    assert metrics.duplicate_count(np.array([2, 0, 1])) == 0


def test_patch_position_accuracy():
    predicted = np.array([[0, 1], [1, 0]])
    truth = np.array([[0, 1], [0, 1]])
    assert metrics.patch_position_accuracy(predicted, truth) == 0.5


def test_psnr_of_known_errors():
    truth = np.zeros((2, 2, 2))
    reconstructed = np.stack([np.full((2, 2), 255.0), np.array([[255.0, 0], [0, 0]])])
    # MSE 255^2 -> 0 dB; MSE 255^2 / 4 -> 10 log10(4) dB.
    assert metrics.psnr(reconstructed, truth) == pytest.approx([0.0, 10 * math.log10(4)])


def test_psnr_of_a_perfect_reconstruction_is_capped():
    image = np.arange(16, dtype=float).reshape(1, 4, 4)
    assert metrics.psnr(image, image)[0] == metrics.PSNR_CAP_DB


def test_ssim_of_identical_images_is_one():
    images = np.random.default_rng(0).integers(0, 256, (2, 24, 24)).astype(float)
    assert metrics.ssim(images, images) == pytest.approx([1.0, 1.0])


def test_ssim_of_constant_images_is_the_luminance_term():
    # No variance anywhere: SSIM = (2 a b + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 255)^2.
    a, b = np.full((1, 16, 16), 100.0), np.full((1, 16, 16), 50.0)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(a, b)[0] == pytest.approx((2 * 100 * 50 + c1) / (100**2 + 50**2 + c1))


def test_ssim_falls_as_noise_grows():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 256, (1, 32, 32)).astype(float)
    noise = rng.normal(size=truth.shape)
    values = [metrics.ssim(np.clip(truth + s * noise, 0, 255), truth)[0] for s in (5, 20, 80)]
    assert values[0] > values[1] > values[2]


def test_nearest_reconstruction_reidentification():
    candidates = np.array([[[0.0, 0.0]], [[10.0, 10.0]]])  # (2, 1, 2)
    reconstructed = np.array([[[1.0, 1.0]], [[9.0, 8.0]]])
    assert metrics.nearest_candidates(reconstructed, candidates).tolist() == [0, 1]
    nearest = metrics.nearest_candidates(reconstructed, candidates)
    assert metrics.reid_accuracy(nearest, np.array([0, 0])) == 0.5


def _true_targets():
    # Mean patch vectors: t0 -> (1, 1), t1 -> (5, 5), t2 -> (10, 0).
    return np.array([[[0.0, 0.0], [2.0, 2.0]], [[4.0, 6.0], [6.0, 4.0]], [[10.0, 0.0], [10.0, 0.0]]])


def test_transfer_accuracy_on_mean_patch_vectors():
    predicted = np.array([[1.2, 1.0], [9.0, 1.0], [5.0, 4.0]])  # nearest: t0, t2, t1
    assert metrics.transfer_nearest_predictions(predicted, _true_targets()).tolist() == [0, 2, 1]
    nearest = metrics.transfer_nearest_predictions(predicted, _true_targets())
    assert metrics.reid_accuracy(nearest, np.arange(3)) == pytest.approx(1 / 3)


def test_transfer_accuracy_ignores_patch_order():
    shuffled = _true_targets()[:, ::-1, :]
    nearest = metrics.transfer_nearest_predictions(shuffled, _true_targets())
    assert metrics.reid_accuracy(nearest, np.arange(3)) == 1.0


def test_transfer_accuracy_on_a_subset_of_targets():
    predicted = np.array([[5.0, 5.0]])
    nearest = metrics.transfer_nearest_predictions(predicted, _true_targets())
    assert metrics.reid_accuracy(nearest, np.array([1])) == 1.0


# -- intervals over seeds ---------------------------------------------------------------------------


def test_t_interval_of_five_values_uses_student_t_with_four_degrees_of_freedom():
    # mean 3, sample sd sqrt(2.5), standard error 0.7071; t(0.975, 4) = 2.7764 -> half-width 1.9632.
    mean, low, high = metrics.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and (low, high) == pytest.approx((3 - 1.9632, 3 + 1.9632), abs=1e-4)
    # 90%: t(0.95, 4) = 2.1318 -> half-width 1.5074
    assert metrics.t_interval([1, 2, 3, 4, 5], confidence=0.9)[2] == pytest.approx(3 + 1.5074, abs=1e-4)


def test_t_interval_ignores_nan_and_has_no_width_from_one_value():
    assert metrics.t_interval([0.7, math.nan, 0.5])[0] == pytest.approx(0.6)
    mean, low, high = metrics.t_interval([0.7])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in metrics.t_interval([]))


def test_paired_interval_excludes_zero_where_unpaired_intervals_overlap():
    # Each seed moves both models together; the encoded one is 0.05-0.10 worse at every seed.
    raw = np.array([0.70, 0.80, 0.90])
    encoded = raw - np.array([0.10, 0.05, 0.10])
    _, raw_low, _ = metrics.t_interval(raw)
    _, _, encoded_high = metrics.t_interval(encoded)
    assert encoded_high > raw_low  # unpaired: the intervals overlap
    # differences -0.1, -0.05, -0.1: mean -0.0833, sd 0.02887, t(0.975, 2) = 4.3027 -> half-width 0.0717
    mean, low, high = metrics.paired_interval(encoded, raw)
    assert mean == pytest.approx(-0.0833, abs=1e-4)
    assert (low, high) == pytest.approx((-0.0833 - 0.0717, -0.0833 + 0.0717), abs=1e-4) and high < 0


def test_paired_interval_refuses_unpaired_lengths():
    with pytest.raises(ValueError):
        metrics.paired_interval([0.1, 0.2], [0.1])
