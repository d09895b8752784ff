"""The ``ncbench`` command: mounts each package's click group; user mistakes become one line."""

from __future__ import annotations

import sys

import click

from ncbench.errors import NcbenchError


class _Root(click.Group):
    """Every user mistake, whether click finds it (a bad option) or our code does, ends in one
    line on stderr and exit code 2; click's usage block is for ``--help`` only."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as error:
            click.echo(error.ctx.get_help())  # a bare group asks for its help, not a mistake
            sys.exit(0)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx else "ncbench"
            click.echo(f"error: {error.format_message()} (see {command} --help)", err=True)
            sys.exit(2)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)

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
    from ncbench.cli.attack import group as attack_group
    from ncbench.cli.baseline import group as baseline_group
    from ncbench.cli.challenge import group as challenge_group
    from ncbench.cli.demo import demo
    from ncbench.cli.leaderboard import group as leaderboard_group
    from ncbench.cli.leaderboard import score
    from ncbench.leaderboard.server import client
    from ncbench.leaderboard.server.service import publish, server, team_group

    challenge_group.add_command(publish)  # organizer: hand a built challenge to the server
    for command in (
        challenge_group,
        attack_group,
        score,
        leaderboard_group,
        baseline_group,
        demo,
        server,
        team_group,
        client.challenges,
        client.fetch,
        client.submit,
        client.submissions,
    ):
        main.add_command(command)


_mount()
