"""One control group per sandboxed run: a memory limit over everything the run holds (its
processes and its tmpfs pages together), a process limit over the whole tree, the run's own peak
memory, and a way to kill every process of it, even one a dead server left behind.

cgroup v2 where the server's own group delegates ``memory`` and ``pids`` to it; else cgroup v1's
``memory`` and ``pids`` hierarchies where the server may create groups (root, usually). Groups
live under ``ncbench-sandbox/`` below the server's own group, named ``SERVERPID-TOKEN``, so a
server starting after one that was killed finds and kills what the dead one left
(:func:`reap_leftovers`) before it runs anything again. Where neither is available,
:func:`create` returns None and the run keeps its per-process rlimits only
(``ncbench server --check-sandbox`` says so).
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
SELF = Path("/proc/self/cgroup")  # the server's own groups: "ID:CONTROLLERS:PATH" lines
PARENT = "ncbench-sandbox"
KILL_ROUNDS = 50


@dataclass(frozen=True)
class Cgroup:
    """One run's group: ``dirs`` are its folder in each hierarchy (one for v2, memory and pids for v1)."""

    version: int
    dirs: tuple[Path, ...]

    @property
    def memory_dir(self) -> Path:
        return self.dirs[0]

    def enter_command(self) -> list[str]:
        """A prefix that moves the command into this group before it starts (``sh`` writes its own
        pid, then execs): every process the run makes is born inside."""
        writes = " && ".join(f'echo $$ > "{d}/cgroup.procs"' for d in self.dirs)
        return ["sh", "-c", f'{writes} && exec "$@"', "sh"]

    def peak_bytes(self) -> int | None:
        """The most memory the group held at once: its processes and its tmpfs pages."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.memory_dir / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the group at its memory limit."""
        if self.version == 2:
            events = _read_pairs(self.memory_dir / "memory.events")
            return events.get("oom_kill", 0) > 0
        return _read_pairs(self.memory_dir / "memory.oom_control").get("oom_kill", 0) > 0

    def kill_and_remove(self) -> None:
        """SIGKILL every process of the group, then remove it."""
        for folder in self.dirs:
            kill_and_remove(folder, self.version)


def create(*, memory_bytes: int, processes: int) -> Cgroup | None:
    """A fresh group with these limits, or None where this host gives the server none."""
    name = f"{os.getpid()}-{secrets.token_hex(4)}"
    for version, parents in _parents():
        made: list[Path] = []
        try:
            for parent in parents:
                parent.mkdir(exist_ok=True)
                if version == 2:
                    (parent / "cgroup.subtree_control").write_text("+memory +pids")
                folder = parent / name
                folder.mkdir()
                made.append(folder)
            group = Cgroup(version, tuple(made))
            if version == 2:
                (group.memory_dir / "memory.max").write_text(str(memory_bytes))
                (group.memory_dir / "memory.swap.max").write_text("0")
                (group.memory_dir / "pids.max").write_text(str(processes))
            else:
                (made[0] / "memory.limit_in_bytes").write_text(str(memory_bytes))
                _try_write(made[0] / "memory.memsw.limit_in_bytes", str(memory_bytes))  # no swap either
                (made[1] / "pids.max").write_text(str(processes))
            return group
        except OSError:
            for folder in made:
                _rmdir(folder)
    return None


def available() -> str | None:
    """``"cgroup v2"`` or ``"cgroup v1 (memory, pids)"`` when runs get a group here, else None."""
    group = create(memory_bytes=64 << 20, processes=8)
    if group is None:
        return None
    group.kill_and_remove()
    return "cgroup v2" if group.version == 2 else "cgroup v1 (memory, pids)"


def reap_leftovers() -> int:
    """Kill and remove every group a server that is no longer running left behind (its sandboxes
    outlived it); returns how many. A server calls it once at start, before it runs anything."""
    reaped = 0
    for version, parents in _parents():
        for parent in parents:
            if not parent.is_dir():
                continue
            for folder in parent.iterdir():
                owner = folder.name.partition("-")[0]
                if folder.is_dir() and owner.isdigit() and not process_alive(int(owner)):
                    kill_and_remove(folder, version)
                    reaped += 1
    return reaped


def kill_and_remove(folder: Path, version: int) -> None:
    if version == 2 and (folder / "cgroup.kill").exists():
        _try_write(folder / "cgroup.kill", "1")
    for _ in range(KILL_ROUNDS):
        pids = _pids(folder)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    _rmdir(folder)


def _parents() -> list[tuple[int, list[Path]]]:
    """(version, the ``ncbench-sandbox`` folders a run's group goes under), v2 first."""
    own: dict[str, str] = {}
    try:
        for line in SELF.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    except OSError:
        return []
    found = []
    if "" in own:
        unified = ROOT / "unified" if (ROOT / "unified" / "cgroup.controllers").exists() else ROOT
        here = unified / own[""].lstrip("/")
        controllers = _read(here / "cgroup.controllers").split()
        if {"memory", "pids"} <= set(controllers):
            found.append((2, [here / PARENT]))
    if "memory" in own and "pids" in own and (ROOT / "memory").is_dir() and (ROOT / "pids").is_dir():
        found.append(
            (
                1,
                [
                    ROOT / "memory" / own["memory"].lstrip("/") / PARENT,
                    ROOT / "pids" / own["pids"].lstrip("/") / PARENT,
                ],
            )
        )
    return found


def _pids(folder: Path) -> list[int]:
    return [int(word) for word in _read(folder / "cgroup.procs").split() if word.isdigit()]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _read_pairs(path: Path) -> dict[str, int]:
    pairs = {}
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            pairs[name] = int(value)
    return pairs


def _try_write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError:
        pass


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
