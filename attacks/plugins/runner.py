"""Running an attack and checking a plugin's declarations: what `ncbench attack run|check` and the
verified track's sandbox both do, in one place.

A bug inside an attack is the attack's failure, not ncbench's: every failure of plugin code comes
out as one :class:`NcbenchError` line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ncbench.attacks.base import Attack
from ncbench.attacks.plugins import CHECK_MARK as CHECK_MARK
from ncbench.attacks.submission import Submission, write_submission
from ncbench.challenge.files import open_release
from ncbench.errors import NcbenchError, disk_full, one_line

MESSAGE_LIMIT = 300  # characters kept of an attack's own error message: it is someone else's text


def parse_param_items(items) -> dict[str, str]:
    """``--param name=value`` strings as {name: value}."""
    raw = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise NcbenchError(f"--param must look like name=value, got {item!r}")
        raw[name.strip()] = value.strip()
    return raw


def run_attack(
    cls: type[Attack], params, release_path: Path, out: Path, *, device: str, seed: int, team: str | None = None
) -> Submission:
    """Run ``cls`` on the release at ``release_path`` and write its submission to ``out``; any
    failure of the attack's code is one NcbenchError line."""
    with open_release(release_path) as release:
        with failure_of(cls.name, "failed"):
            instance = cls(params, device=device, seed=seed)
            instance.check_release(release)
            submission = instance(release)
            if not isinstance(submission, Submission):
                raise TypeError(f"run() returned {type(submission).__name__}, not a Submission")
    submission.team = team
    with failure_of(cls.name, "returned a submission that cannot be written"):
        write_submission(out, submission, force=True)
    return submission


def declaration_problems(cls: type[Attack], raw_params: dict[str, str], tasks: list[str]) -> list[str]:
    """What the server would refuse about ``cls`` before running it, one line each: parameters
    that do not parse, tasks it does not solve, knowledge the leaderboard refuses, a version
    the board cannot store."""
    problems = []
    try:
        with failure_of(cls.name, "failed"):
            cls.parse_params(raw_params)
    except NcbenchError as error:
        problems.append(str(error))
    problems += [
        f"attack {cls.name} does not solve the {task} task (it declares {', '.join(cls.tasks)})"
        for task in tasks
        if task not in cls.tasks
    ]
    if "key" in cls.knowledge:
        problems.append(f"attack {cls.name} declares knowledge 'key': attacks that read the key are refused")
    if not (0 < len(cls.version) <= VERSION_MAX and cls.version.isprintable()):
        problems.append(f"attack {cls.name}: version must be 1-{VERSION_MAX} printable characters")
    return problems


VERSION_MAX = 64  # leaderboard/store.py MAX_LENGTHS["attack_version"]


@contextmanager
def failure_of(attack: str, what: str) -> Iterator[None]:
    """A bug inside an attack is the attack's failure, not ours: one line naming the exception.
    An ``NcbenchError`` the attack raises itself (a task it does not solve) keeps its message."""
    try:
        yield
    except NcbenchError as error:
        raise NcbenchError(_one_line(error)) from None
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - any failure of an attack's code, an exit included
        # A full disk in HDF5's words would name temporary files and buffer addresses.
        reason = "no space left on the device" if disk_full(error) else _one_line(error)
        raise NcbenchError(f"attack {attack} {what}: {type(error).__name__}: {reason}") from None


def _one_line(error: BaseException) -> str:
    """An exception's message on one printable line, cut at ``MESSAGE_LIMIT`` characters."""
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 - a plugin's exception may not even print
        text = "(message cannot be printed)"
    return one_line(text, MESSAGE_LIMIT)
