"""The deployment of docs/deploy.md ("Several machines"), and the database guarantees it rests on.

The cheap tests run by default: leases of running jobs, which dispatchers are alive, one plugin
check per team across servers, and the guide's commands and nginx configuration against the
tools. ``-m deploy`` (``make test-deploy``) starts the guide's commands on loopback: PostgreSQL, a
``dask scheduler``, two ``dask worker`` processes, two ``ncbench server`` processes on one store,
nginx terminating TLS in front of them; teams upload through it while one server and one worker
are killed with SIGKILL, and every job must end scored exactly once.
"""

from __future__ import annotations

import concurrent.futures
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from test_server import NCBENCH, build_tiny_release, free_port, ncbench
from test_store import result as store_result

from ncbench.leaderboard import workqueue
from ncbench.leaderboard.server import channel
from ncbench.leaderboard.store import Store, jobs, scores, submissions, teams, utc_now, verified_runs
from ncbench.leaderboard.verified import runs as verified

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"
SECTION = "## Several machines"
DASK = str(Path(sys.executable).with_name("dask"))
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
needs_nginx = pytest.mark.skipif(
    NGINX is None or shutil.which("openssl") is None, reason="nginx or openssl is not installed"
)
# What the guide names, and what the loopback run puts in its place.
GUIDE_DB = "postgresql+psycopg://ncbench@10.0.0.5/ncbench"
GUIDE_STORE = "/srv/ncbench/store"
GUIDE_SCRATCH = "/var/tmp/ncbench-dask"
GUIDE_SCHEDULER = "tcp://10.0.0.10:8786"
GUIDE_PROXY = "10.0.0.2"
GUIDE_SERVERS = ("10.0.0.11:8000", "10.0.0.12:8000")
GUIDE_CERT = "/etc/letsencrypt/live/challenge.example.org/fullchain.pem"
GUIDE_CERT_KEY = "/etc/letsencrypt/live/challenge.example.org/privkey.pem"


# -- the guide, read as the test runs it ---------------------------------------------------------


def guide_section() -> str:
    text = GUIDE.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", guide_section(), flags=re.S)


def guide_commands() -> dict[str, list[tuple[dict[str, str], list[str]]]]:
    """The guide's ``dask scheduler``, ``dask worker`` and ``ncbench server`` lines, and the
    organizer's (``challenge publish``, ``team add``): for each, (environment, argv) in order."""
    found: dict[str, list] = {"scheduler": [], "worker": [], "server": [], "organizer": []}
    for block in fenced("sh"):
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            words = shlex.split(line)
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                name, _, value = words.pop(0).partition("=")
                env[name] = value
            for kind, head in (("scheduler", ["dask", "scheduler"]), ("worker", ["dask", "worker"])):
                if words[:2] == head:
                    found[kind].append((env, words))
            if words[:2] == ["ncbench", "server"]:
                found["server"].append((env, words))
            if words[:3] in (["ncbench", "challenge", "publish"], ["ncbench", "team", "add"]):
                found["organizer"].append((env, words))
    return found


def on_loopback(argv: list[str], *, port: int | None, values: dict[str, str]) -> list[str]:
    """``argv`` with every ``--host`` on 127.0.0.1, ``--port`` at ``port`` and each guide value
    in ``values`` replaced."""
    out = []
    for before, word in zip([None, *argv], argv):
        if before == "--host":
            word = "127.0.0.1"
        elif before == "--port":
            word = str(port)
        out.append(values.get(word, word))
    return out


def nginx_config(*, listen: int, servers: list[int], cert: Path, key: Path) -> str:
    """The guide's nginx block on loopback: its upstream at the two servers' ports, TLS with
    the throwaway certificate."""
    (config,) = fenced("nginx")
    swaps = {
        "listen 443 ssl;": f"listen 127.0.0.1:{listen} ssl;",
        GUIDE_CERT: str(cert),
        GUIDE_CERT_KEY: str(key),
        **{guide: f"127.0.0.1:{port}" for guide, port in zip(GUIDE_SERVERS, servers)},
    }
    for old, new in swaps.items():
        assert old in config, f"the guide's nginx configuration no longer has {old!r}"
        config = config.replace(old, new)
    return config


def nginx_main(folder: Path, http_block: str) -> Path:
    """A whole nginx configuration around ``http_block``: pid, logs and temporary files in
    ``folder`` (a system nginx keeps them under /var)."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    temp = " ".join(
        f"{kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    path = folder / "nginx.conf"
    path.write_text(
        f"user {user};\nworker_processes 1;\npid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'} warn;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n  access_log {folder / 'access.log'};\n  {temp}\n{http_block}\n}}\n"
    )
    return path


def throwaway_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate it signs for localhost and 127.0.0.1: (CA, cert, key)."""
    folder.mkdir(mode=0o700)
    ca, ca_key, cert, key, csr = (folder / n for n in ("ca.pem", "ca.key", "cert.pem", "cert.key", "cert.csr"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl = [
        [
            "req",
            "-x509",
            *ec,
            "-keyout",
            ca_key,
            "-out",
            ca,
            "-days",
            "1",
            "-subj",
            "/CN=ncbench throwaway CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        [
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "1",
            "-extfile",
            folder / "ext",
        ],
    ]
    (folder / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    for args in openssl:
        made = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    return ca, cert, key


# -- leases, presence and one check per team (default run) --------------------------------------


def queued_jobs(store: Store, count: int) -> list[int]:
    """``count`` queued scoring jobs of team alice on a challenge the store knows."""
    store.record_score(store_result("a"), team="alice")
    with store._write() as conn:
        team_id = conn.execute(sa.select(teams.c.id).where(teams.c.name == "alice")).scalar_one()
        return [
            workqueue.insert_queued(
                conn,
                jobs,
                utc_now(),
                challenge_id="nc7-reid-00000001",
                team_id=team_id,
                sha256=f"{k:064x}",
                size=1,
                submission_id=None,
            )
            for k in range(count)
        ]


def states(store: Store, table: sa.Table, ids=None) -> dict[int, str]:
    """The state of each row of ``table``, or of the rows ``ids`` only."""
    query = sa.select(table.c.id, table.c.state)
    with store._read() as conn:
        return dict(conn.execute(query if ids is None else query.where(table.c.id.in_(ids))).all())


def test_a_running_job_nobody_renews_is_queued_again_when_its_lease_lapses(tmp_path):
    with Store(tmp_path / "board.db") as store:
        renewed, abandoned = queued_jobs(store, 2)
        assert sorted(channel.claim(store, 2)) == [renewed, abandoned]
        assert workqueue.requeue_stale(store, jobs) == 0  # both leases fresh
        time.sleep(0.4)
        workqueue.touch(store, jobs, [renewed])
        assert workqueue.requeue_stale(store, jobs, lease_s=0.3) == 1
        assert states(store, jobs, [renewed, abandoned]) == {renewed: "running", abandoned: "queued"}
        assert channel.claim(store, 2) == [abandoned]  # claimed again, counting the attempt
        with store._read() as conn:
            assert conn.execute(sa.select(jobs.c.attempts).where(jobs.c.id == abandoned)).scalar_one() == 2


def test_a_finished_job_is_never_renewed_or_queued_again(tmp_path):
    with Store(tmp_path / "board.db") as store:
        (job_id,) = queued_jobs(store, 1)
        channel.claim(store, 1)
        channel.finish(store, job_id, "scored")
        workqueue.touch(store, jobs, [job_id])
        time.sleep(0.2)
        assert workqueue.requeue_stale(store, jobs, lease_s=0.1) == 0
        assert states(store, jobs, [job_id]) == {job_id: "scored"}


def test_a_sqlite_store_serves_one_dispatcher(tmp_path):
    with Store(tmp_path / "board.db"):
        presence = workqueue.Presence(str(tmp_path / "board.db"))
    assert presence.join()
    presence.leave()


@pytest.mark.postgres
def test_a_dispatcher_knows_whether_others_share_the_database(postgres_url):
    with Store(postgres_url):
        first, second = workqueue.Presence(postgres_url), workqueue.Presence(postgres_url)
    try:
        assert first.join() is True  # alone: it may queue again every job left running
        assert second.join() is False  # the first is alive: leave its jobs alone
        first.leave()
        second.leave()
        third = workqueue.Presence(postgres_url)
        assert third.join() is True
        third.leave()
    finally:
        first.leave()
        second.leave()


def updated(store: Store, job_id: int) -> str:
    with store._read() as conn:
        return conn.execute(sa.select(jobs.c.updated_utc).where(jobs.c.id == job_id)).scalar_one()


def test_a_job_renews_its_lease_while_it_runs_on_a_worker(tmp_path, monkeypatch):
    from ncbench.leaderboard.server import worker

    url = str(tmp_path / "board.db")
    with Store(url) as store:
        (job_id,) = queued_jobs(store, 1)
        channel.claim(store, 1)
        claimed = updated(store, job_id)
        seen = []

        def slow_scorer(db_url, store_root, run_id):  # a scorer that outlasts two beats
            time.sleep(0.5)
            seen.append(updated(store, run_id))
            return "scored"

        monkeypatch.setattr(workqueue, "HEARTBEAT_S", 0.1)
        monkeypatch.setitem(worker.KINDS, "job", (*worker.KINDS["job"][:2], slow_scorer, worker.KINDS["job"][3]))
        assert worker.run_held("job", url, str(tmp_path), job_id) == "scored"
        assert seen[0] > claimed  # renewed while it ran: no other server takes it meanwhile
        assert workqueue.requeue_stale(store, jobs, lease_s=0.3) == 0


def test_the_dispatcher_outlives_a_database_outage_and_claims_again(tmp_path, monkeypatch, capfd):
    from ncbench.errors import NcbenchError
    from ncbench.leaderboard.server import worker
    from ncbench.leaderboard.server.worker import Dispatcher

    url = str(tmp_path / "board.db")
    with Store(url) as store:
        (job_id,) = queued_jobs(store, 1)
    tries, ran = [], threading.Event()
    pool, claim, _, finish = worker.KINDS["job"]

    def claim_after_an_outage(store, limit):
        tries.append(limit)
        if len(tries) == 1:
            raise NcbenchError("database db.example.org unavailable: connection refused")
        return claim(store, limit)

    def scorer(db_url, store_root, run_id):
        ran.set()
        return "scored"

    monkeypatch.setattr(workqueue, "HEARTBEAT_S", 0.1)
    monkeypatch.setitem(worker.KINDS, "job", (pool, claim_after_an_outage, scorer, finish))
    dispatcher = Dispatcher(url, str(tmp_path)).start()
    try:
        assert ran.wait(30), "the dispatcher stopped at the outage"
    finally:
        dispatcher.stop()
    assert len(tries) >= 2
    assert "warning: job dispatcher: database db.example.org unavailable" in capfd.readouterr().err


def test_a_server_on_an_external_cluster_says_what_its_workers_lack(tmp_path, capfd):
    from distributed import LocalCluster

    from ncbench.leaderboard.server.worker import Dispatcher

    url = str(tmp_path / "board.db")
    Store(url).close()
    store_dir = tmp_path / "store"
    loopback = {
        "protocol": "tcp://",
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
        "worker_dashboard_address": "127.0.0.1:0",
    }
    with LocalCluster(n_workers=1, processes=False, resources={"score": 2}, **loopback) as cluster:
        for _ in range(2):  # the store folder missing, then there
            dispatcher = Dispatcher(url, str(store_dir), scheduler=cluster.scheduler_address)
            dispatcher._loop = lambda: None
            dispatcher.start()
            dispatcher.stop()
            store_dir.mkdir(mode=0o700, exist_ok=True)
    missing, there = capfd.readouterr().err.split("no dask worker declares the pool 'check'")[1:]
    assert "no dask worker declares the pool 'sandbox'" in missing and "pool 'score'" not in missing
    assert f"cannot read the store folder {store_dir}: the jobs it runs fail" in missing
    assert "cannot read the store folder" not in there and "cannot open the database" not in there


@pytest.mark.postgres
def test_a_server_starting_beside_a_live_one_leaves_its_running_jobs_alone(postgres_url, tmp_path):
    from ncbench.leaderboard.server.worker import Dispatcher

    with Store(postgres_url) as store:
        (job_id,) = queued_jobs(store, 1)
        assert job_id in channel.claim(store, 10)  # held by a live server
        live = workqueue.Presence(postgres_url)
        live.join()
        try:
            dispatcher = Dispatcher(postgres_url, str(tmp_path))
            dispatcher._loop = lambda: None  # what start() does, not what it runs after
            dispatcher.start()
            try:
                assert states(store, jobs)[job_id] == "running"
            finally:
                dispatcher.stop()
        finally:
            live.leave()
        # Alone, a starting server takes every job left running as its dead predecessors'.
        dispatcher = Dispatcher(postgres_url, str(tmp_path))
        dispatcher._loop = lambda: None
        dispatcher.start()
        try:
            assert states(store, jobs)[job_id] == "queued"
        finally:
            dispatcher.stop()


def uncheck_plugin_runs(store: Store, team: str, count: int) -> list[int]:
    """``count`` uploaded plugins of ``team`` waiting for their admission check."""
    store.record_score(store_result("a"), team=team)
    stamp = "2026-12-01T00:00:00.000000Z"
    with store._write() as conn:
        team_id = conn.execute(sa.select(teams.c.id).where(teams.c.name == team)).scalar_one()
        return [
            conn.execute(
                verified_runs.insert().values(
                    challenge_id="nc7-reid-00000001",
                    team_id=team_id,
                    origin="self-reported",
                    attack="",
                    attack_version=verified.UNCHECKED,
                    params="{}",
                    releases=1,
                    eval_source="phantom",
                    limits="{}",
                    sandboxed=True,
                    state="queued",
                    attempts=0,
                    created_utc=stamp,
                    updated_utc=stamp,
                )
            ).inserted_primary_key[0]
            for _ in range(count)
        ]


@pytest.mark.postgres
def test_two_servers_never_check_two_plugins_of_one_team_at_once(postgres_url):
    # Server one has claimed the team's check and not committed yet when the team uploads another
    # plugin and server two claims: with row locks alone server two sees the new plugin unlocked
    # and the first check not yet `running`, and takes it. It must wait, then take nothing.
    with Store(postgres_url) as first, Store(postgres_url) as second:
        with first._write() as conn:
            conn.execute(verified_runs.delete())
        uncheck_plugin_runs(first, "alice", 1)
        claimed, waited = threading.Event(), threading.Event()

        def hold_the_claim_open(conn, cursor, statement, *args):
            if "FOR UPDATE" in statement and not claimed.is_set():
                claimed.set()
                waited.wait(10)  # until server two has tried (or given up after its timeout)

        sa.event.listen(first.engine, "after_cursor_execute", hold_the_claim_open)
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                one = pool.submit(verified.claim_checks, first, 2)
                assert claimed.wait(30)
                uncheck_plugin_runs(second, "alice", 1)  # the team's next upload, committed
                two = pool.submit(verified.claim_checks, second, 2)
                try:
                    two.result(timeout=2)  # without a database-wide guarantee: at once, the new plugin
                except concurrent.futures.TimeoutError:
                    pass  # it waits for server one's claim to commit, as it should
                finally:
                    waited.set()
                assert len(one.result(timeout=30)) == 1
                assert two.result(timeout=30) == []
        finally:
            sa.event.remove(first.engine, "after_cursor_execute", hold_the_claim_open)
            waited.set()
        assert sorted(states(first, verified_runs).values()) == ["queued", "running"]


# -- the guide against the tools (default run) ---------------------------------------------------


def test_the_guides_commands_use_options_the_tools_have():
    from ncbench.cli.server import server

    commands = guide_commands()
    assert len(commands["scheduler"]) == 1 and len(commands["worker"]) == 2 and len(commands["server"]) == 2
    server_options = {name for param in server.params for name in param.opts + param.secondary_opts}
    helps = {}
    for kind in ("scheduler", "worker"):
        shown = subprocess.run([DASK, kind, "--help"], capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        helps[kind] = set(re.findall(r"--[a-z-]+", shown.stdout))
    for kind, known in (("scheduler", helps["scheduler"]), ("worker", helps["worker"]), ("server", server_options)):
        for _, argv in commands[kind]:
            options = {word for word in argv if word.startswith("--")}
            assert options <= known, (kind, options - known)
            # Nothing listens beyond the address given: every listener is named.
            if kind != "server":
                assert {"--host", "--dashboard-address", "--no-dashboard"} <= options, argv
                assert argv[argv.index("--dashboard-address") + 1].startswith("127.0.0.1:")
            else:
                assert {"--host", "--scheduler", "--db", "--store"} <= options, argv
    from ncbench.cli.server import publish, team_add

    for (_, argv), command in zip(commands["organizer"], (publish, team_add), strict=True):
        known = {name for param in command.params for name in param.opts}
        assert {word for word in argv if word.startswith("--")} <= known, argv
    resources = [argv[argv.index("--resources") + 1] for _, argv in commands["worker"]]
    pools = {item.partition("=")[0] for spec in resources for item in spec.split(",")}
    for spec, (_, argv) in zip(resources, commands["worker"]):  # a thread for every unit: no pool waits on another
        units = sum(int(item.partition("=")[2]) for item in spec.split(","))
        assert int(argv[argv.index("--nthreads") + 1]) >= units, argv
    from ncbench.leaderboard.server.worker import CHECK, SANDBOX, SCORE

    assert pools == {SCORE, CHECK, SANDBOX}  # every pool is served by some worker


@needs_nginx
def test_the_guides_nginx_configuration_is_valid(tmp_path):
    ca, cert, key = throwaway_tls(tmp_path / "tls")
    config = nginx_main(
        tmp_path, nginx_config(listen=free_port(), servers=[free_port(), free_port()], cert=cert, key=key)
    )
    tested = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stderr


# -- the deployment on loopback (-m deploy) ------------------------------------------------------

TEAMS = 6
FILES_PER_TEAM = 6  # under the rate limit of 10 uploads a minute per team
SCORE_WAIT_S = 240


class Processes:
    """Processes of their own sessions, logged to files, all killed at the end."""

    def __init__(self, folder: Path):
        self.folder, self.started = folder, []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - closed in kill_all
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
        self.started.append((name, process, log))
        return process

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def kill_all(self) -> None:
        for _, process, log in reversed(self.started):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait(timeout=30)
            log.close()


def wait_until(check, what: str, timeout: float, processes: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for process in processes:
            assert process.poll() is None, f"{what}: a process exited with {process.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def answers(url: str, **kwargs) -> bool:
    try:
        return httpx.get(url, timeout=2, **kwargs).status_code == 200
    except httpx.HTTPError:
        return False


def listeners(process: subprocess.Popen) -> set[str]:
    """Addresses the process and its children listen on (TCP)."""
    import psutil

    found = set()
    parent = psutil.Process(process.pid)
    for each in [parent, *parent.children(recursive=True)]:
        try:
            for conn in each.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add(conn.laddr.ip)
        except psutil.NoSuchProcess:
            pass
    return found


def answers_tcp(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def score_slots(argv: list[str]) -> int:
    """The ``score`` units a ``dask worker`` command line declares."""
    resources = dict(item.split("=") for item in argv[argv.index("--resources") + 1].split(","))
    return int(resources.get("score", 0))


def answer_files(release: Path, folder: Path, count: int) -> list[Path]:
    """``count`` distinct answer files (the chance attack at different seeds), in this process."""
    from ncbench.attacks.plugins.registry import resolve
    from ncbench.attacks.plugins.runner import run_attack

    folder.mkdir()
    chance = resolve("chance")
    paths = [folder / f"chance-{seed}.h5" for seed in range(count)]
    for seed, path in enumerate(paths):
        run_attack(chance, chance.parse_params({}), release, path, device="cpu", seed=seed)
    return paths


@pytest.mark.deploy
@pytest.mark.postgres
@needs_nginx
def test_two_servers_behind_nginx_score_every_job_once_across_a_killed_server_and_worker(postgres_url, tmp_path):
    began = time.monotonic()
    commands = guide_commands()
    build_tiny_release(tmp_path / "release")
    store_dir = tmp_path / "store"
    published = ncbench(
        "challenge", "publish", tmp_path / "release", "--store", store_dir, "--db", postgres_url, "--daily-limit", 100
    )
    assert published.returncode == 0, published.stderr
    challenge_id = published.stdout.split()[-1]
    key = channel.token_key(workqueue.StoreLayout(store_dir))
    with Store(postgres_url) as store:
        tokens = [channel.add_team(store, f"team-{k}", key=key)[1] for k in range(TEAMS)]
    files = answer_files(
        tmp_path / "release" / "public" / "release.h5", tmp_path / "answers", TEAMS * FILES_PER_TEAM + 1
    )
    ca, cert, cert_key = throwaway_tls(tmp_path / "tls")

    scheduler_port, proxy_port = free_port(), free_port()
    server_ports = [free_port(), free_port()]
    values = {
        GUIDE_DB: postgres_url,
        GUIDE_STORE: str(store_dir),
        GUIDE_SCHEDULER: f"tcp://127.0.0.1:{scheduler_port}",
        GUIDE_PROXY: "127.0.0.1",
    }
    run = Processes(tmp_path)
    try:
        (_, scheduler_argv) = commands["scheduler"][0]
        scheduler = run.start("scheduler", [DASK, *on_loopback(scheduler_argv, port=scheduler_port, values=values)[1:]])
        worker_argv = []
        for k, (_, argv) in enumerate(commands["worker"]):
            scratch = tmp_path / f"dask-{k}"
            scratch.mkdir(mode=0o700)
            worker_argv.append(
                [DASK, *on_loopback(argv, port=None, values={**values, GUIDE_SCRATCH: str(scratch)})[1:]]
            )
        wait_until(lambda: answers_tcp(scheduler_port), "dask scheduler", 60, [scheduler])
        server_runs = [
            ([NCBENCH, *on_loopback(argv, port=port, values=values)[1:]], {k: values.get(v, v) for k, v in env.items()})
            for (env, argv), port in zip(commands["server"], server_ports)
        ]
        servers = [run.start(f"server-{k}", argv, env) for k, (argv, env) in enumerate(server_runs)]
        for k, port in enumerate(server_ports):
            wait_until(lambda: answers(f"http://127.0.0.1:{port}/healthz"), f"server {k}", 90, servers)
        proxy_conf = nginx_main(
            tmp_path, nginx_config(listen=proxy_port, servers=server_ports, cert=cert, key=cert_key)
        )
        nginx = run.start(
            "nginx",
            [NGINX, "-p", str(tmp_path), "-c", str(proxy_conf), "-e", str(tmp_path / "error.log"), "-g", "daemon off;"],
        )
        tls = ssl.create_default_context(cafile=str(ca))  # the throwaway CA, verified, not switched off
        proxy = f"https://localhost:{proxy_port}"
        wait_until(lambda: answers(f"{proxy}/healthz", verify=tls), "nginx", 60, [nginx])
        with pytest.raises(httpx.ConnectError):  # the client does verify: without the CA it refuses
            httpx.get(f"{proxy}/healthz", timeout=5)

        accepted: dict[int, int] = {}  # job id -> team index, from every 202
        refused: list[int] = []  # statuses other than 202 (a 502 when a server dies under a request)
        lock = threading.Lock()

        def upload(team: int, paths: list[Path]) -> None:
            with httpx.Client(verify=tls, timeout=120) as http:
                for path in paths:
                    answer = http.post(
                        f"{proxy}/api/v1/challenges/{challenge_id}/submissions",
                        content=path.read_bytes(),
                        headers={"Authorization": f"Bearer {tokens[team]}"},
                    )
                    with lock:
                        if answer.status_code == 202:
                            accepted[answer.json()["id"]] = team
                        else:
                            refused.append(answer.status_code)

        def upload_round(first: int, last: int) -> None:
            with concurrent.futures.ThreadPoolExecutor(TEAMS) as pool:
                rounds = [
                    pool.submit(upload, team, files[team * FILES_PER_TEAM + first : team * FILES_PER_TEAM + last])
                    for team in range(TEAMS)
                ]
                for each in rounds:
                    each.result()

        def job_states() -> dict[int, str]:
            with Store(postgres_url) as store:
                return states(store, jobs)

        # The first half is uploaded before any worker runs, so that a backlog waits; then the
        # workers start and each server claims as many jobs as the cluster has score slots.
        half = FILES_PER_TEAM // 2
        upload_round(0, half)
        assert set(job_states().values()) == {"queued"}
        workers = [run.start(f"worker-{k}", argv) for k, argv in enumerate(worker_argv)]
        slots = sum(score_slots(argv) for argv in worker_argv)
        wait_until(
            lambda: sum(state == "running" for state in job_states().values()) >= 2 * slots,
            "both servers holding claimed jobs",
            90,
            [scheduler, *workers, *servers],
        )
        # Nothing listens beyond loopback: the scheduler's and workers' HTTP servers included.
        for process in [scheduler, *workers, *servers, nginx]:
            assert listeners(process) <= {"127.0.0.1"}, (process.args[:3], listeners(process))
        # Mid-run, server 0 holds as many jobs as there are slots, some of them waiting or on
        # worker 0, and the second half is being uploaded: SIGKILL server 0 and worker 0 (the one
        # with the check and sandbox pools). The worker comes back at once, as its supervisor
        # would start it; the server stays dead.
        with concurrent.futures.ThreadPoolExecutor(1) as background:
            second_half = background.submit(upload_round, half, FILES_PER_TEAM)
            time.sleep(0.3)  # uploads under way through both servers
            os.killpg(servers[0].pid, signal.SIGKILL)
            os.killpg(workers[0].pid, signal.SIGKILL)
            killed_at = time.monotonic()
            servers[0].wait(timeout=30)
            workers[0].wait(timeout=30)
            workers[0] = run.start("worker-0-again", worker_argv[0])
            second_half.result()
        wait_until(
            lambda: all(state in workqueue.FINAL_STATES for state in job_states().values()),
            "every job final",
            SCORE_WAIT_S,
            [servers[1], scheduler, nginx],
        )
        finished_at = time.monotonic()
        # Server 0 comes back beside server 1 and takes its share again: one more upload is scored.
        servers[0] = run.start("server-0-again", *server_runs[0])
        wait_until(lambda: answers(f"http://127.0.0.1:{server_ports[0]}/healthz"), "server 0 again", 90, servers)
        before = len(accepted)
        upload(0, files[-1:])
        assert len(accepted) == before + 1, refused
        wait_until(
            lambda: all(state in workqueue.FINAL_STATES for state in job_states().values()),
            "the upload after the restart scored",
            60,
            [*servers, scheduler, nginx],
        )

        with Store(postgres_url) as store, store._read() as conn:
            rows = conn.execute(
                sa.select(jobs.c.id, jobs.c.team_id, jobs.c.sha256, jobs.c.state, jobs.c.attempts, jobs.c.submission_id)
            ).all()
            scored = conn.execute(
                sa.select(submissions.c.id, submissions.c.team_id, submissions.c.sha256).where(
                    submissions.c.challenge_id == challenge_id
                )
            ).all()
            with_scores = set(conn.execute(sa.select(scores.c.submission_id).distinct()).scalars())
        by_id = {row.id: row for row in rows}
        # Every 202 is a job, scored; none lost.
        assert set(accepted) <= set(by_id)
        assert {by_id[i].state for i in accepted} == {"scored"}, [(i, by_id[i].state) for i in accepted]
        # Every job (202s and uploads whose answer was lost with the server) scored exactly once:
        # one submission row each, its own, with its scores; none doubled.
        assert {row.state for row in rows} == {"scored"}
        assert len(scored) == len(rows) == len({(row.team_id, row.sha256) for row in rows})
        submission_of = {(row.team_id, row.sha256): row.id for row in scored}
        assert all(row.submission_id == submission_of[(row.team_id, row.sha256)] for row in rows)
        assert {row.id for row in scored} <= with_scores
        assert len(accepted) + len(refused) == TEAMS * FILES_PER_TEAM + 1
        assert set(refused) <= {502}, refused
        # The killed server held claimed jobs that the surviving one queued again (a second attempt).
        requeued = sorted(row.id for row in rows if row.attempts > 1)
        assert requeued, "the killed server held no claimed job: the kill came too late to test anything"
        # Secrets stayed private on the shared store.
        assert store_dir.stat().st_mode & 0o777 == 0o700
        assert (store_dir / "token-secret").stat().st_mode & 0o777 == 0o600
        assert all(path.stat().st_mode & 0o077 == 0 for path in (store_dir / "keys").glob("*/key.h5"))
        print(
            f"\ndeploy: {len(rows)} jobs ({len(accepted)} answered 202, {len(refused)} refused: {refused}); "
            f"{len(requeued)} queued again after the kill; all scored once; "
            f"{finished_at - killed_at:.1f} s from the kills to the last score; {time.monotonic() - began:.1f} s in all"
        )
    except BaseException:
        for name in ("server-0", "server-1", "worker-0", "worker-1", "scheduler"):
            if (tmp_path / f"{name}.log").exists():
                print(f"--- {name}\n{run.log(name)[-3000:]}")
        raise
    finally:
        run.kill_all()


def test_teams_take_turns_for_the_sandbox_pool_on_postgresql(postgres_url):
    # The claim's row locks and the teams' last starts, on the database several servers share.
    with Store(postgres_url) as store:
        with store._write() as conn:
            conn.execute(verified_runs.delete())
        alice, bob = uncheck_plugin_runs(store, "alice", 2), uncheck_plugin_runs(store, "bob", 1)
        with store._write() as conn:
            for second, run_id in enumerate([*alice, *bob]):
                conn.execute(
                    verified_runs.update()
                    .where(verified_runs.c.id == run_id)
                    .values(attack_version="1.0", started_utc=f"2026-12-01T00:00:0{second}.000000Z")
                )
        assert verified.claim(store, 1) == [alice[0]]
        assert verified.claim(store, 2) == [*bob, alice[1]]
