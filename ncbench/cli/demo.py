"""``ncbench demo``: the main job on the embedded real radiographs, end to end, filling every
page of the board.

Builds test releases from the ``sample`` source, at demo size by default (width 512, 128x128
images cut into the presets' 256 patches: the presets' structure at a fraction of the compute;
``--full-size`` for width 2048, 256x256), publishes them on an embedded challenge server (the
API and scoring workers of ``ncbench server``, on a free localhost port) and runs every built-in
attack that supports each task, submitting each answer through the API with the organizer's
token, so the results land in a SQLite leaderboard the way every team's do. The reid
challenges on nc3, nc7 and nc47 (0, 4 and 44 private blocks) are the depth sweep, the transfer
challenges on nc3 and nc7 its transfer curve; the link challenge is two hospitals' keys, some of
whose x-rays are second acquisitions of one patient (phantoms: the radiographs have neither
second acquisitions nor finding labels). A team's own file makes a self-reported row; the
built-in attacks also run through the verified track (sandboxed where bubblewrap runs, else
marked unsandboxed) on fresh hidden releases; then the nc7 reid challenge is closed, which
reveals its private half and its verified seeds. Beside the attacks, a second process measures
the utility of the encodings (each reid preset, the depth sweep, two sites). Re-running reuses
every release, submission, verified run and utility result that is already there and valid.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click

# Plain data only at import time: `ncbench demo --help` loads no torch; the command imports what it runs.
from ncbench.challenge.config import PRESETS
from ncbench.errors import NcbenchError
from ncbench.leaderboard.rules import BUILTIN_TEAM

# (preset, task): reid on the four presets of the original challenge and on nc47 (with nc3 and
# nc7, the depth sweep), invert and transfer, link across two hospitals' keys, and transfer at
# nc3 and nc7 (the transfer curve against depth; its attack is skipped at nc47, see SKIPPED).
# Release k is keyed by seed + k: a challenge is added last, so the others keep their keys.
DEMO_CHALLENGES = [
    ("linear", "reid"),
    ("nc3-noshuffle", "reid"),
    ("nc3", "reid"),
    ("nc7", "reid"),
    ("nc47", "reid"),
    ("linear", "invert"),
    ("linear", "transfer"),
    ("nc7", "link"),
    ("nc3", "transfer"),
    ("nc7", "transfer"),
]
SITES = {"link": 2}  # hospitals, each with its own key
# The link challenge holds second acquisitions of some patients (shifted, another gain, noise) and
# the findings' labels, which the embedded radiographs do not have: its images are phantoms.
SOURCES = {"link": "phantom"}
OVERLAP_KINDS = {"link": "patient"}
# The presets' structure (256 patches of an image) at a sixteenth of the encoder's arithmetic.
DEMO_SIZE = {"width": 512, "image_size": 128, "patch_size": 8}
DEPTH_PRESETS = ("nc3", "nc7", "nc47")  # 0, 4 and 44 private blocks
# The verified track: built-in attacks on fresh hidden releases of this challenge, which is then
# closed (its private half and the verified seeds become public).
VERIFIED_CHALLENGE = ("nc7", "reid")
VERIFIED_ATTACKS = ("gram-hungarian", "chance")
VERIFIED_RELEASES = 2
VERIFIED_WAIT_S = 1800
# A team's own file (self-reported): the commented template attack, on the verified challenge.
DEMO_TEAM = "demo-team"
# Utility at demo size: phantoms, 64 px in 64 patches; a minute of one core for every run below.
UTILITY = {"n_train": 600, "n_test": 200, "width": 128, "image_size": 64, "patch_size": 8, "epochs": 6}
# The organizer's own runs of the built-in attacks: the rows of the attack x preset matrix.
TEAM = BUILTIN_TEAM
# (attack, preset) pairs the demo leaves out ("not run" on the board): these attacks encode the
# plaintext pool under self-sampled keys of the preset's depth (carlini-2021 also fits a clone of
# the encoder), minutes at nc47's 44 blocks; gram-hungarian and chance stand for nc47 in the sweep.
SKIPPED = {("carlini-2021", "nc47"), ("distribution-alignment", "nc47"), ("linear-inversion", "nc47")}


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
    type=click.IntRange(min=8),
    default=48,
    show_default=True,
    help="Encoded images per release (at least 8: the invert release keeps 4 known pairs, link shares 2).",
)
@click.option(
    "--full-size",
    is_flag=True,
    help="Encode at the presets' own size (width 2048, 256x256 images) instead of width 512, 128x128.",
)
@click.option(
    "--seed",
    type=int,
    default=2026,
    show_default=True,
    help="Seed of the demo releases: a demo is reproducible, so its releases are test releases whose key is public.",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
def demo(out: Path, n: int, full_size: bool, seed: int, device: str) -> None:
    """Build releases from the embedded radiographs, attack them, score them, fill the board."""
    from ncbench.challenge.encoders import pick_device, resolve_config
    from ncbench.challenge.release import BuildPlan, build_release
    from ncbench.leaderboard import workqueue
    from ncbench.leaderboard.server import channel
    from ncbench.leaderboard.server.service import EmbeddedServer
    from ncbench.leaderboard.store import Store
    from ncbench.leaderboard.tables import attack_preset_matrix, board, privacy_utility, to_markdown

    started = time.monotonic()
    db = out / "leaderboard.db"
    store_dir = out / "server"
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NcbenchError(f"cannot create the demo's folder {out}: {error.strerror or error}") from None
    size = {} if full_size else DEMO_SIZE
    written: list[Path] = []
    with (
        Store(db) as store,
        EmbeddedServer(str(db.resolve()), store_dir) as server,
        _utility_beside(store, utility_runs(seed=seed, device=pick_device(device))) as utility,
    ):
        key = channel.token_key(workqueue.StoreLayout(store_dir))
        tokens = {team: channel.add_team(store, team, key=key)[1] for team in (TEAM, DEMO_TEAM)}
        click.echo(f"challenge server on {server.url} (store {store_dir})")
        ids = {}
        for k, (preset, task) in enumerate(DEMO_CHALLENGES):
            folder = out / f"{preset}-{task}"
            click.echo(f"[{k + 1}/{len(DEMO_CHALLENGES)}] {preset} {task}: release {folder}")
            if not _valid(folder):
                build_release(
                    folder,
                    config=resolve_config(preset, **size),
                    plan=BuildPlan.for_task(
                        task, n, sites=SITES.get(task, 1), overlap_kind=OVERLAP_KINDS.get(task, "image")
                    ),
                    source=SOURCES.get(task, "sample"),
                    seed=seed + k,
                    test_release=True,
                    device=device,
                    force=True,
                )
            written.append(folder)
            # Just built or checked against its checksums: no need to recompute every encoding. A
            # re-run publishes the same release again, on purpose.
            ids[preset, task] = channel.publish(
                store, workqueue.StoreLayout(store_dir), folder, recompute=False, republish=True
            )
            written += _attack_and_submit(store, folder, ids[preset, task], preset, task, server.url, tokens, device)
        challenge_id = ids[VERIFIED_CHALLENGE]
        _verified_builtins(store, challenge_id)
        store.close_challenge(challenge_id)
        click.echo(f"[close] {challenge_id} is closed: its private half and its verified seeds are public")
        click.echo("[utility] downstream AUC on phantom images: each reid preset, the depth sweep, two sites, raw")
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
    click.echo(f"\ndone in {time.monotonic() - started:.0f} s. See every page of the board:")
    click.echo(f"  ncbench leaderboard serve --db {db}   (or make serve)")
    click.echo("  then open http://127.0.0.1:8501")


def _attack_and_submit(
    store, folder: Path, challenge_id: str, preset: str, task: str, server: str, tokens: dict, device: str
) -> list[Path]:
    """Run each built-in attack that solves ``task`` on the release in ``folder`` (once: a re-run
    reuses the files) and submit its answer as the organizer's; on the verified challenge, the
    demo team's file too. A closed challenge takes no submission: its scores are recorded; an
    open one given the same file again (a re-run) answers with its earlier score, counted once.
    Returns the submission files."""
    from ncbench.attacks.plugins.registry import all_attacks
    from ncbench.attacks.submission import write_submission
    from ncbench.challenge.encoders import pick_device
    from ncbench.challenge.files import open_release
    from ncbench.leaderboard.metrics import HEADLINE_METRIC
    from ncbench.leaderboard.server.client import submit_file

    closed = store.challenges().set_index("challenge_id")["closed_utc"].get(challenge_id) is not None
    runs = [
        (name, cls, TEAM)
        for name, cls in sorted(all_attacks().items())
        if task in cls.tasks and "key" not in cls.knowledge and not name.startswith("template")
        if (name, preset) not in SKIPPED
    ]
    if any("labels" in cls.knowledge for _, cls, _ in runs):
        with open_release(folder) as release:
            if release.labels.shape[1] == 0:  # the embedded radiographs carry no findings
                runs = [run for run in runs if "labels" not in run[1].knowledge]
    if (preset, task) == VERIFIED_CHALLENGE:
        from ncbench.attacks.template import MeanPatchNearest

        runs.append((MeanPatchNearest.name, MeanPatchNearest, DEMO_TEAM))
    written = []
    for name, cls, team in runs:
        path = folder / "submissions" / f"{name}.h5"
        if not path.is_file():
            with open_release(folder) as release:
                submission = cls(device=pick_device(device), seed=0)(release)
            submission.team = team
            write_submission(path, submission)
        written.append(path)
        if closed:
            click.echo(f"    {name}: recorded before the challenge closed")
            continue
        job = submit_file(path, challenge_id, server=server, token=tokens[team], quiet=True)
        metric = HEADLINE_METRIC[task]
        shown = f"{team}/{name}" if team != TEAM else name
        click.echo(
            f"    {shown}: {metric} = {float(job['public'][metric]):.3f} "
            f"(submission {job['id']}, attack {submission_runtime(path):.1f} s)"
        )
    return written


def _verified_builtins(store, challenge_id: str) -> None:
    """The built-in attacks through the verified track on ``challenge_id``: queued for the
    embedded server's worker, which builds fresh hidden releases and runs each attack in the
    sandbox (or, where bubblewrap cannot run, without it: the board marks such runs). A re-run
    keeps the runs already scored."""
    from ncbench.attacks.plugins.registry import all_attacks
    from ncbench.leaderboard.store import ORIGIN_ORGANIZER
    from ncbench.leaderboard.verified import runs as verified
    from ncbench.leaderboard.verified import sandbox

    problem = sandbox.sandbox_problem()
    click.echo(
        f"[verified] {', '.join(VERIFIED_ATTACKS)} on {VERIFIED_RELEASES} fresh hidden releases of {challenge_id}"
        + (f" WITHOUT the sandbox ({problem}): the board marks these runs" if problem else ", sandboxed")
    )
    done = verified.results(store)
    done = set(done.loc[(done["challenge_id"] == challenge_id) & (done["state"] == "scored"), "attack"])
    settings = verified.Settings(releases=VERIFIED_RELEASES, unsandboxed=problem is not None)
    known = all_attacks()
    queued = [
        (
            name,
            verified.enqueue(
                store,
                team=TEAM,
                origin=ORIGIN_ORGANIZER,
                challenge_id=challenge_id,
                attack=name,
                attack_version=known[name].version,
                params="{}",
                settings=settings,
                eval_source=verified.open_challenge(store, challenge_id)["eval_source"] or settings.eval_source,
            ),
        )
        for name in VERIFIED_ATTACKS
        if name not in done
    ]
    if not queued:
        click.echo("    (reusing recorded runs)")
    deadline = time.monotonic() + VERIFIED_WAIT_S
    for name, run_id in queued:
        while (view := verified.run_view(store, run_id))["state"] not in ("scored", "failed"):
            if time.monotonic() > deadline:
                raise NcbenchError(f"verified run {run_id} ({name}) did not end within {VERIFIED_WAIT_S} s")
            time.sleep(0.5)
        click.echo(f"    {name}: verified run {run_id} {view['state']}: {verified.summary_line(view)}")


def utility_runs(*, seed: int, device: str) -> list[dict]:
    """The demo's utility runs (arguments of :func:`baselines.utility.run_utility`): the depth
    sweep (nc3, nc7, nc47 at their own depths, which marks them for the board's depth page), the
    other reid presets with the raw reference, and nc7 across two sites."""
    reid = [preset for preset, task in DEMO_CHALLENGES if task == "reid"]
    common = {**UTILITY, "seed": seed, "device": device}
    return [
        *({**common, "presets": [p], "depth": PRESETS[p].depth, "raw": False} for p in DEPTH_PRESETS),
        {**common, "presets": [p for p in reid if p not in DEPTH_PRESETS], "raw": True},
        {**common, "presets": ["nc7"], "sites": 2, "raw": True},
    ]


@contextlib.contextmanager
def _utility_beside(store, runs: list[dict]) -> Iterator[_UtilityJob | None]:
    """Start the utility ``runs`` not yet recorded at these settings in a second process, so they
    run beside the builds and attacks; yield it (None when everything is recorded) and stop it
    on the way out."""
    missing = _unrecorded(store, runs)
    if not missing:
        yield None
        return
    job = _UtilityJob(missing)
    try:
        yield job
    finally:
        job.stop()


def _unrecorded(store, runs: list[dict]) -> list[dict]:
    """The ``runs`` of which some model (a preset, or the raw reference) has no row in the store
    at the same settings, depth and number of sites."""
    from ncbench.baselines.utility import MODEL_VERSION, RAW_PRESET, depth_preset

    recorded = [row.settings for row in store.utility().itertuples()]

    def has(run: dict, preset: str) -> bool:
        wanted = {**{k: run[k] for k in (*UTILITY, "seed")}, "model_version": MODEL_VERSION, "preset": preset}
        return any(
            all(settings.get(k) == v for k, v in wanted.items())
            and settings.get("sites", 1) == run.get("sites", 1)
            and (preset == RAW_PRESET or settings.get("depth") == run.get("depth"))
            for settings in recorded
        )

    def models(run: dict) -> list[str]:
        return [depth_preset(p, run.get("depth")) for p in run["presets"]] + ([RAW_PRESET] if run["raw"] else [])

    return [run for run in runs if not all(has(run, preset) for preset in models(run))]


class _UtilityJob:
    """``run_utility(**arguments)`` for each of ``runs`` in a second Python process on one
    thread. The attacks leave a core idle much of the time (161% CPU on 2 cores: eigh, SVD, HDF5
    inflation, scoring round trips), and the baseline fills it. The process computes rows only and hands them back as
    JSON; the demo records them, so the store keeps one writer. (A plain subprocess, not
    multiprocessing's spawn, which re-runs the parent's ``__main__`` in the child.)"""

    def __init__(self, runs: list[dict]):
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from ncbench.cli.demo import _utility_child; _utility_child()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # its stage lines would interleave with the attacks'
            text=True,
        )
        self._process.stdin.write(json.dumps(runs))
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
    """The second process of :class:`_UtilityJob`: the runs' arguments as JSON on stdin, every
    run's rows (or the error) as JSON on stdout."""
    import torch

    from ncbench.baselines.utility import run_utility

    runs, answer = json.load(sys.stdin), sys.stdout
    sys.stdout = sys.stderr  # nothing else may reach the answer
    torch.set_num_threads(1)
    try:
        outcome = {"rows": [row for arguments in runs for row in run_utility(**arguments)]}
    except NcbenchError as error:
        outcome = {"error": str(error)}
    json.dump(outcome, answer, default=lambda value: value.item())  # numpy scalars


def submission_runtime(path: Path) -> float:
    from ncbench.attacks.submission import read_submission

    return read_submission(path).runtime_s


def _valid(folder: Path) -> bool:
    """A release that exists and verifies against its checksums (cheap: no re-encoding)."""
    from ncbench.challenge.files import ReleaseLayout
    from ncbench.challenge.verify import verify

    if not ReleaseLayout(folder).release.is_file():
        return False
    try:
        return not verify(folder)
    except NcbenchError:
        return False
