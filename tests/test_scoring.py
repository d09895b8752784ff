"""Scoring submissions against real (tiny) releases and keys."""

import shutil

import h5py
import numpy as np
import pytest
import torch

from ncbench.attacks.submission import Submission, write_submission
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.files import open_key, open_release
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.errors import NcbenchError
from ncbench.leaderboard.scoring import ChallengeInfo, score_submission, submission_limits

torch.set_num_threads(1)
TINY = resolve_config("nc7", width=32, image_size=32, patch_size=8, bn_batch=8)


def build(out, task, n=20, seed=1):
    build_release(
        out, config=TINY, plan=BuildPlan.for_task(task, n), source="phantom", seed=seed, test_release=True, device="cpu"
    )
    return out


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return {task: build(root / task, task) for task in ("reid", "transfer", "invert")}


def truth(release_dir, name):
    with open_key(release_dir) as key:
        return key.read(f"truth/{name}")


def base(release_dir, attack="test-attack", **parts):
    with open_release(release_dir) as release:
        return Submission(
            release.challenge_id,
            attack,
            "1.0",
            release.encoded_ids,
            params={"seed": 0},
            knowledge=("architecture",),
            runtime_s=1.0,
            **parts,
        )


def perfect_mapping(release_dir):
    with open_release(release_dir) as release:
        plain_ids = release.plain_ids
    return [plain_ids[j] for j in truth(release_dir, "plain_index")]


def key_of(release_dir):
    return release_dir / "private" / "key.h5"


def score(tmp_path, release_dir, submission, name="sub.h5"):
    path = write_submission(tmp_path / name, submission)
    return score_submission(path, key_of(release_dir))


def test_perfect_reid_mapping_scores_one_on_both_halves(tmp_path, releases):
    result = score(tmp_path, releases["reid"], base(releases["reid"], mapping=perfect_mapping(releases["reid"])))
    for split in (0, 1):
        assert result.metrics[split]["reid_accuracy"] == 1.0
        assert result.metrics[split]["k_anonymity"] == 1.0
        assert result.metrics[split]["chance"] == 1 / 20
        assert result.metrics[split]["one_to_one"] == 1.0
    assert result.metrics[0]["n"] + result.metrics[1]["n"] == 20
    assert result.challenge.task == "reid" and result.challenge.preset == "nc7"


def test_partly_right_mapping_is_scored_per_half(tmp_path, releases):
    rel = releases["reid"]
    mapping = perfect_mapping(rel)
    right = [0, 1, 2, 3, 4]
    wrong = mapping[5:]
    mapping = mapping[:5] + wrong[1:] + wrong[:1]  # rotate the rest: all of it wrong
    split = truth(rel, "split")
    result = score(tmp_path, rel, base(rel, mapping=mapping))
    for half in (0, 1):
        in_half = split == half
        expected = sum(in_half[i] for i in right) / in_half.sum()
        assert result.metrics[half]["reid_accuracy"] == pytest.approx(expected)


def test_score_matrix_is_matched_one_to_one(tmp_path, releases):
    rel = releases["reid"]
    plain_index = truth(rel, "plain_index")
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 0.1, (20, 20)).astype(np.float32)
    scores[np.arange(20), plain_index] += 1.0
    # Row 0 prefers plaintext of row 1 too: a greedy argmax would collide, the assignment does not.
    scores[0, plain_index[1]] = 0.9
    result = score(tmp_path, rel, base(rel, scores=scores))
    assert result.metrics[0]["reid_accuracy"] == 1.0 and result.metrics[1]["reid_accuracy"] == 1.0
    assert result.metrics[0]["top1_accuracy"] == 1.0
    assert result.metrics[0]["mrr"] == 1.0


def test_scores_give_tpr_at_low_fpr_per_half(tmp_path, releases):
    # Public-half rows: the truth stands far above every other score. Private-half rows: the truth
    # sits below every negative. Each half has 10 rows, so 10 x 19 = 190 negatives.
    rel = releases["reid"]
    plain_index, split = truth(rel, "plain_index"), truth(rel, "split")
    scores = np.random.default_rng(0).uniform(0, 1, (20, 20)).astype(np.float32)
    scores[np.arange(20), plain_index] = np.where(split == 0, 5.0, -5.0)
    result = score(tmp_path, rel, base(rel, scores=scores))
    for name in ("tpr_at_0.1pct_fpr", "tpr_at_1pct_fpr"):
        assert result.metrics[0][name] == 1.0
        assert result.metrics[1][name] == 0.0


def test_mapping_alone_has_no_confidence_metrics(tmp_path, releases):
    result = score(tmp_path, releases["reid"], base(releases["reid"], mapping=perfect_mapping(releases["reid"])))
    assert "tpr_at_1pct_fpr" not in result.metrics[0]


def test_score_columns_are_matched_by_plain_ids(tmp_path, releases):
    rel = releases["reid"]
    with open_release(rel) as release:
        plain_ids = release.plain_ids
    plain_index = truth(rel, "plain_index")
    reversed_columns = plain_ids[::-1]
    scores = np.zeros((20, 20), np.float32)
    for i, j in enumerate(plain_index):
        scores[i, reversed_columns.index(plain_ids[j])] = 1.0
    result = score(tmp_path, rel, base(rel, scores=scores, plain_ids=reversed_columns))
    assert result.metrics[0]["reid_accuracy"] == 1.0


def test_rows_in_any_order_are_matched_by_encoded_id(tmp_path, releases):
    rel = releases["reid"]
    submission = base(rel, mapping=perfect_mapping(rel))
    order = np.random.default_rng(3).permutation(20)
    submission.encoded_ids = [submission.encoded_ids[i] for i in order]
    submission.mapping = [submission.mapping[i] for i in order]
    assert score(tmp_path, rel, submission).metrics[1]["reid_accuracy"] == 1.0


def test_csv_mapping_is_accepted(tmp_path, releases):
    rel = releases["reid"]
    result = score(tmp_path, rel, base(rel, mapping=perfect_mapping(rel)), name="sub.csv")
    assert result.metrics[0]["reid_accuracy"] == 1.0
    assert result.attack == "csv"


def test_mapping_that_is_not_one_to_one_is_scored_and_reported(tmp_path, releases):
    rel = releases["reid"]
    mapping = perfect_mapping(rel)
    mapping[1] = mapping[0]
    result = score(tmp_path, rel, base(rel, mapping=mapping))
    assert result.metrics[0]["one_to_one"] == 0.0
    assert any("not one-to-one" in note for note in result.notes)
    assert result.metrics[0]["reid_accuracy"] + result.metrics[1]["reid_accuracy"] < 2.0


def test_patch_positions_are_scored(tmp_path, releases):
    rel = releases["reid"]
    perm = truth(rel, "patch_perm")
    positions = perm.copy()
    positions[:, :8] = (perm[:, :8] + 1) % 16  # half of every row wrong
    result = score(tmp_path, rel, base(rel, mapping=perfect_mapping(rel), patch_positions=positions))
    assert result.metrics[0]["patch_position_accuracy"] == 0.5


def test_perfect_reconstructions_of_invert(tmp_path, releases):
    rel = releases["invert"]
    result = score(tmp_path, rel, base(rel, reconstructions=truth(rel, "images")))
    with open_release(rel) as release:
        n_known = len(release.pair_encoded_ids)
    assert result.metrics[0]["n"] + result.metrics[1]["n"] == 20 - n_known  # known pairs excluded
    for split in (0, 1):
        assert result.metrics[split]["reid_accuracy"] == 1.0
        assert result.metrics[split]["ssim"] == pytest.approx(1.0)
        assert result.metrics[split]["psnr"] == 100.0
        assert result.metrics[split]["chance"] == 1 / (20 - n_known)


def test_invert_may_leave_out_the_known_pairs(tmp_path, releases):
    rel = releases["invert"]
    with open_release(rel) as release:
        known = set(release.pair_encoded_ids)
        ids = release.encoded_ids
    keep = [i for i, e in enumerate(ids) if e not in known]
    submission = base(rel, reconstructions=truth(rel, "images")[keep])
    submission.encoded_ids = [ids[i] for i in keep]
    assert score(tmp_path, rel, submission).metrics[0]["reid_accuracy"] == 1.0


def test_known_pairs_do_not_count_for_invert(tmp_path, releases):
    rel = releases["invert"]
    with open_release(rel) as release:
        known = {release.encoded_ids.index(e) for e in release.pair_encoded_ids}
    images = np.zeros((20, 32, 32), np.uint8)
    images[list(known)] = truth(rel, "images")[list(known)]  # right only where the answer is public
    result = score(tmp_path, rel, base(rel, reconstructions=images))
    assert result.metrics[0]["psnr"] < 30 and result.metrics[1]["psnr"] < 30


def test_perfect_transfer_encodings(tmp_path, releases):
    rel = releases["transfer"]
    with open_release(rel) as release:
        targets = release.target_ids
    result = score(
        tmp_path, rel, base(rel, encodings=truth(rel, "target_encodings").astype(np.float32), target_ids=targets)
    )
    assert result.metrics[0]["nn_accuracy"] == 1.0 and result.metrics[1]["nn_accuracy"] == 1.0
    assert result.metrics[0]["chance"] == 1 / len(targets)


def test_transfer_accepts_mean_patch_vectors_without_encoded_ids(tmp_path, releases):
    rel = releases["transfer"]
    mean_vectors = truth(rel, "target_encodings").astype(np.float32).mean(axis=1)
    submission = base(rel, encodings=mean_vectors)
    submission.encoded_ids = []
    assert score(tmp_path, rel, submission).metrics[1]["nn_accuracy"] == 1.0


def test_oracle_submissions_are_refused(tmp_path, releases):
    rel = releases["reid"]
    with pytest.raises(NcbenchError, match="reads the secret key"):
        score(tmp_path, rel, base(rel, attack="oracle", mapping=perfect_mapping(rel)))
    renamed = base(rel, attack="my-oracle", mapping=perfect_mapping(rel))
    renamed.knowledge = ("architecture", "key")
    with pytest.raises(NcbenchError, match="reads the secret key"):
        score(tmp_path, rel, renamed)


def test_self_sampled_keys_are_not_the_secret_key(tmp_path, releases):
    rel = releases["reid"]
    submission = base(rel, mapping=perfect_mapping(rel))
    submission.knowledge = ("architecture", "self-sampled-keys")
    assert score(tmp_path, rel, submission).metrics[0]["reid_accuracy"] == 1.0


def test_submission_for_another_challenge_is_refused(tmp_path, releases):
    rel = releases["reid"]
    submission = base(rel, mapping=perfect_mapping(rel))
    submission.challenge_id = "nc7-reid-00000000"
    with pytest.raises(NcbenchError, match="for challenge 'nc7-reid-00000000'"):
        score(tmp_path, rel, submission)


def test_missing_required_part_is_refused(tmp_path, releases):
    rel = releases["invert"]
    with pytest.raises(NcbenchError, match="task needs .reconstructions."):
        score(tmp_path, rel, base(rel, patch_positions=truth(rel, "patch_perm")))


def test_key_of_another_challenge_is_refused(tmp_path, releases):
    rel = releases["reid"]
    path = write_submission(tmp_path / "sub.h5", base(rel, mapping=perfect_mapping(rel)))
    with pytest.raises(NcbenchError, match="not the release this key was issued with"):
        score_submission(path, key_of(releases["invert"]), release_path=rel)


def _swap_plain_ids(h5):
    ids = h5["plain/ids"]
    ids[0], ids[1] = ids[1], ids[0]


def _flip_byte(path):
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))


TAMPERINGS = {
    "swapped plain/ids row": lambda path: _edit(path, _swap_plain_ids),
    "preset attribute": lambda path: _edit(path, lambda h5: h5.attrs.__setitem__("preset", "nc47")),
    "extra dataset": lambda path: _edit(path, lambda h5: h5.create_dataset("encoded/extra", data=[1, 2])),
    "flipped byte": _flip_byte,
}


def _edit(path, change):
    with h5py.File(path, "a") as h5:
        change(h5)


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_tampered_release_is_refused_before_it_is_read(tmp_path, releases, tampering):
    copy = tmp_path / "copy"
    shutil.copytree(releases["reid"], copy)
    TAMPERINGS[tampering](copy / "public" / "release.h5")
    path = write_submission(tmp_path / "sub.h5", base(copy, mapping=perfect_mapping(copy)))
    with pytest.raises(NcbenchError, match="is not the release this key was issued with"):
        score_submission(path, key_of(copy))


def test_key_without_a_release_digest_vouches_for_nothing(tmp_path, releases):
    copy = tmp_path / "copy"
    shutil.copytree(releases["reid"], copy)
    path = write_submission(tmp_path / "sub.h5", base(copy, mapping=perfect_mapping(copy)))
    with h5py.File(key_of(copy), "a") as key:
        del key.attrs["release_sha256"]
    with pytest.raises(NcbenchError, match="records no release sha256"):
        score_submission(path, key_of(copy))


def test_challenge_info_says_whether_the_key_is_public(tmp_path, releases):
    result = score(tmp_path, releases["reid"], base(releases["reid"], mapping=perfect_mapping(releases["reid"])))
    assert result.challenge.test_release is True  # the fixture builds test releases from small seeds
    assert ChallengeInfo.__dataclass_fields__["test_release"].default is False


def test_parts_the_task_ignores_are_not_read(tmp_path, releases):
    rel = releases["reid"]  # the linear-inversion attack writes reconstructions for reid too
    submission = base(rel, mapping=perfect_mapping(rel), reconstructions=np.zeros((20, 32, 32), np.float32))
    result = score(tmp_path, rel, submission)
    assert "ignored reconstructions (not used by the reid task)" in result.notes
    assert submission_limits_of(rel).read == {"encoded_ids", "mapping", "scores", "plain_ids", "patch_positions"}


def submission_limits_of(release_dir):
    with open_release(release_dir) as release:
        return submission_limits(release)


def test_submission_limits_follow_the_challenge(releases):
    limits = submission_limits_of(releases["reid"])
    assert limits.part_bytes["scores"] == 20 * 20 * 8 and limits.part_bytes["patch_positions"] == 20 * 16 * 8
    assert limits.csv_rows == 20
    transfer = submission_limits_of(releases["transfer"])
    assert transfer.read == {"encoded_ids", "encodings", "target_ids", "patch_positions"}


def test_tampered_key_fails_the_commitment(tmp_path, releases):
    copy = build(tmp_path / "copy", "reid")
    with h5py.File(key_of(copy), "a") as key:
        plain_index = key["truth/plain_index"]
        plain_index[0], plain_index[1] = plain_index[1], plain_index[0]
    path = write_submission(tmp_path / "sub.h5", base(copy, mapping=perfect_mapping(copy)))
    with pytest.raises(NcbenchError, match="commitment does not match"):
        score_submission(path, key_of(copy))


def test_release_must_be_beside_the_key_or_given(tmp_path, releases):
    rel = releases["reid"]
    lone_key = tmp_path / "elsewhere" / "key.h5"
    lone_key.parent.mkdir()
    lone_key.write_bytes(key_of(rel).read_bytes())
    path = write_submission(tmp_path / "sub.h5", base(rel, mapping=perfect_mapping(rel)))
    with pytest.raises(NcbenchError, match="pass --release"):
        score_submission(path, lone_key)
    assert (
        score_submission(path, lone_key, release_path=rel / "public" / "release.h5").metrics[0]["reid_accuracy"] == 1.0
    )
