"""The attacker's client against a hostile challenge server: a real HTTP server on a free localhost
port that answers each API path with what a server run by an adversary (or a man in the middle on
plain HTTP) could send. Whatever it sends, a command ends in one printable line and exit status 2,
within its time, without writing past the size the server listed, and without replacing a file of
the user's."""

import gzip
import hashlib
import http.server
import json
import shutil
import threading
import time
import zlib

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from ncbench.challenge.config import resolve_config
from ncbench.challenge.files import check_untrusted_release
from ncbench.cli import main
from ncbench.errors import NcbenchError
from ncbench.leaderboard import isolated
from ncbench.leaderboard.server import client as client_module

ESCAPES = "\x1b[2J\x1b[31mPWNED\x1b]0;title\x07 ok\rFAKE: all good\nerror: second line"
EMPTY_SHA = hashlib.sha256(b"").hexdigest()


def send(handler, status: int, body: bytes, content_type: str = "application/json") -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def send_json(handler, value, status: int = 200) -> None:
    send(handler, status, json.dumps(value).encode())


def endless(handler) -> None:
    """A body that never ends: no length, a chunk after another until the client leaves."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.end_headers()
    try:
        while True:
            handler.wfile.write(b"x" * 65536)
    except OSError:
        pass


def drip(content_type: str, length: int, sent: int, pause: float):
    """An answer of ``length`` bytes whose head comes at once, then ``sent`` bytes one every
    ``pause`` seconds: each read is quick, the pace is not."""

    def answer(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        try:
            for _ in range(sent):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(pause)
        except OSError:
            pass

    return answer


def compressed(handler) -> None:
    """A small answer sent gzip-encoded, though the client asked for none."""
    body = gzip.compress(json.dumps([]).encode())
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Encoding", "gzip")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def listing(*entries):
    return lambda handler: send_json(handler, list(entries))


def file_entry(name: str, size: int, sha256: str = EMPTY_SHA) -> dict:
    return {"name": name, "size": size, "sha256": sha256}


CHALLENGE = {
    "challenge_id": "c1",
    "task": "reid",
    "preset": "nc7",
    "n_encoded": 10,
    "daily_limit": 5,
    "deadline_utc": None,
    "files": [],
}

# case -> {API path (after /api/v1) -> how the server answers it}
CASES = {
    "escapes": {"/challenges": lambda h: send_json(h, {"detail": ESCAPES + "x" * 100_000}, 400)},
    "html": {"/challenges": lambda h: send(h, 500, b"<html>\n<body>\n\x1b[2J oops\n</body>\n</html>", "text/html")},
    "table": {"/challenges": lambda h: send_json(h, [{**CHALLENGE, "challenge_id": ESCAPES, "task": "r" * 5000}])},
    "strings": {"/challenges": lambda h: send_json(h, ["a", "b"])},
    "sizes": {"/challenges": lambda h: send_json(h, [{**CHALLENGE, "files": [file_entry("r.h5", "abc")]}])},
    "nan": {"/challenges": lambda h: send(h, 200, b'[{"n_encoded": NaN}]')},
    "huge-number": {"/challenges": lambda h: send(h, 200, b'[{"n_encoded": 1e999}]')},
    "whoami-list": {"/whoami": lambda h: send_json(h, ["team"])},
    "compressed": {"/challenges": compressed},
    "nested": {"/challenges": lambda h: send(h, 200, b"[" * 900 + b"]" * 900)},
    "nested-error": {"/challenges": lambda h: send(h, 500, b"[" * 100_000)},
    "huge-integer": {"/challenges": lambda h: send_json(h, [{**CHALLENGE, "files": [file_entry("r.h5", 10**400)]}])},
    "status-no-state": {"/submissions/7": lambda h: send_json(h, {"id": 7, "challenge_id": "c1"})},
    "submissions-types": {
        "/submissions": lambda h: send_json(h, [{"id": "seven", "challenge_id": 1, "state": None}]),
        "/plugins": lambda h: send_json(h, []),
    },
    "big": {"/challenges": lambda h: send_json(h, [CHALLENGE] * 2000)},
    "trickle": {"/challenges": drip("application/json", 1_000_000, sent=200, pause=0.2)},
    "slow-download": {
        "/challenges/c1/files": listing(file_entry("release.h5", 1000)),
        "/challenges/c1/files/release.h5": drip("application/octet-stream", 1000, sent=1000, pause=0.1),
    },
    "old-date": {"/challenges": lambda h: send_json(h, [{**CHALLENGE, "deadline_utc": "0001-01-01T00:00:00+01:00"}])},
    "endless": {
        "/challenges/c1/files": listing(file_entry("release.h5", 1000)),
        "/challenges/c1/files/release.h5": endless,
    },
    "empty-file": {
        "/challenges/c1/files": listing(file_entry("empty.bin", 0)),
        "/challenges/c1/files/empty.bin": lambda h: send(h, 200, b"", "application/octet-stream"),
    },
    "overwrite": {
        "/challenges/c1/files": listing(file_entry("notes.txt", 0)),
        "/challenges/c1/files/notes.txt": lambda h: send(h, 200, b"", "application/octet-stream"),
    },
    "past-the-disk": {"/challenges/c1/files": listing(file_entry("release.h5", 10**18))},
    "names": {"/challenges/c1/files": lambda h: send_json(h, [file_entry(h.server.name, 0)])},
    "twice": {"/challenges/c1/files": listing(file_entry("a.h5", 0), file_entry("a.h5", 0))},
    "many": {"/challenges/c1/files": listing(*(file_entry(f"f{k}.h5", 0) for k in range(1000)))},
    "bad-sha": {"/challenges/c1/files": listing(file_entry("a.h5", 0, "x" * 64))},
}


def bomb_release(path, *, userblock: int = 0) -> bytes:
    """The bytes of an HDF5 file that says it is a release, whose one 1 MiB chunk inflates to 64 MiB
    (after ``userblock`` bytes of anything, where libhdf5 looks for its signature too)."""
    with h5py.File(path, "w", userblock_size=userblock) as h5:
        h5.attrs["format"] = "ncbench-release"
        h5.attrs["schema_version"] = np.int64(1)
        shape = (1, 1 << 20)
        data = h5.create_dataset("encoded/data", shape=shape, dtype="u1", chunks=shape, compression="gzip")
        data.id.write_direct_chunk((0, 0), zlib.compress(bytes(64 << 20), 9))
    return path.read_bytes()


def serve_release(case: str, body: bytes, name: str = "release.h5") -> None:
    """Make ``case`` list one file ``name`` holding ``body``, with its right size and sha256."""
    CASES[case] = {
        "/challenges/c1/files": listing(file_entry(name, len(body), hashlib.sha256(body).hexdigest())),
        f"/challenges/c1/files/{name}": lambda h: send(h, 200, body, "application/octet-stream"),
    }


class Hostile(http.server.BaseHTTPRequestHandler):
    """Answers ``/s/CASE/api/v1/PATH`` as :data:`CASES` says; anything else is a 404."""

    def do_GET(self) -> None:
        _, _, case, rest = self.path.split("/", 3)
        answer = CASES.get(case, {}).get("/" + rest.removeprefix("api/v1/").split("?")[0])
        if answer is None:
            send_json(self, {"detail": "Not Found"}, 404)
        else:
            answer(self)

    def log_message(self, *args) -> None:  # the test's output stays the client's
        pass


@pytest.fixture(scope="module")
def hostile():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    server.daemon_threads = True
    server.name = ""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def run(hostile, case: str, *args, tmp_path):
    env = {
        "NCBENCH_SERVER": f"http://127.0.0.1:{hostile.server_port}/s/{case}",
        "NCBENCH_TOKEN": "token",
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_one_line(result, *words: str) -> str:
    """The command ended with exit status 2 and one printable error line holding ``words``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].isprintable() and len(lines[0]) < 800, lines[0][:200]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_the_servers_text_reaches_the_terminal_as_one_printable_line(hostile, tmp_path):
    assert_one_line(run(hostile, "escapes", "challenges", tmp_path=tmp_path), "server answered 400", "PWNED")
    assert_one_line(run(hostile, "html", "challenges", tmp_path=tmp_path), "server answered 500")
    table = run(hostile, "table", "challenges", tmp_path=tmp_path)
    assert table.exit_code == 0, table.output
    assert "\x1b" not in table.output and "\r" not in table.output and "\x07" not in table.output
    assert len(table.output.splitlines()) == 2  # the header and one row: the server's newline is a space
    assert max(map(len, table.output.splitlines())) < 2 * client_module.TEXT_MAX + 200


@pytest.mark.parametrize(
    ("case", "command"),
    [
        ("strings", ["challenges"]),
        ("sizes", ["challenges"]),
        ("whoami-list", ["whoami"]),
        ("status-no-state", ["status", "7"]),
        ("submissions-types", ["submissions"]),
        ("nan", ["challenges", "--json"]),
        ("compressed", ["challenges"]),
        ("nested", ["challenges"]),
        ("huge-integer", ["challenges"]),
        ("huge-number", ["challenges", "--json"]),
    ],
)
def test_an_answer_of_the_wrong_shape_is_one_line(hostile, tmp_path, case, command):
    assert_one_line(run(hostile, case, *command, tmp_path=tmp_path), "challenge server")


def test_an_error_nested_too_deep_to_parse_is_one_line(hostile, tmp_path):
    assert_one_line(run(hostile, "nested-error", "challenges", tmp_path=tmp_path), "server answered 500")


def test_a_date_out_of_range_is_shown_as_the_server_wrote_it(hostile, tmp_path):
    listed = run(hostile, "old-date", "challenges", tmp_path=tmp_path)
    assert listed.exit_code == 0, listed.output
    assert "0001-01-01T00:00:00+01:00" in listed.output


def test_an_answer_is_read_only_up_to_its_limits_of_size_and_time(hostile, tmp_path, monkeypatch):
    monkeypatch.setattr(client_module, "ANSWER_MAX_BYTES", 64 << 10)
    assert_one_line(run(hostile, "big", "challenges", tmp_path=tmp_path), "larger than")
    monkeypatch.setattr(client_module, "ANSWER_S", 2.0)
    started = time.monotonic()
    assert_one_line(run(hostile, "trickle", "challenges", tmp_path=tmp_path), "did not answer", "within 2 s")
    assert time.monotonic() - started < 15  # the trickle lasts 40 s


def test_a_download_stops_at_the_size_the_server_listed(hostile, tmp_path):
    out = tmp_path / "got"
    assert_one_line(run(hostile, "endless", "fetch", "c1", "--out", out, tmp_path=tmp_path), "more than the 1000 bytes")
    assert list(out.iterdir()) == []  # neither the file nor a partial one of more than 1000 bytes
    too_big = run(hostile, "past-the-disk", "fetch", "c1", "--out", out, tmp_path=tmp_path)
    assert_one_line(too_big, "release.h5 needs", "free")
    assert list(out.iterdir()) == []


def test_a_download_slower_than_the_minimum_pace_stops_and_resumes_later(hostile, tmp_path, monkeypatch):
    monkeypatch.setattr(client_module, "DOWNLOAD_GRACE_S", 1.0)
    out = tmp_path / "got"
    slow = run(hostile, "slow-download", "fetch", "c1", "--out", out, tmp_path=tmp_path)
    assert_one_line(slow, "slower than 1000 bytes a second", "run fetch again")
    kept = out / ".release.h5.part"
    assert 0 < kept.stat().st_size < 1000 and not (out / "release.h5").exists()  # kept to resume


def test_an_empty_file_is_fetched(hostile, tmp_path):
    out = tmp_path / "got"
    fetched = run(hostile, "empty-file", "fetch", "c1", "--out", out, tmp_path=tmp_path)
    assert fetched.exit_code == 0, fetched.output
    assert (out / "empty.bin").read_bytes() == b"" and sorted(p.name for p in out.iterdir()) == ["empty.bin"]


def test_fetch_into_a_folder_it_cannot_create_is_one_line(hostile, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "sub"):
        assert_one_line(run(hostile, "empty-file", "fetch", "c1", "--out", out, tmp_path=tmp_path), "--out", "folder")


def test_fetch_keeps_a_file_of_the_users_unless_forced(hostile, tmp_path):
    out = tmp_path / "here"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert_one_line(run(hostile, "overwrite", "fetch", "c1", "--out", out, tmp_path=tmp_path), "--force")
    assert (out / "notes.txt").read_text() == "my notes"
    forced = run(hostile, "overwrite", "fetch", "c1", "--out", out, "--force", tmp_path=tmp_path)
    assert forced.exit_code == 0, forced.output
    assert (out / "notes.txt").read_bytes() == b""


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", ".hidden", "release.h5\x00x", "x" * 300, "\x1b[2J"])
def test_fetch_refuses_a_file_name_that_is_not_a_plain_one(hostile, tmp_path, name):
    hostile.name = name
    out = tmp_path / "got"
    assert_one_line(run(hostile, "names", "fetch", "c1", "--out", out, tmp_path=tmp_path), "unsafe file name")
    assert not out.exists()  # the listing is checked before anything is written


@pytest.mark.parametrize(("case", "words"), [("twice", "twice"), ("many", "1000 files"), ("bad-sha", "sha256")])
def test_fetch_refuses_a_listing_that_cannot_be(hostile, tmp_path, case, words):
    out = tmp_path / "got"
    assert_one_line(run(hostile, case, "fetch", "c1", "--out", out, tmp_path=tmp_path), words)
    assert not out.exists()


def test_a_token_on_plain_http_to_another_machine_is_warned_of():
    assert client_module._private_link("https://challenge.example.org")
    assert client_module._private_link("http://127.0.0.1:8000") and client_module._private_link("http://[::1]:8000")
    assert client_module._private_link("http://localhost:8000")
    assert not client_module._private_link("http://challenge.example.org")
    assert not client_module._private_link("http://10.0.0.5:8000")


def test_a_fetched_release_that_is_not_one_ncbench_can_read_is_removed(hostile, tmp_path):
    serve_release("not-hdf5", b"<html>not a release</html>")
    serve_release("bomb", bomb_release(tmp_path / "bomb.h5"))
    for case, words in (("not-hdf5", "not an HDF5 file"), ("bomb", "compression bomb")):
        out = tmp_path / case
        assert_one_line(run(hostile, case, "fetch", "c1", "--out", out, tmp_path=tmp_path), "release.h5", words)
        assert list(out.iterdir()) == []  # neither the release nor its partial file


def tiny_release(path, *, depth: int = 0, rows: int = 2, stored: int = 2) -> None:
    """A minimal file in the release format: ``rows`` encodings declared, ``stored`` of them written."""
    config = resolve_config("nc3", width=4, image_size=8, patch_size=4, bn_batch=8, depth=depth)
    with h5py.File(path, "w") as h5:
        h5.attrs["format"] = "ncbench-release"
        h5.attrs["schema_version"] = np.int64(1)
        for name, value in {"challenge_id": "c1", "task": "reid", "key_commitment": "0" * 64}.items():
            h5.attrs[name] = value
        h5.attrs["encoder_config"] = config.to_json()
        h5.attrs["n_encoded"] = np.int64(rows)
        data = h5.create_dataset("encoded/data", shape=(rows, 4, 4), dtype="f2", chunks=(1, 4, 4), compression="gzip")
        data[:stored] = 1.0


@pytest.mark.parametrize(
    ("build", "words"),
    [
        ({"rows": 10**9, "stored": 2}, "does not store all of it"),
        ({"depth": 10**8}, "at most 1,024"),
    ],
)
def test_a_release_that_declares_more_than_it_holds_is_refused(tmp_path, build, words):
    tiny_release(tmp_path / "fine.h5")
    check_untrusted_release(tmp_path / "fine.h5")
    tiny_release(tmp_path / "hostile.h5", **build)
    with pytest.raises(NcbenchError, match=words):
        check_untrusted_release(tmp_path / "hostile.h5")


def test_challenge_verify_checks_a_release_from_elsewhere_as_fetch_does(tmp_path):
    (tmp_path / "release").mkdir()
    bomb_release(tmp_path / "release" / "release.h5")
    verified = CliRunner().invoke(main, ["challenge", "verify", str(tmp_path / "release")])
    assert_one_line(verified, "is not a release that ncbench can read", "compression bomb")


def test_a_machine_that_cannot_limit_the_check_says_it_did_not_check(tmp_path, monkeypatch, capsys):
    tiny_release(tmp_path / "release.h5")
    isolated.check_release_shown(tmp_path / "release.h5", "release.h5")
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setattr(isolated, "can_limit", lambda: False)
    isolated.check_release_shown(tmp_path / "release.h5", "release.h5")
    assert f"warning: release.h5 {isolated.NOT_CHECKED}" in capsys.readouterr().err


def test_attack_run_checks_a_release_from_elsewhere_as_fetch_does(tmp_path):
    (tmp_path / "release").mkdir()
    bomb_release(tmp_path / "release" / "release.h5")
    ran = CliRunner().invoke(
        main, ["attack", "run", "chance", "--release", str(tmp_path / "release"), "--out", str(tmp_path / "a.csv")]
    )
    assert_one_line(ran, "is not a release that ncbench can read", "compression bomb")
    assert not (tmp_path / "a.csv").exists()


def test_attack_run_checks_each_release_file_once_and_again_once_it_changes(tmp_path, monkeypatch):
    runner = CliRunner()
    tiny = ["--width", "32", "--image-size", "32", "--patch-size", "8", "--bn-batch", "8", "--device", "cpu"]
    built = tmp_path / "built"
    made = runner.invoke(
        main, ["challenge", "build", "--preset", "nc3", "--n", "16", "--test-release", *tiny, "--out", built]
    )
    assert made.exit_code == 0, made.output
    given = tmp_path / "given"  # a copy, as from elsewhere: another file than the one built here
    shutil.copytree(built / "public", given)
    children = []
    call = isolated.call
    monkeypatch.setattr(isolated, "call", lambda task, *args, **kw: children.append(task) or call(task, *args, **kw))

    def attack_run(release, *options):
        out = ["--out", tmp_path / "answer.csv", "--force", *options]
        ran = runner.invoke(main, ["attack", "run", "chance", "--release", release, *map(str, out)])
        assert ran.exit_code == 0, ran.output
        return len(children)

    assert attack_run(built) == 0  # built here: never checked
    assert attack_run(given, "--trust-release") == 0
    assert attack_run(given) == 1
    assert attack_run(given) == 1  # checked before, and unchanged
    with open(given / "release.h5", "r+b") as handle:  # the same bytes, written again
        first = handle.read(8)
        handle.seek(0)
        handle.write(first)
    assert attack_run(given) == 2


def test_a_fetched_file_that_holds_hdf5_under_another_name_is_checked_too(hostile, tmp_path):
    serve_release("hidden-bomb", bomb_release(tmp_path / "hidden.bin", userblock=512), name="notes.txt")
    out = tmp_path / "got"
    assert_one_line(run(hostile, "hidden-bomb", "fetch", "c1", "--out", out, tmp_path=tmp_path), "compression bomb")
    assert list(out.iterdir()) == []
