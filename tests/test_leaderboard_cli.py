"""`ncbench score` and `ncbench leaderboard export|close|serve` through the root command."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from ncbench.attacks.submission import Submission, write_submission
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.files import open_key, open_release
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.cli import main
from ncbench.leaderboard.store import BUILTIN_TEAM, Store

torch.set_num_threads(1)
TINY = resolve_config("nc7", width=32, image_size=32, patch_size=8, bn_batch=8)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def challenge(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "reid"
    build_release(
        out, config=TINY, plan=BuildPlan.for_task("reid", 16), source="phantom", seed=3, test_release=True, device="cpu"
    )
    return out


def own_file(challenge, path, *, swap=None, attack="alices-solver"):
    """A team's own submission: the true mapping, with rows ``swap`` = (i, j) exchanged if given."""
    with open_release(challenge) as release, open_key(challenge) as key:
        mapping = [release.plain_ids[j] for j in key.read("truth/plain_index")]
        if swap is not None:
            i, j = swap
            mapping[i], mapping[j] = mapping[j], mapping[i]
        submission = Submission(
            release.challenge_id, attack, "1.0", release.encoded_ids, mapping=mapping, runtime_s=3.0
        )
    return write_submission(path, submission)


@pytest.fixture
def perfect(challenge, tmp_path):
    return own_file(challenge, tmp_path / "perfect.h5")


def score(submission, challenge, db, team="alice", *extra):
    return run("score", submission, "--key", challenge / "private" / "key.h5", "--db", db, "--team", team, *extra)


def assert_one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    # The error is one line, last; a progress line from scoring may come before it.
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("scoring ")), result.stderr


def test_score_prints_the_public_half_and_records_it(challenge, perfect, tmp_path):
    db = tmp_path / "board.db"
    result = score(perfect, challenge, db)
    assert result.exit_code == 0, result.output
    assert "recorded as submission 1" in result.stdout
    assert "reid_accuracy" in result.stdout and "1.0000" in result.stdout and "privacy band: bad" in result.stdout
    assert "private half: hidden" in result.stdout
    with Store(db) as store:
        assert store.counts()["submissions"] == 1


def test_rescoring_the_same_file_is_not_counted_again(challenge, perfect, tmp_path):
    db = tmp_path / "board.db"
    score(perfect, challenge, db, "alice", "--daily-limit", 1)
    result = score(perfect, challenge, db, "alice", "--daily-limit", 1)
    assert result.exit_code == 0 and "already recorded" in result.stdout
    with Store(db) as store:
        assert store.counts()["submissions"] == 1


def test_daily_limit_refuses_with_one_line_and_writes_nothing(challenge, perfect, tmp_path):
    db = tmp_path / "board.db"
    assert score(perfect, challenge, db, "alice", "--daily-limit", 1).exit_code == 0
    with Store(db) as store:
        before = store.counts()
    other = own_file(challenge, tmp_path / "other.h5", swap=(0, 1))
    assert_one_line_error(score(other, challenge, db, "alice", "--daily-limit", 1), "used its 1")
    with Store(db) as store:
        assert store.counts() == before


def test_daily_limit_is_checked_before_scoring(challenge, perfect, tmp_path, monkeypatch):
    import ncbench.leaderboard.scoring as scoring

    db = tmp_path / "board.db"
    assert score(perfect, challenge, db, "alice", "--daily-limit", 1).exit_code == 0
    other = own_file(challenge, tmp_path / "other.h5", swap=(0, 1))

    def must_not_score(*args, **kwargs):
        raise AssertionError("scored a submission over the daily limit")

    monkeypatch.setattr(scoring, "score_submission", must_not_score)
    result = score(other, challenge, db, "alice", "--daily-limit", 1)
    assert_one_line_error(result, "used its 1")
    assert not result.stderr.startswith("scoring ")


def test_chance_baseline_scores_near_chance(challenge, tmp_path):
    assert run("attack", "run", "chance", "--release", challenge, "--out", tmp_path / "chance.h5").exit_code == 0
    result = run(
        "score",
        tmp_path / "chance.h5",
        "--key",
        challenge / "private" / "key.h5",
        "--db",
        tmp_path / "board.db",
        "--builtin",
    )
    assert result.exit_code == 0, result.output
    assert "chance 0.0625" in result.stdout and f"for team {BUILTIN_TEAM} (organizer)" in result.stdout


def test_builtin_attack_output_from_a_team_is_self_reported_in_its_namespace(challenge, tmp_path):
    assert run("attack", "run", "chance", "--release", challenge, "--out", tmp_path / "chance.h5").exit_code == 0
    db = tmp_path / "board.db"
    result = score(tmp_path / "chance.h5", challenge, db)
    assert result.exit_code == 0, result.output
    with Store(db) as store:
        rows = store.results()
    assert set(rows["origin"]) == {"self-reported"} and set(rows["team"]) != {"ncbench-builtin"}


def test_builtin_flag_records_organizer_rows_only_for_builtin_attacks(challenge, perfect, tmp_path):
    db = tmp_path / "board.db"
    key = challenge / "private" / "key.h5"
    assert_one_line_error(run("score", perfect, "--key", key, "--db", db, "--builtin"), "is not a built-in attack")
    assert not db.exists()
    assert_one_line_error(
        run("score", perfect, "--key", key, "--db", db, "--builtin", "--team", "alice"), "--builtin records under team"
    )
    assert_one_line_error(score(perfect, challenge, db, BUILTIN_TEAM), "reserved for the organizer")
    assert_one_line_error(score(perfect, challenge, db, "NCBENCH-Builtin"), "reserved for the organizer")
    assert not db.exists()


def test_a_team_file_is_self_reported_under_the_team_name(challenge, perfect, tmp_path):
    db = tmp_path / "board.db"
    result = score(perfect, challenge, db, "Alice")
    assert result.exit_code == 0, result.output
    assert "alice/alices-solver 1.0 for team alice (self-reported)" in result.stdout
    assert "beats your team's best shown score" in result.stdout
    with Store(db) as store:
        assert store.results()[["team", "attack", "origin"]].values.tolist() == [
            ["alice", "alices-solver", "self-reported"]
        ]


def test_oracle_baseline_is_refused_and_nothing_is_created(challenge, tmp_path):
    key = challenge / "private" / "key.h5"
    made = run(
        "attack", "run", "oracle", "--release", challenge, "--out", tmp_path / "oracle.h5", "--param", f"key={key}"
    )
    assert made.exit_code == 0, made.output
    db = tmp_path / "board.db"
    assert_one_line_error(score(tmp_path / "oracle.h5", challenge, db), "reads the secret key")
    assert not db.exists()


def test_scorer_crash_is_recorded_as_failed_and_not_counted(challenge, perfect, tmp_path, monkeypatch):
    import ncbench.leaderboard.scoring as scoring

    def broken(*args, **kwargs):
        raise RuntimeError("bug in a metric")

    db = tmp_path / "board.db"
    with monkeypatch.context() as patch:
        patch.setattr(scoring, "compute_metrics", broken)
        crashed = score(perfect, challenge, db, "alice", "--daily-limit", 1)
    assert isinstance(crashed.exception, RuntimeError)  # a bug shows its traceback, unlike user mistakes
    with Store(db) as store:
        assert store.counts()["submissions"] == 1 and store.results().empty
    assert score(perfect, challenge, db, "alice", "--daily-limit", 1).exit_code == 0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--team", "alice"], "Missing option '--key'"),
        (["--key", "KEY", "--team", "alice", "--daily-limit", "0"], "--daily-limit must be at least 1"),
        (["--key", "KEY", "--team", "alice", "--daily-limit", "many"], "'many' is not a valid integer"),
        (["--key", "KEY", "--team", ""], "team name"),
        (["--key", "KEY", "--team", "t\u0435am"], "team name"),  # Cyrillic e
        (["--key", "KEY"], "--team is required"),
        (["--key", "NOKEY", "--team", "alice"], "no such key file"),
    ],
)
def test_bad_score_arguments_are_one_line_and_create_no_database(challenge, perfect, tmp_path, args, fragment):
    db = tmp_path / "board.db"
    args = [
        str(challenge / "private" / "key.h5") if a == "KEY" else str(tmp_path / "key.h5") if a == "NOKEY" else a
        for a in args
    ]
    assert_one_line_error(run("score", perfect, "--db", db, *args), fragment)
    assert not db.exists()


def test_export_formats_hide_the_private_half_until_close(challenge, perfect, tmp_path):
    db = tmp_path / "board.db"
    score(perfect, challenge, db)
    with open_release(challenge) as release:
        challenge_id = release.challenge_id
    rows = json.loads(run("leaderboard", "export", "--db", db, "--format", "json").stdout)
    assert [(r["track"], r["split"], r["reidentification"], r["band"]) for r in rows] == [
        ("answer file", "public", 1.0, "bad")
    ]
    markdown = run("leaderboard", "export", "--db", db, "--format", "markdown").stdout
    assert markdown.startswith("| track | challenge_id |") and "| public |" in markdown and "private" not in markdown
    unasked = run("leaderboard", "close", challenge_id, "--db", db)  # no terminal to ask on: --yes or nothing
    assert unasked.exit_code == 2 and "--yes" in unasked.stderr and unasked.stderr.count("\n") == 1
    closed = run("leaderboard", "close", challenge_id, "--db", db, "--yes")
    assert closed.exit_code == 0 and "now public" in closed.stdout
    assert "already closed" in run("leaderboard", "close", challenge_id, "--db", db).stdout
    out = tmp_path / "exports" / "board.csv"
    assert run("leaderboard", "export", "--db", db, "--format", "csv", "--out", out).exit_code == 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("track,challenge_id,task,preset,release,split") and len(lines) == 3
    assert {line.split(",")[5] for line in lines[1:]} == {"public", "private"}


def test_blind_challenge_is_left_out_of_exports_until_close_and_republish_sets_blind(challenge, perfect, tmp_path):
    db, store = tmp_path / "board.db", tmp_path / "store"
    published = run("challenge", "publish", challenge, "--store", store, "--db", db, "--blind")
    assert published.exit_code == 0 and "blind" in published.stdout, published.output
    score(perfect, challenge, db)
    assert json.loads(run("leaderboard", "export", "--db", db, "--format", "json").stdout) == []
    with open_release(challenge) as release:
        challenge_id = release.challenge_id
    # --republish replaces blind with what is given now, as it does the daily limit and deadline.
    assert run("challenge", "publish", challenge, "--store", store, "--db", db, "--republish").exit_code == 0
    assert len(json.loads(run("leaderboard", "export", "--db", db, "--format", "json").stdout)) == 1
    assert run("challenge", "publish", challenge, "--store", store, "--db", db, "--republish", "--blind").exit_code == 0
    assert json.loads(run("leaderboard", "export", "--db", db, "--format", "json").stdout) == []
    assert run("leaderboard", "close", challenge_id, "--db", db, "--yes").exit_code == 0
    rows = json.loads(run("leaderboard", "export", "--db", db, "--format", "json").stdout)
    assert {(r["split"], r["reidentification"]) for r in rows} == {("public", 1.0), ("private", 1.0)}


def test_leaderboard_commands_refuse_a_missing_database(tmp_path):
    db = tmp_path / "absent.db"
    assert_one_line_error(run("leaderboard", "export", "--db", db), "no leaderboard database")
    assert_one_line_error(run("leaderboard", "close", "x", "--db", db), "no leaderboard database")
    assert_one_line_error(run("leaderboard", "serve", "--db", db), "no leaderboard database")
    assert not db.exists()


def test_bad_leaderboard_arguments_are_one_line(tmp_path):
    Store(tmp_path / "board.db").close()
    assert_one_line_error(run("leaderboard", "export", "--db", tmp_path / "board.db", "--format", "xml"), "'xml'")
    assert_one_line_error(run("leaderboard", "close", "nope", "--db", tmp_path / "board.db"), "no challenge 'nope'")
    assert_one_line_error(run("leaderboard", "serve", "--db", tmp_path / "board.db", "--port", "0"), "--port")
    assert_one_line_error(run("leaderboard", "frobnicate"), "No such command")


@pytest.mark.parametrize(
    "command",
    [["score"], ["leaderboard"], ["leaderboard", "serve"], ["leaderboard", "export"], ["leaderboard", "close"]],
)
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.stdout


@pytest.mark.parametrize("where", ["loading a command", "running it"])
def test_ctrl_c_ends_in_one_line_and_exit_130(monkeypatch, where):
    import ncbench.cli as root

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "loading a command":
        monkeypatch.setattr(root, "_load", interrupted)
    else:
        monkeypatch.setattr("ncbench.leaderboard.server.client.Client.json", interrupted)
    outcome = CliRunner().invoke(main, ["challenges"])
    assert outcome.exit_code == 130 and outcome.stderr == "interrupted\n", outcome.output


HEAVY = ("torch", "pandas", "numpy", "scipy", "h5py", "sqlalchemy", "streamlit", "fastapi", "distributed")


@pytest.mark.parametrize(
    "command",
    [
        "leaderboard",
        "baseline",
        "demo",
        "challenge",
        "attack",
        "attack run",
        "attack check",
        "attack list",
        "submit",
        "fetch",
        "status",
    ],
)
def test_a_group_s_help_loads_no_heavy_module(command):
    """--help answers from plain data: none of torch, numpy, h5py, pandas, SQLAlchemy or Streamlit
    is imported (a fresh interpreter, since this one has them all)."""
    words = command.split()
    script = (
        "import sys\nfrom ncbench.cli import main\n"
        f"try:\n    main([*{words!r}, '--help'])\nexcept SystemExit as end:\n    assert not end.code, end.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout
    assert done.stderr.strip() == "[]", done.stderr


def test_a_daily_limit_beyond_any_sensible_one_is_refused_before_anything_is_written(challenge, tmp_path):
    huge = str(10**20)  # more than the database's integers hold
    published = run("challenge", "publish", challenge, "--store", tmp_path / "store", "--daily-limit", huge)
    assert_one_line_error(published, "--daily-limit")
    scored = run("score", tmp_path / "absent.h5", "--key", challenge, "--db", tmp_path / "x.db", "--daily-limit", huge)
    assert_one_line_error(scored, "--daily-limit")
    assert not (tmp_path / "store").exists() and not (tmp_path / "x.db").exists()
