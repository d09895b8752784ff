"""Several hospitals, independent keys: linkage against depth, and the insider.

    python benchmarks/sites.py link-depth [--n 100] [--depths 0,1,2,4,8,16,44] [--kind image]
    python benchmarks/sites.py insider [--n 250] [--preset nc7]

``link-depth`` builds, per depth, a full-size (256 px, width 2048) two-site ``link`` release with
``--n`` encodings per site (a quarter shared), runs ``gram-link`` and scores it with the key.
``insider`` builds a two-site ``reid`` release and runs ``gram-hungarian`` twice: with its own
self-sampled key (width 512) and with site 0's real key (full width, ``insider_key``), scoring
each on site 1's encodings, the ones the insider did not encode. Prints a Markdown table and the
machine; releases go under ``runs/``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ncbench.attacks.plugins.registry import resolve
from ncbench.attacks.submission import write_submission
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.files import open_key, open_release, write_site_key
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.hardware import machine_description
from ncbench.leaderboard.scoring import score_submission


def _build(out: Path, preset: str, task: str, n: int, seed: int, **overrides) -> tuple[Path, float]:
    started = time.perf_counter()
    if not out.exists():
        plan_options = {k: overrides.pop(k) for k in ("overlap_kind",) if k in overrides}
        build_release(
            out,
            config=resolve_config(preset, **overrides),
            plan=BuildPlan.for_task(task, n, sites=2, **plan_options),
            source="phantom",
            seed=seed,
            test_release=True,
        )
    return out, time.perf_counter() - started


def _run(name: str, release_dir: Path, **params) -> tuple[object, float]:
    cls = resolve(name)
    attack = cls(cls.parse_params({k: str(v) for k, v in params.items()}))
    with open_release(release_dir) as release:
        submission = attack(release)
    return submission, submission.runtime_s


def link_depth(n: int, depths: list[int], kind: str) -> None:
    print(
        "| depth | preset equivalent | build s | gram-link s | R-precision (public / private) | AP | recall | chance |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for depth in depths:
        out, built = _build(
            Path(f"runs/link-d{depth}-{kind}-{n}"), "nc7", "link", n, 100 + depth, depth=depth, overlap_kind=kind
        )
        submission, seconds = _run("gram-link", out)
        with tempfile.TemporaryDirectory() as tmp:
            path = write_submission(Path(tmp) / "link.h5", submission)
            metrics = score_submission(path, out).metrics
        pub, priv = metrics[0], metrics[1]
        print(
            f"| {depth} | nc{3 + depth} | {built:.0f} | {seconds:.1f} | "
            f"{pub['link_r_precision']:.1%} / {priv['link_r_precision']:.1%} | "
            f"{(pub['link_average_precision'] + priv['link_average_precision']) / 2:.1%} | "
            f"{(pub['link_recall'] + priv['link_recall']) / 2:.1%} | {priv['chance']:.2%} |",
            flush=True,
        )


def insider(n: int, preset: str) -> None:
    out, built = _build(Path(f"runs/insider-{preset}-{n}"), preset, "reid", n, 7)
    site_key = out / "site0.h5"
    if not site_key.exists():
        with open_key(out) as key:
            write_site_key(key, 0, site_key)
    with open_release(out) as release, open_key(out) as key:
        truth, other = key.read("truth/plain_index"), release.sites == 1
    print(f"release: {preset}, 2 sites x {n}, built in {built:.0f} s")
    print("| plaintexts encoded with | time s | re-identified, site 1 (the other hospital) | site 0 | all |")
    print("|---|---|---|---|---|")
    for label, params in (
        ("self-sampled key, width 512 (default)", {}),
        ("site 0's real key, width 2048 (insider)", {"insider_key": str(site_key)}),
    ):
        submission, seconds = _run("gram-hungarian", out, **params)
        plain_index = {pid: j for j, pid in enumerate(submission.plain_ids)}
        hit = np.array([plain_index[m] for m in submission.mapping]) == truth
        print(
            f"| {label} | {seconds:.1f} | {hit[other].mean():.1%} | {hit[~other].mean():.1%} | {hit.mean():.1%} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    depth = sub.add_parser("link-depth")
    depth.add_argument("--n", type=int, default=100)
    depth.add_argument("--depths", default="0,1,2,4,8,16,44")
    depth.add_argument("--kind", choices=["image", "patient"], default="image")
    inside = sub.add_parser("insider")
    inside.add_argument("--n", type=int, default=250)
    inside.add_argument("--preset", default="nc7")
    args = parser.parse_args()
    print(machine_description(), flush=True)
    if args.command == "link-depth":
        link_depth(args.n, [int(d) for d in args.depths.split(",")], args.kind)
    else:
        insider(args.n, args.preset)


if __name__ == "__main__":
    main()
