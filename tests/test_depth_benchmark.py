"""benchmarks/run.py scores a transfer or link attack with the challenge's metric, cuts reid releases
into smaller ones for its scale runs and copies them into another layout for its reading times, and
benchmarks/depth.py tabulates and merges transfer runs
(the full-size sweep itself is the lead's, in RESULTS.md)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.files import open_key, open_release
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.errors import NcbenchError

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared option parser
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def linear_transfer(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer") / "linear-transfer"
    tiny = resolve_config("linear", width=256, image_size=64, patch_size=8, bn_batch=32)
    build_release(
        out, config=tiny, plan=BuildPlan.for_task("transfer", 64), source="phantom", seed=5, test_release=True
    )
    return out


def test_run_attack_scores_transfer_by_nearest_neighbour_accuracy(linear_transfer):
    result = _script("run").attack(str(linear_transfer), "distribution-alignment")
    assert result["targets"] > 4
    # A linear encoder is predicted almost exactly; chance is one target in `targets`.
    assert result["nn_accuracy"] > 4 / result["targets"]
    assert "reid_accuracy" not in result


def test_run_attack_scores_link_by_r_precision_on_both_halves(tmp_path):
    out = tmp_path / "nc3-link"
    tiny = resolve_config("nc3", width=64, image_size=64, patch_size=8, bn_batch=16)
    build_release(
        out, config=tiny, plan=BuildPlan.for_task("link", 24, sites=2), source="phantom", seed=4, test_release=True
    )
    result = _script("run").attack(str(out), "gram-link")
    halves = {f"link_{name}_{half}" for name in ("r_precision", "recall") for half in ("public", "private")}
    assert halves <= set(result) and all(0 <= result[key] <= 1 for key in halves)
    assert "reid_accuracy" not in result


@pytest.fixture(scope="module")
def small_reid(tmp_path_factory):
    out = tmp_path_factory.mktemp("reid") / "nc3-reid"
    # 64 x 64 images of 8-pixel patches: rows large enough for the row-parallel reader and writer
    tiny = resolve_config("nc3", width=64, image_size=64, patch_size=8, bn_batch=16)
    build_release(out, config=tiny, plan=BuildPlan.for_task("reid", 48), source="phantom", seed=3, test_release=True)
    return out


def test_run_subset_keeps_the_first_encodings_with_their_own_plaintexts(small_reid, tmp_path):
    release_dir = small_reid
    out = _script("run").subset(str(release_dir), 20, str(tmp_path / "n20"))
    with open_release(release_dir) as full, open_key(release_dir) as full_key:
        truth = full_key.read("truth/plain_index")[:20]
        encoded, plain = full.encoded[:20], full.plain_images[truth]
        ids = full.encoded_ids[:20]
    with open_release(out) as part, open_key(out) as part_key:
        part_truth = part_key.read("truth/plain_index")
        assert part.n_encoded == 20 and part.encoded_ids == ids
        np.testing.assert_array_equal(part.encoded[:], encoded)
        assert len(part.plain_ids) == 20  # only the subset's own plaintexts are its pool
        np.testing.assert_array_equal(part.plain_images[part_truth], plain)


def test_run_attack_counts_the_wrong_encodings_beside_the_rounded_accuracy(small_reid):
    result = _script("run").attack(str(small_reid), "gram-hungarian", self_width="64")
    assert result["n"] == 48 and 0 <= result["reid_wrong"] <= 48
    assert result["reid_accuracy"] == round(1 - result["reid_wrong"] / 48, 4)


def test_depth_transfer_runs_merge_and_tabulate():
    depth = _script("depth")

    def row(at_depth, seed, accuracy, seconds=30.0):
        run = {"depth": at_depth, "seed": seed, "n": 400, "attack": depth.TRANSFER_ATTACK, "params": {}}
        return {**run, "nn_accuracy": accuracy, "targets": 100, "seconds": seconds}

    runs = depth.merge_transfer([row(4, 1, 0.1), row(4, 2, 0.3)], [row(4, 1, 0.2)])  # a rerun replaces its entry
    runs = depth.merge_transfer(runs, [row(44, 1, 0.02, 90.0), row(8, 1, 0.1, 40.0), row(8, 2, 0.1, 60.0)])
    runs = depth.merge_transfer(runs, [row(8, 3, 0.4, 50.0)])
    assert sorted((r["depth"], r["seed"], r["nn_accuracy"]) for r in runs) == [
        (4, 1, 0.2),
        (4, 2, 0.3),
        (8, 1, 0.1),
        (8, 2, 0.1),
        (8, 3, 0.4),
        (44, 1, 0.02),
    ]
    lines = depth.transfer_markdown(runs)
    nc7 = next(line for line in lines if line.startswith("| 4 |"))
    assert "| nc7 | 400 | 20% | 30% |  | 25.0% | 1% | 30 |" in nc7
    depth8 = next(line for line in lines if line.startswith("| 8 |"))
    assert "| 10% | 10% | 40% | 20.0% | 1% | 40-60 |" in depth8  # seconds: the range over seeds
    nc47 = next(line for line in lines if line.startswith("| 44 |"))
    assert "| nc47 | 400 | 2% |  |  | 2.0% |" in nc47  # seeds 2 and 3 not run at depth 44: empty cells
    assert depth.transfer_markdown([]) == []


@pytest.mark.parametrize("option", ["--depths=4,x", "--n=many", "--seed=1,2"])
def test_depth_script_bad_numbers_are_one_line_errors(option, tmp_path):
    json_path = tmp_path / "depth.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "depth.py"), "transfer", option, f"--json={json_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert not json_path.exists()


def test_run_script_on_a_missing_release_is_a_one_line_error(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "attack", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


@pytest.mark.parametrize("sizes", ["--sizes=10,x", "--sizes=10,49", "--sizes=0"])
def test_run_scale_bad_sizes_are_one_line_errors(small_reid, sizes):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "scale", str(small_reid), sizes],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def _layout_and_values(path) -> tuple:
    with open_release(path) as release, open_key(path) as key:
        values = (
            release.encoded_rows(np.arange(release.n_encoded)),
            release.plain_images,
            key.read("truth/plain_index"),
        )
        return release.encoded.chunks, values


def test_relayout_copies_a_release_into_either_layout_and_read_times_both(tmp_path):
    out = tmp_path / "wide"
    wide = resolve_config("nc7", width=1024, image_size=32, patch_size=8, bn_batch=8)
    build_release(out, config=wide, plan=BuildPlan.for_task("reid", 12), source="phantom", seed=6, test_release=True)
    run = _script("run")
    rows = run.relayout(str(out), str(tmp_path / "rows"), blocks="0")
    blocks = run.relayout(rows, str(tmp_path / "blocks"))
    built, copies = _layout_and_values(out), [_layout_and_values(path) for path in (rows, blocks)]
    assert [built[0]] + [chunks for chunks, _ in copies] == [(1, 16, 512), (1, 16, 1024), (1, 16, 512)]
    for _, values in copies:
        for copied, original in zip(values, built[1]):
            np.testing.assert_array_equal(copied, original)
    timed = run.read(rows, blocks, channels="512")
    assert [row["encodings"] for row in timed["rows"]] == [12, 12]
    with pytest.raises(NcbenchError, match="already exists"):
        run.relayout(str(out), rows)
