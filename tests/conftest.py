import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _own_cache_folder(tmp_path_factory):
    """The record of checked releases (ncbench.checked) in the test run's own folder, not the user's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny_images():
    """(12, 32, 32) uint8 random-texture images for tiny encoder configurations."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 32, 32), dtype=np.uint8)


# -- PostgreSQL, for the stores and servers that run on it -------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on a Unix socket, or a skip saying why there is none."""
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install '.[postgres]')")
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if initdb is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
    bin_dir = Path(initdb).resolve().parent
    prefix = []
    folder = Path(tempfile.mkdtemp(prefix="ncbench-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root and runuser is missing: cannot start PostgreSQL as another user")
        try:
            shutil.chown(folder, user="postgres")
        except (LookupError, PermissionError):
            shutil.rmtree(folder)
            pytest.skip("running as root with no 'postgres' user to start PostgreSQL as")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    try:
        subprocess.run(
            [*prefix, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "ncbench", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                *prefix,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(folder / "log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-k {folder} -p {port} -c listen_addresses='' -c fsync=off",
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=90,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {error}")
    try:
        yield f"postgresql+psycopg://ncbench@/postgres?host={folder}&port={port}"
    finally:
        subprocess.run(
            [*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(folder, ignore_errors=True)


# -- `ncbench demo` at a small size, shared by its own tests and the board's browser test --------

SMALL_DEMO_UTILITY = {"n_train": 48, "n_test": 48, "width": 32, "image_size": 32, "patch_size": 8, "epochs": 1}
SMALL_DEMO_SIZE = {"width": 64, "image_size": 64, "patch_size": 4}  # still the presets' 256 patches


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory):
    """``ncbench demo --n 8`` twice into one folder (the second run reuses everything), with the
    encoders and the utility at a tiny size: (folder, first result, the store's counts after it,
    second result)."""
    from click.testing import CliRunner

    import ncbench.cli.demo as demo_module
    from ncbench.cli import main
    from ncbench.leaderboard.store import Store

    out = tmp_path_factory.mktemp("demo") / "out"
    command = ["demo", "--out", str(out), "--n", "8", "--device", "cpu"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_module, "UTILITY", SMALL_DEMO_UTILITY)
        patch.setattr(demo_module, "DEMO_SIZE", SMALL_DEMO_SIZE)
        first = CliRunner().invoke(main, command)
        with Store(out / "leaderboard.db") as store:
            counts = store.counts()
        again = CliRunner().invoke(main, command)
    return out, first, counts, again
