"""Untrusted work never runs in the server process: an answer file is parsed in a limited child
whose death fails only its job, and answer files are scored on a pool of their own while plugins
keep the sandbox pool busy. The server runs in this process (``EmbeddedServer``) so that a test
can lower a child's limits or hold a verified run."""

import dataclasses
import threading
import time

import httpx
import pytest
from support import ncbench, token_for

from ncbench.leaderboard import isolated
from ncbench.leaderboard.server import channel, service, worker
from ncbench.leaderboard.store import BUILTIN_TEAM, ORIGIN_ORGANIZER, Store
from ncbench.leaderboard.verified import runs as verified

FINAL = ("scored", "refused", "failed")


def submit(server, challenge_id: str, token: str, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/challenges/{challenge_id}/submissions",
        content=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )


def outcome(server, job_id: int, token: str, *, within_s: float = 120) -> dict:
    """The job once it is final (or as it stands after ``within_s``)."""
    deadline = time.monotonic() + within_s
    while True:
        job = httpx.get(
            f"{server.url}/api/v1/submissions/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=30
        ).json()
        if job["state"] in FINAL or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


@pytest.fixture
def answer_file(published, tmp_path):
    """A legitimate answer file (the chance attack) for the published challenge."""
    path = tmp_path / "chance.h5"
    release = published["store"] / "public" / published["id"] / "release.h5"
    ran = ncbench("attack", "run", "chance", "--release", release, "--out", path)
    assert ran.returncode == 0, ran.stderr
    return path.read_bytes()


def test_a_file_that_kills_its_scorer_fails_at_once_counts_and_the_next_file_is_scored(
    published, answer_file, monkeypatch
):
    store, challenge_id = published["store"], published["id"]
    alice, bob = token_for(store, "alice"), token_for(store, "bob")
    limits = isolated.SCORE_LIMITS
    # Too little address space for the scorer's interpreter: each child dies, as under a bomb.
    monkeypatch.setattr(isolated, "SCORE_LIMITS", dataclasses.replace(limits, memory_bytes=64 << 20))
    with service.EmbeddedServer(service.db_url(None, store), store) as server:
        for k in range(3):  # the daily limit
            answer = submit(server, challenge_id, alice, f"bomb {k}".encode())
            assert answer.status_code == 202, answer.text
            job = outcome(server, answer.json()["id"], alice)
            assert (job["state"], job["message"]) == ("failed", channel.SCORER_KILLED)
        assert submit(server, challenge_id, alice, b"bomb 4").status_code == 429  # each bomb counted
        monkeypatch.setattr(isolated, "SCORE_LIMITS", limits)
        answer = submit(server, challenge_id, bob, answer_file)
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        assert outcome(server, answer.json()["id"], bob)["state"] == "scored"
    with Store(store / "leaderboard.db", create=False) as db:
        assert [job.state for job in channel.team_jobs(db, "alice")] == ["failed"] * 3  # no requeue


# A verified run that holds its sandbox-pool slot until the test lets it go (module level:
# Dask pickles what it runs, by reference).
HELD = {"started": threading.Event(), "release": threading.Event()}


def held_run(db_url: str, store_root: str, run_id: int) -> str:
    HELD["started"].set()
    HELD["release"].wait(300)
    with Store(db_url, create=False) as db:
        verified.finish(db, run_id, "failed", message="held by the test")
    return "failed"


def test_an_answer_file_is_scored_while_the_sandbox_pool_is_busy(published, answer_file, monkeypatch):
    store, challenge_id = published["store"], published["id"]
    token = token_for(store, "alice")
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
        with service.EmbeddedServer(service.db_url(None, store), store, score_workers=1, sandbox_workers=1) as server:
            assert HELD["started"].wait(60), "the verified run never started"
            answer = submit(server, challenge_id, token, answer_file)
            assert outcome(server, answer.json()["id"], token)["state"] == "scored"
            with Store(store / "leaderboard.db", create=False) as db:
                assert verified.run_view(db, run_id)["state"] == "running"  # still holding the sandbox pool
            HELD["release"].set()
    finally:
        HELD["release"].set()
