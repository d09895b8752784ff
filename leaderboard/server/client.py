"""The attacker's commands against a running challenge server: ``ncbench challenges``, ``fetch``,
``submit`` (a file of answers, or ``--plugin``: attack code for the verified track) and
``submissions``.

The server comes from ``--server`` or ``NCBENCH_SERVER``; the team token from ``NCBENCH_TOKEN``
or ``--token-file`` (never a command-line argument, which other users of the machine can read).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click
import httpx

from ncbench.errors import NcbenchError
from ncbench.h5io import sha256_file as _sha256
from ncbench.progress import progress

SERVER_ENV, TOKEN_ENV = "NCBENCH_SERVER", "NCBENCH_TOKEN"
FINAL_STATES = ("scored", "refused", "failed")
CHUNK = 1 << 20

server_option = click.option(
    "--server",
    envvar=SERVER_ENV,
    default="http://127.0.0.1:8000",
    show_default=True,
    help=f"Challenge server URL (or ${SERVER_ENV}).",
)
token_option = click.option(
    "--token-file", type=click.Path(path_type=Path), help=f"File holding the team token [default: ${TOKEN_ENV}]."
)


class Client:
    """A thin httpx client that turns every HTTP failure into one NcbenchError line."""

    def __init__(self, server: str, token: str | None = None, *, need_token: bool = False):
        if need_token and not token:
            raise NcbenchError(f"no team token: set ${TOKEN_ENV} or pass --token-file")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.server = server.rstrip("/")
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=httpx.Timeout(60, connect=10))

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise NcbenchError(f"cannot reach {self.server}: {error}") from None
        _check(response)
        return response

    def json(self, method: str, path: str, **kwargs):
        return self.request(method, path, **kwargs).json()


def read_token(token_file: Path | None) -> str | None:
    """The team token: from ``--token-file``, else ``$NCBENCH_TOKEN``."""
    if token_file is not None:
        try:
            return token_file.read_text().strip() or None
        except OSError as error:
            raise NcbenchError(f"cannot read --token-file {token_file}: {error.strerror}") from None
    return os.environ.get(TOKEN_ENV, "").strip() or None


def _check(response: httpx.Response) -> None:
    if response.is_success or response.status_code == 206:
        return
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = response.text[:200]
    if response.status_code == 401:
        raise NcbenchError(f"the server refused the token ({detail})")
    raise NcbenchError(f"server answered {response.status_code}: {detail}")


@click.command("challenges")
@server_option
def challenges(server: str) -> None:
    """List the open challenges: id, task, preset, N, daily limit, deadline."""
    rows = Client(server).json("GET", "/api/v1/challenges")
    if not rows:
        click.echo("no open challenges")
    for row in rows:
        size = sum(f["size"] for f in row["files"])
        click.echo(
            f"{row['challenge_id']}\t{row['task']}\t{row['preset']}\tN={row['n_encoded']}\t"
            f"{row['daily_limit']}/day\tdeadline {row['deadline_utc'] or 'none'}\t{size / 1e6:.1f} MB"
        )


@click.command("fetch")
@click.argument("challenge_id")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder to write [default: CHALLENGE_ID].")
@server_option
def fetch(challenge_id: str, out: Path | None, server: str) -> None:
    """Download a challenge's public files, resuming interrupted downloads; every sha256 is
    checked before it says done."""
    client = Client(server)
    listed = client.json("GET", f"/api/v1/challenges/{challenge_id}/files")
    out = Path(out or challenge_id)
    out.mkdir(parents=True, exist_ok=True)
    for entry in listed:
        name = entry["name"]
        if Path(name).name != name or name.startswith("."):
            raise NcbenchError(f"the server listed an unsafe file name {name!r}")
        target, partial = out / name, out / f".{name}.part"
        if target.is_file() and _sha256(target) == entry["sha256"]:
            click.echo(f"{target} already complete", err=True)
            continue
        _download(client, f"/api/v1/challenges/{challenge_id}/files/{name}", partial, entry["size"])
        digest = _sha256(partial)
        if digest != entry["sha256"]:
            partial.unlink()
            raise NcbenchError(f"{name}: sha256 {digest} does not match the server's {entry['sha256']}; fetch again")
        os.replace(partial, target)
    click.echo(f"fetched {len(listed)} files into {out}, sha256 checked")


def _download(client: Client, path: str, partial: Path, size: int) -> None:
    have = partial.stat().st_size if partial.is_file() else 0
    if have > size:
        partial.unlink()
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with progress(f"downloading {partial.name.strip('.').removesuffix('.part')}", size) as advance:
        advance(have)
        if have == size:
            return
        try:
            with client.http.stream("GET", path, headers=headers) as response:
                _check(response)
                mode = "ab" if response.status_code == 206 else "wb"
                with open(partial, mode) as handle:
                    for chunk in response.iter_bytes(CHUNK):
                        handle.write(chunk)
                        advance(len(chunk))
        except httpx.HTTPError as error:
            raise NcbenchError(f"download interrupted ({error}); run fetch again to resume") from None


@click.command("submit")
@click.argument("submission", type=click.Path(path_type=Path), required=False)
@click.option(
    "--plugin",
    "plugin_spec",
    metavar="FILE.py:Class | DIST.whl:module:Class | DIST.tar.gz:module:Class",
    help="Instead of a file of answers: an attack plugin for the verified track, which the organizer "
    "runs sandboxed on fresh hidden releases: one .py file and its class, or a pure-Python wheel or "
    "plain-source sdist and the module and class of the attack (its dependencies must already be "
    "installed on the server). Check it first with `ncbench attack check` and the same spec.",
)
@click.option(
    "--param", "params", multiple=True, metavar="K=V", help="With --plugin: an attack parameter (repeatable)."
)
@click.option("--challenge", "challenge_id", required=True, help="The challenge id (see `ncbench challenges`).")
@click.option("--no-wait", is_flag=True, help="Print the submission id and return without waiting for the score.")
@click.option("--timeout", type=int, default=1800, show_default=True, help="Seconds to wait for the score.")
@server_option
@token_option
def submit(
    submission: Path | None,
    plugin_spec: str | None,
    params: tuple[str, ...],
    challenge_id: str,
    no_wait: bool,
    timeout: int,
    server: str,
    token_file: Path | None,
) -> None:
    """Upload SUBMISSION (or, with --plugin, an attack plugin) to the server, wait for it to be
    scored, print the score."""
    if (submission is None) == (plugin_spec is None):
        raise NcbenchError("give a SUBMISSION file or --plugin FILE.py:Class (or DIST:module:Class), not both")
    if plugin_spec is None:
        if params:
            raise NcbenchError("--param goes with --plugin")
        submit_file(
            submission, challenge_id, server=server, token=read_token(token_file), wait=not no_wait, timeout=timeout
        )
        return
    submit_plugin(
        plugin_spec,
        params,
        challenge_id,
        server=server,
        token=read_token(token_file),
        wait=not no_wait,
        timeout=timeout,
    )


def submit_file(
    submission: Path,
    challenge_id: str,
    *,
    server: str,
    token: str | None,
    wait: bool = True,
    timeout: int = 1800,
    quiet: bool = False,
) -> dict:
    """Upload ``submission``; with ``wait``, poll until it is scored and return its final state
    (NcbenchError for a refusal). ``quiet`` prints nothing (callers print their own summary)."""
    echo = (lambda text: None) if quiet else click.echo
    if not submission.is_file():
        raise NcbenchError(f"{submission}: no such file")
    client = Client(server, token, need_token=True)
    client.json("GET", "/api/v1/whoami")  # a refused token fails here, before a long upload
    size = submission.stat().st_size

    def body():
        with open(submission, "rb") as handle, progress(f"uploading {submission.name}", size) as advance:
            while chunk := handle.read(CHUNK):
                advance(len(chunk))
                yield chunk

    job = client.json(
        "POST",
        f"/api/v1/challenges/{challenge_id}/submissions",
        content=body(),
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
    )
    echo(f"submission {job['id']} queued")
    if not wait:
        return job
    deadline = time.monotonic() + timeout
    with progress(f"waiting for submission {job['id']} to be scored", 1) as advance:
        while job["state"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise NcbenchError(
                    f"submission {job['id']} is still {job['state']} after {timeout} s; "
                    "check later with `ncbench submissions`"
                )
            time.sleep(0.5)
            job = client.json("GET", f"/api/v1/submissions/{job['id']}")
        advance(1)
    if job["state"] != "scored":
        raise NcbenchError(f"submission {job['id']} {job['state']}: {job['message']}")
    echo(f"submission {job['id']} scored: public half {json.dumps(job['public'], sort_keys=True)}")
    return job


def submit_plugin(
    spec: str,
    params: tuple[str, ...],
    challenge_id: str,
    *,
    server: str,
    token: str | None,
    wait: bool = True,
    timeout: int = 1800,
) -> dict:
    """Upload one plugin file (a .py file, a wheel or an sdist) with its class (and module, for
    an archive) and parameters; the server checks it before queueing it, then runs it on fresh
    hidden releases. With ``wait``, poll until the run ends and return it (NcbenchError when it
    failed)."""
    from ncbench.attacks.plugins.archive import MAX_ARCHIVE_BYTES, MAX_FILE_BYTES, SPEC_FORMS, parse_spec

    plugin = parse_spec(spec)
    if plugin is None or plugin.kind == "folder":
        raise NcbenchError(f"--plugin must be {SPEC_FORMS}; got {spec!r}")
    path = plugin.path
    if not path.is_file():
        raise NcbenchError(f"{path}: no such file")
    size, cap = path.stat().st_size, MAX_FILE_BYTES if plugin.kind == "file" else MAX_ARCHIVE_BYTES
    if size > cap:
        raise NcbenchError(f"{path} is {size} bytes; the server takes a plugin {plugin.kind} of at most {cap}")
    for item in params:
        if "=" not in item:
            raise NcbenchError(f"--param must look like name=value, got {item!r}")
    client = Client(server, token, need_token=True)
    client.json("GET", "/api/v1/whoami")

    def body():
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    query = [("class", plugin.class_name), ("filename", path.name), *(("param", item) for item in params)]
    if plugin.module is not None:
        query.append(("module", plugin.module))
    click.echo(f"uploading {path.name}: the server checks it in its sandbox before queueing it", err=True)
    run = client.json(
        "POST",
        f"/api/v1/challenges/{challenge_id}/plugins",
        params=query,
        content=body(),
        headers={
            "Content-Length": str(size),
            "Content-Type": "text/x-python" if plugin.kind == "file" else "application/octet-stream",
        },
        timeout=httpx.Timeout(300, connect=10),
    )
    click.echo(
        f"verified run {run['id']} queued: {run['attack']} {run['attack_version']} on {run['releases']} fresh "
        f"hidden releases (seed commitments: {client.server}/api/v1/challenges/{challenge_id}/commitments)"
    )
    if not wait:
        return run
    deadline = time.monotonic() + timeout
    with progress(f"waiting for verified run {run['id']}", 1) as advance:
        while run["state"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise NcbenchError(
                    f"verified run {run['id']} is still {run['state']} after {timeout} s; "
                    "check later with `ncbench submissions`"
                )
            time.sleep(1)
            run = client.json("GET", f"/api/v1/plugins/{run['id']}")
        advance(1)
    if run["state"] != "scored":
        raise NcbenchError(f"verified run {run['id']} {run['state']}: {run['message']}")
    scores = ", ".join(f"{e['headline']:.4f}" for e in run["evaluations"])
    spread = f" ± {run['spread']:.4f} (sd)" if run["spread"] is not None else ""
    click.echo(
        f"verified run {run['id']} scored: re-identification {run['mean']:.4f}{spread} over "
        f"{len(run['evaluations'])} fresh keys ({scores})"
    )
    return run


@click.command("submissions")
@server_option
@token_option
def submissions(server: str, token_file: Path | None) -> None:
    """Your team's submissions and verified plugin runs: id, challenge, state, score or reason."""
    client = Client(server, read_token(token_file), need_token=True)
    rows, runs = client.json("GET", "/api/v1/submissions"), client.json("GET", "/api/v1/plugins")
    if not rows and not runs:
        click.echo("no submissions yet")
    for row in rows:
        outcome = json.dumps(row["public"], sort_keys=True) if row["public"] else (row["message"] or "")
        click.echo(f"{row['id']}\t{row['challenge_id']}\t{row['state']}\t{row['created_utc']}\t{outcome}")
    for run in runs:
        outcome = (
            f"mean {run['mean']:.4f} over {run['releases']} hidden releases"
            if run["mean"] is not None
            else run["message"] or ""
        )
        click.echo(
            f"plugin {run['id']}\t{run['challenge_id']}\t{run['state']}\t{run['created_utc']}\t"
            f"{run['attack']} {run['attack_version']}\t{outcome}"
        )
