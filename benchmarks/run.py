"""Benchmarks with recorded results (see benchmarks/RESULTS.md). Never timing assertions in tests.

    python benchmarks/run.py encode [--n=256] [--device=cpu|cuda] [--precision=auto|fp32|bf16] [--preset=nc7]
    python benchmarks/run.py attack RELEASE_DIR [ATTACK] [--device=cpu] [--PARAM=VALUE ...]
    python benchmarks/run.py compare RELEASE_DIR [ATTACK ...]   (default: carlini-2021 gram-hungarian)
    python benchmarks/run.py build-memory [--preset=nc3] [--sizes=256,1024,2048]
    python benchmarks/run.py scale RELEASE_DIR [--sizes=250,500,1000,2000,5000,10000]
    python benchmarks/run.py boost RELEASE_DIR
    python benchmarks/run.py final RELEASE_DIR
    python benchmarks/run.py relayout RELEASE_DIR OUT [--blocks=512]   (0: one encoding per chunk)
    python benchmarks/run.py read RELEASE_DIR ... [--channels=512] [--cold=yes]

``final`` computes gram-hungarian's statistics and boosted slot order of a test release once,
then times its final matching both ways on them: a dense assignment on the full (N, M) scores
(bf16 where native, each row's 8 best recomputed in fp32), and the sparse assignment on each
row's 8 candidates without the (N, M) matrix.

``boost`` computes gram-hungarian's statistics of a test release once, then times its boosting
against a reference-style boosting on them in the same run: every round an exact fp32 comparison
of all N x M pairs (what gram-hungarian did before sampled rounds), with the same rounds rule.

``relayout`` copies a release with its encodings in another layout (blocks of 512 channels, or
one whole encoding per chunk); ``read`` then times reading the first channels of every encoding of
each release given, one after the other in the same run, the page cache dropped first with
``--cold=yes``.

``scale`` attacks the first N encodings of one large test release (with the N plaintexts they
hold), each N in a fresh process, with gram-hungarian's defaults: time, peak RSS, accuracy.

``encode`` times the encoder of a preset (nc7 by default) against a reference-style implementation
(torch.nn Conv2d / BatchNorm2d modules, fp32, one randperm and one gather per image in a Python
loop) with the same weights, in the same run, and reports how far apart their encodings of the
first batch are when given the same permutations.

Every result carries ``machine``: CPU model, torch's CPU capability, whether bf16 is native here,
threads (and the GPU), so a number is never read without the hardware that made it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np
import torch
from script_options import int_list, script_options

from ncbench.errors import NcbenchError
from ncbench.hardware import machine_description


def encode(n: int = 256, device: str = "cpu", precision: str = "auto", preset: str = "nc7") -> dict:
    from ncbench.challenge.encoders import (
        Encoder,
        resolve_config,
        sample_key,
        sample_permutations,
    )

    sys.path.insert(0, "tests")
    from test_encoders import ReferenceNeuraCrypt

    config = resolve_config(preset, precision=precision, bn_batch=min(256, n))
    key = sample_key(config, 0)
    images = np.random.default_rng(0).integers(0, 256, (n, 256, 256), dtype=np.uint8)
    perms = sample_permutations(config, 0, n)
    fast = Encoder(config, key, device)

    def timed(fn):
        fn(images[: config.bn_batch])  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = fn(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - started

    def run_fast(batch):
        return [
            fast.encode_batch(
                torch.from_numpy(batch[s : s + config.bn_batch]),
                torch.from_numpy(perms[s : s + config.bn_batch].astype(np.int64)),
            ).cpu()
            for s in range(0, len(batch), config.bn_batch)
        ]

    reference = ReferenceNeuraCrypt(config).to(device)
    reference.load_key({k: v.to(device) for k, v in key.items()})

    @torch.no_grad()
    def run_reference(batch):
        outputs = []
        for s in range(0, len(batch), config.bn_batch):
            chunk = torch.from_numpy(batch[s : s + config.bn_batch]).to(device)
            chunk_perms = [torch.randperm(config.n_patches) for _ in range(len(chunk))]
            outputs.append(reference(chunk, chunk_perms).cpu())
        return outputs

    fast_out, fast_s = timed(run_fast)
    _, ref_s = timed(run_reference)
    with torch.no_grad():
        first = torch.from_numpy(images[: config.bn_batch]).to(device)
        same_perms = [torch.from_numpy(p.astype(np.int64)) for p in perms[: config.bn_batch]]
        reference_first = reference(first, same_perms).cpu()
    max_abs_diff = float((reference_first - fast_out[0]).abs().max())
    return {
        "benchmark": f"encode {preset}",
        "n": n,
        "device": device,
        "precision": fast.config.precision,
        "machine": machine_description(device),
        "ncbench_images_per_s": round(n / fast_s, 1),
        "reference_images_per_s": round(n / ref_s, 1),
        "speedup": round(ref_s / fast_s, 2),
        "max_abs_diff_vs_reference": max_abs_diff,
    }


def attack(release_dir: str, name: str = "gram-hungarian", device: str = "cpu", **params: str) -> dict:
    """Run one attack on a release; time, peak RSS, stage times, and (when the release directory
    holds its key, as a test release does) re-identification and patch-position accuracy, or a
    transfer release's nearest-neighbour accuracy, or a link release's R-precision and recall per half.
    ``params``: the attack's parameters as text (``--self_width=256``)."""
    from ncbench.attacks.plugins.registry import resolve
    from ncbench.challenge.files import open_release

    cls = resolve(name)
    with open_release(release_dir) as release:
        started = time.perf_counter()
        submission = cls(cls.parse_params(params), device=device)(release)
        elapsed = time.perf_counter() - started
        n, encoded_ids = release.n_encoded, release.encoded_ids
        plain_ids = release.plain_ids if submission.mapping is not None else []
        target_ids = release.target_ids if submission.encodings is not None else []
    return {
        "benchmark": f"attack {name}",
        "release": release_dir,
        "n": n,
        "params": params,
        "seconds": round(elapsed, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        **_accuracy(release_dir, submission, encoded_ids, plain_ids, target_ids),
        "stage_seconds": submission.diagnostics.get("stage_seconds"),
        "diagnostics": {k: v for k, v in submission.diagnostics.items() if k != "stage_seconds"},
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(device),
    }


def _accuracy(
    release_dir: str, submission, encoded_ids: list[str], plain_ids: list[str], target_ids: list[str]
) -> dict:
    """reid accuracy and patch-position accuracy over all rows, or a transfer answer's
    nearest-neighbour accuracy, read from the release's own key."""
    from pathlib import Path

    from ncbench.challenge.files import open_key

    key_path = Path(release_dir) / "private" / "key.h5"
    if key_path.is_file() and submission.encodings is not None:
        return _transfer_accuracy(key_path, submission, target_ids)
    if key_path.is_file() and submission.link_left is not None:
        return _link_accuracy(release_dir, submission)
    if not key_path.is_file() or submission.mapping is None:
        return {}
    column = {pid: j for j, pid in enumerate(plain_ids)}
    row_of = {eid: r for r, eid in enumerate(encoded_ids)}
    row = np.array([row_of[eid] for eid in submission.encoded_ids])  # release row of each answer
    with open_key(key_path) as key:
        truth = key.read("truth/plain_index")[row]
        perm = key.read("truth/patch_perm")[row]
    predicted = np.array([column[pid] for pid in submission.mapping])
    found = {
        "reid_accuracy": round(float(np.mean(predicted == truth)), 4),
        "reid_wrong": int(np.sum(predicted != truth)),
    }
    if submission.patch_positions is not None:
        found["patch_position_accuracy"] = round(float(np.mean(submission.patch_positions == perm)), 4)
    return found


def _link_accuracy(release_dir: str, submission) -> dict:
    """A link answer's R-precision and recall on the public and private halves, as the scorer
    gives them from the release's own key."""
    import tempfile
    from pathlib import Path

    from ncbench.attacks.submission import write_submission
    from ncbench.leaderboard.scoring import score_submission

    with tempfile.TemporaryDirectory() as scratch:
        answer = write_submission(Path(scratch) / "answer.h5", submission)
        metrics = score_submission(answer, release_dir).metrics
    return {
        f"link_{name}_{half}": round(float(metrics[split][f"link_{name}"]), 4)
        for name in ("r_precision", "recall")
        for split, half in ((0, "public"), (1, "private"))
    }


def _transfer_accuracy(key_path, submission, target_ids: list[str]) -> dict:
    """The challenge's nearest-neighbour accuracy over every predicted target (both halves), the
    candidates being all targets' true encodings (release order), read from the key."""
    from ncbench.challenge.files import open_key
    from ncbench.leaderboard.metrics import transfer_nearest_predictions

    with open_key(key_path) as key:
        true_encodings = key.read("truth/target_encodings")
    nearest = transfer_nearest_predictions(submission.encodings, true_encodings)
    row_of = {tid: r for r, tid in enumerate(target_ids)}
    right = np.array([row_of[tid] for tid in submission.target_ids])
    return {"nn_accuracy": round(float(np.mean(nearest == right)), 4), "targets": len(right)}


def compare(release_dir: str, *names: str) -> dict:
    """Each attack on one release in its own fresh process (so peak RSS is its own), one after
    the other; accuracy, time and each one's time relative to the last."""
    import subprocess

    names = names or ("carlini-2021", "gram-hungarian")
    runs = []
    for name in names:
        done = subprocess.run(
            [sys.executable, __file__, "attack", release_dir, name], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    baseline = runs[-1]["seconds"]
    return {
        "benchmark": "compare",
        "release": release_dir,
        "n": runs[0]["n"],
        "date": time.strftime("%Y-%m-%d"),
        "machine": runs[0]["machine"],
        "attacks": [
            {
                key: run.get(key)
                for key in (
                    "benchmark",
                    "seconds",
                    "peak_rss_gb",
                    "reid_accuracy",
                    "reid_wrong",
                    "patch_position_accuracy",
                    "stage_seconds",
                )
            }
            | {"time_ratio": round(run["seconds"] / max(baseline, 1e-9), 2)}
            for run in runs
        ],
    }


def build_memory(preset: str = "nc3", sizes: str = "256,1024,2048") -> dict:
    """Peak RSS of ``ncbench challenge build`` at several N, each in a fresh process (streaming check)."""
    import os
    import subprocess
    import tempfile

    rows = []
    for n in int_list(sizes):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            build = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from ncbench.cli import main; main()",
                    "challenge",
                    "build",
                    "--preset",
                    preset,
                    "--task",
                    "reid",
                    "--source",
                    "sample",
                    "--n",
                    str(n),
                    "--seed",
                    "1",
                    "--test-release",
                    "--device",
                    "cpu",
                    "--out",
                    f"{tmp}/r",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _, status, usage = os.wait4(build.pid, 0)  # this child's own rusage (ru_maxrss in KB)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"build at N={n} failed")
            rows.append(
                {
                    "n": n,
                    "seconds": round(time.perf_counter() - started, 1),
                    "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2),
                }
            )
    return {"benchmark": f"build memory {preset}", "machine": machine_description(), "builds": rows}


def subset(release_dir: str, n: int, out: str) -> str:
    """Write the first ``n`` encodings of a test release, with their own plaintexts as the pool
    (in the source's pool order) and the truth the attack is scored with, as a release directory.
    Encodings keep the source's BatchNorm batches (consecutive rows), so they are what a release
    of n images encodes, but for the last batch when n is not a multiple of ``bn_batch``."""
    from pathlib import Path

    import h5py

    from ncbench.challenge.files import KEY_FORMAT, RELEASE_FORMAT, SCHEMA_VERSION, open_key, open_release
    from ncbench.challenge.release import RowView, write_selected_rows
    from ncbench.h5io import set_root_attrs, write_dataset

    out_dir = Path(out)
    (out_dir / "public").mkdir(parents=True, exist_ok=True)
    (out_dir / "private").mkdir(exist_ok=True)
    with open_release(release_dir) as release, open_key(release_dir) as key:
        plain_index = key.read("truth/plain_index")[:n]
        pool = np.sort(plain_index)  # the pool rows these encodings hold, in the source's order
        attrs = {k: v for k, v in release.h5.attrs.items() if k not in ("format", "schema_version", "ncbench_version")}
        with h5py.File(out_dir / "public/release.h5", "w") as h5:
            set_root_attrs(h5, RELEASE_FORMAT, SCHEMA_VERSION, **{**attrs, "n_encoded": np.int64(n)})
            write_dataset(h5, "encoded/ids", release.encoded_ids[:n])
            write_dataset(h5, "encoded/labels", release.labels[:n])
            # Through the row-parallel reader and writer: h5py's own indexed read of scattered
            # plaintexts takes ten times as long (3.3 s per 1,000 of a 100,000-image release).
            encoded = RowView(release.encoded, np.arange(n))
            columns = release.encoded.chunks[-1]  # the source's blocks of channels
            write_selected_rows(h5.require_group("encoded"), "data", encoded, np.arange(n), columns=columns)
            plain = RowView(release.h5["plain/images"], pool)
            write_selected_rows(h5.require_group("plain"), "images", plain, np.arange(len(pool)))
            plain_ids = release.plain_ids  # read once: the property reads the whole dataset
            write_dataset(h5, "plain/ids", [plain_ids[j] for j in pool])
        with h5py.File(out_dir / "private/key.h5", "w") as h5:
            set_root_attrs(h5, KEY_FORMAT, SCHEMA_VERSION, challenge_id=release.challenge_id, task="reid")
            write_dataset(h5, "truth/plain_index", np.searchsorted(pool, plain_index).astype(np.int32))
            write_dataset(h5, "truth/patch_perm", key.read("truth/patch_perm")[:n])
    return str(out_dir)


def relayout(release_dir: str, out: str, blocks: str = "512") -> str:
    """Copy a release directory to ``out`` with its encodings chunked in ``blocks`` channels (0:
    one whole encoding per chunk, as releases were stored before blocks), every other dataset,
    attribute and the key as they are: the same values in another layout, for timing readers.
    The copy's sha256 differs from the one its key records."""
    import shutil
    from pathlib import Path

    import h5py

    from ncbench.challenge.files import open_release
    from ncbench.challenge.release import RowView, write_selected_rows

    source, out_dir = Path(release_dir), Path(out)
    if out_dir.exists():
        raise NcbenchError(f"{out_dir}: already exists; relayout writes a new release directory")
    shutil.copytree(source / "private", out_dir / "private")
    (out_dir / "public").mkdir()
    with open_release(source) as release, h5py.File(out_dir / "public/release.h5", "w") as h5:
        for key, value in release.h5.attrs.items():
            h5.attrs[key] = value
        for name in release.h5:
            if name != "encoded":
                release.h5.copy(release.h5[name], h5, name)
        group = h5.create_group("encoded")
        for name in release.h5["encoded"]:
            if name != "data":
                release.h5.copy(release.h5[f"encoded/{name}"], group, name)
        n = release.n_encoded
        encoded = RowView(release.encoded, np.arange(n))
        write_selected_rows(group, "data", encoded, np.arange(n), columns=int(blocks) or None)
    return str(out_dir)


def read(*release_dirs: str, channels: str = "512", cold: str = "no") -> dict:
    """Time reading the first ``channels`` channels of every encoding of each release, as the
    attacks' alignment pass reads them (64 encodings at a time, as stored), one release after the
    other in this process; ``cold=yes`` drops the page cache before each (root only)."""
    from pathlib import Path

    from ncbench.challenge.files import open_release

    rows = []
    for release_dir in release_dirs:
        if cold == "yes":
            os.sync()
            try:
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            except OSError:
                raise NcbenchError("--cold=yes drops the page cache, which only root may do") from None
        with open_release(release_dir) as release:
            started, n = time.perf_counter(), 0
            for _, block in release.iter_encoded(64, dtype=None, channels=int(channels)):
                n += len(block)
            seconds = time.perf_counter() - started
            rows.append(
                {
                    "release": release_dir,
                    "chunks": list(release.encoded.chunks),
                    "encodings": n,
                    "seconds": round(seconds, 2),
                    "encodings_per_s": round(n / seconds),
                }
            )
    return {
        "benchmark": f"read {channels} channels",
        "cold": cold == "yes",
        "machine": machine_description(),
        "rows": rows,
    }


def scale(release_dir: str, sizes: str = "250,500,1000,2000,5000,10000") -> dict:
    import shutil
    import subprocess
    import tempfile

    from ncbench.challenge.files import open_release

    rows = []
    with tempfile.TemporaryDirectory(dir=".") as folder:
        with open_release(release_dir) as release:
            n_full = release.n_encoded
        sizes_n = int_list(sizes)
        if not all(0 < n <= n_full for n in sizes_n):
            raise NcbenchError(f"--sizes must lie between 1 and the release's {n_full} encodings, got {sizes}")
        for n in sizes_n:
            if n < n_full:
                _check_room(release_dir, n / n_full, folder)
            sub = release_dir if n == n_full else subset(release_dir, n, f"{folder}/n{n}")
            done = subprocess.run([sys.executable, __file__, "attack", sub], capture_output=True, text=True, check=True)
            found = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({k: found.get(k) for k in ("n", "seconds", "peak_rss_gb", "reid_accuracy", "stage_seconds")})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if sub != release_dir:
                shutil.rmtree(sub)  # a subset of 5,000 is 5 GB
    return {"benchmark": "scale gram-hungarian", "release": release_dir, "machine": machine_description(), "runs": rows}


def _check_room(release_dir: str, fraction: float, folder: str) -> None:
    """Refuse, in one line, a subset of ``fraction`` of a release that the disk under ``folder``
    cannot hold: h5py that meets a full disk midway can end the process in a segmentation fault."""
    import shutil

    from ncbench.challenge.files import release_file

    need = int(release_file(release_dir).stat().st_size * fraction * 1.1)  # the key too
    free = shutil.disk_usage(folder).free
    if need > free:
        raise NcbenchError(
            f"a subset of {fraction:.0%} of the release needs about {need:,} bytes here, {free:,} are free"
        )


def _gram_statistics(release_dir: str, **options):
    """gram-hungarian (default parameters, ``options`` for the attack) on ``release_dir``: the
    attack, the true plaintext index of each encoding, and the encoded and plaintext statistics."""
    from ncbench.attacks import pairing
    from ncbench.attacks.plugins.registry import resolve
    from ncbench.attacks.self_keyed import self_encode
    from ncbench.attacks.statistics import patch_statistics
    from ncbench.challenge.files import open_key, open_release

    cls = resolve("gram-hungarian")
    attack_ = cls(cls.Params(), **options)
    with open_release(release_dir) as release, open_key(release_dir) as key:
        truth = key.read("truth/plain_index")
        self_width, channels = pairing.statistics_widths(
            release.config, self_width=attack_.params.self_width, channels=attack_.params.channels
        )
        features, mean = self_encode(release.plain_images, release.config, width=self_width, seed=0)
        plain = patch_statistics(features, mean, len(release.plain_images))
        del features
        encoded = pairing.aligned_statistics(release, attack_, chunk=attack_.params.chunk, channels=channels).statistics
    return attack_, truth, encoded, plain


def boost(release_dir: str) -> dict:
    """gram-hungarian's boosting against the reference-style one (see the module docstring) on
    the same statistics: time and re-identification of each."""
    from ncbench.assignment import match
    from ncbench.attacks import pairing
    from ncbench.attacks.statistics import gram_scores, sorted_norm_scores

    attack_, truth, encoded, plain = _gram_statistics(release_dir)
    first = sorted_norm_scores(encoded, plain)

    def reference_boost(rng: np.random.Generator) -> np.ndarray:
        scores, history = first, []
        for _ in range(pairing.BOOST_ROUNDS):
            rows, partners = pairing.trusted_pairs(scores)
            slot_positions = pairing._slot_positions(encoded, plain, rows, partners, rng, pairing.REFINE_PAIRS)
            scores = gram_scores(encoded, plain, slot_positions)
            history.append(len(pairing.mutual_best(scores)[0]) / len(scores))
            if len(history) >= 2 and history[-1] - history[-2] < pairing.CONVERGED:
                break
        return match(scores)

    def ncbench_boost(rng: np.random.Generator) -> np.ndarray:
        return pairing.boost(
            encoded, plain, first, rounds=pairing.BOOST_ROUNDS, refine_pairs=pairing.REFINE_PAIRS, rng=rng
        ).matched

    runs = {}
    for name, fn in (("ncbench", ncbench_boost), ("reference", reference_boost)):
        started = time.perf_counter()
        matched = fn(np.random.default_rng(0))
        runs[name] = {
            "seconds": round(time.perf_counter() - started, 1),
            "reid_accuracy": float(np.mean(matched == truth)),
        }
    return {
        "benchmark": "boost gram-hungarian",
        "release": release_dir,
        "n": len(truth),
        **runs,
        "speedup": round(runs["reference"]["seconds"] / runs["ncbench"]["seconds"], 2),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
    }


def final(release_dir: str) -> dict:
    """gram-hungarian's final matching, dense against sparse, on the same statistics and slot order."""
    from ncbench.assignment import match, match_shortlists
    from ncbench.attacks import pairing
    from ncbench.attacks.statistics import (
        GramComparison,
        sorted_norm_mutual_best,
        sorted_norm_scores,
    )

    attack_, truth, encoded, plain = _gram_statistics(release_dir, device="cpu")
    # The attack's own first round and boosting (the rounds' rule depends on N, as in the attack).
    large = len(truth) > pairing.ASSIGN_MAX
    boosted = pairing.boost(
        encoded,
        plain,
        None if large else sorted_norm_scores(encoded, plain),
        first_pairs=sorted_norm_mutual_best(encoded, plain) if large else None,
        rounds=pairing.BOOST_ROUNDS,
        refine_pairs=pairing.REFINE_PAIRS,
        rng=attack_.rng("refine"),
        scores_max=0,
    )
    slot_positions = boosted.slot_positions
    runs = {}
    for name in ("dense", "sparse"):
        comparison = GramComparison(encoded, plain)
        started = time.perf_counter()
        shortlist = comparison.shortlist(slot_positions, keep_scores=name == "dense")
        compared = time.perf_counter() - started
        if name == "dense":
            matched = match(shortlist.scores)
        else:
            matched = match_shortlists(shortlist.columns, shortlist.values, len(plain.gram))
        runs[name] = {
            "compare_seconds": round(compared, 1),
            "assign_seconds": round(time.perf_counter() - started - compared, 2),
            "reid_accuracy": float(np.mean(matched == truth)),
            "unplaced": int(np.sum(matched < 0)),
            "scores_gb": round(shortlist.scores.nbytes / 1e9, 2) if shortlist.scores is not None else 0,
        }
        del shortlist
    return {
        "benchmark": "final matching gram-hungarian",
        "release": release_dir,
        "n": len(truth),
        "boost_mutual_fraction": boosted.mutual_fraction,
        **runs,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
    }


def main(argv: list[str]) -> dict:
    options = script_options(argv, __doc__)
    command, *args = argv or ["encode"]
    positional = [a for a in args if not a.startswith("--")]
    if command == "encode":
        result = encode(
            int(options.get("n", 256)),
            options.get("device", "cpu"),
            options.get("precision", "auto"),
            options.get("preset", "nc7"),
        )
    elif command == "compare":
        result = compare(*positional)
    elif command == "scale":
        result = scale(*positional, **options)
    elif command == "boost":
        result = boost(*positional)
    elif command == "final":
        result = final(*positional)
    elif command == "relayout":
        result = {"relayout": relayout(*positional, **options)}
    elif command == "read":
        result = read(*positional, **options)
    elif command == "build-memory":
        result = build_memory(options.get("preset", "nc3"), options.get("sizes", "256,1024,2048"))
    else:
        result = attack(*positional, **options)
    return result


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    try:
        print(json.dumps(main(sys.argv[1:])))
    except NcbenchError as error:  # a missing or damaged release: one line, as the CLI says it
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
