"""`ncbench demo` end to end at a small N: builds, attacks, scores, the verified track, a closed
challenge, utility (depth sweep, two sites), and reuse on a re-run. The run itself is the
session fixture ``demo_runs`` (conftest.py), which the board's browser test opens too."""

import json

import pytest
from click.testing import CliRunner

import ncbench.cli.demo as demo_module
from ncbench.attacks.plugins.registry import all_attacks
from ncbench.baselines.utility import RAW_PRESET
from ncbench.cli import main
from ncbench.errors import NcbenchError
from ncbench.leaderboard import tables
from ncbench.leaderboard.store import Store
from ncbench.leaderboard.verified import runs as verified
from ncbench.leaderboard.verified.sandbox import sandbox_problem

SMALL_UTILITY = {"n_train": 48, "n_test": 32, "width": 32, "image_size": 32, "epochs": 1}


def builtin_submissions() -> int:
    attacks = [
        cls for name, cls in all_attacks().items() if "key" not in cls.knowledge and not name.startswith("template")
    ]
    return sum(  # the sample source carries no labels; the phantoms do
        task in cls.tasks
        and (cls.name, preset) not in demo_module.SKIPPED
        and ("labels" not in cls.knowledge or demo_module.SOURCES.get(task) == "phantom")
        for preset, task in demo_module.DEMO_CHALLENGES
        for cls in attacks
    )


def test_demo_scores_every_builtin_attack_on_every_release(demo_runs):
    out, first, counts, _ = demo_runs
    assert first.exit_code == 0, first.output
    assert counts["challenges"] == len(demo_module.DEMO_CHALLENGES)
    # gram-hungarian, linear-inversion, distribution-alignment; gram-link, gram-label-link
    assert builtin_submissions() >= 5 * 3 + 2
    assert counts["submissions"] == builtin_submissions() + 1  # and the demo team's own file
    for preset, task in demo_module.DEMO_CHALLENGES:
        assert (out / f"{preset}-{task}" / "public" / "release.h5").is_file()
    assert "gram-hungarian" in first.output and "encoding linear" in first.output  # a line the re-run must not show
    assert first.output.rstrip().endswith("then open http://127.0.0.1:8501")


def test_demo_fills_the_matrix_self_reported_and_link_rows(demo_runs):
    out, _, _, _ = demo_runs
    with Store(out / "leaderboard.db") as store:
        board = tables.board(store.results())
    matrix = tables.attack_preset_matrix(board, task="reid")
    assert {"linear", "nc3-noshuffle", "nc3", "nc7", "nc47"} <= set(matrix.columns)
    assert matrix.loc["gram-hungarian", "linear"] == 1.0  # a linear encoding is always broken
    assert set(tables.self_reported(board)["attack"]) == {f"{demo_module.DEMO_TEAM}/template-mean-patch"}
    assert {"gram-link", "gram-label-link"} <= set(board.loc[board["task"] == "link", "attack"])


def test_demo_closes_one_challenge_and_shows_its_private_half(demo_runs):
    out, _, _, _ = demo_runs
    with Store(out / "leaderboard.db") as store:
        challenges = store.challenges().set_index("challenge_id")
        board = tables.board(store.results())
    closed = challenges[challenges["closed_utc"].notna()]
    assert list(zip(closed["preset"], closed["task"])) == [demo_module.VERIFIED_CHALLENGE]
    private = board[board["split"] == "private"]
    assert set(private["challenge_id"]) == set(closed.index) and len(private) > 1


def test_demo_runs_the_builtins_through_the_verified_track_and_reveals_their_seeds(demo_runs):
    out, first, _, _ = demo_runs
    with Store(out / "leaderboard.db") as store:
        summary = tables.verified_summary(verified.results(store))
        revealed = verified.commitments(store)
    assert set(summary["attack"]) == set(demo_module.VERIFIED_ATTACKS)
    assert set(summary["state"]) == {"scored"} and set(summary["scored"]) == {demo_module.VERIFIED_RELEASES}
    assert summary["mean"].between(0, 1).all() and summary["sandboxed"].all() == (sandbox_problem() is None)
    assert len(revealed) == len(demo_module.VERIFIED_ATTACKS) * demo_module.VERIFIED_RELEASES
    assert all(row["seed"] for row in revealed)  # the challenge is closed: anyone can rebuild them
    assert "[verified]" in first.output


def test_demo_records_utility_for_each_reid_preset_the_depth_sweep_and_two_sites(demo_runs):
    out, first, _, _ = demo_runs
    with Store(out / "leaderboard.db") as store:
        utility, board, challenges = store.utility(), tables.board(store.results()), store.challenges()
    reid_presets = {preset for preset, task in demo_module.DEMO_CHALLENGES if task == "reid"}
    assert set(tables.single_site_utility(utility)["preset"]) == reid_presets | {RAW_PRESET}
    curve = tables.depth_curve(board, challenges, utility)
    assert list(curve["depth"]) == [0, 4, 44] and curve["encoded_auc"].notna().all()
    assert curve["gram-hungarian"].notna().all() and curve["raw_auc"].notna().all()
    assert not tables.multi_site_summary(utility).empty
    assert "Privacy vs utility" in first.output and "encoded_auc" in first.output


def test_demo_draws_the_transfer_curve_at_nc3_and_nc7(demo_runs):
    out, _, _, _ = demo_runs
    with Store(out / "leaderboard.db") as store:
        curve = tables.transfer_depth_curve(tables.board(store.results()), store.challenges())
    assert list(curve["depth"]) == [0, 4]  # linear's transfer challenge is another encoder
    assert curve["distribution-alignment"].notna().all() and curve["chance"].notna().all()


def test_demo_rerun_reuses_releases_submissions_verified_runs_and_utility(demo_runs):
    out, _, counts, again = demo_runs
    assert again.exit_code == 0, again.output
    assert "reusing recorded results" in again.output and "reusing recorded runs" in again.output
    assert "encoding linear" not in again.output  # no release was rebuilt
    with Store(out / "leaderboard.db") as store:
        assert store.counts() == counts


def test_demo_rerun_gives_an_open_challenges_files_their_earlier_scores(demo_runs):
    # A challenge added to the demo since the first run (an open one) must get its files scored.
    _, _, _, again = demo_runs
    assert "distribution-alignment: nn_accuracy" in again.output


def test_demo_export_holds_answer_files_and_verified_runs(demo_runs):
    out, _, _, _ = demo_runs
    exported = CliRunner().invoke(
        main, ["leaderboard", "export", "--db", str(out / "leaderboard.db"), "--format", "json"]
    )
    rows = json.loads(exported.stdout)
    tracks = [row["track"] for row in rows]
    assert tracks.count("verified") == len(demo_module.VERIFIED_ATTACKS) and "answer file" in tracks


def test_demo_refuses_too_small_n_before_writing_anything(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "out"), "--n", "4"])
    assert result.exit_code != 0 and "--n" in result.output
    assert not (tmp_path / "out").exists()


def test_demo_into_a_folder_it_cannot_create_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["demo", "--out", str(blocker / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        f"error: cannot create the demo's folder {blocker / 'out'}: Not a directory"
    ]


def _utility_arguments(**changes):
    return {"presets": [], "raw": True, "seed": 0, "device": "cpu", "patch_size": 8, **SMALL_UTILITY, **changes}


def test_a_failing_utility_process_is_one_line_and_leaves_no_process():
    job = demo_module._UtilityJob([_utility_arguments(n_train=0)])
    with pytest.raises(NcbenchError, match="n_train must be a positive integer"):
        job.rows()
    job.stop()
    assert job._process.returncode == 0


def test_stopping_a_running_utility_process_terminates_it():
    job = demo_module._UtilityJob([_utility_arguments(n_train=100000, epochs=100)])
    job.stop()
    assert job._process.returncode not in (None, 0)
