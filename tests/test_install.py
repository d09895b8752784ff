"""The attacker's plain install: the wheel without extras, in a fresh virtual environment, can build
and attack a release, check a plugin and reach the submit command; organizer commands name the
extra they need.

The environment is a real, empty venv. The wheel goes in with ``--no-deps``; its declared base
requirements (and theirs, recursively: nothing from an extra) are made visible from this test's
own environment through a folder of links, so that no package is downloaded, and ``pip check``
proves those declarations are complete. Anything the code imports beyond them fails here.
"""

import importlib.metadata
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DIST = "neuracrypt-bench"


def _base_distributions(name: str, extras: frozenset = frozenset(), seen: set | None = None) -> set[str]:
    """``name`` and every distribution its requirements pull in, markers evaluated here."""
    seen = set() if seen is None else seen
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return seen
    seen.add(key)
    for line in importlib.metadata.requires(name) or []:
        requirement = Requirement(line)
        wanted = [{"extra": extra} for extra in extras] or [{"extra": ""}]
        if requirement.marker is None or any(requirement.marker.evaluate(env) for env in wanted):
            _base_distributions(requirement.name, frozenset(requirement.extras), seen)
    return seen


def _link_farm(names: set[str], farm: Path) -> None:
    """Links to the installed files of each distribution in ``names`` (not of ours)."""
    farm.mkdir()
    for dist in importlib.metadata.distributions():
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key not in names or key == DIST:
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (farm / top).exists():
                (farm / top).symlink_to(source)


@pytest.fixture(scope="module")
def plain_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain-install")
    wheels = root / "wheels"
    # Build from a copy: setuptools leaves build/ behind, and a stale build/ leaks into later wheels.
    source = root / "source"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "demo-out", "runs")
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", wheels, source],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert built.returncode == 0, built.stderr
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    _link_farm(_base_distributions(DIST), root / "base")
    (site / "base-requirements.pth").write_text(str(root / "base") + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    installed = subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", "--no-index", *wheels.glob("*.whl")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    return {"python": python, "ncbench": env_dir / "bin" / "ncbench", "pip": pip, "root": root}


def _run(env, *args, **kwargs):
    return subprocess.run(
        [str(env["ncbench"]), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=env["root"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(env["root"])},
        **kwargs,
    )


def test_the_plain_install_declares_everything_it_needs(plain_env):
    check = subprocess.run([*plain_env["pip"], "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_plain_install_has_no_organizer_dependencies(plain_env):
    probe = "import importlib.util as u; print([m for m in ('streamlit', 'fastapi', 'uvicorn', 'distributed', 'pyseccomp', 'sqlalchemy') if u.find_spec(m)])"
    found = subprocess.run([plain_env["python"], "-c", probe], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stdout + found.stderr


def test_the_plain_install_builds_attacks_and_checks(plain_env):
    tiny = ["--width", "32", "--image-size", "32", "--patch-size", "8", "--bn-batch", "8", "--device", "cpu"]
    built = _run(
        plain_env,
        "challenge",
        "build",
        "--preset",
        "nc3",
        "--n",
        "16",
        "--test-release",
        "--seed",
        "1",
        "--out",
        "rel",
        *tiny,
    )
    assert built.returncode == 0, built.stderr
    ran = _run(
        plain_env, "attack", "run", "gram-hungarian", "--release", "rel", "--out", "sub.h5", "--param", "self_width=32"
    )
    assert ran.returncode == 0 and "wrote sub.h5" in ran.stdout, ran.stderr
    checked = _run(plain_env, "attack", "check", "chance", "--task", "reid")
    assert checked.returncode == 0 and checked.stdout.startswith("reid: ran end to end"), (
        checked.stdout + checked.stderr
    )
    helped = _run(plain_env, "submit", "--help")
    assert helped.returncode == 0 and "--challenge" in helped.stdout, helped.stderr


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (["server", "--store", "store"], "server"),
        (["leaderboard", "export", "--db", "board.db"], "board"),
        (["demo", "--out", "demo-out"], "all"),
    ],
)
def test_organizer_commands_name_the_extra_they_need(plain_env, command, extra):
    refused = _run(plain_env, *command)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: this command needs the '{extra}' extra ({refused.stderr.split('(')[1].split(' is')[0]} is not installed): "
        f"pip install 'neuracrypt-bench[{extra}]'"
    ]
    assert "Traceback" not in refused.stderr
