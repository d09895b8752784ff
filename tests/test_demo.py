"""`ncbench demo` end to end at a small N: builds, attacks, scores, utility, and reuse on a re-run."""

import pytest
import torch
from click.testing import CliRunner

import ncbench.baselines.utility as utility_module
import ncbench.cli.demo as demo_module
from ncbench.attacks.plugins.registry import all_attacks
from ncbench.baselines.utility import RAW_PRESET
from ncbench.cli import main
from ncbench.errors import NcbenchError
from ncbench.leaderboard.store import Store

torch.set_num_threads(2)
SMALL_UTILITY = {"n_train": 48, "n_test": 32, "width": 32, "image_size": 32, "epochs": 1}


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utility_module, "DEFAULTS", SMALL_UTILITY)
        first = CliRunner().invoke(main, ["demo", "--out", str(out), "--n", "8", "--device", "cpu"])
        with Store(out / "leaderboard.db") as store:
            counts = store.counts()
        again = CliRunner().invoke(main, ["demo", "--out", str(out), "--n", "8", "--device", "cpu"])
    return out, first, counts, again


def test_demo_scores_every_builtin_attack_on_every_release(demo_runs):
    out, first, counts, _ = demo_runs
    assert first.exit_code == 0, first.output
    assert counts["challenges"] == len(demo_module.DEMO_CHALLENGES)
    attacks = [
        cls for name, cls in all_attacks().items() if "key" not in cls.knowledge and not name.startswith("template")
    ]
    expected = sum(task in cls.tasks for _, task in demo_module.DEMO_CHALLENGES for cls in attacks)
    assert expected >= 4 * 3  # at least gram-hungarian, linear-inversion, distribution-alignment on reid
    assert counts["submissions"] == expected
    for preset, task in demo_module.DEMO_CHALLENGES:
        assert (out / f"{preset}-{task}" / "public" / "release.h5").is_file()
    assert "gram-hungarian" in first.output and "Open the leaderboard" in first.output
    assert "encoding linear" in first.output  # the progress line the re-run must not show


def test_demo_records_its_runs_as_the_organizer_s_builtin_rows(demo_runs):
    out, _, _, _ = demo_runs
    with Store(out / "leaderboard.db") as store:
        results = store.results()
    assert set(results["origin"]) == {"organizer"} and set(results["team"]) == {demo_module.TEAM}
    assert set(results["attack"]) <= set(all_attacks())  # built-in names, not team/attack


def test_demo_records_utility_for_each_reid_preset_and_raw(demo_runs):
    out, first, _, _ = demo_runs
    with Store(out / "leaderboard.db") as store:
        utility = store.utility()
    reid_presets = {preset for preset, task in demo_module.DEMO_CHALLENGES if task == "reid"}
    assert set(utility["preset"]) == reid_presets | {RAW_PRESET}
    assert "Privacy vs utility" in first.output and "encoded_auc" in first.output


def test_demo_rerun_reuses_releases_submissions_and_utility(demo_runs):
    out, _, counts, again = demo_runs
    assert again.exit_code == 0, again.output
    assert "reusing recorded results" in again.output
    assert "encoding linear" not in again.output  # no release was rebuilt
    with Store(out / "leaderboard.db") as store:
        assert store.counts() == counts


def test_demo_refuses_too_small_n_before_writing_anything(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "out"), "--n", "4"])
    assert result.exit_code != 0 and "--n" in result.output
    assert not (tmp_path / "out").exists()


def _utility_arguments(**changes):
    return {"presets": [], "raw": True, "seed": 0, "device": "cpu", "patch_size": 8, **SMALL_UTILITY, **changes}


def test_a_failing_utility_process_is_one_line_and_leaves_no_process():
    job = demo_module._UtilityJob(_utility_arguments(n_train=0))
    with pytest.raises(NcbenchError, match="n_train must be a positive integer"):
        job.rows()
    job.stop()
    assert job._process.returncode == 0


def test_stopping_a_running_utility_process_terminates_it():
    job = demo_module._UtilityJob(_utility_arguments(n_train=100000, epochs=100))
    job.stop()
    assert job._process.returncode not in (None, 0)
