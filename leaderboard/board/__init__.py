"""The public board: a Streamlit app (``app.py``, one page per view) on the results store.

It reads the store and the core tables only; it never imports the server, so a board can run
on its own beside a database (``ncbench leaderboard serve``). This module starts nothing: it
says how to launch the app.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ncbench.leaderboard.store import DB_ENV

APP_PATH = Path(__file__).with_name("app.py")
# The challenge server's URL, which the server hands the board it starts (the *Take part* page
# lists the live challenges from it); the attacker's commands read the same variable.
SERVER_ENV = "NCBENCH_SERVER"
# Addresses a server binds to but nobody connects to: every interface.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
HOST_NAME = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def shown_server(server: str | None, visitor_host: str | None) -> str | None:
    """The challenge server's address as an attacker types it: ``server`` itself, unless it names
    every interface (``http://0.0.0.0:8000``, how a public server binds, not an address to connect
    to); then the host name the visitor reached the board at (``visitor_host``, the request's
    Host header, port dropped) with the server's scheme and port. None when neither says."""
    if not server:
        return None
    parts = urlsplit(server)
    if parts.hostname not in WILDCARD_HOSTS:
        return server
    host = (visitor_host or "").strip()
    # The board's own port goes: "board.example.org:8501", "[2001:db8::1]:8501".
    host = host[: host.find("]") + 1] if host.startswith("[") else host.split(":", 1)[0]
    if not HOST_NAME.fullmatch(host) or host.strip("[]") in WILDCARD_HOSTS:
        return None
    return urlunsplit((parts.scheme, f"{host}:{parts.port}" if parts.port else host, parts.path, "", ""))


def reachable_server(server: str) -> str:
    """``server`` as the board itself reaches it: every interface includes the loopback one."""
    parts = urlsplit(server)
    if parts.hostname not in WILDCARD_HOSTS:
        return server
    return urlunsplit((parts.scheme, f"127.0.0.1:{parts.port}" if parts.port else "127.0.0.1", parts.path, "", ""))


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
