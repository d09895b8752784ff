"""Mixed traffic from C clients for S seconds against a real `ncbench server` on this machine.

    python benchmarks/load.py [--clients=50] [--seconds=30] [--slowloris=100] [--bomb-every=60]
                              [--max-connections=N] [--profile=FILE] [--out=DIR] [--db=URL]

Builds a tiny challenge, publishes it with a large daily limit, gives each client a team of its
own, starts the server (no board), holds ``--slowloris`` connections that send a header byte now
and then, and runs the clients. Each client sends one request after the other, without pause (a failed one
is followed by a 0.5 s wait), on a kept-alive connection of its own, through a minimal HTTP/1.1
client that costs the generator a fraction of a millisecond a request, so that the server, not
the generator, takes the CPU. Each client loops over a fixed mix: the health check, the
challenge list, a ranged download of the public release, authenticated reads (whoami, its
submissions), a request with a bad token (10%, from 127.0.0.2), and an upload of fresh bytes
(5%). A team of its own uploads a vlen bomb every ``--bomb-every`` seconds, the first at the start: an
answer file whose variable-length string attribute has 3,000 elements that all point at one
15 MB heap object (read naively, 45 GB). Prints one JSON object: requests/s, p50/p99 per route,
the count of each status class, 5xx, the server's peak RSS (its process tree, sampled every
0.2 s), the reconciliation of every 202 with the jobs table (each accepted upload is exactly one
job), the states of the bombs' jobs, the CPU seconds of the API process, of its scorer children and
of the generator, and whether the server was still running at the end. Records go in
benchmarks/RESULTS.md.

The benchmark raises its soft limit of open files as the server does (the server inherits it) and
starts the server with ``--max-connections`` above what the clients open (two connections each:
their own and the bad-token one, plus the slowloris ones), unless told. ``--profile=FILE``
records the server with py-spy (installed beside this Python) for the whole load, all threads,
idle ones too, as collapsed stacks.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

NCBENCH = str(Path(sys.executable).with_name("ncbench"))
TINY = ["--width", "32", "--image-size", "32", "--patch-size", "8", "--bn-batch", "8"]
# (route label, weight): the mix every client draws from.
MIX = [
    ("healthz", 15),
    ("challenges", 15),
    ("download-range", 15),
    ("whoami", 20),
    ("submissions", 20),
    ("bad-token", 10),
    ("upload", 5),
]
ERROR_PAUSE_S = 0.5  # a client whose request failed waits this long before its next one


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ncbench(*args) -> str:
    done = subprocess.run([NCBENCH, *map(str, args)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"ncbench {' '.join(map(str, args[:2]))} failed: {done.stderr.strip()[-300:]}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(root: Path, clients: int, db: str | None) -> tuple[Path, str, list[str]]:
    """A published tiny challenge and one token per client, then the bomber's (issued in-process:
    a CLI call each would take seconds); ``db`` the results database (default: the store's SQLite)."""
    from ncbench.leaderboard import workqueue
    from ncbench.leaderboard.server import channel, service
    from ncbench.leaderboard.store import Store

    ncbench("challenge", "build", "--preset", "nc3", "--task", "reid", "--source", "phantom", "--n", 16, *TINY,
            "--out", root / "release")  # fmt: skip
    store = root / "store"
    database = ["--db", db] if db else []
    challenge_id = ncbench(
        "challenge", "publish", root / "release", "--store", store, *database, "--daily-limit", 100_000
    )
    key = channel.token_key(workqueue.StoreLayout(store))
    with Store(service.db_url(db, store)) as opened:
        tokens = [channel.add_team(opened, f"load-{i}", key=key)[1] for i in range(clients)]
        tokens.append(channel.add_team(opened, "bomber", key=key)[1])
    return store, challenge_id.split()[-1], tokens


def vlen_bomb(path: Path, challenge_id: str, *, elements: int = 3000, element_bytes: int = 15 << 20) -> bytes:
    """An answer file whose ``diagnostics`` attribute is ``elements`` variable-length strings that
    all point at one heap object of ``element_bytes``: a reader that allocates each element
    allocates ``elements * element_bytes``. Written with distinct strings (one large, the others
    one byte), then each element's heap reference is overwritten with the large one's (the
    default HDF5 object header has no checksum to update)."""
    import h5py
    import numpy as np

    from ncbench.attacks.submission import Submission, write_submission

    write_submission(path, Submission(challenge_id=challenge_id, attack="bomb", attack_version="1",
                                      encoded_ids=["e0"], mapping=["p0"]))  # fmt: skip
    with h5py.File(path, "a") as h5:
        del h5.attrs["diagnostics"]
        values = np.array(["x" * element_bytes] + ["a"] * (elements - 1), dtype=object)
        h5.attrs.create("diagnostics", values, dtype=h5py.string_dtype())
    data = bytearray(path.read_bytes())
    # Each element is (length uint32, heap collection address uint64, object index uint32).
    large, small = struct.pack("<I", element_bytes), struct.pack("<I", 1)
    at = data.find(large)
    while at >= 0 and data[at + 16 : at + 20] != small:
        at = data.find(large, at + 1)
    if at < 0:
        raise SystemExit("could not find the vlen attribute's elements in the file")
    for index in range(1, elements):
        data[at + 16 * index : at + 16 * (index + 1)] = data[at : at + 16]
    return bytes(data)


class PeakRss(threading.Thread):
    """The largest RSS of a process and its children together, sampled every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process, self.peak, self.done = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                members = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(m.memory_info().rss for m in members if m.is_running()))
            except psutil.Error:
                pass


async def slowloris(port: int, count: int, stop: asyncio.Event) -> int:
    """Hold ``count`` connections that never finish their headers, reopening each one the
    server closes; returns how many the server closed."""
    closed = 0

    async def one() -> None:
        nonlocal closed
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                while not stop.is_set():
                    await writer.drain()
                    try:
                        if await asyncio.wait_for(reader.read(1), 1.0) == b"":
                            closed += 1
                            break
                    except TimeoutError:
                        writer.write(b"X: y\r\n")
                writer.close()
            except OSError:
                await asyncio.sleep(0.2)

    await asyncio.gather(*(one() for _ in range(count)))
    return closed


class Connection:
    """One kept-alive HTTP/1.1 connection, written for this benchmark: a request is a few
    bytes out and a status line, headers and a Content-Length body in. httpx spent 5-10 ms of
    CPU a request, so at 200 clients the generator filled a core of the two and its own queue
    showed up in every latency; this costs a fraction of a millisecond. A request that finds
    its kept-alive connection closed by the server (idle timeout) reopens it and is sent again
    once, as browsers and HTTP libraries do; such reconnects are counted."""

    def __init__(self, port: int, local: str | None = None):
        self.port, self.local = port, local
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
        for attempt in (0, 1):
            fresh = self.writer is None
            if fresh:
                local = (self.local, 0) if self.local else None
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=local)
            head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            self.writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode()
                + body
            )
            try:
                await self.writer.drain()
                lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if fresh or attempt:
                    raise
                self.reconnects += 1
                continue
            fields = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            if "transfer-encoding" in fields:  # no route here streams; a chunked body would desynchronise us
                raise ConnectionError("a chunked response")
            answer = await self.reader.readexactly(int(fields.get("content-length", 0)))
            if fields.get("connection") == "close":
                self.close()
            return int(lines[0].split()[1]), answer
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def client(port: int, challenge_id: str, token: str, until: float, record, accepted: list[int],
                 connections: list[Connection]) -> None:  # fmt: skip
    """Requests one after the other, each route drawn from MIX, on a kept-alive connection of
    its own (bad tokens on a second one, from 127.0.0.2: the server's refused-token limit is per
    address and would otherwise answer 429 to every client here after 20 of them a minute)."""
    routes, weights = zip(*MIX, strict=True)
    auth = {"Authorization": f"Bearer {token}"}
    files = f"/api/v1/challenges/{challenge_id}/files"
    own, guesser = Connection(port), Connection(port, local="127.0.0.2")
    connections += [own, guesser]
    while time.monotonic() < until:
        route = random.choices(routes, weights)[0]
        started = time.perf_counter()
        try:
            if route == "healthz":
                status, _ = await own.request("GET", "/healthz", {})
            elif route == "challenges":
                status, _ = await own.request("GET", "/api/v1/challenges", {})
            elif route == "download-range":
                status, _ = await own.request("GET", f"{files}/release.h5", {"Range": "bytes=0-65535"})
            elif route == "whoami":
                status, _ = await own.request("GET", "/api/v1/whoami", auth)
            elif route == "submissions":
                status, _ = await own.request("GET", "/api/v1/submissions", auth)
            elif route == "bad-token":
                status, _ = await guesser.request(
                    "GET", "/api/v1/whoami", {"Authorization": "Bearer ncb_1_" + "0" * 43}
                )
            else:
                path = f"/api/v1/challenges/{challenge_id}/submissions"
                status, answer = await own.request("POST", path, auth, os.urandom(4096))
                if status == 202:
                    accepted.append(json.loads(answer)["id"])
            record(route, status, time.perf_counter() - started)
        except (OSError, asyncio.IncompleteReadError) as error:
            record(route, type(error).__name__, time.perf_counter() - started)
            await asyncio.sleep(ERROR_PAUSE_S)
    own.close()
    guesser.close()


def cpu_s(process: psutil.Process) -> tuple[float, float]:
    """CPU seconds a process has used: its own, and its reaped children's."""
    times = process.cpu_times()
    return times.user + times.system, times.children_user + times.children_system


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def bomber(port: int, challenge_id: str, token: str, bomb: bytes, every: float, since: float, until: float,
                 record, bombs):  # fmt: skip
    """Upload ``bomb`` at ``since``, then every ``every`` seconds until ``until``."""
    auth = {"Authorization": f"Bearer {token}"}
    connection, at = Connection(port), since
    while at < until:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        started = time.perf_counter()
        try:
            path = f"/api/v1/challenges/{challenge_id}/submissions"
            status, answer = await connection.request("POST", path, auth, bomb)
            if status == 202:
                bombs.append(json.loads(answer)["id"])
            record("vlen-bomb", status, time.perf_counter() - started)
        except (OSError, asyncio.IncompleteReadError) as error:
            record("vlen-bomb", type(error).__name__, time.perf_counter() - started)
        at += every
    connection.close()


async def load(
    port: int, challenge_id: str, tokens: list[str], seconds: float, held: int, bomb: bytes, every: float
) -> dict:
    latencies: dict[str, list[float]] = collections.defaultdict(list)
    statuses: collections.Counter = collections.Counter()
    accepted: list[int] = []
    bombs: list[int] = []

    def record(route: str, status, elapsed: float) -> None:
        latencies[route].append(elapsed)
        statuses[f"{route} {status}"] += 1

    stop = asyncio.Event()
    loris = asyncio.create_task(slowloris(port, held, stop))
    connections: list[Connection] = []
    started = time.monotonic()
    clients = [client(port, challenge_id, t, started + seconds, record, accepted, connections) for t in tokens[:-1]]
    bombing = bomber(port, challenge_id, tokens[-1], bomb, every, started, started + seconds, record, bombs)
    await asyncio.gather(*clients, bombing)
    elapsed = time.monotonic() - started
    stop.set()
    closed = await loris
    total = sum(len(v) for v in latencies.values())
    return {
        "requests": total,
        "requests_per_s": round(total / elapsed, 1),
        "p50_ms": {r: round(statistics.median(v) * 1000, 1) for r, v in sorted(latencies.items())},
        "p99_ms": {r: round(percentile(v, 0.99) * 1000, 1) for r, v in sorted(latencies.items())},
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(c for k, c in statuses.items() if k.split()[-1].startswith("5")),
        "client_errors": sum(c for k, c in statuses.items() if not k.split()[-1].isdigit()),
        "slowloris_closed_by_server": closed,
        "kept_alive_connections_reopened": sum(c.reconnects for c in connections),
        "accepted": accepted,
        "bombs": bombs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--slowloris", type=int, default=100, help="connections that never finish their head")
    parser.add_argument("--bomb-every", type=float, default=60, help="seconds between two vlen bombs")
    parser.add_argument("--max-connections", type=int, help="the server's cap (default: above what the clients open)")
    parser.add_argument("--profile", help="record the server with py-spy into this file")
    parser.add_argument("--out", help="folder for the store and the server's log (default: a fresh temporary one)")
    parser.add_argument(
        "--db", help="results database URL for the server, an empty one (default: the store's SQLite file)"
    )
    args = parser.parse_args()
    clients, seconds, held, every = args.clients, args.seconds, args.slowloris, args.bomb_every
    # Each client holds its own connection and a bad-token one; the slowloris ones come on top.
    cap = args.max_connections or max(1000, 2 * clients + held + 100)
    options = {"profile": args.profile, "out": args.out}
    from ncbench.leaderboard.server.connections import raise_open_files

    spy = Path(sys.executable).with_name("py-spy")
    if options["profile"] and not spy.exists():
        raise SystemExit(f"--profile needs py-spy beside this Python: {Path(sys.executable).parent}/pip install py-spy")
    open_files = raise_open_files(cap + 2 * clients + held + 512)  # the server's and the clients' ends
    root = Path(options.get("out") or tempfile.mkdtemp(prefix="ncbench-load-"))
    store, challenge_id, tokens = prepare(root, clients, args.db)
    bomb = vlen_bomb(root / "bomb.h5", challenge_id)
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [NCBENCH, "server", "--store", store, *(["--db", args.db] if args.db else []), "--port", str(port),
         "--board-port", "0", "--max-connections", str(cap)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("the server did not start; see " + log.name) from None
            time.sleep(0.2)
    rss = PeakRss(server.pid)
    rss.start()
    profiler = None
    if options.get("profile"):
        profiler = subprocess.Popen(
            [str(spy), "record", "--pid", str(server.pid), "--rate", "20",
             "--idle", "--threads", "--format", "raw", "--duration", str(int(seconds)), "--output", options["profile"]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    server_cpu, own_cpu = cpu_s(psutil.Process(server.pid)), sum(cpu_s(psutil.Process()))
    try:
        result = asyncio.run(load(port, challenge_id, tokens, seconds, held, bomb, every))
        api, children = (after - before for after, before in zip(cpu_s(psutil.Process(server.pid)), server_cpu))
        result["server_cpu_s"] = {"api": round(api, 1), "scorer_children": round(children, 1)}
        result["load_generator_cpu_s"] = round(sum(cpu_s(psutil.Process())) - own_cpu, 1)
        result["server_exit_code_during_run"] = server.poll()  # None: it was still running
    finally:
        rss.done.set()
        if profiler is not None:
            profiler.wait(timeout=60)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    accepted, bombs = result.pop("accepted"), result.pop("bombs")
    from ncbench.leaderboard.server import service
    from ncbench.leaderboard.store import Store

    with Store(service.db_url(args.db, store)) as opened, opened.engine.connect() as conn:
        states = dict(conn.exec_driver_sql("SELECT id, state FROM jobs").all())
        database = opened.engine.dialect.name  # sqlite or postgresql: what the server really used
    jobs = set(states)
    accepted += bombs
    result.update(
        {
            "machine": f"{cpu_model()}, {os.cpu_count()} cores",
            "command": (
                f"python benchmarks/load.py --clients={clients} --seconds={seconds:g} --slowloris={held} "
                f"--bomb-every={every:g} --max-connections={cap}" + (" --db=URL" if args.db else "")
            ),
            "database": database,
            "open_files_limit": open_files,
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "clients": clients,
            "seconds": seconds,
            "server_peak_rss_mb": round(rss.peak / 2**20),
            "uploads_accepted": len(accepted),
            "accepted_ids_distinct": len(set(accepted)),
            "jobs_in_table": len(jobs),
            "accepted_without_a_job": len(set(accepted) - jobs),
            "bomb_jobs": collections.Counter(states.get(job, "missing") for job in bombs),
        }
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
