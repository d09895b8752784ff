"""A real server on a real port against slow, greedy and ambiguous clients (heads that never end,
bodies that stop, more connections than the cap, both Content-Length and Transfer-Encoding),
then stopped and started as an organizer would: a second server on its busy port, and a signal
with a backlog of jobs. The server's bounds are set low here (``--header-timeout 1
--body-timeout 1 --max-connections 300``) so each case takes a second. The module's server is
stopped by its last test."""

import signal
import socket
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from conftest import publish
from support import Server, free_port, ncbench, token_for

from ncbench.leaderboard.server import service
from ncbench.leaderboard.store import Store
from ncbench.leaderboard.verified import runs as verified

SLOW_CLIENTS = 200


@pytest.fixture(scope="module")
def guarded(release, tmp_path_factory):
    store = publish(release, tmp_path_factory.mktemp("guarded") / "store")
    token = token_for(store["store"], "alice")
    server = Server(
        store["store"], "--board-port", 0, "--unsandboxed",
        "--header-timeout", 1, "--body-timeout", 1, "--max-connections", 300,
    )  # fmt: skip
    yield {**store, "server": server, "token": token}
    if server.process.poll() is None:
        server.stop()


def connect(port: int, first_bytes: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(first_bytes)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (end of stream, or a reset) before its 10 s timeout."""
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_connections_that_never_finish_their_headers_are_closed_and_healthz_still_answers(guarded):
    port = guarded["server"].port
    slow = [connect(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") for _ in range(SLOW_CLIENTS)]
    started = time.monotonic()
    try:
        assert httpx.get(f"{guarded['server'].url}/healthz", timeout=5).status_code == 200
        time.sleep(0.5)
        for sock in slow:  # a byte of header now and then does not buy more time
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
        assert all(closed_by_server(sock) for sock in slow)
        assert time.monotonic() - started < 5  # the 1 s head timeout, not the clients, decided
        assert httpx.get(f"{guarded['server'].url}/healthz", timeout=5).status_code == 200
    finally:
        for sock in slow:
            sock.close()


def test_a_body_that_stops_arriving_is_closed(guarded):
    head = (
        f"POST /api/v1/challenges/{guarded['id']}/submissions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {guarded['token']}\r\nContent-Length: 100000\r\n\r\n"
    ).encode()
    started = time.monotonic()
    with connect(guarded["server"].port, head + b"\x89HDF") as sock:
        assert closed_by_server(sock)
    assert time.monotonic() - started < 5
    time.sleep(0.3)
    log = Path(guarded["server"].log.name).read_text()
    assert f"POST /api/v1/challenges/{guarded['id']}/submissions 400 " in log  # refused, not a 500


def test_connections_past_the_cap_are_closed_at_once(guarded):
    port = guarded["server"].port
    opened = [connect(port, b"") for _ in range(330)]
    try:
        for sock in opened:
            sock.settimeout(0.5)
        refused = sum(closed_by_server(sock) for sock in opened[300:])
        assert refused >= 25  # the last ones came after 300 were open
    finally:
        for sock in opened:
            sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the server's count falls as it sees the closes
        try:
            if httpx.get(f"{guarded['server'].url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        raise AssertionError("healthz did not answer after the greedy client left")


def test_a_request_with_both_content_length_and_transfer_encoding_is_400(guarded):
    head = (
        f"POST /api/v1/challenges/{guarded['id']}/submissions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {guarded['token']}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        "4\r\nabcd\r\n0\r\n\r\n"
    ).encode()
    with connect(guarded["server"].port, head) as sock:
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
    listed = httpx.get(
        f"{guarded['server'].url}/api/v1/submissions", headers={"Authorization": f"Bearer {guarded['token']}"}
    )
    assert listed.json() == []


def test_each_request_is_one_log_line_without_its_token_or_query(guarded):
    url, token = guarded["server"].url, guarded["token"]
    httpx.get(f"{url}/api/v1/whoami?secret=hunter2", headers={"Authorization": f"Bearer {token}"})
    httpx.get(f"{url}/api/v1/whoami", headers={"Authorization": "Bearer ncb_1_wrong"})
    time.sleep(0.3)
    log = open(guarded["server"].log.name).read()  # noqa: SIM115
    lines = [line for line in log.splitlines() if " /api/v1/whoami " in line]
    assert len(lines) == 2, log[-2000:]
    assert lines[0].split()[1:4] == ["GET", "/api/v1/whoami", "200"] and lines[0].endswith(" alice")
    assert lines[1].split()[3] == "401" and lines[1].endswith(" anonymous")
    assert token not in log and "hunter2" not in log and "ncb_1_wrong" not in log


def test_a_second_server_on_a_busy_port_refuses_in_one_line_before_starting_anything(guarded, tmp_path):
    port, board_port = guarded["server"].port, free_port()
    second = ncbench("server", "--store", tmp_path / "store", "--port", port, "--board-port", board_port)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    with pytest.raises(httpx.ConnectError):  # its board never started
        httpx.get(f"http://127.0.0.1:{board_port}/", timeout=1)


def run_states(store: Path) -> dict[int, str]:
    with sqlite3.connect(store / "leaderboard.db") as conn:
        return dict(conn.execute("SELECT id, state FROM verified_runs"))


def runners(store: Path) -> set[int]:
    """Pids of the attack runners (``python -P -m ncbench.cli.sandboxed run``) of runs of ``store``."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if b"ncbench.cli.sandboxed" in words and any(str(store).encode() in word for word in words):
            found.add(int(entry.name))
    return found


def stop_with_a_backlog(store: Path, challenge_id: str, server: Server, sig: int) -> str:
    """Queue the built-in verified runs, send ``sig`` once one runs its attack, check the server
    stopped claiming, ended the attack's process and itself within 8 s, and left the run
    ``running`` (for the next start to queue again, not ``failed``); returns its log."""
    with Store(service.db_url(None, store)) as opened:  # as verify-builtins --queue-only, without its start-up
        queued = verified.enqueue_builtins(opened, challenge_id, verified.Settings(releases=2, unsandboxed=True))
    assert len(queued) >= 3
    deadline = time.monotonic() + 120
    while not runners(store):
        assert time.monotonic() < deadline, run_states(store)
        time.sleep(0.05)
    before = run_states(store)
    started = time.monotonic()
    server.process.send_signal(sig)
    server.process.wait(timeout=30)
    assert time.monotonic() - started < service.STOP_BUDGET_S
    assert not runners(store), "an attack outlived its server"
    server.log.close()
    after = run_states(store)
    claimed_since = [run for run, state in after.items() if before[run] == "queued" and state != "queued"]
    assert len(claimed_since) <= 1, (before, after)  # only a claim already under way as the signal came
    assert [run for run, state in before.items() if state == "running" and after[run] != "running"] == []
    log = Path(server.log.name).read_text()
    assert "Traceback" not in log, log
    return log


def test_sigterm_with_a_backlog_stops_claiming_ends_its_runs_and_the_server_within_8_s(guarded):
    """Last in the module: it stops the module's server."""
    server = guarded["server"]
    stop_with_a_backlog(guarded["store"], guarded["id"], server, signal.SIGTERM)
    assert server.process.returncode == 0


@pytest.mark.slow
def test_ctrl_c_with_a_backlog_prints_one_line_and_exits_130(published):
    server = Server(published["store"], "--board-port", 0, "--unsandboxed")
    log = stop_with_a_backlog(published["store"], published["id"], server, signal.SIGINT)
    assert server.process.returncode == 130
    assert log.rstrip().splitlines()[-1] == "interrupted", log
