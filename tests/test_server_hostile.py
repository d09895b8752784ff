"""The live server against a team or a client that abuses it: refused files that would fill the
disk, uploads that hold connections (many at once, or a byte now and then), a stop in the middle
of an upload, an oversized request head, a forged client address, a flood of refused tokens from
many addresses, and a file whose refusal would print over several lines.

Two kinds of real server on a real port: ``ncbench server`` in a subprocess (with its workers),
and the same API behind the same HTTP guards in a thread of the test (:class:`ThreadServer`), so
that a test can lower a bound to a second."""

import json
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
import uvicorn
from test_server import TINY, Server, ncbench

from ncbench.errors import one_line
from ncbench.leaderboard import workqueue
from ncbench.leaderboard.server import api, channel, connections, service
from ncbench.leaderboard.store import Store

# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A 16-image nc3 reid challenge at a tiny width."""
    out = tmp_path_factory.mktemp("hostile-server") / "release"
    built = ncbench(
        "challenge", "build", "--preset", "nc3", "--task", "reid", "--source", "phantom", "--n", 16, *TINY, "--out", out
    )
    assert built.returncode == 0, built.stderr
    return out


def publish(release: Path, store: Path) -> str:
    done = ncbench("challenge", "publish", release, "--store", store, "--daily-limit", 3)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


def token_for(store: Path, team: str) -> str:
    added = ncbench("team", "add", team, "--store", store)
    assert added.returncode == 0, added.stderr
    return added.stdout.strip()


@pytest.fixture(scope="module")
def published_once(release, tmp_path_factory) -> dict:
    """A store with the challenge published and tokens for alice and bob, made once per module."""
    store = tmp_path_factory.mktemp("published") / "store"
    challenge_id = publish(release, store)
    return {"store": store, "id": challenge_id, "alice": token_for(store, "alice"), "bob": token_for(store, "bob")}


@pytest.fixture
def published(published_once, tmp_path) -> dict:
    """A fresh copy of :func:`published_once`'s store (modes kept) for one test; no server."""
    store = tmp_path / "store"
    shutil.copytree(published_once["store"], store)
    return {**published_once, "store": store}


@pytest.fixture(scope="module")
def served(release, tmp_path_factory):
    """``ncbench server`` with its workers on a store of the module's own, and alice's token."""
    store = tmp_path_factory.mktemp("served") / "store"
    challenge_id = publish(release, store)
    token = token_for(store, "alice")
    server = Server(store, "--board-port", 0)
    yield {"store": store, "id": challenge_id, "token": token, "server": server}
    if server.process.poll() is None:
        server.stop()


@pytest.fixture(scope="module")
def answer(release, tmp_path_factory) -> bytes:
    """A valid answer file (the chance attack)."""
    out = tmp_path_factory.mktemp("answer") / "chance.h5"
    ran = ncbench("attack", "run", "chance", "--release", release / "public", "--seed", 0, "--out", out)
    assert ran.returncode == 0, ran.stderr
    return out.read_bytes()


class ThreadServer:
    """The API behind ``ncbench server``'s HTTP guards (:class:`connections.GuardedH11`,
    :class:`connections.RequestGuard`) on a free port of 127.0.0.1, in a thread; no workers."""

    def __init__(self, store: Path, *, limits=None, uploads=None):
        self.limits = limits or connections.ConnectionLimits(forwarded_allow_ips="")
        app = api.create_app(service.db_url(None, store), store, uploads=uploads)
        config = connections.uvicorn_config(connections.RequestGuard(app, self.limits), self.limits, log_level="error")
        self.server = uvicorn.Server(config)
        self.socket = service.listen("127.0.0.1", 0)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ThreadServer":
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def upload_head(challenge_id: str, token: str, length: int) -> bytes:
    return (
        f"POST /api/v1/challenges/{challenge_id}/submissions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def connect(port: int, first_bytes: bytes, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(first_bytes)
    return sock


def answer_of(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection or stays silent for the socket's timeout."""
    got = b""
    try:
        while data := sock.recv(65536):
            got += data
    except (TimeoutError, ConnectionResetError):
        pass
    return got


def response_of(sock: socket.socket) -> bytes:
    """One response, read up to the end of its body (by its Content-Length)."""
    raw = b""
    while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < content_length(raw):
        data = sock.recv(65536)
        assert data, f"the connection closed after {raw[:300]!r}"
        raw += data
    return raw


def content_length(raw: bytes) -> int:
    head = raw.partition(b"\r\n\r\n")[0].lower()
    return next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"content-length:")), 0)


def status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), raw[:300]
    return int(head.split()[1]), json.loads(body)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` before its timeout, a byte of body sent now and then."""
    try:
        while True:
            try:
                sock.send(b"x")
            except OSError:
                return True
            if sock.recv(65536) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def wait_for(condition, seconds: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


def receiving(store: Path) -> int:
    """Upload bodies being received now: their partial files in incoming/."""
    incoming = store / "incoming"
    return len(list(incoming.iterdir())) if incoming.is_dir() else 0


def final_job(served, job_id: int) -> dict:
    headers = {"Authorization": f"Bearer {served['token']}"}
    deadline = time.monotonic() + 120
    while True:
        job = httpx.get(f"{served['server'].url}/api/v1/submissions/{job_id}", headers=headers, timeout=10).json()
        if job["state"] not in ("queued", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def submit(served, body: bytes) -> dict:
    sent = httpx.post(
        f"{served['server'].url}/api/v1/challenges/{served['id']}/submissions",
        content=body,
        headers={"Authorization": f"Bearer {served['token']}"},
        timeout=60,
    )
    assert sent.status_code == 202, sent.text
    return sent.json()


# -- refused files leave the store -----------------------------------------------------------------


def test_a_refused_upload_leaves_the_store_and_a_scored_one_stays(served, answer):
    uploads = served["store"] / "uploads"
    refused = submit(served, np.random.default_rng(0).bytes(200_000))
    assert final_job(served, refused["id"])["state"] == "refused"
    assert not (uploads / refused["sha256"]).exists()
    scored = submit(served, answer)
    assert final_job(served, scored["id"])["state"] == "scored"
    assert (uploads / scored["sha256"]).is_file()
    assert not any((served["store"] / "incoming").iterdir())


def test_a_refused_file_stays_while_another_job_names_it(published):
    layout = workqueue.StoreLayout(published["store"])
    sha256, size = stored(layout, b"the same bytes from two teams")
    with Store(published["store"] / "leaderboard.db", create=False) as db:
        mine = channel.enqueue(db, team="alice", challenge_id=published["id"], sha256=sha256, size=size)
        theirs = channel.enqueue(db, team="bob", challenge_id=published["id"], sha256=sha256, size=size)
        channel.finish(db, mine, "refused")
        assert not channel.forget_upload(db, layout, sha256)  # bob's job is still queued
        assert layout.upload(sha256).is_file()
        channel.finish(db, theirs, "refused")
        assert channel.forget_upload(db, layout, sha256)
        assert not layout.upload(sha256).exists()


def stored(layout: workqueue.StoreLayout, body: bytes) -> tuple[str, int]:
    writer = channel.UploadWriter(layout, max_bytes=1 << 20)
    writer.write(body)
    return writer.commit()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request, release, tmp_path) -> dict:
    """A store folder and a database (SQLite in the folder, or PostgreSQL) with the challenge
    published: {store, url, id}."""
    store = service.store_dir(tmp_path / "store")
    url = service.db_url(request.getfixturevalue("postgres_url") if request.param == "postgresql" else None, store)
    with Store(url) as db:
        challenge_id = channel.publish(db, workqueue.StoreLayout(store), release, recompute=False)
    return {"store": store, "url": url, "id": challenge_id}


def test_forgetting_a_file_waits_for_an_upload_of_the_same_bytes_under_way(database):
    """The file is stored by content: a team's refused file and another upload of the same bytes,
    moved into place but not yet queued, meet. The deletion waits for that upload's transaction,
    then sees its job and keeps the file."""
    layout = workqueue.StoreLayout(database["store"])
    body = b"bytes refused for one team, uploaded again by another"
    sha256, size = stored(layout, body)
    with Store(database["url"], create=False) as db:
        bobs = channel.enqueue(db, team="bob", challenge_id=database["id"], sha256=sha256, size=size)
        channel.finish(db, bobs, "refused")
    again = channel.UploadWriter(layout, max_bytes=1 << 20)
    again.write(body)
    again.finish()
    placed, go_on, forgotten = threading.Event(), threading.Event(), []

    def stage() -> None:
        again.commit()
        placed.set()
        go_on.wait(20)

    def upload() -> None:
        with Store(database["url"], create=False) as db:
            channel.enqueue(db, team="alice", challenge_id=database["id"], sha256=sha256, size=size, stage=stage)

    def forget() -> None:
        with Store(database["url"], create=False) as db:
            forgotten.append(channel.forget_upload(db, layout, sha256))

    uploading = threading.Thread(target=upload)
    uploading.start()
    assert placed.wait(20)
    forgetting = threading.Thread(target=forget)
    forgetting.start()
    forgetting.join(1.0)
    assert forgetting.is_alive(), "the deletion did not wait for the upload's transaction"
    go_on.set()
    uploading.join(20)
    forgetting.join(20)
    assert forgotten == [False]
    assert layout.upload(sha256).read_bytes() == body


# -- uploads cannot hold the server's connections --------------------------------------------------


def test_a_team_past_its_uploads_at_once_gets_429_and_other_teams_are_still_served(published):
    store, challenge_id = published["store"], published["id"]
    limits = connections.ConnectionLimits(drain_timeout_s=1.0, forwarded_allow_ips="")
    with ThreadServer(store, limits=limits, uploads=api.UploadBounds(per_team=2)) as server:
        head = upload_head(challenge_id, published["alice"], 100_000)
        trickles = [connect(server.port, head + b"\x89HDF") for _ in range(2)]
        try:
            wait_for(lambda: receiving(store) == 2, what="two bodies being received")
            with connect(server.port, head + b"\x89HDF", timeout=5) as third:
                status, body = status_and_json(response_of(third))
                assert status == 429 and "at once" in body["detail"], body
                # The refused body is read and dropped for drain_timeout_s at most, then closed.
                assert closed_by_server(third)
            assert receiving(store) == 2
            bob = httpx.get(f"{server.url}/api/v1/whoami", headers={"Authorization": f"Bearer {published['bob']}"})
            assert bob.status_code == 200 and bob.json() == {"team": "bob"}
            trickles.pop().close()  # one body ends (cut off): the team may send another
            wait_for(lambda: receiving(store) == 1, what="the cut body discarded")
            sent = httpx.post(
                f"{server.url}/api/v1/challenges/{challenge_id}/submissions",
                content=b"another file",
                headers={"Authorization": f"Bearer {published['alice']}"},
            )
            assert sent.status_code == 202, sent.text
        finally:
            for sock in trickles:
                sock.close()


def test_a_body_slower_than_the_minimum_pace_is_cut_with_408_and_discarded(published):
    store = published["store"]
    with ThreadServer(store, uploads=api.UploadBounds(grace_s=1.0, min_bytes_per_s=32 << 10)) as server:
        started = time.monotonic()
        with connect(server.port, upload_head(published["id"], published["alice"], 100_000) + b"\x89HDF") as sock:
            sock.settimeout(0.2)
            raw = b""
            while b"\r\n\r\n" not in raw and time.monotonic() - started < 10:
                sock.send(b"x")  # a byte every 0.2 s: under any per-read timeout, far under the pace
                try:
                    raw += sock.recv(65536)
                except TimeoutError:
                    pass
            sock.settimeout(5)
            raw += answer_of(sock)  # the rest, then the server closes
        status, body = status_and_json(raw)
        assert status == 408 and "KiB/s" in body["detail"], body
        assert time.monotonic() - started < 5
        assert b"connection: close" in raw.lower()
        wait_for(lambda: receiving(store) == 0, seconds=5, what="the partial file removed")


def test_a_body_that_keeps_the_pace_is_taken_after_the_grace(published):
    chunk = b"\0" * (48 << 10)  # 48 KiB every 0.5 s: 96 KiB/s, over the pace of 32 KiB/s

    def body():
        for _ in range(8):
            yield chunk
            time.sleep(0.5)

    with ThreadServer(published["store"], uploads=api.UploadBounds(grace_s=1.0)) as server:
        sent = httpx.post(
            f"{server.url}/api/v1/challenges/{published['id']}/submissions",
            content=body(),
            headers={"Authorization": f"Bearer {published['alice']}", "Content-Length": str(8 * len(chunk))},
            timeout=30,
        )
    assert sent.status_code == 202, sent.text
    assert sent.json()["size"] == 8 * len(chunk)


# -- a stop in the middle of an upload -------------------------------------------------------------


def test_ctrl_c_during_an_upload_answers_503_removes_its_partial_file_and_exits_130(published):
    store = published["store"]
    server = Server(store, "--board-port", 0)
    with connect(server.port, upload_head(published["id"], published["alice"], 1_000_000) + b"\0" * 1000) as sock:
        wait_for(lambda: receiving(store) == 1, what="the body being received")
        server.process.send_signal(signal.SIGINT)
        sock.settimeout(20)
        raw = answer_of(sock)
    assert server.process.wait(timeout=30) == 130
    server.log.close()
    log = Path(server.log.name).read_text()
    status, body = status_and_json(raw)
    assert status == 503 and "stopping" in body["detail"], raw
    assert "Traceback" not in log and "Exception in ASGI" not in log and "Cancel " not in log, log
    assert f"POST /api/v1/challenges/{published['id']}/submissions 503 " in log, log
    assert log.rstrip().splitlines()[-1] == "interrupted", log
    assert receiving(store) == 0
    assert not any((store / "uploads").iterdir())


# -- request heads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size, status", [(15_000, 200), (17_000, 431), (70_000, 431)])
def test_a_request_head_is_at_most_16_kib_even_in_one_read(published, size, status):
    with ThreadServer(published["store"]) as server:
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
        with connect(server.port, head, timeout=5) as sock:  # one write: h11 sees the head whole
            raw = answer_of(sock)
    got, body = status_and_json(raw)
    assert got == status, raw[:200]
    if status == 431:
        assert body == {"detail": "request head larger than 16384 bytes"}


@pytest.mark.parametrize(
    "head",
    [
        b"POST /api/v1/whoami HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /api/v1/whoami HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
        b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_a_request_the_http_parser_refuses_gets_a_json_400(published, head):
    with ThreadServer(published["store"]) as server, connect(server.port, head, timeout=5) as sock:
        raw = answer_of(sock)
    assert status_and_json(raw) == (400, {"detail": "Invalid HTTP request received."}), raw[:200]


# -- the client's address ----------------------------------------------------------------------------


def refusals(url: str, forwarded: list[str | None]) -> list[int]:
    statuses = []
    for address in forwarded:
        headers = {"Authorization": "Bearer ncb_1_guess"}
        if address is not None:
            headers["X-Forwarded-For"] = address
        statuses.append(httpx.get(f"{url}/api/v1/whoami", headers=headers).status_code)
    return statuses


def test_x_forwarded_for_is_ignored_unless_the_organizer_names_the_proxy(published, monkeypatch, caplog):
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    assert connections.ConnectionLimits().forwarded_allow_ips == ""
    with ThreadServer(published["store"], limits=connections.ConnectionLimits()) as server:
        assert refusals(server.url, [None] * 20) == [401] * 20
        forged = [f"10.0.{k}.1" for k in range(25)]
        assert refusals(server.url, forged) == [429] * 25  # still the one address that guessed
    # Once in the log: a proxy in front that the organizer forgot to name would show here.
    told = [r.getMessage() for r in caplog.records if "X-Forwarded-For" in r.getMessage()]
    assert len(told) == 1 and "FORWARDED_ALLOW_IPS" in told[0], told


def test_a_named_proxy_s_x_forwarded_for_counts_each_client_apart(published, monkeypatch):
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")
    limits = connections.ConnectionLimits()
    assert limits.forwarded_allow_ips == "127.0.0.1"
    with ThreadServer(published["store"], limits=limits) as server:
        assert refusals(server.url, ["10.0.0.1"] * 20) == [401] * 20
        assert refusals(server.url, ["10.0.0.1"]) == [429]
        assert refusals(server.url, [f"10.0.{k}.2" for k in range(1, 26)]) == [401] * 25


def test_the_refused_token_table_forgets_quiet_addresses_and_stays_bounded():
    table = api.RefusedTokens(limit=20, window_s=60.0, clients=1000)
    for k in range(40_000):  # one refused token from each of 40,000 addresses within a second
        table.add(f"10.{k >> 16}.{(k >> 8) & 255}.{k & 255}", now=k / 40_000)
    assert len(table) == 1000
    table.add("192.0.2.1", now=61.0)  # a minute later, any refusal sweeps the quiet ones out
    assert len(table) == 1
    for _ in range(20):
        table.add("192.0.2.7", now=62.0)
    assert table.over_limit("192.0.2.7", now=62.5) and not table.over_limit("192.0.2.8", now=62.5)
    assert not table.over_limit("192.0.2.7", now=122.5)  # its minute is over


# -- refusal messages --------------------------------------------------------------------------------


def test_a_refusal_message_is_one_printable_line(served, answer, tmp_path):
    """An attribute the scorer quotes in its refusal, a 1,000-integer array whose text spans lines."""
    crafted = tmp_path / "crafted.h5"
    crafted.write_bytes(answer)
    with h5py.File(crafted, "r+") as h5:
        h5.attrs["schema_version"] = np.arange(1000)
    sent = submit(served, crafted.read_bytes())
    job = final_job(served, sent["id"])
    assert job["state"] == "refused", job
    message = job["message"]
    assert "schema version" in message and message.isprintable() and len(message) <= 2000, repr(message)
    assert not (served["store"] / "uploads" / sent["sha256"]).exists()


@pytest.mark.parametrize(
    "text, limit, expected",
    [
        ("one line", 100, "one line"),
        ("a\nb\r\n  c\td", 100, "a b c d"),
        ("bell\x07 and escape\x1b[31m", 100, "bell  and escape [31m"),
        ("x" * 50, 10, "xxxxxxx..."),
    ],
)
def test_one_line_makes_a_message_one_printable_line_within_its_limit(text, limit, expected):
    assert one_line(text, limit) == expected
