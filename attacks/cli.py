"""``ncbench attack ...``: list attacks and run one on a public release."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from ncbench.attacks.registry import all_attacks, resolve
from ncbench.attacks.submission import Submission, write_submission
from ncbench.challenge.encoders import pick_device
from ncbench.challenge.files import open_release
from ncbench.errors import NcbenchError

MESSAGE_LIMIT = 300  # characters kept of an attack's own error message: it is someone else's text


@click.group("attack")
def group() -> None:
    """Attacker tools: list attacks, run one on a public release to get a submission."""


@group.command("list")
@click.option("--verbose", "-v", is_flag=True, help="Also list each attack's parameters.")
def list_command(verbose: bool) -> None:
    """Name, version, tasks, knowledge and a one-line description of every known attack."""
    for name, cls in sorted(all_attacks().items()):
        click.echo(f"{name} {cls.version}  tasks: {','.join(cls.tasks)}  assumes: {','.join(cls.knowledge)}")
        click.echo(f"    {cls.description}")
        if verbose:
            for line in cls.param_help():
                click.echo(f"      --param {line}")


@group.command("run")
@click.argument("attack")
@click.option("--release", "release_path", type=click.Path(path_type=Path), required=True,
              help="Public release file (or release directory).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Submission to write (.h5, or .csv for a reid mapping).")
@click.option("--param", "params", multiple=True, metavar="K=V", help="Attack parameter (repeatable); see `attack list -v`.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice the attack makes.")
@click.option("--team", help="Team name recorded in the submission.")
@click.option("--force", is_flag=True, help="Replace an existing submission file.")
def run_command(attack, release_path, out, params, device, seed, team, force) -> None:
    """Run ATTACK (a name from `attack list`, or FILE.py:Class) on a release and write a submission."""
    cls = resolve(attack)
    raw = {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise NcbenchError(f"--param must look like name=value, got {item!r}")
        raw[name.strip()] = value.strip()
    with _failure_of(cls.name, "failed"):
        params = cls.parse_params(raw)
    device = pick_device(device)
    if out.exists() and not force:
        raise NcbenchError(f"{out} already exists (use --force to replace it)")
    with open_release(release_path) as release:
        with _failure_of(cls.name, "failed"):
            instance = cls(params, device=device, seed=seed)
            instance.check_release(release)
            submission = instance(release)
            if not isinstance(submission, Submission):
                raise TypeError(f"run() returned {type(submission).__name__}, not a Submission")
    submission.team = team
    with _failure_of(cls.name, "returned a submission that cannot be written"):
        write_submission(out, submission, force=True)
    click.echo(f"wrote {out} ({submission.attack} {submission.attack_version}, {submission.runtime_s:.1f} s; "
               f"parts: {', '.join(submission.parts())})")



@contextmanager
def _failure_of(attack: str, what: str) -> Iterator[None]:
    """A bug inside an attack is the attack's failure, not ours: one line naming the exception.
    An ``NcbenchError`` the attack raises itself (a task it does not solve) keeps its message."""
    try:
        yield
    except NcbenchError as error:
        raise NcbenchError(_one_line(error)) from None
    except (Exception, SystemExit) as error:  # noqa: BLE001 - any failure of an attack's code
        raise NcbenchError(f"attack {attack} {what}: {type(error).__name__}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    """An exception's message on one printable line, cut at ``MESSAGE_LIMIT`` characters."""
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 - a plugin's exception may not even print
        text = "(message cannot be printed)"
    text = "".join(c if c.isprintable() else " " for c in " ".join(text.split()))
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + "..."
