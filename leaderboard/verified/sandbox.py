"""Untrusted attack code in a bubblewrap sandbox, under limits (docs/server.md#the-verified-track).

One run is one process tree, started in a session of its own::

    bwrap                  namespaces: pid, net, ipc, uts, cgroup (and user, unless run as root)
      setpriv ...          root only: a fresh unprivileged uid, no capabilities, no groups
        prlimit ...        RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC
          sh -c '"$@" && cp /tmp/submission.h5 /out/submission.h5' sh \
            python -P -m ncbench.cli.sandboxed run PLUGIN.py:Class --release ... (= `ncbench attack run`)

What the sandbox sees: ``/usr`` (and ``/lib*``, ``/bin``, ``/sbin``), ``/etc/ld.so.cache``, the
Python environment and the ncbench packages at their own paths, all read-only; the one release at
:data:`RELEASE_INSIDE` and the plugin (a .py file in, or an unpacked archive's folder at,
:data:`PLUGIN_DIR_INSIDE`), read-only; a private tmpfs ``/tmp`` of ``scratch_bytes``; one writable
host file, :data:`OUT_INSIDE`. The root, ``/dev`` and everything else are read-only. No network
(an empty network namespace), no ``/etc/passwd``, and nothing else of the host: not the store,
the keys or the database. The release, the plugin and the submission are bound from hard links in
a fresh folder of the system's temporary directory (:func:`neutral_sources`), so that
``/proc/self/mountinfo``, which shows each bind's source path on its file system, names no folder
of the store.

Limits are set by ``prlimit(1)`` inside the sandbox, just before the runner starts. Inside,
because RLIMIT_NPROC counts a user's processes: outside, a non-root server's own threads would
count against it, and root is exempt from it, which is why a root server drops each run to a
fresh uid of its own (so one run's processes never count against another's limit). The host
kills the whole process group at the wall-clock limit or when the run prints more than
``output_bytes``; the pid namespace dies with its first process, so nothing that left the group
survives either. Wall time is measured by the host; CPU time and peak memory come from the
rusage of the reaped sandbox (``os.wait4``), which includes every process it waited for (a run
the host killed has none: only the wall time is known).
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from ncbench.errors import NcbenchError, one_line
from ncbench.leaderboard.isolated import CHILD_NICENESS
from ncbench.leaderboard.verified import cgroup, seccomp

RELEASE_INSIDE = "/challenge/release.h5"
PLUGIN_DIR_INSIDE = "/plugin"
OUT_INSIDE = "/out/submission.h5"
SCRATCH_INSIDE = "/tmp"
STAGING_PREFIX = "ncbench-sandbox-"  # + the server's pid: the neutral folder a run's files are bound from
# The runner: `ncbench attack ...` through its sandbox entry point (ncbench/cli/sandboxed.py); -P keeps the
# working folder, the plugin's writable /tmp, off sys.path.
RUNNER = ["-P", "-m", "ncbench.cli.sandboxed"]
# The runner writes to the tmpfs, then copies into the one writable host file: `attack run`
# writes atomically (a temporary sibling renamed into place), which a bind-mounted file forbids.
RUN_SCRIPT = '"$@" && cp /tmp/submission.h5 ' + OUT_INSIDE
NCBENCH_PACKAGES = (
    "ncbench",
    "ncbench.challenge",
    "ncbench.attacks",
    "ncbench.baselines",
    "ncbench.leaderboard",
    "ncbench.data_manifest",
)
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache",)  # what the dynamic loader needs; not /etc/passwd, not /etc/hosts
# A root server runs each sandbox as a random uid from this range (unused by Debian's subuid
# defaults, which start at 100000 and grow by 65536 per user).
SANDBOX_UID_BASE, SANDBOX_UID_SPAN = 1 << 24, 1 << 20
READ_CHUNK = 1 << 16
SHM_BYTES = 64 << 20  # the tmpfs /dev/shm
CPU_GRACE_S = 5


class SandboxUnavailable(NcbenchError):
    """bubblewrap is missing or cannot create namespaces here: the verified track refuses to run."""


class SandboxEnded(Exception):  # noqa: N818 - a state, not a mistake: nothing records it as one
    """The server is stopping (:func:`end_all`): this sandbox was ended, or never started. Not
    an NcbenchError, so no job records it: its run or check stays ``running`` in the database
    and is queued again at the next start."""


# The sandboxes this process runs, by the pid of their first process (the leader of their
# session), with their control group; and whether the process is ending them all.
_running: dict[int, cgroup.Cgroup | None] = {}
_running_lock = threading.Lock()
_ending = threading.Event()


@dataclass(frozen=True)
class Limits:
    """What one sandboxed run may use. Memory is address space (RLIMIT_AS), so a plugin's
    mapped libraries count too; the tmpfs ``/tmp`` (``scratch_bytes``) comes on top."""

    memory_bytes: int = 8 << 30
    cpu_s: int = 7200  # per process (RLIMIT_CPU)
    wall_s: float = 3600.0
    processes: int = 256  # processes and threads (RLIMIT_NPROC): torch's thread pools count
    file_bytes: int = 1 << 30  # largest file written, the submission included (RLIMIT_FSIZE)
    scratch_bytes: int = 2 << 30
    output_bytes: int = 1 << 20  # stdout + stderr; more kills the run
    threads: int = 4  # OMP / MKL / torch threads

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise NcbenchError(f"sandbox limit {field.name} must be positive, got {getattr(self, field.name)}")
        if self.processes <= self.threads:
            raise NcbenchError(f"sandbox processes ({self.processes}) must exceed threads ({self.threads})")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Limits:
        return cls(**json.loads(text))


SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_limits(items, base: Limits | None = None) -> Limits:
    """``name=value`` strings (``--sandbox-limit memory_bytes=2G``) applied to ``base``: the
    names are :class:`Limits` fields; byte sizes take a k, M or G suffix (powers of 1024)."""
    base = base or Limits()
    known = {field.name: field.type for field in dataclasses.fields(Limits)}
    changes: dict[str, float | int] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or name not in known:
            raise NcbenchError(f"--sandbox-limit must be NAME=VALUE with NAME one of {', '.join(known)}; got {item!r}")
        scale = SIZE_SUFFIXES.get(text[-1:].lower(), 1) if name.endswith("_bytes") else 1
        number = text[:-1] if scale != 1 else text
        try:
            value = float(number) * scale
        except ValueError:
            raise NcbenchError(f"--sandbox-limit {name}: {text!r} is not a number") from None
        changes[name] = value if name == "wall_s" else int(value)
    return dataclasses.replace(base, **changes)


@dataclass(frozen=True)
class Mount:
    """A host path shown at ``inside`` (read-only unless ``writable``)."""

    host: Path
    inside: str
    writable: bool = False


@dataclass(frozen=True)
class Outcome:
    """How one sandboxed run ended. ``reason`` is None when it succeeded, else one phrase of a
    fixed vocabulary (:data:`FAILURES`, an exception's name only when it is a built-in one): it is
    public, and nothing a plugin prints or raises reaches it but its choice among those words.
    ``detail`` is the plugin's own words (its error line), for its team only."""

    reason: str | None
    detail: str | None
    returncode: int
    output: str  # what it printed, at most ``output_bytes`` (decoded, invalid bytes replaced)
    wall_s: float
    cpu_s: float | None  # None when the host killed it: its processes were never reaped by bwrap
    peak_rss_bytes: int | None
    sandboxed: bool

    @property
    def ok(self) -> bool:
        return self.reason is None


# -- is there a sandbox? -----------------------------------------------------------------------


def sandbox_problem(*, detail: bool = True) -> str | None:
    """None when bubblewrap works here; otherwise why not, in one line. With ``detail``, what
    bubblewrap printed too, which may name host paths: for the organizer (``--check-sandbox``),
    never for an API answer."""
    path = shutil.which("bwrap")
    if path is None:
        return "bubblewrap (bwrap) is not installed (Debian: apt-get install bubblewrap)"
    failure = _probe(path)
    if failure is None:
        return None
    reason, printed = failure
    return f"{reason}: {printed}" if detail and printed else reason


@functools.cache
def _probe(bwrap: str) -> tuple[str, str] | None:
    """None when a sandbox runs this interpreter; else (why, in fixed words; what bwrap printed)."""
    command = bwrap_argv(
        [sys.executable, "-c", "pass"], mounts=environment_mounts(), limits=Limits(), bwrap=bwrap, uid=_sandbox_uid()
    )
    try:
        probe = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return "bubblewrap cannot start here", str(error)
    if probe.returncode != 0:
        printed = " ".join(probe.stderr.decode(errors="replace").split())[:200]
        # The two usual causes: no user namespaces, or an environment the sandbox's user cannot run.
        reason = (
            "bubblewrap cannot create a sandbox here (user namespaces disabled, or a Python environment "
            "that other users cannot read?)"
        )
        return reason, printed
    return None


def require_sandbox(*, unsandboxed: bool) -> None:
    """Refuse, in one line, to run plugins without a sandbox unless the organizer asked to. The
    message is public (the API answers 503 with it), so it names no host path; ``ncbench server
    --check-sandbox`` shows the organizer what bubblewrap printed."""
    if unsandboxed:
        return
    problem = sandbox_problem(detail=False)
    if problem:
        raise SandboxUnavailable(
            f"the verified track runs plugins only in a sandbox, and {problem} (ncbench server "
            "--check-sandbox says more); organizers testing locally may pass --unsandboxed (results "
            "are marked unsandboxed)"
        )


@dataclass(frozen=True)
class Protection:
    """One protection a sandboxed run gets on this host, or not: ``promised`` ones are what
    docs/security.md promises, and the verified track refuses to run without them."""

    name: str
    present: bool
    promised: bool
    how: str


def protections() -> list[Protection]:
    """What this host gives a sandboxed run (``ncbench server --check-sandbox``)."""
    problem = sandbox_problem()
    works = problem is None
    root = os.geteuid() == 0
    group = cgroup.available()
    return [
        Protection("namespaces (pid, net, ipc, uts, mount)", works, True, problem or "bubblewrap makes them"),
        Protection(
            "unprivileged identity",
            works,
            True,
            "root server: each run as a fresh uid, no capabilities (setpriv)"
            if root
            else "a user namespace with nesting disabled (--disable-userns)",
        ),
        Protection("per-process limits (address space, CPU, file size, processes)", works, True, "prlimit"),
        Protection("sized tmpfs /tmp and /dev/shm", works, True, "bwrap --size"),
        Protection(
            "one control group per run (memory incl. tmpfs, processes, peak, kill after a crash)",
            group is not None,
            False,
            group or "none: the server may not create cgroups here; per-process limits only",
        ),
        Protection(
            "seccomp filter (no new namespaces, mount, ptrace, keyctl, bpf, perf_event_open, userfaultfd)",
            seccomp.available(),
            False,
            "pyseccomp and libseccomp" if seccomp.available() else "none: pyseccomp or libseccomp is missing",
        ),
    ]


# -- the command line --------------------------------------------------------------------------


def environment_mounts() -> list[Mount]:
    """Read-only mounts of what the runner needs: the system libraries, the Python environment
    (``sys.prefix`` and the base interpreter's prefix) and the ncbench packages (an editable
    install keeps them outside the environment), each at its own path."""
    mounts = [Mount(Path("/usr"), "/usr")]
    for path in SYSTEM_FILES:
        if Path(path).is_file():
            mounts.append(Mount(Path(path), path))
    places = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    for package in NCBENCH_PACKAGES:
        spec = find_spec(package)
        places.update(Path(p).resolve() for p in (spec.submodule_search_locations or []))
    covered: list[Path] = [Path("/usr")]
    for place in sorted(places, key=lambda p: len(p.parts)):
        if not any(place == c or c in place.parents for c in covered):
            covered.append(place)
            mounts.append(Mount(place, str(place)))
    return mounts


def bwrap_argv(
    command: list[str],
    *,
    mounts: list[Mount],
    limits: Limits,
    bwrap: str = "bwrap",
    uid: int | None = None,
    seccomp_fd: int | None = None,
) -> list[str]:
    """The full command line of one sandboxed ``command`` (pure: tested without running it).

    ``uid``: when the server is root, the fresh unprivileged uid the run drops to (bwrap then
    runs privileged, without a user namespace, which could only map uid 0); None otherwise
    (bwrap makes a user namespace, and ``--disable-userns`` forbids nesting another).
    ``seccomp_fd``: a compiled filter (:func:`leaderboard.verified.seccomp.program`) that bwrap
    installs before it starts the command.
    """
    # --as-pid-1: bwrap then waits for the command itself, so its rusage (CPU time, peak memory)
    # reaches ours; with its own init it reports only an exit code.
    argv = [
        bwrap,
        "--die-with-parent",
        "--as-pid-1",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    if uid is None:
        argv += ["--unshare-user", "--disable-userns"]
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--size",
        str(SHM_BYTES),
        "--tmpfs",
        "/dev/shm",
        "--perms",
        "1777",
        "--size",
        str(limits.scratch_bytes),
        "--tmpfs",
        SCRATCH_INSIDE,
    ]
    made: set[Path] = set()
    for mount in mounts:
        # Every folder above a mount point is made traversable: bwrap makes missing ones 0700.
        for folder in reversed(Path(mount.inside).parents[:-1]):
            if folder not in made:
                argv += ["--perms", "0755", "--dir", str(folder)]
                made.add(folder)
        argv += ["--bind" if mount.writable else "--ro-bind", str(mount.host), mount.inside]
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--clearenv"]
    for name, value in sandbox_env(limits).items():
        argv += ["--setenv", name, value]
    argv += ["--chdir", SCRATCH_INSIDE]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    if uid is not None:
        argv += [
            "--cap-drop",
            "ALL",
            "--cap-add",
            "CAP_SETUID",
            "--cap-add",
            "CAP_SETGID",
            "--cap-add",
            "CAP_SETPCAP",
            "--",
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]
    else:
        argv += ["--"]
    return argv + prlimit_argv(limits, processes=True) + command


def prlimit_argv(limits: Limits, *, processes: bool) -> list[str]:
    # CPU: SIGXCPU at the soft limit (the run ends with a reason), SIGKILL a little later.
    cpu = f"--cpu={limits.cpu_s}:{limits.cpu_s + CPU_GRACE_S}"
    argv = ["prlimit", f"--as={limits.memory_bytes}", cpu, f"--fsize={limits.file_bytes}"]
    if processes:
        argv.append(f"--nproc={limits.processes}")
    return [*argv, "--"]


def sandbox_env(limits: Limits) -> dict[str, str]:
    """The whole environment of a run: nothing of the server's (no token, no database URL)."""
    threads = str(limits.threads)
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": SCRATCH_INSIDE,
        "TMPDIR": SCRATCH_INSIDE,
        "LANG": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
    }


def _sandbox_uid() -> int | None:
    return SANDBOX_UID_BASE + secrets.randbelow(SANDBOX_UID_SPAN) if os.geteuid() == 0 else None


# -- running -----------------------------------------------------------------------------------


def run_attack(
    *,
    attack: str,
    params: dict[str, str],
    release: Path,
    workdir: Path,
    limits: Limits,
    plugin: Path | None = None,
    sandboxed: bool = True,
) -> tuple[Outcome, Path]:
    """Run ``attack`` on ``release`` with ``ncbench attack run``: a built-in's name, or, with
    ``plugin``, the class name in that .py file or the ``module:Class`` in that folder (an
    unpacked archive). Returns the outcome and where the submission is (it exists only when the
    outcome is ok). ``workdir``: an empty host folder for this run.
    """
    out = workdir / "submission.h5"
    if not sandboxed:
        spec = f"{plugin}:{attack}" if plugin else attack
        argv = [sys.executable, *RUNNER, *_run_args(spec, params, release, out)]
        return _execute(prlimit_argv(limits, processes=False) + argv, limits, sandboxed=False, workdir=workdir), out
    uid = _sandbox_uid()
    _writable_file(out, uid)
    run_mounts = [Mount(release, RELEASE_INSIDE), Mount(out, OUT_INSIDE, writable=True)]
    spec = attack
    if plugin is not None:
        inside = plugin_inside(plugin)
        run_mounts.append(Mount(plugin, inside))
        spec = f"{inside}:{attack}"
    inner = [
        "sh",
        "-c",
        RUN_SCRIPT,
        "sh",
        sys.executable,
        *RUNNER,
        *_run_args(spec, params, Path(RELEASE_INSIDE), Path(SCRATCH_INSIDE) / "submission.h5"),
    ]
    with seccomp.program() as fd, neutral_sources(run_mounts) as staged:
        mounts = [*environment_mounts(), *staged]
        outcome = _execute(
            bwrap_argv(inner, mounts=mounts, limits=limits, bwrap=_bwrap(), uid=uid, seccomp_fd=fd),
            limits,
            sandboxed=True,
            workdir=workdir,
            pass_fds=() if fd is None else (fd,),
        )
    if outcome.ok and out.stat().st_size == 0:
        outcome = dataclasses.replace(outcome, reason=NO_SUBMISSION)
    return outcome, out


def check_plugin(
    *,
    plugin: Path,
    class_name: str,
    params: dict[str, str],
    task: str,
    workdir: Path,
    limits: Limits,
    sandboxed: bool = True,
) -> tuple[Outcome, dict | None]:
    """``ncbench attack check --no-run --json`` on ``plugin`` in the sandbox (importing a plugin
    runs its code): a .py file and its ``class_name``, or a folder (an unpacked archive) and its
    ``module:Class``. Returns the outcome and, when it passed, the declarations (attack, version,
    tasks, knowledge) as the host read them from the source (:mod:`.declarations`): the plugin's
    process can print anything, so its report only has to agree with them, and a report that
    does not is a failed check. NcbenchError when the source declares nothing readable."""
    from ncbench.leaderboard.verified.declarations import read_declarations

    declared = read_declarations(plugin, class_name)

    def command(path: str) -> list[str]:
        # sh stays as the sandbox's first process: signals (SIGXCPU) then end python as they should.
        args = [
            "sh",
            "-c",
            '"$@"',
            "sh",
            sys.executable,
            *RUNNER,
            "check",
            f"{path}:{class_name}",
            "--no-run",
            "--json",
            "--task",
            task,
        ]
        return args + [item for name, value in params.items() for item in ("--param", f"{name}={value}")]

    from ncbench.attacks.plugins import CHECK_MARK

    with (
        seccomp.program() as fd,
        neutral_sources([Mount(plugin, plugin_inside(plugin))] if sandboxed else []) as staged,
    ):
        if sandboxed:
            argv = bwrap_argv(
                command(plugin_inside(plugin)),
                mounts=[*environment_mounts(), *staged],
                limits=limits,
                bwrap=_bwrap(),
                uid=_sandbox_uid(),
                seccomp_fd=fd,
            )
        else:
            argv = prlimit_argv(limits, processes=False) + command(str(plugin))
        passed = () if fd is None or not sandboxed else (fd,)
        outcome = _execute(argv, limits, sandboxed=sandboxed, workdir=workdir, pass_fds=passed)
    if not outcome.ok:
        return outcome, None
    for line in reversed(outcome.output.splitlines()):
        if line.startswith(CHECK_MARK):
            try:
                report = json.loads(line[len(CHECK_MARK) :])
            except ValueError:
                break
            if report == declared:
                return outcome, declared
            return dataclasses.replace(outcome, reason=DECLARATIONS_DIFFER, detail=DECLARATIONS_DIFFER), None
    return dataclasses.replace(outcome, reason=NO_REPORT), None


@contextlib.contextmanager
def neutral_sources(mounts: list[Mount]) -> Iterator[list[Mount]]:
    """The same mounts, their host sources hard-linked into a fresh folder of the system's
    temporary directory (``TMPDIR``), removed afterwards.

    A bind mount's source shows in the sandbox's ``/proc/self/mountinfo`` as its path on its file
    system, and the store's paths (``keys/verified/run-7/...``) say where the store is and what
    it holds. The folder is named after the server's pid, so a later run removes what a killed
    server left. A hard link is the same file under a neutral name, written through in place; where
    the temporary directory is another file system the source is copied instead (a release as
    large as it is: put ``TMPDIR`` on the store's file system to avoid that), and a writable file
    is copied back when the run ends.
    """
    _remove_dead_staging()
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
    copied_back: list[tuple[Path, Path]] = []
    try:
        staged = []
        for index, mount in enumerate(mounts):
            target = staging / f"{index}-{Path(mount.inside).name}"
            if mount.host.is_dir():
                # symlinks stay links (resolved inside, as before): never a copy of what they point to
                shutil.copytree(mount.host, target, symlinks=True, copy_function=_link_or_copy)
            elif not _link_or_copy(mount.host, target) and mount.writable:
                copied_back.append((target, mount.host))
            staged.append(dataclasses.replace(mount, host=target))
        yield staged
    finally:
        for target, host in copied_back:
            shutil.copyfile(target, host)
        shutil.rmtree(staging, ignore_errors=True)


def _remove_dead_staging() -> None:
    """Remove the staging folders of servers that died mid-run (their ``finally`` never ran):
    their hard links would keep deleted evaluation releases on disk."""
    for folder in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        owner = folder.name.removeprefix(STAGING_PREFIX).partition("-")[0]
        if owner.isdigit() and not cgroup.process_alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Hard-link ``source`` at ``target``, or copy it (with its owner and mode) where they are on
    different file systems. True when linked."""
    try:
        os.link(source, target)
        return True
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):  # another file system, or no link allowed
            raise
        shutil.copy2(source, target)
        stat = os.stat(source)
        if os.geteuid() == 0:
            os.chown(target, stat.st_uid, stat.st_gid)
        return False


def plugin_inside(plugin: Path) -> str:
    """Where the sandbox shows a plugin: a .py file under :data:`PLUGIN_DIR_INSIDE`, a folder (an
    unpacked archive, which the runner puts on sys.path) as that folder itself."""
    return PLUGIN_DIR_INSIDE if plugin.is_dir() else f"{PLUGIN_DIR_INSIDE}/{plugin.name}"


def _run_args(spec: str, params: dict[str, str], release: Path, out: Path) -> list[str]:
    args = ["run", spec, "--release", str(release), "--out", str(out), "--device", "cpu", "--seed", "0"]
    args += ["--trust-release"]  # the track's own fresh release: no check in the sandbox
    return args + [item for name, value in params.items() for item in ("--param", f"{name}={value}")]


def _bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(sandbox_problem() or "bubblewrap is not installed")
    return path


def _writable_file(path: Path, uid: int | None) -> None:
    """An empty file only the sandbox's uid can write: the one host file a run may write to."""
    handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        if uid is not None:
            os.fchown(handle, uid, uid)
    finally:
        os.close(handle)


def _execute(
    argv: list[str], limits: Limits, *, sandboxed: bool, workdir: Path, pass_fds: tuple[int, ...] = ()
) -> Outcome:
    """Start ``argv`` in a session of its own, read at most ``output_bytes`` of its output, kill
    its process group at the wall-clock or output limit, reap it and measure it."""
    # bwrap clears the environment inside; an unsandboxed run gets the same one, HOME aside.
    env = (
        {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if sandboxed
        else {**sandbox_env(limits), "HOME": str(workdir), "TMPDIR": str(workdir)}
    )
    # The run's own control group (leaderboard/verified/cgroup.py), where the host gives one: all
    # its processes and its tmpfs pages under one memory limit, its peak, and a kill that reaches
    # every process even after the server died.
    group = cgroup.create(memory_bytes=run_memory_bytes(limits), processes=limits.processes) if sandboxed else None
    if group is not None:
        argv = group.enter_command() + argv
    # Batch work, as the scorer's children: below the server's CPU priority, so that the API's
    # answers do not wait behind a plugin that keeps every core busy.
    argv = ["nice", "-n", str(CHILD_NICENESS), *argv]
    started = time.monotonic()
    with _running_lock:  # end_all() either sees this sandbox or keeps it from starting
        if _ending.is_set():
            if group is not None:
                group.kill_and_remove()
            raise SandboxEnded("the server is stopping")
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=workdir,
            env=env,
            pass_fds=pass_fds,
        )
        _running[process.pid] = group
    try:
        output, killed_for = bytearray(), None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                left = started + limits.wall_s - time.monotonic()
                if left <= 0:
                    killed_for = WALL_LIMIT
                    break
                if not selector.select(timeout=min(left, 1.0)):
                    continue
                chunk = os.read(process.stdout.fileno(), READ_CHUNK)
                if not chunk:
                    break
                if len(output) + len(chunk) > limits.output_bytes:
                    output += chunk[: limits.output_bytes - len(output)]
                    killed_for = OUTPUT_LIMIT
                    break
                output += chunk
        if killed_for:
            _kill_group(process.pid)
        process.stdout.close()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    finally:
        with _running_lock:
            _running.pop(process.pid, None)
    if _ending.is_set():  # set before end_all() killed anything: a run it ended never looks like a failure
        if group is not None:
            group.kill_and_remove()
        raise SandboxEnded("the server is stopping")
    wall = time.monotonic() - started
    text = output.decode(errors="replace")
    measured = killed_for is None
    reason, detail = (killed_for, _detail(text)) if killed_for else _reason(process.returncode, text, limits)
    peak = int(usage.ru_maxrss) * 1024 if measured else None
    if group is not None:
        if group.oom_killed():  # any process of the run, even one whose parent carried on
            reason, detail = MEMORY_LIMIT, detail or "the kernel killed a process at the run's memory limit"
        peak = group.peak_bytes() or peak
        group.kill_and_remove()
    return Outcome(
        reason=reason,
        detail=detail,
        returncode=process.returncode,
        output=text,
        wall_s=round(wall, 3),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 3) if measured else None,
        peak_rss_bytes=peak,
        sandboxed=sandboxed,
    )


def run_memory_bytes(limits: Limits) -> int:
    """What a whole run may hold at once in its control group: a process's address space, the
    tmpfs /tmp and /dev/shm (their pages are charged to the group)."""
    return limits.memory_bytes + limits.scratch_bytes + SHM_BYTES


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def end_all() -> int:
    """End every sandbox this process runs, and start none from now on: the server is stopping
    (``ncbench server``'s first SIGTERM or Ctrl-C). Each one's process group and control group
    get SIGKILL (the pid namespace dies with its first process, so nothing of it survives,
    whatever uid it runs as); :func:`_execute` then raises :class:`SandboxEnded` in the job that
    started it, which records nothing, so the run or check is queued again at the next start.
    Returns how many were ended. Irreversible: only for a process about to end."""
    _ending.set()
    with _running_lock:  # held while killing: a pid is forgotten only once reaped
        running = list(_running.items())
        for pid, _ in running:
            _kill_group(pid)
    for _, group in running:
        if group is not None:
            group.kill_and_remove()  # what left the process group (setsid) but not the control group
    return len(running)


# The public vocabulary of failures: a run's reason is one of these, or EXCEPTION_PREFIX and the
# name of a built-in exception class. Each is one of about 80 choices (about 6 bits) that a plugin
# can make by raising, printing or exhausting a limit on purpose (docs/security.md).
WALL_LIMIT = "wall-clock limit"
OUTPUT_LIMIT = "output limit"
MEMORY_LIMIT = "memory limit"
SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit",
    signal.SIGXFSZ: "file size limit",
    signal.SIGKILL: "killed (SIGKILL)",
}
EXCEPTION_PREFIX = "exception "
PLUGIN_EXCEPTION = "exception of the plugin's own class"
NCBENCH_ERROR = "an ncbench error (the plugin's declarations, parameters or output)"
ERROR_EXIT = "exited with an error"
KILLED = "killed by a signal"
NO_SUBMISSION = "the run wrote no submission"
INVALID_SUBMISSION = "invalid submission"
NO_REPORT = "the check printed no report"
SANDBOX_DETAIL_LIMIT = 500  # characters kept of a run's own error lines: the plugin's text
DECLARATIONS_DIFFER = "the imported class does not declare what its source says"
BUILTIN_EXCEPTIONS = frozenset(
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
)
FAILURES = frozenset(
    {
        WALL_LIMIT,
        OUTPUT_LIMIT,
        MEMORY_LIMIT,
        *SIGNAL_REASONS.values(),
        PLUGIN_EXCEPTION,
        NCBENCH_ERROR,
        ERROR_EXIT,
        KILLED,
        NO_SUBMISSION,
        INVALID_SUBMISSION,
        NO_REPORT,
        DECLARATIONS_DIFFER,
    }
    | {EXCEPTION_PREFIX + name for name in BUILTIN_EXCEPTIONS}
)
# `attack NAME failed: TypeName: message` (attacks/runner.py failure_of, attacks/registry.py); printed by the plugin's own
# process, so only the type's name is taken, and only when it names a built-in exception.
FAILURE_LINE = re.compile(
    r"(?:attack \S+ (?:failed|returned a submission that cannot be written)|plugin (?:file|module) \S+ failed to import)"
    r": ([A-Za-z_]\w*):"
)


def public_reason(error_line: str) -> str:
    """The public reason for the runner's ``error:`` line (plugin-controlled text in, one word
    of :data:`FAILURES` out)."""
    match = FAILURE_LINE.match(error_line)
    if match is None:
        return NCBENCH_ERROR
    name = match.group(1)
    if name == "MemoryError":  # RLIMIT_AS: an allocation failed
        return MEMORY_LIMIT
    return EXCEPTION_PREFIX + name if name in BUILTIN_EXCEPTIONS else PLUGIN_EXCEPTION


def _reason(returncode: int, output: str, limits: Limits) -> tuple[str | None, str | None]:
    """(public reason, team's detail) of a run's end, or (None, None) when it succeeded: the
    CLI's last ``error:`` line when there is one, else the signal that ended it (bwrap and sh
    report a signal as 128 + its number)."""
    if returncode == 0:
        return None, None
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    if errors:
        return public_reason(errors[-1]), one_line("; ".join(errors), SANDBOX_DETAIL_LIMIT)
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else None
    if number is not None:
        return SIGNAL_REASONS.get(number, KILLED), _detail(output)
    return ERROR_EXIT, one_line(
        f"exit status {returncode}: {lines[-1] if lines else 'no output'}", SANDBOX_DETAIL_LIMIT
    )


def _detail(output: str) -> str | None:
    """The last ``error:`` line a run printed (e.g. a fork bomb's, held at the process limit until
    the clock ran out), for its team."""
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    return one_line(errors[-1].removeprefix("error: "), SANDBOX_DETAIL_LIMIT) if errors else None
