"""What the HTTP server bounds per connection and per request, beyond what uvicorn bounds itself.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) and caps a request head's
size (h11's incomplete-event limit), but it waits forever for a head or a body to arrive and it
accepts every connection: a client that opens thousands of sockets and sends a byte now and then
(slowloris) holds them all until the process runs out of file descriptors. :class:`GuardedH11`
adds what a reverse proxy would (nginx's ``client_header_timeout``, ``client_body_timeout``):

- a request head must be complete ``header_timeout_s`` after the connection opened or the
  previous response ended, however slowly its bytes come;
- while a body is being sent, ``body_timeout_s`` without a byte closes the connection (unless
  the server itself stopped reading: then the client is not the slow one);
- a body the server answered before it ended (a refusal) is read and dropped for at most
  ``drain_timeout_s`` after the answer (nginx's ``lingering_time``), then the connection closes;
- past ``max_connections`` open connections, a new one is closed as soon as it is accepted.

:class:`RequestGuard` is the ASGI side: one log line per request, a 431 for a request head over
``max_header_bytes`` (h11 bounds only a head still incomplete), a 400 for a request that
declares both ``Content-Length`` and ``Transfer-Encoding`` (proxies and servers that disagree on
which one frames the body let one request hide another: request smuggling), and a 503 for a
request still running when the grace after SIGINT or SIGTERM ends.

``X-Forwarded-For`` names the client only when the organizer names the proxies that send it
(``FORWARDED_ALLOW_IPS``): otherwise anyone who reaches the port could pick the address that the
per-address limits count.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("ncbench.server")


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """The server's per-connection bounds (``ncbench server`` options of the same names)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: int = 5  # uvicorn's keep-alive timeout
    max_connections: int = 1000
    max_header_bytes: int = 16 * 1024  # h11's default, said out loud
    shutdown_timeout_s: int = 5  # requests still running at SIGTERM get this long, then are cancelled
    drain_timeout_s: float = 10.0  # a refused body is dropped this long after the answer, then closed
    # The proxies whose X-Forwarded-For names the client (uvicorn's syntax: addresses or networks,
    # comma-separated; "*" any): none unless the organizer sets FORWARDED_ALLOW_IPS.
    forwarded_allow_ips: str = dataclasses.field(
        default_factory=lambda: os.environ.get("FORWARDED_ALLOW_IPS", "").strip()
    )


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a head timeout, a body timeout, a drain timeout and a
    connection cap (``limits`` is set on the subclass :func:`protocol` makes)."""

    limits = ConnectionLimits()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (a bad Content-Length, a NUL in the path, no Host) gets the
        API's JSON 400, not uvicorn's plain text, and the connection closes."""
        body = json.dumps({"detail": msg}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        for event in (
            h11.Response(status_code=400, headers=[*headers, (b"connection", b"close")], reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "head", "body", "drain" or None: what the timer watches
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            transport.abort()
            return
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def _watch(self) -> None:
        """Arm the timer the connection's state calls for: the head's (once per request, not
        reset by the bytes of the head), the body's (reset by each chunk), the drain's (once,
        from the answer to a request whose body still comes), or none."""
        if self.transport.is_closing():
            return
        theirs, ours = self.conn.their_state, self.conn.our_state
        if theirs is h11.IDLE:
            phase, seconds = "head", self.limits.header_timeout_s
        elif theirs is h11.SEND_BODY and ours in (h11.DONE, h11.MUST_CLOSE):
            phase, seconds = "drain", self.limits.drain_timeout_s
        elif theirs is h11.SEND_BODY:
            phase, seconds = "body", self.limits.body_timeout_s
        else:
            phase, seconds = None, None
        if seconds is None:
            self._disarm()
        elif phase == "body" or phase != self._phase:
            self._arm(seconds)
        self._phase = phase

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._phase == "body" and self.flow.read_paused and self.conn.their_state is h11.SEND_BODY:
            self._arm(self.limits.body_timeout_s)  # the app is not reading: wait for it, not the client
            return
        if not self.transport.is_closing():
            self.transport.close()


def raise_open_files(needed: int) -> int:
    """Raise this process's soft limit of open files towards its hard limit, to at least
    ``needed`` where the hard limit allows (children inherit it); returns the soft limit now. A
    server capped at ``--max-connections`` 1000 needs more than the usual soft limit of 1024
    (its database, its workers' pipes and files come on top)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def protocol(limits: ConnectionLimits) -> type[GuardedH11]:
    """The protocol class uvicorn builds each connection with, under ``limits``."""
    return type("GuardedH11", (GuardedH11,), {"limits": limits})


class Server(uvicorn.Server):
    """uvicorn's server, which also calls ``on_exit(signum)`` the moment a SIGINT or SIGTERM
    asks it to stop, while it still finishes the requests in flight."""

    def __init__(self, config: uvicorn.Config, *, on_exit: Callable[[int], None]):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        self.on_exit(sig)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, without raising the signals again on the way out: ``on_exit`` has them."""
        signals = (signal.SIGINT, signal.SIGTERM)
        found = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in found.items():
                signal.signal(sig, handler)


class CancelledRequests(logging.Filter):
    """Drops uvicorn's line about the requests it cancels when the grace after SIGINT or SIGTERM
    ends ("Cancel N running task(s), ..."): :class:`RequestGuard` logs each of them, as a 503."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("Cancel ") and "graceful shutdown" in record.getMessage())


def log_requests_to_stderr() -> None:
    """Send :class:`RequestGuard`'s lines to stderr, one per request, with a UTC time."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)sZ %(message)s", "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def uvicorn_config(app, limits: ConnectionLimits, **options):
    """A uvicorn configuration of ``app`` under ``limits``, without uvicorn's access log (it
    would log query strings; :class:`RequestGuard` logs instead). ``X-Forwarded-For`` is read
    only from ``limits.forwarded_allow_ips``; with none named, the connection's own address is
    the client's."""
    config = uvicorn.Config(
        app,
        http=protocol(limits),
        timeout_keep_alive=limits.idle_timeout_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_graceful_shutdown=limits.shutdown_timeout_s,
        access_log=False,
        proxy_headers=bool(limits.forwarded_allow_ips),
        forwarded_allow_ips=limits.forwarded_allow_ips or None,
        **options,
    )
    quiet = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, CancelledRequests) for f in quiet.filters):
        quiet.addFilter(CancelledRequests())
    return config


class RequestGuard:
    """ASGI middleware: refuses a request head over ``limits.max_header_bytes`` (431) and
    ambiguous body framing (400), answers 503 for a request cancelled by the server's stop, and
    logs one line per request: method, path (never the query string), status, milliseconds, and
    the team the token authenticated (``request.state.team``) or ``anonymous``. A token never
    reaches the log."""

    def __init__(self, app, limits: ConnectionLimits | None = None):
        self.app = app
        self.limits = limits or ConnectionLimits()
        self._told_forwarded = False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees when the app ends without a response
        responding = False
        headers = {name for name, _ in scope["headers"]}

        async def sending(message) -> None:
            nonlocal status, responding
            if message["type"] == "http.response.start":
                status, responding = message["status"], True
            await send(message)

        try:
            if head_bytes(scope) > self.limits.max_header_bytes:
                await _refuse(sending, 431, b"request head larger than %d bytes" % self.limits.max_header_bytes)
            elif b"content-length" in headers and b"transfer-encoding" in headers:
                await _refuse(
                    sending, 400, b"both Content-Length and Transfer-Encoding: the body's length is ambiguous"
                )
            else:
                if b"x-forwarded-for" in headers and not self.limits.forwarded_allow_ips:
                    self._tell_forwarded()
                await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when the grace after SIGINT or SIGTERM ends. The
            # request ends here (an upload removed its partial file on the way up), not as a
            # traceback and a plain-text 500: a 503 the client can act on, if its answer has not begun.
            asyncio.current_task().uncancel()
            if not responding:
                await _refuse(sending, 503, b"the server is stopping: send the request again once it is back")
        finally:
            team = scope.get("state", {}).get("team") or "anonymous"
            path = scope["path"].encode("unicode_escape").decode("ascii")[:200]
            log.info("%s %s %d %.1fms %s", scope["method"], path, status, (time.perf_counter() - started) * 1000, team)

    def _tell_forwarded(self) -> None:
        """Once: say that the server ignores X-Forwarded-For, which a proxy in front sends."""
        if not self._told_forwarded:
            self._told_forwarded = True
            log.warning(
                "warning: requests carry X-Forwarded-For, which this server ignores: every client of a "
                "proxy counts as the proxy's one address; name the proxy in FORWARDED_ALLOW_IPS (e.g. "
                "FORWARDED_ALLOW_IPS=127.0.0.1 for a proxy on this machine)"
            )


def head_bytes(scope) -> int:
    """The size of a request's head as it came (request line and header lines, CRLFs included),
    from what the server parsed of it: names and values keep their length in ``scope``."""
    target = len(scope.get("raw_path") or scope["path"].encode()) + (
        len(scope["query_string"]) + 1 if scope.get("query_string") else 0
    )
    line = len(scope["method"]) + 1 + target + len(" HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"]) + 2


async def _refuse(send, status: int, detail: bytes) -> None:
    body = b'{"detail":"' + detail + b'"}'
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
