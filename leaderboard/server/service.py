"""``ncbench server``: the live challenge in one command, and the organizer's commands for it.

One process runs the HTTP API (uvicorn) and the dispatcher (Dask) of scoring jobs and verified
runs, and starts the Streamlit board as a child on the same database. SIGINT or SIGTERM stops all three; the board
child also dies with its parent if the parent is killed outright (Linux parent-death signal).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import click

from ncbench.errors import NcbenchError
from ncbench.leaderboard.store import DB_ENV, DEFAULT_DAILY_LIMIT, Store, database_url, describe_db

APP_PATH = Path(__file__).parents[1] / "board" / "app.py"
DB_HELP = "Results database: an SQLite path or an SQLAlchemy URL [default: STORE/leaderboard.db]."


def _db_url(db: str | None, store_dir: Path) -> str:
    url = database_url(db if db else store_dir / "leaderboard.db")
    return url.render_as_string(hide_password=False)


def _store_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise NcbenchError(f"--store {path} is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


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


class _Stopped(Exception):
    """SIGINT or SIGTERM asked the server to stop."""


def _stop(signum, frame) -> None:
    raise _Stopped


class EmbeddedServer:
    """The API and the scoring workers in this process, on a free localhost port (``url``), for
    callers that drive the whole loop themselves (``ncbench demo``). No board, no signals."""

    def __init__(self, db_url: str, store_dir: Path, *, workers: int = 1):
        self.db_url, self.store_dir, self.workers = db_url, Path(store_dir), workers

    def __enter__(self) -> EmbeddedServer:
        import socket
        import threading

        import uvicorn

        from ncbench.leaderboard.server.api import create_app
        from ncbench.leaderboard.server.worker import Dispatcher

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.db_url, self.store_dir), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        self.dispatcher = Dispatcher(self.db_url, str(self.store_dir), workers=self.workers).start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise NcbenchError("the embedded challenge server did not start")
            self.thread.join(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.dispatcher.stop()
        self.socket.close()


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the parent dies (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@click.command("server")
@click.option(
    "--store",
    "store_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for published files, keys and uploads (created if missing).",
)
@click.option("--db", default=None, help=DB_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address of the API and the board.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="API port.")
@click.option(
    "--board-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port of the Streamlit board [default: API port + 1; 0: no board].",
)
@click.option(
    "--scheduler", default=None, help="Dask scheduler address (tcp://HOST:8786) [default: in-process cluster]."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Scoring workers of the in-process cluster.",
)
@click.option(
    "--max-upload-mb",
    type=click.IntRange(1, 1 << 20),
    default=1024,
    show_default=True,
    help="Largest submission accepted.",
)
@click.option(
    "--verified-releases",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Verified track: fresh hidden evaluation releases per plugin run (K).",
)
@click.option(
    "--eval-source",
    default="phantom",
    show_default=True,
    help="Verified track: held-out images of evaluation releases, for challenges published without "
    "their own --eval-source (phantom, folder:PATH, manifest:FILE).",
)
@click.option(
    "--sandbox-limit",
    "sandbox_limits",
    multiple=True,
    metavar="NAME=VALUE",
    help="Verified track: a limit of each sandboxed run (repeatable): memory_bytes, cpu_s, wall_s, "
    "processes, file_bytes, scratch_bytes, output_bytes, threads; sizes take k/M/G.",
)
@click.option(
    "--unsandboxed",
    is_flag=True,
    help="Organizers testing locally only: run plugins without bubblewrap (results marked unsandboxed).",
)
def server(
    store_dir: Path,
    db: str | None,
    host: str,
    port: int,
    board_port: int | None,
    scheduler: str | None,
    workers: int,
    max_upload_mb: int,
    verified_releases: int,
    eval_source: str,
    sandbox_limits: tuple[str, ...],
    unsandboxed: bool,
) -> None:
    """Run the challenge server: HTTP API, scoring workers and the public board (Ctrl-C stops all)."""
    import uvicorn

    from ncbench.leaderboard.server.api import create_app
    from ncbench.leaderboard.server.worker import Dispatcher
    from ncbench.leaderboard.verified import runs as verified
    from ncbench.leaderboard.verified import sandbox

    store_dir = _store_dir(store_dir)
    url = _db_url(db, store_dir)
    Store(url).close()  # create or migrate the database, or refuse a foreign one, before anything starts
    board_port = port + 1 if board_port is None else board_port
    settings = verified.Settings(
        releases=verified_releases,
        eval_source=eval_source,
        limits=sandbox.parse_limits(sandbox_limits),
        unsandboxed=unsandboxed,
    )
    try:
        sandbox.require_sandbox(unsandboxed=unsandboxed)
    except sandbox.SandboxUnavailable as error:
        click.echo(f"warning: verified track off: {error}", err=True)
    if unsandboxed:
        click.echo(
            "warning: --unsandboxed: plugins run WITHOUT a sandbox; their results are marked unsandboxed", err=True
        )
    app = create_app(url, store_dir, max_upload=max_upload_mb << 20, verified_settings=settings)
    board = dispatcher = None
    # uvicorn stops serving on SIGINT / SIGTERM, then raises the signal again once it has restored
    # the handlers it found: ours turn that into an orderly return through the finally below.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    try:
        if board_port:  # before any thread starts: preexec_fn is only safe in a single-threaded parent
            command, env = board_command(url, host=host, port=board_port)
            board = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        dispatcher = Dispatcher(url, str(store_dir), scheduler=scheduler, workers=workers).start()
        click.echo(
            f"ncbench server on http://{host}:{port} (API docs /docs)"
            + (f", board on http://{host}:{board_port}" if board else "")
            + f"; database {describe_db(database_url(url))}",
            err=True,
        )
        # uvicorn handles SIGINT and SIGTERM: it stops serving and returns here.
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    except _Stopped:
        pass
    finally:
        if dispatcher is not None:
            dispatcher.stop()
        if board is not None:
            board.terminate()
            try:
                board.wait(timeout=10)
            except subprocess.TimeoutExpired:
                board.kill()
                board.wait()


# -- organizer commands ------------------------------------------------------------------------


@click.command("publish")
@click.argument("release_dir", type=click.Path(path_type=Path))
@click.option("--store", "store_dir", type=click.Path(path_type=Path), required=True, help="The server's store folder.")
@click.option("--db", default=None, help=DB_HELP)
@click.option(
    "--daily-limit",
    type=int,
    default=DEFAULT_DAILY_LIMIT,
    show_default=True,
    help="Submissions per team and UTC day (refused ones do not count).",
)
@click.option("--deadline", default=None, help="Last moment for submissions, UTC (YYYY-MM-DDTHH:MM).")
@click.option(
    "--eval-source",
    default=None,
    help="Verified track: the held-out images evaluation releases are drawn from (phantom, folder:PATH, "
    "manifest:FILE) [default: the server's --eval-source]. Keep them out of the public release.",
)
@click.option(
    "--plugin-daily-limit",
    type=int,
    default=None,
    help="Verified track: plugin runs per team and UTC day [default: 2].",
)
def publish(
    release_dir: Path,
    store_dir: Path,
    db: str | None,
    daily_limit: int,
    deadline: str | None,
    eval_source: str | None,
    plugin_daily_limit: int | None,
) -> None:
    """Register a built challenge with the server: its public files become downloadable; its
    key goes to the store, which no route serves."""
    from ncbench.leaderboard.server import channel
    from ncbench.leaderboard.verified import runs as verified

    verified.evaluation_values(eval_source=eval_source, plugin_daily_limit=plugin_daily_limit)  # refuse first
    when = None
    if deadline:
        try:
            when = dt.datetime.fromisoformat(deadline).replace(tzinfo=dt.UTC)
        except ValueError:
            raise NcbenchError(f"--deadline must look like 2026-12-31T23:59, got {deadline!r}") from None
    store_dir = _store_dir(store_dir)
    with Store(_db_url(db, store_dir)) as store:
        challenge_id = channel.publish(
            store, channel.StoreLayout(store_dir), release_dir, daily_limit=daily_limit, deadline=when
        )
        verified.set_evaluation(store, challenge_id, eval_source=eval_source, plugin_daily_limit=plugin_daily_limit)
    click.echo(f"published {challenge_id}")


@click.group("team")
def team_group() -> None:
    """Organizer tools: teams and their tokens for the challenge server."""


def _team_store(store_dir: Path | None, db: str | None) -> Store:
    if store_dir is None and db is None:
        raise NcbenchError("give --db or --store")
    return Store(_db_url(db, store_dir) if store_dir else database_url(db))


_store_option = click.option("--store", "store_dir", type=click.Path(path_type=Path), help="The server's store folder.")
_db_option = click.option("--db", default=None, help=DB_HELP)


@team_group.command("add")
@click.argument("name")
@_store_option
@_db_option
def team_add(name: str, store_dir: Path | None, db: str | None) -> None:
    """Create team NAME (or reuse it) and print a new token, once: only its hash is kept."""
    from ncbench.leaderboard.server import channel

    with _team_store(store_dir, db) as store:
        name, token = channel.add_team(store, name)
    click.echo(f"team {name}: token (shown once; give it to the team)", err=True)
    click.echo(token)


@team_group.command("list")
@_store_option
@_db_option
def team_list(store_dir: Path | None, db: str | None) -> None:
    """Every team, when it was created and how many active tokens it has."""
    from ncbench.leaderboard.server import channel

    with _team_store(store_dir, db) as store:
        for row in channel.list_teams(store):
            click.echo(f"{row['name']}\tcreated {row['created_utc']}\tactive tokens {row['active_tokens']}")


@team_group.command("revoke")
@click.argument("name")
@_store_option
@_db_option
def team_revoke(name: str, store_dir: Path | None, db: str | None) -> None:
    """Revoke every token of team NAME (its results stay on the board)."""
    from ncbench.leaderboard.server import channel

    with _team_store(store_dir, db) as store:
        revoked = channel.revoke_team(store, name)
    click.echo(f"revoked {revoked} token(s) of {name}")
