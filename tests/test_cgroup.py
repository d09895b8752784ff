"""leaderboard/verified/cgroup.py on cgroup v2, against a fake cgroup2 tree.

The hosts these tests run on have had cgroup v1 only, so the v2 path is exercised here on plain
folders and files: which folder a run's group goes in, what is written to it (limits, the
controllers enabled, cgroup.kill, cgroup.procs) and what is read back (peak, OOM kills). What a
real cgroup2 file system does with those writes (enforcing memory.max and pids.max, charging
tmpfs pages, refusing to enable controllers in a group that holds processes) is not tested.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ncbench.leaderboard.verified import cgroup

SERVICE = "system.slice/ncbench.service"


@pytest.fixture
def here(tmp_path, monkeypatch):
    """The server's own group in a fake v2 hierarchy that delegates memory and pids to it."""
    root = tmp_path / "cgroup"
    group = root / SERVICE
    group.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (group / "cgroup.controllers").write_text("cpu memory pids\n")
    own = tmp_path / "self-cgroup"
    own.write_text(f"0::/{SERVICE}\n")
    monkeypatch.setattr(cgroup, "ROOT", root)
    monkeypatch.setattr(cgroup, "SELF", own)
    return group


def test_a_v2_run_group_goes_under_ncbench_sandbox_in_the_servers_own_group(here):
    assert cgroup._parents() == [(2, [here / cgroup.PARENT])]


def test_without_memory_and_pids_delegated_there_is_no_v2_group(here):
    (here / "cgroup.controllers").write_text("cpu\n")
    assert cgroup._parents() == []


def test_a_v2_group_gets_its_limits_and_no_swap(here):
    group = cgroup.create(memory_bytes=3 << 30, processes=77)
    assert group is not None and group.version == 2
    (folder,) = group.dirs
    assert folder.parent == here / cgroup.PARENT and folder.name.startswith(f"{os.getpid()}-")
    assert (here / cgroup.PARENT / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (folder / "memory.max").read_text() == str(3 << 30)
    assert (folder / "memory.swap.max").read_text() == "0"
    assert (folder / "pids.max").read_text() == "77"


def test_a_command_enters_the_group_before_it_starts(here):
    group = cgroup.create(memory_bytes=1 << 30, processes=8)
    ran = subprocess.run(
        [*group.enter_command(), sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    # sh writes its own pid and then execs: the command runs as that very process.
    assert (group.memory_dir / "cgroup.procs").read_text().split() == [ran.stdout.strip()]


def test_peak_and_oom_kills_are_read_from_memory_peak_and_memory_events(here):
    group = cgroup.create(memory_bytes=1 << 30, processes=8)
    assert group.peak_bytes() is None and not group.oom_killed()
    (group.memory_dir / "memory.peak").write_text("123456789\n")
    (group.memory_dir / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    assert group.peak_bytes() == 123456789 and group.oom_killed()


def test_a_dead_servers_v2_group_is_killed_through_cgroup_kill_and_its_processes(here):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = subprocess.Popen(["sleep", "300"])
    leftover = here / cgroup.PARENT / f"{int(dead.stdout)}-leftover"
    leftover.mkdir(parents=True)
    (leftover / "cgroup.kill").write_text("0")
    (leftover / "cgroup.procs").write_text(f"{left.pid}\n")
    ours = cgroup.create(memory_bytes=1 << 30, processes=8)  # a live server's group stays
    assert cgroup.reap_leftovers() == 1
    assert (leftover / "cgroup.kill").read_text() == "1"
    assert left.wait(timeout=10) == -9
    assert ours.memory_dir.is_dir() and (ours.memory_dir / "pids.max").read_text() == "8"
