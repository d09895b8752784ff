"""Inversion against depth: ``linear-inversion`` on ``invert`` releases (results in benchmarks/RESULTS.md).

    python benchmarks/inversion.py RELEASE_DIR [RELEASE_DIR ...] [--params=K=V,K=V]

Runs ``linear-inversion`` on each release (built with ``ncbench challenge build --task invert``)
and scores it with the release's key: one Markdown row per release with the preset, N, the known
pairs K, the ridge used, the patch-position accuracy, PSNR, SSIM and re-identification by nearest reconstruction
(both halves together: the mean over scored rows), and the attack's time.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ncbench.attacks.plugins.registry import resolve
from ncbench.attacks.submission import write_submission
from ncbench.challenge.files import open_release
from ncbench.hardware import machine_description
from ncbench.leaderboard.scoring import score_submission


def mean_over_halves(metrics: dict, name: str) -> float:
    """A metric's mean over every scored row of both halves (each half weighted by its size)."""
    halves = [m for m in metrics.values() if name in m]
    return sum(m[name] * m["n"] for m in halves) / sum(m["n"] for m in halves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("releases", nargs="+", type=Path)
    parser.add_argument("--params", default="", help="linear-inversion parameters, K=V,K=V")
    args = parser.parse_args()
    raw = dict(item.split("=", 1) for item in args.params.split(",") if item)
    cls = resolve("linear-inversion")
    print(f"machine: {machine_description()}; linear-inversion {raw or 'defaults'}")
    print("| preset | N | known pairs | ridge | patch positions | PSNR dB | SSIM | re-identified | chance | attack s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for release_dir in args.releases:
        attack = cls(cls.parse_params(raw))
        with open_release(release_dir) as release:
            submission = attack(release)
            preset, n, known = release.config.preset, release.n_encoded, len(release.pair_encoded_ids)
        with tempfile.TemporaryDirectory() as tmp:
            metrics = score_submission(write_submission(Path(tmp) / "inv.h5", submission), release_dir).metrics
        print(
            f"| {preset} | {n} | {known} | {submission.diagnostics['ridge']:g} | {mean_over_halves(metrics, 'patch_position_accuracy'):.2%} | "
            f"{mean_over_halves(metrics, 'psnr'):.2f} | {mean_over_halves(metrics, 'ssim'):.3f} | "
            f"{mean_over_halves(metrics, 'reid_accuracy'):.2%} | {metrics[0]['chance']:.2%} | "
            f"{submission.runtime_s:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
