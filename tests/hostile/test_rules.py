"""The rules hold against a team that pushes them: a closed challenge takes no file, publishing
again never silently resets limits, the same bytes count once, the organizer's name has no twin."""

import concurrent.futures

import httpx
import pytest
import sqlalchemy as sa
from support import Server, ncbench, token_for

from ncbench.errors import NcbenchError
from ncbench.leaderboard.store import Store, check_origin, jobs, teams
from ncbench.leaderboard.store import published as published_table


def upload(served, content: bytes, token=None) -> httpx.Response:
    return httpx.post(
        f"{served['url']}/api/v1/challenges/{served['id']}/submissions",
        content=content,
        headers={"Authorization": f"Bearer {token or served['token']}"},
        timeout=60,
    )


@pytest.fixture(scope="module")
def answers(release, tmp_path_factory) -> list[bytes]:
    """Four distinct valid answer files (the chance attack, four seeds)."""
    folder = tmp_path_factory.mktemp("answers")
    found = []
    for seed in range(4):
        out = folder / f"chance-{seed}.h5"
        ran = ncbench("attack", "run", "chance", "--release", release / "public", "--seed", seed, "--out", out)
        assert ran.returncode == 0, ran.stderr
        found.append(out.read_bytes())
    return found


def test_the_same_bytes_again_are_one_job_and_count_once(served, answers):
    token = token_for(served["store"], "bob")
    first = upload(served, answers[0], token)
    assert first.status_code == 202, first.text
    again = [upload(served, answers[0], token) for _ in range(3)]
    assert {a.status_code for a in again} == {202} and {a.json()["id"] for a in again} == {first.json()["id"]}
    # The daily limit (3) still has room for two other files, and refuses the third.
    assert [upload(served, body, token).status_code for body in answers[1:]] == [202, 202, 429]
    with Store(served["store"] / "leaderboard.db", create=False) as store, store._read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar() == 3


def test_the_same_bytes_sent_eight_times_at_once_are_one_job_and_count_once(served, answers):
    """Eight identical uploads racing each other: one job, and the daily limit still has room for
    two other files (after the sequential test above, which counts every team's jobs)."""
    token = token_for(served["store"], "carol")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        racing = list(pool.map(lambda _: upload(served, answers[0], token), range(8)))
    assert {r.status_code for r in racing} == {202}, [r.text for r in racing]
    assert len({r.json()["id"] for r in racing}) == 1
    assert [upload(served, body, token).status_code for body in answers[1:]] == [202, 202, 429]
    with Store(served["store"] / "leaderboard.db", create=False) as store, store._read() as conn:
        carol = sa.select(teams.c.id).where(teams.c.name == "carol").scalar_subquery()
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs).where(jobs.c.team_id == carol)).scalar() == 3


def test_a_closed_challenge_refuses_answer_files_with_404(published, answers):
    token = token_for(published["store"], "alice")
    closed = ncbench("leaderboard", "close", published["id"], "--db", published["store"] / "leaderboard.db", "--yes")
    assert closed.returncode == 0, closed.stderr
    server = Server(published["store"], "--board-port", "0")
    try:
        answer = upload({"url": server.url, "id": published["id"], "token": token}, answers[0])
        assert answer.status_code == 404 and "closed" in answer.json()["detail"]
    finally:
        server.stop()


def test_publishing_again_is_refused_without_republish_and_keeps_the_limits(published, release):
    again = ncbench("challenge", "publish", release, "--store", published["store"])
    assert again.returncode == 2 and "--republish" in again.stderr
    assert daily_limit(published) == 3
    replaced = ncbench(
        "challenge", "publish", release, "--store", published["store"], "--republish", "--daily-limit", 9
    )
    assert replaced.returncode == 0, replaced.stderr
    assert daily_limit(published) == 9


def daily_limit(published) -> int:
    with Store(published["store"] / "leaderboard.db", create=False) as store, store._read() as conn:
        return conn.execute(sa.select(published_table.c.daily_limit)).scalar_one()


@pytest.mark.parametrize("source", ["folder:images", "manifest:held-out/manifest.json"])
def test_a_relative_eval_source_is_refused_at_publish(release, tmp_path, source):
    refused = ncbench("challenge", "publish", release, "--store", tmp_path / "store", "--eval-source", source)
    assert refused.returncode == 2 and "absolute path" in refused.stderr
    assert not (tmp_path / "store" / "keys").exists()


@pytest.mark.parametrize("name", ["ncbench_builtin", "ncbench.builtin", "ncbench-bui1tin", "NCBENCH_BUILTIN"])
def test_lookalikes_of_the_organizer_team_are_refused(published, name):
    added = ncbench("team", "add", name, "--store", published["store"])
    assert added.returncode == 2 and "reserved" in added.stderr
    with pytest.raises(NcbenchError, match="reserved"):
        check_origin("self-reported", team=name.lower(), attack=None)
