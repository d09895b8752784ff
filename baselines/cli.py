"""``ncbench baseline ...``: reference points (chance, oracle) and the utility of encodings."""

from __future__ import annotations

import click


@click.group("baseline")
def group() -> None:
    """Reference points: `chance` and `oracle` run as attacks (`ncbench attack run chance ...`)."""
