"""The challenge server's HTTP API (FastAPI on uvicorn; OpenAPI at ``/openapi.json``, docs at ``/docs``).

What it guarantees: only files listed when a challenge was published are served, from the
store's public folder (never the key); every write needs a team token (``Authorization: Bearer
...``), checked by one HMAC-SHA256 under the server's secret after a per-client limit on
refused tokens; an upload is streamed to disk under a size cap, a pace and a per-team number
of bodies at once (:class:`UploadBounds`), and queued only after the rate and daily limits; a
submission's state is durable in the database; every refusal is one printable line.
A plugin for the verified track (a .py file, a wheel or an sdist) is stored and its admission
check queued, a job of the workers like its runs (:mod:`leaderboard.verified.runs`): no route
waits on an unpacker or a sandbox. The seeds of evaluation releases are served only once their
challenge has closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import math
import re
import stat
import threading
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ncbench import __version__
from ncbench.attacks.plugins import archive as plugin_archive
from ncbench.errors import NcbenchError, one_line
from ncbench.leaderboard import workqueue
from ncbench.leaderboard.server import channel
from ncbench.leaderboard.store import ORIGIN_SELF, Store
from ncbench.leaderboard.verified import runs as verified
from ncbench.leaderboard.verified import sandbox

CHALLENGE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
DEFAULT_MAX_UPLOAD = 1 << 30  # 1 GiB: a reid score matrix at N = 10,000 is 400 MB
CHECKS_PER_MINUTE = 10  # per team, whatever their outcome: each check starts a sandboxed interpreter
AUTH_FAILURES_PER_MINUTE = 20  # refused tokens per client address, then 429 without verifying
# Client addresses whose refused tokens are counted at once: beyond, the longest quiet is
# forgotten first. About 1 KiB each at most (20 times in a deque), so the table stays under 10 MB.
REFUSING_CLIENTS_KEPT = 10_000
DETAIL_LIMIT = 2000  # characters of a refusal's detail, as of a job's stored message
PARAMS_QUERY = Query(default=[], description="name=value (repeatable)")
# What the plugin route's fields look like, said in its OpenAPI description; the route checks
# them itself (and what no pattern says: a module only with an archive, a wheel's name), with a 400.
PLUGIN_FILENAME = f"^({verified.PLUGIN_FILE.pattern}|{verified.ARCHIVE_FILE.pattern}\\.(whl|tar\\.gz))$"


class Problem(BaseModel):
    """What every refusal answers: one line."""

    detail: str


WHY = {
    400: "a malformed request (an empty body, a bad range, a body cut off before its end)",
    401: "a missing, invalid or revoked token",
    404: "no such published challenge, file, or item of your team",
    408: "an upload body that arrived slower than the server's minimum pace",
    413: "a body over the size cap",
    416: "a range outside the file",
    429: "over a rate or daily limit, more uploads of the team at once than allowed, or too many refused tokens from this address",
    503: "the verified track is off on this server: no sandbox here",
}
AUTH = (401, 429)  # what the token check may answer on any route that needs one


def documented(*codes: int) -> dict:
    """The OpenAPI ``responses`` of a route's refusals (FastAPI documents its 200 and 422)."""
    return {code: {"model": Problem, "description": WHY[code]} for code in codes}


@dataclasses.dataclass(frozen=True)
class UploadBounds:
    """What one team's uploads may hold of the server while their bodies arrive. A connection
    receiving a body is one of the server's ``--max-connections``: bodies at once are capped per
    team (in this process), and a body must keep a minimum pace, so that no team holds many
    connections, or one for hours, with a trickle of bytes."""

    per_team: int = 4  # bodies of one team received at once (answer files and plugins), then 429
    grace_s: float = 30.0  # any body gets this long, whatever its pace (a slow start, a short stall)
    # then it must hold this much for each second past the grace (256 kbit/s, the slowest
    # uplinks): a 100 MB file has 30 s + 51 min, a 1 GiB one 9 h; a trickle is cut after 30 s (408)
    min_bytes_per_s: int = 32 << 10


class RefusedTokens:
    """Refused tokens per client address over the last ``window_s`` (in memory, thread-safe):
    :meth:`over_limit` once an address reached ``limit`` of them. The table forgets an address
    ``window_s`` after its last refusal, on the next refusal of any client, and keeps at most
    ``clients`` addresses (dropping the longest quiet): a flood from many addresses costs
    bounded memory, not memory for ever."""

    def __init__(
        self, *, limit: int = AUTH_FAILURES_PER_MINUTE, window_s: float = 60.0, clients: int = REFUSING_CLIENTS_KEPT
    ):
        self.limit, self.window_s, self.clients = limit, window_s, clients
        self._lock = threading.Lock()
        # In the order of each address's last refusal (moved to the end at each): the first is
        # the longest quiet.
        self._recent: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()

    def over_limit(self, client: str, now: float) -> bool:
        with self._lock:
            recent = self._recent.get(client)
            while recent and recent[0] <= now - self.window_s:
                recent.popleft()
            if recent is not None and not recent:
                del self._recent[client]
            return recent is not None and len(recent) >= self.limit

    def add(self, client: str, now: float) -> None:
        with self._lock:
            self._recent.setdefault(client, collections.deque()).append(now)
            self._recent.move_to_end(client)
            while self._recent and (
                len(self._recent) > self.clients or next(iter(self._recent.values()))[-1] <= now - self.window_s
            ):
                self._recent.popitem(last=False)

    def __len__(self) -> int:
        return len(self._recent)


def row_id():
    """A row id path parameter: past the database's integer range it is a 422 here, not an
    overflow (500) in the driver. One object per parameter: FastAPI writes its name into it."""
    return PathParam(ge=1, le=channel.MAX_ROW_ID)


def create_app(
    db_url: str,
    store_root: Path,
    *,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    verified_settings: verified.Settings | None = None,
    uploads: UploadBounds | None = None,
) -> FastAPI:
    store = Store(db_url)
    settings = verified_settings or verified.Settings()
    uploads = uploads or UploadBounds()
    recent_checks: dict[str, collections.deque] = collections.defaultdict(collections.deque)
    receiving: collections.Counter[str] = collections.Counter()  # per team: bodies coming now

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        store.close()

    app = FastAPI(
        title="ncbench challenge server",
        version=__version__,
        lifespan=lifespan,
        description="Fetch challenge releases, submit answers or attack plugins, read your scores.",
    )
    layout = workqueue.StoreLayout(Path(store_root))
    token_key = channel.token_key(layout)
    refused_tokens = RefusedTokens()

    @app.exception_handler(StarletteHTTPException)
    async def one_line_refusal(request: Request, error: StarletteHTTPException):
        """Every refusal's detail is one printable line, whatever text it quotes (a file name, a
        parameter, an error of a library)."""
        if isinstance(error.detail, str):
            error.detail = one_line(error.detail, DETAIL_LIMIT)
        return await http_exception_handler(request, error)

    def team(request: Request, authorization: str | None = Header(default=None)) -> str:
        client = request.client.host if request.client else "?"
        if refused_tokens.over_limit(client, time.monotonic()):  # before any verification: a guesser waits
            raise HTTPException(429, f"too many refused tokens: at most {AUTH_FAILURES_PER_MINUTE} a minute")
        scheme, _, token = (authorization or "").partition(" ")
        name = channel.authenticate(store, token.strip(), key=token_key) if scheme.lower() == "bearer" else None
        if name is None:
            refused_tokens.add(client, time.monotonic())
            raise HTTPException(401, "missing, invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
        request.state.team = name  # for the request log line
        return name

    async def team_reads(request: Request, authorization: str | None, read):
        """``read(team)`` after the token check, both in one thread: under load each hop between
        the event loop and a thread waits its turn in the loop's queue, so an authenticated read
        answers sooner as one hop than as a dependency's hop followed by the route's."""
        return await run_in_threadpool(lambda: read(team(request, authorization)))

    async def one_of_team(request: Request, authorization: str | None, find, missing: str):
        """:func:`team_reads` of ``find(team=...)``, 404 ``missing`` when it finds nothing."""

        def read(name: str):
            found = find(team=name)
            if found is None:
                raise HTTPException(404, missing)
            return found

        return await team_reads(request, authorization, read)

    @contextlib.contextmanager
    def one_of_few(team: str):
        """While one of ``team``'s upload bodies is received; 429 at once, before a byte of it is
        read, when ``uploads.per_team`` of them are coming already. Counted on the event loop
        (routes that upload are async), so without a lock."""
        if receiving[team] >= uploads.per_team:
            raise HTTPException(
                429, f"at most {uploads.per_team} uploads at once per team; send this one when another has ended"
            )
        receiving[team] += 1
        try:
            yield
        finally:
            receiving[team] -= 1
            if not receiving[team]:
                del receiving[team]

    def published_files(challenge_id: str) -> list[dict]:
        files = channel.public_files(store, challenge_id) if CHALLENGE_ID.match(challenge_id) else None
        if files is None:
            raise HTTPException(404, f"no published challenge {challenge_id!r}")
        return files

    @app.get("/healthz")
    async def health() -> dict:  # on the event loop: it answers while every thread waits on the database
        return {"status": "ok", "version": __version__}

    @app.get("/api/v1/challenges")
    def challenges() -> list[dict]:
        """Open challenges: id, task, preset, N, daily limit, deadline and public files."""
        return channel.open_challenges(store)

    @app.get("/api/v1/challenges/{challenge_id}/files", responses=documented(404))
    def files(challenge_id: str) -> list[dict]:
        return published_files(challenge_id)

    @app.get(
        "/api/v1/challenges/{challenge_id}/files/{name}",
        response_class=FileResponse,
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "the file's bytes"},
            206: {"content": {"application/octet-stream": {}}, "description": "the bytes of the range asked for"},
            **documented(404),
            # Starlette answers a bad range itself, in plain text.
            400: {"content": {"text/plain": {}}, "description": WHY[400]},
            416: {"content": {"text/plain": {}}, "description": WHY[416]},
        },
    )
    def download(challenge_id: str, name: str) -> FileResponse:
        """One public file; HTTP Range requests resume an interrupted download."""
        listed = {f["name"]: f for f in published_files(challenge_id)}
        if name not in listed:
            raise HTTPException(404, f"{challenge_id} has no public file {name!r}")
        path = layout.public_dir(challenge_id) / name  # name is one of the published names, no path parts
        try:
            info = path.lstat()  # a symbolic link is not a regular file: refused too
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            raise HTTPException(404, f"{name} is missing from the store")
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=name,
            headers={"X-Content-SHA256": listed[name]["sha256"]},
            stat_result=info,  # taken here: one hop to a thread fewer for the response
        )

    @app.post(
        "/api/v1/challenges/{challenge_id}/submissions",
        status_code=202,
        responses=documented(400, 404, 408, 413, *AUTH),
        openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {}}}}},
    )
    async def submit(challenge_id: str, request: Request, team: str = Depends(team)) -> dict:
        """Upload a submission file as the request body; returns its id, queued for scoring: the
        submission's one id, which the board and the export show too."""
        await run_in_threadpool(published_files, challenge_id)
        with queue_errors():  # refused before a byte of the body is read
            await run_in_threadpool(channel.admit, store, team=team, challenge_id=challenge_id)
        with one_of_few(team):
            writer = await receive(request, layout, max_upload, "upload", uploads)
        try:
            with queue_errors():
                job_id = await run_in_threadpool(
                    channel.enqueue,
                    store,
                    team=team,
                    challenge_id=challenge_id,
                    sha256=writer.sha256,
                    size=writer.size,
                    stage=writer.commit,
                )
        finally:
            writer.discard()  # refused, or the same bytes as an earlier job: nothing is kept
        job = await run_in_threadpool(channel.job, store, job_id)  # queued, or the same bytes' earlier job
        return {"id": job_id, "state": job.state if job else "queued", "sha256": writer.sha256, "size": writer.size}

    def admit_check(team: str) -> None:
        """At most CHECKS_PER_MINUTE plugin checks per team and minute (kept in memory)."""
        now, recent = time.monotonic(), recent_checks[team]
        while recent and recent[0] < now - 60:
            recent.popleft()
        if len(recent) >= CHECKS_PER_MINUTE:
            raise HTTPException(429, f"rate limit: at most {CHECKS_PER_MINUTE} plugin uploads a minute per team")
        recent.append(now)

    @app.post(
        "/api/v1/challenges/{challenge_id}/plugins",
        status_code=202,
        responses=documented(400, 404, 408, 413, 503, *AUTH),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"text/x-python": {"schema": {}}, "application/octet-stream": {"schema": {}}},
            }
        },
    )
    async def submit_plugin(
        challenge_id: str,
        request: Request,
        class_name: str = Query(..., alias="class", json_schema_extra={"pattern": f"^{verified.CLASS_NAME.pattern}$"}),
        filename: str = Query(..., json_schema_extra={"pattern": PLUGIN_FILENAME}),
        module: str | None = Query(
            default=None,
            description="With a wheel or an sdist: the module of the class",
            json_schema_extra={"pattern": f"^{plugin_archive.MODULE_NAME.pattern}$"},
        ),
        param: list[str] = PARAMS_QUERY,
        team: str = Depends(team),
    ) -> dict:
        """Upload an attack plugin for the verified track: the request body is one .py file, or
        a pure-Python wheel (.whl) or plain-source sdist (.tar.gz); the class, the file name,
        the module (archives only) and each parameter (``param=name=value``) are query
        parameters. Returns the run's id at once, in state ``checking``: a worker then checks
        an archive's layout, contents and declared dependencies in a limited child (nothing is
        built or installed), then the plugin in the sandbox (imports, declarations, name,
        parameters, task); a plugin that passes is queued to run on fresh hidden releases, one
        that fails ends its run ``failed`` with the reason. Every upload counts against the
        team's daily plugin runs."""
        params = {}
        for item in param:
            name, sep, value = item.partition("=")
            if not sep:
                raise HTTPException(400, f"param must look like name=value, got {item[:80]!r}")
            params[name.strip()] = value.strip()
        try:
            params_json = verified.check_upload_fields(filename, class_name, params, module)
            challenge = (
                await run_in_threadpool(verified.open_challenge, store, challenge_id)
                if CHALLENGE_ID.match(challenge_id)
                else None
            )
            sandbox.require_sandbox(unsandboxed=settings.unsandboxed)
        except workqueue.UnknownChallenge as error:
            raise HTTPException(404, str(error)) from None
        except sandbox.SandboxUnavailable as error:
            raise HTTPException(503, str(error)) from None
        except NcbenchError as error:
            raise HTTPException(400, str(error)) from None
        if challenge is None:
            raise HTTPException(404, f"no open challenge {challenge_id!r}")
        limit = challenge["plugin_daily_limit"] or verified.DEFAULT_PLUGIN_DAILY_LIMIT
        if await run_in_threadpool(verified.used_today, store, team=team, challenge_id=challenge_id) >= limit:
            raise HTTPException(429, f"team {team!r} has used its {limit} verified runs for {challenge_id} today (UTC)")
        with one_of_few(team):
            admit_check(team)
            writer = await receive(request, layout, verified.upload_cap(filename), "plugin", uploads)
        try:
            # Stored and queued for its admission check, a job of the workers' check pool: no
            # API thread ever waits on an unpacker or a sandbox.
            run_id = await run_in_threadpool(
                verified.enqueue,
                store,
                team=team,
                origin=ORIGIN_SELF,
                challenge_id=challenge_id,
                attack=verified.UNCHECKED,
                attack_version=verified.UNCHECKED,
                params=params_json,
                settings=settings,
                eval_source=challenge["eval_source"] or settings.eval_source,
                plugin_sha256=writer.sha256,
                plugin_file=filename,
                class_name=verified.plugin_entry(class_name, module),
                daily_limit=limit,
                stage=writer.commit,
            )
        except workqueue.LimitReached as error:
            raise HTTPException(429, str(error)) from None
        except NcbenchError as error:
            raise HTTPException(400, channel.redact(str(error), layout, upload=writer.tmp)) from None
        finally:
            writer.discard()
        return {
            "id": run_id,
            "state": "checking",
            "attack": None,
            "attack_version": None,
            "sha256": writer.sha256,
            "releases": settings.releases,
            "sandboxed": not settings.unsandboxed,
        }

    @app.get("/api/v1/plugins", responses=documented(*AUTH))
    async def plugin_runs(request: Request, authorization: str | None = Header(default=None)) -> list[dict]:
        """Your team's verified runs: state, reason, and per evaluation release its cost and score."""
        return await team_reads(request, authorization, lambda team: verified.team_runs(store, team))

    @app.get("/api/v1/plugins/{run_id}", responses=documented(404, *AUTH))
    async def plugin_run(
        request: Request, run_id: int = row_id(), authorization: str | None = Header(default=None)
    ) -> dict:
        """One of your verified runs."""
        find = functools.partial(verified.run_view, store, run_id)
        return await one_of_team(request, authorization, find, f"your team has no verified run {run_id}")

    @app.get("/api/v1/challenges/{challenge_id}/commitments", responses=documented(404))
    def commitments(challenge_id: str) -> list[dict]:
        """Every evaluation release's commitment (sha256 of its seed, key commitment, release
        sha256), published before the plugin ran; its seed and rebuild command once the
        challenge has closed."""
        published_files(challenge_id)
        return verified.commitments(store, challenge_id)

    @app.get("/api/v1/challenges/{challenge_id}/verified", responses=documented(404))
    def verified_results(challenge_id: str) -> list[dict]:
        """The challenge's verified runs: attack, state, and per evaluation release its score
        and measured cost."""
        published_files(challenge_id)
        return verified.challenge_runs(store, challenge_id)

    @app.get("/api/v1/whoami", responses=documented(*AUTH))
    async def whoami(team: str = Depends(team)) -> dict:  # async: the token check is its only thread hop
        """The team a token belongs to (clients check a token before a long upload)."""
        return {"team": team}

    @app.get("/api/v1/submissions", responses=documented(*AUTH))
    async def submissions(request: Request, authorization: str | None = Header(default=None)) -> list[dict]:
        """Your team's submissions and their states."""
        return await team_reads(
            request, authorization, lambda team: _job_views(store, team, channel.team_jobs(store, team))
        )

    @app.get("/api/v1/submissions/{job_id}", responses=documented(404, *AUTH))
    async def submission(
        request: Request, job_id: int = row_id(), authorization: str | None = Header(default=None)
    ) -> dict:
        """One of your submissions: state, and the public-half score once scored."""

        def find(team: str) -> dict | None:
            job = channel.job(store, job_id, team=team)
            return None if job is None else _job_views(store, team, [job])[0]

        return await one_of_team(request, authorization, find, f"your team has no submission {job_id}")

    return app


@contextlib.contextmanager
def queue_errors():
    """The queue's refusals as HTTP: a limit is 429, a closed or unknown challenge 404."""
    try:
        yield
    except workqueue.LimitReached as error:
        raise HTTPException(429, str(error)) from None
    except workqueue.UnknownChallenge as error:
        raise HTTPException(404, str(error)) from None


async def receive(
    request: Request, layout: workqueue.StoreLayout, max_bytes: int, what: str, bounds: UploadBounds
) -> channel.UploadWriter:
    """Stream a request body to a private file under ``max_bytes`` (by its declared
    ``Content-Length`` first, then while reading) and at ``bounds``' pace, not yet in the store:
    the writer, whose ``commit`` stores it by content hash, or 413 / 408 / 400 and nothing kept
    (nor when the server's stop cancels it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"{what} larger than the {max_bytes} byte limit")
    writer = channel.UploadWriter(layout, max_bytes=max_bytes)
    started = asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout_at(started + bounds.grace_s) as pace:
            async for chunk in request.stream():
                writer.write(chunk)
                # Past the grace a body holds min_bytes_per_s for each second since the grace
                # ended: these bytes last until the deadline set here, then more are due.
                pace.reschedule(started + bounds.grace_s + writer.size / bounds.min_bytes_per_s)
    except NcbenchError as error:
        raise HTTPException(413, str(error)) from None
    except TimeoutError:
        writer.discard()
        raise HTTPException(
            408,
            f"{what} arrived slower than {bounds.min_bytes_per_s >> 10} KiB/s after its first {bounds.grace_s:g} s",
            headers={"Connection": "close"},  # the rest of the body is not worth waiting for
        ) from None
    except ClientDisconnect:  # the client left, or was closed for stalling (--body-timeout)
        writer.discard()
        raise HTTPException(400, f"{what} cut off before its end") from None
    except BaseException:
        writer.discard()
        raise
    writer.finish()
    if writer.size == 0:
        writer.discard()
        raise HTTPException(400, f"empty {what}")
    return writer


def _job_views(store: Store, team: str, team_jobs: list[channel.Job]) -> list[dict]:
    """What ``team`` is shown of its jobs ``team_jobs``, in three queries however many they are:
    a query per job, each reading the team's earlier submissions for the Ladder, would cost
    seconds of the server's CPU per listing for a team with hundreds."""
    places = channel.places(store, [job.id for job in team_jobs if job.state == "queued"])
    scored_in = {job.challenge_id for job in team_jobs if job.state == "scored"}
    # One challenge (a single job, as `status --wait` polls it): read that challenge's scores only.
    only = next(iter(scored_in)) if len(scored_in) == 1 else None
    shown = store.shown_to_team(team, only) if scored_in else {}
    return [_job_view(job, places.get(job.id), shown.get(job.submission_id)) for job in team_jobs]


def _job_view(job: channel.Job, ahead: int | None, shown: dict | None) -> dict:
    """One job as its team sees it: ``ahead`` its place in the queue (queued jobs), ``shown``
    what :meth:`Store.shown_to_team` shows of its submission (scored ones)."""
    view = {
        "id": job.id,
        # The board's id of the scored submission: the same as ``id`` (one id per submission),
        # except for submissions the server scored before the store's migration 10.
        "submission_id": job.submission_id,
        "challenge_id": job.challenge_id,
        "state": job.state,
        "message": job.message,
        "created_utc": job.created_utc,
        "public": None,
        "scores_hidden": False,
        # A queued job's place in the queue: how many jobs, any team's, will be scored first.
        "queue_ahead": ahead,
    }
    if job.state == "scored" and job.submission_id is not None:
        if shown is not None and shown["scores_hidden"]:
            view["scores_hidden"] = True  # a blind challenge, still open: scored, score unseen
            return view
        public = shown["public"] if shown is not None else {}
        # JSON has no infinity (k-anonymity at zero accuracy): such values travel as strings.
        view["public"] = {k: v if math.isfinite(v) else str(v) for k, v in public.items()}
    return view
