"""The live challenge server: the HTTP API, the job dispatcher and the board, started and stopped together.

One process runs the HTTP API (uvicorn) and the dispatcher (Dask) of scoring jobs and verified
runs, and starts the Streamlit board as a child on the same database. SIGINT or SIGTERM stops all three; the board
child also dies with its parent if the parent is killed outright (Linux parent-death signal).
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path

from ncbench.errors import NcbenchError
from ncbench.leaderboard import workqueue
from ncbench.leaderboard.board import board_command
from ncbench.leaderboard.store import Store, database_url, describe_db
from ncbench.private import exposed, private_dir


def db_url(db: str | None, store_dir: Path) -> str:
    url = database_url(db if db else store_dir / "leaderboard.db")
    return url.render_as_string(hide_password=False)


def store_dir(path: Path) -> Path:
    """The store folder, created 0700 (it holds keys and the database) when it is new."""
    if path.exists() and not path.is_dir():
        raise NcbenchError(f"--store {path} is not a folder")
    if not path.exists():
        private_dir(path)
    return path.resolve()


def check_private(url: str, store_root: Path) -> None:
    """NcbenchError, saying how to fix it, when group or others can read a secret of the store:
    a key, the SQLite database (token hashes, unrevealed evaluation seeds), the uploads."""
    paths = workqueue.StoreLayout(store_root).secret_paths()
    database = database_url(url)
    if database.get_backend_name() == "sqlite" and database.database:
        paths += [Path(database.database + suffix) for suffix in ("", "-wal", "-shm")]
    found = exposed(paths)
    if found:
        outside = sorted({str(p) for p in found if not p.is_relative_to(store_root)})
        fix = " && ".join([f"chmod -R go= {store_root}", *(f"chmod go= {p}" for p in outside)])
        raise NcbenchError(
            f"refusing to start: group or others can read secrets of the store ({found[0]}"
            + (f" and {len(found) - 1} more" if len(found) > 1 else "")
            + f"); fix with: {fix}"
        )


class _Stopped(Exception):
    """SIGINT or SIGTERM asked the server to stop."""


def _stop(signum, frame) -> None:
    raise _Stopped


class EmbeddedServer:
    """The API and the scoring workers in this process, on a free localhost port (``url``), for
    callers that drive the whole loop themselves (``ncbench demo``). No board, no signals."""

    def __init__(self, db_url: str, store_dir: Path, *, settings=None, **pools):
        self.db_url, self.store_dir = db_url, Path(store_dir)
        self.settings, self.pools = settings, pools  # verified.Settings; the Dispatcher's pool sizes

    def __enter__(self) -> EmbeddedServer:
        import socket
        import threading

        import uvicorn

        from ncbench.leaderboard.server.api import create_app
        from ncbench.leaderboard.server.worker import Dispatcher

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        app = create_app(self.db_url, self.store_dir, verified_settings=self.settings)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        self.dispatcher = Dispatcher(self.db_url, str(self.store_dir), **self.pools).start()
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


def serve(
    url: str,
    store_root: Path,
    *,
    host: str,
    port: int,
    board_port: int,
    scheduler: str | None,
    score_workers: int,
    sandbox_workers: int,
    max_upload: int,
    settings,
) -> None:
    """Serve the API on ``host:port`` with the dispatcher and (``board_port`` > 0) the board,
    until SIGINT or SIGTERM; ``settings`` are the verified track's."""
    import uvicorn

    from ncbench.leaderboard.server.api import create_app
    from ncbench.leaderboard.server.worker import Dispatcher
    from ncbench.leaderboard.verified import sandbox

    Store(url).close()  # create or migrate the database, or refuse a foreign one, before anything starts
    check_private(url, store_root)
    try:
        sandbox.require_sandbox(unsandboxed=settings.unsandboxed)
    except sandbox.SandboxUnavailable as error:
        print(f"warning: verified track off: {error}", file=sys.stderr)
    if settings.unsandboxed:
        print(
            "warning: --unsandboxed: plugins run WITHOUT a sandbox; their results are marked unsandboxed",
            file=sys.stderr,
        )
    app = create_app(url, store_root, max_upload=max_upload, verified_settings=settings)
    board = dispatcher = None
    # uvicorn stops serving on SIGINT / SIGTERM, then raises the signal again once it has restored
    # the handlers it found: ours turn that into an orderly return through the finally below.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    try:
        if board_port:  # before any thread starts: preexec_fn is only safe in a single-threaded parent
            command, env = board_command(url, host=host, port=board_port, server_url=f"http://{host}:{port}")
            board = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        dispatcher = Dispatcher(
            url, str(store_root), scheduler=scheduler, score_workers=score_workers, sandbox_workers=sandbox_workers
        ).start()
        print(
            f"ncbench server on http://{host}:{port} (API docs /docs)"
            + (f", board on http://{host}:{board_port}" if board else "")
            + f"; database {describe_db(database_url(url))}",
            file=sys.stderr,
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
