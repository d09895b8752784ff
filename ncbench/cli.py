"""The ``ncbench`` command: mounts each package's click group; user mistakes become one line."""

from __future__ import annotations

import sys

import click

from challenge.errors import NcbenchError


class _Root(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NcbenchError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Root)
@click.version_option(package_name="neuracrypt-bench")
def main() -> None:
    """ncbench: reproducible NeuraCrypt challenges, attacks, scoring and leaderboard."""


def _mount() -> None:
    from challenge.cli import group as challenge_group

    main.add_command(challenge_group)
    for module, names in (("attacks.cli", ("group",)), ("leaderboard.cli", ("score", "group")),
                          ("baselines.cli", ("group",)), ("ncbench.demo", ("demo",))):
        try:
            imported = __import__(module, fromlist=list(names))
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
            continue
        for name in names:
            main.add_command(getattr(imported, name))


_mount()
