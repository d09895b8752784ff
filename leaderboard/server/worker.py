"""The workers: queued jobs from the database run on Dask distributed, in three pools. The
``score`` pool runs scoring jobs (an uploaded submission, :func:`leaderboard.server.channel.run_job`);
the ``check`` pool runs plugins' admission checks (:func:`leaderboard.verified.runs.run_check`);
the ``sandbox`` pool runs verified runs (a plugin on fresh hidden releases in the sandbox,
:func:`leaderboard.verified.runs.run_verified`). An answer file is scored within seconds however
many plugins run: the pools never lend each other a slot.

The pools are Dask worker resources: each job asks for one unit of its pool's resource, so it
runs only on a worker that has one free. By default an in-process ``LocalCluster`` of one worker
with ``--score-workers`` units of ``score``, ``--sandbox-workers`` units of ``sandbox`` and one of
``check`` (plugins' admission checks), a thread each; with ``--scheduler tcp://HOST:8786`` the
jobs run on ``dask worker`` processes elsewhere, started with ``--resources`` naming the pools
they serve (e.g. ``score=2`` on one, ``check=1,sandbox=1`` on another), which need the same
database URL (PostgreSQL) and the store folder (a shared file system) to reach the files.
The database holds every job's state, so the cluster can die at any moment: a job it was
running is queued again at the next start and recorded once. Several servers may share one
PostgreSQL database and one scheduler (docs/deploy.md): each claims its own jobs, renews their
leases while it holds them, and queues again the jobs of a server that died
(:mod:`leaderboard.workqueue`); a server that starts while others run leaves their jobs alone.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from ncbench.errors import NcbenchError
from ncbench.leaderboard import workqueue
from ncbench.leaderboard.server import channel
from ncbench.leaderboard.store import Store, jobs, verified_runs
from ncbench.leaderboard.verified import cgroup
from ncbench.leaderboard.verified import runs as verified

LOOPBACK = "127.0.0.1:0"
SCORE, CHECK, SANDBOX = "score", "check", "sandbox"

# Each kind of job: its pool, and how it is claimed, run, and put back in the queue when its
# worker died. A plugin's admission check (a sandboxed import, at most two minutes) has a pool
# of its own, so an upload is checked while long verified runs hold the sandbox pool.
KINDS = {
    "job": (SCORE, channel.claim, channel.run_job, channel.finish),
    "check": (CHECK, verified.claim_checks, verified.run_check, verified.finish),
    "run": (SANDBOX, verified.claim, verified.run_verified, verified.finish),
}
TABLES = {"job": jobs, "check": verified_runs, "run": verified_runs}  # each kind's queue


def run_held(kind: str, db_url: str, store_root: str, job_id: int) -> str:
    """Run a claimed job of ``kind`` on a Dask worker, renewing its lease while it runs: a job
    still running here when the server that claimed it dies is not queued again elsewhere."""
    with workqueue.leased(db_url, TABLES[kind], job_id):
        return KINDS[kind][2](db_url, store_root, job_id)


def reach(db_url: str, store_root: str) -> str | None:
    """On a Dask worker: what of the database and the store folder it cannot reach, or None."""
    root = Path(store_root)
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        return f"cannot read the store folder {root}"
    try:
        Store(db_url, create=False).close()
    except NcbenchError as error:
        return f"cannot open the database: {error}"
    return None


class AbandonedTimeouts(logging.Filter):
    """Drops asyncio's report of a future that timed out and that nobody awaited. Dask waits
    through tornado's ``with_timeout`` (a batched send's next deadline, for one); a close that
    stops the event loop during such a wait can leave its TimeoutError unretrieved, and asyncio
    reports it ("Future exception was never retrieved ... TimeoutError: Timeout") when the
    interpreter collects the future, after the server has stopped. Every other report passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        abandoned = record.getMessage().startswith("Future exception was never retrieved")
        return not (abandoned and isinstance(error, TimeoutError))


def quiet_abandoned_timeouts() -> None:
    """Install :class:`AbandonedTimeouts` on asyncio's logger, once."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, AbandonedTimeouts) for f in logger.filters):
        logger.addFilter(AbandonedTimeouts())


class Dispatcher:
    """Moves queued jobs to Dask workers, each kind to its pool, at most as many at a time as
    the pool has units."""

    def __init__(
        self,
        db_url: str,
        store_root: str,
        *,
        scheduler: str | None = None,
        score_workers: int = 1,
        sandbox_workers: int = 1,
        poll_s: float = 0.3,
    ):
        self.db_url, self.store_root = db_url, store_root
        self.scheduler, self.poll_s = scheduler, poll_s
        self.sizes = {SCORE: score_workers, CHECK: 1, SANDBOX: sandbox_workers}
        self._stop = threading.Event()
        self._inflight: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        # Task keys unique across servers sharing a scheduler (a job may pass from one to another).
        self.token = secrets.token_hex(8)
        self.cluster = self.client = self._thread = self.presence = None

    def start(self) -> Dispatcher:
        from distributed import Client, LocalCluster

        if self.scheduler:
            try:
                self.client = Client(self.scheduler)
            except OSError as error:  # nothing there, or not a scheduler: the organizer's address
                raise NcbenchError(f"cannot reach the Dask scheduler at {self.scheduler}: {error}") from None
            for problem in self.check_workers():
                print(f"warning: {problem}", file=sys.stderr)
        else:
            # Threads of this process talking over in-process queues, so no scheduler, worker or
            # nanny port. The scheduler and each worker still start an HTTP server (health and
            # metrics routes), on every interface unless told: loopback, on a free port.
            self.cluster = LocalCluster(
                n_workers=1,
                threads_per_worker=sum(self.sizes.values()),
                resources=dict(self.sizes),
                processes=False,
                protocol="inproc://",
                dashboard_address=LOOPBACK,
                worker_dashboard_address=LOOPBACK,
            )
            self.client = Client(self.cluster)
        with Store(self.db_url) as store:
            self.presence = workqueue.Presence(self.db_url)
            if self.presence.join():  # alone: every running job was left by a server that died
                channel.requeue_interrupted(store)
                verified.requeue_interrupted(store)
            else:  # other servers run theirs: only jobs nobody holds
                cgroup.reap_leftovers()  # sandboxes of servers of this machine that died
                self._requeue_stale(store)
        self._thread = threading.Thread(target=self._loop, name="ncbench-dispatcher", daemon=True)
        self._thread.start()
        return self

    def check_workers(self) -> list[str]:
        """What the external cluster's workers lack, one line each: a pool no worker declares
        (its jobs would wait), the database or the store folder out of a worker's reach (its jobs
        would fail). Workers that join later are not checked."""
        problems = [
            f"no dask worker declares the pool {pool!r} (--resources {pool}=N): its jobs wait"
            for pool, units in self.capacity().items()
            if units == 0
        ]
        for address, problem in sorted(self.client.run(reach, self.db_url, self.store_root).items()):
            if problem:
                problems.append(f"dask worker {address} {problem}: the jobs it runs fail")
        return problems

    def capacity(self) -> dict[str, int]:
        """Units of each pool over the cluster's workers (remote workers declare theirs)."""
        units = dict.fromkeys(self.sizes, 0)
        for info in self.client.scheduler_info()["workers"].values():
            for pool in units:
                units[pool] += int(info.get("resources", {}).get(pool, 0))
        return units

    def _requeue_stale(self, store: Store) -> None:
        for table in (jobs, verified_runs):
            workqueue.requeue_stale(store, table)

    def _renew(self, store: Store) -> None:
        """Renew the leases of the jobs this dispatcher holds; queue again those nobody holds."""
        with self._lock:
            held = set(self._inflight)
        for kind, table in TABLES.items():
            workqueue.touch(store, table, [job_id for k, job_id in held if k == kind])
        self._requeue_stale(store)

    def _loop(self) -> None:
        with Store(self.db_url) as store:
            renewed = time.monotonic()
            while not self._stop.is_set():
                try:
                    if time.monotonic() - renewed >= workqueue.HEARTBEAT_S:
                        self._renew(store)
                        renewed = time.monotonic()
                    self._dispatch(store)
                except (NcbenchError, OSError) as error:
                    # The database or the scheduler is away for a moment (another machine, in a
                    # deployment of several): the jobs wait in the database; try again.
                    print(f"warning: job dispatcher: {error}", file=sys.stderr)
                    self._stop.wait(workqueue.HEARTBEAT_S)
                self._stop.wait(self.poll_s)

    def _dispatch(self, store: Store) -> None:
        """Claim as many jobs of each kind as its pool has free units, and send them to Dask."""
        capacity = self.capacity()
        for kind, (pool, claim, _, _) in KINDS.items():
            with self._lock:
                busy = sum(1 for k, _ in self._inflight if KINDS[k][0] == pool)
            free = capacity[pool] - busy
            for job_id in claim(store, free) if free > 0 else []:
                future = self.client.submit(
                    run_held,
                    kind,
                    self.db_url,
                    self.store_root,
                    job_id,
                    pure=False,
                    key=f"ncbench-{kind}-{job_id}-{self.token}",
                    resources={pool: 1},
                )
                with self._lock:
                    self._inflight.add((kind, job_id))
                future.add_done_callback(lambda f, k=kind, j=job_id: self._done(k, j, f))

    def _done(self, kind: str, job_id: int, future) -> None:
        with self._lock:
            self._inflight.discard((kind, job_id))
        if future.status == "error" and not self._stop.is_set():
            # The worker itself died (run_job and run_verified record every error they can
            # catch): try again later.
            with Store(self.db_url) as store:
                KINDS[kind][3](store, job_id, "queued")

    def stop_claiming(self) -> None:
        """Claim no more jobs, at once; a job that ends in error from now on is not requeued."""
        self._stop.set()

    def stop(self) -> None:
        """Stop claiming; jobs still running stay ``running`` and are queued again next start."""
        self.stop_claiming()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.presence is not None:
            self.presence.leave()
        quiet_abandoned_timeouts()
        for closer in (self.client, self.cluster):
            if closer is not None:
                try:
                    closer.close(timeout=10)
                except Exception:  # noqa: BLE001 - shutting down: nothing useful to do with it
                    pass
