"""``ncbench score`` and ``ncbench leaderboard serve|export|close|verify-builtins``.

Thin shell over :mod:`leaderboard.scoring`, :mod:`leaderboard.store` and :mod:`leaderboard.tables`.
A submission is scored completely before anything is written, so invalid input never changes the
database; the daily limit is checked (reading only) before scoring starts.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from ncbench.cli.options import db_option, eval_source_option, releases_option, sandbox_options, store_option
from ncbench.errors import NcbenchError

# Plain data only at import time: `ncbench leaderboard --help` loads no pandas, SQLAlchemy or
# torch; each command imports what it runs.
from ncbench.leaderboard.rules import BUILTIN_TEAM, DEFAULT_DAILY_LIMIT, MAX_DAILY_LIMIT, ORIGIN_ORGANIZER, ORIGIN_SELF

DB_HELP = "Results database: an SQLite file path, or an SQLAlchemy URL (postgresql+psycopg://...)."
SHOWN_METRICS = (
    "top1_accuracy",
    "top5_accuracy",
    "mrr",
    "tpr_at_0.1pct_fpr",
    "tpr_at_1pct_fpr",
    "patch_position_accuracy",
    "psnr",
    "ssim",
    "one_to_one",
)


@click.command("score")
@click.argument("submission", type=click.Path(path_type=Path))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(path_type=Path),
    help="The challenge's private key.h5 (or its release directory).",
)
@click.option("--db", required=True, help=DB_HELP)
@click.option("--team", help="Team the submission is recorded for (required unless --builtin).")
@click.option(
    "--release",
    "release_path",
    type=click.Path(path_type=Path),
    help="Public release.h5 [default: <dir>/public/release.h5 beside <dir>/private/key.h5].",
)
@click.option(
    "--daily-limit",
    type=click.IntRange(max=MAX_DAILY_LIMIT),
    default=DEFAULT_DAILY_LIMIT,
    show_default=True,
    help="Scored submissions allowed per team, challenge and UTC day (failed ones do not count).",
)
@click.option(
    "--builtin",
    is_flag=True,
    help=f"Organizer only: SUBMISSION is your own run of a built-in attack. It is recorded as verified "
    f"by the organizer, under team {BUILTIN_TEAM!r}, without a daily limit; only such rows make "
    f"the attack x preset matrix.",
)
def score(
    submission: Path,
    key_path: Path,
    db: str,
    team: str | None,
    release_path: Path | None,
    daily_limit: int,
    builtin: bool,
) -> None:
    """Validate SUBMISSION against the hidden key, score it and record it; print the public half.

    A team's file is recorded as self-reported: its attack name, parameters and declared
    knowledge are its own claims, shown under the team's name. The private half's scores are
    stored but stay hidden until `ncbench leaderboard close`.
    """
    from ncbench.leaderboard.metrics import privacy_band
    from ncbench.leaderboard.scoring import score_submission
    from ncbench.leaderboard.store import (
        Store,
        check_origin,
        check_team_name,
        database_url,
        describe_db,
        ladder_step,
        submission_values,
    )
    from ncbench.leaderboard.tables import shown_attack

    url = database_url(db)
    if builtin:
        if team is not None and check_team_name(team) != BUILTIN_TEAM:
            raise NcbenchError(f"--builtin records under team {BUILTIN_TEAM!r}; leave out --team {team!r}")
        team, origin, limit = BUILTIN_TEAM, ORIGIN_ORGANIZER, None
    else:
        if team is None:
            raise NcbenchError("--team is required (organizers recording their own built-in run: --builtin)")
        team, origin, limit = check_team_name(team), ORIGIN_SELF, daily_limit
        check_origin(origin, team=team, attack=None)
    if daily_limit < 1:
        raise NcbenchError(f"--daily-limit must be at least 1, got {daily_limit}")
    _check_admission(url, submission, key_path, release_path, team, limit)
    try:
        result = score_submission(submission, key_path, release_path)
    except NcbenchError:
        raise
    except Exception as error:
        _record_crash(url, submission, key_path, release_path, team, error)
        raise
    submission_values(result, team=team, origin=origin)  # refuse before the database is opened
    with Store(url) as store:
        recorded = store.record_score(
            result, team=team, daily_limit=limit, origin=origin, size=submission.stat().st_size
        )
        shown = store.submission(recorded.submission_id)
    info = result.challenge
    click.echo(
        f"{info.challenge_id} ({info.task}, preset {info.preset}, n={info.n_encoded}): "
        f"{shown_attack(team, result.attack, origin)} {result.attack_version} for team {team} ({origin})"
    )
    if shown["test_release"]:
        click.echo("note: a test release: its key is public, so no score on it says anything about the encoding")
    if recorded.duplicate:
        click.echo(f"identical to submission {recorded.submission_id}, already recorded: not counted again")
    else:
        click.echo(f"recorded as submission {recorded.submission_id} in {describe_db(url)}")
    public = shown["metrics"]["public"]
    headline = public.get(result.headline_metric, math.nan)
    if origin == ORIGIN_SELF:
        margin, grid = ladder_step(result.headline_metric, public.get("n", 1.0))
        click.echo(
            f"public half (n={int(public.get('n', 0))}), as the board shows it: a new score is shown only "
            f"when it beats your team's best shown score by more than {margin:.4g}, rounded to {grid:.4g}"
        )
    else:
        click.echo(f"public half (n={int(public.get('n', 0))}):")
    click.echo(
        f"  {result.headline_metric:<24} {_number(headline)}  privacy band: {privacy_band(headline)}, "
        f"chance {_number(public.get('chance', math.nan))}, "
        f"effective k-anonymity {_number(public.get('k_anonymity', math.nan))}"
    )
    for name in SHOWN_METRICS:
        if name in public:
            click.echo(f"  {name:<24} {_number(public[name])}")
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo("private half: hidden until the organizer closes the challenge")


def _check_admission(url, submission: Path, key_path: Path, release_path, team: str, daily_limit: int | None) -> None:
    """Refuse a team over its daily limit before scoring, reading the database only."""
    if daily_limit is None:
        return
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        return  # nothing recorded yet; invalid input must not create the database
    from ncbench.challenge.files import open_key, open_release
    from ncbench.h5io import sha256_file
    from ncbench.leaderboard.scoring import check_release_digest, locate_release, submission_limits
    from ncbench.leaderboard.store import Store

    key_file, release_file = locate_release(key_path, release_path)
    with open_key(key_file) as key:
        challenge_id = key.challenge_id

    def digest() -> str:
        """The file's sha256, to recognise one already scored; "" for a file that could not have
        been (missing, or over the size limit: a huge file is never hashed)."""
        with open_key(key_file) as key:
            check_release_digest(key, release_file)
        with open_release(release_file) as release:
            budget = submission_limits(release).file_bytes
        if not submission.is_file() or submission.stat().st_size > budget:
            return ""
        return sha256_file(submission)

    with Store(url, create=False) as store:
        store.check_admission(challenge_id, team=team, daily_limit=daily_limit, sha256=digest)


def _record_crash(url, submission: Path, key_path: Path, release_path, team: str, error: Exception) -> None:
    """Best effort: log a scorer crash (a bug, not the submitter's fault) as a failed submission."""
    try:
        from ncbench.challenge.files import open_release
        from ncbench.h5io import sha256_file
        from ncbench.leaderboard.scoring import ChallengeInfo, locate_release
        from ncbench.leaderboard.store import Store

        _, release_file = locate_release(key_path, release_path)
        with open_release(release_file) as release:
            info = ChallengeInfo.from_release(release)
        with Store(url) as store:
            store.record_failure(
                info,
                team=team,
                sha256=sha256_file(submission),
                error=f"{type(error).__name__}: {error}",
                size=submission.stat().st_size,
            )
    except Exception:  # the original error is what matters; it is re-raised by the caller
        pass


@click.group("leaderboard")
def group() -> None:
    """The public leaderboard: serve the Streamlit app, export tables, close a challenge."""


@group.command("serve")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--port", type=int, default=8501, show_default=True, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for a public board).")
def serve(db: str, port: int, host: str) -> None:
    """Run the Streamlit leaderboard app on the results database (Ctrl-C stops it).

    The command replaces itself with the Streamlit server (exec): stopping it stops the server.
    """
    from ncbench.leaderboard.store import Store, database_url, describe_db

    if not 1 <= port <= 65535:
        raise NcbenchError(f"--port must be between 1 and 65535, got {port}")
    url = database_url(db)
    Store(url, create=False).close()  # refuse a missing or foreign database before starting
    from ncbench.leaderboard.board import board_command

    command, env = board_command(url.render_as_string(hide_password=False), host=host, port=port)
    click.echo(f"serving the leaderboard of {describe_db(url)} on http://{host}:{port}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the server rather than its parent: a signal meant for `serve` (SIGTERM from a
    # supervisor, Ctrl-C) reaches Streamlit itself, and no child is left behind to serve on.
    os.execve(sys.executable, command, env)


@group.command("export")
@click.option("--db", required=True, help=DB_HELP)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "json", "markdown"]),
    default="csv",
    show_default=True,
    help='Output format (JSON: NaN as null, infinite k-anonymity as "inf").',
)
@click.option("--out", type=click.Path(path_type=Path), help="File to write [default: standard output].")
def export(db: str, fmt: str, out: Path | None) -> None:
    """Write every public result as CSV, JSON or Markdown: one row per answer file's submission and
    visible half (track 'answer file'), then one per verified run (track 'verified': the mean over
    its fresh hidden releases, their spread, K).

    Cells that a spreadsheet would read as a formula are quoted (CSV); markup is escaped (Markdown).
    """
    from ncbench.h5io import atomic_path
    from ncbench.leaderboard.store import Store, database_url
    from ncbench.leaderboard.tables import board, export_table, to_csv, to_markdown, to_records, verified_summary
    from ncbench.leaderboard.verified import runs as verified

    with Store(database_url(db), create=False) as store:
        table = export_table(board(store.results()), verified_summary(verified.results(store)))
    if fmt == "csv":
        text = to_csv(table)
    elif fmt == "json":
        text = json.dumps(to_records(table), indent=2) + "\n"
    else:
        text = to_markdown(table)
    if out is None:
        click.echo(text, nl=False)
        return
    if out.is_dir():
        raise NcbenchError(f"--out {out} is a directory")
    with atomic_path(out, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
    click.echo(f"wrote {out} ({len(table)} rows)", err=True)


@group.command("close")
@click.argument("challenge_id")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--yes", is_flag=True, help="Close without asking (scripts); closing cannot be undone.")
def close(challenge_id: str, db: str, yes: bool) -> None:
    """Close CHALLENGE_ID: its private-half scores become public, and the seeds of its verified
    runs' evaluation releases are revealed (no way back). Asks first, unless --yes."""
    from ncbench.leaderboard.store import Store, database_url
    from ncbench.leaderboard.verified import runs as verified

    with Store(database_url(db), create=False) as store:
        known = store.challenges().set_index("challenge_id")["closed_utc"]
        if challenge_id in known.index and known[challenge_id] is None and not yes:
            if not sys.stdin.isatty():
                raise NcbenchError(f"closing {challenge_id} cannot be undone: pass --yes to close it without a prompt")
            click.confirm(
                f"Close {challenge_id}? Its private-half scores and verified seeds become public; "
                "this cannot be undone",
                abort=True,
            )
        stamp, newly = store.close_challenge(challenge_id)
        revealed = verified.revealed_count(store, challenge_id)
    if newly:
        click.echo(f"closed {challenge_id} at {stamp}: private-half scores are now public")
    else:
        click.echo(f"{challenge_id} was already closed at {stamp}")
    if revealed:
        click.echo(
            f"revealed the seeds of {revealed} evaluation releases of verified runs: anyone can now rebuild "
            f"them (GET /api/v1/challenges/{challenge_id}/commitments, or the board's Verified page)"
        )


@group.command("verify-builtins")
@click.option("--challenge", "challenge_id", required=True, help="A published challenge of the server.")
@store_option(required=True)
@db_option
@releases_option("--releases", help="Fresh hidden evaluation releases per run (K).")
@eval_source_option(default="phantom", help="Held-out images, for a challenge published without its own --eval-source.")
@sandbox_options
@click.option(
    "--queue-only", is_flag=True, help="Queue the runs for the server's workers instead of running them here."
)
def verify_builtins(
    challenge_id: str,
    store_dir: Path,
    db: str | None,
    releases: int,
    eval_source: str,
    sandbox_limits: tuple[str, ...],
    unsandboxed: bool,
    queue_only: bool,
) -> None:
    """Run the built-in attacks that solve CHALLENGE's task (gram-hungarian, carlini-2021,
    linear-inversion, distribution-alignment, chance) through the verified track: sandboxed, on fresh hidden
    releases with committed seeds. They are the verified matrix's reference rows."""
    from ncbench.leaderboard import workqueue
    from ncbench.leaderboard.server.service import db_url
    from ncbench.leaderboard.store import Store, database_url, verified_runs
    from ncbench.leaderboard.verified import runs as verified
    from ncbench.leaderboard.verified import sandbox

    settings = verified.Settings(
        releases=releases, eval_source=eval_source, limits=sandbox.parse_limits(sandbox_limits), unsandboxed=unsandboxed
    )
    sandbox.require_sandbox(unsandboxed=unsandboxed)
    store_dir = Path(store_dir).resolve()
    url = db_url(db, store_dir)
    with Store(database_url(url), create=False) as store:
        queued = verified.enqueue_builtins(store, challenge_id, settings)
        if not queued:
            raise NcbenchError(f"no built-in attack solves the task of {challenge_id}")
        for name, run_id in queued:
            if queue_only or not verified.claim_run(store, run_id):
                click.echo(f"{name}: verified run {run_id} queued for the server's workers")
                continue
            with workqueue.leased(url, verified_runs, run_id):  # a server on this database leaves it to us
                state = verified.run_verified(url, str(store_dir), run_id)
            view = verified.run_view(store, run_id)
            click.echo(f"{name}: verified run {run_id} {state}: {verified.summary_line(view)}")


def _number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.4f}"
