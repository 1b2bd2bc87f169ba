"""Running the app: a bound socket, uvicorn with guarded connections and a clean Ctrl-C/SIGTERM.

Stack: Starlette (routing, requests, streaming responses) served by uvicorn (an ASGI server
meant for production; h11 for HTTP/1.1). Both are small, pure Python and widely used.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but nothing else: a client
that opens a connection and sends nothing, trickles its headers, or declares a body it never
sends holds a socket for ever, and `limit_concurrency` answers each request over the limit
with a 503 and a log line only once the request has been parsed. `_guarded_protocol` adds what
is missing to uvicorn's h11 protocol: a header deadline, a body deadline and a connection cap
checked the moment a connection arrives (a canned answer, no parsing). Overload is logged as
one line per kind at most every few seconds, with a count (`OverloadLog`), never a line or a
traceback per connection.
"""

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import math
import signal
import socket
import threading
import time
from typing import Iterator

from gpt2tf import settings
from gpt2tf.errors import UserError

log = logging.getLogger(__name__)
DEFAULT_SHUTDOWN_GRACE_S = 5.0  # in-flight requests get this long after Ctrl-C / SIGTERM
FORCED_STOP_S = 2.0  # after a second Ctrl-C, streams get this long to write their last event
OVERLOAD_LOG_EVERY_S = 10.0

Connections = settings.make_config(
    "Connections", settings.CONNECTIONS,
    "How long a client may take to send a request, and how many may be connected.")


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0 = any free port), or UserError; uvicorn listens."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"--port must be an integer in [0, 65535], got {port!r}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UserError(f"cannot resolve --host {host!r}: {e}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; is another server"
                        " running there? Pick another --port") from None
    return sock


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address.lower() == "localhost"


class OverloadLog:
    """One log line per kind of trouble every `every_s` seconds at most, saying how often it
    happened: under a flood of bad or slow connections the log stays a few lines long."""

    def __init__(self, logger: logging.Logger, every_s: float = OVERLOAD_LOG_EVERY_S):
        self.logger, self.every_s = logger, every_s
        self.counts: collections.Counter = collections.Counter()  # since start (tests read it)
        self._unreported: collections.Counter = collections.Counter()
        self._last: dict[str, float] = {}

    def note(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        self._unreported[kind] += 1
        now = time.monotonic()
        if now - self._last.get(kind, -math.inf) < self.every_s:
            return
        n = self._unreported.pop(kind)
        self._last[kind] = now
        since = f" ({n} times in the last {self.every_s:g} s)" if n > 1 else ""
        self.logger.warning("%s%s", message, since)

    def loop_exception_handler(self, loop, context: dict) -> None:
        """asyncio's own complaints (e.g. accept() out of file descriptors, once per loop
        turn), rate-limited; a traceback at most once per kind and interval."""
        message = str(context.get("message", "asyncio error"))
        if message.startswith("socket.accept() out of system resource"):
            self.note("accept", "cannot accept connections: out of file descriptors (raise"
                      " `ulimit -n` or lower --max_connections)")
            return
        now = time.monotonic()
        if now - self._last.get(message, -math.inf) >= self.every_s:
            self._last[message] = now
            loop.default_exception_handler(context)


class _QuietLogger:
    """uvicorn's error logger, with its per-request warnings ("Invalid HTTP request
    received.") sent through the OverloadLog; errors (bugs) pass unchanged."""

    def __init__(self, logger: logging.Logger, overload: OverloadLog):
        self._logger, self._overload = logger, overload

    def warning(self, msg, *args, **kwargs) -> None:
        self._overload.note(f"uvicorn: {msg}", str(msg) % args if args else str(msg))

    def __getattr__(self, name):
        return getattr(self._logger, name)


def _canned(status: str, message: str, code: str, type: str = "invalid_request_error",
            extra: bytes = b"") -> bytes:
    """A whole HTTP response with OpenAI's error body, written without h11 just before the
    connection is closed."""
    body = json.dumps({"error": {"message": message, "type": type, "param": None,
                                 "code": code}}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n").encode() + extra + b"\r\n" + body


def _guarded_protocol(limits: Connections, overload: OverloadLog):
    """uvicorn's h11 protocol with a connection cap and header and body deadlines."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    too_many = _canned("503 Service Unavailable", "the server has too many open connections;"
                       " retry shortly", "too_many_connections", "server_error",
                       b"retry-after: 1\r\n")
    late_headers = _canned("408 Request Timeout", "the request's headers did not arrive"
                           f" within {limits.header_timeout_s:g} s", "request_timeout")
    late_body = _canned("408 Request Timeout", "the request's body did not arrive within"
                        f" {limits.body_timeout_s:g} s", "request_timeout")

    class GuardedH11Protocol(H11Protocol):
        _refused = False
        _timer: asyncio.TimerHandle | None = None
        _phase: str | None = None  # "headers" or "body": what the running deadline waits for
        _got_bytes = False  # of the request being read

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.logger = _QuietLogger(self.logger, overload)

        def connection_made(self, transport):
            if len(self.connections) >= limits.max_connections:
                # Refused before any parsing or state: a flood costs a write and a close each.
                self._refused = True
                transport.write(too_many)
                transport.close()
                overload.note("connections", f"refused connections: {len(self.connections)}"
                              " are open (--max_connections)")
                return
            super().connection_made(transport)
            self._arm("headers")

        def connection_lost(self, exc):
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if (self.cycle is None or self.cycle.response_complete) and self._phase != "headers":
                self._arm("headers")  # the first bytes of the next request on this connection
            self._got_bytes = True
            before = self.cycle
            super().data_received(data)
            self._follow(before)

        def on_response_complete(self) -> None:
            before = self.cycle
            super().on_response_complete()
            self._follow(before)  # a pipelined request may have started

        def _follow(self, before) -> None:
            """Move the deadline on as the request advances: headers in, then body in."""
            if self.transport.is_closing():
                return
            if self.cycle is not before:  # a request's headers arrived
                self._disarm()
                self._got_bytes = False
                if self.conn.their_state is h11.SEND_BODY:
                    self._arm("body")
            elif self._phase == "body" and self.conn.their_state is not h11.SEND_BODY:
                self._disarm()

        def _arm(self, phase: str) -> None:
            self._disarm()
            seconds = limits.header_timeout_s if phase == "headers" else limits.body_timeout_s
            self._phase = phase
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, None

        def _expired(self) -> None:
            phase, self._timer, self._phase = self._phase, None, None
            if self.transport.is_closing():
                return
            cycle = self.cycle if self.cycle is not None and not self.cycle.response_complete \
                else None
            if phase == "headers":
                if self._got_bytes:  # an idle connection is closed silently, as keep-alive's
                    self.transport.write(late_headers)
                overload.note("header_timeout", "closed connections whose request headers"
                              f" did not arrive within {limits.header_timeout_s:g} s"
                              " (--header_timeout_s)")
            else:
                if cycle is not None and not cycle.response_started:
                    self.transport.write(late_body)
                overload.note("body_timeout", "closed connections whose request body did not"
                              f" arrive within {limits.body_timeout_s:g} s (--body_timeout_s)")
            if cycle is not None:  # the app, waiting for the body, sees a disconnect
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()

    return GuardedH11Protocol


def _uvicorn_server(app, *, log_level: str, grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
                    connections: Connections = Connections()):
    import uvicorn

    overload = OverloadLog(log)
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is not None:
        metrics.watch_connections(overload.counts)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its graceful shutdown, so Ctrl-C would end in
            # KeyboardInterrupt and SIGTERM in a signal death; a clean stop should exit 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets=None):
            asyncio.get_running_loop().set_exception_handler(overload.loop_exception_handler)
            await super().startup(sockets)

        async def shutdown(self, sockets=None):
            # In-flight requests get grace_s to finish; then their generation is ended, so
            # they answer with an error event or a 503 before uvicorn's own (later) deadline
            # would cancel them mid-response.
            batcher = getattr(getattr(app, "state", None), "batcher", None)
            end = batcher.close if batcher is not None else (lambda: None)
            timer = asyncio.get_running_loop().call_later(grace_s, end)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()
            if self.force_exit:
                await self._forced_stop(end)

        async def _forced_stop(self, end) -> None:
            """A second Ctrl-C: uvicorn would leave the running requests to be cancelled
            (a CancelledError traceback each, streams cut mid-way). Instead generation ends
            now, every stream writes its error event and [DONE], connections that are still
            open are closed, and the worker thread is stopped."""
            log.info("stopping now: ending %d running requests", len(self.server_state.tasks))
            end()
            await self._settle(FORCED_STOP_S)
            for connection in list(self.server_state.connections):
                connection.transport.close()  # a waiting request sees its client leave
            await self._settle(FORCED_STOP_S)
            for task in self.server_state.tasks:
                task.cancel()
            await self.lifespan.shutdown()

        async def _settle(self, seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while self.server_state.tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    config = uvicorn.Config(
        app, log_level=log_level, lifespan="on",
        http=_guarded_protocol(connections, overload),
        timeout_keep_alive=connections.idle_timeout_s,
        timeout_graceful_shutdown=grace_s + 5,
        access_log=log_level == "debug" or log_level == "info",
    )
    server = Server(config)
    server.overload = overload
    return server


@contextlib.contextmanager
def serve_in_thread(app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
                    connections: Connections = Connections()) -> Iterator[str]:
    """Run `app` on host:port (0: a free port) in a background thread; yield its base URL.

    The uvicorn server is `serve_in_thread.last` (tests read its OverloadLog)."""
    sock = bind_socket(host, port)
    server = _uvicorn_server(app, log_level=log_level, grace_s=grace_s, connections=connections)
    serve_in_thread.last = server
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(grace_s + 30)
        sock.close()


def _raise_file_limit(wanted: int) -> None:
    """Let the process hold `wanted` descriptors if the hard limit allows (the soft limit is
    often 1024, below a useful --max_connections)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("the file descriptor limit (%d) is below --max_connections: past it"
                        " connections wait in the backlog", new)


def serve(source, *, host: str, port: int, limits: dict, batch_invariant: bool = True,
          shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S, log_level: str = "info",
          precision: str = "fp32") -> None:
    """Load `source` (a ModelSource) and serve it on host:port until Ctrl-C or SIGTERM.

    `limits` holds the values of the LIMITS, CONNECTIONS and ACCESS settings."""
    import os

    from gpt2tf.decode.generator import Generator
    from gpt2tf.serve.app import Access, Service
    from gpt2tf.serve.schema import Limits

    def pick(group):
        return {s.name: limits[s.name] for s in group if s.name in limits}

    access = pick(settings.ACCESS)
    access["api_key"] = access.get("api_key") or os.environ.get(settings.API_KEY_ENV, "")
    sock = bind_socket(str(host), port)  # fail on a busy port before the model loads
    bound = sock.getsockname()[0]
    if not access.get("allowed_hosts") and not is_loopback(bound) and \
            not ipaddress.ip_address(bound.split("%")[0]).is_unspecified:
        # A specific address: clients name it in their Host header.
        access["allowed_hosts"] = ",".join([*Access.LOOPBACK_HOSTS, _host_name(bound)])
    access = Access(**access)
    connections = Connections(**pick(settings.CONNECTIONS))
    limits = Limits(**pick(settings.LIMITS))
    _raise_file_limit(connections.max_connections + 64)
    try:
        with Generator(source, precision=precision) as gen:
            app = Service(gen, model_id=source.name, limits=limits, access=access,
                          batch_invariant=batch_invariant).app()
            server = _uvicorn_server(app, log_level=log_level, grace_s=shutdown_grace_s,
                                     connections=connections)
            sock.listen(2048)  # from here connections wait in the backlog until uvicorn runs
            where = sock.getsockname()
            if not is_loopback(bound) and not access.api_key:
                log.warning("serving on %s without an API key: anyone on the network can use"
                            " the model (set --api_key or $%s)", host, settings.API_KEY_ENV)
            log.info("serving %s on http://%s:%d/ (Ctrl-C stops)", source.name, host, where[1])
            server.run(sockets=[sock])
    finally:
        sock.close()


def _host_name(address: str) -> str:
    return f"[{address}]" if ":" in address else address
