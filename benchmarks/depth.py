"""Privacy and utility against encoder depth (results in benchmarks/RESULTS.md).

    python benchmarks/depth.py [all] [--depths=0,1,2,4,8,16,32,44] [--n=200] [--seed=11] [--runs=runs]
        [--carlini-depths=16,44] [--boost-depths=32,44] [--utility-seeds=0,1] [--threads=T]
        [--json=runs/depth.json] [--png=benchmarks/depth.png]
    python benchmarks/depth.py build   [--depths=...] [--n=200] [--seed=11] [--runs=runs]
    python benchmarks/depth.py attack  [--depths=...] [--attacks=gram-hungarian,carlini-2021] [--params=K=V,K=V]
    python benchmarks/depth.py utility [--depths=...] [--utility-seeds=0,1] [--no-raw]
    python benchmarks/depth.py transfer [--depths=...] [--n=400] [--transfer-seeds=7401,7402]
    python benchmarks/depth.py report  [--json=runs/depth.json] [--png=benchmarks/depth.png]
    python benchmarks/depth.py record  --db=PATH [--attacks=gram-hungarian]   (the board's depth page)
    python benchmarks/depth.py probe RELEASE_DIR [--self_width=512] [--rounds=2,4,8]

``all`` builds, runs gram-hungarian at every depth, carlini-2021 at ``--carlini-depths`` and
gram-hungarian with six boosting rounds at ``--boost-depths``, the utility at every depth and seed, then reports. Each step merges its results into the JSON (a
rerun of one attack with the same parameters, or of one utility model, replaces the old entry),
so steps can be run, interrupted and repeated one by one. ``transfer`` (not part of ``all``)
builds a transfer test release of ``n`` phantoms per depth and seed, runs distribution-alignment
on each in a fresh process and takes the challenge's nearest-neighbour accuracy over every
target (chance: one in the number of targets).

Every depth is the nc7 preset with its number of private blocks overridden (depth 0 is nc3,
4 is nc7, 44 is nc47), at full width (2048, 256 px, 16 px patches). One test release of ``n``
images per depth, all built from the same seed, so the images, the stem, the positional
embedding and the shuffles are the same at every depth and only the blocks differ. A release
already under ``runs/depth-d{D}-n{N}-s{SEED}`` is reused. Each attack runs in a fresh process
(``benchmarks/run.py attack``), so its peak RSS is its own; carlini-2021 only at the depths
named by ``--carlini-depths`` (it is the slower one). The utility is the CPU-sized baseline of
``baselines/utility.py`` (phantoms, 128 px, width 256) with the same depth override, once per
seed, and the raw reference once per seed.

``report`` prints a Markdown table with the machine and draws the PNG (needs the ``bench``
extra, matplotlib: ``pip install -e '.[bench]'``; without it the PNG is skipped with a note).
Chance re-identification is 1/n; chance AUC 0.5. ``record`` puts the sweep on a leaderboard
database: each release's attacks run again through ``ncbench attack run`` and are scored with
``ncbench score --builtin`` (organizer rows), so are the transfer runs' releases, and the JSON's
utility rows are recorded as they are.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from script_options import int_list, script_options

from ncbench.hardware import machine_description
from ncbench.leaderboard.metrics import paired_interval, t_interval

PRESET = "nc7"  # with the depth overridden; nc3, nc7 and nc47 differ from it in depth (and name) only
DEPTHS = (0, 1, 2, 4, 8, 16, 32, 44)
DEEP_BOOST = {"boost_rounds": "6"}  # what re-identifies nc47 (benchmarks/RESULTS.md); `all` runs it at --boost-depths
NAMED = {0: "nc3", 4: "nc7", 44: "nc47"}
RUN_PY = str(Path(__file__).with_name("run.py"))
# The second challenge against depth: one transfer release per depth and seed, its attack's accuracy.
TRANSFER_ATTACK = "distribution-alignment"
TRANSFER_N = 400
TRANSFER_SEEDS = (7401, 7402)


def release_dir(runs: str, depth: int, n: int, seed: int, task: str = "reid") -> Path:
    return Path(runs) / f"depth-{'' if task == 'reid' else task + '-'}d{depth}-n{n}-s{seed}"


def build(depth: int, *, n: int, seed: int, runs: str, task: str = "reid") -> dict:
    """The test release of ``task`` with ``n`` encodings at ``depth`` (reused when it exists): reid
    on sample images, transfer on phantoms (400 encodings and 400 auxiliary plaintexts by default;
    sample images are views of two radiographs, so their targets would be near-duplicates)."""
    from ncbench.challenge.encoders import resolve_config
    from ncbench.challenge.files import open_release
    from ncbench.challenge.release import BuildPlan, build_release

    out = release_dir(runs, depth, n, seed, task)
    preset = NAMED.get(depth, PRESET)  # a named preset's own name, so a store never files nc47 under nc7
    started = time.perf_counter()
    reused = out.exists()
    if not reused:
        build_release(
            out,
            config=resolve_config(preset, depth=depth),
            plan=BuildPlan.for_task(task, n),
            source="sample" if task == "reid" else "phantom",
            seed=seed,
            test_release=True,
        )
    with open_release(out) as release:
        config = json.loads(release.h5.attrs["encoder_config"])
    if (config["depth"], config["preset"]) != (depth, preset):
        raise SystemExit(f"{out} holds {config['preset']} at depth {config['depth']}, not {preset} at {depth}; move it")
    return {
        "release": str(out),
        "build_seconds": None if reused else round(time.perf_counter() - started, 1),
        "precision": config["precision"],
    }


def attack(release: str, name: str, params: dict[str, str] | None = None) -> dict:
    """One attack in a fresh process (``benchmarks/run.py attack``): its JSON line."""
    options = [f"--{key}={value}" for key, value in (params or {}).items()]
    done = subprocess.run(
        [sys.executable, RUN_PY, "attack", release, name, *options], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_attacks(depth: int, names: list[str], *, n: int, seed: int, runs: str, params: dict[str, str]) -> list[dict]:
    """Each attack on the release at ``depth``: reid accuracy, time, peak RSS, stage times."""
    release = str(release_dir(runs, depth, n, seed))
    found = []
    for name in names:
        result = attack(release, name, params)
        keep = ("reid_accuracy", "patch_position_accuracy", "seconds", "peak_rss_gb", "stage_seconds", "date")
        found.append({"depth": depth, "attack": name, "params": params, **{k: result.get(k) for k in keep}})
        print(json.dumps(found[-1]), flush=True)
    return found


def run_transfer(depth: int, seed: int, *, n: int, runs: str) -> dict:
    """The transfer release at ``depth`` built from ``seed`` (reused when it exists) and
    :data:`TRANSFER_ATTACK`'s nearest-neighbour accuracy on it over every target."""
    release = build(depth, n=n, seed=seed, runs=runs, task="transfer")
    result = attack(release["release"], TRANSFER_ATTACK)
    keep = ("nn_accuracy", "targets", "seconds", "peak_rss_gb", "date")
    found = {"depth": depth, "seed": seed, "n": n, **release, "attack": TRANSFER_ATTACK, "params": {}}
    found.update({k: result.get(k) for k in keep})
    print(json.dumps(found), flush=True)
    return found


def merge_transfer(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` without the entries a ``new`` one replaces (same depth, seed, n and attack)."""

    def run(row: dict) -> tuple:
        return row["depth"], row["seed"], row["n"], row["attack"]

    replaced = {run(row) for row in new}
    return [row for row in old if run(row) not in replaced] + new


def run_depth_utility(depth: int, seed: int) -> list[dict]:
    """Utility rows (baselines/utility.py, CPU-sized defaults) of the encoder at ``depth``, no raw."""
    from ncbench.baselines.utility import DEFAULTS, run_utility

    preset = NAMED.get(depth, PRESET)
    return run_utility(
        presets=[preset],
        depth=depth,
        patch_size=DEFAULTS["image_size"] // 16,
        seed=seed,
        device="cpu",
        raw=False,
        **DEFAULTS,
    )


def run_raw_utility(seed: int) -> list[dict]:
    """The raw reference's rows (plaintext patches) with the same images and seed."""
    from ncbench.baselines.utility import DEFAULTS, run_utility

    return run_utility(presets=[], patch_size=DEFAULTS["image_size"] // 16, seed=seed, device="cpu", **DEFAULTS)


def mean_auc(rows: list[dict]) -> float:
    return float(np.mean([row["auc"] for row in rows]))


# -- the results file ------------------------------------------------------------------------------


def load(path: str) -> dict:
    if Path(path).is_file():
        return json.loads(Path(path).read_text())
    return {"releases": {}, "attacks": [], "utility": []}


def save(path: str, results: dict) -> None:
    results["machine"] = machine_description()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1))


def merge_attacks(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` without the entries a ``new`` one replaces (same depth, attack and parameters)."""
    replaced = {(r["depth"], r["attack"], json.dumps(r["params"], sort_keys=True)) for r in new}
    kept = [r for r in old if (r["depth"], r["attack"], json.dumps(r["params"], sort_keys=True)) not in replaced]
    return kept + new


def merge_utility(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` without the rows of the models ``new`` replaces (same preset, kind and seed)."""

    def model(row: dict) -> tuple:
        return row["preset"], row["model_kind"], row["settings"]["seed"]

    replaced = {model(row) for row in new}
    return [row for row in old if model(row) not in replaced] + new


# -- the summary -----------------------------------------------------------------------------------


def summary(results: dict) -> list[dict]:
    """One row per depth: its preset name, the best reid of each attack (default parameters),
    the best over every parameter set tried, chance, and the utility (mean AUC over labels, then
    mean and 95% t-interval over seeds) of the encoded model and of the raw reference, and the
    paired difference encoded - raw over the seeds both were trained at."""
    raw_by_seed: dict[int, list[dict]] = {}
    encoded_by_depth: dict[int, dict[int, list[dict]]] = {}
    for row in results["utility"]:
        seed = row["settings"]["seed"]
        if row["model_kind"] == "raw":
            raw_by_seed.setdefault(seed, []).append(row)
        else:
            encoded_by_depth.setdefault(row["settings"]["depth"], {}).setdefault(seed, []).append(row)
    raw_by_seed_mean = {seed: mean_auc(rows) for seed, rows in raw_by_seed.items()}
    raw = list(raw_by_seed_mean.values())
    depths = sorted({int(d) for d in results["releases"]} | set(encoded_by_depth))
    table = []
    for depth in depths:
        attacks = [a for a in results["attacks"] if a["depth"] == depth and a.get("reid_accuracy") is not None]
        release = results["releases"].get(str(depth), {})
        encoded_by_seed = {seed: mean_auc(rows) for seed, rows in encoded_by_depth.get(depth, {}).items()}
        encoded = list(encoded_by_seed.values())
        row = {"depth": depth, "preset": NAMED.get(depth, f"{PRESET}-depth{depth}")}
        row["build_seconds"] = release.get("build_seconds")
        for name in sorted({a["attack"] for a in attacks}):
            default = [a["reid_accuracy"] for a in attacks if a["attack"] == name and not a["params"]]
            row[name] = max(default) if default else None
        row["best_reid_any"] = max((a["reid_accuracy"] for a in attacks), default=None)
        row["chance"] = 1 / release["n"] if release.get("n") else None
        # 95% t-intervals over seeds; the paired difference encoded - raw over the seeds both have.
        mean, low, high = t_interval(encoded)
        row["encoded_auc"] = mean if encoded else None
        row["encoded_auc_ci"] = None if math.isnan(low) else (low, high)
        row["utility_seeds"] = len(encoded)
        mean, low, high = t_interval(raw)
        row["raw_auc"] = mean if raw else None
        row["raw_auc_ci"] = None if math.isnan(low) else (low, high)
        paired = sorted(set(encoded_by_seed) & set(raw_by_seed_mean))
        mean, low, high = paired_interval(
            [encoded_by_seed[seed] for seed in paired], [raw_by_seed_mean[seed] for seed in paired]
        )
        row["vs_raw"] = mean if paired else None
        row["vs_raw_ci"] = None if math.isnan(low) else (low, high)
        row["paired_seeds"] = len(paired)
        table.append(row)
    return table


def raw_seeds(results: dict) -> set:
    return {row["settings"]["seed"] for row in results["utility"] if row["model_kind"] == "raw"}


def markdown(results: dict) -> str:
    rows = summary(results)
    attacks = sorted({a["attack"] for a in results["attacks"]})
    machine = results.get("machine", {})

    def pct(value) -> str:
        return "" if value is None else f"{100 * value:.1f}%"

    def num(value) -> str:
        return "" if value is None else f"{value:.3f}"

    header = [
        "depth",
        "preset",
        "build s",
        *attacks,
        "best (any params)",
        "chance",
        "encoded AUC (mean, 95% CI)",
        "raw AUC (mean, 95% CI)",
        "encoded - raw (paired, 95% CI)",
    ]
    lines = [
        f"machine: {json.dumps(machine)}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]

    def interval(mean, ci, seeds, signed=False) -> str:
        if mean is None:
            return ""
        form = "+.3f" if signed else ".3f"
        bounds = f" [{ci[0]:{form}}, {ci[1]:{form}}]" if ci else ""
        return f"{mean:{form}}{bounds} ({seeds} seed{'s' * (seeds > 1)})"

    for row in rows:
        cells = [
            str(row["depth"]),
            row["preset"],
            "" if row["build_seconds"] is None else f"{row['build_seconds']:.0f}",
            *(pct(row.get(name)) for name in attacks),
            pct(row["best_reid_any"]),
            pct(row["chance"]),
            interval(row["encoded_auc"], row["encoded_auc_ci"], row["utility_seeds"]),
            interval(row["raw_auc"], row["raw_auc_ci"], len(raw_seeds(results))),
            interval(row["vs_raw"], row["vs_raw_ci"], row["paired_seeds"], signed=True),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + transfer_markdown(results.get("transfer", [])))


def transfer_markdown(runs: list[dict]) -> list[str]:
    """Lines of the transfer table: per depth, each seed's nearest-neighbour accuracy and the mean."""
    if not runs:
        return []
    seeds = sorted({row["seed"] for row in runs})
    lines = [
        "",
        f"Transfer ({TRANSFER_ATTACK}, phantoms): nearest-neighbour accuracy over every target, per release seed",
        "",
        "| depth | preset | N | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean | chance | attack s |",
        "|" + "---|" * (len(seeds) + 6),
    ]
    for depth in sorted({row["depth"] for row in runs}):
        rows = [row for row in runs if row["depth"] == depth and row.get("nn_accuracy") is not None]
        by_seed = {row["seed"]: row["nn_accuracy"] for row in rows}
        mean = np.mean(list(by_seed.values())) if by_seed else None
        cells = [f"{100 * by_seed[seed]:.0f}%" if seed in by_seed else "" for seed in seeds]
        low, high = (f"{bound(r['seconds'] for r in rows):.0f}" if rows else "" for bound in (min, max))
        seconds = low if low == high else f"{low}-{high}"  # the range over seeds
        targets = max((row["targets"] for row in rows), default=0)
        n = ", ".join(str(v) for v in sorted({row["n"] for row in rows}))
        lines.append(
            f"| {depth} | {NAMED.get(depth, f'{PRESET}-depth{depth}')} | {n} | {' | '.join(cells)} | "
            f"{'' if mean is None else f'{100 * mean:.1f}%'} | {f'{100 / targets:.0f}%' if targets else ''} | {seconds} |"
        )
    return lines


def plot(results: dict, png: str) -> str | None:
    """Re-identification and utility AUC against depth, side by side; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = summary(results)
    depths = [row["depth"] for row in rows]
    # Depths 0 ... 44 are roughly geometric: evenly spaced ticks, each labelled with its depth.
    x = np.arange(len(depths))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in sorted({a["attack"] for a in results["attacks"]}):
        points = [(i, row[name]) for i, row in zip(x, rows) if row.get(name) is not None]
        if points:
            left.plot(*zip(*points), marker="o", label=name)
    points = [(i, row["best_reid_any"]) for i, row in zip(x, rows) if row["best_reid_any"] is not None]
    if points:
        left.plot(*zip(*points), linestyle=":", marker="x", color="black", label="best, any parameters")
    chance = [(i, row["chance"]) for i, row in zip(x, rows) if row["chance"]]
    if chance:
        left.plot(*zip(*chance), linestyle="--", color="grey", label="chance (1/N)")
    left.set(xlabel="private blocks (depth)", ylabel="re-identification (top-1)", ylim=(-0.02, 1.02))
    left.set_title(f"Re-identification, full width, N = {_n(results)}")
    points = [(i, row["encoded_auc"], row["encoded_auc_ci"]) for i, row in zip(x, rows) if row["encoded_auc"]]
    if points:
        xs, ys, cis = zip(*points)
        # Error bars: the 95% t-interval over seeds (none with one seed).
        errors = np.array([[y - ci[0], ci[1] - y] if ci else [0, 0] for y, ci in zip(ys, cis)]).T
        right.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label="model on encodings (95% CI)")
    raw = [row for row in rows if row["raw_auc"] is not None]
    if raw:
        right.axhline(raw[0]["raw_auc"], color="tab:green", label="raw reference (plaintext)")
        if raw[0]["raw_auc_ci"]:
            right.axhspan(*raw[0]["raw_auc_ci"], color="tab:green", alpha=0.15)
    right.axhline(0.5, color="grey", linestyle="--", label="chance")
    right.set(xlabel="private blocks (depth)", ylabel="mean AUC over findings", ylim=(0.4, 1.0))
    right.set_title("Utility (CPU-sized: 128 px, width 256)")
    for axis in (left, right):
        axis.set_xticks(x, [f"{d}\n{NAMED[d]}" if d in NAMED else str(d) for d in depths])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png


def probe(release_dir: str, *, self_width: int = 512, rounds: tuple[int, ...] = (2, 4, 8)) -> list[dict]:
    """Where gram-hungarian loses a deep release, and a start that does not need pairs.

    gram-hungarian's steps on a test release, each scored with the release's key: the alignment
    into a common slot order (consistency: the share of rows whose slot holds that slot's
    majority position), Gram matching with the true slot -> position permutation (what the
    statistics can do once that permutation is known), and a slot -> position permutation found
    from population statistics instead of from first-round pairs: each slot's norms over all
    encodings, sorted, correlated with each position's over the self-keyed plaintexts (the pool
    is the same set of images, so these distributions agree whatever the pairing), then
    graph-matched on the population's mean Gram matrices (``refine_slot_positions``), then
    ``rounds`` boosting rounds of the attack's own.
    """
    from ncbench.assignment import match
    from ncbench.attacks import pairing
    from ncbench.attacks.alignment import _column_correlation, refine_slot_positions
    from ncbench.attacks.plugins.registry import resolve
    from ncbench.attacks.self_keyed import self_encode
    from ncbench.attacks.statistics import gram_scores, patch_statistics
    from ncbench.challenge.files import open_key, open_release

    started = time.perf_counter()
    cls = resolve("gram-hungarian")
    attack = cls(cls.parse_params({}), device="cpu")
    with open_key(release_dir) as key:
        patch_perm = key.read("truth/patch_perm").astype(np.int64)
        truth = key.read("truth/plain_index")
    with open_release(release_dir) as release:
        depth = json.loads(release.h5.attrs["encoder_config"])["depth"]
        features, mean = self_encode(release.plain_images, release.config, width=self_width, seed=0, device="cpu")
        plain = patch_statistics(features, mean, len(truth))
        del features
        aligned = pairing.aligned_statistics(release, attack, chunk=32)
    encoded, slots = aligned.statistics, aligned.slots
    position_of_slot = np.empty_like(slots)  # (N, P): the true position each image put in slot s
    np.put_along_axis(position_of_slot, slots, patch_perm, axis=1)
    counts = np.stack([np.bincount(column, minlength=slots.shape[1]) for column in position_of_slot.T])
    true_slot_positions = counts.argmax(1)
    found = []

    def scored(method: str, slot_positions: np.ndarray, matched: np.ndarray | None = None) -> None:
        if matched is None:
            matched = match(gram_scores(encoded, plain, slot_positions))
        found.append(
            {
                "release": release_dir,
                "depth": depth,
                "self_width": self_width,
                "method": method,
                "slot_consistency": round(float(counts.max(1).sum() / slots.size), 4),
                "slot_positions_right": round(float(np.mean(slot_positions == true_slot_positions)), 4),
                "reid_accuracy": round(float(np.mean(matched == truth)), 4),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        print(json.dumps(found[-1]), flush=True)

    scored("true slot -> position permutation (oracle)", true_slot_positions)
    by_norms = match(_column_correlation(np.sort(encoded.norms, axis=0), np.sort(plain.norms, axis=0)))
    scored("population: sorted norms per slot", by_norms)
    by_gram = refine_slot_positions(encoded.mean_gram(), plain.mean_gram(), by_norms, rounds=20)
    scored("population: sorted norms, then mean-Gram graph matching", by_gram)
    first = gram_scores(encoded, plain, by_gram)
    for count in rounds:
        boosted = pairing.boost(encoded, plain, first, rounds=count, refine_pairs=256, rng=np.random.default_rng(0))
        scored(f"population start, then {count} boost rounds", boosted.slot_positions, boosted.matched)
    return found


def record(results: dict, db: str, names: list[str]) -> None:
    """Score each release's built-in attacks (default parameters) into ``db``, and the utility rows."""
    from ncbench.leaderboard.store import record_utility

    for depth, release in sorted(results["releases"].items(), key=lambda item: int(item[0])):
        for name in names:
            record_attack(release["release"], name, db)
            print(f"recorded {name} at depth {depth}", flush=True)
    for run in sorted(results.get("transfer", []), key=lambda row: (row["depth"], row["seed"])):
        record_attack(run["release"], run["attack"], db)
        print(f"recorded {run['attack']} on transfer at depth {run['depth']}, seed {run['seed']}", flush=True)
    print(f"recorded {record_utility(db, results['utility'])} utility rows", flush=True)


def record_attack(release: str, name: str, db: str) -> None:
    """``ncbench attack run`` on ``release``, then ``ncbench score --builtin`` into ``db``."""
    submission = Path(release) / f"depth-{name}.h5"
    ncbench = [sys.executable, "-c", "from ncbench.cli import main; main()"]
    run = ["attack", "run", name, "--release", release, "--out", str(submission), "--force"]
    subprocess.run([*ncbench, *run], check=True, capture_output=True)
    score = ["score", str(submission), "--key", release, "--db", db, "--builtin"]
    subprocess.run([*ncbench, *score], check=True, capture_output=True)


def _n(results: dict) -> str:
    ns = {release.get("n") for release in results["releases"].values()}
    return ", ".join(str(n) for n in sorted(n for n in ns if n))


def _int(options: dict[str, str], name: str, default: int) -> int:
    found = int_list(options.get(name, str(default)))
    if len(found) != 1:
        print(f"error: --{name} takes one whole number", file=sys.stderr)
        raise SystemExit(2)
    return found[0]


def main(argv: list[str]) -> None:
    command, *args = argv if argv[:1] and not argv[0].startswith("--") else ["all", *argv]
    options = script_options(args, __doc__)
    depths = int_list(options.get("depths", ",".join(map(str, DEPTHS))))
    n, seed, runs = _int(options, "n", 200), _int(options, "seed", 11), options.get("runs", "runs")
    path, png = options.get("json", "runs/depth.json"), options.get("png", "benchmarks/depth.png")
    if "threads" in options:
        # On a shared machine one thread per process wins: the utility model's small matrices make
        # a second thread spend its time waiting for the first (a raw model took over 15 min with
        # 2 threads at load 10, under 2 min with 1).
        import torch

        torch.set_num_threads(_int(options, "threads", 1))
    results = load(path)
    results.setdefault("load_average_at_start", []).append([command, round(os.getloadavg()[0], 2)])
    if command in ("build", "all"):
        for depth in depths:
            found = {"n": n, "seed": seed, **build(depth, n=n, seed=seed, runs=runs)}
            if found["build_seconds"] is None:  # reused: keep the time of the build that made it
                found["build_seconds"] = results["releases"].get(str(depth), {}).get("build_seconds")
            results["releases"][str(depth)] = found
            print(json.dumps({"depth": depth, **results["releases"][str(depth)]}), flush=True)
            save(path, results)
    if command in ("attack", "all"):
        params = dict(item.split("=", 1) for item in options.get("params", "").split(",") if item)
        carlini = int_list(options.get("carlini-depths", "16,44"))
        default = "gram-hungarian" if command == "all" else "gram-hungarian,carlini-2021"
        for depth in depths:
            names = [a for a in options.get("attacks", default).split(",") if a]
            if command == "all" and depth in carlini:
                names.append("carlini-2021")
            found = run_attacks(depth, names, n=n, seed=seed, runs=runs, params=params)
            if command == "all" and depth in int_list(options.get("boost-depths", "32,44")):
                found += run_attacks(depth, ["gram-hungarian"], n=n, seed=seed, runs=runs, params=DEEP_BOOST)
            results["attacks"] = merge_attacks(results["attacks"], found)
            save(path, results)
    if command in ("utility", "all"):
        for utility_seed in int_list(options.get("utility-seeds", "0,1")):
            if "no-raw" not in options:
                rows = run_raw_utility(utility_seed)
                print(json.dumps({"seed": utility_seed, "raw_auc": mean_auc(rows)}), flush=True)
                results["utility"] = merge_utility(results["utility"], rows)
                save(path, results)
            for depth in depths:
                rows = run_depth_utility(depth, utility_seed)
                print(json.dumps({"seed": utility_seed, "depth": depth, "encoded_auc": mean_auc(rows)}), flush=True)
                results["utility"] = merge_utility(results["utility"], rows)
                save(path, results)
    if command == "transfer":
        for transfer_seed in int_list(options.get("transfer-seeds", ",".join(map(str, TRANSFER_SEEDS)))):
            for depth in depths:
                found = run_transfer(depth, transfer_seed, n=_int(options, "n", TRANSFER_N), runs=runs)
                results["transfer"] = merge_transfer(results.get("transfer", []), [found])
                save(path, results)
    if command == "probe":
        release = [a for a in args if not a.startswith("--")][0]
        found = probe(
            release,
            self_width=_int(options, "self_width", 512),
            rounds=tuple(int_list(options.get("rounds", "2,4,8"))),
        )
        results.setdefault("probes", []).extend(found)
        save(path, results)
        return
    if command == "record":
        record(results, options["db"], options.get("attacks", "gram-hungarian").split(","))
        return
    if command not in ("build", "attack", "utility", "transfer", "all", "report"):
        raise SystemExit(f"unknown command {command!r}")
    save(path, results)
    print(markdown(results))
    drawn = plot(results, png)
    print(
        f"\nwrote {path}" + (f" and {drawn}" if drawn else " (no PNG: matplotlib missing, pip install -e '.[bench]')")
    )


if __name__ == "__main__":
    main(sys.argv[1:])
