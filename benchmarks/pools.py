"""Answer-file scoring latency while K verified runs are busy, and the sandbox's overhead.

    python benchmarks/pools.py [--busy=0,1,2] [--n=64] [--repeats=3]

Builds a small nc3 reid challenge, publishes it in a fresh store and starts the server in this
process (API and workers, ``--sandbox-workers K``). For each K it queues K verified runs of
``carlini-2021`` (the organizer's, sandboxed), waits until all K hold the sandbox pool, then
uploads ``--repeats`` answer files one after the other and times each from the upload to its
``scored`` state (the scorer's child process start-up included). Then it runs ``chance`` and
``gram-hungarian`` on the public release through ``verified.sandbox.run_attack``, sandboxed and
``--unsandboxed``, and reports the wall time of each. Prints one JSON object and Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ncbench.leaderboard.server import service
from ncbench.leaderboard.store import BUILTIN_TEAM, ORIGIN_ORGANIZER, Store
from ncbench.leaderboard.verified import runs as verified
from ncbench.leaderboard.verified import sandbox

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile import cpu_model  # noqa: E402

NCBENCH = str(Path(sys.executable).with_name("ncbench"))
TINY = ["--width", "32", "--image-size", "32", "--patch-size", "8", "--bn-batch", "8"]


def ncbench(*args) -> str:
    done = subprocess.run([NCBENCH, *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ncbench {' '.join(map(str, args))} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def scoring_latency(server, challenge_id: str, token: str, files: list[Path]) -> list[float]:
    """Seconds from each upload to its scored state, one file at a time."""
    seconds = []
    for path in files:
        started = time.perf_counter()
        job = httpx.post(
            f"{server.url}/api/v1/challenges/{challenge_id}/submissions",
            content=path.read_bytes(),
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        ).json()
        while (
            state := httpx.get(
                f"{server.url}/api/v1/submissions/{job['id']}", headers={"Authorization": f"Bearer {token}"}
            ).json()["state"]
        ) not in ("scored", "refused", "failed"):
            time.sleep(0.05)
        if state != "scored":
            raise SystemExit(f"an answer file ended {state}")
        seconds.append(time.perf_counter() - started)
    return seconds


def busy_runs(db: Store, challenge_id: str, count: int) -> list[int]:
    settings = verified.Settings(releases=4)  # long enough to outlast the scoring of the answer files
    return [
        verified.enqueue(
            db,
            team=BUILTIN_TEAM,
            origin=ORIGIN_ORGANIZER,
            challenge_id=challenge_id,
            attack="carlini-2021",  # trains networks: the longest built-in
            attack_version="1",
            params="{}",
            settings=settings,
            eval_source="phantom",
        )
        for _ in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--busy", default="0,1,2")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    rows, overhead = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ncbench("challenge", "build", "--preset", "nc3", "--task", "reid", "--source", "phantom",
                "--n", options.n, *TINY, "--out", root / "release")  # fmt: skip
        for busy in map(int, options.busy.split(",")):
            store = root / f"store-{busy}"
            challenge_id = ncbench("challenge", "publish", root / "release", "--store", store,
                                   "--daily-limit", 1000).split()[-1]  # fmt: skip
            token = ncbench("team", "add", "bench", "--store", store)
            files = []
            for seed in range(options.repeats):
                files.append(root / f"chance-{busy}-{seed}.h5")
                ncbench("attack", "run", "chance", "--release", root / "release", "--seed", seed, "--out", files[-1])
            url = service.db_url(None, store)
            with Store(url, create=False) as db:
                run_ids = busy_runs(db, challenge_id, busy)
            with service.EmbeddedServer(url, store, sandbox_workers=max(busy, 1)) as server:
                with Store(url, create=False) as db:
                    while any(verified.run_view(db, r)["state"] == "queued" for r in run_ids):
                        time.sleep(0.1)
                    seconds = scoring_latency(server, challenge_id, token, files)
                    still = sum(verified.run_view(db, r)["state"] == "running" for r in run_ids)
                    while any(verified.run_view(db, r)["state"] in ("queued", "running") for r in run_ids):
                        time.sleep(1)  # no sandbox is left behind when the server stops
            rows.append({"busy": busy, "still_running_after": still, "seconds": [round(s, 2) for s in seconds]})
        release = root / "release" / "public" / "release.h5"
        for attack in ("chance", "gram-hungarian"):
            for sandboxed in (True, False):
                work = root / f"work-{attack}-{sandboxed}"
                work.mkdir()
                started = time.perf_counter()
                outcome, _ = sandbox.run_attack(
                    attack=attack, params={}, release=release, workdir=work, limits=sandbox.Limits(),
                    sandboxed=sandboxed,
                )  # fmt: skip
                wall = time.perf_counter() - started
                if not outcome.ok:
                    raise SystemExit(f"{attack} failed: {outcome.reason}")
                overhead.append({"attack": attack, "sandboxed": sandboxed, "wall_s": round(wall, 2)})
    print(json.dumps({"cpu": cpu_model(), "n": options.n, "scoring": rows, "sandbox": overhead}))
    print("\n| verified runs busy | answer files scored, s (upload to scored) | runs still running after |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['busy']} | {', '.join(map(str, row['seconds']))} (median "
              f"{statistics.median(row['seconds']):.2f}) | {row['still_running_after']} |")  # fmt: skip
    print("\n| attack | sandboxed wall s | unsandboxed wall s |")
    print("|---|---|---|")
    for attack in ("chance", "gram-hungarian"):
        walls = {r["sandboxed"]: r["wall_s"] for r in overhead if r["attack"] == attack}
        print(f"| {attack} | {walls[True]} | {walls[False]} |")


if __name__ == "__main__":
    main()
