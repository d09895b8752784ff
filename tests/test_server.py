"""The live challenge: a real `ncbench server` on a free localhost port, driven by the CLI and HTTP."""

import concurrent.futures
import functools
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import h5py
import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from test_store import challenge as store_challenge
from test_store import publish_blind
from test_store import result as store_result

from ncbench.cli import main
from ncbench.leaderboard import store as store_module
from ncbench.leaderboard import tables, workqueue
from ncbench.leaderboard.server import channel
from ncbench.leaderboard.server import client as client_module
from ncbench.leaderboard.store import Store, jobs, submissions

NCBENCH = str(Path(sys.executable).with_name("ncbench"))
TINY = ["--width", "32", "--image-size", "32", "--patch-size", "8", "--bn-batch", "8"]
TEAMS = ("alice", "bob", "carol", "dave", "erin")
DAILY_LIMIT = 3


def ncbench(*args, cwd=None, env=None, timeout=300):
    return subprocess.run(
        [NCBENCH, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def build_tiny_release(out: Path) -> None:
    """A 16-image nc3 reid challenge at a tiny width, built through the CLI with a fresh key."""
    built = ncbench(
        "challenge", "build", "--preset", "nc3", "--task", "reid", "--source", "phantom", "--n", 16, *TINY, "--out", out
    )
    assert built.returncode == 0, built.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`ncbench server` in a subprocess of its own process group."""

    def __init__(self, store: Path, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(store.parent / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [NCBENCH, "server", "--store", str(store), "--port", str(self.port), *map(str, extra)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            assert self.process.poll() is None, Path(self.log.name).read_text()
        raise AssertionError("server did not start: " + Path(self.log.name).read_text())

    def stop(self, sig=signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    build_tiny_release(root / "release")
    store = root / "store"
    published = ncbench("challenge", "publish", root / "release", "--store", store, "--daily-limit", DAILY_LIMIT)
    assert published.returncode == 0, published.stderr
    challenge_id = published.stdout.split()[-1]
    tokens = {}
    for team in TEAMS:
        added = ncbench("team", "add", team, "--store", store)
        assert added.returncode == 0, added.stderr
        tokens[team] = added.stdout.strip()
    server = Server(store, "--score-workers", "2", "--board-port", "0")
    yield {"root": root, "store": store, "id": challenge_id, "tokens": tokens, "server": server}
    if server.process.poll() is None:
        server.stop()


def client_env(world, team):
    return {"NCBENCH_SERVER": world["server"].url, "NCBENCH_TOKEN": world["tokens"][team]}


def chance_submissions(world, count: int, folder: Path) -> list[Path]:
    """``count`` distinct submission files (chance attack, different seeds)."""
    folder.mkdir(exist_ok=True)
    release = world["root"] / "release" / "public" / "release.h5"
    paths = []
    for seed in range(count):
        path = folder / f"chance-{seed}.h5"
        ran = ncbench("attack", "run", "chance", "--release", release, "--seed", seed, "--out", path)
        assert ran.returncode == 0, ran.stderr
        paths.append(path)
    return paths


def db(world) -> Store:
    return Store(world["store"] / "leaderboard.db", create=False)


def api_client(db_path: Path, store_root: Path):
    """The API app over HTTP in this process (Starlette's test client), no workers."""
    from ncbench.leaderboard.server.api import create_app

    with warnings.catch_warnings():  # the test client's own notice about its httpx dependency
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    return TestClient(create_app(str(db_path), store_root))


def test_a_blind_challenge_tells_the_submitter_scored_but_no_score_until_the_close(tmp_path):
    db_path, layout = tmp_path / "board.db", workqueue.StoreLayout(tmp_path / "store")
    layout.root.mkdir()
    with Store(db_path) as store:
        with store._write() as conn:
            store._ensure_challenge(conn, store_challenge(), store_module.utc_now())
        publish_blind(store)
        _, token = channel.add_team(store, "alice", key=channel.token_key(layout))
        answer = store_result("a")
        job_id = channel.enqueue(
            store, team="alice", challenge_id=answer.challenge.challenge_id, sha256=answer.sha256, size=9
        )
        store.record_score(answer, team="alice", daily_limit=None, job_id=job_id)
        channel.finish(store, job_id, "scored", submission_id=job_id)
        with api_client(db_path, layout.root) as client:
            client.headers["Authorization"] = f"Bearer {token}"
            hidden = client.get(f"/api/v1/submissions/{job_id}").json()
            assert hidden["state"] == "scored" and hidden["scores_hidden"] and hidden["public"] is None
            assert (hidden["id"], hidden["submission_id"]) == (job_id, job_id)
            assert client.get("/api/v1/submissions").json() == [hidden]
            store.close_challenge(answer.challenge.challenge_id)
            shown = client.get(f"/api/v1/submissions/{job_id}").json()
            assert not shown["scores_hidden"] and shown["public"]["reid_accuracy"] == 0.5


def test_a_queued_submission_says_how_many_jobs_are_ahead_of_it(tmp_path):
    """A sign of life for a submission that waits: its place in the queue, every team's jobs
    counted, which moves as the workers claim the ones before it."""
    db_path, layout = tmp_path / "board.db", workqueue.StoreLayout(tmp_path / "store")
    layout.root.mkdir()
    with Store(db_path) as store:
        with store._write() as conn:
            store._ensure_challenge(conn, store_challenge(), store_module.utc_now())
        publish_blind(store)  # any published challenge will do
        tokens = {team: channel.add_team(store, team, key=channel.token_key(layout))[1] for team in ("alice", "bob")}
        challenge_id = store_challenge().challenge_id
        queued = [
            channel.enqueue(store, team=team, challenge_id=challenge_id, sha256=f"{k:064x}", size=9)
            for k, team in enumerate(("bob", "alice", "bob", "alice"))
        ]
        with api_client(db_path, layout.root) as client:

            def ahead(job_id: int, team: str) -> int | None:
                answer = client.get(
                    f"/api/v1/submissions/{job_id}", headers={"Authorization": f"Bearer {tokens[team]}"}
                )
                return answer.json()["queue_ahead"]

            assert [ahead(queued[1], "alice"), ahead(queued[3], "alice")] == [1, 3]
            assert channel.claim(store, 2) == queued[:2]
            assert [ahead(queued[1], "alice"), ahead(queued[3], "alice")] == [None, 1]  # running: no place
    assert client_module.wait_line({"state": "queued", "queue_ahead": 0}) == "queued, next in the queue"
    assert client_module.wait_line({"state": "checking", "queue_ahead": 2}) == "checking, 2 ahead in the queue"
    assert client_module.wait_line({"state": "running", "queue_ahead": None}) == "running"


def test_fetch_attack_submit_and_score_end_to_end(world, tmp_path):
    env = client_env(world, "alice")
    listed = ncbench("challenges", env=env)
    assert listed.returncode == 0 and world["id"] in listed.stdout
    fetched = ncbench("fetch", world["id"], "--out", tmp_path / "got", env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert "sha256 checked" in fetched.stdout
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == ["SHA256SUMS", "release.h5"]
    ran = ncbench(
        "attack",
        "run",
        "gram-hungarian",
        "--release",
        tmp_path / "got" / "release.h5",
        "--out",
        tmp_path / "sub.h5",
        env=env,
    )
    assert ran.returncode == 0, ran.stderr
    submitted = ncbench("submit", tmp_path / "sub.h5", "--challenge", world["id"], env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert "scored: public half" in submitted.stdout and "reid_accuracy" in submitted.stdout
    listed = ncbench("submissions", env=env)
    assert "scored" in listed.stdout
    # Run and submit in one step.
    both = ncbench(
        "attack",
        "run",
        "chance",
        "--release",
        tmp_path / "got" / "release.h5",
        "--out",
        tmp_path / "chance.h5",
        "--submit",
        env=env,
    )
    assert both.returncode == 0, both.stderr
    assert "wrote" in both.stdout and "scored: public half" in both.stdout


def test_fetch_resumes_a_partial_download_and_checks_sha256(world, tmp_path):
    env = client_env(world, "alice")
    original = (world["root"] / "release" / "public" / "release.h5").read_bytes()
    out = tmp_path / "got"
    out.mkdir()
    (out / ".release.h5.part").write_bytes(original[:1000])  # an interrupted download
    fetched = ncbench("fetch", world["id"], "--out", out, env=env)
    assert fetched.returncode == 0, fetched.stderr
    assert (out / "release.h5").read_bytes() == original
    # A corrupt partial file is caught by the checksum, not reported as done.
    (out / "release.h5").unlink()
    (out / ".release.h5.part").write_bytes(b"x" * 1000)
    refetched = ncbench("fetch", world["id"], "--out", out, env=env)
    assert refetched.returncode == 2 and "does not match" in refetched.stderr
    assert not (out / "release.h5").exists()


def test_the_key_is_never_served(world):
    url = world["server"].url
    for path in (
        f"/api/v1/challenges/{world['id']}/files/key.h5",
        f"/api/v1/challenges/{world['id']}/files/..%2F..%2Fkeys%2F{world['id']}%2Fkey.h5",
        "/api/v1/challenges/..%2Fkeys/files/key.h5",
    ):
        assert httpx.get(url + path).status_code == 404


def test_a_published_file_is_served_only_as_a_regular_file(world):
    """A range of the real file is 206 with its published sha256; a symbolic link put in its place
    in the store (to a key, say) is 404, not followed."""
    url = f"{world['server'].url}/api/v1/challenges/{world['id']}/files/release.h5"
    served = world["store"] / "public" / world["id"] / "release.h5"
    assert served == workqueue.StoreLayout(world["store"]).public_dir(world["id"]) / "release.h5"
    answer = httpx.get(url, headers={"Range": "bytes=0-9"})
    assert answer.status_code == 206 and answer.content == served.read_bytes()[:10]
    assert answer.headers["x-content-sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
    moved = served.with_name("moved.h5")
    served.rename(moved)
    try:
        served.symlink_to(moved)
        assert httpx.get(url).status_code == 404
    finally:
        served.unlink(missing_ok=True)
        moved.rename(served)
    assert httpx.get(url, headers={"Range": "bytes=0-9"}).status_code == 206


def test_wrong_missing_and_revoked_tokens_get_401_and_one_line(world, tmp_path):
    sub = chance_submissions(world, 1, tmp_path / "subs")[0]
    url = world["server"].url
    for headers in ({}, {"Authorization": "Bearer ncb_1_wrong"}, {"Authorization": "Basic abc"}):
        answer = httpx.post(f"{url}/api/v1/challenges/{world['id']}/submissions", content=b"x", headers=headers)
        assert answer.status_code == 401
    env = {"NCBENCH_SERVER": url, "NCBENCH_TOKEN": "ncb_2_not-the-token"}
    refused = ncbench("submit", sub, "--challenge", world["id"], env=env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "refused the token" in refused.stderr
    added = ncbench("team", "add", "mallory", "--store", world["store"])
    token = added.stdout.strip()
    assert ncbench("submissions", env={"NCBENCH_SERVER": url, "NCBENCH_TOKEN": token}).returncode == 0
    assert ncbench("team", "revoke", "mallory", "--store", world["store"]).returncode == 0
    revoked = ncbench("submissions", env={"NCBENCH_SERVER": url, "NCBENCH_TOKEN": token})
    assert revoked.returncode == 2 and "refused the token" in revoked.stderr


def test_team_list_takes_json(world):
    listed = ncbench("team", "list", "--store", world["store"], "--json")
    assert listed.returncode == 0, listed.stderr
    teams = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(TEAMS) <= set(teams) and all(teams[name]["active_tokens"] == 1 for name in TEAMS)


def test_a_scheduler_that_does_not_answer_is_one_line(tmp_path):
    quick = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    args = ("server", "--store", tmp_path / "store", "--port", free_port(), "--board-port", "0")
    started = ncbench(*args, "--scheduler", "tcp://127.0.0.1:1", env=quick, timeout=60)
    assert started.returncode == 2 and started.stderr.count("\n") == 1, started.stderr
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in started.stderr


def test_a_client_pointed_at_a_web_page_says_so_in_one_line(tmp_path):
    page = tmp_path / "api" / "v1" / "challenges"
    page.parent.mkdir(parents=True)
    page.write_text("<html><body>a board, not the API</body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as site:
        threading.Thread(target=site.serve_forever, daemon=True).start()
        listed = ncbench("challenges", env={"NCBENCH_SERVER": f"http://127.0.0.1:{site.server_port}"})
        site.shutdown()
    assert listed.returncode == 2 and listed.stderr.count("\n") == 1, listed.stderr
    assert "did not answer as a challenge server's API" in listed.stderr


def test_concurrent_submissions_respect_limits_none_lost_none_twice(world, tmp_path):
    files = chance_submissions(world, 4, tmp_path / "subs")
    url = world["server"].url

    def upload(team_file):
        team, path = team_file
        return team, httpx.post(
            f"{url}/api/v1/challenges/{world['id']}/submissions",
            content=path.read_bytes(),
            headers={"Authorization": f"Bearer {world['tokens'][team]}"},
            timeout=60,
        )

    work = [(team, path) for team in TEAMS for path in files]  # 20 uploads, 4 per team
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(upload, work))
    accepted = {team: [a.json()["id"] for t, a in answers if t == team and a.status_code == 202] for team in TEAMS}
    refused = [a for _, a in answers if a.status_code != 202]
    assert all(a.status_code == 429 for a in refused)
    # alice may have used part of her day in another test; the others have exactly the limit.
    assert all(len(accepted[team]) == DAILY_LIMIT for team in TEAMS if team != "alice")
    deadline = time.monotonic() + 120
    with db(world) as store:
        while time.monotonic() < deadline:
            states = [channel.job(store, i).state for ids in accepted.values() for i in ids]
            if all(s in ("scored", "refused", "failed") for s in states):
                break
            time.sleep(0.5)
        assert set(states) == {"scored"}
        with store._read() as conn:
            for team in TEAMS[1:]:
                rows = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM submissions s JOIN teams t ON t.id = s.team_id "
                        "WHERE t.name = :team AND s.status = 'scored'"
                    ),
                    {"team": team},
                ).scalar()
                assert rows == DAILY_LIMIT


def test_upload_over_the_cap_is_refused_without_filling_the_disk(tmp_path, world):
    store = tmp_path / "store"
    assert ncbench("challenge", "publish", world["root"] / "release", "--store", store).returncode == 0
    token = ncbench("team", "add", "alice", "--store", store).stdout.strip()
    server = Server(store, "--max-upload-mb", "1", "--board-port", "0")
    try:

        def chunks():  # 3 MB, sent without a Content-Length (chunked), so the server must count
            for _ in range(48):
                yield b"\0" * 65536

        answer = httpx.post(
            f"{server.url}/api/v1/challenges/{world['id']}/submissions",
            content=chunks(),
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert answer.status_code == 413
        declared = httpx.post(
            f"{server.url}/api/v1/challenges/{world['id']}/submissions",
            content=b"\0" * (2 << 20),
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert declared.status_code == 413
        assert not any((store / "uploads").iterdir()) and not any((store / "incoming").iterdir())
    finally:
        server.stop()


def test_a_killed_server_loses_no_job_and_scores_none_twice(tmp_path, world):
    store_dir = tmp_path / "store"
    assert (
        ncbench("challenge", "publish", world["root"] / "release", "--store", store_dir, "--daily-limit", 10).returncode
        == 0
    )
    ncbench("team", "add", "alice", "--store", store_dir)
    files = chance_submissions(world, 4, tmp_path / "subs")
    layout = workqueue.StoreLayout(store_dir)
    with Store(store_dir / "leaderboard.db") as store:
        ids = []
        for path in files:  # uploads that reached the queue before the server died
            writer = channel.UploadWriter(layout, max_bytes=1 << 30)
            writer.write(path.read_bytes())
            sha256, size = writer.commit()
            ids.append(channel.enqueue(store, team="alice", challenge_id=world["id"], sha256=sha256, size=size))
        # One job was running when the server died; another had been recorded but not marked done.
        channel.claim(store, 2)
        result = channel.run_job(str(store.url.render_as_string(hide_password=False)), str(store_dir), ids[1])
        assert result == "scored"
        channel.finish(store, ids[1], "running")
    server = Server(store_dir, "--board-port", "0")
    try:
        with Store(store_dir / "leaderboard.db") as store:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and any(channel.job(store, i).state != "scored" for i in ids):
                time.sleep(0.5)
            assert [channel.job(store, i).state for i in ids] == ["scored"] * 4
            with store._read() as conn:
                assert conn.execute(sa.select(sa.func.count()).select_from(submissions)).scalar() == 4
                linked = conn.execute(sa.select(jobs.c.submission_id).where(jobs.c.id.in_(ids))).scalars().all()
            assert len(set(linked)) == 4
    finally:
        assert server.stop() == 0


def test_sigterm_stops_the_server_and_its_board_with_no_orphan(tmp_path, world):
    store = tmp_path / "store"
    assert ncbench("challenge", "publish", world["root"] / "release", "--store", store).returncode == 0
    board_port = free_port()
    server = Server(store, "--board-port", board_port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{board_port}/", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        raise AssertionError("the board never answered")
    server.stop(signal.SIGTERM)
    time.sleep(1)
    for port in (server.port, board_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still listening"
    try:
        os.killpg(server.process.pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "a process of the server's group outlived it"


def test_the_api_socket_answers_without_waiting_for_the_clients_delayed_acknowledgement():
    """Connections accepted on the API's socket have Nagle's algorithm off. asyncio turns it off
    only where the socket names its protocol (TCP); with it on, every response's body waited for
    the client's delayed acknowledgement of the head, 40 ms a request."""
    import asyncio

    from ncbench.leaderboard.server import service

    listener = service.listen("127.0.0.1", 0)
    nodelay = []

    class Accepted(asyncio.Protocol):
        def connection_made(self, transport):
            nodelay.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def connect_once():
        server = await asyncio.get_running_loop().create_server(Accepted, sock=listener)
        async with server:
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            await reader.read()  # until the server closes it
            writer.close()

    asyncio.run(connect_once())
    assert nodelay and nodelay[0] != 0


@pytest.mark.parametrize(("limits", "soft_after"), [("256:4096", 1256), ("256:512", 512), ("2048:4096", 2048)])
def test_the_server_raises_its_open_file_limit_for_its_connection_cap(limits, soft_after):
    """A server capped at 1000 connections needs more files than the usual soft limit of 1024:
    it raises its soft limit as far as needed, within the hard limit (prlimit sets both here)."""
    code = (
        "import resource; from ncbench.leaderboard.server.connections import raise_open_files; "
        "print(raise_open_files(1256), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    done = subprocess.run(
        ["prlimit", f"--nofile={limits}", "--", sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == [str(soft_after)] * 2


def test_openapi_description_is_served(world):
    spec = httpx.get(f"{world['server'].url}/openapi.json").json()
    assert "/api/v1/challenges/{challenge_id}/submissions" in spec["paths"]


@pytest.mark.postgres
def test_two_servers_on_postgresql_share_one_queue_and_score_each_upload_once(postgres_url, world, tmp_path):
    # With PostgreSQL the API holds no state of its own: two server processes on one database and
    # one store folder take uploads side by side, and their workers drain one queue.
    store = tmp_path / "store"
    published = ncbench(
        "challenge", "publish", world["root"] / "release", "--store", store, "--db", postgres_url, "--daily-limit", 10
    )
    assert published.returncode == 0, published.stderr
    token = ncbench("team", "add", "alice", "--db", postgres_url, "--store", store).stdout.strip()
    files = chance_submissions(world, 6, tmp_path / "subs")
    servers = [Server(store, "--db", postgres_url, "--board-port", "0") for _ in range(2)]
    try:
        ids = []
        for k, path in enumerate(files):
            answer = httpx.post(
                f"{servers[k % 2].url}/api/v1/challenges/{world['id']}/submissions",
                content=path.read_bytes(),
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
            )
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
        with Store(postgres_url) as pg:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and any(channel.job(pg, i).state != "scored" for i in ids):
                time.sleep(0.5)
            assert [channel.job(pg, i).state for i in ids] == ["scored"] * len(ids)
            with pg._read() as conn:
                assert conn.execute(sa.select(sa.func.count()).select_from(submissions)).scalar() == len(ids)
        # Either server answers for jobs the other one took.
        seen = httpx.get(f"{servers[0].url}/api/v1/submissions", headers={"Authorization": f"Bearer {token}"}).json()
        assert sorted(row["id"] for row in seen) == sorted(ids)
    finally:
        for server in servers:
            server.stop()


def test_login_whoami_status_and_json_for_scripts(world, tmp_path):
    home = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "NCBENCH_SERVER": "", "NCBENCH_TOKEN": ""}
    # A team of its own: the others have used their daily submissions in the tests above.
    added = ncbench("team", "add", "frank", "--store", world["store"])
    assert added.returncode == 0, added.stderr
    url, token = world["server"].url, added.stdout.strip()
    logged = subprocess.run(
        [NCBENCH, "login", "--server", url],
        input=token + "\n",
        capture_output=True,
        text=True,
        env={**os.environ, **home},
    )
    assert logged.returncode == 0 and "as team frank" in logged.stdout, logged.stderr
    config = tmp_path / "config" / "ncbench" / "config.json"
    assert config.stat().st_mode & 0o777 == 0o600 and token not in logged.stdout
    who = ncbench("whoami", env=home)  # no environment variables: the saved server and token
    assert who.returncode == 0 and "team frank" in who.stdout and world["id"] in who.stdout, who.stderr
    sub = chance_submissions(world, 1, tmp_path / "subs")[0]
    submitted = ncbench("submit", sub, "--challenge", world["id"], "--json", env=home)
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["state"] == "scored" and "reid_accuracy" in job["public"]
    shown = ncbench("status", job["id"], "--wait", env=home)
    assert shown.returncode == 0 and "scored" in shown.stdout and "Ladder" in shown.stdout, shown.stderr
    rows = json.loads(ncbench("submissions", "--json", env=home).stdout)["submissions"]
    assert job["id"] in [row["id"] for row in rows]
    listing = json.loads(ncbench("challenges", "--json", env=home).stdout)
    assert [row["challenge_id"] for row in listing] == [world["id"]]
    left = json.loads(ncbench("whoami", "--json", env=home).stdout)["challenges"][0]
    assert left["used_today"] >= 1 and left["left_today"] == left["daily_limit"] - left["used_today"]


def csv_answers(world, folder: Path, shift: int) -> Path:
    """A reid answer as the two-column CSV (docs/format.md; the organizer's `ncbench score` takes
    one, the server HDF5 only): encoded row i -> plain row i + shift."""
    with h5py.File(world["root"] / "release" / "public" / "release.h5", "r") as release:
        encoded = [v.decode() for v in release["encoded/ids"][()]]
        plain = [v.decode() for v in release["plain/ids"][()]]
    path = folder / f"answer-{shift}.csv"
    rows = [f"{e},{plain[(i + shift) % len(plain)]}" for i, e in enumerate(encoded)]
    path.write_text("\r\n".join(["encoded_id,plain_id", *rows]) + "\r\n")
    return path


def cli(*args, env=None):
    """An ncbench command in this process (the server it talks to is the real one)."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_one_id_for_a_submission_from_submit_to_status_submissions_the_board_and_the_export(world, tmp_path):
    """A newcomer's submission is named by one number everywhere, even after the organizer
    recorded a file for the team without the server (which used to advance only the board's ids)."""
    with db(world) as store:
        _, token = channel.add_team(store, "gina", key=channel.token_key(workqueue.StoreLayout(world["store"])))
    env = {"NCBENCH_SERVER": world["server"].url, "NCBENCH_TOKEN": token}
    database = world["store"] / "leaderboard.db"
    key = world["root"] / "release" / "private" / "key.h5"
    scored = cli("score", csv_answers(world, tmp_path, 0), "--key", key, "--db", database, "--team", "gina")
    assert scored.exit_code == 0, scored.output
    local_id = int(scored.stdout.split("recorded as submission ")[1].split()[0])
    uploaded, release = tmp_path / "chance.h5", world["root"] / "release" / "public" / "release.h5"
    assert cli("attack", "run", "chance", "--release", release, "--out", uploaded).exit_code == 0
    submitted = ncbench("submit", uploaded, "--challenge", world["id"], env=env)
    assert submitted.returncode == 0, submitted.stderr
    sub_id = int(submitted.stdout.split()[1])  # "submission N queued"
    assert f"submission {sub_id} scored" in submitted.stdout and sub_id != local_id
    status = cli("status", sub_id, "--wait", env=env)
    assert status.stdout.startswith(f"submission {sub_id} on {world['id']}: scored"), status.output
    assert "on the board" not in status.stdout
    viewed = json.loads(cli("status", sub_id, "--json", env=env).stdout)
    assert (viewed["id"], viewed["submission_id"]) == (sub_id, sub_id)
    assert cli("submissions", env=env).stdout.splitlines()[0].split()[0] == "SUBMISSION"
    rows = json.loads(cli("submissions", "--json", env=env).stdout)["submissions"]
    # The organizer's local record is the team's submission too, under its own single id.
    assert sorted((row["id"], row["submission_id"]) for row in rows) == [(local_id, local_id), (sub_id, sub_id)]
    with db(world) as store:
        board = tables.board(store.results(challenge_id=world["id"]))
    assert set(board.loc[board["team"] == "gina", "submission_id"]) == {local_id, sub_id}
    exported = json.loads(cli("leaderboard", "export", "--db", database, "--format", "json").stdout)
    assert {row["submission_id"] for row in exported if row["team"] == "gina"} == {local_id, sub_id}
    # A run id is not a submission id: status says which it looked up.
    missing = cli("status", 99999, "--run", env=env)
    assert missing.exit_code == 2 and "verified run 99999" in missing.stderr and "leave out --run" in missing.stderr


def test_a_bad_status_id_or_missing_login_is_one_line(world, tmp_path):
    home = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "NCBENCH_SERVER": world["server"].url, "NCBENCH_TOKEN": ""}
    for args in (("whoami",), ("status", "1"), ("status", "x"), ("login",)):
        refused = ncbench(*args, env=home)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, (args, refused.stderr)


ABANDONED = """
import asyncio, gc, sys
from ncbench.leaderboard.server.worker import quiet_abandoned_timeouts
if sys.argv[1] == "quiet":
    quiet_abandoned_timeouts()
loop = asyncio.new_event_loop()
for error in (TimeoutError("Timeout"), ValueError("kept")):
    future = loop.create_future()
    future.set_exception(error)
    del future
    gc.collect()
"""


@pytest.mark.parametrize("mode", ["quiet", "plain"])
def test_abandoned_timeouts_are_silenced_and_other_unretrieved_errors_kept(mode):
    # What a close of the in-process Dask cluster can leave behind: a timed-out future nobody awaited.
    done = subprocess.run([sys.executable, "-c", ABANDONED, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "ValueError: kept" in done.stderr  # any other unretrieved error is still reported
    assert ("TimeoutError: Timeout" in done.stderr) == (mode == "plain"), done.stderr
