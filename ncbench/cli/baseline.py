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
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option(
    "--sites",
    default=1,
    show_default=True,
    type=int,
    help="Split the images into K sites (hospitals), each with its own key: compare per-site models, one model "
    "on the union of the sites' encodings and the union under one key (K >= 2; 1 = one site).",
)
@click.option("--db", default=None, help="Record the rows in this leaderboard database (path or URL).")
def utility(
    presets, raw, source, n_train, n_test, width, image_size, patch_size, epochs, seed, device, sites, db
) -> None:
    """Downstream AUC per label of a model trained on encodings vs on raw patches (labelled images)."""
    from ncbench.baselines.utility import run_utility
    from ncbench.challenge.encoders import pick_device
    from ncbench.errors import NcbenchError

    if patch_size is None:
        if image_size < 16 or image_size % 16:
            raise NcbenchError(f"--image-size {image_size} is not a multiple of 16; give --patch-size")
        patch_size = image_size // 16
    rows = run_utility(
        presets=list(dict.fromkeys(presets)),
        n_train=n_train,
        n_test=n_test,
        width=width,
        image_size=image_size,
        patch_size=patch_size,
        epochs=epochs,
        seed=seed,
        device=pick_device(device),
        raw=raw,
        source=source,
        sites=sites,
    )
    click.echo(utility_table(rows) if sites == 1 else sites_report(rows))
    click.echo(
        f"({n_train} train / {n_test} test images from {source}, {image_size} px, encoder width {width}, "
        f"{epochs} epochs" + (f"; {sites} sites, contiguous equal shares)" if sites > 1 else ")")
    )
    if db:
        from ncbench.leaderboard.store import record_utility

        written = record_utility(db, rows)
        click.echo(f"recorded {written} rows in {db}")


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
