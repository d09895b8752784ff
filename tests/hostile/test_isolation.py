"""Untrusted work never runs in the server process: an answer file is parsed in a limited child
whose death fails only its job, and answer files are scored on a pool of their own while plugins
keep the sandbox pool busy; a plugin's admission check is a job that counts, and an archive is
unpacked in a limited child. One server runs in this process for the module (``embedded``), so
that a test can lower a child's limits or hold a verified run; each test has teams of its own."""

import dataclasses
import datetime as dt
import gzip
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from support import ncbench

from ncbench.leaderboard import isolated, workqueue
from ncbench.leaderboard.server import channel, worker
from ncbench.leaderboard.store import BUILTIN_TEAM, ORIGIN_ORGANIZER, Store, verified_runs
from ncbench.leaderboard.verified import runs as verified

FINAL = ("scored", "refused", "failed")


def submit(server, challenge_id: str, token: str, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/challenges/{challenge_id}/submissions",
        content=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )


def poll(server, route: str, token: str, ended, within_s: float) -> dict:
    """GET ``route`` until ``ended(answer)`` (or as it stands after ``within_s``)."""
    deadline = time.monotonic() + within_s
    while True:
        answer = httpx.get(f"{server.url}{route}", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        if ended(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def outcome(server, job_id: int, token: str, *, within_s: float = 120) -> dict:
    """The job once it is final (or as it stands after ``within_s``)."""
    return poll(server, f"/api/v1/submissions/{job_id}", token, lambda job: job["state"] in FINAL, within_s)


def team(embedded, name: str) -> str:
    """A new team's token (issued in this process: no CLI start-up)."""
    with Store(embedded["store"] / "leaderboard.db", create=False) as db:
        key = channel.token_key(workqueue.StoreLayout(embedded["store"]))
        return channel.add_team(db, name, key=key)[1]


@pytest.fixture(scope="module")
def answer_file(embedded, tmp_path_factory):
    """A legitimate answer file (the chance attack) for the published challenge."""
    path = tmp_path_factory.mktemp("answers") / "chance.h5"
    release = embedded["store"] / "public" / embedded["id"] / "release.h5"
    ran = ncbench("attack", "run", "chance", "--release", release, "--out", path)
    assert ran.returncode == 0, ran.stderr
    return path.read_bytes()


def test_a_file_that_kills_its_scorer_fails_at_once_counts_and_the_next_file_is_scored(
    embedded, answer_file, monkeypatch
):
    server, challenge_id = embedded["server"], embedded["id"]
    bomber, other = team(embedded, "bomber"), team(embedded, "other")
    limits = isolated.SCORE_LIMITS
    # Too little address space for the scorer's interpreter: each child dies, as under a bomb.
    monkeypatch.setattr(isolated, "SCORE_LIMITS", dataclasses.replace(limits, memory_bytes=64 << 20))
    for k in range(3):  # the daily limit
        answer = submit(server, challenge_id, bomber, f"bomb {k}".encode())
        assert answer.status_code == 202, answer.text
        job = outcome(server, answer.json()["id"], bomber)
        assert (job["state"], job["message"]) == ("failed", channel.SCORER_KILLED)
    assert submit(server, challenge_id, bomber, b"bomb 4").status_code == 429  # each bomb counted
    monkeypatch.setattr(isolated, "SCORE_LIMITS", limits)
    answer = submit(server, challenge_id, other, answer_file)
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    assert outcome(server, answer.json()["id"], other)["state"] == "scored"
    with Store(embedded["store"] / "leaderboard.db", create=False) as db:
        assert [job.state for job in channel.team_jobs(db, "bomber")] == ["failed"] * 3  # no requeue


# A verified run that holds its sandbox-pool slot until the test lets it go (module level:
# Dask pickles what it runs, by reference).
HELD = {"started": threading.Event(), "release": threading.Event()}


def held_run(db_url: str, store_root: str, run_id: int) -> str:
    HELD["started"].set()
    HELD["release"].wait(300)
    with Store(db_url, create=False) as db:
        verified.finish(db, run_id, "failed", message="held by the test")
    return "failed"


def test_an_answer_file_is_scored_while_the_sandbox_pool_is_busy(embedded, answer_file, monkeypatch):
    server, store, challenge_id = embedded["server"], embedded["store"], embedded["id"]
    token = team(embedded, "patient")
    pool, claim, _, finish = worker.KINDS["run"]
    monkeypatch.setitem(worker.KINDS, "run", (pool, claim, held_run, finish))
    with Store(store / "leaderboard.db", create=False) as db:
        run_id = verified.enqueue(
            db,
            team=BUILTIN_TEAM,
            origin=ORIGIN_ORGANIZER,
            challenge_id=challenge_id,
            attack="chance",
            attack_version="1",
            params="{}",
            settings=verified.Settings(),
            eval_source="phantom",
        )
    try:
        assert HELD["started"].wait(60), "the verified run never started"
        answer = submit(server, challenge_id, token, answer_file)
        assert outcome(server, answer.json()["id"], token)["state"] == "scored"
        with Store(store / "leaderboard.db", create=False) as db:
            assert verified.run_view(db, run_id)["state"] == "running"  # still holding the sandbox pool (1 slot)
    finally:
        HELD["release"].set()


# -- plugin uploads: checks are jobs, archives are parsed in a child ----------------------------

SLEEPER = """\
import time

from ncbench.attacks.gram_hungarian import GramHungarian

time.sleep(600)  # at import: the check's wall limit ends it


class Plugin(GramHungarian):
    name = "sleeper"
    version = "1.0"
    tasks = ("reid",)
    knowledge = ("architecture",)
"""


def pax_bomb(path: Path) -> Path:
    """An sdist whose first member is a pax header of 300,000 digits: tarfile's search for
    'hdrcharset' in it is quadratic on an unpatched Python (CVE-2024-6232), minutes of GIL."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, digits = tarfile.XHDTYPE, b"1" * 300_000
    header.size = len(digits)
    body = header.tobuf(format=tarfile.USTAR_FORMAT) + digits + bytes(-len(digits) % 512) + bytes(1024)
    path.write_bytes(gzip.compress(body))
    return path


def upload_plugin(server, challenge_id: str, token: str, path: Path, **query) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/challenges/{challenge_id}/plugins",
        params={"class": "Plugin", "filename": path.name, **query},
        content=path.read_bytes(),
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )


def checked(server, token: str, run_id: int, *, within_s: float = 120) -> dict:
    """The run once its admission check has ended (or as it stands after ``within_s``)."""
    return poll(server, f"/api/v1/plugins/{run_id}", token, lambda run: run["state"] != "checking", within_s)


def test_a_plugin_that_sleeps_at_import_is_checked_as_a_job_that_counts(embedded, monkeypatch, tmp_path):
    server, challenge_id = embedded["server"], embedded["id"]
    token = team(embedded, "sleepy")
    monkeypatch.setattr(verified, "CHECK_LIMITS", dataclasses.replace(verified.CHECK_LIMITS, wall_s=5))
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(SLEEPER)
    answer = upload_plugin(server, challenge_id, token, sleeper)
    assert answer.status_code == 202 and answer.json()["state"] == "checking", answer.text
    assert checked(server, token, answer.json()["id"], within_s=0)["state"] == "checking"  # answered first
    assert httpx.get(f"{server.url}/healthz", timeout=10).json()["status"] == "ok"
    run = checked(server, token, answer.json()["id"])
    assert run["state"] == "failed" and verified.CHECK_FAILED in run["message"], run
    public = httpx.get(f"{server.url}/api/v1/challenges/{challenge_id}/verified", timeout=10).json()
    assert run["id"] not in [shown["id"] for shown in public]
    second = upload_plugin(server, challenge_id, token, sleeper)
    assert second.status_code == 202
    assert upload_plugin(server, challenge_id, token, sleeper).status_code == 429  # both checks counted (2 a day)
    # Ended under this test's wall limit: left queued, it would hold the one check slot for the
    # default limit once the patch is undone, and the next test's check would wait behind it.
    assert checked(server, token, second.json()["id"])["state"] == "failed"


def test_an_archive_that_would_hold_the_gil_is_refused_within_the_unpackers_wall_limit(embedded, monkeypatch, tmp_path):
    server, challenge_id = embedded["server"], embedded["id"]
    token = team(embedded, "archivist")
    monkeypatch.setattr(isolated, "UNPACK_LIMITS", dataclasses.replace(isolated.UNPACK_LIMITS, wall_s=3))
    bomb = pax_bomb(tmp_path / "paxbomb-1.0.tar.gz")
    answer = upload_plugin(server, challenge_id, token, bomb, module="paxbomb")
    assert answer.status_code == 202, answer.text
    health = []
    while checked(server, token, answer.json()["id"], within_s=0)["state"] == "checking":
        health.append(httpx.get(f"{server.url}/healthz", timeout=5).status_code)
    run = checked(server, token, answer.json()["id"])
    assert run["state"] == "failed" and verified.CHECK_FAILED in run["message"], run
    assert health and set(health) == {200}
    with Store(embedded["store"] / "leaderboard.db", create=False) as db, db._read() as conn:
        started, finished = conn.execute(
            sa.select(verified_runs.c.started_utc, verified_runs.c.finished_utc).where(verified_runs.c.id == run["id"])
        ).one()
    # Patched or not, the host's Python never parses it for long: the child is stopped at 3 s.
    assert (dt.datetime.fromisoformat(finished) - dt.datetime.fromisoformat(started)).total_seconds() < 30, run


def test_a_child_that_parses_an_upload_runs_below_the_servers_cpu_priority():
    """Scoring is batch work: a backlog of uploads keeps a scorer child busy, and the API's
    answers must not wait behind it for the CPU."""
    command = [*isolated.child_command(isolated.SCORE_LIMITS), sys.executable, "-c", "import os; print(os.nice(0))"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert int(done.stdout) == min(19, os.nice(0) + isolated.CHILD_NICENESS)


def test_a_scorer_child_loads_no_module_it_does_not_need_for_every_file():
    """Every upload starts a scorer child: its start-up is paid per upload, on the server's CPU.
    scipy (assignment, SSIM, t intervals) is loaded only by the files that need it; with it at
    the top of the modules, start-up took 1.1 s instead of 0.3 s."""
    preload = isolated.PRELOAD["score"]
    script = f"import sys, {preload}; print(sorted(m for m in ('scipy', 'torch', 'pandas') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


_PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen(
    [*sys.argv[1:], sys.executable, "-I", "-c",
     "from ncbench.leaderboard.isolated import die_with_parent; die_with_parent(); "
     "import time; print('ready', flush=True); time.sleep(120)"],
    env={**os.environ, "%s": str(os.getpid())}, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "ready\\n"
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (it no longer runs)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_child_does_not_outlive_the_server_that_started_it():
    """A server stopped, or killed, while a child parses an upload: the child goes too, through
    its limits' command line (nice, prlimit), instead of parsing on for up to its wall limit."""
    code = _PARENT % isolated.PARENT_ENV
    parent = subprocess.Popen(
        [sys.executable, "-c", code, *isolated.child_command(isolated.SCORE_LIMITS)], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), "the child outlived its parent"
    finally:
        parent.kill()
