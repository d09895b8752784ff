"""benchmarks/load.py runs end to end at a tiny size: a real server, its mixed traffic, a vlen bomb
and slowloris connections, and the reconciliation of every 202 with the jobs table."""

import json
import subprocess
import sys
from pathlib import Path

LOAD = Path(__file__).parent.parent / "benchmarks" / "load.py"


def test_the_load_benchmark_runs_and_reconciles_every_accepted_upload(tmp_path):
    done = subprocess.run(
        [sys.executable, str(LOAD), "--clients=4", "--seconds=4", "--slowloris=3", "--bomb-every=60",
         f"--out={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["requests"] > 20 and result["server_errors"] == 0 and result["client_errors"] == 0
    assert result["server_exit_code_during_run"] is None
    assert result["accepted_without_a_job"] == 0
    assert result["uploads_accepted"] == result["accepted_ids_distinct"] >= 1  # the bomb at least
    assert sum(result["bomb_jobs"].values()) == 1
    assert {"healthz", "whoami", "submissions"} <= set(result["p99_ms"])
    assert result["database"] == "sqlite"  # the store's own file, read back from the engine
