"""Web server: a browser page at / and an OpenAI-compatible completions API.

Stack: Starlette (routing, requests, streaming responses) served by uvicorn (an ASGI server
meant for production; h11 for HTTP/1.1). Both are small, pure Python and widely used.

One worker thread owns the model. Requests never touch TensorFlow: each choice of a request
becomes a `_Row` in a bounded queue. The worker takes up to `max_batch` waiting rows, left-pads
them into one `Generator.stream` call (each row with its own sampling settings and random
stream) and runs until every row is done: max_tokens, <|endoftext|> or a stop string. New text
goes to each request's asyncio queue as it is sampled. A client that disconnects cancels its
rows; a batch whose rows are all cancelled or done stops at once.

The same seed gives the same completion, however busy the server is. Per-row random streams are
not enough for that: CPU matmul kernels change with the number of rows (one row, a few, eight
or more take different code paths), and the different rounding flips a sampled token now and
then (2 of 64 requests of 64 tokens on a 124M model). So by default (`batch_invariant`) every
batch is padded to exactly max_batch rows, and rows are only batched with rows that sample
alike (same sampler and top-k width); a lone request then costs about as much as a full batch.

    gpt2tf serve --model_name 124M           # or: python serve.py --run_name run1
"""

import asyncio
import codecs
import collections
import contextlib
import json
import logging
import math
import re
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from gpt2tf import paths
from gpt2tf.errors import UserError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_SHUTDOWN_GRACE_S = 5.0  # in-flight requests get this long after Ctrl-C / SIGTERM
MAX_STOP_STRINGS = 4  # as OpenAI
# Request fields OpenAI defines that we accept only at their "off" value.
_UNSUPPORTED_AT_DEFAULT = {
    "best_of": (None, 1),
    "logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
}
_KNOWN_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
    "stream", "stream_options", "echo", "user", "ignore_eos", *_UNSUPPORTED_AT_DEFAULT,
}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # The page loads only its own script and style; nothing inline, so injected markup is inert.
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self';"
     b" img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
]


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how much work may wait."""

    max_batch: int = 8  # rows decoded together in one stream() call
    queue_size: int = 256  # rows waiting for the worker; more is answered 503
    max_prompt_tokens: int = 2048  # longer prompts are rejected; up to it, cut to the window
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    max_n: int = 16  # choices per request (n x prompts)
    max_body_bytes: int = 1_000_000

    def __post_init__(self):
        for name in ("max_batch", "queue_size", "max_prompt_tokens", "max_tokens_limit",
                     "max_n", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"--{name} must be an integer >= 1, got {value!r}")


class ApiError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# --- the worker: one thread, one model, batches of rows -------------------------------------


class _Row:
    """One choice: a prompt, its sampling settings and random stream, and its new text.

    Text is released only once it can no longer turn out to be the start of a stop string, so
    streamed pieces always add up to the final text. Only the unreleased tail is kept here.
    """

    def __init__(self, job: "_Job", index: int, context: list[int], params, rng,
                 max_tokens: int, stops: tuple[str, ...], eot: int | None, encoder):
        self.job, self.index, self.context = job, index, context
        self.params, self.rng, self.max_tokens = params, rng, max_tokens
        self.stops, self.eot, self.encoder = stops, eot, encoder
        self.longest_stop = max((len(s) for s in stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.unreleased = ""  # text that may still be the start of a stop string
        self.n_tokens = 0
        self.done = False
        self.cancelled = False  # set by the event loop when the client goes away

    def add(self, token: int) -> tuple[str, str | None]:
        """Consume one sampled token: (text to release, finish_reason or None)."""
        if token == self.eot:
            return self._finish("stop")
        self.n_tokens += 1
        text = self.unreleased + self.decoder.decode(_token_bytes(self.encoder, token))
        # Released text holds no stop string nor the start of one, so a stop lies within text.
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.done = True
            return text[:min(hits)], "stop"
        self.unreleased = text
        if self.n_tokens >= self.max_tokens:
            return self._finish("length")
        keep = self._held_back(text)
        self.unreleased = text[len(text) - keep:]
        return text[:len(text) - keep], None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of text that starts some stop string."""
        for k in range(min(self.longest_stop - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _finish(self, reason: str) -> tuple[str, str]:
        self.done = True
        # A character cut off by the end becomes U+FFFD, as in a full decode.
        return self.unreleased + self.decoder.decode(b"", final=True), reason


def _token_bytes(encoder, token: int) -> bytes:
    """A token's bytes; ids the model has but the vocabulary lacks (padded n_vocab) are empty."""
    try:
        return encoder.decode_bytes([token])
    except UserError:
        return b""


class _Job:
    """The event-loop side of one request: its rows and a queue of their events."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.rows: list[_Row] = []
        self.events: asyncio.Queue = asyncio.Queue()

    def push(self, events: list[tuple]) -> None:  # runs on the event loop
        for event in events:
            self.events.put_nowait(event)

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled = True


class QueueFull(Exception):
    pass


class Batcher:
    """Owns the Generator from a single thread; serves rows in batches of up to max_batch."""

    def __init__(self, gen, *, max_batch: int, queue_size: int, batch_invariant: bool = True):
        self.gen = gen
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_invariant = batch_invariant
        self._pending: collections.deque[_Row] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.active_rows = 0
        self.batches = 0
        self.tokens_sampled = 0  # every sampled token, kept or discarded
        self.rows_cancelled = 0

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpt2tf-worker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Refuse new rows and end the queued and running ones (their requests get an error)."""
        with self._cond:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        self._deliver([(r.job, r.index, "", "error") for r in dropped])

    def stop(self, timeout: float = 30) -> None:
        """close(), then wait for the worker thread to finish its current step."""
        self.close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, rows: list[_Row]) -> None:
        """Queue all of a request's rows, or none of them (QueueFull)."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            self._drop_cancelled()
            if len(self._pending) + len(rows) > self.queue_size:
                raise QueueFull(
                    f"the server is busy ({len(self._pending)} rows queued, room for"
                    f" {self.queue_size}); retry shortly"
                )
            self._pending.extend(rows)
            self._cond.notify()

    @property
    def queued_rows(self) -> int:
        with self._cond:
            return sum(not r.cancelled for r in self._pending)

    def _drop_cancelled(self) -> None:
        kept = [r for r in self._pending if not r.cancelled]
        self.rows_cancelled += len(self._pending) - len(kept)
        self._pending = collections.deque(kept)

    def _take(self) -> list[_Row] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                self._drop_cancelled()
                if self._pending:
                    return self._take_compatible()
                self._cond.wait()

    def _sampler_kind(self, params) -> tuple:
        """What a batch's sampling op depends on, besides each row's own settings.

        Generator.stream samples a whole batch with one op: the full-vocabulary sampler, or the
        sorted top-k/top-p one as soon as one row filters, over the batch's widest top-k (all
        of the vocabulary when a row uses top-p alone). The two samplers pick different tokens
        for the same random number, and a wider top-k changes the rounding of the rest.
        """
        if not params.filtered:
            return ("plain",)
        n_vocab = self.gen.hparams.n_vocab
        return ("filtered", min(params.top_k, n_vocab) if params.top_k else n_vocab)

    def _take_compatible(self) -> list[_Row]:
        """The oldest row and the next waiting rows that sample alike, up to max_batch."""
        kind = self._sampler_kind(self._pending[0].params)
        batch, rest = [], collections.deque()
        for row in self._pending:
            if len(batch) < self.max_batch and self._sampler_kind(row.params) == kind:
                batch.append(row)
            else:
                rest.append(row)
        self._pending = rest
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except Exception:  # a bug or a TF failure: fail this batch, keep serving
                log.exception("generation failed for a batch of %d rows", len(batch))
                self._deliver([(r.job, r.index, "", "error") for r in batch if not r.done])
            finally:
                self.active_rows = 0

    def _run(self, batch: list[_Row]) -> None:
        self.batches += 1
        self.active_rows = len(batch)
        contexts = [r.context for r in batch]
        params = [r.params for r in batch]
        rngs = [r.rng for r in batch]
        if self.batch_invariant:
            import numpy as np

            # Filler rows (copies of the first, sampled and thrown away) give every decode step
            # the same shapes, so a row computes exactly what it would in a full batch.
            filler = self.max_batch - len(batch)
            contexts += [batch[0].context] * filler
            params += [batch[0].params] * filler
            rngs += [np.random.default_rng(0) for _ in range(filler)]
        steps = self.gen.stream(
            contexts, length=max(r.max_tokens for r in batch), params=params, rngs=rngs)
        try:
            for new in steps:
                self.tokens_sampled += len(batch)
                events = []
                for row, token in zip(batch, new):
                    if row.done:
                        continue
                    if row.cancelled:
                        row.done = True
                        self.rows_cancelled += 1
                        continue
                    piece, finish = row.add(int(token))
                    if piece or finish:
                        events.append((row.job, row.index, piece, finish))
                self._deliver(events)
                self.active_rows = sum(not r.done for r in batch)
                if self.active_rows == 0 or self._stopping:
                    break
        finally:
            steps.close()  # stops the decode loop: nothing more is computed for this batch
        if self._stopping:
            self._deliver([(r.job, r.index, "", "error") for r in batch if not r.done])

    @staticmethod
    def _deliver(events: list[tuple]) -> None:
        by_job: dict[_Job, list] = {}
        for job, index, piece, finish in events:
            by_job.setdefault(job, []).append((index, piece, finish))
        for job, items in by_job.items():
            try:
                job.loop.call_soon_threadsafe(job.push, items)
            except RuntimeError:  # its event loop has closed: nobody is waiting any more
                pass


# --- request parsing ------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {value!r}", param=name,
                       code="invalid_type")
    if not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int, *, minimum: int,
             maximum: int | None = None, hint: str = "") -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name,
                       code="invalid_type")
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ApiError(400, f"{name} must be {allowed}, got {value}{hint}", param=name,
                       code="invalid_value")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", param=name,
                       code="invalid_type")
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
            or len(stops) > MAX_STOP_STRINGS):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS}"
                       f" strings, got {stop!r}", param="stop")
    return tuple(s for s in stops if s)


def _sampling_params(body: dict):
    from gpt2tf.inference import SamplingParams

    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = _integer(body, "top_k", 0, minimum=0)
    # Checked here because the API's 0 differs from the library's (where 0 turns top_p off).
    if not 0 <= top_p <= 1:
        raise ApiError(400, f"top_p must be in [0, 1], got {top_p}", param="top_p",
                       code="invalid_value")
    # OpenAI's temperature 0 and top_p 0 mean "always the most likely token".
    if temperature == 0 or top_p == 0:
        temperature, top_k, top_p = 1.0, 1, 1.0
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    except UserError as e:
        message = re.sub(r"--(\w+)", r"\1", str(e))  # the library words it for the CLI flags
        param = next((p for p in ("temperature", "top_p", "top_k") if p in message), None)
        raise ApiError(400, message, param=param, code="invalid_value") from None


def _prompts(body: dict, gen) -> list[list[int]]:
    """The request's prompts as token ids: a string, a list of strings, ids or lists of ids."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids"
                       " or a list of such lists", param="prompt")
    contexts = []
    for p in prompt:
        if isinstance(p, str):
            ids = gen.encode_prompt(p) if p else None
            if ids is None:  # no prompt: start a document, as GPT-2's unconditional samples do
                if gen.encoder.eot_token is None:
                    raise ApiError(400, "this model's vocabulary has no <|endoftext|>: give a"
                                   " non-empty prompt", param="prompt")
                ids = [gen.encoder.eot_token]
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < gen.hparams.n_vocab]
            if bad:
                raise ApiError(400, f"token ids {bad[:5]} are outside [0, {gen.hparams.n_vocab})",
                               param="prompt")
        else:
            raise ApiError(400, f"each prompt must be a string or a non-empty list of token"
                           f" ids, got {p!r:.80}", param="prompt")
        contexts.append(ids)
    return contexts


@dataclass
class CompletionRequest:
    contexts: list[list[int]]
    n: int
    max_tokens: int
    params: Any
    stops: tuple[str, ...]
    seed: int
    stream: bool
    include_usage: bool
    echo: bool
    ignore_eos: bool


def parse_request(body, gen, limits: Limits, model_id: str) -> CompletionRequest:
    """Check a completions request body; raise ApiError (400/404) naming the bad field."""
    from gpt2tf import inference

    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(body.keys() - _KNOWN_FIELDS)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}",
                       param=unknown[0], code="unknown_parameter")
    for name, allowed in _UNSUPPORTED_AT_DEFAULT.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"{name} is not supported by this server; leave it out",
                           param=name, code="unsupported_parameter")
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"The model {model!r} does not exist; this server has {model_id!r}",
                       param="model", code="model_not_found")
    max_tokens = _integer(body, "max_tokens", 16, minimum=1, maximum=limits.max_tokens_limit,
                          hint=" (the server's --max_tokens_limit)")
    n = _integer(body, "n", 1, minimum=1, maximum=limits.max_n)
    params = _sampling_params(body)
    stops = _stops(body)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, f"seed must be an integer, got {seed!r}", param="seed",
                       code="invalid_type")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and stream):
        raise ApiError(400, "stream_options must be an object, and only with stream: true",
                       param="stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    echo = _boolean(body, "echo")
    ignore_eos = _boolean(body, "ignore_eos")
    contexts = _prompts(body, gen)
    if len(contexts) * n > limits.max_n:
        raise ApiError(400, f"{len(contexts)} prompts x n={n} is more than the server's"
                       f" limit of {limits.max_n} choices per request", param="n")
    longest = max(len(c) for c in contexts)
    if longest > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {longest} tokens; this server accepts up to"
                       f" {limits.max_prompt_tokens}", param="prompt",
                       code="context_length_exceeded")
    return CompletionRequest(
        contexts=contexts, n=n, max_tokens=max_tokens, params=params, stops=stops,
        # numpy seeds are unsigned; any integer is accepted, as OpenAI does
        seed=inference.new_seed() if seed is None else seed % 2**64, stream=stream,
        include_usage=include_usage, echo=echo, ignore_eos=ignore_eos,
    )


# --- the HTTP application -------------------------------------------------------------------


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
        self.batcher = Batcher(gen, max_batch=limits.max_batch, queue_size=limits.queue_size,
                               batch_invariant=batch_invariant)
        self.requests = 0

    # -- endpoints --

    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

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
        except (ValueError, UnicodeDecodeError):
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
        from gpt2tf.inference import sample_seed

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
        texts = [b"".join(_token_bytes(enc, t) for t in c).decode("utf-8", errors="replace")
                 for c in req.contexts]
        return [texts[i // req.n] for i in range(rows)]

    @staticmethod
    def _usage(req: CompletionRequest, tokens: list[int]) -> dict:
        prompt = sum(len(c) for c in req.contexts)
        return {"prompt_tokens": prompt, "completion_tokens": sum(tokens),
                "total_tokens": prompt + sum(tokens)}

    async def _events(self, job: _Job) -> AsyncIterator[tuple[int, str, str | None]]:
        """Yield (index, text, finish_reason) until every row has finished."""
        left = len(job.rows)
        while left:
            index, piece, finish = await job.events.get()
            if finish == "error":
                raise ApiError(503, "generation was interrupted (the server is stopping or"
                               " failed); retry", type="server_error", code="interrupted")
            if finish is not None:
                left -= 1
            yield index, piece, finish

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


# --- running it -----------------------------------------------------------------------------


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


def serve_cli(
    model_name: str = paths.DEFAULT_MODEL_NAME,
    models_dir: str = paths.DEFAULT_MODELS_DIR,
    run_name: str = "",
    checkpoint_dir: str = paths.DEFAULT_CHECKPOINT_DIR,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = Limits.max_batch,
    queue_size: int = Limits.queue_size,
    max_prompt_tokens: int = Limits.max_prompt_tokens,
    max_tokens_limit: int = Limits.max_tokens_limit,
    max_n: int = Limits.max_n,
    max_body_bytes: int = Limits.max_body_bytes,
    batch_invariant: bool = True,
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
    log_level: str = "info",
):
    """Serve a model (--model_name) or a fine-tuned run (--run_name) over HTTP.

    The page is at http://HOST:PORT/; the API is OpenAI's: POST /v1/completions, GET /v1/models,
    GET /health (and GET /stats). max_batch rows are decoded together; queue_size rows may
    wait (more gets 503). batch_invariant (the default) pads every batch to max_batch rows so
    that a seed's completion never depends on the load; --nobatch_invariant makes a lone
    request cheaper (about half the time per token on a CPU) at that price. Ctrl-C or SIGTERM stops it cleanly: requests still running get
    shutdown_grace_s seconds, then end with an error.
    """
    from gpt2tf.cli import quiet_tensorflow_import

    limits = Limits(max_batch=max_batch, queue_size=queue_size,
                    max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                    max_n=max_n, max_body_bytes=max_body_bytes)
    if not isinstance(batch_invariant, bool):
        raise UserError(f"--batch_invariant must be true or false, got {batch_invariant!r}")
    levels = ("critical", "error", "warning", "info", "debug")
    if isinstance(shutdown_grace_s, bool) or not isinstance(shutdown_grace_s, (int, float)) \
            or not 0 <= shutdown_grace_s < math.inf:
        raise UserError(f"--shutdown_grace_s must be a number >= 0, got {shutdown_grace_s!r}")
    if log_level not in levels:
        raise UserError(f"--log_level must be one of {', '.join(levels)}, got {log_level!r}")
    sock = bind_socket(str(host), port)  # fail on a busy port before the model loads
    try:
        quiet_tensorflow_import()
        from gpt2tf.inference import Generator

        if run_name:
            model_id = paths.check_run_name(str(run_name))
            gen = Generator(paths.run_path(checkpoint_dir, model_id))
        else:
            model_id = str(model_name)
            gen = Generator(paths.model_path(models_dir, model_id))
        with gen:
            app = Service(gen, model_id=model_id, limits=limits,
                          batch_invariant=batch_invariant).app()
            server = _uvicorn_server(app, log_level=log_level, grace_s=shutdown_grace_s)
            sock.listen(2048)  # from here connections wait in the backlog until uvicorn runs
            where = sock.getsockname()
            log.info("serving %s on http://%s:%d/ (Ctrl-C stops)", model_id, host, where[1])
            server.run(sockets=[sock])
    finally:
        sock.close()
