"""Exact pairs from repeated patches (attacks/duplicates.py) and their use by gram-hungarian."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ncbench.attacks import alignment, pairing
from ncbench.attacks.duplicates import exact_pairs, patch_hashes, row_hashes, shared_groups
from ncbench.attacks.plugins.registry import resolve
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.files import open_key, open_release
from ncbench.challenge.release import BuildPlan, build_release


def test_row_hashes_tell_rows_apart_by_every_bit():
    rows = torch.randn(3, 5, 100).to(torch.float16)
    rows[1, 2] = rows[0, 4]
    hashes = row_hashes(rows)
    assert hashes.shape == (3, 5, 2)
    assert (hashes[1, 2] == hashes[0, 4]).all()
    changed = rows.clone()
    changed.view(torch.int16)[0, 0, 99] ^= 1  # the last bit of the last value
    assert (row_hashes(changed)[0, 0] != hashes[0, 0]).any()
    assert len(np.unique(hashes.reshape(-1, 2), axis=0)) == 14


def test_patch_hashes_separate_positions():
    images = np.zeros((2, 16, 16), np.uint8)  # every patch blank: equal content, 4 positions
    images[1, :8, :8] = 7
    groups = shared_groups(patch_hashes(images, 8))
    assert sorted(len(g) for g in groups) == [2, 2, 2]  # positions 1, 2, 3 shared; position 0 not


def test_shared_groups_drop_an_image_repeated_within_a_group():
    hashes = np.zeros((3, 2, 2), np.int64)
    hashes[0, 1] = hashes[1, 0] = 5  # one group of images 0 and 1
    hashes[2] = 9  # image 2 twice: not a group of two images
    hashes[0, 0], hashes[1, 1] = 1, 2
    groups = shared_groups(hashes)
    assert [sorted(g.tolist()) for g in groups] == [[0, 1]]


def _relabelled(groups, permutation, rng):
    """The same structure with items renamed by ``permutation`` and groups in another order."""
    return [np.sort(permutation[g]) for g in (groups[k] for k in rng.permutation(len(groups)))]


def _structure(rng, n, grid=8):
    """Groups of the (position, patch) pairs n images share: about half of them have a saturated
    rectangle, about half a black one, as radiographs do. The last two images are the same."""
    groups = []
    for _ in ("saturated", "black"):
        mask = np.zeros((n, grid, grid), bool)
        for i in np.flatnonzero(rng.random(n - 1) < 0.5):
            h, w = rng.integers(1, 5, 2)
            y, x = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
            mask[i, y : y + h, x : x + w] = True
        mask[n - 1] = mask[n - 2]
        groups += [np.flatnonzero(column) for column in mask.reshape(n, -1).T if column.sum() > 1]
    return groups


def test_exact_pairs_recover_the_hidden_pairing_and_only_where_it_is_unique():
    rng = np.random.default_rng(0)
    n = 120
    groups = _structure(rng, n)
    permutation = rng.permutation(n)
    rows, columns = exact_pairs(groups, _relabelled(groups, permutation, rng), n, n)
    assert len(rows) > 60
    assert (permutation[rows] == columns).all()
    assert not np.isin(rows, [n - 2, n - 1]).any()  # interchangeable: never paired


def test_exact_pairs_across_batches_see_each_batch_share_of_a_group():
    """Encoded in batches, a repeated patch shows as one group per batch (and not at all in a batch
    that holds one of its images): the plaintext structure restricted to pairs inside a batch."""
    rng = np.random.default_rng(2)
    n, batch = 120, 40
    plain_groups = _structure(rng, n)
    permutation = rng.permutation(n)  # encoding e is plaintext permutation[e]
    batch_of_plain = np.empty(n, np.int64)
    batch_of_plain[permutation] = np.arange(n) // batch
    encoded_of = np.argsort(permutation)
    encoded_groups = []
    for group in plain_groups:
        for b in np.unique(batch_of_plain[group]):
            inside = group[batch_of_plain[group] == b]
            if len(inside) > 1:
                encoded_groups.append(np.sort(encoded_of[inside]))
    rows, columns = exact_pairs(encoded_groups, plain_groups, n, n)
    assert len(rows) > 50
    assert (permutation[rows] == columns).all()


def test_exact_pairs_give_up_when_the_structures_disagree():
    rng = np.random.default_rng(1)
    groups = _structure(rng, 50)
    assert len(exact_pairs(groups, [g[:2] for g in groups], 50, 50)[0]) == 0  # counts the pool cannot hold
    assert len(exact_pairs([], groups, 50, 50)[0]) == 0


@pytest.fixture(scope="module")
def deep_one_batch(tmp_path_factory):
    """44 private blocks (nc47's depth) at a tiny size, one BatchNorm batch of sample views."""
    out = tmp_path_factory.mktemp("deep") / "nc47"
    config = resolve_config("nc47", width=256, image_size=64, patch_size=8, bn_batch=64)
    build_release(out, config=config, plan=BuildPlan.for_task("reid", 64), source="sample", seed=3, test_release=True)
    return out


def _attack(path, **params):
    cls = resolve("gram-hungarian")
    with open_release(path) as release, open_key(path) as key:
        submission = cls(dataclasses.replace(cls.Params(), self_width=256, **params))(release)
        truth = [release.plain_ids[j] for j in key.read("truth/plain_index")]
    return submission, float(np.mean([a == b for a, b in zip(truth, submission.mapping)]))


def test_gram_hungarian_starts_from_exact_pairs_at_depth(deep_one_batch):
    with_pairs, accuracy = _attack(deep_one_batch)
    without, accuracy_without = _attack(deep_one_batch, duplicates=False)
    assert with_pairs.diagnostics["exact_pairs"] >= 8
    assert without.diagnostics["exact_pairs"] == 0
    assert accuracy >= accuracy_without + 0.2


def test_exact_pairs_of_a_deep_release_are_right(deep_one_batch):
    cls = resolve("gram-hungarian")
    attack = cls(dataclasses.replace(cls.Params(), self_width=256))
    with open_release(deep_one_batch) as release, open_key(deep_one_batch) as key:
        aligned = pairing.aligned_statistics(release, attack, chunk=16, hashes=True)
        rows, columns = pairing.find_exact_pairs(aligned, release.plain_images, release.config.patch_size)
        truth = key.read("truth/plain_index")
    assert len(rows) >= 8
    assert (truth[rows] == columns).all()


def test_no_exact_pairs_without_the_positional_embedding(tmp_path):
    """`linear` encodes a patch alike at every position: repeated rows would not say where."""
    out = tmp_path / "linear"
    config = resolve_config("linear", width=256, image_size=64, patch_size=8, bn_batch=64)
    build_release(out, config=config, plan=BuildPlan.for_task("reid", 64), source="sample", seed=3, test_release=True)
    submission, accuracy = _attack(out)
    assert submission.diagnostics["exact_pairs"] == 0
    assert accuracy > 0.9


@pytest.fixture(scope="module")
def deep_four_batches(tmp_path_factory):
    """As ``deep_one_batch``, 256 images in four BatchNorm batches: enough encodings for each
    slot's principal component."""
    out = tmp_path_factory.mktemp("deep4") / "nc47"
    config = resolve_config("nc47", width=256, image_size=64, patch_size=8, bn_batch=64)
    build_release(out, config=config, plan=BuildPlan.for_task("reid", 256), source="sample", seed=3, test_release=True)
    return out


def _stages(submission) -> set[str]:
    return set(submission.diagnostics["stage_seconds"])


def test_the_principal_comparison_re_identifies_more_than_the_boostings_gram_scores_at_depth(
    deep_four_batches, monkeypatch
):
    """At width 256 the boosting's matching starts the comparison (the exact pairs alone are the
    worse start there): 43.0% against 19.9% for boosting alone when measured."""
    compared, accuracy = _attack(deep_four_batches)
    assert compared.diagnostics["exact_pairs"] >= 8
    assert {"boost", "compare principal components fitted on the matching"} <= _stages(compared)
    assert "compare principal components fitted on exact pairs" not in _stages(compared)
    monkeypatch.setattr(pairing, "ANCHORED_BELOW", -1.0)  # never: the boosting's own scores decide
    _, accuracy_boosted = _attack(deep_four_batches)
    assert accuracy >= accuracy_boosted + 0.08


def test_the_alignment_at_depth_compares_rows_without_their_content_direction(deep_four_batches, monkeypatch):
    """On the deep test release, 43.0% re-identified with the content direction projected out of
    the alignment, 28.9% with rows and reference compared in the full space, when measured."""
    _, projected = _attack(deep_four_batches)
    monkeypatch.setattr(pairing, "content_direction", lambda view, reference, **_: torch.zeros(reference.shape[1]))
    _, full = _attack(deep_four_batches)
    assert projected >= full + 0.08


def test_at_full_width_the_exact_pairs_start_the_comparison_without_gram_statistics(deep_four_batches, monkeypatch):
    monkeypatch.setattr(pairing, "COMPARE_FIRST_WIDTH", 256)  # as if this release were as wide as nc47
    monkeypatch.setattr(pairing, "COMPARED_FIRST_ENOUGH", 0.0)  # the comparison stands
    first, _ = _attack(deep_four_batches)
    assert "compare principal components fitted on exact pairs" in _stages(first)
    assert not {"self-keyed plaintext statistics", "boost"} & _stages(first)
    assert first.diagnostics["exact_pairs"] >= 8
    # Where too few of its pairs are mutual best (here about a fifth), boosting goes on as before.
    monkeypatch.setattr(pairing, "COMPARED_FIRST_ENOUGH", 0.6)
    fallen_back, _ = _attack(deep_four_batches)
    assert {"compare principal components fitted on exact pairs", "boost"} <= _stages(fallen_back)


class _Encodings:
    """What the alignment's start and its content direction read from a release."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.n_encoded = rows, len(rows)
        self.config = resolve_config("nc47")

    def encoded_rows(self, index, *, channels=None):
        return self.rows[np.asarray(index), :, :channels]


def test_the_alignment_starts_from_the_encoding_the_others_agree_with():
    rng = np.random.default_rng(8)
    n, patches, width = 40, 16, 24
    means = rng.standard_normal((patches, width))
    order = np.stack([rng.permutation(patches) for _ in range(n)])  # row r of encoding i: position order[i, r]
    rows = means[order] + 0.6 * rng.standard_normal((n, patches, width))
    rows[0] = 3 * rng.standard_normal((patches, width))  # an atypical first encoding
    encodings = _Encodings(rows.astype(np.float32))
    start = alignment.consensus_start(encodings, candidates=6, sample=n)
    assert start != 0

    def placed(start):  # rows in a slot of one position, under the best relabelling
        slots = alignment.align(torch.from_numpy(encodings.rows), torch.from_numpy(encodings.rows[start]))[0]
        counts = np.zeros((patches, patches))
        np.add.at(counts, (slots.ravel(), order.ravel()), 1)
        return counts[np.arange(patches), linear_sum_assignment(-counts)[1]].sum() / counts.sum()

    assert placed(start) >= 0.95 > placed(0) + 0.2


def test_the_alignment_at_depth_looks_past_what_the_patch_holds():
    """Rows that move with their patch along one direction shared by every slot, far more than two
    slots differ: compared in the full space many rows land in another position's slot (about 31%
    here); with that direction found and projected out of rows and reference, every row lands in its own."""
    rng = np.random.default_rng(9)
    n, patches, width = 64, 16, 32
    means = rng.standard_normal((patches, width))
    content = rng.standard_normal(width)
    content /= np.linalg.norm(content)
    order = np.stack([rng.permutation(patches) for _ in range(n)])  # row r of encoding i: position order[i, r]
    held = 30 * rng.standard_normal((n, patches, 1)) * content  # what each patch holds, along one direction
    rows = (means[order] + held + 0.1 * rng.standard_normal((n, patches, width))).astype(np.float32)
    encodings = _Encodings(rows)
    reference = torch.from_numpy(means.astype(np.float32))  # slot s is position s
    direction = alignment.content_direction(encodings, reference, sample=n)
    assert abs(float(direction @ torch.from_numpy(content).float())) > 0.99

    def right(projected: bool) -> float:
        encoded, slots_of = torch.from_numpy(rows), reference
        if projected:
            encoded, slots_of = alignment.without(encoded, direction), alignment.without(reference, direction)
        return float(np.mean(alignment.align(encoded, slots_of)[0] == order))

    assert right(projected=True) == 1.0
    assert right(projected=False) < 0.9
