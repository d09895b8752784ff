"""The public board: a Streamlit app (``app.py``, one page per view) on the results store.

It reads the store and the core tables only; it never imports the server, so a board can run
on its own beside a database (``ncbench leaderboard serve``). This module starts nothing: it
says how to launch the app.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ncbench.leaderboard.store import DB_ENV

APP_PATH = Path(__file__).with_name("app.py")
# The challenge server's URL, which the server hands the board it starts (the *Take part* page
# lists the live challenges from it); the attacker's commands read the same variable.
SERVER_ENV = "NCBENCH_SERVER"


def board_command(url: str, *, host: str, port: int, server_url: str | None = None) -> tuple[list[str], dict]:
    """The Streamlit command line and environment of the public board, in viewer mode (no
    developer toolbar for visitors, no traceback or server path on a page that fails).
    ``server_url``: the challenge server beside it, if any; an address the organizer already set in
    the environment (the public one, behind a proxy) wins."""
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_PATH),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
        "--client.showErrorDetails",
        "false",
    ]
    env = {**os.environ, DB_ENV: url}
    if server_url and not env.get(SERVER_ENV):
        env[SERVER_ENV] = server_url
    return command, env
