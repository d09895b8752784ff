"""The board's rules against hostile teams, end to end through `ncbench score` and `ncbench leaderboard export` on a
tiny real release: relabelled oracle output, built-in names, look-alike teams, huge attributes,
hostile names in exports, and the swap probe against the hidden split. Every refusal is one line,
exit code 2, and leaves the database as it was."""

import csv
import dataclasses
import io
import json
import re

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ncbench.attacks.submission import Submission, write_submission
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.files import open_key, open_release
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.cli import main
from ncbench.leaderboard.scoring import ChallengeInfo
from ncbench.leaderboard.store import BUILTIN_TEAM, Store
from ncbench.leaderboard.tables import CHANCE_ROW, FORMULA_STARTS, TEST_RELEASE, attack_preset_matrix, board

torch.set_num_threads(1)
TINY = resolve_config("nc7", width=32, image_size=32, patch_size=8, bn_batch=8)
N = 16


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def challenge(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "reid"
    build_release(
        out, config=TINY, plan=BuildPlan.for_task("reid", N), source="phantom", seed=10, test_release=True, device="cpu"
    )
    return out


@pytest.fixture(scope="module")
def truth(challenge):
    with open_release(challenge) as release, open_key(challenge) as key:
        return (
            release.challenge_id,
            list(release.encoded_ids),
            list(release.plain_ids),
            key.read("truth/plain_index").astype(int),
            key.read("truth/split").astype(int),
        )


def own_file(truth, path, *, attack="mallorys-solver", version="1.0", swap=None):
    challenge_id, encoded_ids, plain_ids, plain_index, _ = truth
    mapping = [plain_ids[j] for j in plain_index]
    if swap is not None:
        i, j = swap
        mapping[i], mapping[j] = mapping[j], mapping[i]
    return write_submission(
        path, Submission(challenge_id, attack, version, encoded_ids, mapping=mapping, runtime_s=1.0)
    )


def score(path, challenge, db, team="mallory", *extra):
    return run(
        "score",
        path,
        "--key",
        challenge / "private" / "key.h5",
        "--db",
        db,
        "--team",
        team,
        "--daily-limit",
        50,
        *extra,
    )


def counts(db):
    if not db.exists():
        return None
    with Store(db) as store:
        return store.counts()


def assert_refused(result, db, before, fragment=""):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("scoring ")), result.stderr
    assert len(lines[-1]) < 400
    assert counts(db) == before


@pytest.fixture
def organizer_db(challenge, tmp_path):
    """A database holding the organizer's own run of the chance baseline."""
    db = tmp_path / "board.db"
    made = run("attack", "run", "chance", "--release", challenge, "--out", tmp_path / "chance.h5")
    assert made.exit_code == 0, made.output
    recorded = run("score", tmp_path / "chance.h5", "--key", challenge / "private" / "key.h5", "--db", db, "--builtin")
    assert recorded.exit_code == 0, recorded.output
    return db


def relabel(source, path, **attrs):
    """A copy of ``source`` with root attributes replaced (None deletes one)."""
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "a", libver="latest") as handle:  # latest: attributes over 64 KiB
        for name, value in attrs.items():
            if value is None:
                del handle.attrs[name]
            else:
                handle.attrs[name] = value
    return path


def test_relabelled_oracle_output_never_reaches_the_organizer_matrix(challenge, organizer_db, tmp_path):
    db = organizer_db
    made = run(
        "attack",
        "run",
        "oracle",
        "--release",
        challenge,
        "--out",
        tmp_path / "oracle.h5",
        "--param",
        f"key={challenge / 'private' / 'key.h5'}",
    )
    assert made.exit_code == 0, made.output
    oracle = tmp_path / "oracle.h5"
    before = counts(db)
    assert_refused(score(oracle, challenge, db), db, before)  # the oracle as it is: knowledge "key"
    with h5py.File(oracle) as handle:
        mapping = [m.decode() if isinstance(m, bytes) else m for m in handle["mapping"][()]]
        encoded = [e.decode() if isinstance(e, bytes) else e for e in handle["encoded_ids"][()]]
    as_csv = tmp_path / "oracle.csv"
    as_csv.write_text("encoded_id,plain_id\n" + "".join(f"{e},{m}\n" for e, m in zip(encoded, mapping)))
    claimed = {
        "as gram-hungarian": relabel(oracle, tmp_path / "gh.h5", attack="gram-hungarian", knowledge='["architecture"]'),
        "as Cyrillic oracle": relabel(oracle, tmp_path / "cyr.h5", attack="\u043eracle", knowledge='["architecture"]'),
        "as CHANCE": relabel(oracle, tmp_path / "ch.h5", attack="CHANCE", knowledge="[]"),
        "knowledge architecture": relabel(
            oracle, tmp_path / "arch.h5", attack="my-attack", knowledge='["architecture"]'
        ),
        "knowledge left out": relabel(oracle, tmp_path / "none.h5", attack="other-attack", knowledge=None),
        "csv": as_csv,
    }
    for case, path in claimed.items():
        before = counts(db)
        result = score(path, challenge, db)
        if result.exit_code == 2:  # refusing is as good as labelling
            assert_refused(result, db, before)
            continue
        assert result.exit_code == 0, (case, result.output)
        assert "(self-reported)" in result.stdout and "mallory/" in result.stdout, case
    with Store(db) as store:
        table = board(store.results())
    assert set(table.loc[table["origin"] == "organizer", "attack"]) == {"chance"}
    assert all(a.startswith("mallory/") for a in table.loc[table["origin"] == "self-reported", "attack"])
    matrix = attack_preset_matrix(table)
    assert list(matrix.index) == ["chance", CHANCE_ROW]
    assert matrix.loc["chance", "nc7"] < 1.0


def test_a_file_named_like_a_builtin_stays_in_its_team_namespace(challenge, truth, tmp_path):
    db = tmp_path / "board.db"
    names = ("gram-hungarian", "Gram_Hungarian", "linear inversion", "distribution-a1ignment", "\u043eracle")
    for k, name in enumerate(names):
        result = score(own_file(truth, tmp_path / f"{k}.h5", attack=name), challenge, db)
        assert result.exit_code == 0, result.output
    with Store(db) as store:
        table = board(store.results())
    assert set(table["origin"]) == {"self-reported"}
    assert set(table["attack"]) == {f"mallory/{name}" for name in names}
    assert attack_preset_matrix(table).drop(index=CHANCE_ROW, errors="ignore").empty


@pytest.mark.parametrize("size", [10_000_000, 100_000])  # over the reader's cap; under it, over the store's
@pytest.mark.parametrize("attribute", ["attack", "attack_version", "params"])
def test_a_huge_attribute_is_refused_in_one_line(challenge, truth, organizer_db, tmp_path, attribute, size):
    value = "x" * size if attribute != "params" else json.dumps({"blob": "x" * size})
    path = relabel(own_file(truth, tmp_path / "good.h5"), tmp_path / "huge.h5", **{attribute: value})
    before = counts(organizer_db)
    assert_refused(score(path, challenge, organizer_db), organizer_db, before, attribute)


def test_look_alike_teams_share_one_daily_limit_checked_before_scoring(challenge, truth, tmp_path):
    db = tmp_path / "board.db"
    first = score(own_file(truth, tmp_path / "0.h5"), challenge, db, "Team", "--daily-limit", 1)
    assert first.exit_code == 0, first.output
    before = counts(db)
    for k, team in enumerate(["TEAM", "\uff54\uff45\uff41\uff4d", "te\u0301am", " team "]):
        path = own_file(truth, tmp_path / f"{k + 1}.h5", swap=(0, k + 1))
        result = run(
            "score", path, "--key", challenge / "private" / "key.h5", "--db", db, "--team", team, "--daily-limit", 1
        )
        assert_refused(result, db, before, "team 'team' has used its 1")
        assert "scoring" not in result.stderr  # refused before the scorer ran
    path = own_file(truth, tmp_path / "cyr.h5", swap=(0, 9))
    assert_refused(score(path, challenge, db, "t\u0435am"), db, before, "team name")
    assert before["teams"] == 1


def test_exports_defuse_formulas_and_escape_markup(challenge, truth, tmp_path):
    db = tmp_path / "board.db"
    hostile = [
        ('=HYPERLINK("http://evil.invalid","win")', "@SUM(1+1)"),
        ("<script>alert(1)</script>", "[x](javascript:alert(1))"),
        ("![p](http://evil.invalid/p.png)", "+1|-1"),
    ]
    for k, (attack, version) in enumerate(hostile):
        path = own_file(truth, tmp_path / f"{k}.h5", attack=attack, version=version, swap=(0, k + 1))
        result = score(path, challenge, db)
        assert result.exit_code == 0, result.output
    out = run("leaderboard", "export", "--db", db, "--format", "csv")
    assert out.exit_code == 0, out.output
    rows = list(csv.reader(io.StringIO(out.stdout, newline="")))
    assert len(rows) == 1 + len(hostile)
    for row in rows:
        assert not any(cell.startswith(FORMULA_STARTS) for cell in row if not re.fullmatch(r"-?[\d.e+-]+", cell))
    assert any(cell == "'@SUM(1+1)" for row in rows for cell in row)
    markdown = run("leaderboard", "export", "--db", db, "--format", "markdown").stdout
    assert "<script" not in markdown and "](" not in markdown and "![" not in markdown
    assert "&lt;script&gt;" in markdown
    assert all(
        len(re.findall(r"(?<!\\)\|", re.sub(r"\\\\", "", line))) == len(rows[0]) + 1 for line in markdown.splitlines()
    )


def test_swap_probe_through_score_reveals_nothing_about_the_split(challenge, truth, tmp_path):
    """A perfect mapping, then six submissions that each swap two of its rows. On exact
    public scores the drop of each swap gives the halves of its rows away; on the scores that
    `ncbench score` prints and the board shows, every swap scores the same."""
    _, _, _, _, split = truth
    db = tmp_path / "board.db"
    pairs = [(2 * k, 2 * k + 1) for k in range(6)]
    printed = []
    for k, swap in enumerate([None, *pairs]):
        result = score(own_file(truth, tmp_path / f"{k}.h5", swap=swap), challenge, db)
        assert result.exit_code == 0, result.output
        printed.append(float(re.search(r"reid_accuracy\s+([\d.]+)", result.stdout).group(1)))
    with Store(db) as store:
        shown = store.results().sort_values("submission_id")["reid_accuracy"].tolist()
        exact = (
            store.results(include_private=True)
            .query("split == 'public'")
            .sort_values("submission_id")["reid_accuracy"]
            .tolist()
        )
    n_public = int((split == 0).sum())

    def learned(scores):
        rows = {}
        for (i, j), value in zip(pairs, scores[1:]):
            public_rows = round((scores[0] - value) * n_public)
            if public_rows in (0, 2):
                rows[i] = rows[j] = 1 if public_rows == 0 else 0
        return rows

    from_exact = learned(exact)
    assert from_exact and all(split[r] == half for r, half in from_exact.items())  # the probe works...
    assert len(set(printed)) == 1 and len(set(shown)) == 1  # ...but not on what a team sees
    assert np.mean([split[r] == half for r, half in learned(shown).items()]) == pytest.approx(
        np.mean(split[:12] == 1)
    )  # every row guessed private: the fraction of private rows, chance


@pytest.mark.skipif(
    "test_release" not in {f.name for f in dataclasses.fields(ChallengeInfo)},
    reason="the scorer's ChallengeInfo does not carry test_release yet",
)
def test_a_test_release_is_marked_in_score_output_and_exports(challenge, truth, tmp_path):
    db = tmp_path / "board.db"
    result = score(own_file(truth, tmp_path / "a.h5"), challenge, db)
    assert result.exit_code == 0, result.output
    assert "a test release: its key is public" in result.stdout
    rows = json.loads(run("leaderboard", "export", "--db", db, "--format", "json").stdout)
    assert {row["release"] for row in rows} == {TEST_RELEASE}
    with Store(db) as store:
        assert store.challenges()["test_release"].tolist() == [True]
    assert BUILTIN_TEAM not in {row["team"] for row in rows}
