"""The ``ncbench`` command: mounts each package's click group; user mistakes become one line."""

from __future__ import annotations

import sys

import click

from ncbench.errors import NcbenchError


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
    from ncbench.attacks.cli import group as attack_group
    from ncbench.baselines.cli import group as baseline_group
    from ncbench.challenge.cli import group as challenge_group
    from ncbench.demo import demo
    from ncbench.leaderboard.cli import group as leaderboard_group
    from ncbench.leaderboard.cli import score

    for command in (challenge_group, attack_group, score, leaderboard_group, baseline_group, demo):
        main.add_command(command)


_mount()
