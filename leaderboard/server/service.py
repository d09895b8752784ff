"""The live challenge server: the HTTP API, the job dispatcher and the board, started and stopped together.

One process runs the HTTP API (uvicorn) and the dispatcher (Dask) of scoring jobs and verified
runs, and starts the Streamlit board as a child on the same database. SIGINT or SIGTERM stops all three within
STOP_BUDGET_S (:class:`_Shutdown`); the board child also dies with its parent if the parent is killed outright (Linux parent-death signal).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ncbench.errors import NcbenchError
from ncbench.leaderboard import workqueue
from ncbench.leaderboard.board import board_command
from ncbench.leaderboard.store import Store, database_url, describe_db
from ncbench.private import exposed, private_dir

if TYPE_CHECKING:
    from ncbench.leaderboard.server.connections import ConnectionLimits


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


# The database (up to 64 pooled SQLite connections, two files each), the workers' pipes and files,
# the board's child.
OPEN_FILES_BESIDES_CONNECTIONS = 512
STOP_BUDGET_S = 8.0  # from the first SIGINT / SIGTERM to the process's end
# Long enough for the dispatcher to finish a claim under way and stop claiming; closing its cluster
# would also wait for the jobs it runs, which the next start queues again anyway.
DISPATCHER_WAIT_S = 2.0


class _Shutdown:
    """What SIGINT and SIGTERM do to a running server. The first: the dispatcher stops claiming
    jobs at once (in a thread of its own), uvicorn stops accepting and gives the requests in flight
    their time, and :func:`serve` ends the process within STOP_BUDGET_S. A second Ctrl-C ends it
    at once; a second SIGTERM changes nothing."""

    def __init__(self):
        self.signum: int | None = None
        self.since = 0.0
        self.dispatcher = None
        self._stopper: threading.Thread | None = None

    def request(self, signum: int, frame=None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                _end(130)
            return
        self.signum, self.since = signum, time.monotonic()
        # Closing the cluster under running work logs the cancelled tasks' tracebacks: not news.
        logging.getLogger("distributed").setLevel(logging.CRITICAL + 1)
        self.stop_dispatcher()

    def stop_dispatcher(self) -> None:
        if self.dispatcher is not None and self._stopper is None:
            self._stopper = threading.Thread(target=self._stop_work, name="ncbench-stop", daemon=True)
            self._stopper.start()

    def _stop_work(self) -> None:
        """Stop claiming, end the sandboxes this process runs (a root server's would outlive it:
        they change uid, which clears their parent-death signal), then close the cluster. The
        runs and checks they held stay ``running`` and are queued again at the next start."""
        from ncbench.leaderboard.verified import sandbox

        self.dispatcher.stop_claiming()
        sandbox.end_all()
        self.dispatcher.stop()

    def left_s(self) -> float:
        return max(0.0, STOP_BUDGET_S - (time.monotonic() - self.since))

    def wait_dispatcher(self) -> None:
        """Until the dispatcher has stopped, at most DISPATCHER_WAIT_S within the budget after a
        signal; after an error as long as it takes."""
        if self._stopper is not None:
            self._stopper.join(min(DISPATCHER_WAIT_S, self.left_s()) if self.signum is not None else None)


def _end(code: int) -> None:
    """End the process now. Jobs still running in this process's workers stay ``running`` in the
    database and are queued again at the next start; waiting for them could take an hour (a
    verified run's wall limit), and Python would wait for them at exit."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except RuntimeError:  # a second Ctrl-C arrived while Python was writing: the line below still goes
        pass
    if code == 130:
        os.write(2, b"interrupted\n")
    os._exit(code)


def listen(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound before anything else starts: a busy port is one line
    (NcbenchError), not a start-up banner followed by a traceback.

    Its protocol is said (IPPROTO_TCP, not 0): asyncio turns Nagle's algorithm off only on
    connections whose socket says so, and the connections accepted here inherit it. With Nagle on,
    a response's body waited for the client's delayed acknowledgement of its head: 40 ms a request."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise NcbenchError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(False)
    return sock


def check_free(host: str, port: int) -> None:
    """NcbenchError when ``host:port`` cannot be bound now (the board binds it itself later)."""
    listen(host, port).close()


class EmbeddedServer:
    """The API and the scoring workers in this process, on a free localhost port (``url``), for
    callers that drive the whole loop themselves (``ncbench demo``). No board, no signals."""

    def __init__(self, db_url: str, store_dir: Path, *, settings=None, **pools):
        self.db_url, self.store_dir = db_url, Path(store_dir)
        self.settings, self.pools = settings, pools  # verified.Settings; the Dispatcher's pool sizes

    def __enter__(self) -> EmbeddedServer:
        import threading

        import uvicorn

        from ncbench.leaderboard.server.api import create_app
        from ncbench.leaderboard.server.worker import Dispatcher

        self.socket = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        app = create_app(self.db_url, self.store_dir, verified_settings=self.settings)
        # The client's own address counts, never an X-Forwarded-For it sends (no proxy here).
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", proxy_headers=False))
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
    limits: ConnectionLimits | None = None,
) -> None:
    """Serve the API on ``host:port`` with the dispatcher and (``board_port`` > 0) the board,
    until SIGINT or SIGTERM, which end the process (:class:`_Shutdown`: status 130 after Ctrl-C,
    0 after SIGTERM); ``settings`` are the verified track's, ``limits`` the HTTP connections'.
    Requests still running at the signal get ``limits.shutdown_timeout_s``."""
    from ncbench.leaderboard.server import connections
    from ncbench.leaderboard.server.api import create_app
    from ncbench.leaderboard.server.worker import Dispatcher
    from ncbench.leaderboard.verified import sandbox

    limits = limits or connections.ConnectionLimits()
    shutdown = _Shutdown()  # from here on a signal is a request to stop, honoured below
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, shutdown.request)
    listener = listen(host, port)  # first: a busy port refuses before anything starts or prints
    try:
        if board_port:
            check_free(host, board_port)
        Store(url).close()  # create or migrate the database, or refuse a foreign one, before anything starts
        check_private(url, store_root)
    except BaseException:
        listener.close()
        raise
    try:
        sandbox.require_sandbox(unsandboxed=settings.unsandboxed)
    except sandbox.SandboxUnavailable as error:
        print(f"warning: verified track off: {error}", file=sys.stderr)
    if settings.unsandboxed:
        print(
            "warning: --unsandboxed: plugins run WITHOUT a sandbox; their results are marked unsandboxed",
            file=sys.stderr,
        )
    needed = limits.max_connections + OPEN_FILES_BESIDES_CONNECTIONS
    open_files = connections.raise_open_files(needed)
    if open_files < needed:
        print(
            f"warning: this process may open {open_files} files (ulimit -Hn), --max-connections "
            f"{limits.max_connections} needs about {needed}: connections past that are refused by the system",
            file=sys.stderr,
        )
    connections.log_requests_to_stderr()
    app = connections.RequestGuard(
        create_app(url, store_root, max_upload=max_upload, verified_settings=settings), limits
    )
    board = None
    try:
        # The board first, before any thread starts: preexec_fn is only safe in a single-threaded parent.
        if board_port and shutdown.signum is None:
            command, env = board_command(url, host=host, port=board_port, server_url=f"http://{host}:{port}")
            board = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        if shutdown.signum is None:
            shutdown.dispatcher = Dispatcher(
                url, str(store_root), scheduler=scheduler, score_workers=score_workers, sandbox_workers=sandbox_workers
            ).start()
        if shutdown.signum is None:
            print(
                f"ncbench server on http://{host}:{port} (API docs /docs)"
                + (f", board on http://{host}:{board_port}" if board else "")
                + f"; database {describe_db(database_url(url))}",
                file=sys.stderr,
            )
            config = connections.uvicorn_config(app, limits, log_level="warning")
            connections.Server(config, on_exit=shutdown.request).run(sockets=[listener])
    finally:
        listener.close()
        shutdown.stop_dispatcher()
        if shutdown.signum is None:  # an error, not a signal: stop in order and let it show
            shutdown.wait_dispatcher()
        if board is not None:
            board.terminate()
            try:
                board.wait(timeout=min(2.0, shutdown.left_s()) if shutdown.signum else 10)
            except subprocess.TimeoutExpired:
                board.kill()
                board.wait()
    shutdown.wait_dispatcher()
    _end(130 if shutdown.signum == signal.SIGINT else 0)
