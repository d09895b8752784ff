"""gram-hungarian's comparison with exact pairs (attacks/pairing.py): each slot's leading principal
components against a quadratic in the plaintext patch's mean and spread, fitted on known pairs."""

import numpy as np
import pytest
import torch

from ncbench.attacks import pairing
from ncbench.attacks.statistics import centred_grams
from ncbench.challenge.encoders import PIXEL_MEAN, resolve_config


class _Shuffled:
    """What the comparison reads from a release: its encodings, streamed in blocks."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.n_encoded = rows.astype(np.float16), len(rows)

    def iter_encoded(self, chunk, *, dtype=None, reverse=False, channels=None):
        for start in range(0, self.n_encoded, chunk):
            yield start, self.rows[start : start + chunk, :, :channels]


def _leading_components(unit: np.ndarray, k: int) -> np.ndarray:
    """(N, P, k) scores on each slot's k leading principal components, by a full SVD (the reference)."""
    centred = unit - unit.mean(0)
    return np.stack(
        [centred[:, s] @ np.linalg.svd(centred[:, s], full_matrices=False)[2][:k].T for s in range(unit.shape[1])], 1
    )


def _released_slots(rng, n=80, patches=6, width=96, leading=pairing.COMPARED_COMPONENTS):
    """Encodings with ``leading`` components per slot, each a fifth stronger than the next, a
    little above many weaker ones (as at nc47: the first holds a few percent of the variance),
    each encoding's rows shuffled: (rows in slot order, the release, its Aligned)."""
    means = 3 * rng.standard_normal((patches, width))
    directions = rng.standard_normal((patches, leading, width)) * 1.2 ** -np.arange(leading)[:, None]
    in_slot_order = (
        means
        + np.einsum("npk,pkd->npd", rng.standard_normal((n, patches, leading)), directions)
        + 0.3 * rng.standard_normal((n, patches, width))
    )
    in_slot_order = in_slot_order.astype(np.float16).astype(np.float32)
    slots = np.stack([rng.permutation(patches) for _ in range(n)])  # row r of encoding i sits in slot slots[i, r]
    released = np.empty_like(in_slot_order)
    for i in range(n):
        released[i] = in_slot_order[i, slots[i]]
    reference = torch.from_numpy(in_slot_order.mean(0))
    return in_slot_order, _Shuffled(released), pairing.Aligned(statistics=None, slots=slots, reference=reference)


@pytest.mark.parametrize("dtype, agreement", [(torch.float16, 0.999), (torch.bfloat16, 0.99)])
def test_slot_components_are_each_slots_leading_principal_components_in_slot_order(dtype, agreement):
    in_slot_order, release, aligned = _released_slots(np.random.default_rng(0))
    held = pairing.SlotRows.read(release, aligned, chunk=16, device="cpu", dtype=dtype)
    found = pairing.slot_components(held, device="cpu", rng=np.random.default_rng(1)).numpy()
    centred = in_slot_order - aligned.reference.numpy()
    k = pairing.COMPARED_COMPONENTS
    expected = _leading_components(centred / np.linalg.norm(centred, axis=2, keepdims=True), k)
    assert found.shape == expected.shape == (80, 6, k)
    for s in range(6):  # the same scores, largest first, each up to its component's sign
        for c in range(k):
            assert abs(np.corrcoef(found[:, s, c], expected[:, s, c])[0, 1]) > agreement
            assert np.isclose(np.abs(found[:, s, c]).sum(), np.abs(expected[:, s, c]).sum(), rtol=1 - agreement)


def test_held_rows_give_the_gram_matrices_the_encodings_give():
    in_slot_order, release, aligned = _released_slots(np.random.default_rng(3))
    held = pairing.SlotRows.read(release, aligned, chunk=16, device="cpu", dtype=torch.float16)
    grams = torch.cat([block for _, block in held.grams(32, "cpu")])
    expected = centred_grams(torch.from_numpy(in_slot_order), aligned.reference)
    assert torch.allclose(grams, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


def test_patch_moments_are_a_quadratic_in_each_patchs_standardised_mean_and_spread():
    config = resolve_config("nc3", image_size=16, patch_size=8)
    images = np.zeros((2, 16, 16), np.uint8)
    images[0, :8, :8] = 200  # a bright patch, no spread
    images[1, 8:, 8:] = np.arange(64, dtype=np.uint8).reshape(8, 8)  # a ramp: spread
    moments = pairing.patch_moments(images, config, chunk=1)
    assert moments.shape == (2, 4, 6)
    raw_mean = np.array([[200, 0, 0, 0], [0, 0, 0, 31.5]]) - PIXEL_MEAN
    mean, spread = moments[..., 1].numpy(), moments[..., 2].numpy()
    assert np.allclose(mean, (raw_mean - raw_mean.mean()) / raw_mean.std(ddof=1), atol=1e-4)
    assert spread[1, 3] > 2 and np.allclose(np.delete(spread.ravel(), 7), spread[0, 0])  # only the ramp spreads
    assert np.allclose(moments[..., 0], 1)
    assert np.allclose(moments[..., 3:].numpy(), np.stack([mean**2, spread**2, mean * spread], -1), atol=1e-5)


def _predictable(rng, n, patches, noise=0.3, shared=0.0):
    """Plaintext moments, a slot -> position permutation, and encodings whose components (N, P, K)
    are each a different quadratic of their plaintext's moments at the slot's position, plus
    noise: ``noise`` times their spread, one number or one per (slot, component) (P, K), and
    ``shared`` of it the same for all of a slot's components."""
    mean, spread = rng.standard_normal((2, n, patches))
    moments = torch.from_numpy(
        np.stack([np.ones_like(mean), mean, spread, mean**2, spread**2, mean * spread], -1).astype(np.float32)
    )
    positions = rng.permutation(patches)
    noise = np.asarray(noise, np.float64)
    noise = noise if noise.ndim == 2 else np.full((patches, 1), noise)
    coefficients = rng.standard_normal((patches, 6, noise.shape[1]))
    truth = rng.permutation(n)  # encoding i holds plaintext truth[i]
    components = np.einsum("npf,pfk->npk", moments.numpy()[truth][:, positions], coefficients)
    unit_noise = rng.standard_normal(components.shape)
    if shared:
        unit_noise = (1 - shared) * unit_noise + shared * rng.standard_normal((n, patches, 1))
    components += noise * components.std() * unit_noise
    return moments, positions, truth, torch.from_numpy(components.astype(np.float32))


def test_principal_scores_pair_encodings_with_the_plaintexts_whose_moments_predict_them():
    rng = np.random.default_rng(2)
    moments, positions, truth, components = _predictable(rng, 200, 64)
    known = (np.arange(40), truth[:40])
    scores = pairing.principal_scores(components, moments, positions, known)
    assert scores.shape == (200, 200)
    assert np.mean(pairing.match_with_pairs(scores, known) == truth) >= 0.95
    # Fitted at the wrong positions, the same pairs predict nothing: the slot order matters.
    wrong = pairing.principal_scores(components, moments, np.roll(positions, 1), known)
    assert np.mean(pairing.match_with_pairs(wrong, known)[40:] == truth[40:]) < 0.2


def test_slots_are_placed_where_the_plaintexts_moments_fit_their_components():
    rng = np.random.default_rng(4)
    moments, positions, truth, components = _predictable(rng, 200, 64)
    known = (np.arange(40), truth[:40])
    assert np.array_equal(pairing.place_slots(components, moments, known), positions)
    # Pairs that are not pairs fit no position in particular.
    unrelated = (np.arange(40), rng.permutation(200)[:40])
    assert np.mean(pairing.place_slots(components, moments, unrelated) == positions) < 0.2


def _principal_matching(
    monkeypatch, components, moments, exact, start=None, refits=pairing.REFITS, positions=None, whitened=0
):
    monkeypatch.setattr(pairing, "REFITS", refits)
    monkeypatch.setattr(pairing, "WHITENED_FITS", whitened)
    _, matched, positions = pairing.principal_matching(components, moments, exact, start, positions)
    assert (matched[exact[0]] == exact[1]).all()
    return matched, positions


def test_principal_matching_places_the_slots_and_pairs_from_exact_pairs_alone(monkeypatch):
    rng = np.random.default_rng(5)
    moments, positions, truth, components = _predictable(rng, 300, 64, noise=1.0)
    exact = (np.arange(30), truth[:30])
    matched, placed = _principal_matching(monkeypatch, components, moments, exact, refits=2)
    assert np.array_equal(placed, positions)
    assert np.mean(matched == truth) >= 0.95
    # The exact pairs alone place fewer slots and pair fewer encodings (about 61% and 76% here):
    # each refit places the slots and fits the quadratic again on the whole matching.
    once, placed_once = _principal_matching(monkeypatch, components, moments, exact, refits=0)
    assert np.mean(placed_once == positions) <= 0.8 and np.mean(once == truth) <= 0.9


def test_principal_matching_starts_from_a_rough_matching_and_refits_on_its_own(monkeypatch):
    """Placed and fitted first on a matching that is mostly wrong (the exact pairs put in), then
    again on its own matching: more encodings right each time, the exact pairs held throughout."""
    rng = np.random.default_rng(0)
    moments, positions, truth, components = _predictable(rng, 300, 32, noise=1.0)
    rough = truth.copy()
    wrong = rng.permutation(300)[:210]
    rough[wrong] = rng.permutation(rough[wrong])  # 30% right, about
    exact = (np.arange(9), truth[:9])

    def right(refits):
        matched, _ = _principal_matching(monkeypatch, components, moments, exact, rough, refits)
        return np.mean(matched == truth)

    assert right(0) >= np.mean(rough == truth) + 0.1
    assert right(1) >= right(0) + 0.1


def test_given_slot_positions_start_the_fit_where_the_matching_could_not_place_them(monkeypatch):
    """A 10%-right matching places the slots nowhere near (about 19% here); the boosting's
    positions, given, start the fit, and the refit places the slots itself on the better matching."""
    rng = np.random.default_rng(0)
    moments, positions, truth, components = _predictable(rng, 300, 32, noise=1.0)
    rough = truth.copy()
    wrong = rng.permutation(300)[:270]
    rough[wrong] = rng.permutation(rough[wrong])
    exact = (np.arange(9), truth[:9])
    unplaced, _ = _principal_matching(monkeypatch, components, moments, exact, rough, refits=0)
    placed, _ = _principal_matching(monkeypatch, components, moments, exact, rough, refits=0, positions=positions)
    assert np.mean(placed == truth) >= np.mean(rough == truth) + 0.1 >= np.mean(unplaced == truth) + 0.1
    refitted, refitted_at = _principal_matching(
        monkeypatch, components, moments, exact, rough, refits=1, positions=positions
    )
    assert np.mean(refitted == truth) >= np.mean(placed == truth) + 0.1
    assert np.mean(refitted_at == positions) >= 0.9


def _heteroscedastic(rng, n=300, patches=32, components=4):
    """Encodings whose components are noisy to very different degrees, the first the least, their
    noise partly shared within a slot (as the leading components of one slot's rows at nc47)."""
    noise = rng.uniform(1, 6, (patches, components))
    noise[:, 0] = rng.uniform(1.5, 2, patches)
    return _predictable(rng, n, patches, noise=noise, shared=0.5)


def test_whitened_components_pair_more_encodings_than_the_first_alone_or_unweighted():
    """About 68% and 53% right from the first components alone and from all unweighted; all whitened."""
    rng = np.random.default_rng(6)
    moments, positions, truth, components = _heteroscedastic(rng)
    known = (np.arange(100), truth[:100])

    def right(scores):
        return np.mean(pairing.match_with_pairs(scores, known)[100:] == truth[100:])

    first = right(pairing.principal_scores(components[..., :1], moments, positions, known, whiten=False))
    unweighted = right(pairing.principal_scores(components, moments, positions, known, whiten=False))
    whitened = right(pairing.principal_scores(components, moments, positions, known))
    assert whitened >= max(first, unweighted) + 0.1


def test_principal_matching_ends_with_whitened_fits_on_its_own_matching(monkeypatch):
    """From a matching of the first components about 44% right, the whitened fits pair all."""
    rng = np.random.default_rng(8)
    moments, positions, truth, components = _heteroscedastic(rng)
    exact = (np.arange(40), truth[:40])
    first_only, _ = _principal_matching(monkeypatch, components, moments, exact, refits=1)
    whitened, placed = _principal_matching(monkeypatch, components, moments, exact, refits=1, whitened=2)
    assert np.mean(whitened == truth) >= np.mean(first_only == truth) + 0.1
    assert np.mean(placed == positions) >= 0.9
