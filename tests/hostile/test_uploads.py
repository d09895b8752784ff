"""Refused uploads cost the server nothing it keeps: limits are checked before the body is read,
a refused or repeated body is never stored, and what a team reads back names no server path."""

import socket
import time

import httpx
import pytest
from support import Server, token_for

from ncbench.leaderboard import workqueue
from ncbench.leaderboard.server import channel
from ncbench.leaderboard.store import Store


def answer_to_unfinished_body(port: int, path: str, token: str) -> bytes:
    """POST declaring 1 MB and sending 10 bytes: only a server that refuses before reading answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000000\r\n\r\n"
        sock.sendall(head.encode() + b"\0" * 10)
        return sock.recv(4096)


def used_up(store, challenge_id: str, team: str) -> None:
    """Spend ``team``'s daily limit (3) with scored jobs, as if it had submitted today."""
    layout = workqueue.StoreLayout(store)
    with Store(store / "leaderboard.db", create=False) as db:
        for k in range(3):
            writer = channel.UploadWriter(layout, max_bytes=1 << 20)
            writer.write(f"earlier answer {k}".encode())
            sha256, size = writer.commit()
            job_id = channel.enqueue(db, team=team, challenge_id=challenge_id, sha256=sha256, size=size)
            channel.finish(db, job_id, "scored")


def test_over_the_daily_limit_the_upload_is_refused_before_its_body_is_read(published):
    token = token_for(published["store"], "alice")
    used_up(published["store"], published["id"], "alice")
    before = sorted((published["store"] / "uploads").iterdir())
    server = Server(published["store"], "--board-port", "0")
    try:
        answer = answer_to_unfinished_body(server.port, f"/api/v1/challenges/{published['id']}/submissions", token)
    finally:
        server.stop()
    assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
    assert sorted((published["store"] / "uploads").iterdir()) == before
    assert not any((published["store"] / "incoming").iterdir())


def test_an_upload_refused_at_enqueue_is_not_stored(published):
    """The race the early check cannot close (two uploads at once, one slot left): the loser's
    body, already read, is discarded, never moved into the store."""
    used_up(published["store"], published["id"], "alice")
    layout = workqueue.StoreLayout(published["store"])
    writer = channel.UploadWriter(layout, max_bytes=1 << 20)
    writer.write(b"one answer too many")
    writer.finish()
    with Store(published["store"] / "leaderboard.db", create=False) as db, pytest.raises(workqueue.LimitReached):
        channel.enqueue(
            db, team="alice", challenge_id=published["id"], sha256=writer.sha256, size=writer.size, stage=writer.commit
        )
    writer.discard()
    assert not layout.upload(writer.sha256).exists()
    assert not any(layout.incoming.iterdir())


def test_a_refusal_message_names_no_server_path(served):
    answer = httpx.post(
        f"{served['url']}/api/v1/challenges/{served['id']}/submissions",
        content=b"not an HDF5 file at all",
        headers={"Authorization": f"Bearer {served['token']}"},
        timeout=60,
    )
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = httpx.get(
            f"{served['url']}/api/v1/submissions/{answer.json()['id']}",
            headers={"Authorization": f"Bearer {served['token']}"},
        ).json()
        assert "state" in job, job
        if job["state"] not in ("queued", "running"):
            break
        time.sleep(0.3)
    assert job["state"] == "refused" and job["message"]
    assert str(served["store"]) not in job["message"] and "uploads/" not in job["message"], job["message"]
