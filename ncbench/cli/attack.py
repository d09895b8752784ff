"""``ncbench attack ...``: list attacks, run one on a public release, check a plugin before submitting it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

# Only light modules here: each command imports the attacks (and torch) it runs, so that
# `ncbench attack --help` starts in a fraction of a second.
from ncbench.attacks.plugins import CHECK_MARK
from ncbench.attacks.plugins.archive import parse_spec
from ncbench.challenge.config import PRESETS, TASKS, resolve_config
from ncbench.errors import NcbenchError
from ncbench.leaderboard.server.client import read_token, server_option, submit_file, token_option

if TYPE_CHECKING:
    from ncbench.attacks.base import Attack


@click.group("attack")
def group() -> None:
    """Attacker tools: list attacks, run one on a public release, check a plugin for the verified track."""


@group.command("list")
@click.option("--verbose", "-v", is_flag=True, help="Also list each attack's parameters.")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of the attacks, their parameters included.")
def list_command(verbose: bool, as_json: bool) -> None:
    """Name, version, tasks, knowledge and a one-line description of every known attack."""
    from ncbench.attacks.plugins.registry import all_attacks

    if as_json:
        click.echo(json.dumps([cls.declaration() for _, cls in sorted(all_attacks().items())], indent=2))
        return
    for name, cls in sorted(all_attacks().items()):
        click.echo(f"{name} {cls.version}  tasks: {','.join(cls.tasks)}  assumes: {','.join(cls.knowledge)}")
        click.echo(f"    {cls.description}")
        if verbose:
            for line in cls.param_help():
                click.echo(f"      --param {line}")


@group.command("run")
@click.argument("attack")
@click.option(
    "--release",
    "release_path",
    type=click.Path(path_type=Path),
    required=True,
    help="Public release file (or release directory).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Submission to write (.h5, or .csv for a reid mapping).",
)
@click.option(
    "--param", "params", multiple=True, metavar="K=V", help="Attack parameter (repeatable); see `attack list -v`."
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    default=0,
    show_default=True,
    help="Seed of every random choice the attack makes.",
)
@click.option("--team", help="Team name recorded in the submission.")
@click.option("--force", is_flag=True, help="Replace an existing submission file.")
@click.option(
    "--trust-release",
    is_flag=True,
    help="Read the release without checking it first (a release from elsewhere is checked once, in a limited child).",
)
@click.option("--submit", is_flag=True, help="Then submit the file to the challenge server and wait for its score.")
@server_option
@token_option
def run_command(
    attack, release_path, out, params, device, seed, team, force, trust_release, submit, server, token_file
) -> None:
    """Run ATTACK (a name from `attack list`, or a plugin: FILE.py:Class, DIST.whl:module:Class,
    DIST.tar.gz:module:Class) on a release and write a submission; with --submit, also send it to
    the challenge server ($NCBENCH_SERVER, $NCBENCH_TOKEN). A release that neither `fetch` nor
    `challenge verify` checked, nor `challenge build` wrote, is checked first, once (docs/security.md)."""
    from ncbench.attacks.plugins.registry import resolve
    from ncbench.attacks.plugins.runner import failure_of, parse_param_items, run_attack
    from ncbench.challenge.files import release_file
    from ncbench.h5io import check_output
    from ncbench.hardware import pick_device
    from ncbench.leaderboard import isolated

    cls = resolve(attack)
    with failure_of(cls.name, "failed"):
        params = cls.parse_params(parse_param_items(params))
    device = pick_device(device)
    check_output(out, force=force, inputs=[release_path])  # before the attack runs, not after
    token = read_token(token_file) if submit else None
    if submit and not token:  # before the attack runs, not after
        raise NcbenchError("--submit needs a team token: set $NCBENCH_TOKEN or pass --token-file")
    if not trust_release and (release := release_file(release_path)).is_file():
        isolated.check_release_once(release, str(release_path))
    submission = run_attack(cls, params, release_path, out, device=device, seed=seed, team=team)
    click.echo(
        f"wrote {out} ({submission.attack} {submission.attack_version}, {submission.runtime_s:.1f} s; "
        f"parts: {', '.join(submission.parts())})"
    )
    if submit:
        submit_file(out, submission.challenge_id, server=server, token=token)


# -- admission checks: what the challenge server runs before it queues a plugin -----------------

# The tiny release a plugin runs on end to end: a few seconds on a laptop CPU.
TINY_RELEASE = {"width": 32, "image_size": 32, "patch_size": 8, "bn_batch": 8}
TINY_N = 16


@group.command("check")
@click.argument("attack")
@click.option("--param", "params", multiple=True, metavar="K=V", help="Attack parameter (repeatable).")
@click.option(
    "--task", type=click.Choice(TASKS), help="The challenge's task [default: every task the attack declares]."
)
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    default="nc3",
    show_default=True,
    help="Encoder preset of the tiny release the attack runs on.",
)
@click.option("--no-run", is_flag=True, help="Skip the end-to-end run (the server runs it on hidden releases).")
@click.option("--json", "as_json", is_flag=True, help=f"End with one line '{CHECK_MARK}{{...}}': the declarations.")
def check_command(
    attack: str, params: tuple[str, ...], task: str | None, preset: str, no_run: bool, as_json: bool
) -> None:
    """The checks the challenge server runs before it queues ATTACK (FILE.py:Class, or a
    pure-Python wheel or plain-source sdist: DIST.whl:module:Class, DIST.tar.gz:module:Class)
    for the verified track: an archive's layout and contents are safe and its dependencies are
    installed here; the plugin imports; the class is a concrete Attack with valid declarations
    and an allowed name; the parameters parse; it solves the task; and (unless --no-run) it runs
    end to end on a tiny release built on the fly, into a submission the scorer accepts.
    One line per failure, exit status 2."""
    from ncbench.attacks.plugins.registry import resolve
    from ncbench.attacks.plugins.runner import declaration_problems, parse_param_items

    # archive, import, class, declarations, name: nothing else can be checked without them
    cls = resolve(attack)
    problems = declaration_problems(cls, parse_param_items(params), [task] if task else list(cls.tasks))
    if not problems and not no_run:
        for each in [task] if task else cls.tasks:
            try:
                click.echo(f"{each}: {run_on_tiny_release(cls, parse_param_items(params), task=each, preset=preset)}")
            except NcbenchError as error:
                problems.append(f"{each}: {error}")
    if problems:
        for line in problems:
            click.echo(f"error: {line}", err=True)
        raise SystemExit(2)
    ran = "" if no_run else f", ran end to end on a tiny {preset} release"
    plugin = parse_spec(attack)
    archive = "archive contents and dependencies, " if plugin and plugin.kind in ("wheel", "sdist") else ""
    click.echo(
        f"ok: {cls.name} {cls.version} (tasks {', '.join(cls.tasks)}): {archive}imports, declarations, name and "
        f"parameters checked{ran}"
    )
    if as_json:
        click.echo(
            CHECK_MARK
            + json.dumps(
                {"attack": cls.name, "version": cls.version, "tasks": list(cls.tasks), "knowledge": list(cls.knowledge)}
            )
        )


def run_on_tiny_release(cls: type[Attack], raw_params: dict[str, str], *, task: str, preset: str) -> str:
    """Build a tiny test release of ``task``, run ``cls`` on it and score its submission;
    returns the headline score in words, or raises NcbenchError naming what failed."""
    from ncbench.attacks.plugins.runner import run_attack
    from ncbench.challenge.release import BuildPlan, build_release

    # The organizer's scorer, imported here only: this check is the server's admission test.
    from ncbench.leaderboard.scoring import score_submission

    with tempfile.TemporaryDirectory(prefix="ncbench-check-") as folder:
        release_dir = Path(folder) / "release"
        build_release(
            release_dir,
            config=resolve_config(preset, **TINY_RELEASE),
            plan=BuildPlan.for_task(task, TINY_N, sites=2 if task == "link" else 1),
            source="phantom",
            seed=0,
            test_release=True,
            device="cpu",
        )
        out = Path(folder) / "submission.h5"
        run_attack(cls, cls.parse_params(raw_params), release_dir, out, device="cpu", seed=0)
        try:
            result = score_submission(out, release_dir)
        except NcbenchError as error:
            raise NcbenchError(f"the scorer refused the submission: {error}") from None
    return (
        f"ran end to end; the scorer accepted the submission ({result.headline_metric} "
        f"{result.headline(0):.3f} on the public half of a tiny test release)"
    )
