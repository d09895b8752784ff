"""What the verified track's sandbox costs: the same run with and without it.

    python benchmarks/sandbox.py [--repeats=5] [--n=64] [--attack=gram-hungarian]

Two measurements, each ``repeats`` times, alternating sandboxed and bare so that load on a
shared machine falls on both alike; the median and the range of each are reported:

- start-up: ``python -c pass`` bare, and in the sandbox as a run gets it (bubblewrap, the
  per-process limits, the control group where the host gives one, the seccomp filter where
  pyseccomp is installed, a fresh uid for a root server);
- a run: ``sandbox.run_attack`` of one built-in attack on one small release (nc3, ``n``
  encodings of 32 pixels, width 64), ``sandboxed=False`` and ``True``: the sandboxed one also
  stages the release, and its submission, under neutral paths.

Prints one JSON object (machine, CPU model, rows) and a Markdown table.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from script_options import script_options

from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.hardware import cpu_model
from ncbench.leaderboard.verified import cgroup, sandbox, seccomp

SEED = "5eed" * 8
LIMITS = sandbox.parse_limits(["wall_s=600", "threads=1"])


def start_up(sandboxed: bool, workdir: Path) -> float:
    command = [sys.executable, "-c", "pass"]
    if sandboxed:
        with seccomp.program() as fd:
            argv = sandbox.bwrap_argv(
                command,
                mounts=sandbox.environment_mounts(),
                limits=LIMITS,
                uid=sandbox._sandbox_uid(),
                seccomp_fd=fd,
            )
            outcome = sandbox._execute(argv, LIMITS, sandboxed=True, workdir=workdir, pass_fds=(fd,) if fd else ())
    else:
        outcome = sandbox._execute(
            sandbox.prlimit_argv(LIMITS, processes=False) + command, LIMITS, sandboxed=False, workdir=workdir
        )
    assert outcome.ok, outcome.output
    return outcome.wall_s


def attack_run(sandboxed: bool, release: Path, workdir: Path, attack: str) -> float:
    outcome, _ = sandbox.run_attack(
        attack=attack, params={}, release=release, workdir=workdir, limits=LIMITS, sandboxed=sandboxed
    )
    assert outcome.ok, outcome.output
    return outcome.wall_s


def summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "min_s": min(times), "max_s": max(times)}


def main(repeats: int = 5, n: int = 64, attack: str = "gram-hungarian") -> dict:
    problem = sandbox.sandbox_problem()
    if problem:
        raise SystemExit(f"no sandbox here: {problem}")
    with tempfile.TemporaryDirectory(prefix="ncbench-bench-") as folder:
        root = Path(folder)
        config = resolve_config("nc3", width=64, image_size=32, patch_size=8, bn_batch=16)
        built = build_release(root / "release", config=config, plan=BuildPlan("reid", n), source="phantom", seed=SEED)
        release = built / "public" / "release.h5"
        times: dict[str, list[float]] = {}
        for index in range(repeats):
            for sandboxed in (False, True):
                mode = "sandboxed" if sandboxed else "bare"
                work = root / f"work-{mode}-{index}"
                work.mkdir()
                times.setdefault(f"start-up {mode}", []).append(start_up(sandboxed, work))
                run_work = work / "run"
                run_work.mkdir()
                times.setdefault(f"{attack} {mode}", []).append(attack_run(sandboxed, release, run_work, attack))
    return {
        "benchmark": f"sandbox overhead, {repeats} repeats, {attack} on nc3 N={n} (32 px, width 64)",
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "root": os.geteuid() == 0,
        "cgroup": cgroup.available(),
        "seccomp": seccomp.available(),
        "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "rows": {name: summary(values) for name, values in times.items()},
    }


def table(result: dict) -> str:
    lines = [
        f"{result['benchmark']}; {result['cpu_model']}, {result['cores']} cores; root: {result['root']}; "
        f"control group: {result['cgroup'] or 'none'}; seccomp: {result['seccomp']}",
        "",
        "| what | median wall s | min | max |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} |" for name, r in result["rows"].items()
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    options = script_options(sys.argv[1:], __doc__)
    outcome = main(int(options.get("repeats", 5)), int(options.get("n", 64)), options.get("attack", "gram-hungarian"))
    print(json.dumps(outcome))
    print(table(outcome))
