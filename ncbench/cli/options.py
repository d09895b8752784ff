"""Option blocks that several commands share: one definition each, so their help reads the same."""

from __future__ import annotations

from pathlib import Path

import click

DB_HELP = "Results database: an SQLite path or an SQLAlchemy URL [default: STORE/leaderboard.db]."


def store_option(*, required: bool):
    return click.option(
        "--store",
        "store_dir",
        type=click.Path(path_type=Path),
        required=required,
        help="The server's store folder (published files, keys, uploads; created if missing).",
    )


db_option = click.option("--db", default=None, help=DB_HELP)


def sandbox_options(command):
    """--sandbox-limit and --unsandboxed: how each verified run is confined."""
    command = click.option(
        "--unsandboxed",
        is_flag=True,
        help="Organizers testing locally only: run plugins without bubblewrap (results marked unsandboxed).",
    )(command)
    return click.option(
        "--sandbox-limit",
        "sandbox_limits",
        multiple=True,
        metavar="NAME=VALUE",
        help="Verified track: a limit of each sandboxed run (repeatable): memory_bytes, cpu_s, wall_s, "
        "processes, file_bytes, scratch_bytes, output_bytes, threads; sizes take k/M/G.",
    )(command)


def eval_source_option(*, default: str | None, help: str):
    return click.option("--eval-source", default=default, show_default=default is not None, help=help)


def releases_option(flag: str, *, help: str):
    """K, the fresh hidden evaluation releases of each verified run."""
    return click.option(flag, "releases", type=click.IntRange(1, 100), default=3, show_default=True, help=help)
