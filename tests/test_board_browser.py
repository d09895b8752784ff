"""The public board as a visitor sees it: Debian's headless Chromium loads the page that
`ncbench server` serves and finds a team scored through the API, and opens every page by its
link on an empty and on a filled store (driven over the DevTools protocol; skipped where
Chromium is not installed; .ci/run installs it)."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from test_app import depth_result, result
from test_server import NCBENCH, Server, build_tiny_release, free_port, ncbench
from tornado.websocket import websocket_connect

from ncbench.leaderboard.store import BUILTIN_TEAM, ORIGIN_ORGANIZER, Store, record_utility

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


class Browser:
    """Headless Chromium with its DevTools endpoint; ``text(js)`` evaluates in the page."""

    def __init__(self, url: str):
        self.profile = tempfile.mkdtemp()
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        active = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.is_file() and active.read_text().strip()):
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        port = active.read_text().split()[0]
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        self.endpoint = next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"]
        self.calls = 0

    def evaluate(self, expression: str):
        async def call():
            connection = await websocket_connect(self.endpoint)
            self.calls += 1
            connection.write_message(
                json.dumps({"id": self.calls, "method": "Runtime.evaluate", "params": {"expression": expression}})
            )
            while True:
                message = json.loads(await connection.read_message())
                if message.get("id") == self.calls:
                    connection.close()
                    # No result while the page navigates (its context is gone): the caller polls.
                    return message.get("result", {}).get("result", {}).get("value")

        return asyncio.run(call())

    def wait_for_text(self, needle: str, timeout: float = 60, *, then_click: str | None = None) -> str:
        """The page's text once it holds ``needle`` (or at the timeout). ``then_click``: the label
        of a control to click on every poll until then (a click made while the app is still
        connecting is lost, so it is repeated rather than trusted)."""
        deadline = time.monotonic() + timeout
        while True:
            if then_click is not None:
                self.evaluate(
                    "(l => l && l.click())([...document.querySelectorAll('label')]"
                    f".find(l => l.innerText.trim() === {json.dumps(then_click)}))"
                )
            text = self.evaluate("document.body ? document.body.innerText + document.body.textContent : ''") or ""
            if needle in text or time.monotonic() > deadline:
                return text
            time.sleep(1.0)

    def open(self, url: str) -> None:
        self.evaluate(f"window.location.href = {json.dumps(url)}")

    def headers(self) -> list[str]:
        shown = self.evaluate("[...document.querySelectorAll('h1, h2')].map(e => e.innerText.trim()).join('\\n')")
        return (shown or "").splitlines()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


def test_a_visitor_sees_a_team_scored_through_the_api(tmp_path):
    build_tiny_release(tmp_path / "release")
    store = tmp_path / "store"
    challenge_id = ncbench("challenge", "publish", tmp_path / "release", "--store", store).stdout.split()[-1]
    token = ncbench("team", "add", "Visible-Team", "--store", store).stdout.strip()
    board_port = free_port()
    server = Server(store, "--board-port", board_port)
    browser = None
    try:
        sub = tmp_path / "sub.h5"
        assert ncbench("attack", "run", "chance", "--release", tmp_path / "release", "--out", sub).returncode == 0
        env = {"NCBENCH_SERVER": server.url, "NCBENCH_TOKEN": token}
        submitted = ncbench("submit", sub, "--challenge", challenge_id, env=env)
        assert submitted.returncode == 0, submitted.stderr
        browser = Browser(f"http://127.0.0.1:{board_port}/")
        front = browser.wait_for_text("Best re-identification")
        assert "Best re-identification" in front, front
        assert "Deploy" not in front  # viewer mode: no developer toolbar for visitors
        # Open the Self-reported page as a visitor would: click its entry in the sidebar.
        page = browser.wait_for_text("visible-team/chance", then_click="Self-reported")
        assert "visible-team/chance" in page, page
        assert "None" not in page
    finally:
        if browser is not None:
            browser.close()
        server.stop()


# (URL slug, the page's header): every page of the board.
PAGES = (
    ("matrix", "Best re-identification: attack x preset"),
    ("verified", "Verified track: attack code the organizers ran on fresh hidden releases"),
    ("self-reported", "Self-reported submissions"),
    ("challenges", "Challenges"),
    ("submission", "Submission details"),
    ("privacy-utility", "Privacy vs utility"),
    ("privacy-depth", "Privacy vs depth"),
    ("take-part", "Take part"),
)
# What a visitor must never read: an exception, a traceback, a path on the server.
LEAKS = ("Traceback", "Error:", "Exception", "encountered an error", "site-packages", str(Path(__file__).parents[1]))


def filled_store(path: Path) -> None:
    """A small store with something on every page: organizer runs (one by the built-in attack
    named "chance", at two depths), a team's file, a closed challenge, utility runs."""
    with Store(path) as store:
        for score in (
            result("nc7-reid-a", "nc7", "gram-hungarian", 0.9, "1", positions=0.75),
            result("nc7-reid-a", "nc7", "chance", 0.05, "2"),
            result("linear-reid-a", "linear", "gram-hungarian", 0.02, "3", n=50),
            depth_result("d16", 16, "gram-hungarian", 0.4, "4"),
            depth_result("d16", 16, "chance", 0.05, "5"),
        ):
            store.record_score(score, team=BUILTIN_TEAM, origin=ORIGIN_ORGANIZER)
        store.record_score(result("nc7-reid-a", "nc7", "my-attack", 0.5, "6"), team="alice")
        store.close_challenge("linear-reid-a")
        record_utility(
            store,
            [
                {"preset": "nc7", "label": "effusion", "auc": 0.70, "model_kind": "encoded"},
                {"preset": "nc7", "label": "effusion", "auc": 0.90, "model_kind": "raw"},
            ],
        )


@pytest.mark.parametrize("filled", [False, True], ids=["empty", "filled"])
def test_every_page_opens_by_its_link_without_an_error(tmp_path, filled):
    db = tmp_path / "board.db"
    filled_store(db) if filled else Store(db).close()
    port = free_port()
    board = subprocess.Popen(
        [NCBENCH, "leaderboard", "serve", "--db", str(db), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    browser = None
    try:
        browser = Browser(f"http://127.0.0.1:{port}/?page=matrix")
        for slug, header in PAGES:
            browser.open(f"http://127.0.0.1:{port}/?page={slug}")
            deadline = time.monotonic() + 60
            while header not in browser.headers():
                assert time.monotonic() < deadline, (slug, browser.headers())
                time.sleep(0.5)
            time.sleep(2)  # the rest of the page (and any error) renders after its header
            text = browser.wait_for_text("", timeout=0)
            leaked = [leak for leak in LEAKS if leak in text]
            assert not leaked, (slug, leaked, text[:2000])
            assert "None" not in text.replace("Nonee", ""), (slug, text[:2000])
    finally:
        if browser is not None:
            browser.close()
        board.terminate()
        board.wait(timeout=30)


if __name__ == "__main__":  # a manual look: python tests/test_board_browser.py URL
    print(Browser(sys.argv[1]).wait_for_text(os.environ.get("NEEDLE", "ncbench")))
