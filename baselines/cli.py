"""``ncbench baseline ...``: reference points (chance, oracle) and the utility of encodings."""

from __future__ import annotations

import click

from challenge.encoders import PRESETS


@click.group("baseline")
def group() -> None:
    """Reference points: `chance` and `oracle` run as attacks (`ncbench attack run chance ...`)."""


@group.command("utility")
@click.option("--preset", required=True, type=click.Choice(list(PRESETS)),
              help="Encoder preset whose encodings the downstream model learns from.")
@click.option("--n-train", default=600, show_default=True, type=int, help="Training images.")
@click.option("--n-test", default=200, show_default=True, type=int, help="Held-out test images.")
@click.option("--width", default=256, show_default=True, type=int, help="Encoder width D.")
@click.option("--image-size", default=128, show_default=True, type=int, help="Image side in pixels.")
@click.option("--patch-size", default=None, type=int,
              help="Patch side; default image_size/16, so P = 256 patches as at 256 px with 16 px patches.")
@click.option("--epochs", default=8, show_default=True, type=int, help="Training epochs per model.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for images, key, shuffles, models.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--db", default=None, help="Record the rows in this leaderboard database (path or URL).")
def utility(preset, n_train, n_test, width, image_size, patch_size, epochs, seed, device, db) -> None:
    """Downstream AUC per label of a model trained on encodings vs on raw patches (phantom images)."""
    from baselines.utility import run_utility
    from challenge.encoders import pick_device
    from challenge.errors import NcbenchError

    if patch_size is None:
        if image_size < 16 or image_size % 16:
            raise NcbenchError(f"--image-size {image_size} is not a multiple of 16; give --patch-size")
        patch_size = image_size // 16
    rows = run_utility(preset=preset, n_train=n_train, n_test=n_test, width=width, image_size=image_size,
                       patch_size=patch_size, epochs=epochs, seed=seed, device=pick_device(device))
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        table.setdefault(row["label"], {})[row["model_kind"]] = row["auc"]
    click.echo(f"utility AUC, preset {preset} ({n_train} train / {n_test} test phantom images, "
               f"{epochs} epochs)")
    click.echo(f"{'label':<16} {'encoded':>8} {'raw':>8}")
    for label, aucs in table.items():
        click.echo(f"{label:<16} {aucs.get('encoded', float('nan')):>8.3f} {aucs.get('raw', float('nan')):>8.3f}")
    if db:
        from leaderboard.store import record_utility

        written = record_utility(db, rows)
        click.echo(f"recorded {written} rows in {db}")
