"""Helpers of the hostile tests: the real CLI (optionally under a umask) and the server tests' ``Server``."""

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the server tests' helpers

from test_server import NCBENCH, TINY, Server, free_port  # noqa: E402

__all__ = ["TINY", "Server", "free_port", "ncbench", "token_for"]


def ncbench(*args, umask: int | None = None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, optionally under ``umask``."""
    return subprocess.run(
        [NCBENCH, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def token_for(store: Path, team: str) -> str:
    added = ncbench("team", "add", team, "--store", store)
    assert added.returncode == 0, added.stderr
    return added.stdout.strip()
