"""Hostile operation of the live server: a tiny challenge built and published under a umask that
hides nothing (000), and a real ``ncbench server`` subprocess on it."""

from pathlib import Path

import pytest
from support import TINY, Server, ncbench, token_for


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


@pytest.fixture
def published(release, tmp_path) -> dict:
    """A fresh store with the challenge published (umask 000) and the id; no server yet."""
    store = tmp_path / "store"
    done = ncbench("challenge", "publish", release, "--store", store, "--daily-limit", 3, umask=0)
    assert done.returncode == 0, done.stderr
    return {"store": store, "id": done.stdout.split()[-1]}


@pytest.fixture
def served(published):
    """``published`` with a server on 127.0.0.1 (no board) and a token for team alice."""
    token = token_for(published["store"], "alice")
    server = Server(published["store"], "--board-port", "0")
    yield {**published, "server": server, "url": server.url, "token": token}
    if server.process.poll() is None:
        server.stop()
