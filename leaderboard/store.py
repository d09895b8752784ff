"""The results database (docs/tasks.md#scoring-rules): SQLAlchemy Core over SQLite by default, any URL otherwise.

``--db`` takes a path (an SQLite file: WAL journal, foreign keys on, 30 s busy timeout) or an
SQLAlchemy URL such as ``postgresql+psycopg://user@host/board``. The schema is versioned: each
migration in :data:`MIGRATIONS` runs once, in order, inside a write transaction.

Tables: ``challenges``, ``teams``, ``submissions`` (sha256 of the file, attack, version, params,
runtime, status, error), ``scores`` (submission, split, metric, value) and ``utility_results``
(written by the utility baseline through :func:`record_utility`).

Rules kept here, not in the callers:

- one transaction per submission; an identical file from the same team for the same challenge is
  recognised and not counted again;
- at most ``daily_limit`` scored submissions per team, challenge and UTC day (failed ones do not
  count);
- private-half scores (split 1) are hidden from every public query until :meth:`Store.close_challenge`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from ncbench.errors import NcbenchError
from ncbench.leaderboard.metrics import SPLIT_NAMES

DEFAULT_DAILY_LIMIT = 5
BUSY_TIMEOUT_S = 30
STATUS_SCORED, STATUS_FAILED = "scored", "failed"
MODEL_KINDS = ("encoded", "raw")
MAX_TEAM_NAME = 64
DB_ENV = "NCBENCH_DB"  # how `leaderboard serve` hands the database to the app (not argv: passwords)
_PG_MIGRATION_LOCK = 0x6E63_6265  # pg_advisory_xact_lock key: "ncbe"

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_utc", sa.String(32), nullable=False),
)
challenges = sa.Table(
    "challenges", metadata,
    sa.Column("challenge_id", sa.String(128), primary_key=True),
    sa.Column("task", sa.String(16), nullable=False),
    sa.Column("preset", sa.String(64), nullable=False),
    sa.Column("n_encoded", sa.Integer, nullable=False),
    sa.Column("key_commitment", sa.String(64), nullable=False),
    sa.Column("encoder_config", sa.Text, nullable=False),
    sa.Column("created_utc", sa.String(32), nullable=False),
    sa.Column("closed_utc", sa.String(32)),
)
teams = sa.Table(
    "teams", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(MAX_TEAM_NAME), nullable=False, unique=True),
    sa.Column("created_utc", sa.String(32), nullable=False),
)
submissions = sa.Table(
    "submissions", metadata,
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
    sa.CheckConstraint(f"status IN ('{STATUS_SCORED}', '{STATUS_FAILED}')", name="submission_status"),
)
# Counting a team's submissions of the day, and recognising a re-submitted file, are index scans.
sa.Index("ix_submissions_team_day", submissions.c.challenge_id, submissions.c.team_id, submissions.c.created_utc)
sa.Index("ux_submissions_scored_file", submissions.c.challenge_id, submissions.c.team_id, submissions.c.sha256,
         unique=True, sqlite_where=submissions.c.status == STATUS_SCORED,
         postgresql_where=submissions.c.status == STATUS_SCORED)
scores = sa.Table(
    "scores", metadata,
    sa.Column("submission_id", sa.Integer, sa.ForeignKey("submissions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("split", sa.SmallInteger, primary_key=True),  # 0 public half, 1 private half
    sa.Column("metric", sa.String(64), primary_key=True),
    sa.Column("value", sa.Float, nullable=False),
)
utility_results = sa.Table(
    "utility_results", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("preset", sa.String(64), nullable=False),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("auc", sa.Float, nullable=False),
    sa.Column("model_kind", sa.String(16), nullable=False),
    sa.Column("settings", sa.Text, nullable=False),  # JSON object
    sa.Column("created_utc", sa.String(32), nullable=False),
    sa.CheckConstraint(sa.column("model_kind").in_(MODEL_KINDS), name="utility_model_kind"),
)

# The live challenge (leaderboard/channel.py): published challenges, team tokens and the durable
# job queue that the server's scoring workers drain.
JOB_STATES = ("queued", "running", "scored", "refused", "failed")
published = sa.Table(
    "published", metadata,
    sa.Column("challenge_id", sa.String(128), sa.ForeignKey("challenges.challenge_id"), primary_key=True),
    sa.Column("files", sa.Text, nullable=False),  # JSON list of {name, size, sha256}: the public files only
    sa.Column("daily_limit", sa.Integer, nullable=False),
    sa.Column("deadline_utc", sa.String(32)),
    sa.Column("published_utc", sa.String(32), nullable=False),
)
team_tokens = sa.Table(
    "team_tokens", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("team_id", sa.Integer, sa.ForeignKey("teams.id"), nullable=False),
    sa.Column("token_hash", sa.String(256), nullable=False),  # argon2id; the token itself is never stored
    sa.Column("created_utc", sa.String(32), nullable=False),
    sa.Column("revoked_utc", sa.String(32)),
)
jobs = sa.Table(
    "jobs", metadata,
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


def _create(*tables: sa.Table) -> Callable[[Connection], None]:
    def apply(conn: Connection) -> None:
        for table in tables:
            table.create(conn)
    return apply


# Ordered, append-only: a released migration is never edited, a change is a new entry.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "challenges, teams, submissions, scores", _create(challenges, teams, submissions, scores)),
    (2, "utility_results", _create(utility_results)),
    (4, "published challenges, team tokens, job queue", _create(published, team_tokens, jobs)),
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
                engine = sa.create_engine(self.url, connect_args={"timeout": BUSY_TIMEOUT_S})
                _configure_sqlite(engine)
            else:
                engine = sa.create_engine(self.url, pool_pre_ping=True)
        except (sa.exc.NoSuchModuleError, ModuleNotFoundError) as error:
            raise NcbenchError(f"no database driver for {describe_db(self.url)} ({error}); for PostgreSQL "
                               f"install the extra: pip install 'neuracrypt-bench[postgres]'") from None
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
                    raise NcbenchError(f"{describe_db(self.url)} is not an ncbench leaderboard database "
                                       f"(it has other tables: {', '.join(sorted(existing)[:3])})")
                schema_version.create(conn)
                current = 0
            else:
                current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
            if current > LATEST_VERSION:
                raise NcbenchError(f"{describe_db(self.url)} has schema version {current}; this ncbench "
                                   f"understands up to {LATEST_VERSION} (upgrade ncbench)")
            for version, description, apply in MIGRATIONS:
                if version > current:
                    apply(conn)
                    conn.execute(schema_version.insert().values(
                        version=version, description=description, applied_utc=_stamp(utc_now())))

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)

    # -- writes --------------------------------------------------------------------------------

    def record_score(self, result, *, team: str, daily_limit: int | None = DEFAULT_DAILY_LIMIT,
                     now: dt.datetime | None = None) -> Recorded:
        """Record a :class:`leaderboard.scoring.ScoreResult` for ``team`` in one transaction.

        Returns the existing row (``duplicate=True``) for a file this team already had scored on
        this challenge. Raises NcbenchError, writing nothing, when the team has reached
        ``daily_limit`` scored submissions on this challenge today (UTC); ``None`` means no limit.
        """
        team = check_team_name(team)
        if daily_limit is not None and daily_limit < 1:
            raise NcbenchError(f"the daily limit must be at least 1, got {daily_limit}")
        now = now or utc_now()
        challenge = result.challenge
        rows = [
            {"split": split, "metric": name, "value": float(value)}
            for split, values in sorted(result.metrics.items())
            for name, value in sorted(values.items())
            if not math.isnan(value)  # a half with no items has no value (SQLite turns NaN into NULL)
        ]
        with self._write() as conn:
            self._ensure_challenge(conn, challenge, now)
            team_id = self._lock_team(conn, team, now)
            existing = conn.execute(
                sa.select(submissions.c.id).where(
                    submissions.c.challenge_id == challenge.challenge_id, submissions.c.team_id == team_id,
                    submissions.c.sha256 == result.sha256, submissions.c.status == STATUS_SCORED)
            ).scalar()
            if existing is not None:
                return Recorded(int(existing), duplicate=True)
            if daily_limit is not None:
                start = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
                used = conn.execute(
                    sa.select(sa.func.count()).select_from(submissions).where(
                        submissions.c.challenge_id == challenge.challenge_id, submissions.c.team_id == team_id,
                        submissions.c.status == STATUS_SCORED, submissions.c.created_utc >= _stamp(start))
                ).scalar()
                if used >= daily_limit:
                    raise NcbenchError(
                        f"team {team!r} has used its {daily_limit} submissions for {challenge.challenge_id} "
                        f"today (UTC); failed submissions do not count, the limit resets at midnight UTC")
            submission_id = conn.execute(submissions.insert().values(
                challenge_id=challenge.challenge_id, team_id=team_id, sha256=result.sha256,
                attack=result.attack, attack_version=result.attack_version,
                params=json.dumps(result.params, sort_keys=True, default=str),
                knowledge=json.dumps(list(result.knowledge)), runtime_s=float(result.runtime_s),
                status=STATUS_SCORED, error=None, notes=json.dumps(list(result.notes)),
                created_utc=_stamp(now),
            ).returning(submissions.c.id)).scalar_one()
            if rows:
                conn.execute(scores.insert(), [{"submission_id": submission_id, **row} for row in rows])
            return Recorded(int(submission_id), duplicate=False)

    def record_failure(self, challenge, *, team: str, sha256: str, error: str, attack: str = "unknown",
                       attack_version: str = "", now: dt.datetime | None = None) -> int:
        """Record that scoring a valid-looking submission failed inside the scorer (a bug, not the
        submitter's mistake); such rows never count towards the daily limit. Returns the row id.
        """
        team = check_team_name(team)
        now = now or utc_now()
        with self._write() as conn:
            self._ensure_challenge(conn, challenge, now)
            team_id = self._lock_team(conn, team, now)
            return int(conn.execute(submissions.insert().values(
                challenge_id=challenge.challenge_id, team_id=team_id, sha256=sha256, attack=attack,
                attack_version=attack_version, params="{}", knowledge="[]", runtime_s=None,
                status=STATUS_FAILED, error=error[:2000], notes="[]", created_utc=_stamp(now),
            ).returning(submissions.c.id)).scalar_one())

    def close_challenge(self, challenge_id: str, *, now: dt.datetime | None = None) -> tuple[str, bool]:
        """Reveal the private half of ``challenge_id``. Returns (closed time, newly closed?)."""
        with self._write() as conn:
            closed = conn.execute(sa.select(challenges.c.closed_utc).where(
                challenges.c.challenge_id == challenge_id).with_for_update()).one_or_none()
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
        known = conn.execute(sa.select(challenges.c.key_commitment).where(
            challenges.c.challenge_id == challenge.challenge_id)).scalar()
        if known is None:
            conn.execute(_insert_ignoring_conflict(conn, challenges, {
                "challenge_id": challenge.challenge_id, "task": challenge.task, "preset": challenge.preset,
                "n_encoded": int(challenge.n_encoded), "key_commitment": challenge.key_commitment,
                "encoder_config": challenge.encoder_config, "created_utc": _stamp(now), "closed_utc": None,
            }, ["challenge_id"]))
        elif known != challenge.key_commitment:
            raise NcbenchError(f"the database already holds a challenge {challenge.challenge_id!r} with another "
                               f"key commitment: this key belongs to a different challenge")

    def _lock_team(self, conn: Connection, name: str, now: dt.datetime) -> int:
        """The team's id, creating the team if new, with its row locked for this transaction."""
        conn.execute(_insert_ignoring_conflict(conn, teams, {"name": name, "created_utc": _stamp(now)}, ["name"]))
        return int(conn.execute(sa.select(teams.c.id).where(teams.c.name == name).with_for_update()).scalar_one())

    # -- public queries ------------------------------------------------------------------------

    def challenges(self) -> pd.DataFrame:
        """One row per challenge: id, task, preset, n_encoded, encoder_config (JSON), created_utc,
        closed_utc (None while open) and the number of scored submissions."""
        count = (sa.select(sa.func.count()).select_from(submissions)
                 .where(submissions.c.challenge_id == challenges.c.challenge_id,
                        submissions.c.status == STATUS_SCORED).scalar_subquery())
        query = sa.select(challenges.c.challenge_id, challenges.c.task, challenges.c.preset, challenges.c.n_encoded,
                          challenges.c.encoder_config, challenges.c.created_utc, challenges.c.closed_utc,
                          count.label("submissions")).order_by(challenges.c.challenge_id)
        with self._read() as conn:
            return pd.DataFrame(conn.execute(query).mappings().all(), columns=[
                "challenge_id", "task", "preset", "n_encoded", "encoder_config", "created_utc", "closed_utc",
                "submissions"])

    def results(self, *, include_private: bool = False, challenge_id: str | None = None) -> pd.DataFrame:
        """One row per scored submission and visible split, one column per metric.

        Columns: submission_id, challenge_id, task, preset, team, attack, attack_version,
        runtime_s, created_utc, split ('public' / 'private'), then the metrics. The private half
        appears only for closed challenges unless ``include_private`` (organizers).
        """
        base = self._visible_scores(include_private, challenge_id)
        with self._read() as conn:
            long = pd.DataFrame(conn.execute(base).mappings().all())
        info_columns = ["submission_id", "challenge_id", "task", "preset", "team", "attack", "attack_version",
                        "runtime_s", "created_utc", "split"]
        if long.empty:
            return pd.DataFrame(columns=info_columns)
        keys = ["submission_id", "split"]
        values = long.pivot_table(index=keys, columns="metric", values="value", aggfunc="first").reset_index()
        values.columns.name = None
        wide = long[info_columns].drop_duplicates(keys).merge(values, on=keys)
        wide = wide.sort_values(["challenge_id", "split", "submission_id"], kind="stable").reset_index(drop=True)
        wide["split"] = wide["split"].map(SPLIT_NAMES)
        return wide

    def submission(self, submission_id: int, *, include_private: bool = False) -> dict | None:
        """A scored submission's details: attributes, params, notes and metrics per visible split."""
        query = (sa.select(submissions, teams.c.name.label("team"), challenges.c.task, challenges.c.preset,
                           challenges.c.closed_utc, challenges.c.n_encoded)
                 .join(teams, teams.c.id == submissions.c.team_id)
                 .join(challenges, challenges.c.challenge_id == submissions.c.challenge_id)
                 .where(submissions.c.id == int(submission_id), submissions.c.status == STATUS_SCORED))
        with self._read() as conn:
            row = conn.execute(query).mappings().one_or_none()
            if row is None:
                return None
            visible = [0, 1] if include_private or row["closed_utc"] is not None else [0]
            metric_rows = conn.execute(sa.select(scores.c.split, scores.c.metric, scores.c.value).where(
                scores.c.submission_id == int(submission_id), scores.c.split.in_(visible))).all()
        details = dict(row)
        for name in ("params", "knowledge", "notes"):
            details[name] = json.loads(details[name])
        details["metrics"] = {SPLIT_NAMES[s]: {} for s in visible}
        for split, metric, value in metric_rows:
            details["metrics"][SPLIT_NAMES[split]][metric] = value
        return details

    def utility(self) -> pd.DataFrame:
        """Every utility result: preset, label, auc, model_kind, settings (dict), created_utc."""
        with self._read() as conn:
            frame = pd.DataFrame(conn.execute(sa.select(utility_results).order_by(utility_results.c.id)).mappings().all(),
                                 columns=[c.name for c in utility_results.columns])
        frame["settings"] = frame["settings"].map(json.loads)
        return frame

    def counts(self) -> dict[str, int]:
        """Rows per table (what tests compare to show a failure left the database untouched)."""
        with self._read() as conn:
            return {table.name: int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar())
                    for table in (challenges, teams, submissions, scores, utility_results)}

    def _visible_scores(self, include_private: bool, challenge_id: str | None) -> sa.Select:
        query = (sa.select(submissions.c.id.label("submission_id"), submissions.c.challenge_id, challenges.c.task,
                           challenges.c.preset, teams.c.name.label("team"), submissions.c.attack,
                           submissions.c.attack_version, submissions.c.runtime_s, submissions.c.created_utc,
                           scores.c.split, scores.c.metric, scores.c.value)
                 .join(submissions, submissions.c.id == scores.c.submission_id)
                 .join(teams, teams.c.id == submissions.c.team_id)
                 .join(challenges, challenges.c.challenge_id == submissions.c.challenge_id)
                 .where(submissions.c.status == STATUS_SCORED))
        if not include_private:
            # The private half stays hidden until the organizer closes the challenge.
            query = query.where(sa.or_(scores.c.split == 0, challenges.c.closed_utc.is_not(None)))
        if challenge_id is not None:
            query = query.where(submissions.c.challenge_id == challenge_id)
        return query


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
    name = (team or "").strip()
    if not name or len(name) > MAX_TEAM_NAME or not name.isprintable():
        raise NcbenchError(f"team name must be 1-{MAX_TEAM_NAME} printable characters, got {team!r}")
    return name


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
    return {"preset": preset, "label": label, "auc": auc, "model_kind": kind, "settings": settings,
            "created_utc": str(row.get("created_utc") or stamp)}


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
