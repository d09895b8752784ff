"""The verified track: the organizer runs attack plugins on fresh hidden releases, sandboxed
(docs/server.md#the-verified-track, docs/tasks.md#verified-track).

A submission file can claim anything about how it was made; a plugin cannot, once the organizer
runs it on data it has never seen. For each run the worker builds K evaluation releases with the
challenge's preset, task and N from the organizer's held-out image pool, each from a fresh
256-bit seed, and commits to each before the plugin runs: ``sha256(seed hex)``, the release's
``key_commitment`` and its sha256 are stored and served at once. The plugin (a .py file, or a
wheel or sdist checked and unpacked by :func:`stage_plugin`) then runs in the sandbox
(:mod:`leaderboard.verified.sandbox`) on each release, and its answer is scored against that
release's key by the normal scorer. When the challenge closes the seeds are served too, so anyone
can rebuild every evaluation release byte for byte (same ``SOURCE_DATE_EPOCH``), rerun the plugin
and check every verified score: commit, then reveal.

Runs are jobs on the scoring dispatcher (:mod:`leaderboard.server.worker`) with a durable state in
``verified_runs`` (queued, running, scored, failed); each evaluation release is a row of
``verified_releases`` with its commitment, measured cost (wall, CPU, peak memory) and scores.
Evaluation releases are deleted once scored: the seed rebuilds them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

from ncbench.attacks.plugins import archive as plugin_archive
from ncbench.errors import NcbenchError, one_line
from ncbench.leaderboard import isolated, workqueue
from ncbench.leaderboard.metrics import HEADLINE_METRIC
from ncbench.leaderboard.store import (
    BUILTIN_TEAM,
    MAX_LENGTHS,
    ORIGIN_ORGANIZER,
    Store,
    _stamp,
    challenges,
    check_origin,
    check_team_name,
    published,
    scores_hidden,
    teams,
    utc_now,
    verified_releases,
    verified_runs,
)
from ncbench.leaderboard.tables import shown_attack
from ncbench.leaderboard.verified.sandbox import Limits
from ncbench.leaderboard.workqueue import LimitReached

DEFAULT_RELEASES = 3
DEFAULT_EVAL_SOURCE = "phantom"
DEFAULT_PLUGIN_DAILY_LIMIT = 2  # verified runs per team, challenge and UTC day: each costs K builds and K runs
# carlini-2021 runs with its defaults: they are its CPU size (about a minute at N = 1000).
BUILTINS = ("gram-hungarian", "linear-inversion", "distribution-alignment", "carlini-2021", "chance")
MAX_PLUGIN_BYTES = plugin_archive.MAX_FILE_BYTES  # one .py file
MAX_ARCHIVE_BYTES = plugin_archive.MAX_ARCHIVE_BYTES  # a wheel or an sdist
MAX_PARAMS = 32
PLUGIN_FILE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\.py")
ARCHIVE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+!-]{0,127}")
CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
ENTRY_MAX = 128  # the class_name column: "Class", or "module:Class" for an archive
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# The limits of the admission check: an import and the declarations, nothing heavy.
CHECK_LIMITS = Limits(
    memory_bytes=4 << 30,
    cpu_s=120,
    wall_s=120,
    processes=64,
    file_bytes=16 << 20,
    scratch_bytes=64 << 20,
    output_bytes=64 << 10,
    threads=1,
)
BUILD_FAILED = "the evaluation release could not be built or run"
# The attack and version of a run whose plugin awaits its admission check: the check fills them.
UNCHECKED = ""
CHECK_FAILED = "the plugin failed its check"
# A bug of ours in a limited child (admission check or scorer) on a plugin's bytes: the same each
# time, so recorded at once rather than retried; the organizer's log has the error.
CHECKER_CRASHED = "the organizer's checker failed on it (logged for the organizer)"
SCORER_CRASHED = "the organizer's scorer failed on the submission (logged for the organizer)"
UNPACK_KILLED = "the plugin archive could not be unpacked within the unpacker's memory or time limit"
log = logging.getLogger("ncbench.server")
_BUILD_LOCK = threading.Lock()  # SOURCE_DATE_EPOCH is process-wide: one evaluation build at a time


@dataclass(frozen=True)
class Settings:
    """How this server runs the verified track (``ncbench server`` options)."""

    releases: int = DEFAULT_RELEASES
    eval_source: str = DEFAULT_EVAL_SOURCE  # for challenges published without --eval-source
    limits: Limits = Limits()
    unsandboxed: bool = False  # organizer-only, local testing: results are marked unsandboxed

    def __post_init__(self) -> None:
        if not 1 <= self.releases <= 100:
            raise NcbenchError(f"the number of evaluation releases must be between 1 and 100, got {self.releases}")


@dataclass(frozen=True)
class Recipe:
    """Everything but the seed that rebuilds an evaluation release byte for byte."""

    encoder_config: str  # JSON of the challenge's resolved encoder configuration
    task: str
    n: int
    n_aux: int
    n_targets: int
    n_known: int
    source: str
    source_date_epoch: int
    sites: int = 1  # hospitals with independent keys (older recipes have one)
    n_overlap: int = 0  # link: encodings of each later site shared with an earlier one
    overlap_kind: str = "image"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls(**json.loads(text))

    def plan(self):
        from ncbench.challenge.release import BuildPlan

        return BuildPlan(
            self.task,
            self.n,
            n_aux=self.n_aux,
            n_targets=self.n_targets,
            n_known=self.n_known,
            sites=self.sites,
            n_overlap=self.n_overlap,
            overlap_kind=self.overlap_kind,
        )

    def command(self, seed: str, out: str = "evaluation") -> str | None:
        """The ``ncbench challenge build`` command that rebuilds the release from its revealed
        seed, or None when the configuration needs an override the command has no option for."""
        from ncbench.challenge.encoders import EncoderConfig, resolve_config

        config = EncoderConfig.from_json(self.encoder_config)
        options = {
            "width": config.width,
            "image_size": config.image_size,
            "patch_size": config.patch_size,
            "bn_batch": config.bn_batch,
            "dtype": config.dtype,
            "precision": config.precision,
        }
        try:
            if resolve_config(config.preset, **options) != config:
                return None
        except NcbenchError:
            return None
        words = [
            "ncbench",
            "challenge",
            "build",
            "--preset",
            config.preset,
            "--task",
            self.task,
            "--source",
            self.source,
            "--n",
            str(self.n // self.sites),
        ]
        per_site = self.n // self.sites
        words += {
            "transfer": ["--n-aux", str(self.n_aux), "--n-targets", str(self.n_targets)],
            "invert": ["--n-known", str(self.n_known)],
            "link": ["--overlap", repr(self.n_overlap / per_site), "--overlap-kind", self.overlap_kind],
        }.get(self.task, [])
        if self.sites > 1:
            words += ["--sites", str(self.sites)]
        for name, value in options.items():
            words += [f"--{name.replace('_', '-')}", str(value)]
        words += ["--seed-file", "-", "--device", "cpu", "--out", out]
        # The seed on standard input: `build` takes a typed --seed for test releases only.
        return f"echo {shlex.quote(seed)} | SOURCE_DATE_EPOCH={self.source_date_epoch} " + shlex.join(words)


def seed_commitment(seed: str) -> str:
    """The published commitment to an evaluation seed: sha256 of its hex text."""
    return hashlib.sha256(seed.encode("ascii")).hexdigest()


def build_evaluation(out: Path, recipe: Recipe, seed: str) -> Path:
    """Build (or rebuild, from a revealed seed) one evaluation release into ``out``, on the CPU."""
    from ncbench.challenge.encoders import EncoderConfig
    from ncbench.challenge.release import build_release

    with _BUILD_LOCK, _source_date_epoch(recipe.source_date_epoch):
        return build_release(
            out,
            config=EncoderConfig.from_json(recipe.encoder_config),
            plan=recipe.plan(),
            source=recipe.source,
            seed=seed,
            device="cpu",
            force=True,
        )


@contextlib.contextmanager
def _source_date_epoch(epoch: int) -> Iterator[None]:
    before = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = str(epoch)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = before


# -- where files live --------------------------------------------------------------------------


def evaluation_dir(store_root: Path, run_id: int, index: int) -> Path:
    """An evaluation release and its key: under ``keys/``, which no route serves."""
    return Path(store_root) / "keys" / "verified" / f"run-{run_id}" / f"release-{index}"


def work_dir(store_root: Path, run_id: int, index: int) -> Path:
    """The host folder of one sandboxed run: the plugin's copy and the one file it may write."""
    return Path(store_root) / "work" / f"run-{run_id}-release-{index}"


# -- organizer settings ------------------------------------------------------------------------


def evaluation_values(*, eval_source: str | None, plugin_daily_limit: int | None) -> dict:
    """The ``published`` columns for a challenge's verified-track options, or NcbenchError."""
    values = {}
    if eval_source is not None:
        if not eval_source.strip() or len(eval_source) > 512:
            raise NcbenchError("--eval-source must be an image source of 1-512 characters (phantom, folder:PATH, ...)")
        values["eval_source"] = eval_source.strip()
    if plugin_daily_limit is not None:
        if plugin_daily_limit < 1:
            raise NcbenchError(f"--plugin-daily-limit must be at least 1, got {plugin_daily_limit}")
        values["plugin_daily_limit"] = plugin_daily_limit
    return values


def set_evaluation(
    store: Store, challenge_id: str, *, eval_source: str | None = None, plugin_daily_limit: int | None = None
) -> None:
    """Record a published challenge's held-out image pool and its plugin-run daily limit."""
    values = evaluation_values(eval_source=eval_source, plugin_daily_limit=plugin_daily_limit)
    if values:
        with store._write() as conn:
            if not conn.execute(
                published.update().where(published.c.challenge_id == challenge_id).values(**values)
            ).rowcount:
                raise NcbenchError(f"no published challenge {challenge_id!r}")


# -- admission ---------------------------------------------------------------------------------


def check_upload_fields(plugin_file: str, class_name: str, params: dict[str, str], module: str | None = None) -> str:
    """The params as stored JSON, or NcbenchError for a file name, module, class name or
    parameter the server does not take (checked before the plugin is even written to disk). A
    .py file names its class; a wheel or sdist names the ``module`` that holds it too."""
    if plugin_archive.archive_kind(plugin_file or "") is None:
        if not PLUGIN_FILE.fullmatch(plugin_file or ""):
            raise NcbenchError(
                "the plugin file name must be a Python module name ending in .py (at most 64 characters), "
                "or a wheel (.whl) or sdist (.tar.gz) file name"
            )
        if module is not None:
            raise NcbenchError("module goes with a wheel or an sdist; a .py plugin names only its class")
    else:
        if not ARCHIVE_FILE.fullmatch(plugin_file):
            raise NcbenchError("the archive's file name must be at most 128 letters, digits and _ . + ! -")
        plugin_archive.check_archive_name(plugin_file)
        if not (module and plugin_archive.MODULE_NAME.fullmatch(module)):
            raise NcbenchError("a wheel or sdist plugin needs module: the dotted name of the module holding the class")
    if not CLASS_NAME.fullmatch(class_name or ""):
        raise NcbenchError("the class name must be a Python identifier of at most 128 characters")
    if len(plugin_entry(class_name, module)) > ENTRY_MAX:
        raise NcbenchError(f"module:Class must be at most {ENTRY_MAX} characters")
    if len(params) > MAX_PARAMS:
        raise NcbenchError(f"at most {MAX_PARAMS} parameters")
    for name, value in params.items():
        if not PARAM_NAME.fullmatch(name) or not isinstance(value, str) or not value.isprintable():
            raise NcbenchError(f"parameter {name[:64]!r}: names are identifiers, values printable text")
    text = json.dumps(params, sort_keys=True)
    if len(text) > MAX_LENGTHS["params"]:
        raise NcbenchError(f"parameters are {len(text)} characters of JSON; at most {MAX_LENGTHS['params']}")
    return text


def upload_cap(plugin_file: str) -> int:
    """The most bytes the server takes of this plugin: one .py file, or an archive."""
    return MAX_ARCHIVE_BYTES if plugin_archive.archive_kind(plugin_file) else MAX_PLUGIN_BYTES


def plugin_entry(class_name: str, module: str | None) -> str:
    """What a run stores in its ``class_name`` column and hands the runner with the plugin:
    the class of a .py file, ``module:Class`` of an archive."""
    return class_name if module is None else f"{module}:{class_name}"


def stage_plugin(upload: Path, *, plugin_file: str, entry: str, work: Path) -> Path:
    """Put an uploaded plugin in ``work`` (a private folder) for the sandbox to mount; returns
    what to mount. A .py file is copied to ``work/plugin/NAME.py``; a wheel or an sdist is
    checked (layout, pure Python, dependencies installed here: :mod:`ncbench.attacks.plugins.archive`)
    and unpacked into the folder ``work/plugin`` by a limited child (:mod:`leaderboard.isolated`),
    never built and never installed."""
    plugin = work / "plugin"
    if plugin_archive.archive_kind(plugin_file) is not None:
        # Parsed in a limited child: a crafted header can hold the GIL for minutes (CVE-2024-6232).
        request = {
            "archive": str(upload),
            "filename": plugin_file,
            "dest": str(plugin),
            "module": entry.rpartition(":")[0],
        }
        try:
            isolated.call("unpack", request, isolated.UNPACK_LIMITS, died=UNPACK_KILLED)
        except isolated.ChildKilled:
            shutil.rmtree(plugin, ignore_errors=True)
            raise
        return plugin
    plugin.mkdir(mode=0o755)
    plugin.chmod(0o755)
    shutil.copyfile(upload, plugin / plugin_file)
    (plugin / plugin_file).chmod(0o644)
    return plugin / plugin_file


def _stage_run_plugin(root: Path, run: dict, work: Path) -> Path:
    """:func:`stage_plugin` for a queued run: its stored upload, file name and class."""
    return stage_plugin(
        workqueue.StoreLayout(root).upload(run["plugin_sha256"]),
        plugin_file=run["plugin_file"],
        entry=run["class_name"],
        work=work,
    )


def open_challenge(store: Store, challenge_id: str) -> dict:
    """The published, open challenge's task, preset, N, eval source and plugin daily limit."""
    columns = (
        challenges.c.task,
        challenges.c.preset,
        challenges.c.n_encoded,
        published.c.eval_source,
        published.c.plugin_daily_limit,
    )
    with store._read() as conn:
        row = workqueue.open_challenge(conn, challenge_id, utc_now(), *columns)
    return {column.name: row._mapping[column.name] for column in columns}


def check_report(report: dict, *, task: str) -> tuple[str, str]:
    """(attack name, version) from the declarations a plugin's check printed, checked again here:
    the plugin's own process printed them, so they are its claims until checked."""
    from ncbench.attacks.base import KNOWLEDGE
    from ncbench.attacks.plugins.registry import PLUGIN_NAME, PLUGIN_NAME_MAX, all_attacks
    from ncbench.names import name_skeleton

    name, version = report.get("attack"), report.get("version")
    tasks, knowledge = report.get("tasks"), report.get("knowledge")
    if not (isinstance(name, str) and len(name) <= PLUGIN_NAME_MAX and PLUGIN_NAME.fullmatch(name)):
        raise NcbenchError("the plugin reported an invalid attack name")
    for taken in all_attacks():
        if name_skeleton(taken) == name_skeleton(name):
            raise NcbenchError(
                f"plugin attack name {name!r} is the attack {taken!r} or a look-alike; choose another name"
            )
    if not (isinstance(version, str) and 0 < len(version) <= MAX_LENGTHS["attack_version"] and version.isprintable()):
        raise NcbenchError("the plugin reported an invalid version")
    if not (isinstance(tasks, list) and task in tasks):
        raise NcbenchError(f"the plugin does not solve this challenge's task ({task})")
    if not (isinstance(knowledge, list) and all(k in KNOWLEDGE and k != "key" for k in knowledge)):
        raise NcbenchError("the plugin declares knowledge the leaderboard refuses")
    return name, version


def enqueue(
    store: Store,
    *,
    team: str,
    origin: str,
    challenge_id: str,
    attack: str,
    attack_version: str,
    params: str,
    settings: Settings,
    eval_source: str,
    plugin_sha256: str | None = None,
    plugin_file: str | None = None,
    class_name: str | None = None,
    daily_limit: int | None = None,
    now: dt.datetime | None = None,
    stage=None,
) -> int:
    """Queue a verified run; ``daily_limit`` None: no limit (the organizer's built-ins). Every
    run counts towards the limit whatever its outcome, a failed admission check included: each
    costs a sandbox, or K builds and K sandboxed runs. A team's plugin is queued with ``attack``
    and ``attack_version`` :data:`UNCHECKED`, for :func:`run_check`. ``stage`` (moving the upload
    into the store) runs once the run is admitted, before it can be claimed."""
    now = now or utc_now()
    team = check_team_name(team)
    # Organizer rows are built-ins under its own team; a team's plugin is never one of them.
    check_origin(origin, team=team, attack=attack if origin == ORIGIN_ORGANIZER else None)
    with store._write() as conn:
        team_id = store._lock_team(conn, team, now)
        if daily_limit is not None:
            used = workqueue.used_today(conn, verified_runs, team_id, challenge_id, now)
            if used >= daily_limit:
                raise LimitReached(
                    f"team {team!r} has used its {daily_limit} verified runs for {challenge_id} today "
                    "(UTC); the limit resets at midnight UTC"
                )
        if stage is not None:
            stage()
        return workqueue.insert_queued(
            conn,
            verified_runs,
            now,
            challenge_id=challenge_id,
            team_id=team_id,
            origin=origin,
            attack=attack,
            attack_version=attack_version,
            plugin_sha256=plugin_sha256,
            plugin_file=plugin_file,
            class_name=class_name,
            params=params,
            releases=settings.releases,
            eval_source=eval_source,
            limits=settings.limits.to_json(),
            sandboxed=not settings.unsandboxed,
        )


def used_today(store: Store, *, team: str, challenge_id: str) -> int:
    """Verified runs ``team`` queued today (UTC) on ``challenge_id`` (refusing before the check)."""
    with store._read() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(verified_runs)
                .join(teams, teams.c.id == verified_runs.c.team_id)
                .where(
                    teams.c.name == team,
                    verified_runs.c.challenge_id == challenge_id,
                    verified_runs.c.created_utc >= workqueue.day_start(utc_now()),
                )
            ).scalar()
        )


def enqueue_builtins(store: Store, challenge_id: str, settings: Settings) -> list[tuple[str, int]]:
    """Queue the organizer's verified runs of the built-in attacks that solve the challenge's
    task; returns (attack, run id) for each, the reference rows of the verified matrix."""
    from ncbench.attacks.plugins.registry import all_attacks

    challenge = open_challenge(store, challenge_id)
    known = all_attacks()
    queued = []
    for name in BUILTINS:
        cls = known[name]
        if challenge["task"] in cls.tasks:
            run_id = enqueue(
                store,
                team=BUILTIN_TEAM,
                origin=ORIGIN_ORGANIZER,
                challenge_id=challenge_id,
                attack=name,
                attack_version=cls.version,
                params="{}",
                settings=settings,
                eval_source=challenge["eval_source"] or settings.eval_source,
            )
            queued.append((name, run_id))
    return queued


# -- worker side -------------------------------------------------------------------------------


def requeue_interrupted(store: Store) -> int:
    """At start-up: runs left ``running`` by a server that died run again, once whatever of
    them still runs in a sandbox is killed (a run never runs twice at once)."""
    from ncbench.leaderboard.verified import cgroup

    cgroup.reap_leftovers()
    return workqueue.requeue_interrupted(store, verified_runs)


def claim(store: Store, limit: int) -> list[int]:
    """Move up to ``limit`` queued runs whose plugin passed its check to ``running``, the teams
    taking turns (the team whose last run or check started longest ago first), each team's
    oldest first; returns their ids. Without turns one team's queue of runs that each sleep to
    the wall limit held the sandbox pool for hours while other teams' runs waited behind it."""
    return workqueue.claim(
        store,
        limit,
        verified_runs,
        verified_runs.c.attack_version != UNCHECKED,
        fair_by=verified_runs.c.team_id,
        started_utc=_stamp(utc_now()),
    )


def claim_checks(store: Store, limit: int) -> list[int]:
    """Move up to ``limit`` runs whose plugin awaits its check to ``running`` (checking), oldest
    first, one per team at a time: a team's uploads wait for each other, not for everyone's."""
    return workqueue.claim(
        store,
        limit,
        verified_runs,
        verified_runs.c.attack_version == UNCHECKED,
        one_per=verified_runs.c.team_id,
        started_utc=_stamp(utc_now()),
    )


def run_check(db_url: str, store_root: str, run_id: int) -> str:
    """The admission check of a claimed run's plugin, on a Dask worker: an archive's contents
    and dependencies, unpacked by a limited child (:func:`stage_plugin`), then, in the sandbox,
    the import and its declarations (importing runs the plugin's code), checked again here
    (:func:`check_report`). A plugin that passes is queued to run with the attack and version
    it declares; one that fails ends its run ``failed``, counted, with the reason in a
    message only its team reads (:func:`is_admitted`). Returns the state it leaves."""
    from ncbench.leaderboard.verified import sandbox

    root = Path(store_root)
    with Store(db_url, create=False) as store:
        run = _run_row(store, run_id)
        if run["attempts"] > workqueue.ATTEMPTS_BEFORE_FAILED:
            finish(store, run_id, "failed", message=f"{CHECK_FAILED}: it crashed the worker repeatedly")
            return "failed"
        work = root / "work" / f"check-{run_id}-{secrets.token_hex(4)}"
        try:
            work.mkdir(parents=True, mode=0o700)
            work.chmod(0o700)
            plugin = _stage_run_plugin(root, run, work)
            outcome, report = sandbox.check_plugin(
                plugin=plugin,
                class_name=run["class_name"],
                params=json.loads(run["params"]),
                task=run["task"],
                workdir=work,
                limits=CHECK_LIMITS,
                sandboxed=run["sandboxed"],
            )
            if not outcome.ok:
                raise NcbenchError(f"{outcome.reason} ({outcome.detail or 'no detail'})")
            attack, version = check_report(report, task=run["task"])
        except NcbenchError as error:
            # The team's own reason (its plugin's words may be in it): no public view shows a
            # run that was never admitted.
            finish(store, run_id, "failed", message=workqueue.StoreLayout(root).redact(f"{CHECK_FAILED}: {error}"))
            return "failed"
        except isolated.ChildCrashed as error:
            # A bug of ours in a limited child, on this plugin's bytes: retrying gives the same.
            log.error("verified run %d: the admission check crashed: %s", run_id, one_line(str(error), 500))
            finish(store, run_id, "failed", message=f"{CHECK_FAILED}: {CHECKER_CRASHED}")
            return "failed"
        finally:
            shutil.rmtree(work, ignore_errors=True)
        with store._write() as conn:
            conn.execute(
                verified_runs.update()
                .where(verified_runs.c.id == run_id)
                .values(attack=attack, attack_version=version, state="queued", updated_utc=_stamp(utc_now()))
            )
        return "queued"


def is_admitted():
    """The runs anyone may see: the organizer's, and a team's whose plugin passed its check."""
    return verified_runs.c.attack_version != UNCHECKED


def claim_run(store: Store, run_id: int) -> bool:
    """Move run ``run_id`` to ``running`` if it is still queued (no worker took it first)."""
    stamp = _stamp(utc_now())
    with store._write() as conn:
        return bool(
            conn.execute(
                verified_runs.update()
                .where(verified_runs.c.id == run_id, verified_runs.c.state == "queued")
                .values(state="running", attempts=verified_runs.c.attempts + 1, started_utc=stamp, updated_utc=stamp)
            ).rowcount
        )


def finish(store: Store, run_id: int, state: str, *, message: str | None = None) -> None:
    workqueue.finish(
        store,
        verified_runs,
        run_id,
        state,
        message=message,
        limit=MAX_LENGTHS["error"],
        finished_utc=_stamp(utc_now()) if state in ("scored", "failed") else None,
    )


def run_verified(db_url: str, store_root: str, run_id: int) -> str:
    """One claimed verified run, start to end; runs on a Dask worker (any process that reaches
    the database and the store folder). Returns the final state."""
    root = Path(store_root)
    with Store(db_url, create=False) as store:
        run = _run_row(store, run_id)
        if run["attempts"] > workqueue.ATTEMPTS_BEFORE_FAILED:
            finish(store, run_id, "failed", message="the worker crashed on this run repeatedly")
            return "failed"
        try:
            recipe = _recipe(root, run)
        except NcbenchError as error:
            finish(store, run_id, "failed", message=f"no evaluation release can be built: {error}")
            return "failed"
        try:
            for index in range(run["releases"]):
                reason = _evaluate(store, root, run, recipe, index)
                if reason is not None:
                    finish(
                        store,
                        run_id,
                        "failed",
                        message=f"evaluation release {index + 1} of {run['releases']}: {reason}",
                    )
                    return "failed"
        finally:
            shutil.rmtree(evaluation_dir(root, run_id, 0).parent, ignore_errors=True)
        finish(store, run_id, "scored")
        return "scored"


def _run_row(store: Store, run_id: int) -> dict:
    with store._read() as conn:
        row = conn.execute(
            sa.select(verified_runs, challenges.c.task, challenges.c.n_encoded, challenges.c.encoder_config)
            .join(challenges, challenges.c.challenge_id == verified_runs.c.challenge_id)
            .where(verified_runs.c.id == run_id)
        ).one()
    return dict(row._mapping)


def _recipe(root: Path, run: dict) -> Recipe:
    """The evaluation recipe of ``run``'s challenge: its encoder, task and sizes, read from the
    published release, and the run's held-out image source."""
    from ncbench.challenge.files import open_key, open_release

    layout = workqueue.StoreLayout(root)
    with open_release(layout.public_dir(run["challenge_id"]) / "release.h5") as release:
        h5 = release.h5
        n_aux = int(h5["plain/ids"].shape[0]) if run["task"] == "transfer" else 0
        n_targets = int(h5["target/ids"].shape[0]) if run["task"] == "transfer" else 0
        n_known = int(h5["pairs/encoded_ids"].shape[0]) if run["task"] == "invert" else 0
        sites = release.n_sites
    n_overlap, overlap_kind = 0, "image"
    if run["task"] == "link":  # how much the sites share is hidden: read it from the key
        with open_key(layout.key_file(run["challenge_id"])) as key:
            n_overlap = len(key.read("truth/link_pairs")) // (sites - 1)
            overlap_kind = str(key.h5["truth/link_pairs"].attrs["overlap_kind"])
    return Recipe(
        encoder_config=run["encoder_config"],
        task=run["task"],
        n=int(run["n_encoded"]),
        n_aux=n_aux,
        n_targets=n_targets,
        n_known=n_known,
        source=run["eval_source"],
        source_date_epoch=int(utc_now().timestamp()),
        sites=sites,
        n_overlap=n_overlap,
        overlap_kind=overlap_kind,
    )


def _evaluate(store: Store, root: Path, run: dict, recipe: Recipe, index: int) -> str | None:
    """Commit to evaluation release ``index``, run the plugin on it in the sandbox, score it.
    Returns None when scored, else why not (one line)."""
    from ncbench.leaderboard.verified import sandbox

    with store._read() as conn:
        done = conn.execute(
            sa.select(verified_releases).where(
                verified_releases.c.run_id == run["id"], verified_releases.c.idx == index
            )
        ).one_or_none()
    if done is not None and done.state == "scored":
        return None
    release_dir, work = evaluation_dir(root, run["id"], index), work_dir(root, run["id"], index)
    for leftover in (release_dir, work):  # a previous attempt's, if a worker died
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        if done is None:
            seed = secrets.token_hex(32)
            _commit(store, run["id"], index, recipe, seed, build_evaluation(release_dir, recipe, seed))
        else:
            recipe = Recipe.from_json(done.recipe)
            built = build_evaluation(release_dir, recipe, done.seed)
            if _sha256(built / "public" / "release.h5") != done.release_sha256:
                return "the evaluation release did not rebuild identically from its committed seed"
        work.mkdir(parents=True, mode=0o700)
        release_file = release_dir / "public" / "release.h5"
        release_file.chmod(0o644)  # read by the sandbox's own unprivileged uid; the folders above stay private
        plugin = _stage_run_plugin(root, run, work) if run["plugin_sha256"] else None
        outcome, submission = sandbox.run_attack(
            attack=run["class_name"] or run["attack"],
            params=json.loads(run["params"]),
            release=release_file,
            workdir=work,
            limits=Limits.from_json(run["limits"]),
            plugin=plugin,
            sandboxed=run["sandboxed"],
        )
        values = {"wall_s": outcome.wall_s, "cpu_s": outcome.cpu_s, "peak_rss_bytes": outcome.peak_rss_bytes}
        if not outcome.ok:
            _record(
                store, root, run["id"], index, state="failed", message=outcome.reason, detail=outcome.detail, **values
            )
            return outcome.reason
        try:
            headline, metrics = _score(submission, release_dir, recipe.task)
        except NcbenchError as error:
            # The scorer's words may quote the submission, which the plugin wrote: its team's only.
            detail = f"the scorer refused the submission: {error}".replace(f"{submission}: ", "")
            _record(
                store,
                root,
                run["id"],
                index,
                state="failed",
                message=sandbox.INVALID_SUBMISSION,
                detail=detail,
                **values,
            )
            return sandbox.INVALID_SUBMISSION
        except isolated.ChildCrashed as error:
            log.error(
                "verified run %d, release %d: the scorer crashed: %s", run["id"], index, one_line(str(error), 500)
            )
            _record(store, root, run["id"], index, state="failed", message=SCORER_CRASHED, **values)
            return SCORER_CRASHED
        _record(
            store,
            root,
            run["id"],
            index,
            state="scored",
            message=None,
            headline=headline,
            metrics=json.dumps(metrics, sort_keys=True),
            **values,
        )
        return None
    except NcbenchError as error:
        # An archive's refusal may quote its member names: the words stay with the team.
        _record(store, root, run["id"], index, state="failed", message=BUILD_FAILED, detail=str(error))
        return BUILD_FAILED
    finally:
        for folder in (release_dir, work):
            shutil.rmtree(folder, ignore_errors=True)


def _commit(store: Store, run_id: int, index: int, recipe: Recipe, seed: str, built: Path) -> None:
    """Store and so publish the commitment to a freshly built evaluation release, before the
    plugin sees it."""
    from ncbench.challenge.files import open_release

    with open_release(built) as release:
        eval_id, key_commitment = release.challenge_id, str(release.h5.attrs["key_commitment"])
    with store._write() as conn:
        conn.execute(
            verified_releases.insert().values(
                run_id=run_id,
                idx=index,
                eval_challenge_id=eval_id,
                seed_sha256=seed_commitment(seed),
                key_commitment=key_commitment,
                release_sha256=_sha256(built / "public" / "release.h5"),
                recipe=recipe.to_json(),
                seed=seed,
                committed_utc=_stamp(utc_now()),
                state="committed",
            )
        )


def _record(store: Store, root: Path, run_id: int, index: int, **values) -> None:
    """Update one evaluation release's row; its message and detail become one printable line
    without the store's path (a plugin or its submission may have put any text in them)."""
    for column in ("message", "detail"):
        if values.get(column) is not None:
            values[column] = one_line(workqueue.StoreLayout(root).redact(values[column]), MAX_LENGTHS["error"])
    with store._write() as conn:
        conn.execute(
            verified_releases.update()
            .where(verified_releases.c.run_id == run_id, verified_releases.c.idx == index)
            .values(**values)
        )


def _score(submission: Path, release_dir: Path, task: str) -> tuple[float, dict]:
    """(headline over the whole release, metrics per half) of a submission: the plugin never saw
    any of the release, so both halves count; the headline is their item-weighted mean."""
    from ncbench.leaderboard.metrics import SPLIT_NAMES

    # The plugin wrote the submission: parsed in a limited child, as a team's upload is.
    result = isolated.score_isolated(
        submission, release_dir, None, died="the scorer went past its memory or time limit"
    )
    metric = HEADLINE_METRIC[task]
    weighted = [
        (half[metric], half.get("n", 0.0))
        for half in result.metrics.values()
        if not math.isnan(half.get(metric, math.nan))
    ]
    total = sum(n for _, n in weighted)
    headline = sum(v * n for v, n in weighted) / total if total else math.nan
    metrics = {
        SPLIT_NAMES[split]: {k: (v if math.isfinite(v) else str(v)) for k, v in half.items()}
        for split, half in result.metrics.items()
    }
    return headline, metrics


def _sha256(path: Path) -> str:
    from ncbench.h5io import sha256_file

    return sha256_file(path)


# -- public views ------------------------------------------------------------------------------


def commitments(store: Store, challenge_id: str | None = None) -> list[dict]:
    """Every evaluation release's commitment (sha256 of the seed, key commitment, release
    sha256, when committed), with its seed, recipe and rebuild command once the challenge has
    closed (the reveal)."""
    query = (
        sa.select(
            verified_releases.c.run_id,
            verified_releases.c.idx,
            verified_releases.c.eval_challenge_id,
            verified_releases.c.seed_sha256,
            verified_releases.c.key_commitment,
            verified_releases.c.release_sha256,
            verified_releases.c.committed_utc,
            verified_releases.c.recipe,
            verified_runs.c.challenge_id,
            verified_runs.c.origin,
            verified_runs.c.attack,
            teams.c.name.label("team"),
            challenges.c.closed_utc,
            # The seed leaves the database only for a closed challenge.
            sa.case((challenges.c.closed_utc.is_not(None), verified_releases.c.seed), else_=sa.null()).label("seed"),
        )
        .join(verified_runs, verified_runs.c.id == verified_releases.c.run_id)
        .join(teams, teams.c.id == verified_runs.c.team_id)
        .join(challenges, challenges.c.challenge_id == verified_runs.c.challenge_id)
        .order_by(verified_releases.c.run_id, verified_releases.c.idx)
    )
    if challenge_id is not None:
        query = query.where(verified_runs.c.challenge_id == challenge_id)
    with store._read() as conn:
        rows = [dict(row._mapping) for row in conn.execute(query).all()]
    for row in rows:
        row["revealed"] = row.pop("closed_utc") is not None
        row["attack"] = shown_attack(row.pop("team"), row["attack"], row.pop("origin"))
        recipe = Recipe.from_json(row.pop("recipe"))
        row["source_date_epoch"] = recipe.source_date_epoch
        row["rebuild"] = (
            recipe.command(row["seed"], f"evaluation-{row['run_id']}-{row['idx']}") if row["seed"] else None
        )
    return rows


def revealed_count(store: Store, challenge_id: str) -> int:
    return sum(1 for row in commitments(store, challenge_id) if row["revealed"])


# Costs a plugin controls are public only rounded up to a power of two (from these floors), so
# each tells at most about 4 bits (docs/security.md); its team sees the measured values.
COARSE_FLOORS = {"wall_s": 1.0, "cpu_s": 1.0, "peak_rss_bytes": float(1 << 20)}


def coarse(value: float | None, floor: float) -> float | None:
    """``value`` rounded up to ``floor`` times a power of two (None and NaN stay None)."""
    if value is None or math.isnan(value):
        return None
    return floor * 2.0 ** max(0, math.ceil(math.log2(max(value, floor) / floor)))


def results(store: Store) -> pd.DataFrame:
    """One row per evaluation release of every verified run (the board's input, public):
    challenge_id, task, preset, n, encoder_config, precision (the encoder's arithmetic: fp32
    unless the organizer chose bf16), run_id, team, attack (as shown), origin, sandboxed, state (of
    the run), message (a fixed vocabulary), idx, release_state, reidentification (the headline
    over the whole release; NaN on a blind challenge until its close), scores_hidden (that blind
    challenge still open), wall_s, cpu_s, peak_rss_bytes (each rounded up to a power of two,
    :func:`coarse`), created_utc."""
    query = (
        sa.select(
            verified_runs.c.challenge_id,
            challenges.c.task,
            challenges.c.preset,
            challenges.c.n_encoded.label("n"),
            challenges.c.encoder_config,
            verified_runs.c.id.label("run_id"),
            teams.c.name.label("team"),
            verified_runs.c.attack,
            verified_runs.c.origin,
            verified_runs.c.sandboxed,
            verified_runs.c.releases,
            verified_runs.c.state,
            verified_runs.c.message,
            verified_runs.c.created_utc,
            verified_releases.c.idx,
            verified_releases.c.state.label("release_state"),
            sa.case((scores_hidden(), sa.null()), else_=verified_releases.c.headline).label("reidentification"),
            scores_hidden().label("scores_hidden"),
            verified_releases.c.wall_s,
            verified_releases.c.cpu_s,
            verified_releases.c.peak_rss_bytes,
        )
        .join(teams, teams.c.id == verified_runs.c.team_id)
        .join(challenges, challenges.c.challenge_id == verified_runs.c.challenge_id)
        .outerjoin(published, published.c.challenge_id == verified_runs.c.challenge_id)
        .outerjoin(verified_releases, verified_releases.c.run_id == verified_runs.c.id)
        .where(is_admitted())
        .order_by(verified_runs.c.id, verified_releases.c.idx)
    )
    columns = [
        "challenge_id",
        "task",
        "preset",
        "n",
        "encoder_config",
        "run_id",
        "team",
        "attack",
        "origin",
        "sandboxed",
        "releases",
        "state",
        "message",
        "created_utc",
        "idx",
        "release_state",
        "reidentification",
        "scores_hidden",
        "wall_s",
        "cpu_s",
        "peak_rss_bytes",
    ]
    with store._read() as conn:
        frame = pd.DataFrame(conn.execute(query).mappings().all(), columns=columns)
    frame = frame.assign(precision=pd.Series(dtype=str)) if frame.empty else frame
    if not frame.empty:
        frame["attack"] = [shown_attack(t, a, o) for t, a, o in zip(frame["team"], frame["attack"], frame["origin"])]
        frame["sandboxed"] = frame["sandboxed"].astype(bool)
        frame["scores_hidden"] = frame["scores_hidden"].astype(bool)
        frame["precision"] = [json.loads(text).get("precision", "fp32") for text in frame["encoder_config"]]
        for column in ("reidentification", "wall_s", "cpu_s", "peak_rss_bytes"):
            frame[column] = frame[column].astype(float)
        for column, floor in COARSE_FLOORS.items():
            frame[column] = [coarse(value, floor) for value in frame[column]]
            frame[column] = frame[column].astype(float)
    return frame


def run_view(store: Store, run_id: int, *, team: str | None = None) -> dict | None:
    """One run: state, reason, and per evaluation release its commitment, cost and headline
    score (none, and ``scores_hidden``, on a blind challenge until its close). With ``team``, as that team sees it (None for another team's run): each failure's
    ``detail`` in the plugin's own words and the measured costs. Without, as anyone sees it:
    reasons in the fixed vocabulary only, costs rounded up to a power of two (:func:`coarse`),
    no start or end time, and nothing of a run whose plugin has not passed its check (None).
    ``state`` is ``checking`` while the plugin awaits or runs its admission check."""
    views = run_views(store, verified_runs.c.id == run_id, team=team)
    return views[0] if views else None


def run_views(store: Store, condition, *, team: str | None = None) -> list[dict]:
    """:func:`run_view` of every run that meets ``condition`` (of ``team``'s only, and as it sees
    them, when given), oldest first, in four queries however many runs there are (anyone may
    list a challenge's runs: a query per run would let a listing cost seconds)."""
    runs_query = (
        sa.select(verified_runs, teams.c.name.label("team"), scores_hidden().label("scores_hidden"))
        .join(teams, teams.c.id == verified_runs.c.team_id)
        .join(challenges, challenges.c.challenge_id == verified_runs.c.challenge_id)
        .outerjoin(published, published.c.challenge_id == verified_runs.c.challenge_id)
        .where(condition, sa.true() if team is None else teams.c.name == team)
        .where(is_admitted() if team is None else sa.true())
        .order_by(verified_runs.c.id)
    )
    releases_query = (
        sa.select(
            verified_releases.c.run_id,
            verified_releases.c.idx,
            verified_releases.c.seed_sha256,
            verified_releases.c.key_commitment,
            verified_releases.c.state,
            verified_releases.c.message,
            verified_releases.c.detail,
            verified_releases.c.headline,
            verified_releases.c.wall_s,
            verified_releases.c.cpu_s,
            verified_releases.c.peak_rss_bytes,
        )
        .join(verified_runs, verified_runs.c.id == verified_releases.c.run_id)
        .join(teams, teams.c.id == verified_runs.c.team_id)
        .where(condition, sa.true() if team is None else teams.c.name == team)
        .order_by(verified_releases.c.run_id, verified_releases.c.idx)
    )
    with store._read() as conn:
        runs = conn.execute(runs_query).all()
        releases = collections.defaultdict(list)
        for row in conn.execute(releases_query):
            releases[row.run_id].append(row)
    # Checks and runs are two queues: a run waits behind the queued ones of its own kind.
    checks = verified_runs.c.attack_version == UNCHECKED
    queued = [run for run in runs if run.state == "queued"]
    places = {
        **workqueue.places(store, verified_runs, [r.id for r in queued if r.attack_version == UNCHECKED], checks),
        **workqueue.places(
            store,
            verified_runs,
            [r.id for r in queued if r.attack_version != UNCHECKED],
            ~checks,
            fair_by=verified_runs.c.team_id,
        ),
    }
    return [_run_view(run, releases[run.id], places.get(run.id), own=team is not None) for run in runs]


def _run_view(run, releases: list, ahead: int | None, *, own: bool) -> dict:
    """:func:`run_view` of the row ``run``, its ``releases`` rows and its place in its queue."""
    hidden = bool(run.scores_hidden)
    scores = [r.headline for r in releases if r.state == "scored" and r.headline is not None and not hidden]
    evaluations = [
        {k: v for k, v in r._mapping.items() if k != "run_id"} | ({"headline": None} if hidden else {})
        for r in releases
    ]
    if not own:
        for evaluation in evaluations:
            del evaluation["detail"]
            for column, floor in COARSE_FLOORS.items():
                evaluation[column] = coarse(evaluation[column], floor)
    checking = run.attack_version == UNCHECKED
    return {
        "id": run.id,
        "challenge_id": run.challenge_id,
        "attack": None if checking else run.attack,
        "attack_version": None if checking else run.attack_version,
        # A plugin awaiting or in its admission check; a failed check ends the run failed.
        "state": "checking" if checking and run.state in ("queued", "running") else run.state,
        "message": run.message,
        "releases": run.releases,
        "sandboxed": bool(run.sandboxed),
        "created_utc": run.created_utc,
        # When a run ended is a cost the plugin controls to the second: its team's only.
        "started_utc": run.started_utc if own else None,
        "finished_utc": run.finished_utc if own else None,
        "scores_hidden": hidden,  # a blind challenge, still open: scored, no score shown
        "queue_ahead": ahead,
        "mean": _finite(sum(scores) / len(scores)) if scores else None,
        "spread": _finite(pd.Series(scores).std(ddof=1)) if len(scores) > 1 else None,
        "evaluations": [{k: (_finite(v) if isinstance(v, float) else v) for k, v in e.items()} for e in evaluations],
    }


def summary_line(view: dict) -> str:
    """A run's outcome in one line, from :func:`run_view`."""
    if view["scores_hidden"]:
        return f"{view['state']}; the score is hidden until the close (a blind challenge)"
    if view["state"] != "scored" or view["mean"] is None:
        return view["message"] or view["state"]
    spread = f" ± {view['spread']:.3f}" if isinstance(view["spread"], float) else ""
    costs = [e["wall_s"] for e in view["evaluations"] if isinstance(e["wall_s"], float)]
    mark = "" if view["sandboxed"] else " (UNSANDBOXED)"
    return (
        f"re-identification {view['mean']:.3f}{spread} over {len(view['evaluations'])} fresh hidden releases "
        f"(wall {sum(costs):.1f} s in all){mark}"
    )


def team_runs(store: Store, team: str) -> list[dict]:
    return run_views(store, sa.true(), team=team)


def challenge_runs(store: Store, challenge_id: str) -> list[dict]:
    """The challenge's runs as anyone sees them (admitted ones only)."""
    return run_views(store, verified_runs.c.challenge_id == challenge_id)


def _finite(value: float | None):
    """JSON has no NaN or infinity: they travel as None and strings."""
    if value is None or math.isnan(value):
        return None
    return value if math.isfinite(value) else str(value)
