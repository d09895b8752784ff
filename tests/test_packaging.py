"""The installed layout: one ``ncbench`` namespace, so a user's own ``attacks/`` folder and ours
never shadow each other, and a plain (non-editable) install works."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ncbench.attacks.submission import read_submission
from ncbench.challenge.encoders import resolve_config
from ncbench.challenge.release import BuildPlan, build_release

REPO = Path(__file__).resolve().parents[1]
NCBENCH = Path(sys.executable).with_name("ncbench")


def test_plugin_in_a_user_folder_named_attacks_loads_and_runs(tmp_path):
    # The user's project has its own `attacks` package; the plugin imports from both.
    project = tmp_path / "project"
    (project / "attacks").mkdir(parents=True)
    (project / "attacks" / "__init__.py").write_text("")
    (project / "attacks" / "helpers.py").write_text("GREETING = 'from the user package'\n")
    (project / "attacks" / "mine.py").write_text(
        textwrap.dedent("""
        from attacks.helpers import GREETING
        from ncbench.attacks import Attack, Release, Submission

        class Mine(Attack):
            name = "user-attack"
            version = "1"
            tasks = ("reid",)
            knowledge = ("architecture",)
            description = GREETING

            def run(self, release: Release) -> Submission:
                ids = release.plain_ids
                return Submission(release.challenge_id, self.name, self.version, release.encoded_ids,
                                  mapping=list(ids[: release.n_encoded]), diagnostics={"said": GREETING})
    """)
    )
    release = tmp_path / "release"
    build_release(
        release,
        config=resolve_config("nc3", width=32, image_size=32, patch_size=8, bn_batch=8),
        plan=BuildPlan.for_task("reid", 8),
        source="phantom",
    )
    ran = subprocess.run(
        [str(NCBENCH), "attack", "run", "attacks/mine.py:Mine", "--release", str(release), "--out", "sub.h5"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert read_submission(project / "sub.h5").diagnostics["said"] == "from the user package"
    # ...and ncbench's own attacks are still found while the user's package shadows `attacks`.
    builtins = subprocess.run(
        [str(NCBENCH), "attack", "list"], cwd=project, capture_output=True, text=True, timeout=120
    )
    assert builtins.returncode == 0 and "gram-hungarian" in builtins.stdout, builtins.stderr


def test_non_editable_install_imports_every_package_from_site_packages(tmp_path):
    # Build from a copy: setuptools leaves build/ behind, and a stale build/ would leak into later builds.
    source = tmp_path / "source"
    shutil.copytree(
        REPO, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "demo-out", "runs")
    )
    target = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"no build backend in this environment: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr
    probe = textwrap.dedent("""
        import sys, importlib
        for name in ("ncbench", "ncbench.challenge.encoders", "ncbench.attacks", "ncbench.baselines.utility",
                     "ncbench.leaderboard.store", "ncbench.data_manifest.manifest"):
            module = importlib.import_module(name)
            assert module.__file__.startswith(sys.argv[1]), (name, module.__file__)
        from ncbench.challenge.sample import SAMPLE_MANIFEST
        assert SAMPLE_MANIFEST.is_file() and str(SAMPLE_MANIFEST).startswith(sys.argv[1])
        assert "attacks" not in sys.modules and "challenge" not in sys.modules
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", probe, str(target)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
