"""Encoder throughput and gram-hungarian times on a GPU, beside the same runs on the CPU.

    python benchmarks/gpu.py --out gpu.json [--device=auto] [--sizes=1000,10000] [--cpu-max=1000]

For each precision (fp32, bf16) it times the nc7 encoder on random images (``--encode-n`` on the
device, ``--cpu-encode-n`` on the CPU; CPU bf16 only where it is native, as emulated bf16 is
about 64x slower). For each N of ``--sizes`` it builds a nc7 ``reid`` test release on the device
(key from ``--seed``; images from ``--source``: ``sample`` where pydicom-data is installed,
else ``phantom``), attacks it with gram-hungarian's defaults on the device, and on the
CPU as well while N <= ``--cpu-max``; accuracy is read from the release's own key. A size whose
release would not fit on the disk (2 MiB per image at full size: N = 100,000 is 105 GB) is
skipped with a note. It prints a table and writes everything, with the CPU model and the GPU
name, as JSON to ``--out``. ``--width``, ``--image-size``, ``--patch-size`` and ``--bn-batch``
shrink the encoder (the test runs every code path on the CPU at a tiny size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from ncbench.hardware import fast_bf16, machine_description, pick_device


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def encode_throughput(config, *, device: str, n: int, seed: int = 0) -> dict:
    """Images per second of the encoder of ``config`` (precision resolved already) on ``n`` random
    images, after one warm-up batch."""
    from ncbench.challenge.encoders import Encoder

    encoder = Encoder.from_seed(config, seed, device)
    images = np.random.default_rng(seed).integers(0, 256, (n, config.image_size, config.image_size), dtype=np.uint8)
    batch = torch.from_numpy(images[: config.bn_batch])
    encoder.encode_batch(batch, None)
    _synchronize(device)
    started = time.perf_counter()
    for start in range(0, n, config.bn_batch):
        encoder.encode_batch(torch.from_numpy(images[start : start + config.bn_batch]), None)
    _synchronize(device)
    seconds = time.perf_counter() - started
    return {"device": device, "precision": config.precision, "n": n, "images_per_s": round(n / seconds, 1)}


def attack_release(path: Path, *, device: str) -> dict:
    """gram-hungarian's defaults on the release at ``path``: time, accuracy from its key, stages."""
    from ncbench.attacks.gram_hungarian import GramHungarian
    from ncbench.challenge.files import open_key, open_release

    with open_release(path) as release:
        _synchronize(device)
        started = time.perf_counter()
        submission = GramHungarian(device=device)(release)
        _synchronize(device)
        seconds = time.perf_counter() - started
        column = {pid: j for j, pid in enumerate(release.plain_ids)}
        predicted = np.array([column[pid] for pid in submission.mapping])
    with open_key(path) as key:
        truth = key.read("truth/plain_index")
        positions = key.read("truth/patch_perm")
    return {
        "device": device,
        "seconds": round(seconds, 2),
        "reid_accuracy": round(float(np.mean(predicted == truth)), 4),
        "patch_position_accuracy": round(float(np.mean(submission.patch_positions == positions)), 4),
        "stage_seconds": submission.diagnostics["stage_seconds"],
    }


def release_bytes(config, n: int) -> int:
    """Disk space a reid release of ``n`` images takes, about: encodings and plaintexts."""
    encoded = n * config.n_patches * config.width * np.dtype(config.dtype).itemsize
    return encoded + n * config.image_size**2


def run(args: argparse.Namespace) -> dict:
    from ncbench.challenge.encoders import resolve_config
    from ncbench.challenge.release import BuildPlan, build_release

    device = pick_device(args.device)
    shape = dict(width=args.width, image_size=args.image_size, patch_size=args.patch_size, bn_batch=args.bn_batch)
    result: dict = {
        "benchmark": "gpu",
        "date": time.strftime("%Y-%m-%d"),
        "device": device,
        "machine": machine_description(device),
        "config": shape,
        "encode": [],
        "attack": [],
        "skipped": [],
    }
    for precision in ("fp32", "bf16"):
        config = resolve_config("nc7", precision=precision, **shape)
        for where, n in ((device, args.encode_n), ("cpu", args.cpu_encode_n)):
            if (
                where == "cpu"
                and device == "cpu"
                and result["encode"]
                and result["encode"][-1]["precision"] == precision
            ):
                continue  # the device is the CPU: measured already
            if precision == "bf16" and not fast_bf16(where):
                result["skipped"].append(f"encode bf16 on {where}: bf16 is not native there")
                continue
            result["encode"].append(_guarded(encode_throughput, config, device=where, n=n))
            _progress(result["encode"][-1])
    config = resolve_config("nc7", precision="auto", **shape)
    source = args.source if args.source != "auto" else "sample" if _has_sample_images() else "phantom"
    result["source"] = source
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.gettempdir())
    for n in (int(size) for size in args.sizes.split(",")):
        free = shutil.disk_usage(scratch).free
        if release_bytes(config, n) > 0.8 * free:
            result["skipped"].append(
                f"N={n}: its release needs about {release_bytes(config, n) / 1e9:.0f} GB, {free / 1e9:.0f} GB free"
            )
            continue
        with tempfile.TemporaryDirectory(dir=scratch) as folder:
            path = Path(folder) / f"nc7-{n}"
            started = time.perf_counter()
            built = _guarded(
                build_release,
                path,
                config=config,
                plan=BuildPlan.for_task("reid", n),
                source=source,
                seed=args.seed,
                test_release=True,
                device=device,
            )
            if isinstance(built, dict):  # the build failed: nothing to attack
                result["skipped"].append(f"N={n}: build failed: {built['error']}")
                continue
            build_s = round(time.perf_counter() - started, 1)
            for where in dict.fromkeys((device, "cpu")):
                if where == "cpu" and n > args.cpu_max:
                    continue
                found = _guarded(attack_release, path, device=where)
                row = {"n": n, "device": where, "build_seconds_on_device": build_s, **found}
                result["attack"].append(row)
                _progress(row)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _has_sample_images() -> bool:
    """Whether the ``sample`` source loads here (it needs pydicom and pydicom-data's files)."""
    from ncbench.challenge.sources import load_images

    try:
        load_images("sample", n=1, seed=0, image_size=64)
    except Exception:  # noqa: BLE001 - any failure means: use the phantoms
        return False
    return True


def _guarded(step, *args, **kwargs):
    """``step``'s result, or {"error": one line} when it raises: a first run on new hardware
    keeps every other measurement."""
    try:
        return step(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - recorded, then the next measurement runs
        traceback.print_exc()
        return {"device": kwargs.get("device", ""), "error": f"{type(error).__name__}: {error}"}


def _progress(row: dict) -> None:
    print(json.dumps({k: v for k, v in row.items() if k != "stage_seconds"}), file=sys.stderr, flush=True)


def table(result: dict) -> str:
    """The human summary of :func:`run`'s result."""
    machine = result["machine"]
    lines = [
        f"CPU: {machine['cpu']} ({machine['threads']} threads, torch {machine['torch']})",
        f"GPU: {machine.get('gpu', 'none')}",
        f"encoder nc7 {result['config']}; releases from source {result.get('source')}",
        "",
        "| encode | device | precision | images/s |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| n={row['n']} | {row['device']} | {row['precision']} | {row['images_per_s']} |" for row in result["encode"]
    ]
    lines += [
        "",
        "| gram-hungarian N | device | attack s | re-identified | positions | build s (device) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["attack"]:
        if "error" in row:
            lines.append(
                f"| {row['n']} | {row['device']} | failed: {row['error']} | | | {row['build_seconds_on_device']} |"
            )
            continue
        lines.append(
            f"| {row['n']} | {row['device']} | {row['seconds']} | {row['reid_accuracy']:.2%} "
            f"| {row['patch_position_accuracy']:.2%} | {row['build_seconds_on_device']} |"
        )
    lines += [f"skipped: {note}" for note in result["skipped"]]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when present)")
    parser.add_argument("--sizes", default="1000,10000", help="release sizes N to attack")
    parser.add_argument("--cpu-max", type=int, default=1000, help="largest N also attacked on the CPU")
    parser.add_argument("--encode-n", type=int, default=4096, help="images encoded per precision on the device")
    parser.add_argument("--cpu-encode-n", type=int, default=256, help="images encoded per precision on the CPU")
    parser.add_argument("--seed", default="6e6362656e63682d6770752d32303236", help="the releases' seed (hex)")
    parser.add_argument(
        "--source",
        default="auto",
        help="image source of the releases: sample, phantom, or auto (sample when installed)",
    )
    parser.add_argument("--scratch", default="", help="folder for the releases (default: the temp folder)")
    defaults = resolve_config_defaults()
    for name in ("width", "image_size", "patch_size", "bn_batch"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name])
    return parser.parse_args(argv)


def resolve_config_defaults() -> dict:
    from ncbench.challenge.encoders import resolve_config

    return dataclasses.asdict(resolve_config("nc7"))


def main(argv: list[str] | None = None) -> dict:
    result = run(parse(argv))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
