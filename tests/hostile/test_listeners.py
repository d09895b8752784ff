"""Nothing listens beyond the host asked for: a server on 127.0.0.1 (API, board, in-process Dask
cluster) opens no socket on every interface."""

import time

import httpx
import psutil
from support import Server, free_port


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket of ``pid`` and its descendants."""
    process = psutil.Process(pid)
    found = []
    for member in [process, *process.children(recursive=True)]:
        try:
            sockets = member.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found += [tuple(s.laddr) for s in sockets if s.status == psutil.CONN_LISTEN]
    return found


def test_a_server_on_localhost_listens_on_localhost_only(published):
    board_port = free_port()
    server = Server(published["store"], "--host", "127.0.0.1", "--board-port", board_port, "--score-workers", 2)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{board_port}/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        sockets = listening(server.process.pid)
        assert (("127.0.0.1", server.port)) in sockets and ("127.0.0.1", board_port) in sockets
        assert all(address == "127.0.0.1" for address, _ in sockets), sockets
    finally:
        server.stop()
