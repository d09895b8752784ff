"""The challenge server's HTTP API (FastAPI on uvicorn; OpenAPI at ``/openapi.json``, docs at ``/docs``).

What it guarantees: only files listed when a challenge was published are served, from the
store's public folder (never the key); every write needs a team token (``Authorization: Bearer
...``), checked against its argon2id hash; an upload is streamed to disk under a size cap and
queued only after the rate and daily limits; a submission's state is durable in the database.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from ncbench import __version__
from ncbench.errors import NcbenchError
from ncbench.leaderboard import channel
from ncbench.leaderboard.store import Store

CHALLENGE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
DEFAULT_MAX_UPLOAD = 1 << 30  # 1 GiB: a reid score matrix at N = 10,000 is 400 MB


def create_app(db_url: str, store_root: Path, *, max_upload: int = DEFAULT_MAX_UPLOAD) -> FastAPI:
    store = Store(db_url)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        store.close()

    app = FastAPI(title="ncbench challenge server", version=__version__, lifespan=lifespan,
                  description="Fetch challenge releases, submit answers, read your scores.")
    layout = channel.StoreLayout(Path(store_root))

    def team(authorization: str | None = Header(default=None)) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        name = channel.authenticate(store, token.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            raise HTTPException(401, "missing, invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
        return name

    def published_files(challenge_id: str) -> list[dict]:
        files = channel.public_files(store, challenge_id) if CHALLENGE_ID.match(challenge_id) else None
        if files is None:
            raise HTTPException(404, f"no published challenge {challenge_id!r}")
        return files

    @app.get("/healthz")
    def health() -> dict:
        return {"status": "ok", "version": __version__}

    @app.get("/api/v1/challenges")
    def challenges() -> list[dict]:
        """Open challenges: id, task, preset, N, daily limit, deadline and public files."""
        return channel.open_challenges(store)

    @app.get("/api/v1/challenges/{challenge_id}/files")
    def files(challenge_id: str) -> list[dict]:
        return published_files(challenge_id)

    @app.get("/api/v1/challenges/{challenge_id}/files/{name}")
    def download(challenge_id: str, name: str) -> FileResponse:
        """One public file; HTTP Range requests resume an interrupted download."""
        listed = {f["name"]: f for f in published_files(challenge_id)}
        if name not in listed:
            raise HTTPException(404, f"{challenge_id} has no public file {name!r}")
        path = layout.public_dir(challenge_id) / name  # name is one of the published names, no path parts
        if path.is_symlink() or not path.is_file():
            raise HTTPException(404, f"{name} is missing from the store")
        return FileResponse(path, media_type="application/octet-stream", filename=name,
                            headers={"X-Content-SHA256": listed[name]["sha256"]})

    @app.post("/api/v1/challenges/{challenge_id}/submissions", status_code=202)
    async def submit(challenge_id: str, request: Request, team: str = Depends(team)) -> dict:
        """Upload a submission file as the request body; returns its id, queued for scoring."""
        await run_in_threadpool(published_files, challenge_id)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload:
            raise HTTPException(413, f"upload larger than the {max_upload} byte limit")
        writer = channel.UploadWriter(layout, max_bytes=max_upload)
        try:
            async for chunk in request.stream():
                writer.write(chunk)
        except NcbenchError as error:
            raise HTTPException(413, str(error)) from None
        except BaseException:
            writer.discard()
            raise
        sha256, size = writer.commit()
        if size == 0:
            raise HTTPException(400, "empty upload")
        try:
            job_id = await run_in_threadpool(channel.enqueue, store, team=team, challenge_id=challenge_id,
                                             sha256=sha256, size=size)
        except channel.LimitReached as error:
            raise HTTPException(429, str(error)) from None
        except channel.UnknownChallenge as error:
            raise HTTPException(404, str(error)) from None
        return {"id": job_id, "state": "queued", "sha256": sha256, "size": size}

    @app.get("/api/v1/whoami")
    def whoami(team: str = Depends(team)) -> dict:
        """The team a token belongs to (clients check a token before a long upload)."""
        return {"team": team}

    @app.get("/api/v1/submissions")
    def submissions(team: str = Depends(team)) -> list[dict]:
        """Your team's submissions and their states."""
        return [_job_view(store, job) for job in channel.team_jobs(store, team)]

    @app.get("/api/v1/submissions/{job_id}")
    def submission(job_id: int, team: str = Depends(team)) -> dict:
        """One of your submissions: state, and the public-half score once scored."""
        job = channel.job(store, job_id, team=team)
        if job is None:
            raise HTTPException(404, f"your team has no submission {job_id}")
        return _job_view(store, job)

    return app


def _job_view(store: Store, job: channel.Job) -> dict:
    view = {"id": job.id, "challenge_id": job.challenge_id, "state": job.state, "message": job.message,
            "created_utc": job.created_utc, "public": None}
    if job.state == "scored" and job.submission_id is not None:
        details = store.submission(job.submission_id) or {}
        public = details.get("metrics", {}).get("public") or {}
        # JSON has no infinity (k-anonymity at zero accuracy): such values travel as strings.
        view["public"] = {k: v if math.isfinite(v) else str(v) for k, v in public.items()}
    return view
