"""``ncbench demo``: the main job on the embedded real radiographs, end to end.

Builds full-size releases (width 2048, 256x256) from the ``sample`` source, publishes them on an
embedded challenge server (the API and scoring workers of ``ncbench server``, on a free
localhost port), runs every built-in attack that supports each task and submits each answer
through the API with the organizer's token, so the results land in a SQLite leaderboard the way
every team's do; measures the utility (in a second process, beside the attacks)
of each preset's encodings on phantom images (a small CPU-sized run), and prints the attack x
preset matrix and the privacy-utility summary. Re-running reuses every release, submission and
utility result that is already there and valid.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from ncbench.challenge.encoders import pick_device, resolve_config
from ncbench.challenge.files import ReleaseLayout
from ncbench.challenge.release import BuildPlan, build_release
from ncbench.challenge.verify import verify
from ncbench.errors import NcbenchError
from ncbench.leaderboard.store import BUILTIN_TEAM

# (preset, task): reid on the four presets of the original challenge, plus invert and transfer.
DEMO_CHALLENGES = [
    ("linear", "reid"),
    ("nc3-noshuffle", "reid"),
    ("nc3", "reid"),
    ("nc7", "reid"),
    ("linear", "invert"),
    ("linear", "transfer"),
]
# The organizer's own runs of the built-in attacks: the rows of the attack x preset matrix.
TEAM = BUILTIN_TEAM


@click.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Folder for releases, submissions and the leaderboard database.",
)
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=5),
    default=200,
    show_default=True,
    help="Encoded images per release (at least 5: the invert release keeps 4 known pairs).",
)
@click.option(
    "--seed",
    type=int,
    default=2026,
    show_default=True,
    help="Seed of the demo releases: a demo is reproducible, so its releases are test releases whose key is public.",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
def demo(out: Path, n: int, seed: int, device: str) -> None:
    """Build releases from the embedded radiographs, attack them, score them, print the board."""
    from ncbench.attacks.plugins.registry import all_attacks
    from ncbench.attacks.submission import write_submission
    from ncbench.challenge.files import open_release
    from ncbench.leaderboard import workqueue
    from ncbench.leaderboard.metrics import HEADLINE_METRIC
    from ncbench.leaderboard.server import channel
    from ncbench.leaderboard.server.client import submit_file
    from ncbench.leaderboard.server.service import EmbeddedServer
    from ncbench.leaderboard.store import Store
    from ncbench.leaderboard.tables import (
        attack_preset_matrix,
        board,
        privacy_utility,
        to_markdown,
    )

    out.mkdir(parents=True, exist_ok=True)
    db = out / "leaderboard.db"
    written = []
    attacks = {name: cls for name, cls in all_attacks().items() if "key" not in cls.knowledge}
    store_dir = out / "server"
    store_dir.mkdir(exist_ok=True)
    url = str(db.resolve())
    reid_presets = [preset for preset, task in DEMO_CHALLENGES if task == "reid"]
    with (
        Store(db) as store,
        EmbeddedServer(url, store_dir) as server,
        _utility_beside(store, reid_presets, seed=seed, device=pick_device(device)) as utility,
    ):
        _, token = channel.add_team(store, TEAM, key=channel.token_key(workqueue.StoreLayout(store_dir)))
        click.echo(f"challenge server on {server.url} (store {store_dir})")
        for k, (preset, task) in enumerate(DEMO_CHALLENGES):
            folder = out / f"{preset}-{task}"
            click.echo(f"[{k + 1}/{len(DEMO_CHALLENGES)}] {preset} {task}: release {folder}")
            if not _valid(folder):
                build_release(
                    folder,
                    config=resolve_config(preset),
                    plan=BuildPlan.for_task(task, n),
                    source="sample",
                    seed=seed + k,
                    test_release=True,
                    device=device,
                    force=True,
                )
            written.append(folder)
            # Just built or checked against its checksums: no need to recompute every encoding. A
            # re-run publishes the same release again, on purpose.
            challenge_id = channel.publish(
                store, workqueue.StoreLayout(store_dir), folder, recompute=False, republish=True
            )
            for name, cls in sorted(attacks.items()):
                if task not in cls.tasks or name.startswith("template"):
                    continue
                submission_path = folder / "submissions" / f"{name}.h5"
                if not submission_path.is_file():
                    with open_release(folder) as release:
                        submission = cls(device=pick_device(device), seed=0)(release)
                    submission.team = TEAM
                    write_submission(submission_path, submission)
                job = submit_file(submission_path, challenge_id, server=server.url, token=token, quiet=True)
                metric = HEADLINE_METRIC[task]
                click.echo(
                    f"    {name}: {metric} = {float(job['public'][metric]):.3f} "
                    f"(submission {job['id']}, attack {submission_runtime(submission_path):.1f} s)"
                )
                written.append(submission_path)
        click.echo(f"[utility] downstream AUC on phantom images, presets {', '.join(reid_presets)} and raw")
        if utility is None:
            click.echo("    (reusing recorded results)")
        else:
            store.record_utility(utility.rows())
        table, utility_table = board(store.results()), store.utility()
    click.echo("\nBest re-identification, public half (reid challenges):")
    click.echo(to_markdown(attack_preset_matrix(table, task="reid").reset_index()))
    click.echo("\nPrivacy vs utility (mean AUC over findings of a model trained on the encodings; raw: on plaintexts):")
    click.echo(to_markdown(privacy_utility(table, utility_table)))
    click.echo("\nWritten:")
    for path in written:
        click.echo(f"  {path}")
    click.echo(f"  {db}")
    click.echo(
        f"\nOpen the leaderboard: ncbench leaderboard serve --db {db}  (or make serve), then http://127.0.0.1:8501"
    )


@contextlib.contextmanager
def _utility_beside(store, presets: list[str], *, seed: int, device: str) -> Iterator[_UtilityJob | None]:
    """Start the utility baseline for the presets (and raw reference) not yet recorded at demo
    settings in a second process, so it runs beside the builds and attacks; yield it (None when
    everything is recorded) and stop it on the way out."""
    from ncbench.baselines.utility import DEFAULTS, MODEL_VERSION, RAW_PRESET

    # The CLI's CPU-sized defaults; phantom images, since the sample films carry no labels.
    settings = {**DEFAULTS, "patch_size": DEFAULTS["image_size"] // 16, "seed": seed}
    wanted = {**settings, "model_version": MODEL_VERSION}
    recorded = {
        row.preset for row in store.utility().itertuples() if all(row.settings.get(k) == v for k, v in wanted.items())
    }
    missing = [preset for preset in presets if preset not in recorded]
    if not missing and RAW_PRESET in recorded:
        yield None
        return
    job = _UtilityJob(dict(presets=missing, raw=RAW_PRESET not in recorded, device=device, **settings))
    try:
        yield job
    finally:
        job.stop()


class _UtilityJob:
    """``run_utility(**arguments)`` in a second Python process on one thread. The attacks leave a
    core idle much of the time (161% CPU on 2 cores: eigh, SVD, HDF5 inflation, scoring round
    trips), and the baseline fills it. The process computes rows only and hands them back as
    JSON; the demo records them, so the store keeps one writer. (A plain subprocess, not
    multiprocessing's spawn, which re-runs the parent's ``__main__`` in the child.)"""

    def __init__(self, arguments: dict):
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from ncbench.cli.demo import _utility_child; _utility_child()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # its stage lines would interleave with the attacks'
            text=True,
        )
        self._process.stdin.write(json.dumps(arguments))
        self._process.stdin.close()

    def rows(self) -> list[dict]:
        """Wait for the rows; a failure in the process is one line (NcbenchError)."""
        answer = self._process.stdout.read()
        self._process.wait()
        try:
            outcome = json.loads(answer)
        except ValueError:
            raise NcbenchError("the utility baseline's process ended without a result") from None
        if "error" in outcome:
            raise NcbenchError(outcome["error"])
        return outcome["rows"]

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
        self._process.wait()
        self._process.stdout.close()


def _utility_child() -> None:
    """The second process of :class:`_UtilityJob`: arguments as JSON on stdin, rows (or the
    error) as JSON on stdout."""
    import torch

    from ncbench.baselines.utility import run_utility

    arguments, answer = json.load(sys.stdin), sys.stdout
    sys.stdout = sys.stderr  # nothing else may reach the answer
    torch.set_num_threads(1)
    try:
        outcome = {"rows": run_utility(**arguments)}
    except NcbenchError as error:
        outcome = {"error": str(error)}
    json.dump(outcome, answer, default=lambda value: value.item())  # numpy scalars


def submission_runtime(path: Path) -> float:
    from ncbench.attacks.submission import read_submission

    return read_submission(path).runtime_s


def _valid(folder: Path) -> bool:
    """A release that exists and verifies against its checksums (cheap: no re-encoding)."""
    if not ReleaseLayout(folder).release.is_file():
        return False
    try:
        return not verify(folder)
    except NcbenchError:
        return False
