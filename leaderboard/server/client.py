"""The attacker's commands against a running challenge server: ``ncbench login``, ``whoami``,
``challenges``, ``fetch``, ``submit`` (a file of answers, or ``--plugin``: attack code for the
verified track), ``submissions`` and ``status``.

The server comes from ``--server``, else ``NCBENCH_SERVER``, else the config file ``ncbench
login`` writes; the team token from ``--token-file``, else ``NCBENCH_TOKEN``, else that config
file (never a command-line argument, which other users of the machine can read). Listings are
tables for people; ``--json`` gives the server's records for scripts.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path

import click
import httpx

from ncbench.errors import NcbenchError
from ncbench.progress import progress

SERVER_ENV, TOKEN_ENV = "NCBENCH_SERVER", "NCBENCH_TOKEN"
FINAL_STATES = ("scored", "refused", "failed")
CHUNK = 1 << 20

DEFAULT_SERVER = "http://127.0.0.1:8000"
COUNTED_STATES = ("queued", "running", "scored")  # the states the server counts towards a daily limit
LADDER_LABEL = "public half, as the Ladder shows it"
HIDDEN = "hidden until the close (a blind challenge)"

server_option = click.option(
    "--server",
    envvar=SERVER_ENV,
    default=None,
    help=f"Challenge server URL [default: ${SERVER_ENV}, else the one `ncbench login` saved, else {DEFAULT_SERVER}].",
)
token_option = click.option(
    "--token-file",
    type=click.Path(path_type=Path),
    help=f"File holding the team token [default: ${TOKEN_ENV}, else the token `ncbench login` saved].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the server's records as JSON (for scripts).")


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/ncbench/config.json`` (``~/.config/ncbench/config.json`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "ncbench" / "config.json"


def read_config() -> dict:
    """What ``ncbench login`` saved ({} when nothing was); a damaged file is a one-line error."""
    path = config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise NcbenchError(f"cannot read {path} ({error}); run `ncbench login` again") from None
    return config if isinstance(config, dict) else {}


def write_config(config: dict) -> Path:
    """Write the config file readable by its owner only (0600), replacing any earlier one."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(config, handle, indent=2)
    os.chmod(partial, 0o600)
    os.replace(partial, path)
    return path


def server_url(server: str | None) -> str:
    """``--server`` (or ``$NCBENCH_SERVER``, which click reads), else the saved one, else the default."""
    return server or read_config().get("server") or DEFAULT_SERVER


class NotFound(NcbenchError):
    """The server has no such challenge, file, or item of the team (HTTP 404)."""


class Client:
    """A thin httpx client that turns every HTTP failure into one NcbenchError line."""

    def __init__(self, server: str | None, token: str | None = None, *, need_token: bool = False):
        if need_token and not token:
            raise NcbenchError(f"no team token: run `ncbench login`, set ${TOKEN_ENV} or pass --token-file")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.server = server_url(server).rstrip("/")
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=httpx.Timeout(60, connect=10))

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise NcbenchError(f"cannot reach {self.server}: {error}") from None
        _check(response)
        return response

    def json(self, method: str, path: str, **kwargs):
        try:
            data = self.request(method, path, **kwargs).json()
        except ValueError:
            data = None
        if not isinstance(data, (dict, list)):  # a web page: the board's address, or another site
            raise NcbenchError(f"{self.server} did not answer as a challenge server's API (is it the board's address?)")
        return data


def read_token(token_file: Path | None) -> str | None:
    """The team token: from ``--token-file``, else ``$NCBENCH_TOKEN``, else the saved one."""
    if token_file is not None:
        try:
            return token_file.read_text().strip() or None
        except OSError as error:
            raise NcbenchError(f"cannot read --token-file {token_file}: {error.strerror}") from None
    return os.environ.get(TOKEN_ENV, "").strip() or read_config().get("token") or None


def short(value) -> str:
    """A number with 3 significant digits (text as it is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) or math.isinf(value) else f"{value:.3g}"


def score_or_reason(job: dict) -> str:
    """A submission's public-half score, :data:`HIDDEN` on a blind challenge, or why it has none."""
    if job.get("scores_hidden"):
        return HIDDEN
    if job["public"]:
        return f"{LADDER_LABEL}: {scores_text(job['public'])}"
    return job["message"] or ""


def scores_text(public: dict | None) -> str:
    """The public-half metrics of a scored submission on one line, 3 significant digits."""
    if not public:
        return ""
    return ", ".join(f"{name} {short(value)}" for name, value in sorted(public.items()))


def echo_table(rows: list[list], headers: list[str]) -> None:
    """Aligned columns with a header line: what a person reads in a terminal."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def echo_json(value) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _check(response: httpx.Response) -> None:
    if response.is_success or response.status_code == 206:
        return
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = response.text[:200]
    if response.status_code == 401:
        raise NcbenchError(f"the server refused the token ({detail})")
    if response.status_code == 404:
        raise NotFound(f"server answered 404: {detail}")
    raise NcbenchError(f"server answered {response.status_code}: {detail}")


@click.command("challenges")
@server_option
@json_option
def challenges(server: str | None, as_json: bool) -> None:
    """List the open challenges: id, task, preset, N, daily limit, deadline (UTC), size."""
    rows = Client(server).json("GET", "/api/v1/challenges")
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no open challenges")
        return
    echo_table(
        [
            [
                row["challenge_id"],
                row["task"],
                row["preset"],
                row["n_encoded"],
                f"{row['daily_limit']}/day" if row.get("daily_limit") else "none",
                _minutes(row.get("deadline_utc")) or "none",
                f"{sum(f['size'] for f in row['files']) / 1e6:.1f} MB",
            ]
            for row in rows
        ],
        ["CHALLENGE", "TASK", "PRESET", "N", "LIMIT", "DEADLINE", "SIZE"],
    )


def _minutes(stamp: str | None) -> str:
    """An ISO timestamp from the server as 'YYYY-MM-DD HH:MM UTC' (empty for none)."""
    if not stamp:
        return ""
    try:
        when = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return str(stamp)
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when.strftime("%Y-%m-%d %H:%M UTC")


@click.command("fetch")
@click.argument("challenge_id")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder to write [default: CHALLENGE_ID].")
@server_option
def fetch(challenge_id: str, out: Path | None, server: str) -> None:
    """Download a challenge's public files, resuming interrupted downloads; every sha256 is
    checked before it says done."""
    from ncbench.h5io import sha256_file  # h5py and numpy: here, not in every command's --help

    client = Client(server)
    listed = client.json("GET", f"/api/v1/challenges/{challenge_id}/files")
    out = Path(out or challenge_id)
    out.mkdir(parents=True, exist_ok=True)
    for entry in listed:
        name = entry["name"]
        if Path(name).name != name or name.startswith("."):
            raise NcbenchError(f"the server listed an unsafe file name {name!r}")
        target, partial = out / name, out / f".{name}.part"
        if target.is_file() and sha256_file(target) == entry["sha256"]:
            click.echo(f"{target} already complete", err=True)
            continue
        _download(client, f"/api/v1/challenges/{challenge_id}/files/{name}", partial, entry["size"])
        digest = sha256_file(partial)
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
@json_option
def submit(
    submission: Path | None,
    plugin_spec: str | None,
    params: tuple[str, ...],
    challenge_id: str,
    no_wait: bool,
    timeout: int,
    server: str | None,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Upload SUBMISSION (or, with --plugin, an attack plugin) to the server, wait for it to be
    scored, print the score."""
    if (submission is None) == (plugin_spec is None):
        raise NcbenchError("give a SUBMISSION file or --plugin FILE.py:Class (or DIST:module:Class), not both")
    if plugin_spec is None:
        if params:
            raise NcbenchError("--param goes with --plugin")
        outcome = submit_file(
            submission,
            challenge_id,
            server=server,
            token=read_token(token_file),
            wait=not no_wait,
            timeout=timeout,
            quiet=as_json,
        )
    else:
        outcome = submit_plugin(
            plugin_spec,
            params,
            challenge_id,
            server=server,
            token=read_token(token_file),
            wait=not no_wait,
            timeout=timeout,
            quiet=as_json,
        )
    if as_json:
        echo_json(outcome)


def wait_until_final(
    client: Client, path: str, what: str, timeout: float, every: float, *, pending: tuple[str, ...] | None = None
) -> dict:
    """Poll ``path`` (a submission or a verified run) until it reaches a final state (or, with
    ``pending``, leaves those states); returns it, or raises one line saying that it was refused
    or failed, and why, or that it is still going."""
    deadline, shown = time.monotonic() + timeout, None
    with progress(f"waiting for {what}", 1) as advance:
        record = client.json("GET", path)  # not the upload's answer: that has the state, not the scores
        while record["state"] in pending if pending else record["state"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise NcbenchError(
                    f"{what} is still {record['state']} after {timeout} s; check later with `ncbench submissions`"
                )
            if wait_line(record) != shown:
                shown = wait_line(record)
                click.echo(f"{what}: {shown}", err=True)  # a sign of life: its place in the queue, then running
            time.sleep(every)
            record = client.json("GET", path)
        advance(1)
    if record["state"] in ("refused", "failed"):
        raise NcbenchError(f"{what} {record['state']}: {record['message']}")
    return record


def submit_file(
    submission: Path,
    challenge_id: str,
    *,
    server: str | None,
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
    job = wait_until_final(client, f"/api/v1/submissions/{job['id']}", f"submission {job['id']}", timeout, 0.5)
    echo(f"submission {job['id']} {job['state']}: {score_or_reason(job)}")
    return job


def submit_plugin(
    spec: str,
    params: tuple[str, ...],
    challenge_id: str,
    *,
    server: str | None,
    token: str | None,
    wait: bool = True,
    timeout: int = 1800,
    quiet: bool = False,
) -> dict:
    """Upload one plugin file (a .py file, a wheel or an sdist) with its class (and module, for
    an archive) and parameters; the server checks it (a job of its workers: this waits for the
    outcome, and a failed check is an NcbenchError), then runs it on fresh hidden releases.
    With ``wait``, poll until the run ends and return it (NcbenchError when it failed).
    ``quiet`` prints nothing on stdout."""
    echo = (lambda text: None) if quiet else click.echo
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
    click.echo(f"uploading {path.name}: the server checks it in its sandbox, then queues it", err=True)
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
    # The check is a job of the server's: its outcome, or the failure and why, comes by polling.
    run = wait_until_final(
        client,
        f"/api/v1/plugins/{run['id']}",
        f"verified run {run['id']}",
        timeout,
        1.0,
        pending=("checking",),
    )
    echo(
        f"verified run {run['id']} queued: {run['attack']} {run['attack_version']} on {run['releases']} fresh "
        f"hidden releases (seed commitments: {client.server}/api/v1/challenges/{challenge_id}/commitments)"
    )
    if not wait:
        return run
    run = wait_until_final(client, f"/api/v1/plugins/{run['id']}", f"verified run {run['id']}", timeout, 1.0)
    scores = ", ".join(short(e["headline"]) for e in run["evaluations"])
    spread = f" ± {short(run['spread'])} (sd)" if run["spread"] is not None else ""
    echo(
        f"verified run {run['id']} scored: re-identification {short(run['mean'])}{spread} over "
        f"{len(run['evaluations'])} fresh keys ({scores})"
    )
    return run


@click.command("submissions")
@server_option
@token_option
@json_option
def submissions(server: str | None, token_file: Path | None, as_json: bool) -> None:
    """Your team's submissions and verified plugin runs: id, challenge, state, score or reason."""
    client = Client(server, read_token(token_file), need_token=True)
    rows, runs = client.json("GET", "/api/v1/submissions"), client.json("GET", "/api/v1/plugins")
    if as_json:
        echo_json({"submissions": rows, "plugin_runs": runs})
        return
    if not rows and not runs:
        click.echo("no submissions yet")
        return
    if rows:
        echo_table(
            [
                [
                    row["id"],
                    row["challenge_id"],
                    wait_line(row),
                    _minutes(row["created_utc"]),
                    score_or_reason(row),
                ]
                for row in rows
            ],
            ["SUBMISSION", "CHALLENGE", "STATE", "SUBMITTED", "SCORE OR REASON"],
        )
    if runs:
        click.echo("" if not rows else "\nverified plugin runs")
        echo_table(
            [
                [
                    run["id"],
                    run["challenge_id"],
                    wait_line(run),
                    _minutes(run["created_utc"]),
                    f"{run['attack']} {run['attack_version']}" if run["attack"] else "(not checked)",
                    _run_result(run),
                ]
                for run in runs
            ],
            ["RUN", "CHALLENGE", "STATE", "SUBMITTED", "ATTACK", "RE-IDENTIFICATION OR REASON"],
        )


@click.command("status")
@click.argument("item_id", metavar="ID", type=int)
@click.option(
    "--run",
    "is_run",
    is_flag=True,
    help="ID is a verified plugin run's id (RUN in `ncbench submissions`), not a submission's.",
)
@click.option("--wait", is_flag=True, help="Wait until it is scored, refused or failed.")
@click.option("--timeout", type=int, default=1800, show_default=True, help="Seconds to wait, with --wait.")
@server_option
@token_option
@json_option
def status(
    item_id: int, is_run: bool, wait: bool, timeout: int, server: str | None, token_file: Path | None, as_json: bool
) -> None:
    """One of your submissions (the id `ncbench submit` printed, the board's id), or with --run one of
    your verified plugin runs: its state and, once scored, its score."""
    client = Client(server, read_token(token_file), need_token=True)
    what = f"verified run {item_id}" if is_run else f"submission {item_id}"
    path = f"/api/v1/plugins/{item_id}" if is_run else f"/api/v1/submissions/{item_id}"
    try:
        record = client.json("GET", path)
        deadline, shown = time.monotonic() + timeout, None
        while wait and record["state"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise NcbenchError(f"{what} is still {record['state']} after {timeout} s")
            if wait_line(record) != shown:
                shown = wait_line(record)
                click.echo(f"{what}: {shown}", err=True)  # a sign of life while it waits
            time.sleep(1)
            record = client.json("GET", path)
    except NotFound as error:
        other = "a submission: leave out --run" if is_run else "a verified plugin run: add --run"
        raise NcbenchError(f"{error}; if {item_id} is the id of {other}") from None
    if as_json:
        echo_json(record)
        return
    click.echo(f"{what} on {record['challenge_id']}: {wait_line(record)}")
    if is_run:
        click.echo(_run_result(record))
        return
    board_id = record.get("submission_id")
    if board_id is not None and board_id != record["id"]:  # scored before ids were one
        click.echo(f"on the board: submission {board_id}")
    if record.get("scores_hidden"):
        click.echo(f"score: {HIDDEN}")
    elif record["public"]:
        click.echo(f"score ({LADDER_LABEL}): {scores_text(record['public'])}")
    elif record["message"]:
        click.echo(f"reason: {record['message']}")


def wait_line(record: dict) -> str:
    """A submission's or a run's state, with its place in the queue while it is queued."""
    ahead = record.get("queue_ahead")
    if ahead is None or record["state"] not in ("queued", "checking"):
        return record["state"]
    return f"{record['state']}, next in the queue" if ahead == 0 else f"{record['state']}, {ahead} ahead in the queue"


def _run_result(run: dict) -> str:
    """A verified run's score, or why it has none, on one line."""
    if run.get("scores_hidden"):
        return HIDDEN
    if run["mean"] is not None:
        return f"re-identification: mean {short(run['mean'])} over {run['releases']} hidden releases"
    return run["message"] or ""


@click.command("login")
@server_option
def login(server: str | None) -> None:
    """Save the challenge server and your team token in ~/.config/ncbench/config.json (readable by
    you only), after checking the token with the server. The token is read from standard input
    when it is piped, else asked for without echo; $NCBENCH_SERVER and $NCBENCH_TOKEN, when set,
    still win over the saved values."""
    if server is None:
        raise NcbenchError("give the challenge server: ncbench login --server URL")
    if sys.stdin.isatty():
        token = click.prompt("team token", hide_input=True, default="", show_default=False)
    else:
        token = sys.stdin.readline()
    token = token.strip()
    if not token:
        raise NcbenchError("no token given")
    team = Client(server, token, need_token=True).json("GET", "/api/v1/whoami")["team"]
    path = write_config({"server": server.rstrip("/"), "token": token})
    click.echo(f"logged in to {server.rstrip('/')} as team {team} (saved in {path})")


@click.command("whoami")
@server_option
@token_option
@json_option
def whoami(server: str | None, token_file: Path | None, as_json: bool) -> None:
    """Your team, the server, and the scored submissions left today (UTC) on each open challenge."""
    client = Client(server, read_token(token_file), need_token=True)
    team = client.json("GET", "/api/v1/whoami")["team"]
    open_challenges = client.json("GET", "/api/v1/challenges")
    today = dt.datetime.now(dt.UTC).date().isoformat()
    used: dict[str, int] = {}
    for job in client.json("GET", "/api/v1/submissions"):
        if job["state"] in COUNTED_STATES and str(job["created_utc"]).startswith(today):
            used[job["challenge_id"]] = used.get(job["challenge_id"], 0) + 1
    usage = [
        {
            "challenge_id": row["challenge_id"],
            "daily_limit": row.get("daily_limit"),
            "used_today": used.get(row["challenge_id"], 0),
            "left_today": None
            if not row.get("daily_limit")
            else max(0, row["daily_limit"] - used.get(row["challenge_id"], 0)),
            "deadline_utc": row.get("deadline_utc"),
        }
        for row in open_challenges
    ]
    if as_json:
        echo_json({"team": team, "server": client.server, "challenges": usage})
        return
    click.echo(f"team {team} on {client.server}")
    if not usage:
        click.echo("no open challenges")
        return
    echo_table(
        [
            [
                row["challenge_id"],
                "no limit" if row["left_today"] is None else f"{row['left_today']} of {row['daily_limit']}",
                _minutes(row["deadline_utc"]) or "none",
            ]
            for row in usage
        ],
        ["CHALLENGE", "LEFT TODAY (UTC)", "DEADLINE"],
    )
