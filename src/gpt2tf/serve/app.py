"""The HTTP application: a browser page at / and OpenAI's completions API.

Starlette routes the requests; the `Batcher` runs the model. Endpoints: POST /v1/completions
(JSON or server-sent events), GET /v1/models, GET /health, GET /stats, GET /metrics (Prometheus), and the page.

Before any route runs, `_Gate` checks who is asking: the Host header against an allow-list
(a DNS-rebinding page names its own host), the Origin header (a page on another site may not
drive the server unless --allowed_origins lists it) and, when the server has one, the API key.
Prompts are tokenized on a thread pool, so a megabyte of text never stalls the event loop.
"""

import asyncio
import codecs
import contextlib
import copy
import hmac
import json
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator

from gpt2tf import settings
from gpt2tf.decode.engine import sample_seed
from gpt2tf.serve.batcher import Batcher, ContinuousBatcher, QueueFull, _Job, _Row
from gpt2tf.serve.metrics import CONTENT_TYPE, Metrics
from gpt2tf.errors import FieldError, UserError
from gpt2tf.serve.schema import ApiError, CompletionRequest, Limits, parse_request, show

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

TOKENIZER_THREADS = min(4, os.cpu_count() or 1)  # tiktoken releases the GIL while it works

Access = settings.make_config(
    "Access", settings.ACCESS, "Who may use the server: Host names, web origins, an API key.",
    {"LOOPBACK_HOSTS": ("localhost", "127.0.0.1", "[::1]"),
     "__repr__": lambda self: f"Access(allowed_hosts={self.allowed_hosts!r},"
                              f" allowed_origins={self.allowed_origins!r},"
                              f" api_key={'set' if self.api_key else 'none'})"})


def _error_response(err: ApiError):
    from starlette.responses import JSONResponse

    headers = {"retry-after": "1"} if err.status in (429, 503) else {}
    if err.status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(err.body(), status_code=err.status, headers=headers or None)


def _require_json(request) -> None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        # Also a guard: a cross-site form or a "simple" fetch can only send text/plain,
        # urlencoded or multipart bodies without asking the browser's permission first.
        raise ApiError(415, "send the request body as JSON with Content-Type:"
                       f" application/json (got {show(kind) or 'none'})",
                       code="unsupported_media_type")


async def _read_body(request, limit: int, *, json_only: bool = False) -> bytes:
    """The request's body, at most `limit` bytes (413), JSON only if `json_only` (415)."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; the limit is {limit}",
                       code="request_too_large")
    if json_only:
        _require_json(request)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # the client left, or its body was too slow (the server closed
        # the connection with a 408): nobody reads an answer
        raise ApiError(400, "the client disconnected before its request body arrived",
                       code="client_disconnected") from None
    return b"".join(chunks)


def _split_host(host: str) -> tuple[str, str | None]:
    """"example.com:8000" -> ("example.com", "8000"); "[::1]:80" -> ("[::1]", "80")."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else None
    name, colon, port = host.partition(":")
    return name.rstrip("."), port if colon else None


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class _Gate:
    """Pure ASGI middleware: Host, Origin and API key, checked before any route runs.

    /health is open to all (it says only "ok"; load balancers call it by IP). The page and
    its files need no key (they hold none); the API, /stats and /metrics do.
    """

    def __init__(self, app, access: Access):
        self.hosts = [_split_host(h) for h in _split_list(access.allowed_hosts)
                      or Access.LOOPBACK_HOSTS]
        self.any_host = ("*", None) in self.hosts
        self.origins = {o.rstrip("/").lower() for o in _split_list(access.allowed_origins)}
        self.key = access.api_key.encode() if access.api_key else None
        if self.origins:  # pages of the listed sites may call the API: answer CORS for them
            from starlette.middleware.cors import CORSMiddleware

            app = CORSMiddleware(
                app, allow_origins=["*"] if "*" in self.origins else sorted(self.origins),
                allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"])
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        try:
            host = self._check_host(headers.get(b"host", b"").decode("latin-1"))
            self._check_origin(headers.get(b"origin"), host, scope.get("scheme", "http"))
            preflight = scope["method"] == "OPTIONS" and b"access-control-request-method" in \
                headers and self.origins
            page = scope["path"] == "/" or scope["path"].startswith("/static/")
            if self.key is not None and not preflight and not page:
                self._check_key(headers.get(b"authorization", b""))
        except ApiError as e:
            return await _error_response(e)(scope, receive, send)
        await self.app(scope, receive, send)

    def _check_host(self, host: str) -> str:
        if self.any_host:
            return host
        name, port = _split_host(host)
        for want_name, want_port in self.hosts:
            matches = name == want_name or (want_name.startswith("*.") and
                                            name.endswith(want_name[1:]))
            if matches and (want_port is None or want_port == port):
                return host
        raise ApiError(400, f"this server does not answer to Host {show(host) or 'none'}:"
                       " start it with --allowed_hosts naming that host", code="invalid_host")

    def _check_origin(self, origin: bytes | None, host: str, scheme: str) -> None:
        if origin is None:  # not a browser's cross-site call (they always send Origin)
            return
        origin = origin.decode("latin-1").strip().rstrip("/").lower()
        if origin == f"{scheme}://{host}".lower() or origin in self.origins or \
                "*" in self.origins:
            return
        raise ApiError(403, f"requests from web pages at {show(origin)} are refused: start"
                       " the server with --allowed_origins naming that origin to allow them",
                       code="origin_not_allowed")

    def _check_key(self, authorization: bytes) -> None:
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            raise ApiError(401, "this server needs an API key: send Authorization: Bearer"
                           " <key> (OpenAI's clients do so with api_key=...)",
                           code="invalid_api_key")
        if not hmac.compare_digest(given.strip(), self.key):  # time does not tell how
            # much of a guess was right
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")


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
                 access: Access = Access(), batch_invariant: bool = True):
        self.gen = gen
        self.model_id = model_id
        self.limits = limits
        self.access = access
        self._tokenizer = ThreadPoolExecutor(TOKENIZER_THREADS, "gpt2tf-tokenize")
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

        raw = await _read_body(request, self.limits.max_body_bytes, json_only=True)
        # Parsing and tokenizing a long prompt take a while: off the event loop, so that
        # /health and the running streams are served meanwhile.
        loop = asyncio.get_running_loop()
        req = await loop.run_in_executor(self._tokenizer, self._parse, raw)
        prompt_scores = None
        if req.echo and req.logprobs is not None:  # the prompt's own scores: a forward pass
            prompt_scores = await loop.run_in_executor(self._tokenizer, self._prompt_scores, req)
        job = self._submit(req)
        self.requests += 1
        meta = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_id}
        if req.stream:
            return _EventStream(self._sse(job, req, meta, prompt_scores))
        texts, finish, tokens = await self._collect(job, req, request.receive)
        if texts is None:  # the client went away; nobody reads this
            return JSONResponse({}, status_code=499)
        echo = self._echo_texts(req)
        choices = []
        for i, row in enumerate(job.rows):
            logprobs = None
            if req.logprobs is not None:
                scores = row.scores[:row.n_tokens]  # not <|endoftext|>: it is not in the text
                if prompt_scores is not None:
                    scores = prompt_scores[i // req.n] + scores
                logprobs = self._logprobs(scores, 0)
            choices.append({"text": echo[i] + texts[i], "index": i, "logprobs": logprobs,
                            "finish_reason": finish[i]})
        return JSONResponse({**meta, "choices": choices, "usage": self._usage(req, tokens)})

    # -- helpers --

    def _parse(self, raw: bytes) -> CompletionRequest:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nested too deep: not a request
            raise ApiError(400, "We could not parse the JSON body of your request: send a JSON"
                           " object with Content-Type: application/json",
                           code="invalid_json") from None
        return parse_request(body, self.gen, self.limits, self.model_id)

    def _submit(self, req: CompletionRequest) -> _Job:
        job = _Job(asyncio.get_running_loop())
        eot = None if req.ignore_eos else self.gen.encoder.eot_token
        for p, context in enumerate(req.contexts):
            try:
                state = self.gen.engine.row_state(context, req.params) if req.params.steers \
                    else None
            except FieldError as e:  # a logit_bias token outside the vocabulary
                raise ApiError(400, e.phrased(), param=e.field, code="invalid_value") from None
            for i in range(req.n):
                # choice i of every prompt uses stream (seed, i): a choice's text depends only
                # on its prompt, settings and seed, never on what else is running.
                job.rows.append(_Row(
                    job, p * req.n + i, context, req.params, sample_seed(req.seed, i),
                    req.max_tokens, req.stops, eot, self.gen.encoder,
                    state=copy.deepcopy(state), logprobs=req.logprobs))
        if req.max_tokens == 0:  # nothing to generate (echo scores the prompt alone)
            job.push([(row.index, "", "length", []) for row in job.rows])
            return job
        try:
            self.batcher.submit(job.rows)
        except QueueFull as e:
            raise ApiError(503, str(e), type="server_error", code="server_busy") from None
        return job

    def _prompt_scores(self, req: CompletionRequest) -> list[list[tuple]]:
        """Each prompt's tokens with their log-probabilities and top alternatives (the first
        token has none: nothing precedes it), from the TF graph."""
        out = []
        for context in req.contexts:
            logp, top_ids, top_lp = self.gen.prompt_logprobs(context, req.logprobs)
            out.append([(context[0], None, None)] + [
                (t, float(lp), [(int(a), float(b)) for a, b in zip(ids, lps)])
                for t, lp, ids, lps in zip(context[1:], logp, top_ids, top_lp)])
        return out

    def _token_text(self, token: int) -> str:
        """A token as OpenAI shows it: its text, or bytes:\\xNN... when it is no whole UTF-8."""
        try:
            raw = self.gen.encoder.decode_bytes([token])
        except UserError:
            return ""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def _logprobs(self, scores: list[tuple], offset: int) -> dict:
        """OpenAI's logprobs object for (token, logprob, top) scores whose text starts at
        character `offset` of the choice's text."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, top in scores:
            out["tokens"].append(self._token_text(token))
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(None if top is None else {
                self._token_text(t): lp for t, lp in top})
            out["text_offset"].append(offset)
            try:
                offset += len(decoder.decode(self.gen.encoder.decode_bytes([token])))
            except UserError:
                pass
        return out

    def _eot(self, req: CompletionRequest) -> int | None:
        return None if req.ignore_eos else self.gen.encoder.eot_token

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
            index, piece, finish, scores = await job.events.get()
            if finish == "error":
                self.metrics.requests.labels("interrupted").inc()
                raise ApiError(503, "generation was interrupted (the server is stopping or"
                               " failed); retry", type="server_error", code="interrupted")
            if finish == "failed":  # this request's rows alone; the log has the traceback
                self.metrics.requests.labels("failed").inc()
                raise ApiError(500, "generation failed for this request (a server bug; its"
                               " log has the details)", type="server_error",
                               code="generation_failed")
            if first:
                self.metrics.time_to_first_token.observe(time.monotonic() - job.started)
                first = False
            if finish is not None:
                left -= 1
            yield index, piece, finish, scores
        self.metrics.latency.observe(time.monotonic() - job.started)
        self.metrics.requests.labels("completed").inc()

    async def _collect(self, job: _Job, req: CompletionRequest, receive):
        """All rows' texts, or (None, ...) if the client disconnected first (rows cancelled)."""
        rows = len(job.rows)
        parts, finish = [[] for _ in range(rows)], [None] * rows

        async def gather():
            async for index, piece, reason, _ in self._events(job):
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
            job.cancel()  # no-op for finished rows; stops the others when one row failed
        if not work.done() or work.cancelled():
            return None, None, None
        work.result()  # re-raise ApiError
        return ["".join(p) for p in parts], finish, [r.n_tokens for r in job.rows]

    async def _sse(self, job: _Job, req: CompletionRequest, meta: dict,
                   prompt_scores=None) -> AsyncIterator[str]:
        def chunk(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        extra = {"usage": None} if req.include_usage else {}
        offsets = [0] * len(job.rows)  # characters of each choice's text sent so far
        try:
            for index, text in enumerate(self._echo_texts(req)):
                if text:
                    logprobs = None if prompt_scores is None else self._logprobs(
                        prompt_scores[index // req.n], 0)
                    yield chunk({**meta, "choices": [{"text": text, "index": index,
                                 "logprobs": logprobs, "finish_reason": None}], **extra})
                    offsets[index] = len(text)
            try:
                async for index, piece, finish, scores in self._events(job):
                    logprobs = None
                    if req.logprobs is not None:
                        if finish == "stop" and scores and scores[-1][0] == self._eot(req):
                            scores = scores[:-1]  # <|endoftext|> ended it: not in the text
                        logprobs = self._logprobs(scores, offsets[index])
                    offsets[index] += len(piece)
                    yield chunk({**meta, "choices": [{"text": piece, "index": index,
                                 "logprobs": logprobs, "finish_reason": finish}], **extra})
            except ApiError as e:  # the stream still ends as streams do: with [DONE]
                yield chunk(e.body())
                yield "data: [DONE]\n\n"
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
            self._tokenizer.shutdown(wait=False, cancel_futures=True)

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
            middleware=[Middleware(_SecurityHeaders), Middleware(_Gate, access=self.access)],
            exception_handlers={ApiError: api_error, HTTPException: http_error,
                                Exception: server_error},
            lifespan=self.lifespan,
        )
        app.state.batcher = self.batcher  # the server ends generation when its grace period ends
        app.state.metrics = self.metrics  # the server adds its connection counters
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

