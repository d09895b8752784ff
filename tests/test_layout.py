"""Placing a key's slots on the image grid, and comparing thumbnails at the best sub-patch shift
(attacks/layout.py)."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.ndimage import shift as shifted

from ncbench.attacks.gram_link import lead
from ncbench.attacks.layout import (
    layout_fit,
    moment_decoder,
    oriented_similarity,
    placed_thumbnails,
    shift_operators,
    shifted_similarity,
    slot_covariances,
    slot_layout,
    swap_gains,
)

GRID = 8


def _grid_covariances(rng: np.random.Generator, noise: float) -> np.ndarray:
    """(P, P) covariances of a field that is smooth over the grid and varies more towards the
    bottom and, barely, to the right: like an image's patches, neighbours alike and nearly
    left-right symmetric."""
    rows, columns = np.divmod(np.arange(GRID * GRID), GRID)
    distance = (rows[:, None] - rows[None]) ** 2 + (columns[:, None] - columns[None]) ** 2
    spread = 1.0 + 0.15 * rows + 0.005 * columns
    covariances = np.exp(-distance / 4.0) * np.outer(spread, spread)
    perturbation = rng.standard_normal(covariances.shape) * noise
    return covariances + (perturbation + perturbation.T) / 2


def test_slot_layout_places_shuffled_slots_where_the_reference_has_them():
    """Here the sorted rows alone place 38% of the slots and the swaps from there end on the mirror
    image (0%); the restarts find every slot."""
    rng = np.random.default_rng(0)
    reference = _grid_covariances(rng, 0.0)
    truth = rng.permutation(GRID * GRID)  # slot i sits at position truth[i]
    site = _grid_covariances(rng, 0.2)[np.ix_(truth, truth)]
    found = slot_layout(site, reference, grid=GRID, hops=50, rng=np.random.default_rng(1))
    assert sorted(found) == list(range(GRID * GRID))
    assert (found == truth).mean() >= 0.9
    assert layout_fit(site, reference, found) >= layout_fit(site, reference, truth) - 1e-6


def test_swap_gains_are_what_an_exchange_adds_to_the_fit():
    rng = np.random.default_rng(2)
    site, reference = (_grid_covariances(rng, 0.3) for _ in range(2))
    positions = rng.permutation(GRID * GRID)
    gains = swap_gains(site, reference[np.ix_(positions, positions)])
    for first, second in [(0, 1), (3, 40), (63, 7)]:
        exchanged = positions.copy()
        exchanged[[first, second]] = exchanged[[second, first]]
        change = layout_fit(site, reference, exchanged) - layout_fit(site, reference, positions)
        assert np.isclose(gains[first, second], change)


def test_slot_covariances_are_mean_inner_products_of_two_slots():
    components = np.random.default_rng(3).standard_normal((5, 4, 3))
    covariances = slot_covariances(components)
    assert np.isclose(covariances[1, 2], np.mean([components[n, 1] @ components[n, 2] for n in range(5)]))


@pytest.mark.parametrize("fine", [2, 4])
def test_placed_thumbnails_put_each_slot_at_its_position(fine):
    decoded = np.arange(2 * GRID * GRID * fine**2, dtype=float).reshape(2, GRID * GRID, fine**2)
    positions = np.random.default_rng(4).permutation(GRID * GRID)
    thumbnails = placed_thumbnails(decoded, positions, GRID)
    assert thumbnails.shape == (2, fine * GRID, fine * GRID)
    row, column = divmod(positions[5], GRID)
    cell = thumbnails[1, fine * row : fine * (row + 1), fine * column : fine * (column + 1)]
    assert np.array_equal(cell.ravel(), decoded[1, 5])


def test_moment_decoder_recovers_contents_the_slots_means_alone_cannot():
    """Contents (N, P, 4) whose means differ between positions along one direction only, seen
    through an unknown affine map to 8 components plus noise: fitted on the means, the decoder
    recovers that direction alone; the covariances by position pin down the rest."""
    rng = np.random.default_rng(8)
    n, slots, q, k = 400, GRID * GRID, 4, 8
    means = rng.uniform(-1, 1, (slots, 1)) * rng.standard_normal(q)  # (P, q), of rank one
    mixing = rng.standard_normal((slots, q, q)) * rng.uniform(0.2, 1.0, (slots, 1, q))
    covariances = mixing @ mixing.transpose(0, 2, 1)  # (P, q, q), another shape at every position
    contents = means + np.einsum("pab,npb->npa", mixing, rng.standard_normal((n, slots, q)))
    seen = contents @ rng.standard_normal((q, k)) + rng.standard_normal(k) + 0.05 * rng.standard_normal((n, slots, k))
    slot_means = seen.mean(0)
    truth = contents - contents.mean(0)

    def recovered(decoder: np.ndarray) -> float:
        decoded = seen @ decoder[:-1] + decoder[-1]
        return np.corrcoef((decoded - decoded.mean(0)).ravel(), truth.ravel())[0, 1]

    # Measured with seeds 8-11: 0.98-0.99 against 0.42-0.51 with the means alone
    assert recovered(moment_decoder(seen - slot_means, slot_means, means, covariances)) >= 0.95
    assert recovered(moment_decoder(seen - slot_means, slot_means, means, covariances, weight=0.0)) <= 0.6


def test_lead_is_how_far_a_pair_stands_above_its_row_and_column():
    surety = np.array([[5.0, 1.0, 0.0], [0.0, 3.0, 2.9], [0.5, 0.0, 1.0]])
    gained = lead(surety)
    assert gained[0, 0] == 4.0  # its row's and column's runners-up score 1.0 and 0.5
    assert np.isclose(gained[1, 1], 0.1) and np.isclose(gained[1, 2], -0.1)  # a near tie: neither stands out
    assert np.isclose(gained[2, 2], -1.9)  # the best of its row, but not of its column (2.9)
    assert lead(np.array([[2.0]]))[0, 0] == 0.0


def test_shift_operators_shift_an_image_as_scipy_does():
    image = np.random.default_rng(5).standard_normal((12, 12))
    operators = shift_operators(12, np.array([-0.75, 0.5]))
    assert np.allclose(operators[0] @ image @ operators[1].T, shifted(image, (-0.75, 0.5), order=3, mode="nearest"))


def test_shifted_similarity_finds_each_shifted_copy_among_others():
    rng = np.random.default_rng(6)
    left = np.stack([gaussian_filter(rng.standard_normal((16, 16)), 1.5) for _ in range(12)])
    moves = rng.uniform(-1.2, 1.2, (12, 2))
    right = np.stack([shifted(image, move, order=3, mode="nearest") for image, move in zip(left, moves)])
    right += 0.01 * rng.standard_normal(right.shape)
    similarity = shifted_similarity(left, right[::-1], reach=1.5, steps=13, border=3)
    assert (similarity.argmax(1) == np.arange(12)[::-1]).all()
    unshifted = shifted_similarity(left, right[::-1], reach=0.0, steps=1, border=3)
    assert np.diag(similarity[:, ::-1]).mean() > np.diag(unshifted[:, ::-1]).mean() + 0.05


def test_oriented_similarity_mirrors_a_site_whose_layout_came_out_mirrored():
    rng = np.random.default_rng(7)
    left = np.stack([gaussian_filter(rng.standard_normal((16, 16)), 1.5) for _ in range(8)])
    right = left[..., ::-1] + 0.01 * rng.standard_normal(left.shape)
    similarity, mirrored = oriented_similarity(left, right, reach=1.5, steps=5, border=3)
    assert mirrored and (similarity.argmax(1) == np.arange(8)).all()
    assert not oriented_similarity(left, left, reach=1.5, steps=5, border=3)[1]
