"""Attacks on tiny presets (the same code paths as full size) and the plugin interface."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import encode_all
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from ncbench.attacks import decoding, pairing, statistics
from ncbench.attacks.alignment import assign_rows, slot_moments
from ncbench.attacks.base import Attack
from ncbench.attacks.carlini_2021 import CloneEncoder, permuted_scores, recover_permutation
from ncbench.attacks.linear_inversion import choose_ridge, place_slots_by_continuity, place_slots_by_inversion
from ncbench.attacks.plugins.registry import (
    all_attacks,
    check_plugin_name,
    load_from_file,
    register,
    resolve,
)
from ncbench.attacks.statistics import centred_grams
from ncbench.attacks.submission import read_submission
from ncbench.challenge.encoders import Encoder, images_to_patches, resolve_config, sample_key
from ncbench.challenge.files import Release, open_key, open_release
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.cli import main
from ncbench.errors import NcbenchError
from ncbench.names import name_skeleton

TINY = dict(width=256, image_size=64, patch_size=8, bn_batch=32)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    built = {}
    for preset, task, n in [
        ("nc3", "reid", 48),
        ("nc7", "reid", 48),
        ("linear", "invert", 48),
        ("nc7", "invert", 80),
        ("linear", "transfer", 64),
    ]:
        out = root / f"{preset}-{task}"
        build_release(
            out,
            config=resolve_config(preset, **TINY),
            plan=BuildPlan.for_task(task, n),
            source="sample",
            seed=3,
            test_release=True,
        )
        built[preset, task] = out
    return built


def _reid_accuracy(path, submission):
    with open_release(path) as release, open_key(path) as key:
        truth = [release.plain_ids[j] for j in key.read("truth/plain_index")]
    return np.mean([a == b for a, b in zip(truth, submission.mapping)])


def _run(name, path, **params):
    cls = resolve(name)
    with open_release(path) as release:
        return cls(dataclasses.replace(cls.Params(), **params))(release)


def test_gram_hungarian_reidentifies_nc3(releases):
    assert (
        _reid_accuracy(releases["nc3", "reid"], _run("gram-hungarian", releases["nc3", "reid"], self_width=256)) >= 0.9
    )


def test_gram_hungarian_beats_chance_far_on_nc7(releases):
    # 48 near-duplicate views at width 256: measured 0.875; chance is 1/48.
    assert (
        _reid_accuracy(releases["nc7", "reid"], _run("gram-hungarian", releases["nc7", "reid"], self_width=256)) >= 0.6
    )


def test_gram_hungarian_is_deterministic_for_a_seed(releases):
    first = _run("gram-hungarian", releases["nc3", "reid"], self_width=64)
    again = _run("gram-hungarian", releases["nc3", "reid"], self_width=64)
    assert first.mapping == again.mapping
    assert np.array_equal(first.patch_positions, again.patch_positions)


def test_gram_hungarian_predicts_patch_positions(releases):
    submission = _run("gram-hungarian", releases["nc3", "reid"], self_width=256)
    with open_key(releases["nc3", "reid"]) as key:
        assert (submission.patch_positions == key.read("truth/patch_perm")).mean() > 0.9


# -- carlini-2021: the published attack, CPU-sized ---------------------------------------------

FAST_CARLINI = dict(train_steps=100, clone_steps=10)


def test_gram_statistics_read_only_the_channels_asked_for(releases, monkeypatch):
    from ncbench.challenge.files import Release

    attack = resolve("gram-hungarian")()
    with open_release(releases["nc3", "reid"]) as release:
        clean = pairing.aligned_statistics(release, attack, chunk=16, channels=64).statistics
        read = Release.encoded_rows

        def noisy_beyond_64(self, rows, **kwargs):
            encoded = read(self, rows, **kwargs)
            encoded[..., 64:] = np.random.default_rng(0).normal(size=encoded[..., 64:].shape)
            return encoded

        monkeypatch.setattr(Release, "encoded_rows", noisy_beyond_64)
        noisy = pairing.aligned_statistics(release, attack, chunk=16, channels=64).statistics
        every_channel = pairing.aligned_statistics(release, attack, chunk=16).statistics
    assert np.array_equal(clean.gram, noisy.gram) and np.array_equal(clean.norms, noisy.norms)
    assert not np.allclose(clean.norms, every_channel.norms)


def test_slot_moments_give_the_mean_and_the_pooled_within_slot_spread(releases):
    with open_release(releases["linear", "invert"]) as release:  # unshuffled: every row is its slot
        encoded = release.encoded_rows(np.arange(release.n_encoded)).astype(np.float64)
        mean, spread = slot_moments(release, chunk=16, channels=40)
    encoded = encoded[..., :40]
    np.testing.assert_allclose(mean.numpy(), encoded.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(spread.numpy(), np.sqrt(encoded.var(0).mean(0)), rtol=1e-4)


def test_gram_hungarian_reidentifies_nc3_from_a_quarter_of_the_channels(releases):
    submission = _run("gram-hungarian", releases["nc3", "reid"], self_width=256, channels=64)
    assert _reid_accuracy(releases["nc3", "reid"], submission) >= 0.9


def test_shallow_full_size_releases_get_a_narrow_self_key_and_fewer_channels():
    assert pairing.statistics_widths(resolve_config("nc7")) == (128, 512)
    assert pairing.statistics_widths(resolve_config("nc47")) == (512, 2048)
    assert pairing.statistics_widths(resolve_config("nc7", width=256), self_width=64, channels=1024) == (64, 256)
    assert pairing.statistics_widths(resolve_config("nc7", **TINY)) == (512, 256)  # 64 patches: too few entries


def test_carlini_2021_reidentifies_nc3(releases):
    assert _reid_accuracy(releases["nc3", "reid"], _run("carlini-2021", releases["nc3", "reid"], **FAST_CARLINI)) >= 0.9


def test_carlini_2021_beats_chance_far_on_nc7(releases):
    # 48 near-duplicate views at width 256: measured 1.0 with the defaults; chance is 1/48.
    assert _reid_accuracy(releases["nc7", "reid"], _run("carlini-2021", releases["nc7", "reid"], **FAST_CARLINI)) >= 0.6


def test_carlini_2021_is_deterministic_for_a_seed_and_predicts_patch_positions(releases):
    first = _run("carlini-2021", releases["nc3", "reid"], **FAST_CARLINI)
    again = _run("carlini-2021", releases["nc3", "reid"], **FAST_CARLINI)
    assert first.mapping == again.mapping and np.array_equal(first.scores, again.scores)
    with open_key(releases["nc3", "reid"]) as key:
        assert (first.patch_positions == key.read("truth/patch_perm")).mean() > 0.9


def test_carlini_2021_without_clone_rounds_stops_after_boosting(releases):
    submission = _run("carlini-2021", releases["nc3", "reid"], train_steps=50, clone_rounds=0)
    assert "clone encoder" not in submission.diagnostics["stage_seconds"]
    assert len(submission.diagnostics["matching_stable_fraction_per_round"]) == 3  # boost rounds only


@pytest.mark.parametrize("preset", ["linear", "nc3", "nc7"])
def test_clone_encoder_with_the_true_key_is_the_encoder(preset, tiny_images):
    config = resolve_config(
        preset, width=16, image_size=32, patch_size=8, bn_batch=12, depth=2 if preset == "nc7" else None
    )
    key = sample_key(config, 1)
    clone = CloneEncoder(config, hidden=config.width, outputs=config.width)
    with torch.no_grad():
        for name, parameter in clone.named_parameters():
            parameter.copy_(key[name])
        cloned = clone(torch.from_numpy(tiny_images)).numpy()
    np.testing.assert_allclose(cloned, encode_all(Encoder(config, key), tiny_images, None), rtol=1e-4, atol=1e-4)


def test_slot_permutation_is_recovered_from_a_half_right_matching():
    rng = np.random.default_rng(0)
    plain = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(40, 16, 4)).astype(np.float32)), dim=-1)
    slot_positions = rng.permutation(16)
    truth = rng.permutation(40)
    encoded = plain[truth][:, slot_positions] + 0.3 * torch.from_numpy(rng.normal(size=(40, 16, 4)).astype(np.float32))
    matched = truth.copy()
    matched[:20] = np.roll(truth[:20], 1)  # half the pairs wrong
    recovered = recover_permutation(encoded, plain, matched)
    assert np.array_equal(recovered, slot_positions)
    assert np.array_equal(permuted_scores(encoded, plain, recovered).argmax(1), truth)


def test_bf16_grams_round_the_deviations_not_the_means():
    rng = np.random.default_rng(1)
    mean = torch.from_numpy(rng.normal(size=(12, 32)) * 100).float()  # means far above the deviations
    encoded = mean + torch.from_numpy(rng.normal(size=(5, 12, 32))).float()
    exact = centred_grams(encoded.double(), mean.double(), dtype=torch.float64)
    rounded = centred_grams(encoded, mean, dtype=torch.bfloat16)
    assert rounded.dtype == torch.float32
    assert (rounded - exact).abs().max() < 0.02 * exact.abs().max()


def test_int8_gram_entries_keep_the_cosines_and_the_correlations():
    rng = np.random.default_rng(6)
    rows = torch.from_numpy(rng.normal(size=(40, 16, 24))).float()
    grams = torch.bmm(rows, rows.transpose(1, 2))
    half = statistics.collect_statistics(iter([(0, grams)]), 40, 16)
    small = statistics.collect_statistics(iter([(0, grams)]), 40, 16, storage=np.int8)
    assert small.gram.dtype == np.int8 and small.gram.nbytes * 2 == half.gram.nbytes
    assert np.array_equal(small.norms, half.norms)
    assert (small.full_grams() - half.full_grams()).abs().max() <= statistics.INT8_UNIT / 2 + 1e-3
    slot_positions = np.arange(16)
    both = statistics.GramComparison(small, half).scores(slot_positions)
    assert np.abs(both - statistics.GramComparison(half, half).scores(slot_positions)).max() < 0.01
    assert np.array_equal(both.argmax(1), np.arange(40))


def test_a_streamed_self_encoding_holds_only_the_head_and_gives_the_same_blocks(releases):
    with open_release(releases["nc3", "reid"]) as release:
        config, pool = release.config, release.plain_pool
        assert np.array_equal(pool[5:17], release.plain_images[5:17])
        options = dict(width=64, seed=0)
        held, mean = pairing.self_encode(release.plain_images, config, **options)
        assert len(pool) > config.bn_batch
        # Rounded up to whole batches: the first one.
        streamed, head_mean = pairing.self_encode(pool, config, mean_images=config.bn_batch - 1, **options)
        assert not isinstance(streamed, list)
        streamed = list(streamed)
    assert [start for start, _ in streamed] == [start for start, _ in held]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(held, streamed))
    head = held[0][1].float()
    torch.testing.assert_close(head_mean, head.mean(0), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(head_mean, mean)


def test_slot_assignment_is_the_optimal_assignment_with_or_without_conflicts():
    rng = np.random.default_rng(5)
    separated = torch.eye(12).repeat(3, 1, 1)[:, rng.permutation(12)] + 0.1 * torch.rand(3, 12, 12)
    conflicting = torch.rand(4, 12, 12)
    for similarity in (separated, conflicting, torch.cat([separated, conflicting])):
        expected = np.empty(similarity.shape[:2], np.int64)
        for b, values in enumerate(similarity.numpy()):
            rows, cols = linear_sum_assignment(values, maximize=True)
            expected[b, rows] = cols
        assert np.array_equal(assign_rows(similarity), expected)


def _noisy_gram_comparison(rng, *, n: int = 40, n_patches: int = 16, **options):
    """A GramComparison of ``n`` random plaintext Gram rows with noisy copies in a random slot
    order (encoding i is plaintext i), and that slot order."""
    upper = np.triu_indices(n_patches, 1)
    plain_gram = rng.normal(size=(n, len(upper[0]))).astype(np.float16)
    slot_positions = rng.permutation(n_patches)
    full = np.zeros((n, n_patches, n_patches), np.float16)
    full[:, upper[0], upper[1]] = plain_gram
    full += full.transpose(0, 2, 1)
    encoded_gram = full[:, slot_positions][:, :, slot_positions][:, upper[0], upper[1]]
    encoded_gram += (0.5 * rng.normal(size=encoded_gram.shape)).astype(np.float16)
    norms = np.ones((n, n_patches), np.float32)
    comparison = statistics.GramComparison(
        statistics.PatchStatistics(norms, encoded_gram), statistics.PatchStatistics(norms, plain_gram), **options
    )
    return comparison, slot_positions


def test_shortlist_scores_are_exact_for_each_rows_best_candidates(monkeypatch):
    # Forced to bf16 (wherever it runs): the shortlist is rough, the candidates' scores exact.
    monkeypatch.setattr(statistics, "matmul_dtype", lambda device: torch.bfloat16)
    comparison, slot_positions = _noisy_gram_comparison(np.random.default_rng(2))
    exact = comparison.scores(slot_positions)
    n = len(exact)
    shortlist = comparison.shortlist(slot_positions, candidates=3, chunk=7)
    refined = shortlist.scores
    best = np.argsort(-refined, axis=1)[:, :3]
    assert np.array_equal(np.sort(best, 1), np.sort(shortlist.columns, 1))
    assert np.allclose(shortlist.values, np.take_along_axis(exact, shortlist.columns, 1), atol=1e-5)
    assert np.allclose(np.take_along_axis(refined, best, 1), np.take_along_axis(exact, best, 1), atol=1e-5)
    assert np.array_equal(refined.argmax(1), np.arange(n)) and np.array_equal(exact.argmax(1), np.arange(n))
    assert np.abs(refined - exact).max() < 0.02
    rough = comparison.shortlist(slot_positions, candidates=3, chunk=7, exact=False)
    assert np.array_equal(rough.columns, shortlist.columns)
    assert 1e-4 < np.abs(rough.values - shortlist.values).max() < 0.02  # the bf16 products as they are


def test_rough_products_estimate_from_sampled_entries_and_shortlists_stay_exact():
    comparison, slot_positions = _noisy_gram_comparison(np.random.default_rng(3), rough_entries=60)  # of 120
    exact = comparison.scores(slot_positions)
    rough = comparison.scores(slot_positions, rough=True)
    assert np.abs(rough - exact).max() > 1e-2  # an estimate from half the entries, not the product
    assert np.corrcoef(rough.ravel(), exact.ravel())[0, 1] > 0.8
    shortlist = comparison.shortlist(slot_positions, candidates=3)
    assert (shortlist.columns == np.arange(len(exact))[:, None]).any(1).all()
    assert np.allclose(shortlist.values, np.take_along_axis(exact, shortlist.columns, 1), atol=1e-5)


def test_a_coarse_first_product_prunes_the_shortlists_without_losing_the_best(monkeypatch):
    comparison, slot_positions = _noisy_gram_comparison(np.random.default_rng(7), n=120)
    exact = comparison.scores(slot_positions)
    full = comparison.shortlist(slot_positions, candidates=3)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *args: calls.append(args[0].shape) or bmm(*args))
    monkeypatch.setattr(statistics, "PRUNED_ENTRIES", 30)  # every 4th of the 120 entries
    monkeypatch.setattr(statistics, "PRUNED_CANDIDATES", 12)
    monkeypatch.setattr(statistics, "PRUNED_FROM", 100)
    pruned = comparison.shortlist(slot_positions, candidates=3)
    assert calls[0] == (120, 12, 120)  # the finer product: 12 candidates per row, every entry
    assert np.array_equal(pruned.columns[:, 0], np.arange(120)) and np.array_equal(full.columns[:, 0], np.arange(120))
    assert np.allclose(pruned.values, np.take_along_axis(exact, pruned.columns, 1), atol=1e-5)
    assert np.corrcoef(pruned.scores.ravel(), exact.ravel())[0, 1] > 0.5  # the coarse estimate elsewhere


def test_boosting_on_a_sample_of_rows_still_reidentifies(releases):
    # Beyond assign_max encodings the rounds score a sample in bf16; the final matching is a
    # sparse assignment on each encoding's candidates.
    submission = _run("gram-hungarian", releases["nc3", "reid"], self_width=256, assign_max=24)
    assert _reid_accuracy(releases["nc3", "reid"], submission) >= 0.9
    assert submission.scores.shape == (48, 48)
    assert submission.diagnostics["mutual_best_fraction_per_round"][-1] >= pairing.STALLED_BELOW
    assert submission.diagnostics["boost_attempts_set_aside"] == []  # not stalled: no attempt again


def test_boosting_that_stalls_on_a_sample_starts_again(releases, monkeypatch):
    # The first attempt's two rounds get random slot orders, as rounds from a weak start can
    # wander; the attack must notice the few mutual best pairs and start again from the first pairs.
    recover = pairing._slot_positions
    wandering = iter(range(2))

    def slot_positions(left, right, rows, partners, rng, refine_pairs):
        if next(wandering, None) is not None:
            return np.random.default_rng(0).permutation(left.norms.shape[1])
        return recover(left, right, rows, partners, rng, refine_pairs)

    monkeypatch.setattr(pairing, "_slot_positions", slot_positions)
    submission = _run("gram-hungarian", releases["nc3", "reid"], self_width=256, assign_max=24, boost_rounds=2)
    assert _reid_accuracy(releases["nc3", "reid"], submission) >= 0.9
    assert submission.diagnostics["mutual_best_fraction_per_round"][-1] >= pairing.STALLED_BELOW
    (stalled,) = submission.diagnostics["boost_attempts_set_aside"]  # the wandering rounds, kept in sight
    assert len(stalled) == 2 and stalled[-1] < pairing.STALLED_BELOW


def test_sparse_final_assignment_matches_the_dense_one(releases):
    dense = _run("gram-hungarian", releases["nc3", "reid"], self_width=256, assign_max=24, candidates=48)
    sparse = _run("gram-hungarian", releases["nc3", "reid"], self_width=256, assign_max=24, candidates=4)
    assert sparse.mapping == dense.mapping


def test_rows_the_shortlists_cannot_place_are_assigned_densely():
    # Encoding 1 is a copy of encoding 0: with one candidate each, both list plaintext 0 and the
    # sparse assignment can place only one of them; the dense fallback places the other.
    rng = np.random.default_rng(4)
    n, n_patches = 30, 8
    plain_gram = rng.normal(size=(n, n_patches * (n_patches - 1) // 2)).astype(np.float16)
    encoded_gram = plain_gram.copy()
    encoded_gram[1] = encoded_gram[0]
    norms = np.ones((n, n_patches), np.float32)
    boosted = pairing.boost(
        statistics.PatchStatistics(norms, encoded_gram),
        statistics.PatchStatistics(norms, plain_gram),
        np.zeros((n, n), np.float32),
        rounds=1,
        refine_pairs=4,
        rng=rng,
        shuffle=False,
        assign_max=10,
        candidates=1,
    )
    assert boosted.unplaced == 1
    assert sorted(boosted.matched) == list(range(n))
    assert np.array_equal(boosted.matched[2:], np.arange(2, n))


def test_plaintext_grams_computed_again_give_the_matching_of_held_ones(releases, monkeypatch):
    # bf16 rough products, as where bf16 is native: the candidates' exact scores need the
    # plaintexts' whole Gram rows, which a sampled pool no longer holds.
    monkeypatch.setattr(statistics, "matmul_dtype", lambda device: torch.bfloat16)
    built = []

    def recording(*args, **kwargs):
        built.append(statistics.sampled_statistics(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(pairing, "sampled_statistics", recording)
    options = dict(self_width=256, assign_max=24)
    held = _run("gram-hungarian", releases["nc3", "reid"], **options)
    assert not built
    sampled = _run("gram-hungarian", releases["nc3", "reid"], held_max=47, **options)
    assert len(built) == 1 and not hasattr(built[0], "gram")
    assert sampled.mapping == held.mapping
    assert _reid_accuracy(releases["nc3", "reid"], sampled) >= 0.9
    assert np.abs(sampled.scores - held.scores).max() < 0.01


def test_when_decoded_thumbnails_decide_the_sampled_pool_is_not_encoded_again(releases, monkeypatch):
    monkeypatch.setattr(statistics, "matmul_dtype", lambda device: torch.bfloat16)  # rough shortlists
    recomputed = []
    exact = statistics.GramComparison._recomputed_exact
    monkeypatch.setattr(
        statistics.GramComparison, "_recomputed_exact", lambda *args: recomputed.append(1) or exact(*args)
    )
    path = releases["nc3", "reid"]
    options = dict(self_width=256, assign_max=24, held_max=47)
    decoded = _run("gram-hungarian", path, decode_from=48, **options)
    assert not recomputed and "re-match by decoded thumbnails" in decoded.diagnostics["stage_seconds"]
    assert _reid_accuracy(path, decoded) >= 0.9
    _run("gram-hungarian", path, decode_from=49, **options)
    assert recomputed  # the Gram matching decides: its candidates' exact values


def test_beyond_scores_max_only_the_mapping_is_submitted(releases):
    submission = _run("gram-hungarian", releases["nc3", "reid"], self_width=256, assign_max=24, scores_max=40)
    assert submission.scores is None
    assert _reid_accuracy(releases["nc3", "reid"], submission) >= 0.9


def test_linear_inversion_reconstructs_linear_preset_above_40_db(releases):
    path = releases["linear", "invert"]
    submission = _run("linear-inversion", path)
    with open_key(path) as key:
        truth = key.read("truth/images").astype(np.float64)
    mse = ((submission.reconstructions - truth) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 40


def test_linear_inversion_reidentifies_nc7_and_places_its_patches(releases):
    path = releases["nc7", "invert"]
    submission = _run("linear-inversion", path, ridge=0.1, ridge_search=False)
    with open_release(path) as release, open_key(path) as key:
        known = np.isin(release.encoded_ids, release.pair_encoded_ids)
        truth, perm = key.read("truth/images").astype(np.float32)[~known], key.read("truth/patch_perm")[~known]
    recon = submission.reconstructions[~known].reshape(int((~known).sum()), -1)
    flat = truth.reshape(len(truth), -1)
    distances = (recon**2).sum(1)[:, None] - 2 * recon @ flat.T + (flat**2).sum(1)
    assert (distances.argmin(1) == np.arange(len(recon))).mean() > 0.9  # chance 1/72
    # Without placing slots by inversion and seams, 83% of the patches land where they belong.
    assert (submission.patch_positions[~known] == perm).mean() > 0.93


def test_cross_validation_picks_no_ridge_for_an_exact_map_and_some_for_a_noisy_one():
    rng = np.random.default_rng(3)
    pixels = torch.from_numpy(rng.normal(size=(8, 4, 16))).float()
    encoded = pixels @ torch.from_numpy(rng.normal(size=(16, 64))).float()
    ridges = (1e-6, 1e-3, 0.1, 1.0)
    assert choose_ridge(encoded, pixels, ridges=ridges, folds=4) == 1e-6
    noisy = encoded + 10 * torch.from_numpy(rng.normal(size=encoded.shape)).float()
    assert choose_ridge(noisy, pixels, ridges=ridges, folds=4) >= 0.1


def _smooth_patches(n_images=30, grid=6, size=4, seed=0):
    """(M, P, S, S) patches of smooth random images, by position."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.normal(size=(n_images, 1, 4, 4)))
    images = torch.nn.functional.interpolate(coarse, size=grid * size, mode="bicubic", align_corners=True)[:, 0]
    return (
        images.reshape(n_images, grid, size, grid, size)
        .permute(0, 1, 3, 2, 4)
        .reshape(n_images, grid * grid, size, size)
    )


def test_seams_of_smooth_images_put_swapped_slots_back():
    by_position = _smooth_patches()
    truth = np.random.default_rng(1).permutation(36)  # position of each slot
    in_slot_order = by_position[:, truth]
    start = truth.copy()
    start[[3, 17]], start[[5, 30]] = start[[17, 3]], start[[30, 5]]
    assert np.array_equal(place_slots_by_continuity(in_slot_order, start, rounds=3), truth)


def test_inverse_map_puts_swapped_slots_back_on_known_pairs():
    pixels = _smooth_patches(n_images=20).reshape(20, 36, 16).float()
    rng = np.random.default_rng(2)
    truth = rng.permutation(36)
    mixing = torch.from_numpy(rng.normal(size=(16, 64))).float()
    known = (pixels[:, truth] @ mixing) + torch.from_numpy(rng.normal(size=(36, 64))).float()  # slot order
    start = truth.copy()
    start[[0, 9]] = start[[9, 0]]
    assert np.array_equal(place_slots_by_inversion(known, pixels, start, ridge=1e-6, rounds=3), truth)


@pytest.mark.parametrize("features", ["self-keyed", "pixels"])
def test_distribution_alignment_predicts_linear_targets(releases, features):
    """Either feature of a plaintext patch carries a linear encoder: its pixels exactly, its
    self-keyed encoding (a linear map of them) as well."""
    path = releases["linear", "transfer"]
    submission = _run("distribution-alignment", path, features=features)
    with open_key(path) as key:
        true = key.read("truth/target_encodings").astype(np.float64).mean(1)
    distances = ((submission.encodings[:, None, :] - true[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == np.arange(len(true))).mean()
    assert accuracy > 5 / len(true)  # far above chance (1/M) even at this tiny size


def test_distribution_alignment_self_keys_at_the_release_width_by_default(releases):
    path = releases["linear", "transfer"]
    default = _run("distribution-alignment", path)
    with open_release(path) as release:
        width = release.config.width
    assert width != 512  # the old fixed default: the test tells the two apart
    assert np.array_equal(default.encodings, _run("distribution-alignment", path, self_width=width).encodings)
    assert not np.array_equal(default.encodings, _run("distribution-alignment", path, self_width=512).encodings)


def test_attack_refuses_a_task_it_does_not_solve(releases):
    with open_release(releases["linear", "invert"]) as release:
        with pytest.raises(NcbenchError, match="solves reid"):
            resolve("gram-hungarian")()(release)


def test_unknown_or_out_of_range_parameters_are_refused():
    cls = resolve("gram-hungarian")
    with pytest.raises(NcbenchError, match="no parameter 'widht'"):
        cls.parse_params({"widht": "3"})
    with pytest.raises(NcbenchError, match="out of range"):
        cls.parse_params({"self_width": "-1"})
    with pytest.raises(NcbenchError, match="not a valid int"):
        cls.parse_params({"self_width": "wide"})
    assert cls.parse_params({"self_width": "128"}).self_width == 128
    for text in ("nan", "inf", "-inf"):  # NaN would pass every range check
        with pytest.raises(NcbenchError, match="not a valid float"):
            resolve("distribution-alignment").parse_params({"mean_weight": text})


def test_registry_refuses_a_duplicate_name():
    class Impostor(Attack):
        name = "gram-hungarian"
        version = "0"
        tasks = ("reid",)
        knowledge = ("architecture",)
        description = "duplicate"

    all_attacks()
    with pytest.raises(NcbenchError, match="already registered"):
        register(Impostor)


def test_bad_plugin_declaration_is_refused_at_class_creation():
    with pytest.raises(TypeError, match="unknown task"):

        class Broken(Attack):  # noqa: F841
            name, version, tasks, knowledge, description = "b", "1", ("steal",), (), "x"


def test_template_plugin_loads_from_file_and_runs(releases, tmp_path):
    cls = load_from_file(str(Path("attacks/template.py").resolve()) + ":MeanPatchNearest")
    out = tmp_path / "sub.h5"
    result = CliRunner().invoke(
        main,
        [
            "attack",
            "run",
            "attacks/template.py:MeanPatchNearest",
            "--release",
            str(releases["nc3", "reid"]),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert read_submission(out).attack == cls.name


@pytest.mark.parametrize("line", ["import does_not_exist", "raise SystemExit(0)", "raise BaseException('x')"])
def test_plugin_file_that_fails_to_import_is_one_line(tmp_path, line):
    plugin = tmp_path / "bad.py"
    plugin.write_text(line + "\n")
    result = CliRunner().invoke(
        main, ["attack", "run", f"{plugin}:X", "--release", "x", "--out", str(tmp_path / "s.h5")]
    )
    assert result.exit_code == 2
    assert "failed to import" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s.h5").exists()


def test_cli_run_on_a_file_that_is_not_a_release_writes_nothing(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    out = tmp_path / "sub.h5"
    result = CliRunner().invoke(main, ["attack", "run", "gram-hungarian", "--release", str(junk), "--out", str(out)])
    assert result.exit_code == 2 and "not an HDF5 file" in result.output
    assert not out.exists()


def test_cli_run_records_parameters_runtime_and_stages(releases, tmp_path):
    out = tmp_path / "sub.h5"
    result = CliRunner().invoke(
        main,
        [
            "attack",
            "run",
            "gram-hungarian",
            "--release",
            str(releases["nc3", "reid"]),
            "--out",
            str(out),
            "--param",
            "self_width=64",
            "--seed",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    submission = read_submission(out)
    assert submission.params["self_width"] == 64 and submission.params["seed"] == 5
    assert submission.runtime_s > 0 and "boost" in submission.diagnostics["stage_seconds"]


def test_attack_list_names_every_builtin():
    result = CliRunner().invoke(main, ["attack", "list"])
    for name in ("gram-hungarian", "linear-inversion", "distribution-alignment", "carlini-2021", "chance", "oracle"):
        assert name in result.output


def test_attack_list_json_declares_every_attack_and_parameter():
    listed = json.loads(CliRunner().invoke(main, ["attack", "list", "--json"]).output)
    assert {each["name"] for each in listed} == set(all_attacks())
    gram = next(each for each in listed if each["name"] == "gram-hungarian")
    width = next(p for p in gram["params"] if p["name"] == "self_width")
    assert width["type"] == "int" and width["min"] <= width["default"] <= width["max"]
    assert gram["tasks"] == ["reid"] and "plaintext-pool" in gram["knowledge"]


@pytest.mark.parametrize("out", ["release", "release file", "folder", "seed"])
def test_attack_run_refuses_its_own_input_a_folder_or_a_bad_seed_before_running(releases, tmp_path, out):
    release = tmp_path / "release"
    shutil.copytree(releases["nc3", "reid"], release)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    target = {"release": release, "release file": release / "public" / "release.h5", "folder": folder}
    args = ["--force"] if out != "seed" else ["--seed", "-1"]
    result = CliRunner().invoke(
        main,
        ["attack", "run", "chance", "--release", str(release), "--out", str(target.get(out, tmp_path / "s.h5")), *args],
    )
    _assert_one_line(result)
    assert (release / "public" / "release.h5").is_file() and (folder / "sub").is_dir()
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.slow
def test_gram_hungarian_full_size_nc7(tmp_path):
    out = tmp_path / "nc7"
    build_release(
        out,
        config=resolve_config("nc7"),
        plan=BuildPlan.for_task("reid", 1000),
        source="sample",
        seed=7,
        test_release=True,
    )
    assert _reid_accuracy(out, _run("gram-hungarian", out)) >= 0.99


# -- hostile plugins -----------------------------------------------------------------------------

PLUGIN = """
from ncbench.attacks import Attack, Submission


class Plugin(Attack):
    name = {name!r}
    version = "1"
    tasks = ("reid",)
    knowledge = ("architecture",)
    description = "test plugin"

    def run(self, release):
        {body}
"""


def _plugin(tmp_path, name="my-attack", body="raise ValueError('no luck\\nat all')"):
    path = tmp_path / "plugin.py"
    path.write_text(PLUGIN.format(name=name, body=body))
    return path


def _run_plugin(spec, release, out):
    return CliRunner().invoke(main, ["attack", "run", str(spec), "--release", str(release), "--out", str(out)])


def _assert_one_line(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (ValueError, TypeError))
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_plugin_whose_run_raises_fails_in_one_line_and_writes_nothing(releases, tmp_path):
    out = tmp_path / "sub.h5"
    result = _run_plugin(f"{_plugin(tmp_path)}:Plugin", releases["nc3", "reid"], out)
    _assert_one_line(result, "attack my-attack failed: ValueError: no luck at all")
    assert not out.exists()


def test_plugin_whose_run_returns_no_submission_fails_in_one_line(releases, tmp_path):
    out = tmp_path / "sub.h5"
    result = _run_plugin(f"{_plugin(tmp_path, body='return None')}:Plugin", releases["nc3", "reid"], out)
    _assert_one_line(result, "attack my-attack failed:")
    assert not out.exists()


@pytest.mark.parametrize("body", ["raise SystemExit(0)", "raise BaseException('x')"])
def test_plugin_whose_run_exits_fails_in_one_line(releases, tmp_path, body):
    out = tmp_path / "sub.h5"
    result = _run_plugin(f"{_plugin(tmp_path, body=body)}:Plugin", releases["nc3", "reid"], out)
    _assert_one_line(result, f"failed: {body.split()[1].split('(')[0]}")
    assert not out.exists()


def test_plugin_naming_the_attack_base_class_is_refused_in_one_line(releases, tmp_path):
    out = tmp_path / "sub.h5"
    result = _run_plugin(f"{_plugin(tmp_path)}:Attack", releases["nc3", "reid"], out)
    _assert_one_line(result, "Attack is abstract")
    assert not out.exists()


def test_abstract_plugin_class_is_refused_in_one_line(releases, tmp_path):
    path = tmp_path / "half.py"
    path.write_text(
        "import abc\nfrom ncbench.attacks import Attack\n\n"
        "class Half(Attack):\n    name, version, tasks, knowledge, description = "
        "'half', '1', ('reid',), (), 'x'\n\n    @abc.abstractmethod\n    def extra(self): ...\n"
    )
    result = _run_plugin(f"{path}:Half", releases["nc3", "reid"], tmp_path / "sub.h5")
    _assert_one_line(result, "Half is abstract", "extra")


@pytest.mark.parametrize(
    "name",
    [
        "gram-hungarian",  # the built-in's own name
        "Gram-Hungarian",  # case
        "gram-hungar\u0456an",  # Cyrillic i
        "\uff47\uff52\uff41\uff4d-hungarian",  # fullwidth
        "gram-hungaria\u0301n",  # combining accent
        "grarn-hungarian",  # rn for m
        "gramhungarian",  # hyphen dropped
        "0racle",  # zero for o
        "oracle",
    ],
)
def test_plugin_cannot_take_a_builtin_name_or_a_look_alike(releases, tmp_path, name):
    out = tmp_path / "sub.h5"
    result = _run_plugin(f"{_plugin(tmp_path, name=name)}:Plugin", releases["nc3", "reid"], out)
    _assert_one_line(result, "plugin attack name")
    assert not out.exists()


@settings(max_examples=200, deadline=None)
@given(name=st.text(min_size=1, max_size=30))
def test_plugin_names_are_plain_ascii_and_never_pass_for_a_builtin(name):
    class Candidate(Attack):
        name, version, tasks, knowledge, description = "candidate", "1", ("reid",), (), "x"

    Candidate.name = name
    builtins = all_attacks()
    try:
        check_plugin_name(Candidate, builtins)
    except NcbenchError as refusal:
        assert "\n" not in str(refusal)
        return
    assert re.fullmatch(r"[a-z0-9-]+", name)
    assert all(name_skeleton(name) != name_skeleton(taken) for taken in builtins)


@given(
    name=st.sampled_from(["gram-hungarian", "linear-inversion", "distribution-alignment", "chance", "oracle"]),
    upper=st.lists(st.booleans(), min_size=30, max_size=30),
    width=st.booleans(),
)
def test_case_and_width_variants_of_builtin_names_are_refused(name, upper, width):
    variant = "".join(c.upper() if u else c for c, u in zip(name, upper))
    if width:
        variant = "".join(chr(ord(c) + 0xFEE0) if c.isalnum() else c for c in variant)

    class Candidate(Attack):
        name, version, tasks, knowledge, description = "candidate", "1", ("reid",), (), "x"

    Candidate.name = variant
    with pytest.raises(NcbenchError, match="plugin attack name"):
        check_plugin_name(Candidate, all_attacks())


def test_attacks_run_on_cuda_when_present_and_refuse_it_when_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve("gram-hungarian")().device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve("gram-hungarian")().device == "cpu"
    with pytest.raises(NcbenchError, match="no CUDA device"):
        resolve("gram-hungarian")(device="cuda")


def test_chunked_first_round_keeps_the_same_mutual_best_pairs():
    rng = np.random.default_rng(5)
    plain_norms = rng.gamma(2.0, size=(70, 16)).astype(np.float32)
    encoded_norms = (plain_norms[rng.permutation(70)[:60]] + rng.normal(0, 0.3, (60, 16))).astype(np.float32)
    encoded = statistics.PatchStatistics(encoded_norms, np.zeros((60, 1), np.float16))
    plain = statistics.PatchStatistics(plain_norms, np.zeros((70, 1), np.float16))
    rows, columns = statistics.sorted_norm_mutual_best(encoded, plain, chunk=7)
    expected = pairing.mutual_best(statistics.sorted_norm_scores(encoded, plain))
    assert len(rows) > 10
    assert np.array_equal(rows, expected[0]) and np.array_equal(columns, expected[1])


def test_decoded_thumbnails_undo_swaps_in_a_mostly_right_matching(releases):
    path = releases["nc7", "reid"]
    with open_release(path) as release, open_key(path) as key:
        truth, positions = key.read("truth/plain_index"), key.read("truth/patch_perm")
        swapped = truth.copy()
        for a, b in [(0, 1), (10, 20), (30, 47)]:
            swapped[[a, b]] = swapped[[b, a]]
        rematched = decoding.rematch_by_decoding(
            release,
            decoding.plain_thumbnails(release.plain_pool, release.config),
            swapped,
            positions,
            channels=release.config.width,
            chunk=16,
            device="cpu",
            rng=np.random.default_rng(0),
        )
    assert np.array_equal(rematched, truth)


def test_gram_hungarian_prefetches_only_releases_whose_every_stored_byte_it_reads(releases, tmp_path, monkeypatch):
    prefetched = []
    monkeypatch.setattr(pairing, "prefetch", lambda path: prefetched.append(Path(path).parent.parent.name))
    wide = tmp_path / "wide"  # channels stored in blocks of 512
    config = resolve_config("nc7", **{**TINY, "width": 1024})
    build_release(wide, config=config, plan=BuildPlan.for_task("reid", 24), source="sample", seed=3, test_release=True)
    for path, channels in ((releases["nc3", "reid"], 64), (wide, 512), (wide, 0)):
        _run("gram-hungarian", path, channels=channels, self_width=64)
    assert prefetched == [releases["nc3", "reid"].name, "wide"]  # the whole rows of either


def test_held_rows_are_the_stored_values_of_the_channels_read(releases):
    """The alignment's widened rows, held: narrowed back to the release's dtype, the bits it stores."""
    with open_release(releases["nc3", "reid"]) as release:
        channels = release.config.width // 2
        held = decoding.HeldRows(release, channels)
        for start, block in release.iter_encoded(7, dtype=None, channels=channels):
            held.add(start, torch.from_numpy(block).float())
        rows = np.array([0, 5, 3, release.n_encoded - 1])
        stored = release.encoded_rows(rows, dtype=None, channels=channels)
    assert held.rows.dtype == stored.dtype
    np.testing.assert_array_equal(held.encoded_rows(rows, dtype=None), stored)
    np.testing.assert_array_equal(held.encoded_rows(rows, channels=3), stored[..., :3].astype(np.float32))


def test_gram_hungarian_rematches_by_decoding_from_decode_from_encodings(releases, monkeypatch):
    path = releases["nc3", "reid"]
    passes = []
    iter_encoded = Release.iter_encoded
    monkeypatch.setattr(Release, "iter_encoded", lambda *a, **k: passes.append(1) or iter_encoded(*a, **k))
    rematched = _run("gram-hungarian", path, self_width=256, assign_max=24, decode_from=48)
    assert "re-match by decoded thumbnails" in rematched.diagnostics["stage_seconds"]
    assert _reid_accuracy(path, rematched) >= 0.9
    held_passes = len(passes)
    monkeypatch.setattr(decoding, "HELD_ROWS_BYTES", 0)  # rows too large to hold: a second pass
    streamed = _run("gram-hungarian", path, self_width=256, assign_max=24, decode_from=48)
    assert len(passes) == 2 * held_passes + 1  # the same passes, and one more over the release
    assert streamed.mapping == rematched.mapping
    off = _run("gram-hungarian", path, self_width=256, assign_max=24, decode_from=48, decode_pairs=0)
    fewer = _run("gram-hungarian", path, self_width=256, assign_max=24, decode_from=49)
    for submission in (off, fewer):
        assert "re-match by decoded thumbnails" not in submission.diagnostics["stage_seconds"]
        assert submission.diagnostics["rematched_by_decoding"] == 0


@pytest.mark.parametrize("patch", [16, 4])  # blocks of 8 and 4 pixels, and one block of the whole patch
def test_thumbnails_are_block_means_of_the_normalised_patches_also_when_taken_batch_by_batch(patch):
    config = resolve_config("nc3", image_size=32, patch_size=patch)
    images = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (10, 32, 32), dtype=np.uint8))

    def block_means(sub):
        sub = min(sub, patch)
        patches = images_to_patches(images, config).reshape(10, config.n_patches, patch // sub, sub, patch // sub, sub)
        return patches.mean((3, 5)).flatten(2)

    coarse, fine = block_means(decoding.SUBPATCH), block_means(decoding.FINE_SUBPATCH)
    torch.testing.assert_close(decoding.thumbnail_patches(images, config), coarse)
    torch.testing.assert_close(decoding.thumbnail_patches(images, config, decoding.FINE_SUBPATCH), fine)
    torch.testing.assert_close(decoding.coarsened(fine, config), coarse)
    pool = decoding.PoolThumbnails(10, config)
    pool.add(0, images[:6])
    with pytest.raises(RuntimeError, match="6 of 10"):
        pool.thumbnails()
    pool.add(6, images[6:])
    thumbs = pool.thumbnails()
    torch.testing.assert_close(thumbs.coarse, coarse.flatten(1))
    torch.testing.assert_close(thumbs.fine, fine.flatten(1).half())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoded_thumbnails_find_their_nearest_plaintexts_in_either_precision(dtype, monkeypatch):
    monkeypatch.setattr(decoding, "matmul_dtype", lambda device: dtype)
    config = resolve_config("nc3", image_size=32, patch_size=16)  # 4 patches of 2 x 2 coarse, 4 x 4 fine values
    rng = np.random.default_rng(2)
    # Near-identical views: one shared image plus small differences, as views of one film are.
    fine = torch.from_numpy(1 + rng.normal(size=64) + 0.05 * rng.normal(size=(300, 64))).float()
    thumbs = decoding.Thumbnails(decoding.coarsened(fine.reshape(300, 4, 16), config).flatten(1), fine.half())
    source = rng.permutation(300)[:120]
    decoded_fine = fine[source] + 0.005 * torch.randn(120, 64, generator=torch.Generator().manual_seed(0))
    decoded = decoding.Thumbnails(
        decoding.coarsened(decoded_fine.reshape(120, 4, 16), config).flatten(1), decoded_fine.half()
    )
    current = rng.permutation(300)[:120]
    columns, distances = decoding.nearest_plaintexts(decoded, thumbs, current=current, device="cpu")
    k = decoding.DECODE_CANDIDATES
    assert columns.shape == (120, k + 1) and all(len(set(row)) == k + 1 for row in columns)
    assert np.array_equal(columns[:, 0], source)
    assert (np.diff(distances[:, :k], axis=1) >= 0).all()
    assert all(c in row for c, row in zip(current, columns))
    exact = ((decoded.fine.float()[:, None] - thumbs.fine.float()[torch.from_numpy(columns)]) ** 2).sum(2).numpy()
    np.testing.assert_allclose(distances, exact, rtol=1e-4)


def test_views_that_coarse_thumbnails_cannot_tell_apart_are_ranked_by_fine_ones():
    config = resolve_config("nc3", image_size=32, patch_size=16)
    rng = np.random.default_rng(4)
    base = torch.from_numpy(rng.normal(size=(50, 4, 4, 4))).float()  # (image, patch, 4 x 4 fine values)
    # A twin of each image: a checkerboard within every 2 x 2 block, so its coarse thumbnail is the same.
    twin = base + 0.3 * torch.tensor([[1.0, -1, 1, -1], [-1, 1, -1, 1]] * 2)
    fine = torch.cat([base, twin]).reshape(100, 4, 16)
    thumbs = decoding.Thumbnails(decoding.coarsened(fine, config).flatten(1), fine.flatten(1).half())
    torch.testing.assert_close(thumbs.coarse[:50], thumbs.coarse[50:])
    decoded = decoding.Thumbnails(thumbs.coarse[50:], thumbs.fine[50:])  # the twins, decoded exactly
    columns, _ = decoding.nearest_plaintexts(decoded, thumbs, current=np.arange(50), device="cpu")
    assert np.array_equal(columns[:, 0], np.arange(50, 100))


def test_a_chain_of_displaced_matches_is_assigned_again_densely():
    rng = np.random.default_rng(5)
    thumbs = torch.from_numpy(rng.normal(size=(40, 12))).float()
    decoded = thumbs + 0.01 * torch.from_numpy(rng.normal(size=(40, 12))).float()  # encoding i is plaintext i
    truth = np.arange(40)
    # Encoding 0 misses its plaintext among its candidates and takes 1's, 1 takes 2's, ... 4 takes 0's.
    matched = truth.copy()
    matched[:5] = [1, 2, 3, 4, 0]

    def candidates(row):
        chosen = list(dict.fromkeys([matched[row]] + ([row] if row else [])))
        return chosen + [c for c in rng.permutation(40) if c not in chosen and c != 0][: 4 - len(chosen)]

    columns = np.array([candidates(row) for row in range(40)])
    distances = ((decoded[:, None] - thumbs[torch.from_numpy(columns)]) ** 2).sum(2).double().numpy()
    order = np.argsort(distances, 1)  # nearest first, as nearest_plaintexts gives them
    columns, distances = np.take_along_axis(columns, order, 1), np.take_along_axis(distances, order, 1)
    assert (columns[:5, 0] != matched[:5]).all() and (columns[5:, 0] == matched[5:]).all()
    resolved = decoding.resolve_displaced(matched, columns, distances, decoded, thumbs, device="cpu")
    assert np.array_equal(resolved, truth)
