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
import ipaddress
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import click
import httpx

from ncbench import checked
from ncbench.errors import NcbenchError, one_line
from ncbench.progress import progress

SERVER_ENV, TOKEN_ENV = "NCBENCH_SERVER", "NCBENCH_TOKEN"
FINAL_STATES = ("scored", "refused", "failed")
CHUNK = 1 << 20

DEFAULT_SERVER = "http://127.0.0.1:8000"
COUNTED_STATES = ("queued", "running", "scored")  # the states the server counts towards a daily limit
LADDER_LABEL = "public half, as the Ladder shows it"
HIDDEN = "hidden until the close (a blind challenge)"

# Whoever runs the server, or sits between it and the client on plain HTTP, may be hostile. An
# API answer is read whole only up to ANSWER_MAX_BYTES and within ANSWER_S, whatever pace the
# server keeps; its text reaches the terminal as one printable line of at most TEXT_MAX
# characters; an answer without the fields a command reads, of their JSON types, is refused
# before any of it is shown or written.
ANSWER_MAX_BYTES = 4 << 20  # parsed, a listing of small objects takes up to 50 times its bytes
ANSWER_S = 120.0
TEXT_MAX = 500
NESTING_MAX = 32  # levels of JSON arrays and objects; the API's answers have 4
INTEGER_MAX = 2**63 - 1  # what the server's database holds
DOWNLOAD_RATE_MIN = 1000  # bytes a second on average, after DOWNLOAD_GRACE_S: else it stops (and resumes later)
DOWNLOAD_GRACE_S = 60.0
LISTED_FILES_MAX = 256  # a challenge publishes a release and a few small files
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")
NONE, NUMBER = type(None), (int, float)
# The fields each command reads of an answer, with their JSON types (docs/server.md).
FILE_FIELDS = {"name": str, "size": int, "sha256": str}
CHALLENGE_FIELDS = {
    "challenge_id": str,
    "task": str,
    "preset": str,
    "n_encoded": int,
    "daily_limit": (int, NONE),
    "deadline_utc": (str, NONE),
    "files": list,
}
QUEUED_FIELDS = {"id": int}
COMMON_FIELDS = {
    "id": int,
    "challenge_id": str,
    "state": str,
    "message": (str, NONE),
    "created_utc": str,
    "scores_hidden": bool,
    "queue_ahead": (int, NONE),
}
JOB_FIELDS = {**COMMON_FIELDS, "public": (dict, NONE), "submission_id": (int, NONE)}
RUN_FIELDS = {
    **COMMON_FIELDS,
    "attack": (str, NONE),
    "attack_version": (str, NONE),
    "releases": int,
    "mean": (*NUMBER, NONE),
    "spread": (*NUMBER, NONE),
    "evaluations": list,
}
EVALUATION_FIELDS = {"headline": (*NUMBER, NONE)}
TEAM_FIELDS = {"team": str}

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
    """A thin httpx client that turns every HTTP failure into one NcbenchError line, and every
    answer into checked JSON (:data:`ANSWER_MAX_BYTES`, :data:`ANSWER_S`, :func:`answer_fields`)."""

    def __init__(self, server: str | None, token: str | None = None, *, need_token: bool = False):
        if need_token and not token:
            raise NcbenchError(f"no team token: run `ncbench login`, set ${TOKEN_ENV} or pass --token-file")
        # Compressed answers are refused: httpx inflates a whole network read at once, unbounded.
        headers = {"Accept-Encoding": "identity", **({"Authorization": f"Bearer {token}"} if token else {})}
        self.server = server_url(server).rstrip("/")
        if token and not _private_link(self.server):
            click.echo(f"warning: {self.server} is plain HTTP: the team token travels unencrypted", err=True)
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=httpx.Timeout(60, connect=10))

    def json(
        self,
        method: str,
        path: str,
        fields: dict | None = None,
        *,
        many: bool = False,
        seconds: float | None = None,
        **kwargs,
    ):
        """The answer to ``method path`` as JSON: one object with ``fields`` (:func:`answer_fields`),
        or with ``many`` a list of them; every string of it one printable line. ``seconds`` bounds
        the whole exchange, whatever pace the server keeps (:data:`ANSWER_S` by default)."""
        status, body = self._exchange(method, path, ANSWER_S if seconds is None else seconds, kwargs)
        _check(status, body)
        try:
            data = json.loads(body, parse_constant=_not_json, parse_float=_finite)
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, (dict, list)):  # a web page: the board's address, or another site
            raise NcbenchError(f"{self.server} did not answer as a challenge server's API (is it the board's address?)")
        try:
            data = _printable(data)
        except ValueError as error:
            raise NcbenchError(f"the server's answer to {path} is not a challenge server's: {error}") from None
        if fields is not None:
            if many and not isinstance(data, list):
                raise NcbenchError(f"the server's answer to {path} is not a challenge server's: a list was expected")
            for record in data if many else [data]:
                answer_fields(record, fields, path)
        return data

    def opened(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The answer to ``method path``, a success, with its head read within :data:`ANSWER_S`
        and its body still to come (the caller closes it); a failure is one NcbenchError line."""

        def open_answer() -> httpx.Response:
            response = self._send(method, path, kwargs)
            try:
                _check(response.status_code, b"" if response.is_success else self.body(response, path))
            except BaseException:
                response.close()
                raise
            return response

        return self._within(ANSWER_S, open_answer, path)

    def _exchange(self, method: str, path: str, seconds: float, kwargs: dict) -> tuple[int, bytes]:
        def exchange() -> tuple[int, bytes]:
            response = self._send(method, path, kwargs)
            try:
                return response.status_code, self.body(response, path)
            finally:
                response.close()

        return self._within(seconds, exchange, path)

    def _within(self, seconds: float, work: Callable, path: str):
        try:
            return within(seconds, work, f"{self.server} did not answer {path} within {seconds:.0f} s")
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise NcbenchError(self.failed(error)) from None

    def _send(self, method: str, path: str, kwargs: dict) -> httpx.Response:
        """The answer with its head read, refused when its body is compressed."""
        response = self.http.send(self.http.build_request(method, path, **kwargs), stream=True)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            response.close()
            raise NcbenchError(
                f"{self.server} sent its answer to {path} compressed ({one_line(encoding, 40)}): a challenge server "
                "sends none to a client that asks for none"
            )
        return response

    def body(self, response: httpx.Response, path: str) -> bytes:
        """The body of an answer to ``path``, refused past :data:`ANSWER_MAX_BYTES`."""
        body = bytearray()
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > ANSWER_MAX_BYTES:
                raise NcbenchError(
                    f"{self.server} sent an answer to {path} larger than {ANSWER_MAX_BYTES >> 20} MiB; "
                    "is it a challenge server?"
                )
        return bytes(body)

    def failed(self, error: Exception) -> str:
        """What an httpx failure says, on one line: the server unreachable, or the exchange broken."""
        reason = one_line(str(error) or type(error).__name__, TEXT_MAX)
        if isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)):
            return f"cannot reach {self.server}: {reason}"
        return f"the exchange with {self.server} failed: {reason}"


def within(seconds: float, work: Callable[[], object], late: str):
    """``work()``, or NcbenchError(``late``) once ``seconds`` have passed, however it is blocked:
    it runs on a daemon thread, which a command that gives up leaves behind as it exits."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, name="ncbench-exchange", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise NcbenchError(late)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def answer_fields(record, fields: dict, path: str) -> None:
    """Refuse ``record`` (an answer to ``path``) unless it is an object holding each of ``fields``
    with its JSON type (a type or a tuple of them; true and false are not numbers)."""
    if not isinstance(record, dict):
        raise NcbenchError(f"the server's answer to {path} is not a challenge server's: an object was expected")
    for name, kinds in fields.items():
        value = record.get(name, ...)
        if value is ... or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _types(kinds)):
            raise NcbenchError(f"the server's answer to {path} is not a challenge server's: no valid {name!r}")


def _types(kinds) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    """A JSON number as a float, refusing one past the float range (1e999), which JSON cannot
    write back: what a command prints with --json stays JSON."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _printable(value, depth: int = 0):
    """``value`` (parsed JSON) with every string, keys included, as one printable line of at most
    :data:`TEXT_MAX` characters: no escape sequence, carriage return or line of the server's
    reaches the terminal. ValueError for an integer past :data:`INTEGER_MAX` or arrays and
    objects nested deeper than :data:`NESTING_MAX`."""
    if isinstance(value, str):
        return one_line(value, TEXT_MAX)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INTEGER_MAX:
        raise ValueError("an integer past 2**63")
    if isinstance(value, (list, dict)) and depth >= NESTING_MAX:
        raise ValueError(f"nested deeper than {NESTING_MAX} levels")
    if isinstance(value, list):
        return [_printable(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {_printable(key): _printable(item, depth + 1) for key, item in value.items()}
    return value


def _private_link(server: str) -> bool:
    """Whether a token sent to ``server`` stays private: HTTPS, or HTTP on this machine."""
    parts = urlsplit(server)
    if parts.scheme != "http":
        return True
    host = parts.hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def _check(status: int, body: bytes) -> None:
    if 200 <= status < 300:
        return
    try:
        detail = one_line(str(json.loads(body).get("detail")), TEXT_MAX)
    except (ValueError, AttributeError, RecursionError):
        detail = one_line(body[:200].decode(errors="replace"), TEXT_MAX)
    if status == 401:
        raise NcbenchError(f"the server refused the token ({detail})")
    if status == 404:
        raise NotFound(f"server answered 404: {detail}")
    raise NcbenchError(f"server answered {status}: {detail}")


@click.command("challenges")
@server_option
@json_option
def challenges(server: str | None, as_json: bool) -> None:
    """List the open challenges: id, task, preset, N, daily limit, deadline (UTC), size."""
    rows = open_challenges(Client(server))
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


def open_challenges(client: Client) -> list[dict]:
    """The server's open challenges, each with :data:`CHALLENGE_FIELDS` and its files'
    :data:`FILE_FIELDS`."""
    path = "/api/v1/challenges"
    rows = client.json("GET", path, CHALLENGE_FIELDS, many=True)
    for row in rows:
        for entry in row["files"]:
            answer_fields(entry, FILE_FIELDS, path)
    return rows


def _minutes(stamp: str | None) -> str:
    """An ISO timestamp from the server as 'YYYY-MM-DD HH:MM UTC' (empty for none)."""
    if not stamp:
        return ""
    try:
        when = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        if when.tzinfo is not None:
            when = when.astimezone(dt.UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        return str(stamp)
    return when.strftime("%Y-%m-%d %H:%M UTC")


@click.command("fetch")
@click.argument("challenge_id")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder to write [default: CHALLENGE_ID].")
@click.option("--force", is_flag=True, help="Replace files in the folder that differ from the server's.")
@server_option
def fetch(challenge_id: str, out: Path | None, force: bool, server: str) -> None:
    """Download a challenge's public files, resuming interrupted downloads; every sha256 is
    checked before it says done. A file of the folder that differs from the server's is kept
    unless --force."""
    from ncbench.h5io import has_hdf5_signature, sha256_file  # h5py and numpy: not in every --help

    client = Client(server)
    listed = listed_files(client, challenge_id)
    out = Path(out or challenge_id)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NcbenchError(f"--out {out}: cannot create that folder ({error.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise NcbenchError(f"--out {out}: this user cannot write in that folder")
    for entry in listed:
        name = entry["name"]
        target, partial = out / name, out / f".{name}.part"
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise NcbenchError(f"{target} is not a plain file; move it away")
        if target.exists():
            if sha256_file(target) == entry["sha256"]:
                click.echo(f"{target} already complete", err=True)
                continue
            if not force:
                raise NcbenchError(f"{target} differs from the server's {name}; move it away, or give --force")
        _download(client, f"/api/v1/challenges/{challenge_id}/files/{name}", partial, entry["size"])
        digest = sha256_file(partial)
        if digest != entry["sha256"]:
            partial.unlink()
            raise NcbenchError(f"{name}: sha256 {digest} does not match the server's {entry['sha256']}; fetch again")
        is_release = name.endswith((".h5", ".hdf5")) or has_hdf5_signature(partial)
        release_checked = is_release and check_release(partial, name)
        os.replace(partial, target)
        if release_checked:
            checked.mark_checked(target)  # `attack run` need not check it again
    click.echo(f"fetched {len(listed)} files into {out}, sha256 checked")


def check_release(partial: Path, name: str) -> bool:
    """Refuse (and remove) a fetched release that cannot be read within known bounds, checked in
    a limited child (:func:`ncbench.leaderboard.isolated.check_release`): a crafted file kills or
    fills that child, not the attacker's later runs. False where nothing could be checked."""
    from ncbench.leaderboard import isolated

    try:
        return isolated.check_release_shown(partial, name)
    except NcbenchError as error:
        partial.unlink()
        raise NcbenchError(f"{one_line(str(error), TEXT_MAX)}; it was removed") from None


def listed_files(client: Client, challenge_id: str) -> list[dict]:
    """A challenge's public files as the server lists them, refused unless each has a plain file
    name (:data:`FILE_NAME`, no path, no leading dot), a size and a sha256, each name once, and
    at most :data:`LISTED_FILES_MAX` of them."""
    path = f"/api/v1/challenges/{challenge_id}/files"
    listed = client.json("GET", path, FILE_FIELDS, many=True)
    if len(listed) > LISTED_FILES_MAX:
        raise NcbenchError(f"the server lists {len(listed)} files; a challenge has at most {LISTED_FILES_MAX}")
    for entry in listed:
        name = entry["name"]
        if not FILE_NAME.fullmatch(name) or name in (".", ".."):
            raise NcbenchError(f"the server listed an unsafe file name {name!r}")
        if entry["size"] < 0 or not SHA256.fullmatch(entry["sha256"]):
            raise NcbenchError(f"the server listed {name} with a size or sha256 that cannot be")
    if len({entry["name"] for entry in listed}) < len(listed):
        raise NcbenchError("the server listed one file name twice")
    return listed


def _download(client: Client, path: str, partial: Path, size: int) -> None:
    """Resume or start the download of ``path`` into ``partial``: at most ``size`` bytes, the size
    the server listed, and only when the disk has room for them."""
    from ncbench.h5io import format_bytes

    have = partial.stat().st_size if partial.is_file() else 0
    if have > size:
        partial.unlink()
        have = 0
    free = shutil.disk_usage(partial.parent).free
    if size - have > free:
        raise NcbenchError(
            f"{partial.name[1:].removesuffix('.part')} needs {format_bytes(size - have)} more; "
            f"{partial.parent} has {format_bytes(free)} free"
        )
    headers = {"Range": f"bytes={have}-"} if have else {}
    with progress(f"downloading {partial.name[1:].removesuffix('.part')}", size) as advance:
        advance(have)
        if have == size:
            partial.touch()
            return
        response = client.opened("GET", path, headers=headers)
        try:
            if response.status_code != 206:
                have = 0
            started, received = time.monotonic(), 0
            with open(partial, "ab" if response.status_code == 206 else "wb") as handle:
                for chunk in response.iter_raw():
                    have, received = have + len(chunk), received + len(chunk)
                    if have > size:
                        partial.unlink()
                        raise NcbenchError(f"the server sent more than the {size} bytes it listed; fetch again")
                    handle.write(chunk)
                    advance(len(chunk))
                    elapsed = time.monotonic() - started
                    if elapsed > DOWNLOAD_GRACE_S and received < DOWNLOAD_RATE_MIN * elapsed:
                        raise NcbenchError(
                            f"the download is slower than {DOWNLOAD_RATE_MIN} bytes a second; run fetch again to resume"
                        )
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise NcbenchError(f"download interrupted ({client.failed(error)}); run fetch again to resume") from None
        finally:
            response.close()


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
    client: Client,
    path: str,
    what: str,
    fields: dict,
    timeout: float,
    every: float,
    *,
    pending: tuple[str, ...] | None = None,
) -> dict:
    """Poll ``path`` (a submission or a verified run, each answer with ``fields``) until it
    reaches a final state (or, with ``pending``, leaves those states) and return it; or raise one
    line saying that it is still going after ``timeout`` seconds, each poll included."""
    deadline, shown = time.monotonic() + timeout, None

    def current() -> dict:
        return client.json("GET", path, fields, seconds=min(ANSWER_S, max(1.0, deadline - time.monotonic())))

    with progress(f"waiting for {what}", 1) as advance:
        record = current()  # not the upload's answer: that has the state, not the scores
        while record["state"] in pending if pending else record["state"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                raise NcbenchError(
                    f"{what} is still {record['state']} after {timeout} s; check later with `ncbench submissions`"
                )
            if wait_line(record) != shown:
                shown = wait_line(record)
                click.echo(f"{what}: {shown}", err=True)  # a sign of life: its place in the queue, then running
            time.sleep(every)
            record = current()
        advance(1)
    return record


def ended_well(record: dict, what: str) -> dict:
    """``record``, unless it was refused or failed: then one line saying so, and why."""
    if record["state"] in ("refused", "failed"):
        raise NcbenchError(f"{what} {record['state']}: {record['message']}")
    return record


def upload_seconds(size: int) -> float:
    """How long an upload of ``size`` bytes and its answer may take: a link of 100 kB/s at least."""
    return ANSWER_S + size / 1e5


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
    client.json("GET", "/api/v1/whoami", TEAM_FIELDS)  # a refused token fails here, before a long upload
    size = submission.stat().st_size

    def body():
        with open(submission, "rb") as handle, progress(f"uploading {submission.name}", size) as advance:
            while chunk := handle.read(CHUNK):
                advance(len(chunk))
                yield chunk

    job = client.json(
        "POST",
        f"/api/v1/challenges/{challenge_id}/submissions",
        QUEUED_FIELDS,
        content=body(),
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        seconds=upload_seconds(size),
    )
    echo(f"submission {job['id']} queued")
    if not wait:
        return job
    what = f"submission {job['id']}"
    job = ended_well(wait_until_final(client, f"/api/v1/submissions/{job['id']}", what, JOB_FIELDS, timeout, 0.5), what)
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
    client.json("GET", "/api/v1/whoami", TEAM_FIELDS)

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
        QUEUED_FIELDS,
        params=query,
        content=body(),
        headers={
            "Content-Length": str(size),
            "Content-Type": "text/x-python" if plugin.kind == "file" else "application/octet-stream",
        },
        timeout=httpx.Timeout(300, connect=10),
        seconds=upload_seconds(size) + 300,
    )
    # The check is a job of the server's: its outcome, or the failure and why, comes by polling.
    what, path = f"verified run {run['id']}", f"/api/v1/plugins/{run['id']}"
    run = ended_well(wait_until_final(client, path, what, RUN_FIELDS, timeout, 1.0, pending=("checking",)), what)
    echo(
        f"verified run {run['id']} queued: {run['attack']} {run['attack_version']} on {run['releases']} fresh "
        f"hidden releases (seed commitments: {client.server}/api/v1/challenges/{challenge_id}/commitments)"
    )
    if not wait:
        return run
    run = ended_well(wait_until_final(client, path, what, RUN_FIELDS, timeout, 1.0), what)
    for evaluation in run["evaluations"]:
        answer_fields(evaluation, EVALUATION_FIELDS, path)
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
    rows = client.json("GET", "/api/v1/submissions", JOB_FIELDS, many=True)
    runs = client.json("GET", "/api/v1/plugins", RUN_FIELDS, many=True)
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
    fields = RUN_FIELDS if is_run else JOB_FIELDS
    try:
        if wait:
            record = wait_until_final(client, path, what, fields, timeout, 1.0)
        else:
            record = client.json("GET", path, fields)
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
    team = Client(server, token, need_token=True).json("GET", "/api/v1/whoami", TEAM_FIELDS)["team"]
    path = write_config({"server": server.rstrip("/"), "token": token})
    click.echo(f"logged in to {server.rstrip('/')} as team {team} (saved in {path})")


@click.command("whoami")
@server_option
@token_option
@json_option
def whoami(server: str | None, token_file: Path | None, as_json: bool) -> None:
    """Your team, the server, and the scored submissions left today (UTC) on each open challenge."""
    client = Client(server, read_token(token_file), need_token=True)
    team = client.json("GET", "/api/v1/whoami", TEAM_FIELDS)["team"]
    challenges_open = open_challenges(client)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    used: dict[str, int] = {}
    for job in client.json("GET", "/api/v1/submissions", JOB_FIELDS, many=True):
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
        for row in challenges_open
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
