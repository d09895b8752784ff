"""Untrusted bytes are parsed in a child process under limits, never in the server.

An uploaded answer file (HDF5), a plugin's answer file and a plugin archive (wheel or sdist) are
hostile until parsed: a crafted HDF5 file can make libhdf5 allocate gigabytes, a crafted tar
header can hold the GIL for minutes (CVE-2024-6232). Each is parsed by
``python -I -m ncbench.leaderboard.isolated TASK`` under ``prlimit`` (address space, CPU
seconds, largest file) and a wall-clock limit, with the request as JSON on stdin and one JSON
line out. A child that dies (a signal, an allocation past its limit, the wall limit) raises
:class:`ChildKilled`, whose message is fixed: nothing of what the child printed reaches a team.

The child runs as the server's user: the limits stop one file from taking the server's memory or
time, they are no sandbox against a parser exploited into running code (docs/security.md).

The attacker's client checks a release it fetched the same way (``release``): whoever runs the
server it fetched from may be hostile too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ncbench.errors import NcbenchError, one_line

MODULE = "ncbench.leaderboard.isolated"


@dataclass(frozen=True)
class ChildLimits:
    """What one child may use: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), wall-clock
    seconds, the largest file it writes (RLIMIT_FSIZE, its answer included)."""

    memory_bytes: int
    cpu_s: int
    wall_s: float
    file_bytes: int


# Scoring: the interpreter with torch and h5py maps about 0.8 GB; a legitimate answer file at
# N = 10,000 peaks under 1 GB more.
SCORE_LIMITS = ChildLimits(memory_bytes=4 << 30, cpu_s=600, wall_s=900, file_bytes=16 << 20)
# Unpacking a plugin archive: at most 64 MiB unpacked (attacks.plugins.archive), in seconds.
UNPACK_LIMITS = ChildLimits(memory_bytes=1 << 30, cpu_s=60, wall_s=60, file_bytes=64 << 20)
# Checking a fetched release inflates each of its chunks once (about 0.5 GB/s a core): an hour
# covers releases of a few hundred GB.
RELEASE_LIMITS = ChildLimits(memory_bytes=2 << 30, cpu_s=3600, wall_s=3600, file_bytes=1 << 20)


CHILD_NICENESS = 10  # added to the server's: the API's threads get the CPU first

# The child's whole environment: nothing of the server's (no token, no database URL), and a few
# math threads, since each thread's buffers count against the address-space limit.
CHILD_ENV = {"LANG": "C.UTF-8", **dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"), "4")}
PARENT_ENV = "NCBENCH_PARENT_PID"  # the process the child must not outlive (die_with_parent)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ChildKilled(NcbenchError):
    """The child parsing an untrusted file died: killed by a signal, out of memory or time."""


class ChildCrashed(Exception):
    """The child's code raised something other than NcbenchError: a bug of ours, not a refusal."""


def child_command(limits: ChildLimits) -> list[str]:
    """What a child's command line starts with: a lower CPU priority than the server's (nice
    CHILD_NICENESS), then its limits (prlimit). Scoring is batch work; without it, a backlog of
    uploads kept a scorer child on a core and the API's answers waited behind it."""
    limit = ["prlimit", f"--as={limits.memory_bytes}", f"--cpu={limits.cpu_s}", f"--fsize={limits.file_bytes}", "--"]
    return ["nice", "-n", str(CHILD_NICENESS), *limit]


def call(task: str, request: dict, limits: ChildLimits, *, died: str) -> object:
    """The JSON answer of :data:`TASKS` ``[task](**request)`` run in a limited child. Raises
    NcbenchError with the child's own refusal, or ChildKilled(``died``) when it gave none."""
    lines = child_lines([sys.executable, "-I", "-m", MODULE, task], json.dumps(request).encode(), limits, died=died)
    answer = last_json(lines)
    if not isinstance(answer, dict) or not ({"ok", "error", "crash"} & answer.keys()):
        raise ChildKilled(died)
    if "error" in answer:
        raise NcbenchError(str(answer["error"]))
    if "crash" in answer:
        raise ChildCrashed(str(answer["crash"]))
    return answer["ok"]


def child_lines(command: list[str], stdin: bytes | BinaryIO, limits: ChildLimits, *, died: str) -> list[bytes]:
    """The lines ``command`` printed, run as a child under ``limits`` (:func:`child_command`)
    with ``stdin`` (bytes, or a file it reads itself) and without the server's environment. Its
    output goes to a file bounded by RLIMIT_FSIZE, never to a pipe held in memory, and at most
    ``limits.file_bytes`` of it is read. Raises ChildKilled(``died``) unless it exits 0."""
    given = {"input": stdin} if isinstance(stdin, bytes) else {"stdin": stdin}
    with tempfile.TemporaryFile() as out:
        try:
            done = subprocess.run(
                [*child_command(limits), *command],
                **given,
                stdout=out,
                stderr=subprocess.DEVNULL,
                timeout=limits.wall_s,
                env={**CHILD_ENV, PARENT_ENV: str(os.getpid())},
            )
        except subprocess.TimeoutExpired:
            raise ChildKilled(died) from None
        if done.returncode != 0:
            raise ChildKilled(died)
        out.seek(0)
        return out.read(limits.file_bytes).splitlines()


def last_json(lines: list[bytes]) -> object:
    """The JSON value on the last of ``lines``, or None when there is none (a cut or garbled line)."""
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


# -- the tasks, run in the child ---------------------------------------------------------------


def score(*, submission: str, key: str, release: str | None) -> dict:
    """:func:`leaderboard.scoring.score_submission`, as JSON (:func:`score_result`)."""
    from ncbench.leaderboard.scoring import score_submission

    return dataclasses.asdict(score_submission(submission, key, release))


def score_isolated(submission: Path, key: Path, release: Path | None, *, died: str):
    """:func:`leaderboard.scoring.score_submission` in a child under :data:`SCORE_LIMITS`
    (``key`` a key file or a release folder, ``release`` None to find it beside the key)."""
    request = {"submission": str(submission), "key": str(key), "release": None if release is None else str(release)}
    return score_result(call("score", request, SCORE_LIMITS, died=died))


def score_result(answer: dict):
    """The :class:`leaderboard.scoring.ScoreResult` that :func:`score` wrote as JSON."""
    from ncbench.leaderboard.scoring import ChallengeInfo, ScoreResult

    return ScoreResult(
        **{
            **answer,
            "challenge": ChallengeInfo(**answer["challenge"]),
            "knowledge": tuple(answer["knowledge"]),
            "metrics": {int(split): values for split, values in answer["metrics"].items()},
        }
    )


def unpack(*, archive: str, filename: str, dest: str, module: str) -> None:
    """:func:`attacks.plugins.archive.prepare`: check and unpack a plugin archive into ``dest``."""
    from ncbench.attacks.plugins import archive as plugin_archive

    plugin_archive.prepare(Path(archive), filename=filename, dest=Path(dest), module=module)


def release(*, path: str) -> None:
    """:func:`challenge.files.check_untrusted_release`: a release that a server sent."""
    from ncbench.challenge.files import check_untrusted_release

    check_untrusted_release(path)


NOT_CHECKED = "was not checked: this machine has no prlimit to limit the check"


def check_release(path: Path, name: str) -> bool:
    """:func:`challenge.files.check_untrusted_release` on ``path`` (``name`` in messages) in a child
    under :data:`RELEASE_LIMITS`. Every refusal, and a child that dies, is one NcbenchError line;
    False when this machine cannot limit a child (:func:`can_limit`), and nothing was checked."""
    if not can_limit():
        return False
    died = f"{name} cannot be read within the limits of a release (corrupt or crafted)"
    try:
        call("release", {"path": str(path)}, RELEASE_LIMITS, died=died)
    except ChildKilled:
        raise
    except (NcbenchError, ChildCrashed) as error:
        raise NcbenchError(one_line(f"{name} is not a release that ncbench can read ({error})", 1000)) from None
    return True


def check_release_shown(path: Path, name: str) -> bool:
    """:func:`check_release` behind a progress line, and a warning on standard error where this
    machine cannot limit the child and nothing was checked (then False): what `fetch`, `challenge
    verify` and `attack run` show."""
    from ncbench.progress import progress  # the child never needs it

    with progress(f"checking {name}", 1) as advance:
        checked = check_release(path, name)
        advance(1)
    if not checked:
        print(f"warning: {name} {NOT_CHECKED}", file=sys.stderr)
    return checked


def check_release_once(path: Path, name: str, *, again: bool = False) -> None:
    """:func:`check_release_shown`, unless this user had this very file checked already (or
    ``again``); a file that passes is recorded as it was when its check began
    (:mod:`ncbench.checked`)."""
    from ncbench import checked

    if not again and checked.was_checked(path):
        return
    seen = checked.identity(path)
    if check_release_shown(path, name):
        checked.mark_checked(path, seen)


def can_limit() -> bool:
    """Whether this machine has the tools :func:`child_command` starts a child with (Linux's
    util-linux ``prlimit``, and ``nice``)."""
    return shutil.which("prlimit") is not None and shutil.which("nice") is not None


TASKS = {"score": score, "unpack": unpack, "release": release}
# Imported before the file is read: a child that cannot even load its code (its limits too small
# for the interpreter) dies without an answer, rather than reporting a bug of ours.
PRELOAD = {
    "score": "ncbench.leaderboard.scoring",
    "unpack": "ncbench.attacks.plugins.archive",
    "release": "ncbench.challenge.files",
}


def die_with_parent() -> None:
    """Have the kernel kill this process (SIGKILL) when the thread that started it ends, as when
    the server is stopped or killed: a child left behind would go on parsing for up to its wall
    limit with nobody to read its answer. Exits at once if that parent is already gone. Linux only;
    elsewhere the wall and CPU limits remain the bound."""
    expected = os.environ.get(PARENT_ENV)
    if not sys.platform.startswith("linux") or expected is None:
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(expected):  # the parent died before the request above took effect
        os._exit(1)


def _main(argv: list[str]) -> int:
    die_with_parent()
    importlib.import_module(PRELOAD[argv[0]])
    request = json.loads(sys.stdin.buffer.read())
    try:
        answer = json.dumps({"ok": TASKS[argv[0]](**request)})
    except MemoryError:
        raise  # past its address-space limit: no answer, the parent reports its fixed message
    except NcbenchError as error:
        answer = json.dumps({"error": str(error)})
    except Exception as error:  # noqa: BLE001 - reported to the parent, which records it as our bug
        answer = json.dumps({"crash": f"{type(error).__name__}: {error}"})
    sys.stdout.write(answer + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
