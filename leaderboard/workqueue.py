"""The durable work queue both kinds of job share: scoring jobs (answer files) and verified runs.

Rows of a queue table (``jobs`` or ``verified_runs`` in :mod:`ncbench.leaderboard.store`) move
``queued -> running -> scored | refused | failed``; the server's workers claim them, a restart
requeues what a dead server left ``running``. Only the table differs between the two kinds, so
the state changes and the daily counts live here once.

Several servers may share one PostgreSQL database. A ``running`` row is then leased: whoever
holds it (the dispatcher that claimed it, the worker that runs it) touches its ``updated_utc``
every HEARTBEAT_S, and any server queues again a row nobody touched for LEASE_S, so a server
that dies is not needed back for its jobs to be scored.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import datetime as dt
import threading
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from ncbench.errors import NcbenchError, one_line
from ncbench.leaderboard.store import Store, _stamp, challenges, published, utc_now

ATTEMPTS_BEFORE_FAILED = 3  # a job that crashed its worker this often is marked failed
HEARTBEAT_S = 5.0  # how often the holder of a running row touches it
LEASE_S = 30.0  # a running row untouched this long has lost its holder: it is queued again
# pg_advisory_xact_lock key ("ncbq") serialising claims of one-per-value queues across servers
_PG_ONE_PER_LOCK = 0x6E63_6271
# pg_advisory_lock key ("ncbd") every live dispatcher holds shared; exclusive means alone
_PG_DISPATCHER_LOCK = 0x6E63_6264
FINAL_STATES = ("scored", "refused", "failed")


class LimitReached(NcbenchError):
    """A rate or daily limit refused the upload (HTTP 429)."""


class UnknownChallenge(NcbenchError):
    """No open, published challenge by that id (HTTP 404)."""


@dataclass(frozen=True)
class StoreLayout:
    """Where the server keeps files; only ``public_dir`` is ever served."""

    root: Path

    def public_dir(self, challenge_id: str) -> Path:
        return self.root / "public" / challenge_id

    def key_file(self, challenge_id: str) -> Path:
        return self.root / "keys" / challenge_id / "key.h5"

    def upload(self, sha256: str) -> Path:
        return self.root / "uploads" / sha256

    def redact(self, message: str, *files: Path) -> str:
        """``message`` for a team to read: each of ``files`` (the team's own) becomes "your
        file", anything else in the store "<store>/...", so no server path reaches a team."""
        for path in files:
            message = message.replace(str(path), "your file")
        return message.replace(str(self.root), "<store>")

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    def secret_paths(self) -> list[Path]:
        """What only the server's user may read: the store folder, every key and its folders,
        the uploads (a team's answers) and the server's token secret."""
        keys = self.root / "keys"
        found = [self.root, keys, self.incoming, self.root / "uploads", self.token_secret]
        # Published keys and their folders; the verified track's evaluation releases below
        # keys/verified/ are private by keys/ itself (and their private/ folders by the build).
        for key in sorted(keys.glob("*/key.h5")):
            found += [key.parent, key]
        return found

    @property
    def token_secret(self) -> Path:
        return self.root / "token-secret"


def open_challenge(conn, challenge_id: str, now: dt.datetime, *columns):
    """``columns`` of a published challenge that takes submissions at ``now``; UnknownChallenge
    when it is unknown, unpublished, closed or past its deadline."""
    row = conn.execute(
        sa.select(challenges.c.closed_utc, published.c.deadline_utc, *columns)
        .join(published, published.c.challenge_id == challenges.c.challenge_id)
        .where(challenges.c.challenge_id == challenge_id)
    ).one_or_none()
    if row is None:
        raise UnknownChallenge(f"no open challenge {challenge_id!r}")
    if row.closed_utc is not None:
        raise UnknownChallenge(f"challenge {challenge_id} is closed since {row.closed_utc}")
    if row.deadline_utc is not None and _stamp(now) > row.deadline_utc:
        raise UnknownChallenge(f"challenge {challenge_id} closed for submissions at {row.deadline_utc}")
    return row


def day_start(now: dt.datetime) -> str:
    """The stamp of midnight UTC that starts ``now``'s day: daily limits reset there."""
    return _stamp(now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0))


def count_since(conn, table: sa.Table, since: str, *conditions) -> int:
    """Rows of ``table`` created at or after the stamp ``since`` that meet every condition."""
    query = sa.select(sa.func.count()).select_from(table).where(table.c.created_utc >= since, *conditions)
    return int(conn.execute(query).scalar())


def used_today(conn, table: sa.Table, team_id: int, challenge_id: str, now: dt.datetime, *conditions) -> int:
    """Rows ``team_id`` created in ``table`` for ``challenge_id`` since midnight UTC (daily limits)."""
    return count_since(
        conn, table, day_start(now), table.c.team_id == team_id, table.c.challenge_id == challenge_id, *conditions
    )


def insert_queued(conn, table: sa.Table, now: dt.datetime, **values) -> int:
    """A new ``queued`` row of ``table`` with ``values``; returns its id."""
    stamp = _stamp(now)
    return int(
        conn.execute(
            table.insert()
            .values(state="queued", message=None, attempts=0, created_utc=stamp, updated_utc=stamp, **values)
            .returning(table.c.id)
        ).scalar_one()
    )


def requeue_interrupted(store: Store, table: sa.Table) -> int:
    """At start-up: work left ``running`` in ``table`` by a server that died runs again. Scoring
    is idempotent (a file already scored for the team is recorded once); a verified run keeps
    its committed seeds, so a rebuild is the same."""
    with store._write() as conn:
        return conn.execute(
            table.update().where(table.c.state == "running").values(state="queued", updated_utc=_stamp(utc_now()))
        ).rowcount


def requeue_stale(store: Store, table: sa.Table, *, lease_s: float = LEASE_S, now: dt.datetime | None = None) -> int:
    """Rows of ``table`` left ``running`` and untouched for ``lease_s`` (their server and worker
    died) are queued again; returns how many."""
    now = now or utc_now()
    with store._write() as conn:
        return conn.execute(
            table.update()
            .where(table.c.state == "running", table.c.updated_utc < _stamp(now - dt.timedelta(seconds=lease_s)))
            .values(state="queued", updated_utc=_stamp(now))
        ).rowcount


def places(store: Store, table: sa.Table, row_ids, *conditions, fair_by=None) -> dict[int, int]:
    """For each of ``row_ids``: how many queued rows of ``table`` that meet ``conditions`` come
    before it in the order claims take them (:func:`claim`; ``fair_by`` as there), so its place
    in its queue (0: next). One or two queries however many rows are asked about."""
    row_ids = list(row_ids)
    if not row_ids:
        return {}
    with store._read() as conn:
        if fair_by is not None:
            query = sa.select(table.c.id).where(table.c.state == "queued", *conditions)
            place = {row_id: ahead for ahead, row_id in enumerate(_in_turns(conn, table, query, fair_by))}
            return {row_id: place[row_id] for row_id in row_ids if row_id in place}
        queued = (
            conn.execute(
                sa.select(table.c.id)
                .where(table.c.state == "queued", table.c.id < max(row_ids), *conditions)
                .order_by(table.c.id)
            )
            .scalars()
            .all()
        )
    return {row_id: bisect.bisect_left(queued, row_id) for row_id in row_ids}


def _in_turns(conn, table: sa.Table, query, fair_by, *, lock: bool = False) -> list[int]:
    """The ids ``query`` selects in the order the values of ``fair_by`` take turns: in each
    round one row of each value, its oldest left, the values ordered by when their rows last
    started (never first, then longest ago). A sort, so that listing a long queue stays cheap."""
    if lock:
        query = query.with_for_update(skip_locked=True)
    rows = conn.execute(query.add_columns(fair_by).order_by(table.c.id)).all()
    values = {value for _, value in rows}
    started = sa.select(fair_by, sa.func.max(table.c.started_utc)).where(fair_by.in_(values)).group_by(fair_by)
    last = {value: stamp or "" for value, stamp in conn.execute(started).all()} if values else {}
    turn, first, keyed = collections.Counter(), {}, []
    for row_id, value in rows:
        first.setdefault(value, row_id)
        keyed.append(((turn[value], last.get(value, ""), first[value]), row_id))
        turn[value] += 1
    return [row_id for _, row_id in sorted(keyed)]


def touch(store: Store, table: sa.Table, row_ids) -> None:
    """Renew the lease of the rows ``row_ids`` of ``table`` that are still ``running``."""
    if row_ids:
        with store._write() as conn:
            conn.execute(
                table.update()
                .where(table.c.id.in_(list(row_ids)), table.c.state == "running")
                .values(updated_utc=_stamp(utc_now()))
            )


@contextlib.contextmanager
def leased(db_url: str, table: sa.Table, row_id: int):
    """While the block runs, a thread renews the lease of row ``row_id`` of ``table`` every
    HEARTBEAT_S, so that no server takes the job for one whose holder died."""
    stop = threading.Event()

    def beat() -> None:
        store = None  # opened at the first beat: most answer files are scored before it
        try:
            while not stop.wait(HEARTBEAT_S):
                try:
                    store = store or Store(db_url, create=False)
                    touch(store, table, [row_id])
                except NcbenchError:  # the database is away for a moment: the next beat may pass
                    pass
        finally:
            if store is not None:
                store.close()

    beater = threading.Thread(target=beat, name=f"ncbench-lease-{table.name}-{row_id}", daemon=True)
    beater.start()
    try:
        yield
    finally:
        stop.set()


class Presence:
    """Whether other dispatchers share the database. On PostgreSQL each live dispatcher holds a
    shared advisory lock on a connection of its own, released by PostgreSQL when its process
    dies; one that gets the lock exclusively is alone. A SQLite store serves one server."""

    def __init__(self, db_url: str):
        self.store = Store(db_url, create=False)
        self.connection = None
        if self.store.url.get_backend_name() == "postgresql":
            self.connection = self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def join(self) -> bool:
        """Announce this dispatcher; True when no other one is alive (nothing else runs jobs)."""
        if self.connection is None:
            return True
        lock = sa.text("SELECT pg_try_advisory_lock(:key)")
        alone = bool(self.connection.execute(lock, {"key": _PG_DISPATCHER_LOCK}).scalar())
        self.connection.execute(sa.text("SELECT pg_advisory_lock_shared(:key)"), {"key": _PG_DISPATCHER_LOCK})
        if alone:
            self.connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_DISPATCHER_LOCK})
        return alone

    def leave(self) -> None:
        if self.connection is not None:
            self.connection.close()  # the session ends, and its locks with it
            self.connection = None
        self.store.close()


def claim(store: Store, limit: int, table: sa.Table, *conditions, one_per=None, fair_by=None, **also) -> list[int]:
    """Move up to ``limit`` queued rows of ``table`` that meet ``conditions`` to ``running``,
    oldest first, counting the attempt and setting ``also`` (e.g. a start time); returns their
    ids. With ``one_per`` (a column, e.g. the team), at most one row per value runs at a time.
    With ``fair_by`` (a column; ``table`` has ``started_utc``), the values take turns: first a
    row of the value whose rows started longest ago, or never. ``SKIP LOCKED`` lets several
    servers on one PostgreSQL database claim side by side."""
    with store._write() as conn:
        query = sa.select(table.c.id).where(table.c.state == "queued", *conditions).order_by(table.c.id)
        if fair_by is not None:
            ids = _in_turns(conn, table, query.order_by(None), fair_by, lock=True)[:limit]
        elif one_per is None:
            ids = conn.execute(query.limit(limit).with_for_update(skip_locked=True)).scalars().all()
        else:
            if store.url.get_backend_name() == "postgresql":
                # Row locks cannot see a value another server is claiming in a transaction not yet
                # committed: one claimer at a time, which then sees every committed ``running`` row.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_ONE_PER_LOCK})
            running = sa.select(one_per).where(table.c.state == "running", *conditions)
            query = query.add_columns(one_per).where(one_per.not_in(running))
            ids, taken = [], set()
            for row_id, value in conn.execute(query.with_for_update(skip_locked=True)).all():
                if value not in taken and len(ids) < limit:
                    ids.append(row_id)
                    taken.add(value)
        if ids:
            conn.execute(
                table.update()
                .where(table.c.id.in_(ids))
                .values(state="running", attempts=table.c.attempts + 1, updated_utc=_stamp(utc_now()), **also)
            )
    return list(ids)


def finish(store: Store, table: sa.Table, row_id: int, state: str, *, message: str | None, limit: int, **also) -> None:
    """Row ``row_id`` of ``table`` ends in ``state`` with ``message`` (:func:`one_line`, at most
    ``limit`` characters) and ``also``."""
    with store._write() as conn:
        conn.execute(
            table.update()
            .where(table.c.id == row_id)
            .values(
                state=state,
                message=None if message is None else one_line(message, limit),
                updated_utc=_stamp(utc_now()),
                **also,
            )
        )
