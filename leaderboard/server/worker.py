"""The workers: queued jobs from the database run on Dask distributed. Two kinds share them:
scoring jobs (an uploaded submission, :func:`leaderboard.server.channel.run_job`) and verified runs (a
plugin on fresh hidden releases in the sandbox, :func:`leaderboard.verified.runs.run_verified`).

By default an in-process ``LocalCluster`` (``--workers`` threads); with ``--scheduler
tcp://HOST:8786`` the jobs run on ``dask worker`` processes elsewhere, which need the same
database URL (PostgreSQL) and the store folder (a shared file system) to reach the files.
The database holds every job's state, so the cluster can die at any moment: a job it was
running is queued again at the next start and recorded once.
"""

from __future__ import annotations

import threading

from ncbench.leaderboard.server import channel
from ncbench.leaderboard.store import Store
from ncbench.leaderboard.verified import runs as verified

LOOPBACK = "127.0.0.1:0"

# Each kind of job: how it is claimed, run, and put back in the queue when its worker died.
# Scoring jobs are claimed first: they take seconds, a verified run takes minutes.
KINDS = {
    "job": (channel.claim, channel.run_job, channel.finish),
    "run": (verified.claim, verified.run_verified, verified.finish),
}


class Dispatcher:
    """Moves queued jobs of both kinds to Dask workers, at most ``capacity`` at a time."""

    def __init__(
        self, db_url: str, store_root: str, *, scheduler: str | None = None, workers: int = 1, poll_s: float = 0.3
    ):
        self.db_url, self.store_root = db_url, store_root
        self.scheduler, self.workers, self.poll_s = scheduler, workers, poll_s
        self._stop = threading.Event()
        self._inflight: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self.cluster = self.client = self._thread = None

    def start(self) -> Dispatcher:
        from distributed import Client, LocalCluster

        if self.scheduler:
            self.client = Client(self.scheduler)
        else:
            # Threads of this process talking over in-process queues, so no scheduler, worker or
            # nanny port. The scheduler and each worker still start an HTTP server (health and
            # metrics routes), on every interface unless told: loopback, on a free port.
            self.cluster = LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=False,
                protocol="inproc://",
                dashboard_address=LOOPBACK,
                worker_dashboard_address=LOOPBACK,
            )
            self.client = Client(self.cluster)
        with Store(self.db_url) as store:
            channel.requeue_interrupted(store)
            verified.requeue_interrupted(store)
        self._thread = threading.Thread(target=self._loop, name="ncbench-dispatcher", daemon=True)
        self._thread.start()
        return self

    @property
    def capacity(self) -> int:
        return max(1, sum(info.get("nthreads", 1) for info in self.client.scheduler_info()["workers"].values()))

    def _loop(self) -> None:
        with Store(self.db_url) as store:
            while not self._stop.is_set():
                for kind, (claim, run, _) in KINDS.items():
                    with self._lock:
                        free = self.capacity - len(self._inflight)
                    for job_id in claim(store, free) if free > 0 else []:
                        future = self.client.submit(
                            run,
                            self.db_url,
                            self.store_root,
                            job_id,
                            pure=False,
                            key=f"ncbench-{kind}-{job_id}-{id(self)}",
                        )
                        with self._lock:
                            self._inflight.add((kind, job_id))
                        future.add_done_callback(lambda f, k=kind, j=job_id: self._done(k, j, f))
                self._stop.wait(self.poll_s)

    def _done(self, kind: str, job_id: int, future) -> None:
        with self._lock:
            self._inflight.discard((kind, job_id))
        if future.status == "error" and not self._stop.is_set():
            # The worker itself died (run_job and run_verified record every error they can
            # catch): try again later.
            with Store(self.db_url) as store:
                KINDS[kind][2](store, job_id, "queued")

    def stop(self) -> None:
        """Stop claiming; jobs still running stay ``running`` and are queued again next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for closer in (self.client, self.cluster):
            if closer is not None:
                try:
                    closer.close(timeout=10)
                except Exception:  # noqa: BLE001 - shutting down: nothing useful to do with it
                    pass
