"""The public board as a visitor sees it: Debian's headless Chromium loads the page that
`ncbench server` serves and finds a team scored through the API, and opens every page by its
link on an empty store and on the one `ncbench demo` fills (driven over the DevTools protocol; skipped where
Chromium is not installed; .ci/run installs it)."""

import asyncio
import base64
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
from test_server import NCBENCH, Server, build_tiny_release, free_port, ncbench
from tornado.websocket import websocket_connect

from ncbench.leaderboard.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1280, 900)  # pixels: the width of the screenshots in docs/img
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
                f"--window-size={WINDOW[0]},{WINDOW[1]}",
                "--hide-scrollbars",
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

    def call(self, method: str, params: dict) -> dict:
        """One DevTools command; its result ({} when the page navigated away meanwhile)."""

        async def send():
            connection = await websocket_connect(self.endpoint)
            self.calls += 1
            connection.write_message(json.dumps({"id": self.calls, "method": method, "params": params}))
            while True:
                message = json.loads(await connection.read_message())
                if message.get("id") == self.calls:
                    connection.close()
                    return message.get("result", {})

        return asyncio.run(send())

    def evaluate(self, expression: str):
        # No result while the page navigates (its context is gone): the caller polls.
        return self.call("Runtime.evaluate", {"expression": expression}).get("result", {}).get("value")

    def screenshot(self, path: Path, *, timeout: float = 60) -> None:
        """The window as a PNG, once Streamlit has replaced its loading skeletons."""
        deadline = time.monotonic() + timeout
        while self.evaluate("document.querySelectorAll('[data-testid=stSkeleton]').length") != 0:
            assert time.monotonic() < deadline, "the page kept its loading skeletons"
            time.sleep(0.5)
        time.sleep(3)  # the tables draw their canvases after the skeletons go
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))

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


class Board:
    """``ncbench leaderboard serve`` on ``db`` and a browser on it; ``show(slug, header)`` opens
    a page by its link and returns its text once it has rendered."""

    def __init__(self, db: Path):
        self.port = free_port()
        self.process = subprocess.Popen(
            [NCBENCH, "leaderboard", "serve", "--db", str(db), "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.browser = None
        try:
            self.browser = Browser(f"http://127.0.0.1:{self.port}/?page=matrix")
        except BaseException:
            self.close()
            raise

    def show(self, slug: str, header: str) -> str:
        self.browser.open(f"http://127.0.0.1:{self.port}/?page={slug}")
        deadline = time.monotonic() + 60
        while header not in self.browser.headers():
            assert time.monotonic() < deadline, (slug, self.browser.headers())
            time.sleep(0.5)
        time.sleep(2)  # the rest of the page (and any error) renders after its header
        return self.browser.wait_for_text("", timeout=0)

    def close(self) -> None:
        if self.browser is not None:
            self.browser.close()
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.mark.parametrize("store", ["empty", "demo"])
def test_every_page_opens_by_its_link_without_an_error(tmp_path, request, store):
    """On an empty store and on the one `ncbench demo` fills (every page has something there)."""
    if store == "demo":
        out, first, _, _ = request.getfixturevalue("demo_runs")
        assert first.exit_code == 0, first.output
        db = out / "leaderboard.db"
    else:
        db = tmp_path / "board.db"
        Store(db).close()
    board = Board(db)
    try:
        for slug, header in PAGES:
            text = board.show(slug, header)
            leaked = [leak for leak in LEAKS if leak in text]
            assert not leaked, (slug, leaked, text[:2000])
            assert "None" not in text.replace("Nonee", ""), (slug, text[:2000])
            assert all(section in text for section in SECTIONS.get(slug, ())), (slug, text[:2000])
            if store == "demo":
                assert not any(empty in text for empty in EMPTY_PAGE), (slug, text[:2000])
    finally:
        board.close()


# What a page says when it has nothing to show: none of it may appear on the demo's board.
EMPTY_PAGE = (
    "No organizer runs",
    "No verified runs",
    "No self-reported",
    "No challenge",
    "No scored",
    "No utility",
    "No depth",
    "No transfer",
)
# Sections a page shows on any store, empty or not (below its header).
SECTIONS = {"privacy-depth": ("Transfer against depth",)}


def screenshots(db: Path, folder: Path) -> None:
    """One PNG per page of the board on ``db`` into ``folder`` (docs/img: board-SLUG.png)."""
    board = Board(db)
    try:
        for slug, header in PAGES:
            board.show(slug, header)
            board.browser.screenshot(folder / f"board-{slug}.png")
    finally:
        board.close()


if __name__ == "__main__":
    # python tests/test_board_browser.py URL               the page's text, as a visitor reads it
    # python tests/test_board_browser.py --shots DB DIR    a screenshot of every page (docs/img)
    if sys.argv[1] == "--shots":
        screenshots(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        print(Browser(sys.argv[1]).wait_for_text(os.environ.get("NEEDLE", "ncbench")))
