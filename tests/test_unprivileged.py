"""The sandbox tests again, as an unprivileged user: the usual deployment runs the server as one.

Run as root, this runs a subset of tests/test_verified.py (isolation and mount paths, the
per-process limits, seccomp, --check-sandbox without control groups) under ``setpriv`` as
``nobody``, where bubblewrap makes a user namespace instead of dropping to a fresh uid, and no
cgroup is delegated. It needs an interpreter and environment that ``nobody`` can read, as a
deployment's are: ``sys.executable``, or ``NCBENCH_UNPRIVILEGED_PYTHON`` (for instance a
world-readable copy of a virtual environment whose interpreter lives under ``/root``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ncbench.leaderboard.verified import sandbox

NOBODY = 65534
REPO = Path(__file__).resolve().parent.parent
SUBSET = " or ".join(
    [
        "test_mountinfo_inside_names_no_folder_of_the_store_or_the_work_dir",
        "test_the_sandbox_shows_nothing_of_the_host",
        "test_per_process_limits_hold_in_the_sandbox",
        "test_the_seccomp_filter_denies",
        "test_without_control_groups_check_sandbox_says_per_process_limits_only",
    ]
)

# Whether nobody can start a sandbox with this interpreter: the sandbox mounts the environment
# where it is, and runs it there.
PROBE = """\
import sys
from ncbench.leaderboard.verified.sandbox import sandbox_problem
problem = sandbox_problem()
print(problem or "ok")
sys.exit(problem is not None)
"""


def as_nobody(*argv: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(home), "LANG": "C.UTF-8"}
    if "LD_LIBRARY_PATH" in os.environ:  # a copied interpreter may need its own libpython
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return subprocess.run(command, capture_output=True, text=True, cwd=home, env=env, timeout=timeout)


@pytest.fixture
def nobody_python() -> Iterator[tuple[str, Path]]:
    if os.geteuid() != 0:
        pytest.skip("the suite already runs unprivileged: tests/test_verified.py is the unprivileged run")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")
    if sandbox.sandbox_problem():
        pytest.skip("no bubblewrap sandbox here")
    # Not under pytest's own temporary folder, which only root may enter.
    home = Path(tempfile.mkdtemp(prefix="ncbench-nobody-"))
    os.chown(home, NOBODY, NOBODY)
    try:
        python = os.environ.get("NCBENCH_UNPRIVILEGED_PYTHON", sys.executable)
        probe = as_nobody(python, "-c", PROBE, home=home, timeout=120)
        if probe.returncode != 0:
            problem = " ".join((probe.stdout or probe.stderr).split())[-300:]
            pytest.skip(
                f"nobody cannot run a sandbox with {python} ({problem}): the environment must be readable "
                "by nobody, as a deployment's is; set NCBENCH_UNPRIVILEGED_PYTHON to such an interpreter"
            )
        yield python, home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def pytest_as_nobody(python: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    return as_nobody(
        python,
        *("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--rootdir={REPO}", f"--basetemp={home / 'pytest'}"),
        *args,
        home=home,
        timeout=600,
    )


def test_the_sandbox_tests_pass_as_an_unprivileged_user(nobody_python):
    python, home = nobody_python
    ran = pytest_as_nobody(python, home, str(REPO / "tests" / "test_verified.py"), "-k", SUBSET)
    summary = ran.stdout.strip().splitlines()[-1] if ran.stdout.strip() else ran.stderr
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    # The two mount-path cases, isolation, limits, seccomp where pyseccomp is installed, and the
    # --check-sandbox line where no cgroup is delegated: none of them may skip for lack of root.
    assert passed >= 4, ran.stdout[-3000:]
    assert "root" not in " ".join(line for line in ran.stdout.splitlines() if line.startswith("SKIPPED")), ran.stdout


@pytest.mark.slow
def test_a_non_root_servers_sandbox_dies_with_it(nobody_python):
    """tests/test_verified_crash.py as nobody: --die-with-parent holds, so the sandbox dies with
    the killed server, before any restart."""
    python, home = nobody_python
    ran = pytest_as_nobody(python, home, "-m", "slow", str(REPO / "tests" / "test_verified_crash.py"))
    assert ran.returncode == 0 and "1 passed" in ran.stdout, ran.stdout[-3000:] + ran.stderr[-2000:]
