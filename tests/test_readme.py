"""Every command of the README's "Run a challenge" and "Take part" blocks runs, as a new organizer
and a new attacker would type them: the organizer's until the server runs, then the attacker's,
then the organizer's again.

Sizes shrink (tiny encoder, few images, one epoch) and ports are free ones; nothing else changes.
Long-running servers are started, checked over HTTP and stopped.
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NCBENCH = str(Path(sys.executable).with_name("ncbench"))
TINY = ["--width", "32", "--image-size", "32", "--patch-size", "8", "--bn-batch", "8"]
SMALL_UTILITY = ["--n-train", "48", "--n-test", "32", "--width", "32", "--image-size", "32", "--epochs", "1"]


def section_commands(text: str, heading: str) -> list[str]:
    """The commands of every bash block under ``heading``, without comments."""
    section = text[text.index(heading) + len(heading) :]
    section = section[: section.find("\n## ")] if "\n## " in section else section
    lines = []
    for block in section.split("```bash")[1:]:
        for line in block[: block.index("```")].splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    organizer = section_commands(text, "## Run a challenge")
    serve = next(i for i, line in enumerate(organizer) if line.startswith("ncbench server")) + 1
    return organizer[:serve] + section_commands(text, "## Take part") + organizer[serve:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{url}: the server exited with {process.returncode}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError(f"{url} never answered")


def test_every_readme_command_runs(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 14
    chexpert = tmp_path / "chexpert"
    chexpert.mkdir()
    rng = np.random.default_rng(0)
    for k in range(16):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(chexpert / f"view{k}.png")
    template = (REPO / "attacks" / "template.py").read_text()
    # A plugin declares itself in literals in its own class body (the server reads them there).
    (tmp_path / "my_attack.py").write_text(
        template
        + '\n\nclass MyAttack(MeanPatchNearest):\n    name = "my-attack"\n    version = "0.1"\n'
        + '    tasks = ("reid",)\n    knowledge = ("architecture", "plaintext-pool")\n'
    )
    env = {**os.environ}
    servers: list[subprocess.Popen] = []
    challenge_id = None
    ran = 0
    try:
        for line in commands:
            line = line.replace("/data/chexpert", str(chexpert))
            if challenge_id:
                line = line.replace("CHALLENGE_ID", challenge_id)
            if line.startswith("export "):
                token = (tmp_path / "my-team.token").read_text().strip()
                env["NCBENCH_TOKEN"] = token  # the server URL was set when the server started
                ran += 1
                continue
            redirect = None
            if " > " in line:
                line, redirect = (part.strip() for part in line.split(" > "))
            args = shlex.split(line)
            assert args[0] == "ncbench", line
            args[0] = NCBENCH
            if args[1:3] == ["challenge", "build"]:
                args[args.index("--n") + 1] = "12"
                args += TINY
            if args[1:3] == ["baseline", "utility"]:
                args += SMALL_UTILITY
            if args[1] == "submit" and "--plugin" in args:
                args.append("--no-wait")  # the verified run itself is the verified track's tests' business
            if args[1] == "server" or args[1:3] == ["leaderboard", "serve"]:
                port = free_port()
                if "--port" not in args:
                    args += ["--port", "0"]
                args[args.index("--port") + 1] = str(port)
                if args[1] == "server":
                    args += ["--board-port", "0"]
                    env["NCBENCH_SERVER"] = f"http://127.0.0.1:{port}"
                process = subprocess.Popen(
                    args,
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                servers.append(process)
                wait_for(f"http://127.0.0.1:{port}/" + ("healthz" if args[1] == "server" else ""), process)
                ran += 1
                continue
            result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{line}\n{result.stderr}"
            if redirect:
                (tmp_path / redirect).write_text(result.stdout)
            if args[1] == "challenges":
                challenge_id = result.stdout.splitlines()[1].split()[0]  # under the table's header
            ran += 1
    finally:
        for process in servers:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    assert ran == len(commands)
