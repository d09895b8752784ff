"""The ``ncbench`` command: the composition root, the one layer that may import every room.

Each command's module is loaded when the command runs (``COMMANDS``); a user mistake anywhere
becomes one line and exit status 2."""

from __future__ import annotations

import sys

import click

from ncbench.errors import NcbenchError, disk_full


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
        except click.Abort as error:
            if isinstance(error.__context__, KeyboardInterrupt):  # Ctrl-C while click parsed or prompted
                click.echo("interrupted", err=True)
                sys.exit(130)
            click.echo("aborted", err=True)
            sys.exit(1)
        except KeyboardInterrupt:  # Ctrl-C outside a command (while a command's module loads)
            click.echo("interrupted", err=True)
            sys.exit(130)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NcbenchError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (OSError, RuntimeError) as error:
            if not disk_full(error):
                raise
            where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
            click.echo(f"error: no space left on the device{where}", err=True)
            sys.exit(2)
        except ModuleNotFoundError as error:  # an organizer's command in the attacker's plain install
            extra = _extra_for(error, ctx.invoked_subcommand)
            if extra is None:
                raise
            click.echo(f"error: {_needs(extra, error)}", err=True)
            sys.exit(2)


# Each command's module is imported when that command runs, not before: `ncbench --help` stays
# fast, and a command whose optional dependencies are missing names the extra to install
# instead of breaking every other command. (name, module, attribute, short help, extra)
COMMANDS = (
    (
        "challenge",
        "ncbench.cli.challenge",
        "group",
        "Organizer tools: build, verify and publish challenge releases.",
        None,
    ),
    ("attack", "ncbench.cli.attack", "group", "Attacker tools: list attacks, run one, check a plugin.", None),
    ("score", "ncbench.cli.leaderboard", "score", "Score a submission against its key; record it.", "board"),
    ("leaderboard", "ncbench.cli.leaderboard", "group", "The public leaderboard: serve, export, close.", "board"),
    ("baseline", "ncbench.cli.baseline", "group", "Reference measurements: utility of encoded training.", "board"),
    ("demo", "ncbench.cli.demo", "demo", "Build, attack, score and show a whole challenge locally.", "all"),
    ("server", "ncbench.cli.server", "server", "Run the challenge server: API, workers and board.", "server"),
    ("team", "ncbench.cli.server", "team_group", "Organizer tools: teams and their tokens.", "server"),
    ("challenges", "ncbench.leaderboard.server.client", "challenges", "List the server's open challenges.", None),
    ("fetch", "ncbench.leaderboard.server.client", "fetch", "Download a challenge's public files.", None),
    (
        "submit",
        "ncbench.leaderboard.server.client",
        "submit",
        "Upload a submission or a plugin; wait for its score.",
        None,
    ),
    ("submissions", "ncbench.leaderboard.server.client", "submissions", "Your team's submissions and runs.", None),
    ("status", "ncbench.leaderboard.server.client", "status", "One submission or run: state and score (--wait).", None),
    ("login", "ncbench.leaderboard.server.client", "login", "Save the server and your team token.", None),
    ("whoami", "ncbench.leaderboard.server.client", "whoami", "Your team, and submissions left today.", None),
)
# Distributions of each extra, as imported (pyproject.toml's optional-dependencies).
EXTRA_MODULES = {
    "board": ("streamlit", "sqlalchemy"),
    "server": ("fastapi", "uvicorn", "distributed", "streamlit", "sqlalchemy"),
}
EXTRA_MODULES["all"] = EXTRA_MODULES["board"] + EXTRA_MODULES["server"]


class _Lazy(_Root):
    """The root group: mounts each command from :data:`COMMANDS` on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, *_ in COMMANDS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        for command_name, module, attribute, *_ in COMMANDS:
            if command_name == name:
                try:
                    return _load(module, attribute)
                except ModuleNotFoundError as error:
                    if _extra_for(error, name) is None:
                        raise
                    raise NcbenchError(_needs(_extra_for(error, name), error)) from None
        return None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, _, _, short, _ in COMMANDS])


def _load(module: str, attribute: str) -> click.Command:
    import importlib

    command = getattr(importlib.import_module(module), attribute)
    if module == "ncbench.cli.challenge":  # the organizer hands a built challenge to the server
        from ncbench.cli.server import publish

        command.add_command(publish)
    return command


def _extra_for(error: ModuleNotFoundError, command: str | None) -> str | None:
    """The extra that installs the module ``error`` misses: the command's own where it has one."""
    missing = (error.name or "").partition(".")[0]
    declared = next((extra for name, *_, extra in COMMANDS if name == command), None)
    if declared is not None and missing in EXTRA_MODULES[declared]:
        return declared
    return next((name for name, modules in EXTRA_MODULES.items() if missing in modules), None)


def _needs(extra: str, error: ModuleNotFoundError) -> str:
    missing = (error.name or "").partition(".")[0]
    return (
        f"this command needs the '{extra}' extra ({missing} is not installed): pip install 'neuracrypt-bench[{extra}]'"
    )


@click.group(cls=_Lazy)
@click.version_option(package_name="neuracrypt-bench")
def main() -> None:
    """ncbench: reproducible NeuraCrypt challenges, attacks, scoring and leaderboard."""
