"""The one progress-bar helper: click's bar on stderr, silent when output is not a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click


@contextlib.contextmanager
def progress(label: str, total: int) -> Iterator[callable]:
    """Yield ``advance(k)``; draws a bar on stderr for ``total`` units of work.

    Non-interactive runs (CI, pipes) get one line when the stage starts instead of a bar.
    """
    if not sys.stderr.isatty():
        click.echo(f"{label} ({total})", err=True)
        yield lambda k=1: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar.update
