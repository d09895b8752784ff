"""The Streamlit leaderboard, driven by streamlit.testing's AppTest, and served once over HTTP."""

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

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

import ncbench.leaderboard as leaderboard
from ncbench.leaderboard.scoring import ChallengeInfo, ScoreResult
from ncbench.leaderboard.store import DB_ENV, Store, record_utility
from ncbench.leaderboard.tables import CHANCE_ROW

APP = str(Path(leaderboard.__file__).with_name("app.py"))
PAGES = ("Attack x preset", "Challenges", "Submission", "Privacy vs utility", "Take part")
CONFIGS = {"linear": {"mix": False, "shuffle": False, "depth": 0},
           "nc3": {"mix": True, "shuffle": True, "depth": 0},
           "nc7": {"mix": True, "shuffle": True, "depth": 4}}


def result(challenge_id, preset, attack, accuracy, sha, *, n=20, positions=None):
    info = ChallengeInfo(challenge_id, "reid", preset, n, "c" * 64, json.dumps(CONFIGS[preset]))
    metrics = {}
    for split, value in ((0, accuracy), (1, accuracy / 2)):
        metrics[split] = {"reid_accuracy": value, "chance": 1 / n, "n": n / 2,
                          "k_anonymity": 1 / value if value else math.inf}
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
        store.record_score(result("nc7-reid-a", "nc7", "gram-hungarian", 0.9, "1", positions=0.75), team="alice")
        store.record_score(result("nc7-reid-a", "nc7", "gram-hungarian", 1.0, "2"), team="alice")  # best of two
        store.record_score(result("nc7-reid-a", "nc7", "chance", 0.05, "3"), team="bob")
        store.record_score(result("linear-reid-a", "linear", "gram-hungarian", 0.02, "4", n=50), team="carol")
        store.record_score(result("nc3-reid-a", "nc3", "linear-inversion", 0.1, "5", n=10), team="bob")
        record_utility(store, [
            {"preset": "nc7", "label": "effusion", "auc": 0.70, "model_kind": "encoded"},
            {"preset": "nc7", "label": "nodule", "auc": 0.80, "model_kind": "encoded"},
            {"preset": "nc7", "label": "effusion", "auc": 0.90, "model_kind": "raw"},
        ])
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
    assert "No scored submissions yet" in at.info[0].value


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
    expected = pd.DataFrame(
        {"linear": [math.nan, 0.02, math.nan, 0.02], "nc3": [math.nan, math.nan, 0.1, 0.1],
         "nc7": [0.05, 1.0, math.nan, 0.05]},
        index=["chance", "gram-hungarian", "linear-inversion", CHANCE_ROW])
    pd.testing.assert_frame_equal(matrix, expected, check_names=False)


def test_private_half_appears_only_after_close(populated_db):
    at = app()
    half = next(r for r in at.radio if r.label == "Scoring half")
    half.set_value("private").run()
    assert "No private-half results" in at.info[0].value
    with Store(populated_db) as store:
        store.close_challenge("nc7-reid-a")
    at.run()
    matrix = at.dataframe[0].value
    assert matrix.loc["gram-hungarian", "nc7"] == 0.5 and list(matrix.columns) == ["nc7"]


def test_challenge_table_filters_by_team_and_attack(populated_db):
    at = go(app(), "Challenges")
    at.selectbox[0].set_value("nc7-reid-a").run()
    table = at.dataframe[1].value
    assert sorted(table["team"]) == ["alice", "alice", "bob"]
    at.text_input[0].set_value("BO").run()
    assert at.dataframe[1].value["team"].tolist() == ["bob"]
    at.text_input[0].set_value("").run()
    at.multiselect[0].set_value(["gram-hungarian"]).run()
    assert at.dataframe[1].value["reidentification"].tolist() == [0.9, 1.0]
    assert at.get("download_button")


def test_submission_details_show_metrics_and_patch_positions(populated_db):
    at = go(app(), "Submission")
    at.selectbox[0].set_value(1).run()
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
    code = "\n".join(block.value for block in at.code)
    assert "ncbench attack run gram-hungarian --release release.h5" in code
    assert "ncbench score submission.h5 --key" in code


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


def test_served_app_answers_over_http(populated_db):
    port = _free_port()
    ncbench = Path(sys.executable).with_name("ncbench")
    process = subprocess.Popen([str(ncbench), "leaderboard", "serve", "--db", str(populated_db), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, "the server exited"
            try:
                status, body = _get(f"http://127.0.0.1:{port}/_stcore/health")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "no answer within 90 s"
                time.sleep(0.5)
        assert status == 200 and body.strip() == b"ok"
        status, body = _get(f"http://127.0.0.1:{port}/")
        assert status == 200 and b"<html" in body.lower()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
