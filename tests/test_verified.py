"""The verified track: plugins run by the organizer, sandboxed, on fresh hidden releases.

One real `ncbench server` (two workers, small sandbox limits) takes a batch at once: hostile
plugins, a well-behaved one, the built-in reference rows and an ordinary scoring job. The tests
then read what the batch left behind; the last one closes the challenge and rebuilds an
evaluation release from its revealed seed.
"""

import concurrent.futures
import dataclasses
import errno
import hashlib
import io
import math
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import h5py
import httpx
import pandas as pd
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from streamlit.testing.v1 import AppTest
from test_server import Server, ncbench
from test_store import publish_blind
from test_store import result as store_result

from ncbench.attacks.gram_hungarian import GramHungarian
from ncbench.attacks.plugins import archive as plugin_archive
from ncbench.cli import main
from ncbench.errors import NcbenchError
from ncbench.leaderboard import isolated, tables, workqueue
from ncbench.leaderboard.scoring import score_submission
from ncbench.leaderboard.store import BUILTIN_TEAM, DB_ENV, Store, verified_releases, verified_runs
from ncbench.leaderboard.verified import cgroup, sandbox, seccomp
from ncbench.leaderboard.verified import runs as verified
from ncbench.leaderboard.verified.declarations import literal_declarations, read_declarations

NCBENCH = str(Path(sys.executable).with_name("ncbench"))
# width 64 = 8 x 8 pixels per patch: every built-in attack runs on it.
TINY = ["--width", "64", "--image-size", "32", "--patch-size", "8", "--bn-batch", "8"]
LIMITS = {
    "memory_bytes": "2G",
    "cpu_s": "30",
    "wall_s": "15",
    "processes": "64",
    "file_bytes": "64M",
    "scratch_bytes": "128M",
    "output_bytes": "64k",
    "threads": "1",
}
LIMIT_ARGS = [arg for name, value in LIMITS.items() for arg in ("--sandbox-limit", f"{name}={value}")]
FINAL = ("scored", "failed")

PLUGIN = """\
import os
import socket
import sys
import time

import numpy as np

from ncbench.attacks.gram_hungarian import GramHungarian
{module_level}

class {cls}(GramHungarian):
    name = "{name}"
    version = "1.0"
    tasks = ("reid",)
    knowledge = ("architecture", "self-sampled-keys", "plaintext-pool")
    description = "A plugin of tests/test_verified.py."

    def run(self, release):
{body}
"""
WELL_BEHAVED = "        return super().run(release)"


MARKER = "NCBENCH-MARKER-7f3a"  # what a plugin tries to publish through its failure


def hostile_bodies(port: int, store: Path, challenge_id: str) -> dict[str, tuple[str, str | None, str]]:
    """Plugin name -> (body of run(), its public reason (None: any of the vocabulary), what the
    detail its team sees must say)."""
    paths = ["/etc/passwd", str(store / "leaderboard.db"), str(store / "keys" / challenge_id / "key.h5")]
    folders = [str(store), str(store / "keys"), "/home"]
    return {
        "opens-a-socket": (
            f"""
        outcomes = []
        for address in [("127.0.0.1", {port}), ("1.1.1.1", 53)]:
            try:
                socket.create_connection(address, timeout=3).close()
                outcomes.append(f"CONNECTED {{address}}")
            except OSError as error:
                outcomes.append(type(error).__name__)
        raise RuntimeError("no network: " + ", ".join(outcomes))""",
            "exception RuntimeError",
            "no network",
        ),
        "reads-host-files": (
            f"""
        leaked = []
        for path in {paths!r}:
            try:
                with open(path, "rb") as handle:
                    handle.read(1)
                leaked.append(path)
            except OSError:
                pass
        for folder in {folders!r}:
            try:
                os.listdir(folder)
                leaked.append(folder)
            except OSError:
                pass
        raise RuntimeError(f"LEAKED {{leaked}}" if leaked else "nothing of the host is visible")""",
            "exception RuntimeError",
            "nothing of the host is visible",
        ),
        "forks-until-stopped": (
            """
        while True:
            if os.fork() == 0:
                time.sleep(3600)
                os._exit(0)""",
            None,  # the process limit, then BlockingIOError or the clock, whichever comes first
            "Resource temporarily unavailable",
        ),
        "allocates-50-gb": (
            """
        return np.ones(50 * 10**9, dtype=np.uint8)""",
            "memory limit",
            "MemoryError",
        ),
        "sleeps-forever": (
            """
        time.sleep(10**6)""",
            "wall-clock limit",
            "",
        ),
        "writes-10-gb": (
            """
        with open("/tmp/big", "wb") as handle:
            for _ in range(10 * 1024):
                handle.write(bytes(1 << 20))""",
            "exception OSError",
            "File too large",
        ),
        "prints-1-gb": (
            """
        for _ in range(1024):
            sys.stdout.write("x" * (1 << 20))""",
            "output limit",
            "",
        ),
        "imports-a-missing-module": (
            """
        import ncbench_no_such_module  # noqa: F401""",
            "exception ModuleNotFoundError",
            "No module named 'ncbench_no_such_module'",
        ),
        "writes-a-garbled-submission": (
            """
        import h5py
        with h5py.File("/tmp/submission.h5", "w") as handle:
            handle.attrs["format"] = "ncbench-submission"
            handle.attrs["schema_version"] = "x\\x1b[31m<b>\\nsecond line"
        os._exit(0)  # before the runner writes the real answer over it""",
            "invalid submission",
            "the scorer refused the submission: ncbench-submission schema version x [31m<b> second line",
        ),
        "raises-a-marker": (
            f"""
        print("error: attack x failed: {MARKER}: forged")
        raise type("{MARKER.replace("-", "_")}", (Exception,), {{}})("{MARKER}")""",
            None,  # its forged error line may come last: then another word of the vocabulary
            MARKER,
        ),
    }


def plugin_source(name: str, body: str = WELL_BEHAVED, module_level: str = "", cls: str = "Plugin") -> str:
    return PLUGIN.format(
        name=name, body=textwrap.indent(textwrap.dedent(body).strip("\n"), " " * 8), module_level=module_level, cls=cls
    )


def cli(*args, env=None, input=None):
    """The ncbench command in this process (click's runner): the quick checks need no new interpreter."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env, input=input)


def write_wheel(
    path: Path, package: str, files: dict[str, str | bytes] | None = None, *, requires: tuple[str, ...] = ()
) -> Path:
    """A minimal pure-Python wheel, written member by member: ``package/__init__.py``,
    ``package/attack.py`` (a well-behaved plugin), then ``files`` (member name -> content, as
    given), then ``NAME-0.1.dist-info/`` METADATA, WHEEL and RECORD."""
    info = f"{package}-0.1.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n" + "".join(
        f"Requires-Dist: {requirement}\n" for requirement in requires
    )
    members = {
        f"{package}/__init__.py": "",
        f"{package}/attack.py": plugin_source(package.replace("_", "-")),
        **(files or {}),
        f"{info}/METADATA": metadata,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    records = [
        f"{name},sha256={hashlib.sha256(_bytes(body)).hexdigest()},{len(_bytes(body))}"
        for name, body in members.items()
    ]
    members[f"{info}/RECORD"] = "\n".join([*records, f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, body in members.items():
            wheel.writestr(name, body)
    return path


def write_sdist(path: Path, package: str, files: dict[str, str | bytes] | None = None, links=()) -> Path:
    """A minimal src-layout sdist: PKG-INFO, pyproject.toml, a setup.py that must never run,
    ``src/package/attack.py`` (a well-behaved plugin), then ``files`` and symbolic ``links``
    (member name -> target)."""
    top = f"{package}-0.1"
    members = {
        f"{top}/PKG-INFO": f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n",
        f"{top}/pyproject.toml": f'[project]\nname = "{package}"\nversion = "0.1"\ndependencies = ["numpy"]\n',
        f"{top}/setup.py": "raise SystemExit('setup.py ran')\n",
        f"{top}/src/{package}/__init__.py": "",
        f"{top}/src/{package}/attack.py": plugin_source(package.replace("_", "-")),
        **(files or {}),
    }
    with tarfile.open(path, "w:gz") as sdist:
        for name, body in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(_bytes(body))
            sdist.addfile(member, io.BytesIO(_bytes(body)))
        for name, target in dict(links).items():
            member = tarfile.TarInfo(name)
            member.type, member.linkname = tarfile.SYMTYPE, target
            sdist.addfile(member)
    return path


def _bytes(body: str | bytes) -> bytes:
    return body.encode() if isinstance(body, str) else body


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    problem = sandbox.sandbox_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("verified")
    built = ncbench(
        "challenge",
        "build",
        "--preset",
        "nc3",
        "--task",
        "reid",
        "--source",
        "phantom",
        "--n",
        16,
        *TINY,
        "--out",
        root / "release",
    )
    assert built.returncode == 0, built.stderr
    store = root / "store"
    published = ncbench("challenge", "publish", root / "release", "--store", store, "--plugin-daily-limit", 50)
    assert published.returncode == 0, published.stderr
    teams = ("alice", "bob", "carol")  # carol uploads the hostile archives
    tokens = {team: ncbench("team", "add", team, "--store", store).stdout.strip() for team in teams}
    server = Server(store, "--sandbox-workers", 2, "--board-port", 0, "--verified-releases", 2, *LIMIT_ARGS)
    (root / "plugins").mkdir()
    yield {"root": root, "store": store, "id": published.stdout.split()[-1], "tokens": tokens, "server": server}
    if server.process.poll() is None:
        server.stop()


def db(world) -> Store:
    return Store(world["store"] / "leaderboard.db", create=False)


def upload(world, team: str, path: Path, cls: str = "Plugin") -> httpx.Response:
    return httpx.post(
        f"{world['server'].url}/api/v1/challenges/{world['id']}/plugins",
        params={"class": cls, "filename": path.name},
        content=path.read_bytes(),
        headers={"Authorization": f"Bearer {world['tokens'][team]}"},
        timeout=300,
    )


@pytest.fixture(scope="module")
def batch(world):
    """Everything at once: hostile plugins (alice), a well-behaved one through `ncbench submit
    --plugin` (bob), as a .py file and as a wheel, the built-ins queued by the organizer and an
    ordinary scoring job; waits until every run has ended, checking all along that the server
    answers."""
    root, url = world["root"], world["server"].url
    hostile = hostile_bodies(world["server"].port, world["store"], world["id"])
    files = {}
    for name, (body, _, _) in hostile.items():
        files[name] = root / "plugins" / f"{name.replace('-', '_')}.py"
        files[name].write_text(plugin_source(name, body))
    good = root / "plugins" / "good_plugin.py"
    good.write_text(plugin_source("good-gram"))
    wheel = write_wheel(root / "plugins" / "wheel_gram-0.1-py3-none-any.whl", "wheel_gram")
    chance = root / "chance.h5"
    assert ncbench("attack", "run", "chance", "--release", root / "release", "--out", chance).returncode == 0
    bob = {"NCBENCH_SERVER": url, "NCBENCH_TOKEN": world["tokens"]["bob"]}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        uploads = {name: pool.submit(upload, world, "alice", path) for name, path in files.items()}
        submitted = pool.submit(
            ncbench, "submit", "--plugin", f"{good}:Plugin", "--challenge", world["id"], "--no-wait", env=bob
        )
        wheeled = pool.submit(
            ncbench,
            "submit",
            "--plugin",
            f"{wheel}:wheel_gram.attack:Plugin",
            "--challenge",
            world["id"],
            "--no-wait",
            env=bob,
        )
        builtins = pool.submit(
            ncbench,
            "leaderboard",
            "verify-builtins",
            "--challenge",
            world["id"],
            "--store",
            world["store"],
            "--releases",
            1,
            "--queue-only",
            *LIMIT_ARGS,
            # carlini-2021 trains its patch networks and a clone: about 12 s of wall time here under load.
            "--sandbox-limit",
            "wall_s=60",
        )
        scoring = pool.submit(
            httpx.post,
            f"{url}/api/v1/challenges/{world['id']}/submissions",
            content=chance.read_bytes(),
            timeout=60,
            headers={"Authorization": f"Bearer {world['tokens']['bob']}"},
        )
        answers = {name: future.result() for name, future in uploads.items()}
    assert all(answer.status_code == 202 for answer in answers.values()), {n: a.text for n, a in answers.items()}
    assert submitted.result().returncode == 0, submitted.result().stderr
    assert wheeled.result().returncode == 0, wheeled.result().stderr
    assert builtins.result().returncode == 0, builtins.result().stderr
    assert scoring.result().status_code == 202, scoring.result().text
    health = []
    deadline = time.monotonic() + 300
    with db(world) as store:
        while time.monotonic() < deadline:
            health.append(httpx.get(f"{url}/api/v1/challenges", timeout=10).status_code)
            with store._read() as conn:
                states = conn.execute(sa.select(verified_runs.c.state)).scalars().all()
            if all(state in FINAL for state in states):
                break
            time.sleep(1)
        results = verified.results(store)
    job = httpx.get(
        f"{url}/api/v1/submissions/{scoring.result().json()['id']}",
        timeout=10,
        headers={"Authorization": f"Bearer {world['tokens']['bob']}"},
    ).json()
    runs = {name: answer.json()["id"] for name, answer in answers.items()}  # each plugin's attack is its name
    return {
        "hostile": hostile,
        "runs": runs,
        "results": results,
        "health": health,
        "scoring": job,
        "good": good,
        "wheel": wheel,
        "bob": bob,
    }


def run_of(batch, world, run_id: int, team: str | None = None) -> dict:
    """A run as anyone sees it, or as ``team`` does."""
    with db(world) as store:
        return verified.run_view(store, run_id, team=team)


# -- hostile plugins ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(hostile_bodies(0, Path("/"), "x")))
def test_hostile_plugin_is_contained_and_recorded_as_failed_with_its_reason(world, batch, name):
    run, own = run_of(batch, world, batch["runs"][name]), run_of(batch, world, batch["runs"][name], "alice")
    _, public, detail = batch["hostile"][name]
    assert run["state"] == "failed", run
    failed = [e for e in run["evaluations"] if e["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["message"] in sandbox.FAILURES, failed
    assert public is None or failed[0]["message"] == public, failed
    assert run["message"] == f"evaluation release 1 of 2: {failed[0]['message']}"
    assert "detail" not in failed[0]
    mine = [e for e in own["evaluations"] if e["state"] == "failed"][0]
    assert detail in (mine["detail"] or ""), mine
    assert "LEAKED" not in (mine["detail"] or "") and "CONNECTED" not in (mine["detail"] or "")
    assert (mine["detail"] or "").isprintable() and str(world["store"]) not in (mine["detail"] or "")


def test_no_plugin_text_reaches_the_public_api_or_the_board(world, batch, monkeypatch):
    # The marker plugin raised an exception of a class named after the marker, with the marker as
    # its message, and printed a forged error line naming it: its team sees the marker, no one else.
    public = httpx.get(f"{world['server'].url}/api/v1/challenges/{world['id']}/verified", timeout=30)
    assert public.status_code == 200 and "raises-a-marker" in public.text
    for text in (public.text, public.text.replace("-", "_")):
        assert MARKER not in text and MARKER.replace("-", "_") not in text
    own = httpx.get(
        f"{world['server'].url}/api/v1/plugins",
        headers={"Authorization": f"Bearer {world['tokens']['alice']}"},
        timeout=30,
    )
    assert MARKER in own.text
    at = verified_page(monkeypatch, world["store"] / "leaderboard.db")
    for frame in at.dataframe:
        shown = frame.value.to_csv()
        assert MARKER not in shown and MARKER.replace("-", "_") not in shown
    summary = tables.verified_summary(batch["results"])
    assert "alice/raises-a-marker" in set(summary["attack"]) and MARKER not in summary.to_csv()


def test_public_costs_are_rounded_up_to_a_power_of_two(world, batch):
    run_id = batch["runs"]["sleeps-forever"]
    public, own = run_of(batch, world, run_id), run_of(batch, world, run_id, "alice")
    assert public["finished_utc"] is None and own["finished_utc"] is not None
    for seen, measured in zip(public["evaluations"], own["evaluations"]):
        if measured["wall_s"] is not None:
            assert seen["wall_s"] >= measured["wall_s"] and math.log2(seen["wall_s"]).is_integer()


def test_coarse_rounds_up_to_a_power_of_two_from_its_floor():
    assert verified.coarse(3.2, 1.0) == 4.0 and verified.coarse(0.01, 1.0) == 1.0 and verified.coarse(4.0, 1.0) == 4.0
    assert verified.coarse(5 << 20, float(1 << 20)) == 8 << 20 and verified.coarse(None, 1.0) is None


def test_the_server_keeps_serving_and_scoring_while_hostile_plugins_run(batch):
    assert batch["health"] and set(batch["health"]) == {200}
    assert batch["scoring"]["state"] == "scored", batch["scoring"]


def run_count(world) -> int:
    with db(world) as store, store._read() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(verified_runs)).scalar()


def checked(world, team: str, answer: httpx.Response) -> dict:
    """The run of an accepted upload (202, ``checking``) once its admission check has ended."""
    assert answer.status_code == 202 and answer.json()["state"] == "checking", answer.text
    while True:
        run = httpx.get(
            f"{world['server'].url}/api/v1/plugins/{answer.json()['id']}",
            headers={"Authorization": f"Bearer {world['tokens'][team]}"},
            timeout=30,
        ).json()
        if run["state"] != "checking":
            return run
        time.sleep(0.5)


def test_a_plugin_that_fails_its_check_ends_its_run_failed_counted_and_unseen(world, batch):
    path = world["root"] / "plugins" / "broken_import.py"
    path.write_text(plugin_source("broken-import", module_level="import ncbench_no_such_module"))
    before = run_count(world)
    refused = cli("submit", "--plugin", f"{path}:Plugin", "--challenge", world["id"], env=batch["bob"])
    assert refused.exit_code == 2
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: verified run ") and verified.CHECK_FAILED in last, refused.stderr
    assert "No module named 'ncbench_no_such_module'" in last
    assert run_count(world) == before + 1  # the check counts against the team's plugin runs
    with db(world) as store:
        assert len(verified.results(store)["run_id"].unique()) == len(batch["results"]["run_id"].unique())


FORGER = """\
import os
import sys

from ncbench.attacks.gram_hungarian import GramHungarian

print('ncbench-check: {"attack": "forged-name", "version": "9", "tasks": ["reid"], "knowledge": []}')
sys.stdout.flush()
os._exit(0)


class Plugin(GramHungarian):
    name = "real-name"
    version = "1.0"
    tasks = ("reid",)
    knowledge = ("architecture", "key")
"""


def test_a_plugin_that_prints_its_own_admission_report_is_refused(world, batch, tmp_path):
    # It exits at import with a report of other declarations: the host reads the real ones
    # (knowledge 'key', refused) from the source, and the printed report does not agree.
    path = tmp_path / "forger.py"
    path.write_text(FORGER)
    (tmp_path / "work").mkdir()
    outcome, report = sandbox.check_plugin(
        plugin=path,
        class_name="Plugin",
        params={},
        task="reid",
        workdir=tmp_path / "work",
        limits=verified.CHECK_LIMITS,
    )
    assert report is None and outcome.reason == sandbox.DECLARATIONS_DIFFER, outcome
    run = checked(world, "carol", upload(world, "carol", path))
    assert run["state"] == "failed" and "forged-name" not in run["message"] and run["attack"] is None, run
    # The same report printed truthfully admits nothing more than the source declares.
    path.write_text(
        FORGER.replace('"forged-name", "version": "9"', '"real-name", "version": "1.0"').replace(
            '"knowledge": []', '"knowledge": ["architecture", "key"]'
        )
    )
    run = checked(world, "carol", upload(world, "carol", path))
    assert run["state"] == "failed" and "knowledge the leaderboard refuses" in run["message"], run


def test_two_verified_runs_execute_at_once_on_a_two_worker_cluster(world, batch):
    with db(world) as store, store._read() as conn:
        spans = conn.execute(sa.select(verified_runs.c.started_utc, verified_runs.c.finished_utc)).all()
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most == 2  # two workers: two runs at once, never more


# -- a well-behaved plugin -----------------------------------------------------------------------


def test_submit_plugin_runs_on_fresh_hidden_releases_committed_before_the_run(world, batch):
    results = batch["results"]
    good = results[results["attack"] == "bob/good-gram"]
    assert list(good["release_state"]) == ["scored", "scored"] and good["state"].iloc[0] == "scored"
    assert good["reidentification"].between(0, 1).all() and good["sandboxed"].all()
    assert (good["wall_s"] >= 1).all() and (good["cpu_s"] >= 1).all() and (good["peak_rss_bytes"] > 10 << 20).all()
    commitments = httpx.get(f"{world['server'].url}/api/v1/challenges/{world['id']}/commitments").json()
    mine = [c for c in commitments if c["attack"] == "bob/good-gram"]
    assert len(mine) == 2 and len({c["eval_challenge_id"] for c in mine}) == 2
    assert world["id"] not in {c["eval_challenge_id"] for c in mine}  # never the public release
    assert all(c["seed"] is None and c["rebuild"] is None and len(c["seed_sha256"]) == 64 for c in mine)
    run = run_of(batch, world, int(good["run_id"].iloc[0]), "bob")
    assert all(c["committed_utc"] < run["finished_utc"] for c in mine)
    listed = cli("submissions", env=batch["bob"])
    runs_table = listed.stdout.split("verified plugin runs")[1].splitlines()
    assert any(line.split()[:1] == [str(run["id"])] and "scored" in line for line in runs_table), listed.stdout


@pytest.mark.parametrize("form", ["file", "wheel"])
def test_well_behaved_plugin_scores_the_same_in_the_sandbox_as_run_locally(world, batch, tmp_path, form):
    release = world["root"] / "release"
    local = tmp_path / "local.h5"
    ran = subprocess.run(
        [NCBENCH, "attack", "run", f"{batch['good']}:Plugin", "--release", release, "--out", local],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert ran.returncode == 0, ran.stderr
    (tmp_path / "work").mkdir()
    # Staged as the server stages an upload: the .py file copied, the wheel checked and unpacked.
    upload, entry = {"file": (batch["good"], "Plugin"), "wheel": (batch["wheel"], "wheel_gram.attack:Plugin")}[form]
    plugin = verified.stage_plugin(upload, plugin_file=upload.name, entry=entry, work=tmp_path / "work")
    limits = sandbox.parse_limits(f"{k}={v}" for k, v in LIMITS.items())
    outcome, sandboxed = sandbox.run_attack(
        attack=entry,
        params={},
        release=release / "public" / "release.h5",
        workdir=tmp_path / "work",
        limits=limits,
        plugin=plugin,
    )
    assert outcome.ok, outcome.output
    assert outcome.sandboxed and outcome.cpu_s > 0 and outcome.peak_rss_bytes > 0
    assert score_submission(sandboxed, release).metrics == score_submission(local, release).metrics


def test_a_wheel_plugin_is_checked_queued_and_scored_like_a_py_file(world, batch):
    results = batch["results"]
    wheel = results[results["attack"] == "bob/wheel-gram"]
    assert list(wheel["release_state"]) == ["scored", "scored"] and wheel["state"].iloc[0] == "scored"
    assert wheel["reidentification"].between(0, 1).all() and wheel["sandboxed"].all()
    with db(world) as store, store._read() as conn:
        row = conn.execute(
            sa.select(verified_runs.c.plugin_file, verified_runs.c.class_name).where(
                verified_runs.c.id == int(wheel["run_id"].iloc[0])
            )
        ).one()
    assert tuple(row) == (batch["wheel"].name, "wheel_gram.attack:Plugin")


def hostile_archives(folder: Path) -> dict[str, tuple[Path, str]]:
    """Case -> (archive whose entry is ``pkg.attack:Plugin``, what the one-line refusal says)."""
    folder.mkdir(exist_ok=True)

    def wheel(case: str, files=None, **options) -> Path:
        return write_wheel(folder / f"{case.replace('-', '_')}-0.1-py3-none-any.whl", "pkg", files, **options)

    bomb = wheel("zip-bomb")
    with zipfile.ZipFile(bomb, "a", zipfile.ZIP_DEFLATED) as zipped, zipped.open("pkg/zeros.bin", "w") as member:
        for _ in range((plugin_archive.MAX_UNPACKED_BYTES >> 20) + 1):
            member.write(bytes(1 << 20))  # a few hundred kB compressed
    corrupt = wheel("corrupt")
    corrupt.write_bytes(corrupt.read_bytes()[:-100])  # the central directory is cut
    many = {f"pkg/empty_{k}.py": "" for k in range(plugin_archive.MAX_MEMBERS)}
    return {
        "dot-dot": (wheel("dot-dot", {"../evil.py": "print('escaped')"}), "'../evil.py' has a '..' part"),
        "absolute-path": (wheel("absolute-path", {"/tmp/evil.py": ""}), "'/tmp/evil.py' is an absolute path"),
        "symlink": (
            write_sdist(folder / "symlink-0.1.tar.gz", "pkg", links={"pkg-0.1/src/pkg/passwd": "/etc/passwd"}),
            "'pkg-0.1/src/pkg/passwd' is a symbolic link",
        ),
        "zip-bomb": (bomb, f"unpacks to more than {plugin_archive.MAX_UNPACKED_BYTES} bytes"),
        "many-members": (wheel("many-members", many), f"has more than {plugin_archive.MAX_MEMBERS} members"),
        "compiled": (
            wheel("compiled", {"pkg/_speedups.cpython-311-x86_64-linux-gnu.so": b"\x7fELF"}),
            "is compiled code",
        ),
        "missing-dependency": (
            wheel("missing-dependency", requires=("some-package-that-does-not-exist>=1",)),
            "requires some-package-that-does-not-exist (not installed)",
        ),
        "corrupt": (corrupt, "is not a readable wheel (zip)"),
    }


HOSTILE_ARCHIVES = [
    "dot-dot",
    "absolute-path",
    "symlink",
    "zip-bomb",
    "many-members",
    "compiled",
    "missing-dependency",
    "corrupt",
]


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    made = hostile_archives(tmp_path_factory.mktemp("archives"))
    assert list(made) == HOSTILE_ARCHIVES
    return made


@pytest.mark.parametrize("case", HOSTILE_ARCHIVES)
def test_a_hostile_plugin_archive_fails_its_check_in_one_line_and_never_runs(world, archives, case):
    path, expected = archives[case]
    before = run_count(world)
    carol = {"NCBENCH_SERVER": world["server"].url, "NCBENCH_TOKEN": world["tokens"]["carol"]}
    refused = cli("submit", "--plugin", f"{path}:pkg.attack:Plugin", "--challenge", world["id"], env=carol)
    assert refused.exit_code == 2, refused.output
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: verified run "), refused.stderr
    assert verified.CHECK_FAILED in errors[0] and expected in errors[0], errors[0]
    assert run_count(world) == before + 1
    with db(world) as store, store._read() as conn:
        newest = conn.execute(sa.select(verified_runs.c.state).order_by(verified_runs.c.id.desc()).limit(1)).scalar()
    assert newest == "failed"
    assert not list((world["store"] / "work").glob("check-*"))  # nothing unpacked is left behind
    assert not (world["store"] / "work" / "evil.py").exists() and not Path("/tmp/evil.py").exists()


# -- built-ins -----------------------------------------------------------------------------------


def test_builtins_are_the_reference_rows_of_the_verified_matrix(batch):
    summary = tables.verified_summary(batch["results"])
    builtins = summary[summary["origin"] == "organizer"]
    assert sorted(builtins["attack"]) == sorted(verified.BUILTINS)
    assert set(builtins["state"]) == {"scored"}, builtins[["attack", "message"]]
    matrix = tables.verified_matrix(summary, task="reid")
    assert set(verified.BUILTINS) | {"bob/good-gram"} <= set(matrix.index)
    assert not any(name.startswith("alice/") for name in matrix.index)  # failed runs have no cell


def test_an_unsandboxed_run_says_so(world, batch):
    settings = verified.Settings(
        releases=1, unsandboxed=True, limits=sandbox.parse_limits(f"{k}={v}" for k, v in LIMITS.items())
    )
    with db(world) as store:
        run_id = verified.enqueue(
            store,
            team=BUILTIN_TEAM,
            origin="organizer",
            challenge_id=world["id"],
            attack="chance",
            attack_version="1.0",
            params="{}",
            settings=settings,
            eval_source="phantom",
        )
        deadline = time.monotonic() + 120
        while verified.run_view(store, run_id)["state"] not in FINAL and time.monotonic() < deadline:
            time.sleep(0.5)  # the server's workers take it: the run's row says how to run it
        run = verified.run_view(store, run_id)
        summary = tables.verified_summary(verified.results(store))
    assert run["state"] == "scored" and run["sandboxed"] is False, run
    assert not summary.loc[summary["run_id"] == run_id, "sandboxed"].item()
    assert not (world["store"] / "keys" / "verified" / f"run-{run_id}").exists()  # deleted once scored


def verified_page(monkeypatch, db_path: Path) -> AppTest:
    monkeypatch.setenv(DB_ENV, str(db_path))
    at = AppTest.from_file(str(Path(tables.__file__).parent / "board" / "app.py"), default_timeout=60).run()
    at.sidebar.radio[0].set_value("Verified").run()
    assert not at.exception, at.exception
    return at


def test_the_board_shows_the_verified_matrix_commitments_and_compute(world, batch, monkeypatch):
    at = verified_page(monkeypatch, world["store"] / "leaderboard.db")
    matrix, runs, commitments = (frame.value for frame in at.dataframe)
    assert {"gram-hungarian", "chance", "bob/good-gram"} <= set(matrix["attack"])
    assert "alice/sleeps-forever" in set(runs["attack"])  # failed runs are listed, with their reason
    assert not runs.isna().any().any()  # a failed run shows its reason, not missing values
    assert set(commitments["seed"]) == {tables.HIDDEN_SEED}  # the challenge is still open
    assert at.get("vega_lite_chart"), "no plot of re-identification against compute"


def test_the_verified_page_of_an_empty_board_says_how_to_fill_it(tmp_path, monkeypatch):
    Store(tmp_path / "empty.db").close()
    at = verified_page(monkeypatch, tmp_path / "empty.db")
    assert "No verified runs yet" in at.info[0].value


# -- commit, then reveal -------------------------------------------------------------------------


def test_a_revealed_seed_rebuilds_the_evaluation_release_byte_for_byte(world, batch, tmp_path):
    url = world["server"].url
    closed = cli("leaderboard", "close", world["id"], "--db", world["store"] / "leaderboard.db", "--yes")
    assert closed.exit_code == 0 and "revealed the seeds" in closed.stdout, closed.output
    commitments = httpx.get(f"{url}/api/v1/challenges/{world['id']}/commitments").json()
    revealed = next(c for c in commitments if c["attack"] == "bob/good-gram")
    assert hashlib.sha256(revealed["seed"].encode()).hexdigest() == revealed["seed_sha256"]
    echo, command = revealed["rebuild"].split(" | ")
    assert shlex.split(echo) == ["echo", revealed["seed"]]
    words = shlex.split(command)
    epoch = words.pop(0).split("=", 1)
    assert epoch[0] == "SOURCE_DATE_EPOCH" and words[0] == "ncbench" and "--seed-file" in words
    out = words.index("--out") + 1
    words[out] = str(tmp_path / words[out])
    rebuilt = cli(*words[1:], env={"SOURCE_DATE_EPOCH": epoch[1]}, input=revealed["seed"] + "\n")
    assert rebuilt.exit_code == 0, rebuilt.output
    release = Path(words[out]) / "public" / "release.h5"
    assert hashlib.sha256(release.read_bytes()).hexdigest() == revealed["release_sha256"]
    with h5py.File(release, "r") as h5:
        assert h5.attrs["key_commitment"] == revealed["key_commitment"]
        assert h5.attrs["challenge_id"] == revealed["eval_challenge_id"]


# -- without a server ----------------------------------------------------------------------------


def test_the_sandbox_shows_nothing_of_the_host_but_the_environment_release_and_plugin(tmp_path):
    store = tmp_path / "store"
    release, plugin, out = store / "keys/x/release.h5", tmp_path / "work/plugin/p.py", tmp_path / "work/submission.h5"
    mounts = [
        *sandbox.environment_mounts(),
        sandbox.Mount(release, sandbox.RELEASE_INSIDE),
        sandbox.Mount(plugin, "/plugin/p.py"),
        sandbox.Mount(out, sandbox.OUT_INSIDE, writable=True),
    ]
    for uid in (None, 1 << 24):
        argv = sandbox.bwrap_argv(["python"], mounts=mounts, limits=sandbox.Limits(), uid=uid)
        assert {"--unshare-net", "--unshare-pid", "--die-with-parent", "--clearenv"} <= set(argv)
        binds = [(word, argv[i + 1], argv[i + 2]) for i, word in enumerate(argv) if word in ("--bind", "--ro-bind")]
        assert [source for kind, source, _ in binds if kind == "--bind"] == [str(out)]  # the one writable file
        shown = {source for _, source, _ in binds}
        assert "/" not in shown and "/etc" not in shown and "/etc/passwd" not in shown
        assert not any(source.startswith(str(store)) for source in shown - {str(release)})
        remounted = [argv[i + 1] for i, word in enumerate(argv) if word == "--remount-ro"]
        assert remounted == ["/dev", "/"]
        assert ("--disable-userns" in argv) == (uid is None) and (f"--reuid={uid}" in argv) == (uid is not None)
        assert any(word.startswith("--nproc=") for word in argv) and any(word.startswith("--as=") for word in argv)


MOUNTINFO_PROBE = "print(open('/proc/self/mountinfo').read(), flush=True)"


@pytest.mark.parametrize("step", [pytest.param("check", marks=pytest.mark.slow), "run"])  # one staging function
def test_mountinfo_inside_names_no_folder_of_the_store_or_the_work_dir(tmp_path, tmp_path_factory, monkeypatch, step):
    """A bind mount's source shows in /proc/self/mountinfo: the release, the plugin and the
    submission are bound from neutral hard links, so the host's store paths never appear."""
    if sandbox.sandbox_problem():
        pytest.skip("no bubblewrap sandbox here")
    store = tmp_path / "store-a81c"
    release = store / "keys/verified/run-7/release-0/public/release.h5"
    release.parent.mkdir(parents=True)
    release.write_bytes(b"not a release")
    release.chmod(0o644)
    work = store / "work/run-7-release-0"
    (work / "plugin").mkdir(parents=True)
    plugin = work / "plugin/probe.py"
    plugin.write_text(plugin_source("probe", module_level=MOUNTINFO_PROBE))
    limits = sandbox.parse_limits(["wall_s=60"])
    neutral = tmp_path_factory.mktemp("neutral")
    monkeypatch.setattr(tempfile, "tempdir", str(neutral))  # the server's TMPDIR
    if step == "check":
        outcome, _ = sandbox.check_plugin(
            plugin=plugin, class_name="Plugin", params={}, task="reid", workdir=work, limits=limits
        )
    else:
        outcome, _ = sandbox.run_attack(
            attack="Plugin", params={}, release=release, workdir=work, limits=limits, plugin=plugin
        )
    mountinfo = [line for line in outcome.output.splitlines() if " - " in line and line[:1].isdigit()]
    assert any(" /plugin" in line for line in mountinfo), outcome.output
    if step == "run":
        assert any(f" {sandbox.RELEASE_INSIDE} " in line for line in mountinfo), outcome.output
        assert any(f" {sandbox.OUT_INSIDE} " in line for line in mountinfo), outcome.output
    for host in (str(store), "store-a81c", "keys/verified", "run-7", str(tmp_path)):
        assert not any(host in line for line in mountinfo), (host, mountinfo)
    assert any(str(neutral) in line for line in mountinfo)  # bound from there
    assert not list(neutral.iterdir())  # and removed after the run


def test_staging_keeps_a_plugins_symlinks_as_links_and_copies_a_submission_back(tmp_path, monkeypatch):
    """An unpacked plugin's symlink stays a link (resolved inside the sandbox, as a bind of the
    folder showed it), never a copy of the host file it names; across file systems (no hard
    link) the submission written in the staging folder comes back to the work folder."""
    host_file = tmp_path / "host-secret.txt"
    host_file.write_text("host only")
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "p.py").write_text("x = 1")
    (plugin / "link").symlink_to(host_file)
    out = tmp_path / "submission.h5"
    out.write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with sandbox.neutral_sources([sandbox.Mount(plugin, "/plugin")]) as (staged,):
        assert (staged.host / "link").is_symlink() and (staged.host / "p.py").read_text() == "x = 1"

    def no_link(source, target):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(sandbox.os, "link", no_link)
    with sandbox.neutral_sources([sandbox.Mount(plugin, "/plugin")]) as (staged,):
        assert (staged.host / "link").is_symlink() and (staged.host / "p.py").read_text() == "x = 1"
    with sandbox.neutral_sources([sandbox.Mount(out, sandbox.OUT_INSIDE, writable=True)]) as (staged,):
        staged.host.write_bytes(b"written inside")
    assert out.read_bytes() == b"written inside"
    assert not list(tmp_path.glob("ncbench-sandbox-*"))


def test_a_killed_servers_staging_folder_goes_at_the_next_run(tmp_path, monkeypatch):
    """A server killed mid-run leaves its staging folder, whose hard links would keep a deleted
    evaluation release on disk: the next staging removes the folders of dead servers only."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f"{sandbox.STAGING_PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{sandbox.STAGING_PREFIX}{os.getpid()}-def"
    for folder in (left, live):
        folder.mkdir()
        (folder / "0-release.h5").write_bytes(b"held")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with sandbox.neutral_sources([]):
        pass
    assert not left.exists() and (live / "0-release.h5").exists()


def test_the_host_reads_declarations_from_literal_class_attributes(tmp_path):
    path = tmp_path / "plugin.py"
    path.write_text(plugin_source("my-gram"))
    assert read_declarations(path, "Plugin") == {
        "attack": "my-gram",
        "version": "1.0",
        "tasks": ["reid"],
        "knowledge": ["architecture", "self-sampled-keys", "plaintext-pool"],
    }
    inherited = (
        "from ncbench.attacks.gram_hungarian import GramHungarian\nclass Plugin(GramHungarian):\n    name = 'x'\n"
    )
    with pytest.raises(NcbenchError, match="must declare version, tasks, knowledge as literals"):
        literal_declarations(inherited, "Plugin")
    computed = "class Plugin:\n    name = 'x' + 'y'\n    version = '1'\n    tasks = ()\n    knowledge = ()\n"
    with pytest.raises(NcbenchError, match="name must be a string written as a literal"):
        literal_declarations(computed, "Plugin")


def test_a_parser_bomb_is_refused_within_the_parsers_limits(tmp_path):
    path = tmp_path / "bomb.py"
    path.write_text("x = " + "(" * 200_000 + ")" * 200_000 + "\nclass Plugin:\n    name = 'x'\n")
    with pytest.raises(NcbenchError, match="parse"):
        read_declarations(path, "Plugin")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("name = '" + "\\x01" * 70_000 + "'", "name is longer than 128 characters"),
        ("version = '" + "9" * 65 + "'", "version is longer than 64 characters"),
        ("tasks = (" + "'reid', " * 33 + ")", "tasks holds more than 32 words"),
        ("knowledge = ('" + "a" * 65 + "',)", "knowledge holds more than 32 words or one longer than 64"),
    ],
)
def test_an_oversized_declaration_is_refused_in_one_line(tmp_path, body, expected):
    # A huge literal once made the parser's child print megabytes that the server held in memory
    # and then failed to decode: a traceback, and the check retried.
    declared = {
        "name": "name = 'x'",
        "version": "version = '1'",
        "tasks": "tasks = ('reid',)",
        "knowledge": "knowledge = ()",
    }
    declared[body.split(" ")[0]] = body
    path = tmp_path / "plugin.py"
    path.write_text("class Plugin:\n" + "".join(f"    {line}\n" for line in declared.values()))
    with pytest.raises(NcbenchError, match=expected):
        read_declarations(path, "Plugin")


@given(st.text(max_size=300))
def test_a_public_reason_is_always_a_word_of_the_vocabulary(line):
    assert sandbox.public_reason(line) in sandbox.FAILURES
    assert sandbox.public_reason(f"attack x failed: {line}") in sandbox.FAILURES


def test_sandbox_limits_take_sizes_and_refuse_unknown_names():
    limits = sandbox.parse_limits(["memory_bytes=2G", "file_bytes=64M", "output_bytes=64k", "wall_s=1.5"])
    assert (limits.memory_bytes, limits.file_bytes, limits.output_bytes, limits.wall_s) == (
        2 << 30,
        64 << 20,
        64 << 10,
        1.5,
    )
    for bad in ("network=1", "memory_bytes", "cpu_s=lots", "threads=0", "processes=2"):
        with pytest.raises(sandbox.NcbenchError):
            sandbox.parse_limits([bad, "threads=4"] if bad == "processes=2" else [bad])


def test_verified_matrix_shows_mean_and_spread_over_keys_and_marks_unsandboxed_and_bf16_runs():
    rows = []
    for run_id, (attack, sandboxed, precision, scores) in enumerate(
        [("gram-hungarian", True, "fp32", [0.5, 0.7]), ("alice/mine", False, "bf16", [0.9, 0.9, 0.9])], start=1
    ):
        rows += [
            {
                "challenge_id": "c",
                "task": "reid",
                "preset": "nc3",
                "precision": precision,
                "n": 16,
                "run_id": run_id,
                "team": "t",
                "attack": attack,
                "origin": "organizer",
                "sandboxed": sandboxed,
                "releases": len(scores),
                "state": "scored",
                "message": None,
                "created_utc": "",
                "idx": i,
                "release_state": "scored",
                "reidentification": score,
                "wall_s": 2.0,
                "cpu_s": 1.0,
                "peak_rss_bytes": 1 << 20,
            }
            for i, score in enumerate(scores)
        ]
    summary = tables.verified_summary(pd.DataFrame(rows))
    assert summary["spread"].round(6).tolist() == [0.141421, 0.0]
    matrix = tables.verified_matrix(summary, task="reid")
    assert matrix.loc["gram-hungarian", "nc3, N=16"] == "60.0% ± 14.1% (K=2)"
    assert matrix.loc["alice/mine", "nc3, N=16"] == f"90.0% ± 0.0% (K=3) [bf16] {tables.UNSANDBOXED}"
    assert summary["precision"].tolist() == ["fp32", "bf16"]
    bigger = summary.assign(n=[16, 64])  # runs on releases of different sizes stay apart
    assert list(tables.verified_matrix(bigger, task="reid").columns) == ["nc3, N=16", "nc3, N=64"]
    assert tables.verified_compute(pd.DataFrame(rows))["cpu_s"].tolist() == [1.0] * 5


def insert_scored_run(store, *, headline: float) -> int:
    """A verified run of alice's, scored on one evaluation release, written as the worker writes it."""
    stamp = "2026-12-01T00:00:00+00:00"
    with store.engine.begin() as conn:
        run_id = conn.execute(
            verified_runs.insert().values(
                challenge_id="nc7-reid-00000001",
                team_id=1,
                origin="self-reported",
                attack="alices-plugin",
                attack_version="1.0",
                params="{}",
                releases=1,
                eval_source="phantom",
                limits="{}",
                sandboxed=True,
                state="scored",
                attempts=1,
                created_utc=stamp,
                updated_utc=stamp,
            )
        ).inserted_primary_key[0]
        conn.execute(
            verified_releases.insert().values(
                run_id=run_id,
                idx=0,
                eval_challenge_id="e",
                seed_sha256="s" * 64,
                key_commitment="k" * 64,
                release_sha256="r" * 64,
                recipe="{}",
                seed="0" * 64,
                committed_utc=stamp,
                state="scored",
                headline=headline,
                metrics="{}",
            )
        )
    return int(run_id)


def test_a_blind_challenges_verified_scores_are_hidden_until_the_close(tmp_path):
    with Store(tmp_path / "board.db") as store:
        store.record_score(store_result("a"), team="alice")  # creates the challenge and the team
        publish_blind(store)
        run_id = insert_scored_run(store, headline=0.75)
        hidden = verified.run_view(store, run_id, team="alice")
        assert hidden["scores_hidden"] and hidden["mean"] is None and hidden["evaluations"][0]["headline"] is None
        assert "hidden until the close" in verified.summary_line(hidden)
        assert verified.results(store)["reidentification"].isna().all()
        store.close_challenge("nc7-reid-00000001")
        assert verified.run_view(store, run_id)["mean"] == 0.75


def test_a_checker_that_crashes_on_a_plugin_fails_its_run_at_once_with_a_fixed_message(tmp_path, monkeypatch):
    # A bug of ours in a limited child gives the same crash each time: once retried until the
    # worker counted it as crashed repeatedly, each retry holding the one check slot.
    with Store(tmp_path / "board.db") as store:
        store.record_score(store_result("a"), team="alice")
        run_id = insert_scored_run(store, headline=0.5)
        with store.engine.begin() as conn:
            conn.execute(
                verified_runs.update()
                .where(verified_runs.c.id == run_id)
                .values(state="running", attack_version=verified.UNCHECKED, class_name="Plugin")
            )
        url = store.url.render_as_string(hide_password=False)

    def crash(**_):
        raise isolated.ChildCrashed("TypeError: \x1b[31m text of the plugin's")

    monkeypatch.setattr(verified, "_stage_run_plugin", lambda root, run, work: work / "plugin.py")
    monkeypatch.setattr(sandbox, "check_plugin", crash)
    assert verified.run_check(url, str(tmp_path), run_id) == "failed"
    with Store(tmp_path / "board.db") as store, store._read() as conn:
        message = conn.execute(sa.select(verified_runs.c.message).where(verified_runs.c.id == run_id)).scalar_one()
    assert message == f"{verified.CHECK_FAILED}: {verified.CHECKER_CRASHED}"


def test_teams_take_turns_for_the_sandbox_pool(tmp_path):
    # One team's queue of runs that each sleep to the wall limit once held the pool for hours.
    with Store(tmp_path / "board.db") as store:
        store.record_score(store_result("a"), team="alice")
        store.record_score(store_result("b"), team="bob")
        alice = [insert_scored_run(store, headline=0.5) for _ in range(3)]
        bob = insert_scored_run(store, headline=0.5)
        with store.engine.begin() as conn:
            for run_id, team, checked in zip([*alice, bob], [1, 1, 1, 2], ["01", "02", "03", "04"], strict=True):
                conn.execute(
                    verified_runs.update()
                    .where(verified_runs.c.id == run_id)
                    .values(state="queued", team_id=team, started_utc=f"2026-12-01T00:00:{checked}.000000Z")
                )
        checked = verified_runs.c.attack_version != verified.UNCHECKED
        ahead = workqueue.places(store, verified_runs, [*alice, bob], checked, fair_by=verified_runs.c.team_id)
        first = verified.claim(store, 1)
        second = verified.claim(store, 2)
    # alice's checks started first, so her oldest run goes first; then bob's, then hers again
    assert ahead == {alice[0]: 0, bob: 1, alice[1]: 2, alice[2]: 3}
    assert first == [alice[0]] and second == [bob, alice[1]]


def test_a_hidden_verified_run_says_hidden_in_the_export_and_on_the_board_not_zero_scored(tmp_path):
    with Store(tmp_path / "board.db") as store:
        store.record_score(store_result("a"), team="alice")
        publish_blind(store)
        run_id = insert_scored_run(store, headline=0.75)

        def exported():
            table = tables.export_table(tables.board(store.results()), tables.verified_summary(verified.results(store)))
            return table[table["track"] == "verified"].iloc[0]

        hidden = exported()
        assert pd.isna(hidden["scored"]) and pd.isna(hidden["reidentification"]) and hidden["band"] == tables.BLIND
        shown = tables.verified_runs(tables.verified_summary(verified.results(store)))
        assert shown["result"].tolist() == [f"scored; {tables.BLIND}"]
        assert (
            tables.to_records(
                tables.export_table(tables.board(store.results()), tables.verified_summary(verified.results(store)))
            )[-1]["scored"]
            is None
        )
        store.close_challenge("nc7-reid-00000001")
        closed = exported()
        assert (closed["run_id"], closed["scored"], closed["reidentification"], closed["band"]) == (
            run_id,
            1,
            0.75,
            "bad",
        )
        assert verified.results(store)["reidentification"].tolist() == [0.75]


def test_without_bubblewrap_the_verified_track_refuses_in_one_line(tmp_path):
    refused = cli(
        "leaderboard", "verify-builtins", "--challenge", "x", "--store", tmp_path, env={"PATH": str(tmp_path)}
    )
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
    assert "bubblewrap" in refused.stderr and "--unsandboxed" in refused.stderr


def test_a_sandbox_that_cannot_start_is_refused_without_host_paths(monkeypatch):
    """The refusal is the API's public 503 answer: bubblewrap's own words (which name the
    environment's path) go to the organizer's --check-sandbox only."""
    printed = "prlimit: failed to execute /srv/secret-store/venv/bin/python: No such file or directory"
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: "/usr/bin/bwrap")
    monkeypatch.setattr(sandbox, "_probe", lambda bwrap: ("bubblewrap cannot create a sandbox here", printed))
    with pytest.raises(sandbox.SandboxUnavailable) as refused:
        sandbox.require_sandbox(unsandboxed=False)
    assert "/srv" not in str(refused.value) and "--check-sandbox" in str(refused.value)
    assert printed in sandbox.sandbox_problem()


@pytest.mark.parametrize("form", ["file", "wheel", "sdist"])
def test_attack_check_runs_a_plugin_end_to_end_on_a_tiny_release(tmp_path, form):
    path = tmp_path / "mine.py"
    path.write_text(plugin_source("my-gram"))
    spec = {
        "file": f"{path}:Plugin",
        "wheel": f"{write_wheel(tmp_path / 'check_wheel-0.1-py3-none-any.whl', 'check_wheel')}:check_wheel.attack:Plugin",
        # Its setup.py raises if run: the sdist is read, never built.
        "sdist": f"{write_sdist(tmp_path / 'check_sdist-0.1.tar.gz', 'check_sdist')}:check_sdist.attack:Plugin",
    }[form]
    checked = cli("attack", "check", spec)
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.startswith("reid: ran end to end; the scorer accepted the submission")
    assert ("archive contents and dependencies" in checked.stdout) == (form != "file")


@pytest.mark.parametrize("case", HOSTILE_ARCHIVES)
def test_attack_check_refuses_a_hostile_archive_in_one_line_without_importing_it(archives, case):
    path, expected = archives[case]
    checked = cli("attack", "check", f"{path}:pkg.attack:Plugin", "--no-run")
    assert checked.exit_code == 2 and checked.stderr.count("\n") == 1, checked.output
    assert expected in checked.stderr
    assert "pkg" not in sys.modules


def test_an_sdist_whose_dependencies_only_a_build_could_list_is_refused(tmp_path):
    path = write_sdist(
        tmp_path / "dynamic-0.1.tar.gz",
        "dynamic",
        {"dynamic-0.1/pyproject.toml": '[project]\nname = "dynamic"\nversion = "0.1"\ndynamic = ["dependencies"]\n'},
    )
    checked = cli("attack", "check", f"{path}:dynamic.attack:Plugin", "--no-run")
    assert checked.exit_code == 2 and "dependencies as dynamic" in checked.stderr, checked.output


@pytest.mark.parametrize("field", ["dynamic = 5", "dynamic = [1]", "dependencies = 'numpy'"])
def test_an_sdist_whose_pyproject_fields_are_not_lists_of_strings_is_refused_in_one_line(tmp_path, field):
    path = write_sdist(
        tmp_path / "odd-0.1.tar.gz",
        "odd",
        {"odd-0.1/pyproject.toml": f'[project]\nname = "odd"\nversion = "0.1"\n{field}\n'},
    )
    checked = cli("attack", "check", f"{path}:odd.attack:Plugin", "--no-run")
    name = field.split(" ")[0]
    assert checked.exit_code == 2 and f"[project] {name} is not a list of strings" in checked.stderr, checked.output
    assert checked.stderr.count("\n") == 1


def test_an_archive_entry_must_be_a_module_of_the_archive(tmp_path):
    path = write_wheel(tmp_path / "outside-0.1-py3-none-any.whl", "outside")
    checked = cli("attack", "check", f"{path}:ncbench.attacks.gram_hungarian:GramHungarian", "--no-run")
    assert checked.exit_code == 2 and "has no module ncbench.attacks.gram_hungarian" in checked.stderr


@given(st.text(max_size=40))
def test_no_archive_member_name_lands_outside_the_extraction_folder(name):
    root = Path("/unpacked")
    try:
        relative = plugin_archive._member_path(name, "x.whl")
    except NcbenchError:
        return
    if relative is not None:
        target = Path(os.path.normpath(root.joinpath(*relative.parts)))
        assert target.is_relative_to(root) and target != root


@given(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20),
    st.from_regex(plugin_archive.MODULE_NAME, fullmatch=True),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
    st.sampled_from([".whl", ".tar.gz"]),
)
def test_a_plugin_spec_splits_from_the_right_whatever_the_path_holds(path, module, class_name, suffix):
    plugin = plugin_archive.parse_spec(f"{path}{suffix}:{module}:{class_name}")
    assert (str(plugin.path), plugin.module, plugin.class_name) == (str(Path(path + suffix)), module, class_name)
    assert plugin.kind == plugin_archive.archive_kind(suffix)


def test_attack_check_says_each_failure_in_one_line(tmp_path):
    path = tmp_path / "mine_too.py"
    path.write_text(plugin_source("my-gram"))
    checked = cli("attack", "check", f"{path}:Plugin", "--task", "invert", "--param", "nope=1", "--no-run")
    assert checked.exit_code == 2
    parameters = ", ".join(field.name for field in dataclasses.fields(GramHungarian.Params))
    assert checked.stderr.splitlines() == [
        f"error: attack my-gram has no parameter 'nope' (parameters: {parameters})",
        "error: attack my-gram does not solve the invert task (it declares reid)",
    ]
    taken = tmp_path / "taken.py"
    taken.write_text(plugin_source("gram-hungarian"))
    refused = cli("attack", "check", f"{taken}:Plugin", "--no-run")
    assert refused.exit_code == 2 and "gram-hungarian" in refused.stderr and refused.stderr.count("\n") == 1


def test_submit_plugin_names_the_module_of_an_archive(tmp_path):
    wheel = write_wheel(tmp_path / "named-0.1-py3-none-any.whl", "named")
    refused = cli("submit", "--plugin", f"{wheel}:Plugin", "--challenge", "x", env={"NCBENCH_TOKEN": "t"})
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
    assert "DIST.whl or DIST.tar.gz:module.path:Class" in refused.stderr


def test_submit_takes_a_file_or_a_plugin_not_both(tmp_path):
    for args in ([], [tmp_path / "sub.h5", "--plugin", "p.py:P"]):
        refused = cli("submit", *args, "--challenge", "x", env={"NCBENCH_TOKEN": "t"})
        assert refused.exit_code == 2 and "not both" in refused.stderr and refused.stderr.count("\n") == 1


# -- one control group per run -------------------------------------------------------------------


@pytest.fixture
def cgroups():
    if sandbox.sandbox_problem():
        pytest.skip("no bubblewrap sandbox here")
    if cgroup.available() is None:
        pytest.skip("the server may not create control groups here")


def test_a_runs_peak_memory_is_its_own_and_counts_its_tmpfs(cgroups, tmp_path):
    # 200 MB written to the tmpfs /tmp: no process's RSS shows it, the run's group does.
    fill = "open('/tmp/fill', 'wb').write(bytes(200 << 20))"
    limits = sandbox.parse_limits(["scratch_bytes=512M", "wall_s=60"])
    argv = sandbox.bwrap_argv(
        [sys.executable, "-c", fill], mounts=sandbox.environment_mounts(), limits=limits, uid=sandbox._sandbox_uid()
    )
    outcome = sandbox._execute(argv, limits, sandboxed=True, workdir=tmp_path)
    assert outcome.ok, outcome.output
    assert outcome.peak_rss_bytes >= 200 << 20
    assert not [group for _, parents in cgroup._parents() for p in parents for group in p.glob(f"{os.getpid()}-*")]


def test_a_run_over_its_groups_memory_ends_at_the_memory_limit(cgroups, tmp_path):
    # Two processes, each under its address-space limit, together over the run's memory.
    hog = (
        "import os; os.fork(); b = bytearray(600 << 20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(5)"
    )
    limits = sandbox.parse_limits(["memory_bytes=1G", "scratch_bytes=64M", "wall_s=60"])
    argv = sandbox.bwrap_argv(
        [sys.executable, "-c", hog], mounts=sandbox.environment_mounts(), limits=limits, uid=sandbox._sandbox_uid()
    )
    outcome = sandbox._execute(argv, limits, sandboxed=True, workdir=tmp_path)
    assert outcome.reason == sandbox.MEMORY_LIMIT, (outcome.reason, outcome.output)


def test_sandboxes_a_dead_server_left_behind_are_killed_at_the_next_start(cgroups):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = int(dead.stdout)
    left = subprocess.Popen(["sleep", "300"])
    folders = []
    for _, parents in cgroup._parents()[:1]:
        for parent in parents:
            parent.mkdir(exist_ok=True)
            folders.append(parent / f"{owner}-leftover")
            folders[-1].mkdir()
            (folders[-1] / "cgroup.procs").write_text(str(left.pid))
    assert cgroup.reap_leftovers() >= 1
    assert left.wait(timeout=10) == -9
    assert not any(folder.exists() for folder in folders)


def test_check_sandbox_says_which_protections_this_host_gives(cgroups):
    checked = cli("server", "--check-sandbox")
    assert checked.exit_code == 0, checked.output
    lines = checked.output.splitlines()
    assert all(line.startswith("yes promised") for line in lines if "promised" in line)
    assert any("control group" in line and line.startswith("yes") for line in lines)


def test_without_control_groups_check_sandbox_says_per_process_limits_only():
    """A non-root server without a delegated cgroup (the usual deployment on cgroup v1) still
    runs the verified track, and says what it lacks."""
    if sandbox.sandbox_problem():
        pytest.skip("no bubblewrap sandbox here")
    if cgroup.available() is not None:
        pytest.skip("this server may create control groups (tests/test_unprivileged.py runs this as nobody)")
    checked = cli("server", "--check-sandbox")
    assert checked.exit_code == 0, checked.output
    (line,) = [line for line in checked.output.splitlines() if "control group" in line]
    assert line.startswith("NO") and "per-process limits only" in line


LIMITS_PROBE = """\
import os, signal
try:
    bytearray(1 << 30)
except MemoryError:
    print("address space refused")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
try:
    open("/tmp/big", "wb").write(bytes(2 << 20))
except OSError:
    print("file size refused")
children = []
try:
    for _ in range(64):
        pid = os.fork()
        if pid == 0:
            signal.pause()
        children.append(pid)
except OSError:
    print("processes refused after", len(children))
for pid in children:
    os.kill(pid, signal.SIGKILL)
"""


def test_per_process_limits_hold_in_the_sandbox(tmp_path):
    """Address space, file size and process count: the limits every sandbox has, with or without
    a control group, as root or not."""
    if sandbox.sandbox_problem():
        pytest.skip("no bubblewrap sandbox here")
    limits = sandbox.parse_limits(["memory_bytes=512M", "file_bytes=1M", "processes=24", "threads=2", "wall_s=60"])
    argv = sandbox.bwrap_argv(
        [sys.executable, "-c", LIMITS_PROBE],
        mounts=sandbox.environment_mounts(),
        limits=limits,
        uid=sandbox._sandbox_uid(),
    )
    outcome = sandbox._execute(argv, limits, sandboxed=True, workdir=tmp_path)
    assert outcome.ok, outcome.output
    assert "address space refused" in outcome.output and "file size refused" in outcome.output
    (forks,) = [line for line in outcome.output.splitlines() if line.startswith("processes refused after")]
    assert int(forks.split()[-1]) < 24


def test_a_sandboxed_run_is_below_the_servers_cpu_priority(tmp_path):
    # A plugin that keeps every core busy must not hold the API's threads back, as a scorer child
    # does not: both run nice steps below the server.
    if sandbox.sandbox_problem():
        pytest.skip("no bubblewrap sandbox here")
    limits = sandbox.parse_limits(["wall_s=60"])
    argv = sandbox.bwrap_argv(
        [sys.executable, "-c", "import os; print(os.nice(0))"],
        mounts=sandbox.environment_mounts(),
        limits=limits,
        uid=sandbox._sandbox_uid(),
    )
    outcome = sandbox._execute(argv, limits, sandboxed=True, workdir=tmp_path)
    assert outcome.ok, outcome.output
    assert int(outcome.output.split()[-1]) == min(19, os.nice(0) + isolated.CHILD_NICENESS)


SYSCALL_PROBE = """\
import ctypes, threading, multiprocessing
libc = ctypes.CDLL(None, use_errno=True)
calls = {
    "unshare": lambda: libc.unshare(0x10000000),  # CLONE_NEWUSER
    "clone-newnet": lambda: libc.syscall(56, 0x40000000 | 17, 0, 0, 0, 0),  # clone(CLONE_NEWNET | SIGCHLD)
    "mount": lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None),
    "ptrace": lambda: libc.ptrace(16, 1, None, None),  # PTRACE_ATTACH
    "keyctl": lambda: libc.syscall(250, 0, 0, 0, 0, 0),
    "bpf": lambda: libc.syscall(321, 0, 0, 0),
    "perf_event_open": lambda: libc.syscall(298, 0, 0, -1, -1, 0),
    "userfaultfd": lambda: libc.syscall(323, 0),
}
for name, call in calls.items():
    ctypes.set_errno(0)
    result = call()
    print(name, result, ctypes.get_errno())
worker = multiprocessing.Process(target=print, args=("process ok",))
worker.start()
worker.join()
thread = threading.Thread(target=print, args=("thread ok",))
thread.start()
thread.join()
"""


@pytest.mark.skipif(not seccomp.available(), reason="pyseccomp or libseccomp is missing")
def test_the_seccomp_filter_denies_namespaces_mounts_tracing_keys_bpf_perf_and_userfaultfd(tmp_path):
    if sandbox.sandbox_problem() or os.uname().machine != "x86_64":
        pytest.skip("needs bubblewrap on x86_64 (the probe uses its syscall numbers)")
    limits = sandbox.parse_limits(["wall_s=60"])
    with seccomp.program() as fd:
        argv = sandbox.bwrap_argv(
            [sys.executable, "-c", SYSCALL_PROBE],
            mounts=sandbox.environment_mounts(),
            limits=limits,
            uid=sandbox._sandbox_uid(),
            seccomp_fd=fd,
        )
        outcome = sandbox._execute(argv, limits, sandboxed=True, workdir=tmp_path, pass_fds=(fd,))
    assert outcome.ok, outcome.output
    results = dict(line.split(" ", 1) for line in outcome.output.splitlines() if " " in line)
    for name in ("unshare", "clone-newnet", "mount", "ptrace", "keyctl", "bpf", "perf_event_open", "userfaultfd"):
        assert results[name] == "-1 1", (name, outcome.output)  # EPERM
    assert "process ok" in outcome.output and "thread ok" in outcome.output
