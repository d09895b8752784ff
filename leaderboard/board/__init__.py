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


def board_command(url: str, *, host: str, port: int) -> tuple[list[str], dict]:
    """The Streamlit command line and environment of the public board, in viewer mode (no
    developer toolbar for visitors)."""
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
    ]
    return command, {**os.environ, DB_ENV: url}
