"""``ncbench server``, ``ncbench challenge publish`` and ``ncbench team``: the organizer's live challenge."""

from __future__ import annotations

import datetime as dt
import functools
import json
from pathlib import Path

import click

from ncbench.cli.options import db_option, eval_source_option, releases_option, sandbox_options, store_option
from ncbench.errors import NcbenchError
from ncbench.leaderboard.rules import MAX_DAILY_LIMIT


@click.command("server")
@store_option(required=True)
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address of the API and the board.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="API port.")
@click.option(
    "--board-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port of the Streamlit board [default: API port + 1; 0: no board].",
)
@click.option(
    "--scheduler", default=None, help="Dask scheduler address (tcp://HOST:8786) [default: in-process cluster]."
)
@click.option(
    "--score-workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Answer files scored at once by the in-process cluster (each in a limited child process).",
)
@click.option(
    "--sandbox-workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Verified runs at once on the in-process cluster, apart from the scoring workers.",
)
@click.option(
    "--max-upload-mb",
    type=click.IntRange(1, 1 << 20),
    default=1024,
    show_default=True,
    help="Largest submission accepted.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(0.5, 600),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's headers (slow clients are closed).",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(0.5, 3600),
    default=30.0,
    show_default=True,
    help="Seconds without a byte of a request's body before the connection is closed.",
)
@click.option(
    "--idle-timeout",
    type=click.IntRange(1, 600),
    default=5,
    show_default=True,
    help="Seconds an idle keep-alive connection stays open.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(8, 100_000),
    default=1000,
    show_default=True,
    help="Open connections at most; more are closed as soon as they are accepted.",
)
@releases_option("--verified-releases", help="Verified track: fresh hidden evaluation releases per plugin run (K).")
@eval_source_option(
    default="phantom",
    help="Verified track: held-out images of evaluation releases, for challenges published without "
    "their own --eval-source (phantom, folder:PATH, manifest:FILE).",
)
@sandbox_options
@click.option(
    "--check-sandbox",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=lambda context, _, value: _check_sandbox(context) if value else None,
    help="Print which protections this host gives the verified track's sandboxes, then exit "
    "(status 2 when a promised one is missing).",
)
def server(
    store_dir: Path,
    db: str | None,
    host: str,
    port: int,
    board_port: int | None,
    scheduler: str | None,
    score_workers: int,
    sandbox_workers: int,
    max_upload_mb: int,
    header_timeout: float,
    body_timeout: float,
    idle_timeout: int,
    max_connections: int,
    releases: int,
    eval_source: str,
    sandbox_limits: tuple[str, ...],
    unsandboxed: bool,
) -> None:
    """Run the challenge server: HTTP API, scoring workers and the public board (Ctrl-C stops all)."""
    from ncbench.leaderboard.server import connections, service
    from ncbench.leaderboard.verified import runs as verified
    from ncbench.leaderboard.verified import sandbox

    settings = verified.Settings(
        releases=releases,
        eval_source=eval_source,
        limits=sandbox.parse_limits(sandbox_limits),
        unsandboxed=unsandboxed,
    )
    store_root = service.store_dir(store_dir)
    service.serve(
        service.db_url(db, store_root),
        store_root,
        host=host,
        port=port,
        board_port=port + 1 if board_port is None else board_port,
        scheduler=scheduler,
        score_workers=score_workers,
        sandbox_workers=sandbox_workers,
        max_upload=max_upload_mb << 20,
        settings=settings,
        limits=connections.ConnectionLimits(
            header_timeout_s=header_timeout,
            body_timeout_s=body_timeout,
            idle_timeout_s=idle_timeout,
            max_connections=max_connections,
        ),
    )


def _check_sandbox(context: click.Context) -> None:
    """``--check-sandbox``: one line per protection, then exit; status 2 (one error line) when a
    promised one is missing, since the verified track then refuses to run."""
    from ncbench.leaderboard.verified import sandbox

    missing = []
    for protection in sandbox.protections():
        mark = "yes" if protection.present else "NO "
        kind = "promised" if protection.promised else "extra"
        click.echo(f"{mark} {kind:8} {protection.name}: {protection.how}")
        if protection.promised and not protection.present:
            missing.append(protection.name)
    if missing:
        click.echo(f"error: the verified track refuses to run here: missing {', '.join(missing)}", err=True)
        context.exit(2)
    context.exit(0)


@click.command("publish")
@click.argument("release_dir", type=click.Path(path_type=Path))
@store_option(required=True)
@db_option
@click.option(
    "--daily-limit",
    type=click.IntRange(max=MAX_DAILY_LIMIT),
    default=None,
    help="Submissions per team and UTC day (refused ones do not count) [default: 5].",
)
@click.option("--deadline", default=None, help="Last moment for submissions, UTC (YYYY-MM-DDTHH:MM).")
@eval_source_option(
    default=None,
    help="Verified track: the held-out images evaluation releases are drawn from (phantom, folder:PATH, "
    "manifest:FILE) [default: the server's --eval-source]. Keep them out of the public release.",
)
@click.option(
    "--plugin-daily-limit",
    type=click.IntRange(max=MAX_DAILY_LIMIT),
    default=None,
    help="Verified track: plugin runs per team and UTC day [default: 2].",
)
@click.option(
    "--blind",
    is_flag=True,
    help="Hide the public-half scores too, from the board, the API and exports, until the challenge "
    "is closed (a final phase).",
)
@click.option(
    "--republish",
    is_flag=True,
    help="The challenge is already published: copy its files again and replace its daily limit, "
    "deadline and --blind with the values given (the defaults when none is given).",
)
def publish(
    release_dir: Path,
    store_dir: Path,
    db: str | None,
    daily_limit: int | None,
    deadline: str | None,
    eval_source: str | None,
    plugin_daily_limit: int | None,
    blind: bool,
    republish: bool,
) -> None:
    """Register a built challenge with the server: its public files become downloadable; its
    key goes to the store, which no route serves."""
    from ncbench.leaderboard import workqueue
    from ncbench.leaderboard.server import channel, service
    from ncbench.leaderboard.store import DEFAULT_DAILY_LIMIT, Store
    from ncbench.leaderboard.verified import runs as verified

    verified.evaluation_values(eval_source=eval_source, plugin_daily_limit=plugin_daily_limit)  # refuse first
    kind, _, where = (eval_source or "").partition(":")
    if kind in ("folder", "manifest") and not Path(where).expanduser().is_absolute():
        # The server reads it later from its own working folder, wherever that is.
        raise NcbenchError(f"--eval-source {kind}:PATH needs an absolute path, got {where!r}")
    when = None
    if deadline:
        try:
            when = dt.datetime.fromisoformat(deadline).replace(tzinfo=dt.UTC)
        except ValueError:
            raise NcbenchError(f"--deadline must look like 2026-12-31T23:59, got {deadline!r}") from None
    store_root = service.store_dir(store_dir)
    with Store(service.db_url(db, store_root)) as store:
        challenge_id = channel.publish(
            store,
            workqueue.StoreLayout(store_root),
            release_dir,
            daily_limit=DEFAULT_DAILY_LIMIT if daily_limit is None else daily_limit,
            deadline=when,
            republish=republish,
            blind=blind,
        )
        verified.set_evaluation(store, challenge_id, eval_source=eval_source, plugin_daily_limit=plugin_daily_limit)
    click.echo(f"published {challenge_id}{' (blind: scores hidden until the close)' if blind else ''}")


@click.group("team")
def team_group() -> None:
    """Organizer tools: teams and their tokens for the challenge server."""


def _on_team_store(name: str):
    """A ``team`` subcommand that takes the store by --store or --db and hands the command the
    open store, the server's channel and the store folder (None when only --db was given)."""

    def wrap(function):
        @team_group.command(name, help=function.__doc__)
        @store_option(required=False)
        @db_option
        @functools.wraps(function)
        def command(store_dir: Path | None, db: str | None, **kwargs) -> None:
            from ncbench.leaderboard.server import channel, service
            from ncbench.leaderboard.store import Store, database_url

            if store_dir is None and db is None:
                raise NcbenchError("give --db or --store")
            store_root = service.store_dir(store_dir) if store_dir else None
            url = service.db_url(db, store_root) if store_root else database_url(db)
            with Store(url) as store:
                function(store, channel, store_root, **kwargs)

        return command

    return wrap


@click.argument("name")
@_on_team_store("add")
def team_add(store, channel, store_root: Path | None, name: str) -> None:
    """Create team NAME (or reuse it) and print a new token, once: only its hash is kept."""
    if store_root is None:
        raise NcbenchError("team add needs --store: the server's token secret lives there")
    from ncbench.leaderboard import workqueue

    name, token = channel.add_team(store, name, key=channel.token_key(workqueue.StoreLayout(store_root)))
    click.echo(f"team {name}: token (shown once; give it to the team)", err=True)
    click.echo(token)


@click.option("--json", "as_json", is_flag=True, help="One JSON list of the teams.")
@_on_team_store("list")
def team_list(store, channel, store_root: Path | None, as_json: bool) -> None:
    """Every team, when it was created and how many active tokens it has."""
    if as_json:
        click.echo(json.dumps([dict(row) for row in channel.list_teams(store)], indent=2, default=str))
        return
    for row in channel.list_teams(store):
        click.echo(f"{row['name']}\tcreated {row['created_utc']}\tactive tokens {row['active_tokens']}")


@click.argument("name")
@_on_team_store("revoke")
def team_revoke(store, channel, store_root: Path | None, name: str) -> None:
    """Revoke every token of team NAME (its results stay on the board)."""
    click.echo(f"revoked {channel.revoke_team(store, name)} token(s) of {name}")
