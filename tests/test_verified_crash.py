"""A server killed with SIGKILL, or stopped with SIGTERM, while a verified run is in its
sandbox, then started again.

The sandbox must not outlive the crash unchecked: it dies with the server (a non-root server's
bubblewrap has --die-with-parent) or the next start kills it (a root server's runs change uid,
which clears that signal; their control group, named after the dead server, is found and
killed). A SIGTERM ends the sandbox, root's too, before the server exits. The restarted server
runs the interrupted run again, never beside its old copy, and the run finishes once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from test_server import Server, ncbench

from ncbench.leaderboard.server import service
from ncbench.leaderboard.store import Store
from ncbench.leaderboard.verified import runs as verified
from ncbench.leaderboard.verified import sandbox

TINY = ["--width", "64", "--image-size", "32", "--patch-size", "8", "--bn-batch", "8"]
LIMITS = ["--sandbox-limit", "wall_s=120", "--sandbox-limit", "threads=1", "--sandbox-limit", "memory_bytes=2G"]
# The plugin sleeps until this many seconds after its upload, whichever copy runs: the first
# copy, killed with the server, would still be asleep when the restarted server runs the second
# one (which then sleeps only what is left), so two copies at once would show.
SLEEP_UNTIL_S = 90
PLUGIN_FILE = "sleeper_after_crash.py"
SLEEPER = """\
import time

from ncbench.attacks.gram_hungarian import GramHungarian

UNTIL = {until}


class Plugin(GramHungarian):
    name = "sleeper"
    version = "1.0"
    tasks = ("reid",)
    knowledge = ("architecture", "self-sampled-keys", "plaintext-pool")
    description = "Sleeps, then attacks: long enough to be killed mid-run."

    def run(self, release):
        time.sleep(max(0.0, UNTIL - time.time()))
        return super().run(release)
"""


def sandboxed_runs() -> set[int]:
    """Pids of the sandboxed runner processes of this plugin's runs (not its admission check)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # The runner itself (python -P -m ncbench.cli.sandboxed run ...), not bwrap or sh around it.
        runner = words[1:5] == [b"-P", b"-m", b"ncbench.cli.sandboxed", b"run"]
        if runner and any(PLUGIN_FILE.encode() in word for word in words):
            found.add(int(entry.name))
    return found


def wait_for(condition, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def published_store(tmp_path: Path) -> tuple[Path, str, str]:
    """A tiny reid challenge published in a fresh store, and a token of team dora: (store, id, token)."""
    built = ncbench(
        "challenge", "build", "--preset", "nc3", "--task", "reid", "--source", "phantom", "--n", 16, *TINY,
        "--out", tmp_path / "release",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    store = tmp_path / "store"
    published = ncbench("challenge", "publish", tmp_path / "release", "--store", store)
    assert published.returncode == 0, published.stderr
    token = ncbench("team", "add", "dora", "--store", store).stdout.strip()
    return store, published.stdout.split()[-1], token


def upload_sleeper(server: Server, challenge_id: str, token: str, plugin: Path, until: float) -> int:
    """Upload the plugin that sleeps until ``until``; returns its run's id."""
    plugin.write_text(SLEEPER.format(until=until))
    queued = httpx.post(
        f"{server.url}/api/v1/challenges/{challenge_id}/plugins",
        params={"class": "Plugin", "filename": plugin.name},
        content=plugin.read_bytes(),
        headers={"Authorization": f"Bearer {token}"},
        timeout=300,
    )
    assert queued.status_code == 202, queued.text
    return queued.json()["id"]


def run_view(store: Path, run_id: int) -> dict:
    opened = Store(store / "leaderboard.db", create=False)
    try:
        return verified.run_view(opened, run_id, team="dora")
    finally:
        opened.close()


def sandbox_uid_processes() -> set[int]:
    """Pids of every live process running as a sandbox's uid (a root server's runs): a whole
    run's tree. A zombie (killed, not yet reaped by the init it was handed to) is not live."""
    found = set()
    low, high = sandbox.SANDBOX_UID_BASE, sandbox.SANDBOX_UID_BASE + sandbox.SANDBOX_UID_SPAN
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uids, state = fields.get("Uid", "").split(), fields.get("State", "").strip()
        if uids and low <= int(uids[0]) < high and not state.startswith("Z"):
            found.add(int(entry.name))
    return found


OPTIONS = ["--board-port", 0, "--verified-releases", 1, *LIMITS]


@pytest.mark.slow
def test_a_run_killed_with_its_server_is_never_left_behind_or_run_twice_and_finishes_once(tmp_path):
    problem = sandbox.sandbox_problem()
    if problem:
        pytest.skip(problem)
    store, challenge_id, token = published_store(tmp_path)
    options = OPTIONS
    server = Server(store, *options)
    plugin = tmp_path / PLUGIN_FILE
    until = time.time() + SLEEP_UNTIL_S
    try:
        run_id = upload_sleeper(server, challenge_id, token, plugin, until)
        first = wait_for(sandboxed_runs, 120, "the run's sandbox")
        server.process.send_signal(signal.SIGKILL)  # the server process only: its sandboxes are in their own session
        server.process.wait(timeout=30)
        server.log.close()
        if os.geteuid() != 0:  # --die-with-parent holds where the uid is unchanged
            wait_for(lambda: not (sandboxed_runs() & first), 15, "the sandbox to die with its server")

        server = Server(store, *options)
        seen_together, after = [], set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            now = sandboxed_runs()
            if now & first and now - first:
                seen_together.append(now)
            if now - first and not after:
                assert time.time() < until, "the restart took longer than the plugin sleeps: nothing to compare"
            after |= now - first
            view = run_view(store, run_id)
            if view["state"] in ("scored", "failed"):
                break
            time.sleep(0.1)
        assert not seen_together, "the restarted server ran the run beside its old copy"
        assert not (sandboxed_runs() & first), "the old sandbox outlived the restart"
        assert view["state"] == "scored", view
        assert len(after) == 1, f"the run ran {len(after)} times after the restart"
        assert [e["idx"] for e in view["evaluations"]] == [0]
    finally:
        if server.process.poll() is None:
            server.stop()


@pytest.mark.slow
def test_sigterm_ends_a_runs_sandbox_with_the_server_and_the_restart_scores_it_once(tmp_path):
    """A root server's sandbox changes uid, so nothing of the kernel's ends it with the server:
    the server ends it itself on SIGTERM, within its stop budget, and leaves the run ``running``
    for the next start."""
    problem = sandbox.sandbox_problem()
    if problem:
        pytest.skip(problem)
    store, challenge_id, token = published_store(tmp_path)
    server = Server(store, *OPTIONS)
    try:
        run_id = upload_sleeper(server, challenge_id, token, tmp_path / PLUGIN_FILE, time.time() + SLEEP_UNTIL_S)
        first = wait_for(sandboxed_runs, 120, "the run's sandbox")
        tree = sandbox_uid_processes() if os.geteuid() == 0 else set()
        assert os.geteuid() != 0 or first <= tree
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=30)
        server.log.close()
        assert time.monotonic() - started < service.STOP_BUDGET_S
        assert server.process.returncode == 0
        assert not sandboxed_runs() and not (sandbox_uid_processes() & tree), "a sandbox outlived its server"
        assert "Traceback" not in Path(server.log.name).read_text()
        assert run_view(store, run_id)["state"] == "running"  # not failed: queued again at the next start

        server = Server(store, *OPTIONS)
        again = wait_for(sandboxed_runs, 60, "the run's sandbox after the restart")
        view = wait_for(lambda: (v := run_view(store, run_id))["state"] in ("scored", "failed") and v, 180, "the run")
        assert view["state"] == "scored", view
        assert len(again) == 1 and [e["idx"] for e in view["evaluations"]] == [0]
    finally:
        if server.process.poll() is None:
            server.stop()
