"""A server killed with SIGKILL while a verified run is in its sandbox, then started again.

The sandbox must not outlive the crash unchecked: it dies with the server (a non-root server's
bubblewrap has --die-with-parent) or the next start kills it (a root server's runs change uid,
which clears that signal; their control group, named after the dead server, is found and
killed). The restarted server runs the interrupted run again, never beside its old copy, and the
run finishes once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from test_server import Server, ncbench

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


@pytest.mark.slow
def test_a_run_killed_with_its_server_is_never_left_behind_or_run_twice_and_finishes_once(tmp_path):
    problem = sandbox.sandbox_problem()
    if problem:
        pytest.skip(problem)
    built = ncbench(
        "challenge", "build", "--preset", "nc3", "--task", "reid", "--source", "phantom", "--n", 16, *TINY,
        "--out", tmp_path / "release",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    store = tmp_path / "store"
    published = ncbench("challenge", "publish", tmp_path / "release", "--store", store)
    assert published.returncode == 0, published.stderr
    challenge_id = published.stdout.split()[-1]
    token = ncbench("team", "add", "dora", "--store", store).stdout.strip()
    options = ["--workers", 2, "--board-port", 0, "--verified-releases", 1, *LIMITS]
    server = Server(store, *options)
    plugin = tmp_path / PLUGIN_FILE
    until = time.time() + SLEEP_UNTIL_S
    plugin.write_text(SLEEPER.format(until=until))
    try:
        queued = httpx.post(
            f"{server.url}/api/v1/challenges/{challenge_id}/plugins",
            params={"class": "Plugin", "filename": plugin.name},
            content=plugin.read_bytes(),
            headers={"Authorization": f"Bearer {token}"},
            timeout=300,
        )
        assert queued.status_code == 202, queued.text
        run_id = queued.json()["id"]
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
            state = Store(store / "leaderboard.db", create=False)
            view = verified.run_view(state, run_id, team="dora")
            state.close()
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
