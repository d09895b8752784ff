"""``ncbench baseline ...``: reference points (chance, oracle) and the utility of encodings."""

from __future__ import annotations

import math

import click

# Plain data only at import time: `ncbench baseline --help` loads no torch.
from ncbench.baselines.settings import DEFAULTS
from ncbench.challenge.config import PRESETS


@click.group("baseline")
def group() -> None:
    """Reference points: `chance` and `oracle` run as attacks (`ncbench attack run chance ...`)."""


@group.command("utility")
@click.option(
    "--preset",
    "presets",
    required=True,
    multiple=True,
    type=click.Choice(list(PRESETS)),
    help="Encoder preset whose encodings the downstream model learns from (repeatable).",
)
@click.option(
    "--raw/--no-raw", default=True, show_default=True, help="Also train the non-private reference on plaintext patches."
)
@click.option(
    "--source",
    default="phantom",
    show_default=True,
    help="Labelled images: phantom, folder:PATH[?labels=CSV] (CheXpert layout) or manifest:FILE.",
)
@click.option("--n-train", default=DEFAULTS["n_train"], show_default=True, type=int, help="Training images.")
@click.option("--n-test", default=DEFAULTS["n_test"], show_default=True, type=int, help="Held-out test images.")
@click.option("--width", default=DEFAULTS["width"], show_default=True, type=int, help="Encoder width D.")
@click.option("--image-size", default=DEFAULTS["image_size"], show_default=True, type=int, help="Image side in pixels.")
@click.option(
    "--patch-size",
    default=None,
    type=int,
    help="Patch side; default image_size/16, so P = 256 patches as at 256 px with 16 px patches.",
)
@click.option("--epochs", default=DEFAULTS["epochs"], show_default=True, type=int, help="Training epochs per model.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for images, key, shuffles, models.")
@click.option(
    "--seeds",
    default=1,
    show_default=True,
    type=int,
    help="Repeat every model with S seeds (--seed, --seed + 1, ...: new images, split, keys and training each) "
    "and report mean AUC with a 95% t-interval over seeds, and paired differences (encoded - raw; "
    "union - per-site) with theirs.",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option(
    "--sites",
    default=1,
    show_default=True,
    type=int,
    help="Split the images into K sites (hospitals), each with its own key: compare per-site models, one model "
    "on the union of the sites' encodings and the union under one key (K >= 2; 1 = one site).",
)
@click.option(
    "--one-key/--no-one-key",
    default=True,
    show_default=True,
    help="With --sites: also train the union under one key (the upper bound of collaboration).",
)
@click.option("--db", default=None, help="Record the rows in this leaderboard database (path or URL), seed by seed.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object: every seed's rows, and the intervals over seeds, instead of tables.",
)
def utility(
    presets,
    raw,
    source,
    n_train,
    n_test,
    width,
    image_size,
    patch_size,
    epochs,
    seed,
    seeds,
    device,
    sites,
    one_key,
    db,
    as_json,
) -> None:
    """Downstream AUC per label of a model trained on encodings vs on raw patches (labelled images)."""
    from ncbench.baselines.utility import run_utility
    from ncbench.challenge.encoders import pick_device
    from ncbench.errors import NcbenchError

    if patch_size is None:
        if image_size < 16 or image_size % 16:
            raise NcbenchError(f"--image-size {image_size} is not a multiple of 16; give --patch-size")
        patch_size = image_size // 16
    if seeds < 1:
        raise NcbenchError(f"--seeds must be a positive integer, got {seeds}")
    # Text goes to stderr with --json, so stdout holds the JSON object alone.
    say = (lambda text: click.echo(text, err=True)) if as_json else click.echo
    rows: list[dict] = []
    for run_seed in range(seed, seed + seeds):
        found = run_utility(
            presets=list(dict.fromkeys(presets)),
            n_train=n_train,
            n_test=n_test,
            width=width,
            image_size=image_size,
            patch_size=patch_size,
            epochs=epochs,
            seed=run_seed,
            device=pick_device(device),
            raw=raw,
            source=source,
            sites=sites,
            one_key=one_key,
        )
        rows += found
        if seeds > 1:
            say(f"seed {run_seed}:")
        if not as_json or seeds > 1:
            say(utility_table(found) if sites == 1 else sites_report(found))
        if db:  # seed by seed, so an interrupted run keeps the seeds it finished
            from ncbench.leaderboard.store import record_utility

            say(f"recorded {record_utility(db, found)} rows in {db}")
    described = (
        f"({n_train} train / {n_test} test images from {source}, {image_size} px, encoder width {width}, "
        f"{epochs} epochs" + (f"; {sites} sites, contiguous equal shares" if sites > 1 else "")
    )
    described += f"; seeds {seed}-{seed + seeds - 1})" if seeds > 1 else ")"
    intervals, by_sites = seed_intervals(rows)
    if as_json:
        import json

        click.echo(
            json.dumps(
                {
                    "seeds": list(range(seed, seed + seeds)),
                    "rows": [{**row, "auc": None if math.isnan(row["auc"]) else row["auc"]} for row in rows],
                    "intervals": _records(intervals),
                    "sites": _records(by_sites),
                },
                allow_nan=False,
                default=str,
            )
        )
        return
    if seeds > 1:
        click.echo(intervals_report(intervals, by_sites))
    click.echo(described)


def seed_intervals(rows: list[dict]):
    """(:func:`tables.utility_intervals`, :func:`tables.multi_site_intervals`) of one run's rows."""
    import pandas as pd

    from ncbench.leaderboard import tables

    frame = pd.DataFrame(rows).assign(created_utc="")  # one call: a seed is one run
    return tables.utility_intervals(frame), tables.multi_site_intervals(frame)


def _records(frame) -> list[dict]:
    """JSON-ready rows of a frame: NaN (no interval with one seed) becomes null."""
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in frame.to_dict("records")
    ]


def intervals_report(intervals, by_sites) -> str:
    """Mean AUC over labels with its 95% t-interval over seeds, per model; the paired
    difference against raw (single site) or union - per-site (several sites) with its interval."""
    from ncbench.leaderboard.tables import interval_text

    lines = []
    if not intervals.empty:
        lines.append(f"{'model':<16}{'seeds':>6}{'mean AUC':>10}  {'95% CI':<18}{'vs raw':>8}  95% CI (paired)")
        for row in intervals.itertuples():
            name = row.preset if row.model_kind == "encoded" else "raw"
            paired = (
                ""
                if math.isnan(row.vs_raw)
                else f"{row.vs_raw:>+8.3f}  " + interval_text(row.vs_raw_low, row.vs_raw_high, signed=True)
            )
            lines.append(
                f"{name:<16}{row.seeds:>6}{row.auc:>10.3f}  {interval_text(row.auc_low, row.auc_high):<18}{paired}"
            )
    for row in by_sites.to_dict("records"):
        lines.append(
            f"{row['preset']} on {row['sites']} sites ({row['images_per_site']} training images each), "
            f"{row['seeds']} seeds: per-site {row['site']:.3f} {interval_text(row['site_low'], row['site_high'])}, "
            f"union {row['union']:.3f} {interval_text(row['union_low'], row['union_high'])}; union - per-site "
            f"{row['union_gain']:+.3f} {interval_text(row['union_gain_low'], row['union_gain_high'], signed=True)}"
            + (
                ""
                if math.isnan(row["key_cost"])
                else f"; one key - union {row['key_cost']:+.3f} "
                + interval_text(row["key_cost_low"], row["key_cost_high"], signed=True)
            )
        )
    return "\n".join(lines)


def utility_table(rows: list[dict]) -> str:
    """AUC per label (rows) and model (columns), as the CLI prints it."""
    models = list(dict.fromkeys(row["preset"] for row in rows))
    labels = list(dict.fromkeys(row["label"] for row in rows))
    auc = {(row["label"], row["preset"]): row["auc"] for row in rows}
    width = max(len(m) for m in models + ["0.000"]) + 2
    lines = [f"{'AUC':<14}" + "".join(f"{m:>{width}}" for m in models)]
    lines += [f"{label:<14}" + "".join(f"{auc[label, m]:>{width}.3f}" for m in models) for label in labels]
    return "\n".join(lines)


def sites_report(rows: list[dict]) -> str:
    """A multi-site run as the CLI prints it: per preset, mean AUC of each model on each site's
    held-out images and per finding (means over sites), then one verdict line per preset."""
    import pandas as pd

    from ncbench.leaderboard.tables import multi_site_table

    frame = pd.DataFrame(rows)
    by_site, by_label = multi_site_table(frame), multi_site_table(frame, by="label")
    header = {"site": "per-site", "union": "union", "one-key": "one key", "raw": "raw"}
    lines, verdicts = [], []
    for preset, own in by_site.groupby("preset", sort=False):
        sites = len(own) - 1
        lines.append(
            f"{preset}: mean AUC over findings on each site's held-out images, then per finding over sites "
            "(per-site: each site's own model)"
        )
        labels = by_label[(by_label["preset"] == preset) & (by_label["label"] != "mean")]
        first = max(len(name) for name in [*labels["label"], "eval_site"]) + 2
        for table, by in ((own, "eval_site"), (labels, "label")):
            lines.append(f"{by:<{first}}" + "".join(f"{name:>10}" for name in header.values()))
            lines += [f"{row[by]:<{first}}" + "".join(_cell(row[t]) for t in header) for _, row in table.iterrows()]
        mean = own[own["eval_site"] == "mean"].iloc[0]
        each = own[own["eval_site"] != "mean"]
        # How many sites gain, beside the mean: a mean gain of a few thousandths is noise at CPU sizes.
        better = int((each["union"] > each["site"]).sum())
        verdicts.append(
            f"{preset}: collaboration across {sites} independent keys: union mean AUC {mean['union']:.3f} vs "
            f"per-site {mean['site']:.3f} ({mean['union'] - mean['site']:+.3f}; union better on {better} of "
            f"{sites} sites); one key: {mean['one-key']:.3f}"
        )
    return "\n".join(lines + verdicts)


def _cell(value: float) -> str:
    return f"{'-':>10}" if math.isnan(value) else f"{value:>10.3f}"
