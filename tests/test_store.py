"""The results store: transactions, resubmissions, daily limits, hidden private half, migrations,
concurrent writers; SQLite always, PostgreSQL when a server can be started here."""

import datetime as dt
import math
import multiprocessing
import os

import pytest
import sqlalchemy as sa

from ncbench.errors import NcbenchError
from ncbench.leaderboard import store as store_module
from ncbench.leaderboard.scoring import ChallengeInfo, ScoreResult
from ncbench.leaderboard.server import channel
from ncbench.leaderboard.store import Store, record_utility

NOON = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


def challenge(challenge_id="nc7-reid-00000001", task="reid", preset="nc7", commitment="c" * 64):
    return ChallengeInfo(challenge_id, task, preset, 20, commitment, '{"preset": "nc7"}')


def result(sha="a", *, accuracy=0.5, private=0.25, info=None, attack="alices-attack"):
    metrics = {
        0: {
            "reid_accuracy": accuracy,
            "chance": 0.05,
            "n": 10.0,
            "k_anonymity": 1 / accuracy if accuracy else math.inf,
        },
        1: {"reid_accuracy": private, "chance": 0.05, "n": 10.0, "k_anonymity": 1 / private if private else math.inf},
    }
    return ScoreResult(
        info or challenge(),
        attack,
        "1.0",
        {"iterations": 3},
        ("architecture",),
        2.5,
        sha.ljust(64, "0"),
        metrics,
        ["a note"],
    )


@pytest.fixture
def db(tmp_path):
    with Store(tmp_path / "board.db") as opened:
        yield opened


def test_new_database_is_at_the_latest_schema_with_wal(tmp_path):
    path = tmp_path / "board.db"
    with Store(path) as opened:
        assert opened.schema_version() == store_module.LATEST_VERSION
        with opened.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_scored_submission_round_trips(db):
    recorded = db.record_score(result("a"), team="alice", now=NOON)
    assert not recorded.duplicate
    details = db.submission(recorded.submission_id)
    assert details["team"] == "alice" and details["attack"] == "alices-attack"
    assert details["params"] == {"iterations": 3} and details["runtime_s"] == 2.5
    assert details["metrics"] == {"public": {"reid_accuracy": 0.5, "chance": 0.05, "n": 10.0, "k_anonymity": 2.0}}
    assert details["notes"] == ["a note"]


def test_infinite_k_anonymity_is_stored(db):
    recorded = db.record_score(result("a", accuracy=0.0), team="alice")
    assert db.submission(recorded.submission_id)["metrics"]["public"]["k_anonymity"] == math.inf


def test_identical_resubmission_is_recognised_and_not_counted(db):
    first = db.record_score(result("a"), team="alice", daily_limit=1, now=NOON)
    again = db.record_score(result("a"), team="alice", daily_limit=1, now=NOON)
    assert again.duplicate and again.submission_id == first.submission_id
    assert db.counts()["submissions"] == 1


def test_same_file_from_another_team_is_a_new_submission(db):
    db.record_score(result("a"), team="alice")
    assert not db.record_score(result("a"), team="bob").duplicate


def test_daily_limit_per_team_and_challenge(db):
    for sha in "abc":
        db.record_score(result(sha), team="alice", daily_limit=3, now=NOON)
    before = db.counts()
    with pytest.raises(NcbenchError, match="used its 3 submissions"):
        db.record_score(result("d"), team="alice", daily_limit=3, now=NOON)
    assert db.counts() == before
    db.record_score(result("d"), team="bob", daily_limit=3, now=NOON)  # another team
    other = challenge("nc7-reid-00000002")
    db.record_score(result("d", info=other), team="alice", daily_limit=3, now=NOON)  # another challenge
    db.record_score(result("d"), team="alice", daily_limit=3, now=NOON + dt.timedelta(days=1))  # next day


def test_failed_submissions_do_not_count_towards_the_limit(db):
    db.record_failure(challenge(), team="alice", sha256="f" * 64, error="scorer crashed", now=NOON)
    db.record_score(result("a"), team="alice", daily_limit=1, now=NOON)
    with pytest.raises(NcbenchError, match="used its 1 submissions"):
        db.record_score(result("b"), team="alice", daily_limit=1, now=NOON)


def test_private_half_hidden_until_the_challenge_is_closed(db):
    recorded = db.record_score(result("a"), team="alice")
    assert set(db.results()["split"]) == {"public"}
    assert db.submission(recorded.submission_id)["metrics"].keys() == {"public"}
    assert set(db.results(include_private=True)["split"]) == {"public", "private"}
    stamp, newly = db.close_challenge("nc7-reid-00000001")
    assert newly
    assert db.close_challenge("nc7-reid-00000001") == (stamp, False)
    private = db.results().query("split == 'private'")
    assert private["reid_accuracy"].tolist() == [0.25]
    assert db.submission(recorded.submission_id)["metrics"]["private"]["reid_accuracy"] == 0.25


def test_an_open_challenge_reads_as_open_beside_a_closed_one(db):
    """closed_utc is None while open, also when another challenge's is a time (pandas would read NaN)."""
    db.record_score(result("a"), team="alice")
    db.record_score(result("b", info=challenge("nc3-reid-00000002", preset="nc3")), team="alice")
    stamp, _ = db.close_challenge("nc7-reid-00000001")
    closed = db.challenges().set_index("challenge_id")["closed_utc"]
    assert closed["nc7-reid-00000001"] == stamp
    assert closed["nc3-reid-00000002"] is None


def publish_blind(db, challenge_id="nc7-reid-00000001"):
    """A published row as ``ncbench challenge publish --blind`` writes it (no release files needed here)."""
    with db.engine.begin() as conn:
        conn.execute(
            store_module.published.insert().values(
                challenge_id=challenge_id, files="[]", daily_limit=5, published_utc="x", blind=True
            )
        )


def test_blind_challenge_hides_its_public_half_until_the_close(db):
    recorded = db.record_score(result("a"), team="alice")
    publish_blind(db)
    assert db.challenges()["blind"].tolist() == [True]
    assert db.results().empty
    hidden = db.submission(recorded.submission_id)
    assert hidden["scores_hidden"] and hidden["metrics"] == {}
    assert db.entries("nc7-reid-00000001")[["team", "attack"]].values.tolist() == [["alice", "alices-attack"]]
    assert set(db.results(include_private=True)["split"]) == {"public", "private"}
    db.close_challenge("nc7-reid-00000001")
    shown = db.results()
    assert shown.set_index("split")["reid_accuracy"].to_dict() == {"public": 0.5, "private": 0.25}
    assert not db.submission(recorded.submission_id)["scores_hidden"]


def test_a_challenge_that_is_not_blind_shows_its_public_half_beside_a_blind_one(db):
    db.record_score(result("a"), team="alice")
    db.record_score(result("b", info=challenge("nc7-reid-00000002")), team="alice")
    publish_blind(db, "nc7-reid-00000002")
    assert db.results()["challenge_id"].tolist() == ["nc7-reid-00000001"]
    assert db.challenges()["blind"].tolist() == [False, True]


def test_closing_an_unknown_challenge_fails(db):
    with pytest.raises(NcbenchError, match="no challenge"):
        db.close_challenge("nope")


def test_challenge_id_with_another_commitment_is_refused(db):
    db.record_score(result("a"), team="alice")
    impostor = challenge(commitment="d" * 64)
    with pytest.raises(NcbenchError, match="another key commitment"):
        db.record_score(result("b", info=impostor), team="alice")


@pytest.mark.parametrize("team", ["", "   ", "x" * 65, "tab\there"])
def test_bad_team_names_are_refused(db, team):
    with pytest.raises(NcbenchError, match="team name"):
        db.record_score(result("a"), team=team)
    assert db.counts()["submissions"] == 0


def test_results_table_has_one_row_per_submission_and_split(db):
    db.record_score(result("a", accuracy=0.5), team="alice")
    db.record_score(result("b", accuracy=1.0), team="bob")
    table = db.results()
    assert table[["team", "reid_accuracy"]].values.tolist() == [["alice", 0.5], ["bob", 1.0]]
    assert list(db.challenges()["submissions"]) == [2]


def test_record_utility_rows(tmp_path):
    path = tmp_path / "board.db"
    rows = [
        {"preset": "nc7", "label": "effusion", "auc": 0.71, "model_kind": "encoded", "settings": {"epochs": 3}},
        {"preset": "nc7", "label": "effusion", "auc": 0.83, "model_kind": "raw", "settings": {"epochs": 3}},
    ]
    assert record_utility(str(path), rows) == 2
    with Store(path) as opened:
        table = opened.utility()
    assert table["auc"].tolist() == [0.71, 0.83] and table["settings"][0] == {"epochs": 3}


def test_privacy_utility_uses_the_latest_run_per_preset(tmp_path):
    from ncbench.leaderboard.tables import privacy_utility

    def run(auc):
        return [
            {"preset": "nc7", "label": "effusion", "auc": auc, "model_kind": "encoded"},
            {"preset": "raw", "label": "effusion", "auc": auc + 0.1, "model_kind": "raw"},
        ]

    with Store(tmp_path / "board.db") as opened:
        opened.record_utility(run(0.5), now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        opened.record_utility(run(0.8), now=dt.datetime(2026, 2, 1, tzinfo=dt.UTC))
        summary = privacy_utility(opened.results(), opened.utility())
    assert summary.loc[0, "encoded_auc"] == pytest.approx(0.8)
    assert summary.loc[0, "raw_auc"] == pytest.approx(0.9)


@pytest.mark.parametrize(
    "bad",
    [
        {"preset": "nc7", "label": "x", "auc": 1.5, "model_kind": "encoded"},
        {"preset": "nc7", "label": "x", "auc": 0.5, "model_kind": "paper"},
        {"preset": "", "label": "x", "auc": 0.5, "model_kind": "raw"},
        {"label": "x", "auc": 0.5, "model_kind": "raw"},
        {"preset": "nc7", "label": "x", "auc": "high", "model_kind": "raw"},
        {"preset": "nc7", "label": "x" * 129, "auc": 0.5, "model_kind": "raw"},
        {"preset": "nc7", "label": "x", "auc": 0.5, "model_kind": "raw", "settings": {"blob": "x" * 10_000}},
    ],
)
def test_malformed_utility_rows_write_nothing(db, bad):
    good = {"preset": "nc7", "label": "x", "auc": 0.5, "model_kind": "raw"}
    with pytest.raises(NcbenchError):
        record_utility(db, [good, bad])
    assert db.counts()["utility_results"] == 0


def test_version_1_database_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        store_module.schema_version.create(conn)
        version, description, apply = store_module.MIGRATIONS[0]
        apply(conn)
        conn.execute(store_module.schema_version.insert().values(version=1, description=description, applied_utc="x"))
    engine.dispose()
    with Store(path) as opened:
        assert opened.schema_version() == store_module.LATEST_VERSION
        assert opened.counts()["utility_results"] == 0


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.db"
    with Store(path) as opened:
        with opened.engine.begin() as conn:
            conn.execute(store_module.schema_version.insert().values(version=99, description="future", applied_utc="x"))
    with pytest.raises(NcbenchError, match="schema version 99"):
        Store(path)


def test_foreign_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id INTEGER)")
    engine.dispose()
    with pytest.raises(NcbenchError, match="not an ncbench leaderboard database"):
        Store(path)


def test_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(NcbenchError, match="not a usable database"):
        Store(path)


def test_a_database_that_cannot_be_created_is_one_line():
    with pytest.raises(NcbenchError, match="cannot create a database at /proc/ncbench.db"):
        Store("/proc/ncbench.db")


def test_missing_database_is_not_created_for_readers(tmp_path):
    with pytest.raises(NcbenchError, match="no leaderboard database"):
        Store(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()


@pytest.mark.parametrize(
    "db_arg, message",
    [
        ("postgresql+nosuchdriver://x@localhost/db", "no database driver"),
        ("not a url://", "neither a file path nor a valid database URL"),
        ("", "--db is empty"),
    ],
)
def test_bad_database_arguments(db_arg, message):
    with pytest.raises(NcbenchError, match=message):
        Store(db_arg)


def test_version_2_database_gains_origin_test_release_and_sites(tmp_path):
    """A database made before migration 3 (no origin, no test_release, no n_sites) keeps its rows,
    now self-reported and single-site."""
    path = tmp_path / "v2.db"
    old = sa.MetaData()
    new_columns = {("submissions", "origin"), ("challenges", "test_release"), ("challenges", "n_sites")}
    for table in (
        store_module.challenges,
        store_module.teams,
        store_module.submissions,
        store_module.scores,
        store_module.utility_results,
    ):
        sa.Table(table.name, old, *[c._copy() for c in table.columns if (table.name, c.name) not in new_columns])
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        store_module.schema_version.create(conn)
        old.create_all(conn)
        for version in (1, 2):
            conn.execute(store_module.schema_version.insert().values(version=version, description="", applied_utc="x"))
        conn.exec_driver_sql(
            f"INSERT INTO challenges VALUES ('nc7-reid-00000001', 'reid', 'nc7', 20, '{'c' * 64}', '{{}}', 'x', NULL)"
        )
        conn.exec_driver_sql("INSERT INTO teams VALUES (1, 'ncbench-builtin', 'x')")
        conn.exec_driver_sql(
            f"INSERT INTO submissions VALUES (1, 'nc7-reid-00000001', 1, '{'a'.ljust(64, '0')}', "
            "'gram-hungarian', '1.0', '{}', '[]', 1.0, 'scored', NULL, '[]', 'x')"
        )
        conn.exec_driver_sql("INSERT INTO scores VALUES (1, 0, 'reid_accuracy', 0.5)")
    engine.dispose()
    with Store(path) as opened:
        assert opened.schema_version() == store_module.LATEST_VERSION
        assert opened.results()[["attack", "origin"]].values.tolist() == [["gram-hungarian", "self-reported"]]
        assert not opened.challenges()["test_release"].any()
        assert opened.challenges()["n_sites"].tolist() == [1]
        # The organizer vouching for the same file again makes the old row an organizer row.
        again = opened.record_score(
            result("a", attack="gram-hungarian"), team=store_module.BUILTIN_TEAM, origin=store_module.ORIGIN_ORGANIZER
        )
        assert again.duplicate and again.submission_id == 1
        assert opened.results()["origin"].tolist() == ["organizer"]


def test_version_8_database_gains_published_blind_off(tmp_path):
    """A challenge published before migration 9 stays as it was: not blind, its public half shown."""
    path = tmp_path / "v8.db"
    old = sa.MetaData()
    for table in store_module.metadata.sorted_tables:
        sa.Table(table.name, old, *[c._copy() for c in table.columns if (table.name, c.name) != ("published", "blind")])
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        old.create_all(conn)
        for version in range(1, 9):
            conn.execute(store_module.schema_version.insert().values(version=version, description="", applied_utc="x"))
        conn.execute(
            old.tables["published"]
            .insert()
            .values(challenge_id="nc7-reid-00000001", files="[]", daily_limit=5, published_utc="x")
        )
    engine.dispose()
    with Store(path) as opened:
        assert opened.schema_version() == store_module.LATEST_VERSION
        opened.record_score(result("a"), team="alice")
        assert opened.challenges()["blind"].tolist() == [False]
        assert opened.results()["split"].tolist() == ["public"]


@pytest.mark.parametrize(
    "team, canonical",
    [
        ("Team", "team"),
        ("TEAM", "team"),
        ("\uff54\uff45\uff41\uff4d", "team"),
        ("te\u0301am", "team"),
        ("  Alice  ", "alice"),
        ("Stra\u00dfe", "strasse"),
        ("team-7.b_c", "team-7.b_c"),
    ],
)
def test_look_alike_team_names_are_one_team(db, team, canonical):
    assert store_module.check_team_name(team) == canonical
    db.record_score(result("a"), team="team" if canonical == "team" else canonical, daily_limit=1, now=NOON)
    with pytest.raises(NcbenchError, match="used its 1"):
        db.record_score(result("b"), team=team, daily_limit=1, now=NOON)
    assert db.counts()["teams"] == 1


@pytest.mark.parametrize(
    "team",
    [
        "t\u0435am",
        "\u0442eam",
        '=HYPERLINK("http://x")',
        "@SUM(1)",
        "-team",
        "team\u200b",
        "a/b",
        "x" * 65,
        "x" * 10_000_000,
        7,
        None,
    ],
)
def test_names_that_are_not_plain_ascii_after_folding_are_refused(db, team):
    with pytest.raises(NcbenchError, match="team name") as caught:
        db.record_score(result("a"), team=team)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
    assert db.counts()["submissions"] == 0


HUGE = "x" * 10_000_000


@pytest.mark.parametrize(
    "field, value",
    [
        ("attack", HUGE),
        ("attack_version", HUGE),
        ("params", {"blob": HUGE}),
        ("knowledge", ("architecture",) * 200),
        ("notes", [HUGE]),
        ("attack", "name\nwith a line break"),
        ("attack_version", "1.0\x1b[2J"),
    ],
)
def test_overlong_or_control_strings_are_refused_and_nothing_is_written(db, field, value):
    db.record_score(result("a"), team="alice")
    before = db.counts()
    bad = result("b")
    setattr(bad, field, value)
    with pytest.raises(NcbenchError) as caught:
        db.record_score(bad, team="alice")
    message = str(caught.value)
    assert field in message and "\n" not in message and len(message) < 300
    assert db.counts() == before


def test_overlong_challenge_strings_are_refused(db):
    with pytest.raises(NcbenchError, match="preset is 100 characters"):
        db.record_score(result("a", info=challenge(preset="p" * 100)), team="alice")
    assert db.counts()["challenges"] == 0


def test_organizer_rows_are_builtin_attacks_under_the_builtin_team(db):
    organizer = store_module.ORIGIN_ORGANIZER
    with pytest.raises(NcbenchError, match="recorded under team"):
        db.record_score(result("a", attack="gram-hungarian"), team="alice", origin=organizer)
    with pytest.raises(NcbenchError, match="not a built-in attack"):
        db.record_score(result("a", attack="alices-attack"), team=store_module.BUILTIN_TEAM, origin=organizer)
    with pytest.raises(NcbenchError, match="reserved for the organizer"):
        db.record_score(result("a", attack="alices-attack"), team="NCBENCH-BUILTIN")
    with pytest.raises(NcbenchError, match="origin must be"):
        db.record_score(result("a"), team="alice", origin="trusted")
    assert db.counts()["submissions"] == 0
    db.record_score(result("a", attack="gram-hungarian"), team=store_module.BUILTIN_TEAM, origin=organizer)
    assert db.results()["origin"].tolist() == ["organizer"]


@pytest.mark.parametrize(
    "attack",
    [
        "gram-hungarian",
        "Gram_Hungarian",
        "GRAM HUNGARIAN",
        "gram-hungar\u0456an",
        "\u043eracle",
        "\uff43\uff48\uff41\uff4e\uff43\uff45",
        "linear.inversion",
        "grarn-hungarian",
        "distribution-a1ignment",
        "cha\u0301nce",
    ],
)
def test_a_team_file_named_like_a_builtin_is_self_reported_never_organizer(db, attack):
    db.record_score(result("a", attack=attack), team="alice")
    rows = db.results()
    assert rows["origin"].tolist() == ["self-reported"] and rows["team"].tolist() == ["alice"]


def test_public_scores_of_a_team_follow_the_ladder_and_stay_exact_in_storage(db):
    # n = 10 public items: margin 1/sqrt(10) = 0.316, grid 0.01.
    exact = [0.5, 0.7, 0.4, 0.85, 0.123]
    ids = [db.record_score(result(str(k), accuracy=value), team="alice").submission_id for k, value in enumerate(exact)]
    shown = db.results().set_index("submission_id")["reid_accuracy"]
    assert [shown[i] for i in ids] == [0.5, 0.5, 0.5, 0.85, 0.85]
    assert [db.submission(i)["metrics"]["public"]["reid_accuracy"] for i in ids] == [0.5, 0.5, 0.5, 0.85, 0.85]
    assert db.submission(ids[1])["metrics"]["public"]["k_anonymity"] == 2.0  # from the shown 0.5, not 0.7
    organizer_view = db.results(include_private=True).query("split == 'public'").set_index("submission_id")
    assert [organizer_view.loc[i, "reid_accuracy"] for i in ids] == exact
    db.close_challenge("nc7-reid-00000001")
    assert db.results().query("split == 'private'")["reid_accuracy"].tolist() == [0.25] * 5  # exact


def test_each_team_has_its_own_ladder_and_organizer_rows_are_exact(db):
    db.record_score(result("a", accuracy=0.3), team="alice")
    db.record_score(result("b", accuracy=0.456), team="bob")
    db.record_score(result("c", accuracy=0.5), team="alice")
    db.record_score(
        result("d", accuracy=0.777, attack="gram-hungarian"),
        team=store_module.BUILTIN_TEAM,
        origin=store_module.ORIGIN_ORGANIZER,
    )
    shown = db.results()[["team", "reid_accuracy"]].values.tolist()
    assert shown == [["alice", 0.3], ["bob", 0.46], ["alice", 0.3], [store_module.BUILTIN_TEAM, 0.777]]


def test_admission_refuses_over_the_limit_without_writing(db):
    db.record_score(result("a"), team="alice", daily_limit=1, now=NOON)
    before = db.counts()
    digests = []

    def digest(sha):
        return lambda: digests.append(sha) or sha.ljust(64, "0")

    with pytest.raises(NcbenchError, match="used its 1"):
        db.check_admission("nc7-reid-00000001", team="ALICE", daily_limit=1, sha256=digest("b"), now=NOON)
    db.check_admission("nc7-reid-00000001", team="alice", daily_limit=1, sha256=digest("a"), now=NOON)  # same file
    db.check_admission("nc7-reid-00000001", team="bob", daily_limit=1, sha256=digest("c"), now=NOON)  # new team
    db.check_admission("nc7-reid-00000001", team="alice", daily_limit=2, sha256=digest("d"), now=NOON)
    assert digests == ["b", "a"]  # the file is hashed only at the limit
    assert db.counts() == before


# -- concurrency -------------------------------------------------------------------------------

WORKERS = 4
OWN_FILES = 5  # distinct submissions per worker under its own team
LIMITED_TRIES = 2  # distinct submissions per worker under one shared team with a daily limit
SHARED_LIMIT = 3


def _worker(db_url, worker, barrier, errors):
    try:
        with Store(db_url) as opened:
            barrier.wait(timeout=60)
            for k in range(OWN_FILES):
                opened.record_score(result(f"w{worker}-{k}"), team=f"team-{worker}", daily_limit=None)
            # Every worker submits the same file for one team: exactly one row may result.
            opened.record_score(result("same-file"), team="shared", daily_limit=None)
            for k in range(LIMITED_TRIES):
                try:
                    opened.record_score(result(f"limited-{worker}-{k}"), team="limited", daily_limit=SHARED_LIMIT)
                except NcbenchError as error:
                    if "used its" not in str(error):
                        raise
    except BaseException as error:  # reported to the parent, which fails the test
        errors.put(f"worker {worker}: {type(error).__name__}: {error}")


def run_concurrently(db_url):
    context = multiprocessing.get_context("fork")
    barrier, errors = context.Barrier(WORKERS), context.Queue()
    processes = [context.Process(target=_worker, args=(db_url, w, barrier, errors)) for w in range(WORKERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, "a worker hung"
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, problems


def check_concurrent_rows(opened):
    with opened.engine.connect() as conn:
        per_team = dict(
            conn.execute(
                sa.text("SELECT t.name, count(*) FROM submissions s JOIN teams t ON t.id = s.team_id GROUP BY t.name")
            ).all()
        )
        duplicates = conn.execute(
            sa.text(
                "SELECT count(*) FROM (SELECT challenge_id, team_id, sha256 FROM submissions "
                "GROUP BY challenge_id, team_id, sha256 HAVING count(*) > 1) AS d"
            )
        ).scalar()
    assert per_team == {**{f"team-{w}": OWN_FILES for w in range(WORKERS)}, "shared": 1, "limited": SHARED_LIMIT}
    assert duplicates == 0
    n_submissions = WORKERS * OWN_FILES + 1 + SHARED_LIMIT
    assert opened.counts() == {
        "challenges": 1,
        "teams": WORKERS + 2,
        "submissions": n_submissions,
        "scores": n_submissions * 8,
        "utility_results": 0,
    }


def test_concurrent_writers_neither_lose_nor_duplicate_rows(tmp_path):
    path = tmp_path / "board.db"
    run_concurrently(str(path))  # the workers also race to create the schema
    with Store(path) as opened:
        check_concurrent_rows(opened)


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
def pg_db(postgres_url):
    with Store(postgres_url) as opened:
        yield opened
        with opened.engine.begin() as conn:  # each test starts from an empty schema
            for table in reversed(store_module.metadata.sorted_tables):
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {table.name} CASCADE"))


@pytest.mark.postgres
def test_postgres_store_rules(pg_db):
    first = pg_db.record_score(result("a"), team="alice", daily_limit=2, now=NOON)
    assert pg_db.record_score(result("a"), team="alice", daily_limit=2, now=NOON).duplicate
    pg_db.record_score(result("b"), team="alice", daily_limit=2, now=NOON)
    with pytest.raises(NcbenchError, match="used its 2 submissions"):
        pg_db.record_score(result("c"), team="alice", daily_limit=2, now=NOON)
    assert set(pg_db.results()["split"]) == {"public"}
    pg_db.close_challenge("nc7-reid-00000001")
    assert pg_db.submission(first.submission_id)["metrics"]["private"]["reid_accuracy"] == 0.25
    never = pg_db.record_score(result("z", accuracy=0.0), team="bob")
    assert pg_db.submission(never.submission_id)["metrics"]["public"]["k_anonymity"] == math.inf
    record_utility(pg_db, [{"preset": "nc7", "label": "x", "auc": 0.6, "model_kind": "raw"}])
    assert pg_db.counts()["utility_results"] == 1
    assert pg_db.schema_version() == store_module.LATEST_VERSION


@pytest.mark.postgres
def test_postgres_every_submission_has_the_id_of_its_job(pg_db):
    check_one_id_per_submission(pg_db)


@pytest.mark.postgres
def test_postgres_migration_10_moves_the_job_sequence_past_every_id(pg_db, postgres_url):
    make_store_before_one_id(pg_db)
    check_migration_10(postgres_url)


@pytest.mark.postgres
def test_postgres_concurrent_writers(pg_db, postgres_url):
    run_concurrently(postgres_url)
    check_concurrent_rows(pg_db)


def test_unreachable_server_is_one_line():
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed")
    with pytest.raises(NcbenchError, match="unavailable"):
        Store("postgresql+psycopg://nobody@127.0.0.1:1/board?connect_timeout=3")


@pytest.mark.postgres
def test_postgres_migration_3_adds_origin_and_test_release(pg_db):
    pg_db.record_score(result("a"), team="alice")
    migration_3 = next(apply for version, _, apply in store_module.MIGRATIONS if version == 3)
    with pg_db.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE submissions DROP COLUMN origin")
        conn.exec_driver_sql("ALTER TABLE challenges DROP COLUMN test_release")
        migration_3(conn)
    assert pg_db.results()["origin"].tolist() == ["self-reported"]
    assert pg_db.challenges()["test_release"].tolist() == [False]
    with pytest.raises(sa.exc.IntegrityError):  # the origin vocabulary is a constraint
        with pg_db.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE submissions SET origin = 'trusted'")


# -- one id per submission -----------------------------------------------------------------------


def queue_job(opened, team="bob", sha="q"):
    """A job as the server's upload queues it (what ``channel.enqueue`` writes)."""
    with opened._write() as conn:
        opened._ensure_challenge(conn, challenge(), NOON)
        team_id = opened._lock_team(conn, team, NOON)
        return int(
            conn.execute(
                store_module.jobs.insert()
                .values(
                    challenge_id="nc7-reid-00000001",
                    team_id=team_id,
                    sha256=sha.ljust(64, "0"),
                    size=10,
                    state="queued",
                    attempts=0,
                    created_utc="x",
                    updated_utc="x",
                )
                .returning(store_module.jobs.c.id)
            ).scalar_one()
        )


def jobs_of(opened) -> dict[int, tuple[str, int | None]]:
    with opened._read() as conn:
        rows = conn.execute(
            sa.select(store_module.jobs.c.id, store_module.jobs.c.state, store_module.jobs.c.submission_id)
        )
        return {row.id: (row.state, row.submission_id) for row in rows}


def check_one_id_per_submission(opened):
    local = opened.record_score(result("a"), team="alice", size=123)
    queued = queue_job(opened)
    crashed = opened.record_failure(challenge(), team="carol", sha256="c" * 64, error="scorer bug")
    uploaded = opened.record_score(result("q"), team="bob", job_id=queued)
    assert [local.submission_id, queued, crashed] == [1, 2, 3]
    assert uploaded.submission_id == queued
    assert jobs_of(opened) == {1: ("scored", 1), 2: ("queued", None), 3: ("failed", 3)}
    assert sorted(opened.results()["submission_id"]) == [1, 2]
    with opened._read() as conn:  # the team reads fixed words, never the organizer's error text
        message = conn.execute(sa.select(store_module.jobs.c.message).where(store_module.jobs.c.id == 3)).scalar()
    assert message == store_module.SCORER_FAILED


def test_every_submission_has_the_id_of_its_job(db):
    check_one_id_per_submission(db)


def test_a_job_already_recorded_is_a_duplicate_under_its_own_id(db):
    """A worker that died after recording and is run again finds its own row, not a new one."""
    queued = queue_job(db)
    first = db.record_score(result("q"), team="bob", job_id=queued)
    again = db.record_score(result("q"), team="bob", job_id=queued)
    assert (again.submission_id, again.duplicate, first.duplicate) == (queued, True, False)


def make_store_before_one_id(opened):
    """Rows as a store before migration 10 held them: submissions 1 and 2 recorded locally
    (no job), submission 3 scored through the API as job 1; schema version 9."""
    stamp = "2026-11-27T12:00:00.000000Z"
    with opened.engine.begin() as conn:
        conn.execute(
            store_module.challenges.insert().values(
                challenge_id="nc7-reid-00000001",
                task="reid",
                preset="nc7",
                n_encoded=20,
                key_commitment="c" * 64,
                encoder_config="{}",
                created_utc=stamp,
            )
        )
        conn.execute(store_module.teams.insert().values(id=1, name="alice", created_utc=stamp))
        for sub_id, sha in ((1, "a"), (2, "b"), (3, "c")):
            conn.execute(
                store_module.submissions.insert().values(
                    id=sub_id,
                    challenge_id="nc7-reid-00000001",
                    team_id=1,
                    sha256=sha.ljust(64, "0"),
                    attack="x",
                    attack_version="1",
                    params="{}",
                    knowledge="[]",
                    status="scored",
                    notes="[]",
                    created_utc=stamp,
                )
            )
        conn.execute(
            store_module.jobs.insert().values(
                id=1,
                challenge_id="nc7-reid-00000001",
                team_id=1,
                sha256="c".ljust(64, "0"),
                size=5,
                state="scored",
                submission_id=3,
                attempts=1,
                created_utc=stamp,
                updated_utc=stamp,
            )
        )
        conn.execute(store_module.schema_version.delete().where(store_module.schema_version.c.version >= 10))


def check_migration_10(url):
    with Store(url) as opened:
        assert opened.schema_version() == store_module.LATEST_VERSION
        # Submission 2 takes job id 2; job 1 was taken, so submission 1 gets a fresh job (4);
        # the API's submission keeps the two ids it had (job 1, submission 3).
        assert jobs_of(opened) == {1: ("scored", 3), 2: ("scored", 2), 4: ("scored", 1)}
        assert opened.record_score(result("d"), team="alice").submission_id == 5
        assert queue_job(opened, sha="e") == 6


def test_migration_10_run_again_adds_no_job_for_a_submission_its_job_has_not_yet_marked(db):
    """A worker that recorded a submission and stopped before marking its job: running the
    migration again (a store rewound to version 9) leaves the job its submission's."""
    queued = queue_job(db)
    db.record_score(result("q"), team="bob", job_id=queued)
    with db.engine.begin() as conn:
        conn.execute(store_module.schema_version.delete().where(store_module.schema_version.c.version >= 10))
    with Store(db.url) as reopened:
        assert jobs_of(reopened) == {queued: ("queued", None)}


def test_migration_10_gives_every_older_submission_a_job_and_new_ids_collide_with_none(tmp_path):
    path = tmp_path / "v9.db"
    with Store(path) as opened:
        make_store_before_one_id(opened)
    check_migration_10(path)


def test_files_recorded_without_the_server_count_against_the_daily_limit_not_the_upload_rate(db):
    db.record_score(result("0"), team="alice")  # creates the challenge
    with db.engine.begin() as conn:
        conn.execute(
            store_module.published.insert().values(
                challenge_id="nc7-reid-00000001",
                files="[]",
                daily_limit=channel.RATE_LIMIT_PER_MINUTE + 2,
                published_utc="x",
            )
        )
    for k in range(1, channel.RATE_LIMIT_PER_MINUTE + 1):
        db.record_score(result(f"{k}x"), team="alice", daily_limit=None)
    upload = channel.enqueue(db, team="alice", challenge_id="nc7-reid-00000001", sha256="u" * 64, size=5)
    assert upload == channel.RATE_LIMIT_PER_MINUTE + 2  # admitted: the recordings are not uploads
    with pytest.raises(NcbenchError, match="used its 12 submissions"):
        channel.enqueue(db, team="alice", challenge_id="nc7-reid-00000001", sha256="v" * 64, size=5)
