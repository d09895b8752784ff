"""The results database (docs/tasks.md#scoring-rules): SQLAlchemy Core over SQLite by default, any URL otherwise.

``--db`` takes a path (an SQLite file: WAL journal, foreign keys on, 30 s busy timeout) or an
SQLAlchemy URL such as ``postgresql+psycopg://user@host/board``. The schema is versioned: each
migration in :data:`MIGRATIONS` runs once, in order, inside a write transaction.

Tables: ``challenges``, ``teams``, ``submissions`` (sha256 of the file, attack, version, params,
runtime, status, error), ``scores`` (submission, split, metric, value) and ``utility_results``
(written by the utility baseline through :func:`record_utility`); the live challenge's
``published``, ``team_tokens`` and ``jobs`` (:mod:`leaderboard.server.channel`) and the verified track's
``verified_runs`` and ``verified_releases`` (:mod:`leaderboard.verified.runs`).

Rules kept here, not in the callers:

- one id per submission: a submission's id is the id of its ``jobs`` row (the server's upload, or a
  row created with it for a submission recorded without the server), so the API, the CLI, the
  board and the export all name it by one number;
- one transaction per submission; an identical file from the same team for the same challenge is
  recognised and not counted again;
- at most ``daily_limit`` scored submissions per team, challenge and UTC day (failed ones do not
  count);
- private-half scores (split 1) are hidden from every public query until :meth:`Store.close_challenge`;
- team names are folded to one canonical ASCII spelling (:func:`check_team_name`), so look-alike
  spellings are one team or refused;
- every stored string has a length limit (:data:`MAX_LENGTHS`), checked in :func:`check_lengths`;
- a row's ``origin`` says who vouches for it: ``organizer`` (a built-in attack the organizer ran,
  recorded under :data:`BUILTIN_TEAM`) or ``self-reported`` (a file from a team: its attack name,
  parameters and knowledge are its own claims). A self-reported row is shown in its team's
  namespace (``team/attack``), so it never takes a built-in attack's row, whatever it is called;
- public-half scores of self-reported rows are shown through the Ladder (:func:`ladder`), so that
  repeated submissions learn little about which items are in which half. Stored values are exact.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from ncbench.errors import NcbenchError
from ncbench.leaderboard.metrics import HEADLINE_METRIC, PSNR_CAP_DB, SPLIT_NAMES, effective_k_anonymity
from ncbench.leaderboard.rules import BUILTIN_TEAM, DB_ENV, DEFAULT_DAILY_LIMIT, ORIGIN_ORGANIZER, ORIGIN_SELF  # noqa: F401
from ncbench.names import fold, name_skeleton
from ncbench.private import create_private_file

BUSY_TIMEOUT_S = 30
# SQLite connections kept open for reuse: one per thread that can hold one at once (the API's 40
# request threads, the dispatcher's and the board's few). SQLAlchemy's default keeps 5 and
# closes every connection past them on return, so under load most requests opened a new
# connection and ran its PRAGMAs: a third of the API's CPU at 200 clients. An idle SQLite
# connection costs a file descriptor and a few hundred KB.
SQLITE_POOL_SIZE = 48
STATUS_SCORED, STATUS_FAILED = "scored", "failed"
# What the team reads (its job's message) of a failure the organizer's scorer logged: the error
# itself, which may name the organizer's files, stays in the submissions row.
SCORER_FAILED = "the organizer's scorer failed on this file (logged for the organizer); it does not count"
MODEL_KINDS = ("encoded", "raw")
MAX_TEAM_NAME = 64
TEAM_NAME = re.compile(rf"[a-z0-9][a-z0-9_.-]{{0,{MAX_TEAM_NAME - 1}}}")
ORIGINS = (ORIGIN_ORGANIZER, ORIGIN_SELF)
ATTACK_ENTRY_POINTS = "ncbench.attacks"  # built-ins are the entry points whose target is in ncbench
# Characters of every stored string (JSON text for params, knowledge and notes). A submission over
# a limit is refused, not cut: a cut name or JSON would say something the file did not.
MAX_LENGTHS = {
    "challenge_id": 128,
    "task": 16,
    "preset": 64,
    "key_commitment": 64,
    "encoder_config": 8192,
    "attack": 128,
    "attack_version": 64,
    "params": 8192,
    "knowledge": 1024,
    "notes": 8192,
    "error": 2000,
    "label": 128,
    "settings": 8192,  # utility_results
}
# Shown public scores of self-reported rows (the Ladder, Blum & Hardt 2015): a new score is shown
# only when it beats the team's best shown score by range/sqrt(n public items), rounded to 1% of
# the range. Metrics that do not depend on the key (n, chance, one_to_one) are shown as they are;
# k_anonymity is recomputed from the shown headline.
LADDER_GRID = 0.01
METRIC_RANGES = {"psnr": PSNR_CAP_DB, "ssim": 2.0}  # every other scored metric is a fraction in [0, 1]
UNLADDERED_METRICS = frozenset({"n", "chance", "one_to_one", "k_anonymity"})
_PG_MIGRATION_LOCK = 0x6E63_6265  # pg_advisory_xact_lock key: "ncbe"

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_utc", sa.String(32), nullable=False),
)
challenges = sa.Table(
    "challenges",
    metadata,
    sa.Column("challenge_id", sa.String(128), primary_key=True),
    sa.Column("task", sa.String(16), nullable=False),
    sa.Column("preset", sa.String(64), nullable=False),
    sa.Column("n_encoded", sa.Integer, nullable=False),
    sa.Column("key_commitment", sa.String(64), nullable=False),
    sa.Column("encoder_config", sa.Text, nullable=False),
    sa.Column("created_utc", sa.String(32), nullable=False),
    sa.Column("closed_utc", sa.String(32)),
    # Built with a public seed (docs/format.md): anyone can rebuild its key. Since migration 3.
    sa.Column("test_release", sa.Boolean, nullable=False, server_default=sa.false()),
    # Hospitals with independent keys in the release (docs/format.md); 1 for most. Since migration 6.
    sa.Column("n_sites", sa.Integer, nullable=False, server_default="1"),
)
teams = sa.Table(
    "teams",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(MAX_TEAM_NAME), nullable=False, unique=True),
    sa.Column("created_utc", sa.String(32), nullable=False),
)
submissions = sa.Table(
    "submissions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("challenge_id", sa.String(128), sa.ForeignKey("challenges.challenge_id"), nullable=False),
    sa.Column("team_id", sa.Integer, sa.ForeignKey("teams.id"), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("attack", sa.String(128), nullable=False),
    sa.Column("attack_version", sa.String(64), nullable=False),
    sa.Column("params", sa.Text, nullable=False),  # JSON object
    sa.Column("knowledge", sa.Text, nullable=False),  # JSON list
    sa.Column("runtime_s", sa.Float),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("notes", sa.Text, nullable=False),  # JSON list of findings that did not reject it
    sa.Column("created_utc", sa.String(32), nullable=False),
    # Who vouches for the row (module docstring). Since migration 3; older rows are self-reported.
    sa.Column("origin", sa.String(16), nullable=False, server_default=ORIGIN_SELF),
    sa.CheckConstraint(f"status IN ('{STATUS_SCORED}', '{STATUS_FAILED}')", name="submission_status"),
    sa.CheckConstraint(f"origin IN ('{ORIGIN_ORGANIZER}', '{ORIGIN_SELF}')", name="submission_origin"),
)
# Counting a team's submissions of the day, and recognising a re-submitted file, are index scans.
sa.Index("ix_submissions_team_day", submissions.c.challenge_id, submissions.c.team_id, submissions.c.created_utc)
sa.Index(
    "ux_submissions_scored_file",
    submissions.c.challenge_id,
    submissions.c.team_id,
    submissions.c.sha256,
    unique=True,
    sqlite_where=submissions.c.status == STATUS_SCORED,
    postgresql_where=submissions.c.status == STATUS_SCORED,
)
scores = sa.Table(
    "scores",
    metadata,
    sa.Column("submission_id", sa.Integer, sa.ForeignKey("submissions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("split", sa.SmallInteger, primary_key=True),  # 0 public half, 1 private half
    sa.Column("metric", sa.String(64), primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
)
utility_results = sa.Table(
    "utility_results",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("preset", sa.String(64), nullable=False),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("auc", sa.Float, nullable=False),
    sa.Column("model_kind", sa.String(16), nullable=False),
    sa.Column("settings", sa.Text, nullable=False),  # JSON object
    sa.Column("created_utc", sa.String(32), nullable=False),
    sa.CheckConstraint(sa.column("model_kind").in_(MODEL_KINDS), name="utility_model_kind"),
)

# The live challenge (leaderboard/server/channel.py): published challenges, team tokens and the durable
# job queue that the server's scoring workers drain.
JOB_STATES = ("queued", "running", "scored", "refused", "failed")
published = sa.Table(
    "published",
    metadata,
    sa.Column("challenge_id", sa.String(128), sa.ForeignKey("challenges.challenge_id"), primary_key=True),
    sa.Column("files", sa.Text, nullable=False),  # JSON list of {name, size, sha256}: the public files only
    sa.Column("daily_limit", sa.Integer, nullable=False),
    sa.Column("deadline_utc", sa.String(32)),
    sa.Column("published_utc", sa.String(32), nullable=False),
    # The verified track (leaderboard/verified/runs.py), since migration 5: the organizer's held-out image
    # pool for evaluation releases (NULL: the server's --eval-source) and plugin runs per team and day.
    sa.Column("eval_source", sa.String(512)),
    sa.Column("plugin_daily_limit", sa.Integer),
    # Since migration 9: a blind challenge hides its public-half scores too until it closes.
    sa.Column("blind", sa.Boolean, nullable=False, server_default=sa.false()),
)
team_tokens = sa.Table(
    "team_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("team_id", sa.Integer, sa.ForeignKey("teams.id"), nullable=False),
    # hmac-sha256:<hex> under the server's secret (argon2id before migration 8); never the token
    sa.Column("token_hash", sa.String(256), nullable=False),
    sa.Column("created_utc", sa.String(32), nullable=False),
    sa.Column("revoked_utc", sa.String(32)),
)
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("challenge_id", sa.String(128), sa.ForeignKey("challenges.challenge_id"), nullable=False),
    sa.Column("team_id", sa.Integer, sa.ForeignKey("teams.id"), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),  # the upload, stored by content hash
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("message", sa.Text),
    sa.Column("submission_id", sa.Integer, sa.ForeignKey("submissions.id")),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_utc", sa.String(32), nullable=False),
    sa.Column("updated_utc", sa.String(32), nullable=False),
    sa.CheckConstraint(sa.column("state").in_(JOB_STATES), name="job_state"),
)
sa.Index("ix_jobs_state", jobs.c.state, jobs.c.id)
sa.Index("ix_jobs_team_day", jobs.c.team_id, jobs.c.challenge_id, jobs.c.created_utc)

# The verified track (leaderboard/verified/runs.py): attack code the organizer runs, sandboxed, on K fresh
# evaluation releases per run. Each release's seed is committed to (sha256) before the plugin runs
# and revealed when the challenge closes.
VERIFIED_STATES = ("queued", "running", "scored", "failed")
verified_runs = sa.Table(
    "verified_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("challenge_id", sa.String(128), sa.ForeignKey("challenges.challenge_id"), nullable=False),
    sa.Column("team_id", sa.Integer, sa.ForeignKey("teams.id"), nullable=False),
    sa.Column("origin", sa.String(16), nullable=False),  # organizer: a built-in; self-reported: a team's plugin
    sa.Column("attack", sa.String(128), nullable=False),  # the plugin's declared name (checked in the sandbox)
    sa.Column("attack_version", sa.String(64), nullable=False),
    sa.Column("plugin_sha256", sa.String(64)),  # the uploaded .py file, wheel or sdist; NULL for a built-in
    sa.Column("plugin_file", sa.String(128)),
    sa.Column("class_name", sa.String(128)),  # Class, or module:Class in a wheel or sdist
    sa.Column("params", sa.Text, nullable=False),  # JSON object of the raw name -> value strings
    sa.Column("releases", sa.Integer, nullable=False),  # K evaluation releases
    sa.Column("eval_source", sa.String(512), nullable=False),  # the held-out image pool they are drawn from
    sa.Column("limits", sa.Text, nullable=False),  # JSON of leaderboard.sandbox.Limits
    sa.Column("sandboxed", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("message", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_utc", sa.String(32), nullable=False),
    sa.Column("started_utc", sa.String(32)),
    sa.Column("finished_utc", sa.String(32)),
    sa.Column("updated_utc", sa.String(32), nullable=False),
    sa.CheckConstraint(sa.column("state").in_(VERIFIED_STATES), name="verified_run_state"),
    sa.CheckConstraint(sa.column("origin").in_(ORIGINS), name="verified_run_origin"),
)
sa.Index("ix_verified_runs_state", verified_runs.c.state, verified_runs.c.id)
sa.Index(
    "ix_verified_runs_team_day", verified_runs.c.team_id, verified_runs.c.challenge_id, verified_runs.c.created_utc
)
verified_releases = sa.Table(
    "verified_releases",
    metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("verified_runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("idx", sa.SmallInteger, primary_key=True),
    sa.Column("eval_challenge_id", sa.String(128), nullable=False),
    sa.Column("seed_sha256", sa.String(64), nullable=False),  # the commitment, published before the run
    sa.Column("key_commitment", sa.String(64), nullable=False),
    sa.Column("release_sha256", sa.String(64), nullable=False),
    sa.Column("recipe", sa.Text, nullable=False),  # JSON: everything but the seed needed to rebuild it
    sa.Column("seed", sa.String(64), nullable=False),  # secret until the challenge closes: never served before
    sa.Column("committed_utc", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # committed, scored, failed
    sa.Column("message", sa.Text),  # public: a fixed vocabulary (leaderboard/verified/sandbox.py FAILURES)
    sa.Column("detail", sa.Text),  # the plugin's own error line: its team's eyes only
    sa.Column("wall_s", sa.Float),
    sa.Column("cpu_s", sa.Float),
    sa.Column("peak_rss_bytes", sa.BigInteger),
    sa.Column("headline", sa.Float),  # the task's headline metric over the whole release (both halves)
    sa.Column("metrics", sa.Text),  # JSON {"public": {...}, "private": {...}}
)


def _create(*tables: sa.Table) -> Callable[[Connection], None]:
    def apply(conn: Connection) -> None:
        for table in tables:
            table.create(conn)

    return apply


def _add_columns(*columns: tuple[sa.Table, str, str]) -> Callable[[Connection], None]:
    """ALTER TABLE ... ADD COLUMN for each (table, column, SQL definition) the table lacks.

    Migration 1 creates its tables from the current definitions, so a new database already has
    the column; only an older database gets it here.
    """

    def apply(conn: Connection) -> None:
        for table, name, definition in columns:
            if name not in {c["name"] for c in sa.inspect(conn).get_columns(table.name)}:
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {name} {definition}")

    return apply


def _in_order(*steps: Callable[[Connection], None]) -> Callable[[Connection], None]:
    def apply(conn: Connection) -> None:
        for step in steps:
            step(conn)

    return apply


def _revoke_argon2_tokens(conn: Connection) -> None:
    """Tokens were argon2id hashes, which cannot become HMACs without the token: revoked, so
    the organizer re-issues them (ncbench team add NAME)."""
    conn.execute(
        team_tokens.update()
        .where(team_tokens.c.token_hash.like("$argon2%"), team_tokens.c.revoked_utc.is_(None))
        .values(revoked_utc=_stamp(utc_now()))
    )


def _one_id_per_submission(conn: Connection) -> None:
    """Give every submission recorded without a job (the organizer's local runs, scorer
    crashes) a jobs row, so that job ids, which new submissions take as their own, never meet an
    existing submission's id. Such a row takes the submission's id where no job has it yet.
    Submissions the API scored before keep the two ids they had (the job's and the board's);
    the job's ``submission_id`` links them."""
    linked = sa.select(jobs.c.submission_id).where(jobs.c.submission_id.is_not(None))
    # A job of this numbering that recorded its submission and has not yet said so (its worker
    # stopped in between): the submission is already its job's.
    own_job = sa.exists().where(
        jobs.c.id == submissions.c.id,
        jobs.c.submission_id.is_(None),
        jobs.c.team_id == submissions.c.team_id,
        jobs.c.sha256 == submissions.c.sha256,
    )
    orphans = conn.execute(
        sa.select(
            submissions.c.id,
            submissions.c.challenge_id,
            submissions.c.team_id,
            submissions.c.sha256,
            submissions.c.status,
            submissions.c.error,
            submissions.c.created_utc,
        )
        .where(submissions.c.id.not_in(linked), sa.not_(own_job))
        .order_by(submissions.c.id)
    ).all()
    taken = set(conn.execute(sa.select(jobs.c.id)).scalars())
    highest = conn.execute(sa.select(sa.func.max(submissions.c.id))).scalar() or 0
    fresh = max([highest, *taken]) + 1
    for row in orphans:
        job_id = row.id
        if job_id in taken:
            job_id, fresh = fresh, fresh + 1
        conn.execute(
            jobs.insert().values(
                id=job_id,
                challenge_id=row.challenge_id,
                team_id=row.team_id,
                sha256=row.sha256,
                size=0,  # not known for rows recorded before this migration
                state=row.status,
                message=None if row.status == STATUS_SCORED else SCORER_FAILED,
                submission_id=row.id,
                attempts=0,
                created_utc=row.created_utc,
                updated_utc=row.created_utc,
            )
        )
    if conn.dialect.name == "postgresql":  # explicit ids do not advance the sequence: move it past them
        conn.execute(
            sa.text(
                "SELECT setval(pg_get_serial_sequence('jobs', 'id'), "
                "GREATEST(:jobs, :submissions, 1), GREATEST(:jobs, :submissions) > 0)"
            ),
            {"jobs": max(taken | {0, fresh - 1}), "submissions": highest},
        )


# Ordered, append-only: a released migration is never edited, a change is a new entry.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "challenges, teams, submissions, scores", _create(challenges, teams, submissions, scores)),
    (2, "utility_results", _create(utility_results)),
    (
        3,
        "submissions.origin (organizer / self-reported), challenges.test_release",
        _add_columns(
            (
                submissions,
                "origin",
                f"VARCHAR(16) NOT NULL DEFAULT '{ORIGIN_SELF}' "
                f"CHECK (origin IN ('{ORIGIN_ORGANIZER}', '{ORIGIN_SELF}'))",
            ),
            (challenges, "test_release", "BOOLEAN NOT NULL DEFAULT FALSE"),
        ),
    ),
    (4, "published challenges, team tokens, job queue", _create(published, team_tokens, jobs)),
    (
        5,
        "verified track: runs, evaluation releases, published.eval_source",
        _in_order(
            _add_columns((published, "eval_source", "VARCHAR(512)"), (published, "plugin_daily_limit", "INTEGER")),
            _create(verified_runs, verified_releases),
        ),
    ),
    (6, "challenges.n_sites", _add_columns((challenges, "n_sites", "INTEGER NOT NULL DEFAULT 1"))),
    (
        7,
        "verified_releases.detail (a failure in the plugin's words, for its team)",
        _add_columns((verified_releases, "detail", "TEXT")),
    ),
    (8, "team tokens hashed with HMAC-SHA256: argon2id tokens revoked, re-issue them", _revoke_argon2_tokens),
    (
        9,
        "published.blind (public-half scores hidden until the close)",
        _add_columns((published, "blind", "BOOLEAN NOT NULL DEFAULT FALSE")),
    ),
    (10, "one id per submission: a job for every submission, whose id the submission takes", _one_id_per_submission),
]
LATEST_VERSION = MIGRATIONS[-1][0]


@dataclass(frozen=True)
class Recorded:
    """Where a scored submission went: its row id, and whether it was already there."""

    submission_id: int
    duplicate: bool


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stamp(moment: dt.datetime) -> str:
    """Fixed-width ISO 8601 in UTC, so that text order is time order in every database."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def database_url(db: str | os.PathLike) -> sa.URL:
    """A ``--db`` value (a path to an SQLite file, or an SQLAlchemy URL) as a URL."""
    text = str(db).strip()
    if not text:
        raise NcbenchError("--db is empty; give a file path or a database URL")
    if "://" not in text:
        return sa.URL.create("sqlite", database=str(Path(text).expanduser().resolve()))
    try:
        return sa.make_url(text)
    except sa.exc.ArgumentError:
        raise NcbenchError(f"--db {text!r} is neither a file path nor a valid database URL") from None


def describe_db(url: sa.URL) -> str:
    """The URL for messages, without its password."""
    return url.render_as_string(hide_password=True)


class Store:
    """An open results database. ``create=False`` refuses to create a new database file."""

    def __init__(self, db: str | os.PathLike | sa.URL, *, create: bool = True):
        self.url = db if isinstance(db, sa.URL) else database_url(db)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            path = self.url.database
            if not path or path == ":memory:":
                raise NcbenchError("an in-memory SQLite database cannot hold a leaderboard; give a file path")
            path = Path(path)
            if not create and not path.is_file():
                raise NcbenchError(f"no leaderboard database at {path}")
            if not path.parent.is_dir():
                raise NcbenchError(f"cannot create a database in {path.parent}: no such directory")
            # It holds token hashes and unrevealed evaluation seeds: 0600 from its first byte
            # (SQLite gives its -wal and -shm files the same mode).
            try:
                create_private_file(path)
            except OSError as error:
                raise NcbenchError(f"cannot create a database at {path}: {error.strerror}") from None
        self.engine = self._make_engine()
        try:
            self._migrate()
        except BaseException:
            self.engine.dispose()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    # -- connection plumbing -------------------------------------------------------------------

    def _make_engine(self) -> Engine:
        try:
            if self.is_sqlite:
                engine = sa.create_engine(
                    self.url, connect_args={"timeout": BUSY_TIMEOUT_S}, pool_size=SQLITE_POOL_SIZE, max_overflow=16
                )
                _configure_sqlite(engine)
            else:
                engine = sa.create_engine(self.url, pool_pre_ping=True)
        except (sa.exc.NoSuchModuleError, ModuleNotFoundError) as error:
            raise NcbenchError(
                f"no database driver for {describe_db(self.url)} ({error}); for PostgreSQL "
                f"install the extra: pip install 'neuracrypt-bench[postgres]'"
            ) from None
        except sa.exc.ArgumentError as error:
            raise NcbenchError(f"invalid database URL {describe_db(self.url)}: {error}") from None
        return engine

    def _write(self):
        """A connection whose transaction holds the write lock from its first statement.

        SQLite: ``BEGIN IMMEDIATE``, so that reading a count and inserting after it cannot
        interleave with another process. PostgreSQL locks rows explicitly (``FOR UPDATE``).
        """
        return _Transaction(self, write=True)

    def _read(self):
        return _Transaction(self, write=False)

    def _migrate(self) -> None:
        with self._write() as conn:
            if self.url.get_backend_name() == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            inspector = sa.inspect(conn)
            existing = set(inspector.get_table_names())
            if "schema_version" not in existing:
                if existing:
                    raise NcbenchError(
                        f"{describe_db(self.url)} is not an ncbench leaderboard database "
                        f"(it has other tables: {', '.join(sorted(existing)[:3])})"
                    )
                schema_version.create(conn)
                current = 0
            else:
                current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
            if current > LATEST_VERSION:
                raise NcbenchError(
                    f"{describe_db(self.url)} has schema version {current}; this ncbench "
                    f"understands up to {LATEST_VERSION} (upgrade ncbench)"
                )
            for version, description, apply in MIGRATIONS:
                if version > current:
                    apply(conn)
                    conn.execute(
                        schema_version.insert().values(
                            version=version, description=description, applied_utc=_stamp(utc_now())
                        )
                    )

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)

    # -- writes --------------------------------------------------------------------------------

    def record_score(
        self,
        result,
        *,
        team: str,
        daily_limit: int | None = DEFAULT_DAILY_LIMIT,
        origin: str = ORIGIN_SELF,
        now: dt.datetime | None = None,
        job_id: int | None = None,
        size: int = 0,
    ) -> Recorded:
        """Record a :class:`leaderboard.scoring.ScoreResult` for ``team`` in one transaction.

        Returns the existing row (``duplicate=True``) for a file this team already had scored on
        this challenge. Raises NcbenchError, writing nothing, when the team has reached
        ``daily_limit`` scored submissions on this challenge today (UTC); ``None`` means no limit.

        ``origin``: :data:`ORIGIN_SELF` for a team's file (it may not take a built-in attack's
        name, nor the organizer's team name); :data:`ORIGIN_ORGANIZER` for a built-in attack the
        organizer ran, recorded under :data:`BUILTIN_TEAM` only.

        One id per submission: the submission takes the id of its job, ``job_id`` (the server's
        upload); without one (the organizer's local run) a job row in state scored is created in
        the same transaction, of ``size`` bytes, and its id taken.
        """
        team, values = submission_values(result, team=team, origin=origin)
        if daily_limit is not None and daily_limit < 1:
            raise NcbenchError(f"the daily limit must be at least 1, got {daily_limit}")
        now = now or utc_now()
        challenge = result.challenge
        rows = [
            {"split": split, "metric": name, "value": float(value)}
            for split, values_of_split in sorted(result.metrics.items())
            for name, value in sorted(values_of_split.items())
            if not math.isnan(value)  # a half with no items has no value (SQLite turns NaN into NULL)
        ]
        with self._write() as conn:
            self._ensure_challenge(conn, challenge, now)
            team_id = self._lock_team(conn, team, now)
            existing = self._scored_file(conn, challenge.challenge_id, team_id, result.sha256)
            if existing is not None:
                if origin == ORIGIN_ORGANIZER:  # the organizer vouches for a row recorded before migration 3
                    conn.execute(submissions.update().where(submissions.c.id == existing).values(origin=origin))
                return Recorded(existing, duplicate=True)
            if daily_limit is not None:
                self._check_daily_limit(conn, challenge.challenge_id, team, team_id, daily_limit, now)
            submission_id = self._job_for(
                conn, job_id, challenge.challenge_id, team_id, result.sha256, size, STATUS_SCORED, None, now
            )
            conn.execute(
                submissions.insert().values(
                    id=submission_id,
                    challenge_id=challenge.challenge_id,
                    team_id=team_id,
                    sha256=result.sha256,
                    runtime_s=float(result.runtime_s),
                    status=STATUS_SCORED,
                    error=None,
                    origin=origin,
                    created_utc=_stamp(now),
                    **values,
                )
            )
            if job_id is None:
                conn.execute(jobs.update().where(jobs.c.id == submission_id).values(submission_id=submission_id))
            if rows:
                conn.execute(scores.insert(), [{"submission_id": submission_id, **row} for row in rows])
            return Recorded(submission_id, duplicate=False)

    def _job_for(
        self,
        conn: Connection,
        job_id: int | None,
        challenge_id: str,
        team_id: int,
        sha256: str,
        size: int,
        state: str,
        message: str | None,
        now: dt.datetime,
    ) -> int:
        """``job_id``, or the id of a new job row in its final ``state`` for a submission recorded
        without one: a submission's id is always a job's, so the two counters never collide."""
        if job_id is not None:
            return int(job_id)
        stamp = _stamp(now)
        return int(
            conn.execute(
                jobs.insert()
                .values(
                    challenge_id=challenge_id,
                    team_id=team_id,
                    sha256=sha256,
                    size=int(size),
                    state=state,
                    message=message,
                    submission_id=None,  # set once the submission exists (a foreign key)
                    attempts=0,
                    created_utc=stamp,
                    updated_utc=stamp,
                )
                .returning(jobs.c.id)
            ).scalar_one()
        )

    def check_admission(
        self,
        challenge_id: str,
        *,
        team: str,
        daily_limit: int | None,
        sha256: Callable[[], str],
        now: dt.datetime | None = None,
    ) -> None:
        """Refuse, before any scoring, a submission that :meth:`record_score` would refuse for
        the daily limit. ``sha256`` computes the file's digest, needed only at the limit (a file
        the team already had scored is recognised, not refused). Reads only; writes nothing.
        """
        team = check_team_name(team)
        if daily_limit is None:
            return
        with self._read() as conn:
            team_id = conn.execute(sa.select(teams.c.id).where(teams.c.name == team)).scalar()
            if team_id is None:
                return
            try:
                self._check_daily_limit(conn, challenge_id, team, team_id, daily_limit, now or utc_now())
            except NcbenchError:
                if self._scored_file(conn, challenge_id, team_id, sha256()) is None:
                    raise

    def record_failure(
        self,
        challenge,
        *,
        team: str,
        sha256: str,
        error: str,
        attack: str = "unknown",
        attack_version: str = "",
        size: int = 0,
        now: dt.datetime | None = None,
    ) -> int:
        """Record that scoring a valid-looking submission failed inside the scorer (a bug, not the
        submitter's mistake); such rows never count towards the daily limit. Returns the row id,
        that of a new job row in state failed (one id per submission, as :meth:`record_score`).
        """
        team = check_team_name(team)
        now = now or utc_now()
        values = check_lengths(
            {
                "attack": attack[: MAX_LENGTHS["attack"]],
                "attack_version": attack_version[: MAX_LENGTHS["attack_version"]],
                "error": error[: MAX_LENGTHS["error"]],
            }
        )  # our own message: cut, not refused
        with self._write() as conn:
            self._ensure_challenge(conn, challenge, now)
            team_id = self._lock_team(conn, team, now)
            submission_id = self._job_for(
                conn, None, challenge.challenge_id, team_id, sha256, size, STATUS_FAILED, SCORER_FAILED, now
            )
            conn.execute(
                submissions.insert().values(
                    id=submission_id,
                    challenge_id=challenge.challenge_id,
                    team_id=team_id,
                    sha256=sha256,
                    params="{}",
                    knowledge="[]",
                    runtime_s=None,
                    status=STATUS_FAILED,
                    notes="[]",
                    created_utc=_stamp(now),
                    **values,
                )
            )
            conn.execute(jobs.update().where(jobs.c.id == submission_id).values(submission_id=submission_id))
            return submission_id

    def _scored_file(self, conn: Connection, challenge_id: str, team_id: int, sha256: str) -> int | None:
        """The id of this team's scored submission of the file with ``sha256``, if any."""
        existing = conn.execute(
            sa.select(submissions.c.id).where(
                submissions.c.challenge_id == challenge_id,
                submissions.c.team_id == team_id,
                submissions.c.sha256 == sha256,
                submissions.c.status == STATUS_SCORED,
            )
        ).scalar()
        return None if existing is None else int(existing)

    def _check_daily_limit(
        self, conn: Connection, challenge_id: str, team: str, team_id: int, daily_limit: int, now: dt.datetime
    ) -> None:
        start = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        used = conn.execute(
            sa.select(sa.func.count())
            .select_from(submissions)
            .where(
                submissions.c.challenge_id == challenge_id,
                submissions.c.team_id == team_id,
                submissions.c.status == STATUS_SCORED,
                submissions.c.created_utc >= _stamp(start),
            )
        ).scalar()
        if used >= daily_limit:
            raise NcbenchError(
                f"team {team!r} has used its {daily_limit} submissions for {challenge_id} "
                f"today (UTC); failed submissions do not count, the limit resets at midnight UTC"
            )

    def close_challenge(self, challenge_id: str, *, now: dt.datetime | None = None) -> tuple[str, bool]:
        """Reveal the private half of ``challenge_id``. Returns (closed time, newly closed?)."""
        with self._write() as conn:
            closed = conn.execute(
                sa.select(challenges.c.closed_utc).where(challenges.c.challenge_id == challenge_id).with_for_update()
            ).one_or_none()
            if closed is None:
                raise NcbenchError(f"no challenge {challenge_id!r} in {describe_db(self.url)}")
            if closed[0] is not None:
                return closed[0], False
            stamp = _stamp(now or utc_now())
            conn.execute(challenges.update().where(challenges.c.challenge_id == challenge_id).values(closed_utc=stamp))
            return stamp, True

    def record_utility(self, rows: Iterable[Mapping], *, now: dt.datetime | None = None) -> int:
        """Append utility results in one transaction; see :func:`record_utility`."""
        stamp = _stamp(now or utc_now())
        values = [_utility_row(row, stamp) for row in rows]
        if values:
            with self._write() as conn:
                conn.execute(utility_results.insert(), values)
        return len(values)

    def _ensure_challenge(self, conn: Connection, challenge, now: dt.datetime) -> None:
        known = conn.execute(
            sa.select(challenges.c.key_commitment).where(challenges.c.challenge_id == challenge.challenge_id)
        ).scalar()
        if known is None:
            values = check_lengths(
                {
                    name: str(getattr(challenge, name))
                    for name in ("challenge_id", "task", "preset", "key_commitment", "encoder_config")
                }
            )
            conn.execute(
                _insert_ignoring_conflict(
                    conn,
                    challenges,
                    {
                        **values,
                        "n_encoded": int(challenge.n_encoded),
                        "created_utc": _stamp(now),
                        "closed_utc": None,
                        # getattr: ChallengeInfo gained the field with test releases; older callers lack it.
                        "test_release": bool(getattr(challenge, "test_release", False)),
                        "n_sites": int(getattr(challenge, "n_sites", 1)),
                    },
                    ["challenge_id"],
                )
            )
        elif known != challenge.key_commitment:
            raise NcbenchError(
                f"the database already holds a challenge {challenge.challenge_id!r} with another "
                f"key commitment: this key belongs to a different challenge"
            )

    def _lock_team(self, conn: Connection, name: str, now: dt.datetime) -> int:
        """The team's id, creating the team if new, with its row locked for this transaction."""
        conn.execute(_insert_ignoring_conflict(conn, teams, {"name": name, "created_utc": _stamp(now)}, ["name"]))
        return int(conn.execute(sa.select(teams.c.id).where(teams.c.name == name).with_for_update()).scalar_one())

    # -- public queries ------------------------------------------------------------------------

    def challenges(self) -> pd.DataFrame:
        """One row per challenge: id, task, preset, n_encoded, encoder_config (JSON), created_utc,
        closed_utc (None while open), test_release (its key is public), n_sites (hospitals, each
        with its own key), blind (published with every score hidden until the close) and the number
        of scored submissions."""
        count = (
            sa.select(sa.func.count())
            .select_from(submissions)
            .where(submissions.c.challenge_id == challenges.c.challenge_id, submissions.c.status == STATUS_SCORED)
            .scalar_subquery()
        )
        query = (
            sa.select(
                challenges.c.challenge_id,
                challenges.c.task,
                challenges.c.preset,
                challenges.c.n_encoded,
                challenges.c.encoder_config,
                challenges.c.created_utc,
                challenges.c.closed_utc,
                challenges.c.test_release,
                challenges.c.n_sites,
                _blind().label("blind"),
                count.label("submissions"),
            )
            .outerjoin(published, published.c.challenge_id == challenges.c.challenge_id)
            .order_by(challenges.c.challenge_id)
        )
        with self._read() as conn:
            frame = pd.DataFrame(
                conn.execute(query).mappings().all(),
                columns=[
                    "challenge_id",
                    "task",
                    "preset",
                    "n_encoded",
                    "encoder_config",
                    "created_utc",
                    "closed_utc",
                    "test_release",
                    "n_sites",
                    "blind",
                    "submissions",
                ],
            )
        # pandas reads a None beside strings as NaN (true); an open challenge's closed_utc stays None.
        frame["closed_utc"] = frame["closed_utc"].astype(object).where(frame["closed_utc"].notna(), None)
        frame["test_release"] = frame["test_release"].astype(bool)
        frame["blind"] = frame["blind"].astype(bool)
        return frame

    def results(self, *, include_private: bool = False, challenge_id: str | None = None) -> pd.DataFrame:
        """One row per scored submission and visible split, one column per metric.

        Columns: submission_id, challenge_id, task, preset, test_release, n_sites, team, attack,
        attack_version, origin, runtime_s, created_utc, split ('public' / 'private'), then the
        metrics. The private half appears only for closed challenges, a blind challenge's public
        half only once it is closed too, and public-half scores of
        self-reported rows are the Ladder's (:func:`shown_public_scores`), unless
        ``include_private``: the organizer's view, every value exact.
        """
        base = self._visible_scores(include_private, challenge_id)
        with self._read() as conn:
            long = pd.DataFrame(conn.execute(base).mappings().all())
        info_columns = [
            "submission_id",
            "challenge_id",
            "task",
            "preset",
            "test_release",
            "n_sites",
            "team",
            "attack",
            "attack_version",
            "origin",
            "runtime_s",
            "created_utc",
            "split",
        ]
        if long.empty:
            return pd.DataFrame(columns=info_columns)
        long["test_release"] = long["test_release"].astype(bool)
        if not include_private:
            long = shown_public_scores(long)
        keys = ["submission_id", "split"]
        values = long.pivot_table(index=keys, columns="metric", values="value", aggfunc="first").reset_index()
        values.columns.name = None
        wide = long[info_columns].drop_duplicates(keys).merge(values, on=keys)
        wide = wide.sort_values(["challenge_id", "split", "submission_id"], kind="stable").reset_index(drop=True)
        wide["split"] = wide["split"].map(SPLIT_NAMES)
        return wide

    def submission(self, submission_id: int, *, include_private: bool = False) -> dict | None:
        """A scored submission's details: attributes, params, notes, origin and metrics per
        visible split (public half as :meth:`results` shows it; exact with ``include_private``).
        ``scores_hidden``: a blind challenge still open, whose metrics show no half at all."""
        query = (
            sa.select(
                submissions,
                teams.c.name.label("team"),
                challenges.c.task,
                challenges.c.preset,
                challenges.c.closed_utc,
                challenges.c.n_encoded,
                challenges.c.test_release,
                challenges.c.n_sites,
                _blind().label("blind"),
            )
            .join(teams, teams.c.id == submissions.c.team_id)
            .join(challenges, challenges.c.challenge_id == submissions.c.challenge_id)
            .outerjoin(published, published.c.challenge_id == submissions.c.challenge_id)
            .where(submissions.c.id == int(submission_id), submissions.c.status == STATUS_SCORED)
        )
        with self._read() as conn:
            row = conn.execute(query).mappings().one_or_none()
            if row is None:
                return None
            # The team's earlier submissions to this challenge: the Ladder's shown score depends on them.
            metrics_query = self._visible_scores(include_private, row["challenge_id"]).where(
                submissions.c.team_id == row["team_id"], submissions.c.id <= int(submission_id)
            )
            long = pd.DataFrame(conn.execute(metrics_query).mappings().all())
        closed = row["closed_utc"] is not None
        visible = [0, 1] if include_private or closed else [] if row["blind"] else [0]
        details = dict(row)
        details["test_release"] = bool(details["test_release"])
        details["blind"] = bool(details["blind"])
        details["scores_hidden"] = not (include_private or closed) and details["blind"]
        for name in ("params", "knowledge", "notes"):
            details[name] = json.loads(details[name])
        details["metrics"] = {SPLIT_NAMES[s]: {} for s in visible}
        if not long.empty:
            if not include_private:
                long = shown_public_scores(long)
            own = long[long["submission_id"] == int(submission_id)]
            for split, metric, value in own[["split", "metric", "value"]].itertuples(index=False):
                details["metrics"][SPLIT_NAMES[int(split)]][metric] = float(value)
        return details

    def shown_to_team(self, team: str, challenge_id: str | None = None) -> dict[int, dict]:
        """What ``team`` is shown of each of its scored submissions (to ``challenge_id`` only, when
        given: a Ladder needs no other challenge's), in two queries however many there are:
        {submission_id: {"scores_hidden": bool, "public": {metric: value}}}, the public half as
        :meth:`submission` shows it (the Ladder's values; none, and ``scores_hidden``, while a
        blind challenge is open)."""
        hidden = sa.and_(challenges.c.closed_utc.is_(None), _blind())
        query = (
            sa.select(submissions.c.id, hidden.label("hidden"))
            .join(teams, teams.c.id == submissions.c.team_id)
            .join(challenges, challenges.c.challenge_id == submissions.c.challenge_id)
            .outerjoin(published, published.c.challenge_id == submissions.c.challenge_id)
            .where(teams.c.name == team, submissions.c.status == STATUS_SCORED)
        )
        if challenge_id is not None:
            query = query.where(submissions.c.challenge_id == challenge_id)
        scores_query = self._visible_scores(False, challenge_id).where(teams.c.name == team)
        with self._read() as conn:
            shown = {row.id: {"scores_hidden": bool(row.hidden), "public": {}} for row in conn.execute(query)}
            long = pd.DataFrame(conn.execute(scores_query).mappings().all())
        if not long.empty:
            public = shown_public_scores(long).query("split == 0")
            for submission_id, metric, value in public[["submission_id", "metric", "value"]].itertuples(index=False):
                shown[int(submission_id)]["public"][metric] = float(value)
        return shown

    def entries(self, challenge_id: str) -> pd.DataFrame:
        """A challenge's scored submissions without their scores: submission_id, team, attack,
        origin, created_utc. What the board lists for a blind challenge before its close."""
        columns = ["submission_id", "team", "attack", "origin", "created_utc"]
        query = (
            sa.select(
                submissions.c.id.label("submission_id"),
                teams.c.name.label("team"),
                submissions.c.attack,
                submissions.c.origin,
                submissions.c.created_utc,
            )
            .join(teams, teams.c.id == submissions.c.team_id)
            .where(submissions.c.challenge_id == challenge_id, submissions.c.status == STATUS_SCORED)
            .order_by(submissions.c.id)
        )
        with self._read() as conn:
            return pd.DataFrame(conn.execute(query).mappings().all(), columns=columns)

    def utility(self) -> pd.DataFrame:
        """Every utility result: preset, label, auc, model_kind, settings (dict), created_utc."""
        with self._read() as conn:
            frame = pd.DataFrame(
                conn.execute(sa.select(utility_results).order_by(utility_results.c.id)).mappings().all(),
                columns=[c.name for c in utility_results.columns],
            )
        frame["settings"] = frame["settings"].map(json.loads)
        return frame

    def counts(self) -> dict[str, int]:
        """Rows per table (what tests compare to show a failure left the database untouched)."""
        with self._read() as conn:
            return {
                table.name: int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar())
                for table in (challenges, teams, submissions, scores, utility_results)
            }

    def _visible_scores(self, include_private: bool, challenge_id: str | None) -> sa.Select:
        query = (
            sa.select(
                submissions.c.id.label("submission_id"),
                submissions.c.challenge_id,
                challenges.c.task,
                challenges.c.preset,
                challenges.c.test_release,
                challenges.c.n_sites,
                teams.c.name.label("team"),
                submissions.c.attack,
                submissions.c.attack_version,
                submissions.c.origin,
                submissions.c.runtime_s,
                submissions.c.created_utc,
                scores.c.split,
                scores.c.metric,
                scores.c.value,
            )
            .join(submissions, submissions.c.id == scores.c.submission_id)
            .join(teams, teams.c.id == submissions.c.team_id)
            .join(challenges, challenges.c.challenge_id == submissions.c.challenge_id)
            .where(submissions.c.status == STATUS_SCORED)
        )
        if not include_private:
            # The private half stays hidden until the organizer closes the challenge; a blind
            # challenge's public half too.
            closed = challenges.c.closed_utc.is_not(None)
            query = query.outerjoin(published, published.c.challenge_id == submissions.c.challenge_id).where(
                sa.or_(closed, sa.and_(scores.c.split == 0, sa.not_(scores_hidden())))
            )
        if challenge_id is not None:
            query = query.where(submissions.c.challenge_id == challenge_id)
        return query


def _blind() -> sa.ColumnElement[bool]:
    """Published blind (a challenge recorded without being published is not)."""
    return sa.func.coalesce(published.c.blind, sa.false())


def scores_hidden() -> sa.ColumnElement[bool]:
    """A blind challenge not yet closed: none of its scores is shown. The query joins
    ``challenges`` and outer-joins ``published``."""
    return sa.and_(challenges.c.closed_utc.is_(None), _blind())


def record_utility(db: Store | str | os.PathLike, rows: Iterable[Mapping]) -> int:
    """Append utility-baseline results to the database ``db`` (a Store, a path or a URL).

    Each row: ``preset`` (str), ``label`` (finding name), ``auc`` (float in [0, 1]),
    ``model_kind`` ('encoded': trained on encodings; 'raw': on the plaintexts, the reference),
    ``settings`` (dict, JSON-serialisable: model, epochs, n_train, seed ...). All rows go in one
    transaction; a malformed row raises NcbenchError and writes none. Returns the rows written.
    """
    if isinstance(db, Store):
        return db.record_utility(rows)
    with Store(db) as store:
        return store.record_utility(rows)


def check_team_name(team: str) -> str:
    """The canonical spelling of a team name, or NcbenchError.

    Folded (:func:`fold`: NFKC, case, accents), a name must be 1-64 characters from a-z, 0-9,
    '_', '.', '-', starting with a letter or digit. Every look-alike spelling of a name is thus
    the same team ('Team', fullwidth 'ＴＥＡＭ', 'te\u0301am') or is refused (Cyrillic 'tеam'),
    and no name can start a spreadsheet formula.
    """
    text = team.strip() if isinstance(team, str) else ""
    name = fold(text) if len(text) <= 4 * MAX_TEAM_NAME else text  # folding may shorten; never a huge one
    if not TEAM_NAME.fullmatch(name):
        raise NcbenchError(
            f"team name must be 1-{MAX_TEAM_NAME} characters from a-z 0-9 _ . - starting with a "
            f"letter or digit (case and accents are folded), got {_shorten(team)}"
        )
    return name


def check_not_lookalike(team: str) -> None:
    """NcbenchError when canonical ``team`` is not the organizer's :data:`BUILTIN_TEAM` but looks
    like it (same :func:`name_skeleton`: 'ncbench_builtin', 'ncbench.bui1tin')."""
    if team != BUILTIN_TEAM and name_skeleton(team) == name_skeleton(BUILTIN_TEAM):
        raise NcbenchError(f"team name {team!r} looks like {BUILTIN_TEAM!r}, which is reserved for the organizer")


def submission_values(result, *, team: str, origin: str) -> tuple[str, dict[str, str]]:
    """(canonical team, the submission's text columns) for :meth:`Store.record_score`, or the
    NcbenchError it would raise for them: team, origin and attack name, lengths, no control
    characters in names. Pure, so a shell can refuse before it opens the database."""
    team = check_team_name(team)
    values = check_lengths(
        {
            "attack": result.attack,
            "attack_version": result.attack_version,
            "params": json.dumps(result.params, sort_keys=True, default=str),
            "knowledge": json.dumps(list(result.knowledge)),
            "notes": json.dumps(list(result.notes)),
        }
    )
    for name in ("attack", "attack_version"):
        if not values[name].isprintable():
            raise NcbenchError(f"attribute {name!r} holds control or format characters: {_shorten(values[name])}")
    check_origin(origin, team=team, attack=result.attack)
    return team, values


def check_origin(origin: str, *, team: str, attack: str | None) -> None:
    """Organizer rows are built-in attacks under :data:`BUILTIN_TEAM`; self-reported rows are
    neither. ``team`` is canonical (:func:`check_team_name`); ``attack`` None checks the team only."""
    if origin == ORIGIN_ORGANIZER:
        if team != BUILTIN_TEAM:
            raise NcbenchError(
                f"the organizer's runs of built-in attacks are recorded under team {BUILTIN_TEAM!r}, not {team!r}"
            )
        if attack is not None and attack not in builtin_attack_names():
            raise NcbenchError(
                f"{_shorten(attack)} is not a built-in attack ({', '.join(builtin_attack_names())}); "
                f"only built-in attacks are recorded as the organizer's"
            )
    elif origin == ORIGIN_SELF:
        check_not_lookalike(team)
        if team == BUILTIN_TEAM:
            raise NcbenchError(
                f"team name {BUILTIN_TEAM!r} is reserved for the organizer's runs of the built-in "
                f"attacks (ncbench score --builtin)"
            )
    else:
        raise NcbenchError(f"origin must be one of {', '.join(ORIGINS)}, got {origin!r}")


@functools.cache
def builtin_attack_names() -> tuple[str, ...]:
    """The built-in attacks: ``ncbench.attacks`` entry points that point into ncbench itself."""
    entries = importlib.metadata.entry_points(group=ATTACK_ENTRY_POINTS)
    return tuple(sorted({entry.name for entry in entries if entry.value.startswith("ncbench.")}))


def check_lengths(values: Mapping[str, str]) -> dict[str, str]:
    """``values`` (field name -> text to store) unchanged, or NcbenchError naming the first field
    longer than :data:`MAX_LENGTHS` allows."""
    for name, text in values.items():
        if len(text) > MAX_LENGTHS[name]:
            raise NcbenchError(
                f"{name} is {len(text)} characters long; the leaderboard stores at most {MAX_LENGTHS[name]}"
            )
    return dict(values)


def _shorten(value, limit: int = 80) -> str:
    """``repr(value)`` for a one-line message, cut to ``limit`` characters."""
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ladder(values: Sequence[float], *, margin: float, grid: float) -> list[float]:
    """The public score shown after each of a team's submissions (the Ladder, Blum & Hardt 2015).

    values: the exact scores, in submission order. A score is shown, rounded to a multiple of
    ``grid``, only when it beats the best one shown so far by more than ``margin``; otherwise
    the best shown so far is repeated. However many submissions a team makes, the shown scores
    change at most ``1 + range / (margin - grid / 2)`` times, which bounds what they reveal about
    the hidden split (e.g. a probe that swaps two rows of a perfect mapping learns nothing).
    """
    shown: list[float] = []
    best = math.nan
    for value in values:
        if not math.isnan(value) and (math.isnan(best) or value > best + margin):
            best = round(round(value / grid) * grid, 12)
        shown.append(best)
    return shown


def ladder_step(metric: str, n_public: float) -> tuple[float, float]:
    """(margin, grid) of ``metric``'s Ladder on a public half of ``n_public`` items:
    range / sqrt(n_public) and 1% of the range (:data:`METRIC_RANGES`, else 1)."""
    scale = METRIC_RANGES.get(metric, 1.0)
    return scale / math.sqrt(max(n_public, 1.0)), LADDER_GRID * scale


def shown_public_scores(long: pd.DataFrame) -> pd.DataFrame:
    """``long`` with the public-half values of self-reported rows replaced by the Ladder's.

    long: one row per (submission_id, split, metric) with columns challenge_id, task, team,
    origin, split (0 / 1), metric, value. Each (challenge, team, metric) is one ladder, in
    submission order, with margin = range / sqrt(n public items) and grid = 1% of the range.
    """
    if long.empty:
        return long
    long = long.sort_values("submission_id", kind="stable").copy()
    public = (long["split"] == 0) & (long["origin"] == ORIGIN_SELF)
    n_public = long[public & (long["metric"] == "n")].groupby("challenge_id")["value"].max()
    laddered = public & ~long["metric"].isin(UNLADDERED_METRICS)
    for (challenge_id, _, metric), group in long[laddered].groupby(["challenge_id", "team", "metric"], sort=False):
        margin, grid = ladder_step(metric, float(n_public.get(challenge_id, 1.0)))
        long.loc[group.index, "value"] = ladder(group["value"].tolist(), margin=margin, grid=grid)
    # k-anonymity follows the shown headline, not the exact one.
    anonymity = public & (long["metric"] == "k_anonymity")
    headline = long[public & (long["metric"] == long["task"].map(HEADLINE_METRIC))].set_index("submission_id")["value"]
    for index in long.index[anonymity]:
        shown = headline.get(long.at[index, "submission_id"])
        if shown is not None:
            long.at[index, "value"] = effective_k_anonymity(float(shown))
    return long


def _utility_row(row: Mapping, stamp: str) -> dict:
    try:
        preset, label, kind = row["preset"], row["label"], row["model_kind"]
        auc = float(row["auc"])
        settings = json.dumps(dict(row.get("settings") or {}), sort_keys=True)
    except KeyError as error:
        raise NcbenchError(f"utility result {dict(row)!r} lacks {error}") from None
    except (TypeError, ValueError) as error:
        raise NcbenchError(f"utility result {dict(row)!r} is malformed ({error})") from None
    if not (isinstance(preset, str) and preset and isinstance(label, str) and label):
        raise NcbenchError(f"utility result needs non-empty 'preset' and 'label' strings, got {dict(row)!r}")
    if kind not in MODEL_KINDS:
        raise NcbenchError(f"utility model_kind must be one of {MODEL_KINDS}, got {kind!r}")
    if not 0.0 <= auc <= 1.0:
        raise NcbenchError(f"utility auc must lie in [0, 1], got {auc}")
    return {
        **check_lengths({"preset": preset, "label": label, "settings": settings}),
        "auc": auc,
        "model_kind": kind,
        "created_utc": str(row.get("created_utc") or stamp),
    }


def _insert_ignoring_conflict(conn: Connection, table: sa.Table, values: dict, keys: list[str]):
    """INSERT that does nothing when a row with the same ``keys`` exists (concurrent creators)."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise NcbenchError(f"database {dialect!r} is not supported; use SQLite or PostgreSQL")
    return insert(table).values(**values).on_conflict_do_nothing(index_elements=keys)


def _configure_sqlite(engine: Engine) -> None:
    """WAL journal, foreign keys, busy timeout; transactions begun by us (see ``Store._write``)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # pysqlite must not issue its own BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("ncbench_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class _Transaction:
    """``with store._write() as conn``: one transaction, committed on success, rolled back on error.

    Database outages (cannot connect, locked past the busy timeout) become one NcbenchError line.
    """

    def __init__(self, store: Store, *, write: bool):
        self.store, self.write = store, write

    def __enter__(self) -> Connection:
        try:
            self.conn = self.store.engine.connect().execution_options(ncbench_write=self.write)
            self.transaction = self.conn.begin()
        except sa.exc.OperationalError as error:
            raise _unavailable(self.store, error) from None
        except sa.exc.DatabaseError as error:
            raise NcbenchError(f"{describe_db(self.store.url)} is not a usable database ({error.orig})") from None
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.transaction.commit()
            else:
                self.transaction.rollback()
        except sa.exc.OperationalError as error:
            if exc_type is None:
                raise _unavailable(self.store, error) from None
        finally:
            self.conn.close()
        if isinstance(exc, sa.exc.OperationalError):
            raise _unavailable(self.store, exc) from None
        return False


def _unavailable(store: Store, error: sa.exc.OperationalError) -> NcbenchError:
    return NcbenchError(f"database {describe_db(store.url)} unavailable: {str(error.orig).splitlines()[0]}")
