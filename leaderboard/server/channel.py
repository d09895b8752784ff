"""The live challenge's state: published challenges, team tokens and the durable job queue.

Everything lives in the results database (tables in :mod:`leaderboard.store`), so the API, the
scoring workers and the board can run in separate processes, or on several machines over
PostgreSQL. Files live in a store folder::

    <store>/public/<challenge_id>/<name>   what attackers download (release.h5, SHA256SUMS)
    <store>/keys/<challenge_id>/key.h5      the key: no route serves anything below keys/
    <store>/uploads/<sha256>                 submissions, by content hash
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from ncbench.errors import NcbenchError
from ncbench.leaderboard import isolated, workqueue
from ncbench.leaderboard.store import (
    BUILTIN_TEAM,
    DEFAULT_DAILY_LIMIT,
    ORIGIN_ORGANIZER,
    ORIGIN_SELF,
    Store,
    _stamp,
    challenges,
    check_not_lookalike,
    check_team_name,
    jobs,
    published,
    team_tokens,
    teams,
    utc_now,
    verified_runs,
)
from ncbench.private import create_private_file, private_dir

TOKEN_PREFIX = "ncb"
MAX_ROW_ID = 2**31 - 1  # the largest id a row can have (PostgreSQL INTEGER); larger ones name no row
# ncb_<row id>_<secret>: ASCII digits only (str.isdigit also takes '²' and other digits int() refuses)
TOKEN = re.compile(rf"{TOKEN_PREFIX}_([0-9]{{1,10}})_([A-Za-z0-9_-]{{1,100}})")
RATE_LIMIT_PER_MINUTE = 10  # uploads a team may queue per minute, whatever their outcome
# The job of a file whose scorer child died (a signal, its memory or time limit): fixed words, since
# nothing the child printed is the team's to read; it counts against the daily limit like a score.
SCORER_KILLED = "scoring this file went past the scorer's memory or time limit; it counts as a submission"


HMAC_PREFIX = "hmac-sha256:"  # team_tokens.token_hash of a token issued since migration 8


def token_key(layout: workqueue.StoreLayout) -> bytes:
    """The server's secret that keys token hashes (32 random bytes, hex, in a 0600 file of the
    store), created on first use. Without it a leaked database cannot even test a token."""
    path = layout.token_secret
    if not path.exists():  # written whole, then linked into place: a second server reads all of it or none
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        create_private_file(tmp)
        tmp.write_text(secrets.token_hex(32) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        tmp.unlink()
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) < 32:
        raise NcbenchError(
            f"{path} does not hold a token secret (64 hex digits); restore it, or remove it and re-issue every token"
        )
    return key


def _token_hash(key: bytes, secret: str) -> str:
    # Tokens are 256 random bits: nothing to slow down a guess of, so a keyed hash (microseconds)
    # replaces a password hash (argon2id: about half a second of CPU per request).
    return HMAC_PREFIX + hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Job:
    id: int
    challenge_id: str
    team: str
    sha256: str
    state: str
    message: str | None
    submission_id: int | None
    created_utc: str


# -- organizer operations ----------------------------------------------------------------------


def publish(
    store: Store,
    layout: workqueue.StoreLayout,
    release_dir: Path,
    *,
    daily_limit: int = DEFAULT_DAILY_LIMIT,
    deadline: dt.datetime | None = None,
    recompute: bool = True,
    republish: bool = False,
    blind: bool = False,
) -> str:
    """Register a built challenge: copy its public files to be served and its key to the store.

    The release is verified against its key first (checksums, commitment, release_sha256, and
    with ``recompute`` every encoding recomputed; without it, checksums only, for a release the
    caller has just built). Returns the challenge id. Publishing a challenge that is already
    published is refused unless ``republish``: then its files are copied again and its daily
    limit, deadline and ``blind`` replaced (never silently reset to the defaults). A ``blind``
    challenge hides its public-half scores too, from every reader, until it is closed.
    """
    from ncbench.challenge.files import ReleaseLayout, open_key, open_release
    from ncbench.challenge.verify import verify
    from ncbench.leaderboard.scoring import ChallengeInfo

    source = ReleaseLayout(Path(release_dir))
    if not source.release.is_file() or not source.key.is_file():
        raise NcbenchError(f"{release_dir} is not a built challenge (needs public/release.h5 and private/key.h5)")
    if daily_limit < 1:
        raise NcbenchError(f"--daily-limit must be at least 1, got {daily_limit}")
    problems = verify(source.root, source.key if recompute else None)
    if problems:
        raise NcbenchError(f"{release_dir} does not verify: {problems[0]}")
    with open_release(source.release) as release, open_key(source.key):
        info = ChallengeInfo.from_release(release)
    if not republish and public_files(store, info.challenge_id) is not None:
        raise NcbenchError(
            f"challenge {info.challenge_id} is already published; give --republish to replace its "
            "files, daily limit, deadline and blindness with the values given now"
        )
    public_dir, key_path = layout.public_dir(info.challenge_id), layout.key_file(info.challenge_id)
    files = []
    for path in sorted(source.public.iterdir()):
        if path.is_file() and not path.is_symlink():
            files.append({"name": path.name, "size": path.stat().st_size, "sha256": _sha256(path)})
    public_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        _copy_atomic(source.public / f["name"], public_dir / f["name"])
    private_dir(key_path.parent.parent)  # keys/ and keys/<id>/ 0700, the key 0600, whatever the umask
    private_dir(key_path.parent)
    _copy_atomic(source.key, key_path, private=True)
    now = utc_now()
    with store._write() as conn:
        store._ensure_challenge(conn, info, now)
        values = {
            "files": json.dumps(files),
            "daily_limit": daily_limit,
            "deadline_utc": _stamp(deadline) if deadline else None,
            "blind": blind,
        }
        updated = conn.execute(
            published.update().where(published.c.challenge_id == info.challenge_id).values(**values)
        ).rowcount
        if not updated:
            conn.execute(published.insert().values(challenge_id=info.challenge_id, published_utc=_stamp(now), **values))
    return info.challenge_id


def add_team(store: Store, name: str, *, key: bytes) -> tuple[str, str]:
    """Create ``name`` (or reuse it) and issue a new token. Returns (normalised name, token).

    The token is shown once: only its HMAC-SHA256 under the server's ``key`` (:func:`token_key`)
    is stored.
    """
    name = check_team_name(name)
    check_not_lookalike(name)
    secret = secrets.token_urlsafe(32)
    now = utc_now()
    with store._write() as conn:
        team_id = store._lock_team(conn, name, now)
        token_id = conn.execute(
            team_tokens.insert()
            .values(
                team_id=team_id,
                token_hash=_token_hash(key, secret),
                created_utc=_stamp(now),
                revoked_utc=None,
            )
            .returning(team_tokens.c.id)
        ).scalar_one()
    return name, f"{TOKEN_PREFIX}_{token_id}_{secret}"


def revoke_team(store: Store, name: str) -> int:
    """Revoke every token of ``name``. Returns how many were active."""
    name = check_team_name(name)
    with store._write() as conn:
        team_id = conn.execute(sa.select(teams.c.id).where(teams.c.name == name)).scalar()
        if team_id is None:
            raise NcbenchError(f"no team {name!r}")
        return conn.execute(
            team_tokens.update()
            .where(team_tokens.c.team_id == team_id, team_tokens.c.revoked_utc.is_(None))
            .values(revoked_utc=_stamp(utc_now()))
        ).rowcount


def list_teams(store: Store) -> list[dict]:
    active = sa.func.count(team_tokens.c.id).filter(team_tokens.c.revoked_utc.is_(None))
    with store._read() as conn:
        rows = conn.execute(
            sa.select(teams.c.name, teams.c.created_utc, active.label("active_tokens"))
            .select_from(teams.outerjoin(team_tokens, team_tokens.c.team_id == teams.c.id))
            .group_by(teams.c.id)
            .order_by(teams.c.name)
        ).all()
    return [dict(row._mapping) for row in rows]


# -- attacker side -----------------------------------------------------------------------------


def authenticate(store: Store, token: str | None, *, key: bytes) -> str | None:
    """The team a bearer token belongs to, or None (unknown, malformed or revoked).

    The token names its row, so one HMAC is computed, never a scan, and compared in constant
    time. A token issued before migration 8 (an argon2id row) was revoked by it.
    """
    match = TOKEN.fullmatch(token or "")
    if match is None or int(match[1]) > MAX_ROW_ID:
        return None
    with store._read() as conn:
        row = conn.execute(
            sa.select(team_tokens.c.token_hash, team_tokens.c.revoked_utc, teams.c.name)
            .join(teams, teams.c.id == team_tokens.c.team_id)
            .where(team_tokens.c.id == int(match[1]))
        ).one_or_none()
    presented = _token_hash(key, match[2])  # computed whether or not the row exists
    if row is None or row.revoked_utc is not None:
        return None
    return row.name if hmac.compare_digest(presented, row.token_hash) else None


def open_challenges(store: Store) -> list[dict]:
    with store._read() as conn:
        rows = conn.execute(
            sa.select(
                challenges.c.challenge_id,
                challenges.c.task,
                challenges.c.preset,
                challenges.c.n_encoded,
                published.c.daily_limit,
                published.c.deadline_utc,
                published.c.blind,
                published.c.files,
            )
            .join(published, published.c.challenge_id == challenges.c.challenge_id)
            .where(challenges.c.closed_utc.is_(None))
            .order_by(challenges.c.challenge_id)
        ).all()
    return [{**dict(row._mapping), "blind": bool(row.blind), "files": json.loads(row.files)} for row in rows]


def public_files(store: Store, challenge_id: str) -> list[dict] | None:
    with store._read() as conn:
        files = conn.execute(sa.select(published.c.files).where(published.c.challenge_id == challenge_id)).scalar()
    return None if files is None else json.loads(files)


def admit(store: Store, *, team: str, challenge_id: str, now: dt.datetime | None = None) -> None:
    """The checks :func:`enqueue` makes, made before an upload's body is read, so that a refused
    upload costs no bytes: UnknownChallenge (closed, past its deadline, unknown) or LimitReached."""
    now = now or utc_now()
    with store._read() as conn:
        daily_limit = _open_limit(conn, challenge_id, now)
        team_id = conn.execute(sa.select(teams.c.id).where(teams.c.name == team)).scalar()
        if team_id is not None and team != BUILTIN_TEAM:
            _check_limits(conn, team, team_id, challenge_id, daily_limit, now)


def enqueue(
    store: Store,
    *,
    team: str,
    challenge_id: str,
    sha256: str,
    size: int,
    now: dt.datetime | None = None,
    stage: Callable[[], None] | None = None,
) -> int:
    """Queue an upload for scoring, after the rate limit and the daily limit; returns the job's
    id (the submission's too, once scored), that of the team's earlier job when it sent the same
    bytes (queued, running or scored), without counting them again. A closed challenge takes no upload.

    ``stage`` (moving the upload into the store) runs only once the upload is admitted and
    before its job can be claimed, so a refused upload is never stored. Jobs that are queued,
    running or scored count towards the daily limit (refused and failed ones do not), so a team
    cannot queue past its limit and have the excess scored later.
    """
    now = now or utc_now()
    with store._write() as conn:
        daily_limit = _open_limit(conn, challenge_id, now)
        team_id = store._lock_team(conn, team, now)
        # The same bytes again are the same answer: the job already queued or scored stands,
        # and nothing new counts against a limit (a failed or refused one may be retried).
        earlier = conn.execute(
            sa.select(jobs.c.id)
            .where(
                jobs.c.team_id == team_id,
                jobs.c.challenge_id == challenge_id,
                jobs.c.sha256 == sha256,
                jobs.c.state.in_(("queued", "running", "scored")),
            )
            .order_by(jobs.c.id)
            .limit(1)
        ).scalar()
        if earlier is not None:
            return int(earlier)
        if team != BUILTIN_TEAM:  # the organizer's own runs of the built-in attacks: no limits
            _check_limits(conn, team, team_id, challenge_id, daily_limit, now)
        if stage is not None:
            stage()
        return _insert_job(conn, challenge_id, team_id, sha256, size, now)


def _open_limit(conn, challenge_id: str, now: dt.datetime) -> int:
    """The daily limit of a published challenge that takes uploads now, or UnknownChallenge."""
    return int(workqueue.open_challenge(conn, challenge_id, now, published.c.daily_limit).daily_limit)


def _check_limits(conn, team: str, team_id: int, challenge_id: str, daily_limit: int, now: dt.datetime) -> None:
    recent = workqueue.count_since(
        conn, jobs, _stamp(now - dt.timedelta(minutes=1)), jobs.c.team_id == team_id, uploads()
    )
    if recent >= RATE_LIMIT_PER_MINUTE:
        raise workqueue.LimitReached(
            f"rate limit: at most {RATE_LIMIT_PER_MINUTE} uploads a minute per team; retry shortly"
        )
    used = workqueue.used_today(conn, jobs, team_id, challenge_id, now, counted())
    if used >= daily_limit:
        raise workqueue.LimitReached(
            f"team {team!r} has used its {daily_limit} submissions for {challenge_id} "
            "today (UTC); refused ones do not count, the limit resets at midnight UTC"
        )


def uploads():
    """The jobs that are uploads: queued, or claimed by a worker at least once. A job the store
    wrote for a submission recorded without the server (the organizer's ``ncbench score``) is
    born final and never claimed; it counts against the daily limit, not the upload rate."""
    return sa.or_(jobs.c.state == "queued", jobs.c.attempts > 0)


def counted():
    """The jobs that count against the daily limit: queued, running, scored, and files that
    killed their scorer (a bomb costs its sender a submission, each time)."""
    return sa.or_(jobs.c.state.in_(("queued", "running", "scored")), jobs.c.message == SCORER_KILLED)


def _insert_job(conn, challenge_id: str, team_id: int, sha256: str, size: int, now: dt.datetime) -> int:
    return workqueue.insert_queued(
        conn, jobs, now, challenge_id=challenge_id, team_id=team_id, sha256=sha256, size=size, submission_id=None
    )


def job(store: Store, job_id: int, *, team: str | None = None) -> Job | None:
    """One job (only the team's own when ``team`` is given)."""
    found = _jobs(store, jobs.c.id == job_id, team)
    return found[0] if found else None


def places(store: Store, job_ids) -> dict[int, int]:
    """For each of ``job_ids``: the queued jobs, every team's, that will be scored before it (0:
    it is next)."""
    return workqueue.places(store, jobs, job_ids)


def team_jobs(store: Store, team: str) -> list[Job]:
    return _jobs(store, sa.true(), team)


def _jobs(store: Store, condition, team: str | None) -> list[Job]:
    query = (
        sa.select(
            jobs.c.id,
            jobs.c.challenge_id,
            teams.c.name.label("team"),
            jobs.c.sha256,
            jobs.c.state,
            jobs.c.message,
            jobs.c.submission_id,
            jobs.c.created_utc,
        )
        .join(teams, teams.c.id == jobs.c.team_id)
        .where(condition)
        .order_by(jobs.c.id)
    )
    if team is not None:
        query = query.where(teams.c.name == team)
    with store._read() as conn:
        return [Job(**row._mapping) for row in conn.execute(query).all()]


# -- worker side -------------------------------------------------------------------------------


def requeue_interrupted(store: Store) -> int:
    """At start-up: scoring jobs left ``running`` by a server that died run again."""
    return workqueue.requeue_interrupted(store, jobs)


def claim(store: Store, limit: int) -> list[int]:
    """Move up to ``limit`` queued scoring jobs to ``running``, oldest first; returns their ids."""
    return workqueue.claim(store, limit, jobs)


def finish(
    store: Store, job_id: int, state: str, *, message: str | None = None, submission_id: int | None = None
) -> None:
    workqueue.finish(store, jobs, job_id, state, message=message, limit=2000, submission_id=submission_id)


def run_job(db_url: str, store_root: str, job_id: int) -> str:
    """Score one claimed job and record its outcome; runs on a Dask worker (any process that
    can reach the database and the store folder), the file itself parsed in a limited child
    (:mod:`leaderboard.isolated`). Returns the final state."""
    layout = workqueue.StoreLayout(Path(store_root))
    with Store(db_url, create=False) as store:
        with store._read() as conn:
            row = conn.execute(
                sa.select(jobs, teams.c.name.label("team"), published.c.daily_limit)
                .join(teams, teams.c.id == jobs.c.team_id)
                .join(published, published.c.challenge_id == jobs.c.challenge_id)
                .where(jobs.c.id == job_id)
            ).one()
        if row.attempts > workqueue.ATTEMPTS_BEFORE_FAILED:
            finish(store, job_id, "failed", message="the scorer crashed on this file repeatedly")
            return "failed"
        try:
            result = isolated.score_isolated(
                layout.upload(row.sha256),
                layout.key_file(row.challenge_id),
                layout.public_dir(row.challenge_id) / "release.h5",
                died=SCORER_KILLED,
            )
            # The limit was checked when the job was queued; the store's own check would count
            # this job's sibling jobs twice.
            # The organizer's token (team ncbench-builtin) records its runs of the built-in
            # attacks as the organizer's rows; every other team's file is self-reported.
            origin = ORIGIN_ORGANIZER if row.team == BUILTIN_TEAM else ORIGIN_SELF
            # The submission takes this job's id: one id for the API, the CLI and the board.
            recorded = store.record_score(
                result, team=row.team, daily_limit=None, origin=origin, job_id=job_id, size=row.size
            )
        except isolated.ChildKilled:
            finish(store, job_id, "failed", message=SCORER_KILLED)  # at once: the next try would die too
            return "failed"
        except NcbenchError as error:
            return refuse(store, layout, job_id, row.sha256, redact(str(error), layout, row.sha256))
        except Exception as error:  # noqa: BLE001 - a scorer bug: recorded, the server keeps serving
            text = redact(f"scorer error: {type(error).__name__}: {error}", layout, row.sha256)
            finish(store, job_id, "failed", message=text)
            return "failed"
        if recorded.submission_id != job_id:  # the team's file was already scored under another id
            return refuse(store, layout, job_id, row.sha256, already_scored(recorded.submission_id))
        finish(store, job_id, "scored", submission_id=recorded.submission_id)
        return "scored"


def refuse(store: Store, layout: workqueue.StoreLayout, job_id: int, sha256: str, message: str) -> str:
    """Job ``job_id`` ends ``refused`` with ``message``, and its file leaves the store unless
    something else names it (:func:`forget_upload`): a refused file does not count against the
    daily limit, so keeping it would let a team fill the disk. Returns the state."""
    finish(store, job_id, "refused", message=message)
    forget_upload(store, layout, sha256)
    return "refused"


def forget_upload(store: Store, layout: workqueue.StoreLayout, sha256: str) -> bool:
    """Delete ``uploads/<sha256>`` unless a job that is not refused (queued, running, scored,
    failed: any team's) or a verified run names it; True when it was deleted.

    Uploads are stored by content hash, so a team may be sending the same bytes right now:
    :func:`enqueue` (and the verified track's) moves the file into place and inserts its row in
    one write transaction, and this check and the deletion hold the lock such transactions
    need. Either that row is committed and seen here, or the file is moved in again after
    the deletion."""
    with store._write() as conn:  # SQLite: BEGIN IMMEDIATE, every other writer waits
        if store.url.get_backend_name() == "postgresql":
            # Every enqueue inserts into teams (Store._lock_team) before it stages its file: a
            # SHARE lock on teams waits for those under way and holds off new ones until this ends.
            conn.execute(sa.text(f"LOCK TABLE {teams.name} IN SHARE MODE"))
        named = conn.execute(
            sa.select(
                sa.exists().where(jobs.c.sha256 == sha256, jobs.c.state != "refused")
                | sa.exists().where(verified_runs.c.plugin_sha256 == sha256)
            )
        ).scalar()
        if not named:
            layout.upload(sha256).unlink(missing_ok=True)
    return not named


def already_scored(submission_id: int) -> str:
    """Why a job was not scored again: its file is the team's submission ``submission_id``."""
    return f"the same file as your submission {submission_id}, already scored: not counted again"


# -- files -------------------------------------------------------------------------------------


def redact(message: str, layout: workqueue.StoreLayout, sha256: str | None = None, upload: Path | None = None) -> str:
    """:meth:`workqueue.StoreLayout.redact` of ``message`` with the team's file: the upload
    being received, or the stored one of ``sha256``."""
    return layout.redact(message, *(path for path in (upload, layout.upload(sha256) if sha256 else None) if path))


def _sha256(path: Path) -> str:
    from ncbench.h5io import sha256_file

    return sha256_file(path)


def _copy_atomic(source: Path, target: Path, *, private: bool = False) -> None:
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    if private:
        create_private_file(tmp)  # copyfile keeps the mode of the file it overwrites
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class UploadWriter:
    """Writes an upload stream to the store by content hash, chunk by chunk (never whole in
    memory), refusing it past ``max_bytes``; nothing is left behind unless :meth:`commit` runs."""

    def __init__(self, layout: workqueue.StoreLayout, *, max_bytes: int):
        private_dir(layout.incoming)  # a team's answers are not for other local users
        private_dir(layout.upload("x").parent)
        self.layout, self.max_bytes = layout, max_bytes
        self.tmp = layout.incoming / secrets.token_hex(8)
        self.handle = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit() or discard()
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.discard()
            raise NcbenchError(f"upload larger than the {self.max_bytes} byte limit")
        self.digest.update(chunk)
        self.handle.write(chunk)

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()

    def finish(self) -> Path:
        """Close the file, still outside the store; returns where it is (for checks)."""
        self.handle.close()
        return self.tmp

    def commit(self) -> tuple[str, int]:
        """Move the file into the store by content hash; (sha256, size) of the stored file."""
        self.handle.close()
        os.replace(self.tmp, self.layout.upload(self.sha256))
        return self.sha256, self.size

    def discard(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)
