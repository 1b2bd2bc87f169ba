"""The HTTP application: a browser page at / and OpenAI's completions API.

Starlette routes the requests; the `Batcher` runs the model. Endpoints: POST /v1/completions
(JSON or server-sent events), GET /v1/models, GET /health, GET /stats, GET /metrics (Prometheus), and the page.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import time
from pathlib import Path
from typing import AsyncIterator

from gpt2tf.decode.engine import sample_seed
from gpt2tf.serve.batcher import Batcher, ContinuousBatcher, QueueFull, _Job, _Row
from gpt2tf.serve.metrics import CONTENT_TYPE, Metrics
from gpt2tf.serve.schema import ApiError, CompletionRequest, Limits, parse_request

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # The page loads only its own script and style; nothing inline, so injected markup is inert.
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self';"
     b" img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
]



def _error_response(err: ApiError):
    from starlette.responses import JSONResponse

    headers = {"retry-after": "1"} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; the limit is {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream:
    """A server-sent events response that always watches for the client going away.

    On disconnect the body generator is closed (its `finally` cancels the rows), whatever ASGI
    spec version the server announces.
    """

    def __init__(self, events: AsyncIterator[str]):
        self.events = events

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]})
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        task = None
        try:
            while True:
                # Wait for the next event and for a disconnect at once: a request still in the
                # queue produces no events, yet its client may leave.
                task = asyncio.ensure_future(self.events.__anext__())
                await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not task.done():
                    return
                try:
                    chunk = task.result()
                except StopAsyncIteration:
                    break
                task = asyncio.ensure_future(send(
                    {"type": "http.response.body", "body": chunk.encode(), "more_body": True}))
                await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not task.done():
                    return
                task.result()
            task = None
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke while sending
            return
        finally:
            # Also runs when the server cancels us (shutdown): settle what is in flight, then
            # close the generator, whose own `finally` cancels the request's rows.
            watcher.cancel()
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await self.events.aclose()


class Service:
    """The app's state: the model, its batcher and the limits; builds the Starlette app."""

    def __init__(self, gen, *, model_id: str, limits: Limits = Limits(),
                 batch_invariant: bool = True):
        self.gen = gen
        self.model_id = model_id
        self.limits = limits
        self.created = int(time.time())
        # The fast path decodes rows at their own positions: iteration-level batching. The TF
        # graph (bf16, or the fallback) decodes a batch in lockstep: static batches.
        scheduler = ContinuousBatcher if getattr(gen, "engine_name", "") == "fast" else Batcher
        self.batcher = scheduler(gen, max_batch=limits.max_batch, queue_size=limits.queue_size,
                                 batch_invariant=batch_invariant)
        self.metrics = Metrics(self.batcher)
        self.requests = 0

    # -- endpoints --

    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

    async def prometheus(self, request):
        from starlette.responses import Response

        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def stats(self, request):
        from starlette.responses import JSONResponse

        b = self.batcher
        return JSONResponse({
            "requests": self.requests, "queued_rows": b.queued_rows,
            "active_rows": b.active_rows, "batches": b.batches,
            "tokens_sampled": b.tokens_sampled, "rows_cancelled": b.rows_cancelled,
            "max_batch": b.max_batch, "batch_invariant": b.batch_invariant,
        })

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "gpt2tf"}

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        from starlette.responses import JSONResponse

        if request.path_params["model"] != self.model_id:
            raise ApiError(404, f"The model {request.path_params['model']!r} does not exist",
                           param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def page(self, request):
        from starlette.responses import FileResponse

        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def completions(self, request):
        from starlette.responses import JSONResponse

        raw = await _read_body(request, self.limits.max_body_bytes)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nested too deep: not a request
            raise ApiError(400, "We could not parse the JSON body of your request: send a JSON"
                           " object with Content-Type: application/json",
                           code="invalid_json") from None
        req = parse_request(body, self.gen, self.limits, self.model_id)
        job = self._submit(req)
        self.requests += 1
        meta = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_id}
        if req.stream:
            return _EventStream(self._sse(job, req, meta))
        texts, finish, tokens = await self._collect(job, req, request.receive)
        if texts is None:  # the client went away; nobody reads this
            return JSONResponse({}, status_code=499)
        echo = self._echo_texts(req)
        choices = [{"text": echo[i] + texts[i], "index": i, "logprobs": None,
                    "finish_reason": finish[i]} for i in range(len(texts))]
        return JSONResponse({**meta, "choices": choices, "usage": self._usage(req, tokens)})

    # -- helpers --

    def _submit(self, req: CompletionRequest) -> _Job:
        job = _Job(asyncio.get_running_loop())
        eot = None if req.ignore_eos else self.gen.encoder.eot_token
        for p, context in enumerate(req.contexts):
            for i in range(req.n):
                # choice i of every prompt uses stream (seed, i): a choice's text depends only
                # on its prompt, settings and seed, never on what else is running.
                job.rows.append(_Row(
                    job, p * req.n + i, context, req.params, sample_seed(req.seed, i),
                    req.max_tokens, req.stops, eot, self.gen.encoder))
        try:
            self.batcher.submit(job.rows)
        except QueueFull as e:
            raise ApiError(503, str(e), type="server_error", code="server_busy") from None
        return job

    def _echo_texts(self, req: CompletionRequest) -> list[str]:
        rows = len(req.contexts) * req.n
        if not req.echo:
            return [""] * rows
        enc = self.gen.encoder
        texts = [enc.decode([t for t in c if t < enc.n_vocab]) for c in req.contexts]
        return [texts[i // req.n] for i in range(rows)]

    @staticmethod
    def _usage(req: CompletionRequest, tokens: list[int]) -> dict:
        prompt = sum(len(c) for c in req.contexts)
        return {"prompt_tokens": prompt, "completion_tokens": sum(tokens),
                "total_tokens": prompt + sum(tokens)}

    async def _events(self, job: _Job) -> AsyncIterator[tuple[int, str, str | None]]:
        """Yield (index, text, finish_reason) until every row has finished."""
        left, first = len(job.rows), True
        while left:
            index, piece, finish = await job.events.get()
            if finish == "error":
                self.metrics.requests.labels("interrupted").inc()
                raise ApiError(503, "generation was interrupted (the server is stopping or"
                               " failed); retry", type="server_error", code="interrupted")
            if first:
                self.metrics.time_to_first_token.observe(time.monotonic() - job.started)
                first = False
            if finish is not None:
                left -= 1
            yield index, piece, finish
        self.metrics.latency.observe(time.monotonic() - job.started)
        self.metrics.requests.labels("completed").inc()

    async def _collect(self, job: _Job, req: CompletionRequest, receive):
        """All rows' texts, or (None, ...) if the client disconnected first (rows cancelled)."""
        rows = len(job.rows)
        parts, finish = [[] for _ in range(rows)], [None] * rows

        async def gather():
            async for index, piece, reason in self._events(job):
                parts[index].append(piece)
                finish[index] = reason

        work = asyncio.ensure_future(gather())
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
                job.cancel()
        if not work.done() or work.cancelled():
            return None, None, None
        work.result()  # re-raise ApiError
        return ["".join(p) for p in parts], finish, [r.n_tokens for r in job.rows]

    async def _sse(self, job: _Job, req: CompletionRequest, meta: dict) -> AsyncIterator[str]:
        def chunk(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        extra = {"usage": None} if req.include_usage else {}
        try:
            for index, text in enumerate(self._echo_texts(req)):
                if text:
                    yield chunk({**meta, "choices": [{"text": text, "index": index,
                                 "logprobs": None, "finish_reason": None}], **extra})
            try:
                async for index, piece, finish in self._events(job):
                    yield chunk({**meta, "choices": [{"text": piece, "index": index,
                                 "logprobs": None, "finish_reason": finish}], **extra})
            except ApiError as e:
                yield chunk(e.body())
                return
            if req.include_usage:
                usage = self._usage(req, [r.n_tokens for r in job.rows])
                yield chunk({**meta, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # no-op for finished rows; stops the rest if the client left

    # -- the app --

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.batcher.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.stop)

    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        async def api_error(request, exc: ApiError):
            return _error_response(exc)

        async def http_error(request, exc: HTTPException):
            kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            message = {404: f"no route for {request.method} {request.url.path}",
                       405: f"{request.method} is not allowed on {request.url.path}"}.get(
                exc.status_code, str(exc.detail))
            return _error_response(ApiError(exc.status_code, message, code=kind))

        async def server_error(request, exc: Exception):
            log.exception("unhandled error on %s", request.url.path)
            return _error_response(ApiError(500, "internal server error", type="server_error"))

        routes = [
            Route("/", self.page),
            Route("/health", self.health),
            Route("/stats", self.stats),
            Route("/metrics", self.prometheus),
            Route("/v1/models", self.models),
            Route("/v1/models/{model:path}", self.model),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
        app = Starlette(
            routes=routes,
            middleware=[Middleware(_SecurityHeaders)],
            exception_handlers={ApiError: api_error, HTTPException: http_error,
                                Exception: server_error},
            lifespan=self.lifespan,
        )
        app.state.batcher = self.batcher  # the server ends generation when its grace period ends
        return app


class _SecurityHeaders:
    """Pure ASGI middleware (streaming-safe) that adds SECURITY_HEADERS to every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

