"""Hostile operation of the live server: a tiny challenge built and published under a umask that
hides nothing (000), and a real ``ncbench server`` subprocess on it."""

from pathlib import Path

import pytest
from support import TINY, Server, ncbench, token_for

from ncbench.leaderboard.server import service
from ncbench.leaderboard.verified import runs as verified


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> Path:
    """A 16-image nc3 reid challenge at a tiny width, built with umask 000."""
    out = tmp_path_factory.mktemp("hostile") / "release"
    built = ncbench(
        "challenge", "build", "--preset", "nc3", "--task", "reid", "--source", "phantom", "--n", 16, *TINY,
        "--out", out, umask=0,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    return out


def publish(release: Path, store: Path) -> dict:
    """Publish ``release`` into a new ``store`` (umask 000, daily limit 3): {store, id}."""
    done = ncbench("challenge", "publish", release, "--store", store, "--daily-limit", 3, umask=0)
    assert done.returncode == 0, done.stderr
    return {"store": store, "id": done.stdout.split()[-1]}


@pytest.fixture
def published(release, tmp_path) -> dict:
    """A fresh store with the challenge published; no server."""
    return publish(release, tmp_path / "store")


@pytest.fixture(scope="module")
def served(release, tmp_path_factory):
    """A store of the module's own with a server on 127.0.0.1 (no board) and a token for team alice."""
    store = publish(release, tmp_path_factory.mktemp("served") / "store")
    token = token_for(store["store"], "alice")
    server = Server(store["store"], "--board-port", "0")
    yield {**store, "server": server, "url": server.url, "token": token}
    if server.process.poll() is None:
        server.stop()


@pytest.fixture(scope="module")
def embedded(release, tmp_path_factory):
    """A store of the module's own served by the API and workers in this process (so a test can
    lower a limit or replace a job), the verified track unsandboxed: {store, id, server}."""
    store = publish(release, tmp_path_factory.mktemp("embedded") / "store")
    settings = verified.Settings(unsandboxed=True)  # the queues are under test there, not the sandbox
    with service.EmbeddedServer(service.db_url(None, store["store"]), store["store"], settings=settings) as server:
        yield {**store, "server": server}
