"""Peak RSS of `ncbench score` on hostile submissions, next to a legitimate one.

    python benchmarks/hostile.py [--preset=nc3] [--n=32] [--out=DIR]

Builds one small full-size challenge per task (reid, invert, transfer), writes a legitimate
submission and hostile files for each, and scores every file in a fresh process (its own
``ru_maxrss`` from ``os.wait4``). The target: every hostile file ends in one line and exit 2,
writes no row, and costs at most 256 MB more peak RSS than the legitimate submission.
Prints one JSON object (machine, CPU model, rows) and a Markdown table.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
from script_options import script_options

from ncbench.attacks.submission import Submission, write_submission
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.files import open_key, open_release
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.leaderboard.store import Store

TARGET_MB = 256
SEED = "5eed" * 8  # 128 bits, so the build is reproducible and not a test release


def cpu_model() -> str:
    """'AMD EPYC (family 25, model 17)' from /proc/cpuinfo; the platform's words elsewhere."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return (
        f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')}, "
        f"model {fields.get('model', '?')})"
    )


# Linux carries a process's peak RSS across exec, so a child forked from this (large) process would
# report at least our own peak: a small launcher forks the scorer and reports the scorer's rusage.
LAUNCHER = (
    "import json, os, subprocess, sys; child = subprocess.Popen(sys.argv[2:]); "
    "_, status, usage = os.wait4(child.pid, 0); "
    "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))"
)


def score_in_child(submission: Path, key: Path, db: Path) -> dict:
    """`ncbench score` in a fresh interpreter: exit code, its own peak RSS, its stderr, rows added."""
    before = _rows(db)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        report, out, err = Path(folder) / "report.json", Path(folder) / "stdout", Path(folder) / "stderr"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            subprocess.run(
                [
                    sys.executable,
                    "-S",
                    "-c",
                    LAUNCHER,
                    str(report),
                    sys.executable,
                    "-c",
                    "from ncbench.cli import main; main()",
                    "score",
                    str(submission),
                    "--key",
                    str(key),
                    "--db",
                    str(db),
                    "--team",
                    "bench",
                ],
                stdout=stdout,
                stderr=stderr,
                check=True,
            )
        code, peak_kb = json.loads(report.read_text())
        lines, message = len(out.read_text().splitlines()), err.read_text().strip()
    return {
        "exit": code,
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "rows_added": _rows(db) - before,
        "stderr": message[-300:],
        "stdout_lines": lines,
    }


def _rows(db: Path) -> int:
    with Store(db) as store:
        return store.counts()["submissions"]


# -- the files ---------------------------------------------------------------------------------------


def legit(release_dir: Path, out: Path) -> Path:
    """What a strong attack would submit: perfect answers in the built-in attacks' dtypes."""
    with open_release(release_dir) as release, open_key(release_dir) as key:
        submission = Submission(
            release.challenge_id,
            "bench-attack",
            "1.0",
            release.encoded_ids,
            patch_positions=key.read("truth/patch_perm").astype(np.int16),
        )
        if release.task == "reid":
            plain_ids = release.plain_ids
            truth = key.read("truth/plain_index")
            submission.mapping = [plain_ids[j] for j in truth]
            scores = np.zeros((len(truth), len(plain_ids)), np.float32)
            scores[np.arange(len(truth)), truth] = 1
            submission.scores, submission.plain_ids = scores, plain_ids
        elif release.task == "invert":
            submission.reconstructions = key.read("truth/images").astype(np.float32)
        else:
            submission.encodings = key.read("truth/target_encodings").astype(np.float32)
            submission.target_ids = release.target_ids
    return write_submission(out, submission)


def with_dataset(good: Path, out: Path, name: str, make) -> Path:
    """``good`` with dataset ``name`` replaced by ``make(handle, name)``."""
    shutil.copyfile(good, out)
    with h5py.File(out, "a") as handle:
        if name in handle:
            del handle[name]
        make(handle, name)
    return out


def declared(shape, dtype="float64"):
    def make(handle, name):
        row = math.prod(shape[1:]) * np.dtype(dtype).itemsize
        handle.create_dataset(name, shape=shape, dtype=dtype, chunks=(max(1, (1 << 20) // row), *shape[1:]))

    return make


def zero_chunks(shape, chunk_rows):
    """Real gzip chunks of zeros, one per ``chunk_rows`` rows: inflated, ``shape`` of float64."""

    def make(handle, name):
        dataset = handle.create_dataset(
            name, shape=shape, dtype="float64", chunks=(chunk_rows, *shape[1:]), compression="gzip"
        )
        zeros = zlib.compress(bytes(chunk_rows * math.prod(shape[1:]) * 8), 9)
        for start in range(0, shape[0], chunk_rows):
            dataset.id.write_direct_chunk((start, *[0] * (len(shape) - 1)), zeros)

    return make


def hidden_bomb(shape, chunk_rows, inflated):
    """A part of legitimate shape whose first chunk's gzip stream, no longer than the chunk itself,
    inflates to ``inflated`` bytes."""

    def make(handle, name):
        chunk = (chunk_rows, *shape[1:])
        dataset = handle.create_dataset(name, shape=shape, dtype="float64", chunks=chunk, compression="gzip")
        squeezer, block = zlib.compressobj(9), bytes(1 << 20)
        stream = b"".join(squeezer.compress(block) for _ in range(inflated >> 20)) + squeezer.flush()
        dataset.id.write_direct_chunk((0,) * len(shape), stream)

    return make


def external_link(key: Path, truth: str):
    return lambda handle, name: handle.__setitem__(name, h5py.ExternalLink(str(key), truth))


def virtual(key: Path, truth: str, relative_to: Path):
    def make(handle, name):
        with h5py.File(key, "r") as source:
            shape, dtype = source[truth].shape, source[truth].dtype
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[...] = h5py.VirtualSource(os.path.relpath(key, relative_to), truth, shape=shape)
        handle.create_virtual_dataset(name, layout)

    return make


def external_storage(key: Path, shape, dtype):
    def make(handle, name):
        size = math.prod(shape) * np.dtype(dtype).itemsize
        handle.create_dataset(name, shape=shape, dtype=dtype, external=[(str(key), 0, size)])

    return make


def string_heap(good: Path, out: Path, n_bytes: int) -> Path:
    shutil.copyfile(good, out)
    with h5py.File(out, "a") as handle:
        handle.attrs["diagnostics"] = "[" + " " * n_bytes + "]"
    return out


def csv_rows(release_dir: Path, out: Path, rows: int) -> Path:
    with open(out, "w") as handle:
        handle.write("encoded_id,plain_id\n")
        handle.writelines(f"enc-{i:05d},img-00000\n" for i in range(rows))
    return out


def cases(task: str, release_dir: Path, good: Path, folder: Path) -> dict[str, Path]:
    key = release_dir / "private" / "key.h5"
    with open_release(release_dir) as release:
        config, n = release.config, release.n_encoded
        t = len(release.target_ids) if task == "transfer" else 0
    s, p, d = config.image_size, config.n_patches, config.width
    f = folder / task
    f.mkdir()
    if task == "reid":
        return {
            "declared 3.2 GB, ignored part": with_dataset(
                good, f / "a.h5", "reconstructions", declared((int(3.2e9) // (s * s * 8), s, s))
            ),
            "declared 12 GiB, used part": with_dataset(
                good, f / "b.h5", "scores", declared(((12 << 30) // (n * 8), n))
            ),
            "declared 4 EiB, used part": with_dataset(
                good, f / "c.h5", "patch_positions", declared((1 << 62 >> 8, p), "int8")
            ),
            "gzip bomb 2 GB (declared)": with_dataset(
                good, f / "d.h5", "scores", zero_chunks(((2 << 30) // (n * 8), n), (2 << 20) // (n * 8))
            ),
            "20 MB string attribute": string_heap(good, f / "e.h5", 20 << 20),
            "CSV of 1,000,000 rows": csv_rows(release_dir, f / "f.csv", 1_000_000),
        }
    if task == "invert":
        return {
            "gzip bomb 1 GB in one chunk": with_dataset(
                good, f / "a.h5", "reconstructions", hidden_bomb((n, s, s), 4, 1 << 30)
            ),
            "external link to key": with_dataset(
                good, f / "b.h5", "reconstructions", external_link(key, "/truth/images")
            ),
            "virtual dataset on key (relative)": with_dataset(
                good, f / "c.h5", "reconstructions", virtual(key, "truth/images", f)
            ),
            "external storage in key": with_dataset(
                good, f / "d.h5", "reconstructions", external_storage(key, (n, s, s), "uint8")
            ),
        }
    return {
        "declared 12 GiB, used part": with_dataset(
            good, f / "a.h5", "encodings", declared(((12 << 30) // (p * d * 8), p, d))
        ),
        "external link to key": with_dataset(
            good, f / "b.h5", "encodings", external_link(key, "/truth/target_encodings")
        ),
        "gzip bomb 1 GB in one chunk": with_dataset(good, f / "c.h5", "encodings", hidden_bomb((t, p, d), 1, 1 << 30)),
    }


def main(preset: str = "nc3", n: int = 32, out: str | None = None) -> dict:
    root = Path(out or tempfile.mkdtemp(prefix="ncbench-hostile-"))
    config = resolve_config(preset)
    rows = []
    for task in ("reid", "invert", "transfer"):
        release_dir = root / "releases" / task
        if not release_dir.exists():
            build_release(
                release_dir, config=config, plan=BuildPlan.for_task(task, n), source="phantom", seed=SEED, device="cpu"
            )
        db = root / f"{task}.db"
        db.unlink(missing_ok=True)
        Store(db).close()
        key = release_dir / "private" / "key.h5"
        good = legit(release_dir, root / f"{task}-legit.h5")
        files = cases(task, release_dir, good, Path(tempfile.mkdtemp(dir=root)))
        baseline = score_in_child(good, key, db)
        if baseline["exit"] != 0:
            raise SystemExit(f"the legitimate {task} submission was not scored: {baseline['stderr']}")
        rows.append(
            {"task": task, "case": "legitimate", "file_bytes": good.stat().st_size, **baseline, "extra_mb": 0.0}
        )
        for name, path in files.items():
            result = score_in_child(path, key, db)
            rows.append(
                {
                    "task": task,
                    "case": name,
                    "file_bytes": path.stat().st_size,
                    **result,
                    "extra_mb": round(result["peak_rss_mb"] - baseline["peak_rss_mb"], 1),
                }
            )
    hostile = [r for r in rows if r["case"] != "legitimate"]
    ok = all(
        r["exit"] == 2 and r["rows_added"] == 0 and r["stderr"].count("\n") == 0 and r["extra_mb"] <= TARGET_MB
        for r in hostile
    )
    return {
        "benchmark": f"hostile submissions, {preset} N={n} (S={config.image_size}, D={config.width})",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu_model": cpu_model(),
        "target": f"exit 2, one line, no row, at most {TARGET_MB} MB over the legitimate submission",
        "all_within_target": ok,
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"{result['benchmark']}; {result['cpu_model']}; all within target: {result['all_within_target']}",
        "",
        "| task | case | file | exit | peak RSS | vs legitimate | rows | message |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        message = r["stderr"].split(": ", 2)[-1][:90].replace("|", "/") if r["exit"] else ""
        lines.append(
            f"| {r['task']} | {r['case']} | {r['file_bytes'] / 1e6:.2f} MB | {r['exit']} | "
            f"{r['peak_rss_mb']:.0f} MB | {r['extra_mb']:+.0f} MB | {r['rows_added']} | {message} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    options = script_options(sys.argv[1:], __doc__)
    outcome = main(options.get("preset", "nc3"), int(options.get("n", 32)), options.get("out"))
    print(json.dumps(outcome))
    print(table(outcome))
