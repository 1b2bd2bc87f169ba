"""Running the app: a bound socket, uvicorn with a clean Ctrl-C/SIGTERM, and a test helper.

Stack: Starlette (routing, requests, streaming responses) served by uvicorn (an ASGI server
meant for production; h11 for HTTP/1.1). Both are small, pure Python and widely used.
"""

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from typing import Iterator

from gpt2tf.errors import UserError

log = logging.getLogger(__name__)
DEFAULT_SHUTDOWN_GRACE_S = 5.0  # in-flight requests get this long after Ctrl-C / SIGTERM


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


def _uvicorn_server(app, *, log_level: str, grace_s: float = DEFAULT_SHUTDOWN_GRACE_S):
    import uvicorn

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

        async def shutdown(self, sockets=None):
            # In-flight requests get grace_s to finish; then their generation is
            # ended, so they answer with an error event or a 503 before uvicorn's own (later)
            # deadline would cancel them mid-response.
            batcher = getattr(getattr(app, "state", None), "batcher", None)
            if batcher is not None:
                asyncio.get_running_loop().call_later(grace_s, batcher.close)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app, log_level=log_level, lifespan="on",
        timeout_graceful_shutdown=grace_s + 5,
        access_log=log_level == "debug" or log_level == "info",
    )
    return Server(config)


@contextlib.contextmanager
def serve_in_thread(app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    grace_s: float = DEFAULT_SHUTDOWN_GRACE_S) -> Iterator[str]:
    """Run `app` on host:port (0: a free port) in a background thread; yield its base URL."""
    sock = bind_socket(host, port)
    server = _uvicorn_server(app, log_level=log_level, grace_s=grace_s)
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



def serve(source, *, host: str, port: int, limits: dict, batch_invariant: bool = True,
          shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S, log_level: str = "info",
          precision: str = "fp32") -> None:
    """Load `source` (a ModelSource) and serve it on host:port until Ctrl-C or SIGTERM."""
    from gpt2tf.decode.generator import Generator
    from gpt2tf.serve.app import Service
    from gpt2tf.serve.schema import Limits

    limits = Limits(**limits)
    sock = bind_socket(str(host), port)  # fail on a busy port before the model loads
    try:
        with Generator(source, precision=precision) as gen:
            app = Service(gen, model_id=source.name, limits=limits,
                          batch_invariant=batch_invariant).app()
            server = _uvicorn_server(app, log_level=log_level, grace_s=shutdown_grace_s)
            sock.listen(2048)  # from here connections wait in the backlog until uvicorn runs
            where = sock.getsockname()
            log.info("serving %s on http://%s:%d/ (Ctrl-C stops)", source.name, host, where[1])
            server.run(sockets=[sock])
    finally:
        sock.close()
