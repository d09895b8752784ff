"""The Streamlit leaderboard, driven by streamlit.testing's AppTest, and served over HTTP."""

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import ncbench.leaderboard as leaderboard
import ncbench.leaderboard.board as board_package
from ncbench.leaderboard import tables
from ncbench.leaderboard.metrics import privacy_band
from ncbench.leaderboard.scoring import ChallengeInfo, ScoreResult
from ncbench.leaderboard.store import BUILTIN_TEAM, DB_ENV, ORIGIN_ORGANIZER, Store, published, record_utility
from ncbench.leaderboard.tables import CHANCE_ROW, TEST_RELEASE

APP = str(Path(leaderboard.__file__).parent / "board" / "app.py")
PAGES = (
    "Attack x preset",
    "Verified",
    "Self-reported",
    "Challenges",
    "Submission",
    "Privacy vs utility",
    "Privacy vs depth",
    "Take part",
)
# Elements whose text Streamlit renders as Markdown: no string a team chose may reach them.
MARKDOWN_ELEMENTS = ("markdown", "caption", "info", "warning", "error", "success", "title", "header", "subheader")
CONFIGS = {
    "linear": {"mix": False, "shuffle": False, "depth": 0},
    "nc3": {"mix": True, "shuffle": True, "depth": 0},
    "nc7": {"mix": True, "shuffle": True, "depth": 4},
}


def challenge_info(challenge_id, preset, n, *, test_release=False):
    info = ChallengeInfo(challenge_id, "reid", preset, n, "c" * 64, json.dumps(CONFIGS[preset]))
    if not test_release:
        return info
    if "test_release" in {f.name for f in dataclasses.fields(ChallengeInfo)}:
        return dataclasses.replace(info, test_release=True)
    return InfoWithTestRelease(**dataclasses.asdict(info))  # until the scorer's ChallengeInfo has the field


@dataclasses.dataclass(frozen=True)
class InfoWithTestRelease(ChallengeInfo):
    test_release: bool = True


def result(challenge_id, preset, attack, accuracy, sha, *, n=20, positions=None, test_release=False):
    info = challenge_info(challenge_id, preset, n, test_release=test_release)
    metrics = {}
    for split, value in ((0, accuracy), (1, accuracy / 2)):
        metrics[split] = {
            "reid_accuracy": value,
            "chance": 1 / n,
            "n": n / 2,
            "k_anonymity": 1 / value if value else math.inf,
        }
        if positions is not None:
            metrics[split]["patch_position_accuracy"] = positions
    return ScoreResult(info, attack, "1.0", {"iterations": 2}, ("architecture",), 4.2, sha.ljust(64, "0"), metrics)


@pytest.fixture
def empty_db(tmp_path, monkeypatch):
    path = tmp_path / "empty.db"
    Store(path).close()
    monkeypatch.setenv(DB_ENV, str(path))
    return path


@pytest.fixture
def populated_db(tmp_path, monkeypatch):
    path = tmp_path / "board.db"
    with Store(path) as store:

        def organizer(score):
            store.record_score(score, team=BUILTIN_TEAM, origin=ORIGIN_ORGANIZER)

        organizer(result("nc7-reid-a", "nc7", "gram-hungarian", 0.9, "1", positions=0.75))
        organizer(result("nc7-reid-a", "nc7", "gram-hungarian", 1.0, "2"))  # best of two
        organizer(result("nc7-reid-a", "nc7", "chance", 0.05, "3"))
        organizer(result("linear-reid-a", "linear", "gram-hungarian", 0.02, "4", n=50))
        organizer(result("nc3-reid-a", "nc3", "linear-inversion", 0.1, "5", n=10))
        # Teams' files: self-reported, whatever they score, they stay out of the matrix.
        store.record_score(result("nc7-reid-a", "nc7", "relabelled-oracle", 1.0, "6"), team="alice")
        store.record_score(result("nc3-reid-a", "nc3", "bobs-attack", 0.6, "7", n=10), team="bob")
        record_utility(
            store,
            [
                {"preset": "nc7", "label": "effusion", "auc": 0.70, "model_kind": "encoded"},
                {"preset": "nc7", "label": "nodule", "auc": 0.80, "model_kind": "encoded"},
                {"preset": "nc7", "label": "effusion", "auc": 0.90, "model_kind": "raw"},
            ],
        )
    monkeypatch.setenv(DB_ENV, str(path))
    return path


def app():
    return AppTest.from_file(APP, default_timeout=60).run()


def go(at, page):
    at.sidebar.radio[0].set_value(page).run()
    assert not at.exception, at.exception
    return at


def test_every_page_renders_on_an_empty_database(empty_db):
    at = app()
    assert not at.exception
    for page in PAGES:
        go(at, page)
        assert not at.error
    go(at, PAGES[0])
    assert "No organizer runs of the built-in attacks yet" in at.info[0].value
    go(at, "Self-reported")
    assert "No self-reported submissions yet" in at.info[0].value


def test_missing_database_shows_an_error_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv(DB_ENV, str(tmp_path / "absent.db"))
    at = app()
    assert not at.exception
    assert "no leaderboard database" in at.error[0].value
    assert not (tmp_path / "absent.db").exists()


def test_every_page_renders_on_a_populated_database(populated_db):
    at = app()
    for page in PAGES:
        go(at, page)
        assert not at.error


def test_matrix_shows_best_reidentification_per_attack_and_preset(populated_db):
    matrix = app().dataframe[0].value
    assert list(matrix.columns) == ["linear", "nc3", "nc7"]  # weakest encoding first
    # Cells are text, so a missing run reads "not run" in the browser too.
    expected = pd.DataFrame(
        {
            "linear": ["not run", "2.0%", "not run", "2.0%"],
            "nc3": ["not run", "not run", "10.0%", "10.0%"],
            "nc7": ["5.0%", "100.0%", "not run", "5.0%"],
        },
        index=["chance", "gram-hungarian", "linear-inversion", CHANCE_ROW],
    )
    pd.testing.assert_frame_equal(matrix.astype(object), expected.astype(object), check_names=False)


def test_private_half_appears_only_after_close(populated_db):
    at = app()
    half = next(r for r in at.radio if r.label == "Scoring half")
    half.set_value("private").run()
    assert "No private-half results" in at.info[0].value
    with Store(populated_db) as store:
        store.close_challenge("nc7-reid-a")
    at.run()
    matrix = at.dataframe[0].value
    assert matrix.loc["gram-hungarian", "nc7"] == "50.0%" and list(matrix.columns) == ["nc7"]


def test_self_reported_page_lists_team_files_under_their_own_names(populated_db):
    at = go(app(), "Self-reported")
    table = at.dataframe[0].value
    assert table["attack"].tolist() == ["alice/relabelled-oracle", "bob/bobs-attack"]  # best first
    assert "cannot be checked" in at.caption[0].value
    assert not {"gram-hungarian", "chance", "linear-inversion"} & set(table["attack"])


def test_challenge_table_filters_by_team_and_attack(populated_db):
    at = go(app(), "Challenges")
    at.selectbox[0].set_value("nc7-reid-a").run()
    table = at.dataframe[1].value
    assert sorted(table["team"]) == ["alice", BUILTIN_TEAM, BUILTIN_TEAM, BUILTIN_TEAM]
    assert set(table["origin"]) == {"organizer", "self-reported"}
    at.text_input[0].set_value("ALI").run()
    assert at.dataframe[1].value["team"].tolist() == ["alice"]
    at.text_input[0].set_value("").run()
    at.multiselect[0].set_value(["gram-hungarian"]).run()
    assert at.dataframe[1].value["reidentification"].tolist() == [0.9, 1.0]
    assert at.get("download_button")


def test_submission_details_show_metrics_and_patch_positions(populated_db):
    at = go(app(), "Submission")
    at.selectbox[0].set_value(1).run()
    assert at.selectbox[0].format_func(1).startswith("submission 1: ")  # the id the CLI prints
    values = {m.label: m.value for m in at.metric}
    assert values["Re-identification (public)"] == "90.0%"
    assert values["Patch-position accuracy"] == "75.0%"
    assert values["Runtime"] == "4.2 s"
    assert list(at.dataframe[0].value.columns) == ["public"]  # private half hidden while open


def test_privacy_utility_summary(populated_db):
    at = go(app(), "Privacy vs utility")
    summary = at.dataframe[0].value
    row = summary.set_index("preset").loc["nc7"]
    assert row["best_reidentification"] == 1.0 and row["encoded_auc"] == pytest.approx(0.75)
    assert row["raw_auc"] == pytest.approx(0.9) and row["band"] == "bad"
    by_label = at.dataframe[1].value
    assert by_label.loc["nodule", "nc7"] == pytest.approx(0.80)
    assert by_label.loc["effusion", "nc7"] == pytest.approx(0.70)
    assert by_label.loc["effusion", "raw"] == pytest.approx(0.90)


def test_take_part_page_gives_the_commands(populated_db):
    at = go(app(), "Take part")
    at.selectbox[0].set_value("nc7-reid-a").run()  # generated from the open challenges
    code = "\n".join(block.value for block in at.code)
    assert "ncbench fetch nc7-reid-a" in code
    assert "ncbench attack run gram-hungarian --release nc7-reid-a" in code
    for step in ("ncbench login --server", "ncbench attack check", "ncbench submit submission.h5", "--plugin"):
        assert step in code, step
    assert "Ladder" in "\n".join(block.value for block in at.markdown)


def test_take_part_marks_a_blind_challenge_and_says_its_scores_stay_hidden(populated_db):
    with Store(populated_db) as store, store.engine.begin() as conn:
        conn.execute(
            published.insert().values(
                challenge_id="nc3-reid-a", files="[]", daily_limit=5, published_utc="x", blind=True
            )
        )
    at = go(app(), "Take part")
    phases = at.dataframe[0].value.set_index("challenge_id")["phase"]
    assert phases["nc3-reid-a"] == f"open, {tables.BLIND}" and "Ladder" in phases["nc7-reid-a"]
    assert any("appears when the organizers close" in box.value for box in at.info)


def test_a_page_is_opened_by_its_link(populated_db):
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = "take-part"
    at.run()
    assert not at.exception
    assert at.header[0].value == "Take part"
    go(at, "Challenges")
    assert at.query_params["page"] == "challenges"


def test_challenges_show_open_and_the_release_kind(populated_db):
    listing = go(app(), "Challenges").dataframe[0].value
    assert set(listing["state"]) == {"open"} and set(listing["release"]) == {"secret key"}
    assert listing["created"].str.endswith(" UTC").all()


def test_a_blind_challenge_lists_its_submissions_without_scores_until_the_close(populated_db):
    with Store(populated_db) as store, store.engine.begin() as conn:
        conn.execute(
            published.insert().values(
                challenge_id="nc3-reid-a", files="[]", daily_limit=5, published_utc="x", blind=True
            )
        )
    at = go(app(), "Challenges")
    listing = at.dataframe[0].value.set_index("challenge_id")
    assert listing.loc["nc3-reid-a", "state"] == f"open, {tables.BLIND}"
    at.selectbox[0].set_value("nc3-reid-a").run()
    assert tables.BLIND in at.info[0].value
    entries = at.dataframe[1].value
    assert sorted(entries["team"]) == sorted([BUILTIN_TEAM, "bob"]) and set(entries["state"]) == {"scored"}
    assert "reid_accuracy" not in entries and "reidentification" not in entries
    with Store(populated_db) as store:
        store.close_challenge("nc3-reid-a")
    at = go(app(), "Challenges")
    at.selectbox[0].set_value("nc3-reid-a").run()
    assert set(at.dataframe[1].value["split"]) == {"public", "private"}


EVIL_ATTACK = '<script>alert(1)</script>=HYPERLINK("http://x","win")'
EVIL_VERSION = "[x](javascript:alert(1))"
EVIL_PARAM = "![p](http://example.invalid/p.png) **bold** <img src=x onerror=alert(2)>"
EVIL_FRAGMENTS = ("<script", "javascript:", "![p]", "alert(", "<img", "HYPERLINK", "**bold**")


@pytest.fixture
def hostile_db(tmp_path, monkeypatch):
    path = tmp_path / "hostile.db"
    score = result("nc7-reid-a", "nc7", EVIL_ATTACK, 0.5, "1")
    score.attack_version, score.params, score.notes = EVIL_VERSION, {"caption": EVIL_PARAM}, [EVIL_PARAM]
    with Store(path) as store:
        store.record_score(score, team="mallory")
        store.record_score(
            result("nc7-reid-a", "nc7", "gram-hungarian", 0.2, "2"), team=BUILTIN_TEAM, origin=ORIGIN_ORGANIZER
        )
    monkeypatch.setenv(DB_ENV, str(path))
    return path


def markdown_texts(at):
    return [str(element.value) for kind in MARKDOWN_ELEMENTS for element in getattr(at, kind)]


def test_strings_from_a_file_reach_the_page_as_plain_text_only(hostile_db):
    at = app()
    for page in PAGES:
        go(at, page)
        if page == "Submission":
            at.selectbox[0].set_value(1).run()
            shown = "\n".join(element.value for element in at.text)
            assert f"mallory/{EVIL_ATTACK} {EVIL_VERSION}" in shown and EVIL_PARAM in shown
        leaked = [text for text in markdown_texts(at) if any(f in text for f in EVIL_FRAGMENTS)]
        assert not leaked, (page, leaked)


def test_test_release_is_marked_on_the_board(tmp_path, monkeypatch):
    path = tmp_path / "test-release.db"
    with Store(path) as store:
        store.record_score(
            result("nc7-reid-t", "nc7", "gram-hungarian", 1.0, "1", test_release=True),
            team=BUILTIN_TEAM,
            origin=ORIGIN_ORGANIZER,
        )
        store.record_score(
            result("nc7-reid-s", "nc7", "gram-hungarian", 0.1, "2"), team=BUILTIN_TEAM, origin=ORIGIN_ORGANIZER
        )
    monkeypatch.setenv(DB_ENV, str(path))
    at = app()
    assert any("test releases (key public)" in w.value for w in at.warning)  # under the matrix
    go(at, "Challenges")
    listing = at.dataframe[0].value.set_index("challenge_id")
    assert listing.loc["nc7-reid-t", "release"] == TEST_RELEASE and listing.loc["nc7-reid-s", "release"] == "secret key"
    go(at, "Submission")
    at.selectbox[0].set_value(1).run()
    assert any("test release" in w.value for w in at.warning)
    at.selectbox[0].set_value(2).run()
    assert not any("test release" in w.value for w in at.warning)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


def _serve(db, port):
    ncbench = Path(sys.executable).with_name("ncbench")
    # A session of its own, so that cleanup can reach anything the server leaves behind.
    return subprocess.Popen(
        [str(ncbench), "leaderboard", "serve", "--db", str(db), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_for_health(process, port):
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, "the server exited"
        try:
            return _get(f"http://127.0.0.1:{port}/_stcore/health")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert time.monotonic() < deadline, "no answer within 90 s"
            time.sleep(0.5)


def _port_open(port):
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _servers_on(port):
    """Pids of live processes whose command line serves on ``port`` (any parent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and b"--server.port" in argv and str(port).encode() in argv:
                found.append(int(entry.name))
    return found


def _stop_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def test_served_app_answers_over_http(populated_db):
    port = _free_port()
    process = _serve(populated_db, port)
    try:
        status, body = _wait_for_health(process, port)
        assert status == 200 and body.strip() == b"ok"
        status, body = _get(f"http://127.0.0.1:{port}/")
        assert status == 200 and b"<html" in body.lower()
    finally:
        _stop_group(process)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds leftover servers through /proc")
def test_sigterm_to_serve_leaves_no_server_behind(populated_db):
    port = _free_port()
    process = _serve(populated_db, port)
    try:
        _wait_for_health(process, port)
        process.send_signal(signal.SIGTERM)  # the `serve` command only, as a supervisor would
        process.wait(timeout=20)
        deadline = time.monotonic() + 10
        while (_port_open(port) or _servers_on(port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _port_open(port), "something still listens on the port"
        assert not _servers_on(port), "a Streamlit process outlived `serve`"
    finally:
        _stop_group(process)


# -- privacy vs depth -------------------------------------------------------------------------------


def depth_result(challenge_id, depth, attack, accuracy, sha, *, n=20, preset="nc7", mix=True):
    """An organizer's reid score on a challenge whose encoder has ``depth`` private blocks."""
    config = json.dumps({"mix": mix, "shuffle": mix, "depth": depth})
    score = result(challenge_id, "nc7", attack, accuracy, sha, n=n)
    info = ChallengeInfo(challenge_id, "reid", preset, n, "d" * 64, config)
    return dataclasses.replace(score, challenge=info)


def depth_rows(depth, aucs, *, seed=0, kind="encoded", version=3, created="2026-11-29T00:00:00Z"):
    settings = {"seed": seed, "n_train": 96, "n_test": 48, "image_size": 64, "patch_size": 16, "epochs": 1}
    settings |= {"source": "phantom", "model_version": version}
    if kind == "encoded":
        settings["depth"] = depth
    preset = "raw" if kind == "raw" else f"nc7-depth{depth}"
    return [
        {
            "preset": preset,
            "label": label,
            "auc": value,
            "model_kind": kind,
            "settings": settings,
            "created_utc": created,
        }
        for label, value in zip(("cardiomegaly", "effusion"), aucs)
    ]


@pytest.fixture
def depth_db(tmp_path, monkeypatch):
    path = tmp_path / "depth.db"
    with Store(path) as store:

        def organizer(score):
            store.record_score(score, team=BUILTIN_TEAM, origin=ORIGIN_ORGANIZER)

        organizer(depth_result("d0", 0, "gram-hungarian", 1.0, "1", preset="nc3"))
        organizer(depth_result("d16", 16, "gram-hungarian", 0.4, "2"))
        organizer(depth_result("d16", 16, "gram-hungarian", 0.6, "3"))  # best of two
        organizer(depth_result("d16", 16, "carlini-2021", 0.2, "4"))
        organizer(depth_result("d44", 44, "gram-hungarian", 0.1, "5", n=40, preset="nc47"))
        organizer(depth_result("lin", 0, "gram-hungarian", 0.9, "6", preset="linear", mix=False))  # not NeuraCrypt
        store.record_score(depth_result("d44", 44, "claimed-break", 1.0, "7", preset="nc47"), team="eve")
        record_utility(
            store,
            depth_rows(16, (0.8, 0.6))
            + depth_rows(16, (0.7, 0.5), seed=1)
            + depth_rows(44, (0.5, 0.5))
            + depth_rows(None, (0.9, 0.8), kind="raw")
            + depth_rows(None, (0.9, 0.6), seed=1, kind="raw")
            + depth_rows(None, (0.1, 0.1), kind="raw", version=2)  # an older raw model: left out
            + depth_rows(None, (0.2, 0.2), seed=7, kind="raw"),  # other images: left out
        )
    monkeypatch.setenv(DB_ENV, str(path))
    return path


def test_depth_curve_has_each_attacks_best_and_the_utility_per_depth(depth_db):
    with Store(depth_db) as store:
        curve = tables.depth_curve(tables.board(store.results()), store.challenges(), store.utility())
    curve = curve.set_index("depth")
    assert list(curve.index) == [0, 16, 44]
    assert curve.loc[0, "gram-hungarian"] == 1.0  # the linear challenge (also depth 0) is another encoder
    assert curve.loc[16, "gram-hungarian"] == 0.6 and curve.loc[16, "carlini-2021"] == 0.2
    assert "eve/claimed-break" not in curve.columns  # a team's claim never reaches the curve
    assert curve.loc[44, CHANCE_ROW] == pytest.approx(1 / 40)
    assert curve.loc[16, "encoded_auc"] == pytest.approx(0.65) and curve.loc[16, "utility_runs"] == 2
    assert curve.loc[44, "encoded_auc"] == pytest.approx(0.5) and curve.loc[44, "utility_runs"] == 1
    assert math.isnan(curve.loc[0, "encoded_auc"]) and curve.loc[0, "utility_runs"] == 0
    assert curve["raw_auc"].tolist() == pytest.approx([0.8] * 3)  # same images and settings, latest raw model


def test_depth_curve_gives_t_intervals_over_runs(depth_db):
    with Store(depth_db) as store:
        curve = tables.depth_curve(tables.board(store.results()), store.challenges(), store.utility())
    curve = curve.set_index("depth")
    # Depth 16: run means 0.7 and 0.6, sd 0.0707, standard error 0.05, t(0.975, 1 df) = 12.706.
    assert curve.loc[16, "encoded_auc_low"] == pytest.approx(0.65 - 0.6353, abs=1e-4)
    assert curve.loc[16, "encoded_auc_high"] == pytest.approx(0.65 + 0.6353, abs=1e-4)
    assert math.isnan(curve.loc[44, "encoded_auc_low"])  # one run: no interval
    # The raw runs of seeds 0 and 1 were recorded at one time: still two samples (means 0.85 and 0.75).
    assert curve.loc[0, "raw_auc_low"] == pytest.approx(0.8 - 0.6353, abs=1e-4)


def test_depth_curve_is_empty_without_results():
    empty = pd.DataFrame(columns=["settings"])
    curve = tables.depth_curve(pd.DataFrame(), pd.DataFrame(), empty)
    assert curve.empty and "depth" in curve.columns


def test_depth_page_shows_the_curve(depth_db):
    at = go(app(), "Privacy vs depth")
    assert not at.error
    shown = at.dataframe[0].value.set_index("depth")
    assert shown.loc[16, "gram-hungarian"] == "60.0%" and shown.loc[44, "encoded_auc"] == "0.500"
    assert shown.loc[0, "encoded_auc"] == "not run"
    # Two runs at depth 16 (mean 0.65, half-width 0.635); one at 44 has no interval.
    assert shown.loc[16, "encoded_auc_95ci"] == "[0.015, 1.285]" and shown.loc[44, "encoded_auc_95ci"] == ""


def test_utility_page_shows_intervals_over_seeds_and_the_paired_cost(depth_db):
    at = go(app(), "Privacy vs utility")
    assert not at.exception, at.exception
    over_seeds = next(frame.value for frame in at.dataframe if "auc_95ci" in frame.value.columns)
    depth16 = over_seeds.set_index("preset").loc["nc7-depth16"]
    assert depth16["seeds"] == 2 and depth16["auc_95ci"] == "[0.015, 1.285]"
    # encoded 0.7 / 0.6 against raw 0.85 / 0.75 at seeds 0 / 1: -0.15 at each seed
    assert depth16["vs_raw"] == "-0.150" and depth16["vs_raw_95ci"] == "[-0.150, -0.150]"
    raw = over_seeds[over_seeds["model_kind"] == "raw"]
    assert set(raw["vs_raw"]) == {""} and set(raw["depth"]) == {""}  # blank, never "None"


def test_depth_page_on_an_empty_database_says_how_to_fill_it(empty_db):
    at = go(app(), "Privacy vs depth")
    assert "benchmarks/depth.py" in at.info[0].value


def test_depth_page_keeps_the_chance_attack_apart_from_the_chance_level(depth_db):
    with Store(depth_db) as store:  # the built-in attack named "chance", as the demo runs it
        store.record_score(depth_result("d16", 16, "chance", 0.05, "8"), team=BUILTIN_TEAM, origin=ORIGIN_ORGANIZER)
    at = go(app(), "Privacy vs depth")
    shown = at.dataframe[0].value.set_index("depth")
    assert shown.loc[16, "chance"] == "5.0%" and shown.loc[16, CHANCE_ROW] == "5.0%"


# -- the transfer challenge against depth ----------------------------------------------------------


def transfer_result(challenge_id, config, attack, public, sha, *, private=None, targets=20, n_sites=1):
    """An nn_accuracy score on a transfer challenge of encoder ``config`` (mix, shuffle, depth)
    with ``targets`` targets in each half; ``private`` defaults to ``public``."""
    config = json.dumps(dict(zip(("mix", "shuffle", "depth"), config)))
    info = ChallengeInfo(challenge_id, "transfer", "nc7", 40, "e" * 64, config, n_sites=n_sites)
    metrics = {
        split: {"nn_accuracy": value, "chance": 1 / targets, "n": targets}
        for split, value in ((0, public), (1, public if private is None else private))
    }
    return ScoreResult(info, attack, "1.1", {}, ("architecture",), 1.0, sha.ljust(64, "0"), metrics)


NC3, NC7, NC47 = (True, True, 0), (True, True, 4), (True, True, 44)


@pytest.fixture
def transfer_db(tmp_path, monkeypatch):
    path = tmp_path / "transfer.db"
    with Store(path) as store:

        def organizer(score):
            store.record_score(score, team=BUILTIN_TEAM, origin=ORIGIN_ORGANIZER)

        organizer(transfer_result("t0", NC3, "distribution-alignment", 0.1, "1", private=0.7))  # closed below
        organizer(transfer_result("t4", NC7, "distribution-alignment", 0.3, "2"))
        organizer(transfer_result("t4", NC7, "distribution-alignment", 0.5, "3"))  # best of two
        organizer(transfer_result("t4", NC7, "chance", 0.05, "4"))
        organizer(transfer_result("t44", NC47, "chance", 0.0, "5", targets=40))
        # Not the NeuraCrypt family, or not one site: none of these reaches the curve.
        organizer(transfer_result("linear", (False, False, 0), "distribution-alignment", 0.9, "6"))
        organizer(transfer_result("noshuffle", (True, False, 0), "distribution-alignment", 0.8, "7"))
        organizer(transfer_result("sites", NC7, "distribution-alignment", 0.95, "8", n_sites=2))
        store.record_score(transfer_result("t4", NC7, "claimed-transfer", 1.0, "9"), team="eve")
        store.close_challenge("t0")
    monkeypatch.setenv(DB_ENV, str(path))
    return path


def transfer_curve(path):
    with Store(path) as store:
        curve = tables.transfer_depth_curve(tables.board(store.results()), store.challenges())
    return curve.set_index("depth")


def test_transfer_curve_has_each_attacks_best_per_depth(transfer_db):
    curve = transfer_curve(transfer_db)
    assert list(curve.index) == [0, 4, 44] and list(curve.columns) == ["chance", "distribution-alignment", CHANCE_ROW]
    assert curve.loc[4, "distribution-alignment"] == 0.5 and curve.loc[4, "chance"] == 0.05
    assert math.isnan(curve.loc[44, "distribution-alignment"])
    assert curve.loc[4, CHANCE_ROW] == pytest.approx(1 / 20) and curve.loc[44, CHANCE_ROW] == pytest.approx(1 / 40)


def test_transfer_curve_reads_the_public_half_of_a_closed_challenge(transfer_db):
    assert transfer_curve(transfer_db).loc[0, "distribution-alignment"] == 0.1  # its private half scored 0.7


def test_transfer_curve_holds_the_organizers_runs_only(transfer_db):
    assert not any("claimed-transfer" in column for column in transfer_curve(transfer_db).columns)


def test_transfer_curve_leaves_out_other_encoders_and_several_sites(transfer_db):
    curve = transfer_curve(transfer_db)
    # linear and nc3-noshuffle are depth 0 too (0.9, 0.8); the two-site nc7 challenge scored 0.95.
    assert curve.loc[0, "distribution-alignment"] == 0.1 and curve.loc[4, "distribution-alignment"] == 0.5


def test_transfer_and_reid_curves_keep_to_their_own_task(transfer_db, depth_db):
    assert transfer_curve(depth_db).empty  # reid runs only
    with Store(transfer_db) as store:
        assert tables.depth_curve(tables.board(store.results()), store.challenges(), store.utility()).empty


def test_transfer_curve_is_empty_without_results():
    curve = tables.transfer_depth_curve(pd.DataFrame(), pd.DataFrame())
    assert curve.empty and list(curve.columns) == ["depth", CHANCE_ROW]


def test_depth_page_shows_the_transfer_curve_without_a_reid_curve(transfer_db):
    at = go(app(), "Privacy vs depth")
    assert not at.error
    assert "benchmarks/depth.py" in at.info[0].value  # no reid sweep: the page still goes on
    assert [header.value for header in at.subheader] == ["Transfer against depth"]
    shown = at.dataframe[0].value.set_index("depth")
    assert shown.loc[4, "distribution-alignment"] == "50.0%" and shown.loc[44, "distribution-alignment"] == "not run"
    assert shown.loc[44, CHANCE_ROW] == "2.5%"
    assert "nearest true target encoding" in at.caption[0].value


def test_depth_page_on_an_empty_database_says_how_to_get_a_transfer_curve(empty_db):
    at = go(app(), "Privacy vs depth")
    assert [header.value for header in at.subheader] == ["Transfer against depth"]
    assert "ncbench demo" in at.info[1].value and "ncbench score answer.h5" in at.info[1].value


def test_a_failed_verified_run_shows_its_reason_not_missing_values():
    summary = pd.DataFrame(
        [
            {"run_id": 1, "attack": "alice/slow", "preset": "nc7", "n": 100, "state": "failed"}
            | {"message": "ran past wall_s", "sandboxed": True, "scored": 0, "created_utc": "2026-05-01T14:03:59"},
        ]
    ).reindex(columns=tables.VERIFIED_SUMMARY_COLUMNS)
    runs = tables.verified_runs(summary)
    assert runs.loc[0, "result"] == "failed: ran past wall_s" and runs.loc[0, "preset"] == "nc7, N=100"
    assert runs.loc[0, "created"] == "2026-05-01 14:03 UTC" and not runs.isna().any().any()


def test_the_export_holds_verified_runs_beside_answer_files(tmp_path):
    with Store(tmp_path / "board.db") as store:
        store.record_score(result("nc7-reid-a", "nc7", "my-attack", 0.5, "1"), team="alice")
        table = tables.board(store.results())
    releases = [
        {"challenge_id": "nc7-reid-a", "task": "reid", "preset": "nc7", "precision": "fp32", "n": 20}
        | {"run_id": 7, "team": "alice", "attack": "alice/mine", "origin": "self-reported", "sandboxed": True}
        | {"releases": 2, "state": "scored", "message": None, "created_utc": "2026-05-01T14:03:59", "idx": i}
        | {"release_state": "scored", "reidentification": score, "wall_s": 2.0, "cpu_s": 1.0, "peak_rss_bytes": 1}
        for i, score in enumerate([0.25, 0.75])
    ]
    exported = tables.export_table(table, tables.verified_summary(pd.DataFrame(releases)))
    assert list(exported["track"]) == ["answer file", "verified"]
    verified = exported.iloc[1]
    assert (verified["run_id"], verified["releases"], verified["scored"]) == (7, 2, 2)
    assert verified["reidentification"] == 0.5 and verified["band"] == privacy_band(0.5)
    assert verified["spread"] == pytest.approx(np.std([0.25, 0.75], ddof=1))
    assert pd.isna(verified["submission_id"]) and pd.isna(verified["split"])
    csv = tables.to_csv(exported).splitlines()
    assert csv[0].startswith("track,challenge_id,") and csv[2].startswith("verified,nc7-reid-a,")
    assert ",7," in csv[2] and ",7.0," not in csv[2]  # ids stay integers beside missing ones
    assert tables.to_records(exported)[1]["submission_id"] is None
    assert list(tables.export_table(table.iloc[:0], tables.verified_summary(pd.DataFrame()))["track"]) == []


@pytest.mark.parametrize(
    ("server", "visitor_host", "shown"),
    [
        ("http://0.0.0.0:8000", "board.example.org:8501", "http://board.example.org:8000"),
        ("http://0.0.0.0:8000", "203.0.113.7", "http://203.0.113.7:8000"),
        ("http://[::]:8000", "[2001:db8::1]:8501", "http://[2001:db8::1]:8000"),
        ("https://challenge.example.org", "board.internal:8501", "https://challenge.example.org"),  # configured
        ("http://0.0.0.0:8000", None, None),
        ("http://0.0.0.0:8000", "0.0.0.0:8501", None),
        ("http://0.0.0.0:8000", "evil.example.org/<script>", None),
        (None, "board.example.org", None),
    ],
)
def test_take_part_names_a_server_an_attacker_can_reach(server, visitor_host, shown):
    assert board_package.shown_server(server, visitor_host) == shown


def test_the_board_reaches_a_server_bound_to_every_interface_on_loopback():
    assert board_package.reachable_server("http://0.0.0.0:8000") == "http://127.0.0.1:8000"
    assert board_package.reachable_server("https://challenge.example.org") == "https://challenge.example.org"


def test_take_part_never_shows_a_wildcard_address(populated_db, monkeypatch):
    monkeypatch.setenv(board_package.SERVER_ENV, "http://0.0.0.0:59999")  # nothing answers: the store's list
    at = go(app(), "Take part")
    shown = "\n".join(block.value for block in [*at.code, *at.markdown])
    assert "0.0.0.0" not in shown and "ncbench login --server https://SERVER" in shown
