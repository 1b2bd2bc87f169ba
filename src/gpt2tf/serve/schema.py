"""The completions API's request schema: what a request may say, checked field by field.

Every problem is an `ApiError` that names the field (OpenAI's `param`) and answers 4xx.
"""

import math
from dataclasses import dataclass
from typing import Any

from gpt2tf.decode.engine import SamplingParams, new_seed
from gpt2tf import settings
from gpt2tf.errors import FieldError

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 5  # as OpenAI
# Request fields OpenAI defines that we accept only at their "off" value.
_UNSUPPORTED_AT_DEFAULT = {
    "best_of": (None, 1),
    "suffix": (None, ""),
}
# The steering settings, by the names requests give them (OpenAI's; the others as vLLM and
# transformers name them; min_tokens is vLLM's name for min_length).
_STEERING = {s.name: s.name for s in settings.STEERING} | {"min_tokens": "min_length"}
_KNOWN_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
    "stream", "stream_options", "echo", "user", "ignore_eos", "logprobs",
    *_UNSUPPORTED_AT_DEFAULT, *_STEERING,
}


Limits = settings.make_config(
    "Limits", settings.LIMITS, "What one request may ask for, and how much work may wait.")


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


def show(value, limit: int = 80) -> str:
    """A value as an error message may quote it: short, and printable whatever it holds."""
    try:
        text = value if isinstance(value, str) else repr(value)
    except (RecursionError, ValueError):  # nested deeper than repr goes; an enormous integer
        text = f"a {type(value).__name__} too large to show"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {show(value)}", param=name,
                       code="invalid_type")
    try:
        value = float(value)  # an integer with hundreds of digits overflows here
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {show(value)}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int, *, minimum: int,
             maximum: int | None = None, hint: str = "") -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise ApiError(400, f"{name} must be an integer, got {show(value)}", param=name,
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
        raise ApiError(400, f"{name} must be true or false, got {show(value)}", param=name,
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
                       f" strings, got {show(stop)}", param="stop")
    return tuple(s for s in stops if s)


def _sampling_params(body: dict):
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
    steering = {}
    for name, setting in _STEERING.items():
        if body.get(name) is not None:
            if setting in steering:
                raise ApiError(400, "give min_length or min_tokens, not both", param=name)
            steering[setting] = body[name]
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, **steering)
    except FieldError as e:
        param = "min_tokens" if e.field == "min_length" and "min_tokens" in body else e.field
        raise ApiError(400, e.phrased(), param=param, code="invalid_value") from None


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
                           f" ids, got {show(p)}", param="prompt")
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
    logprobs: int | None = None  # per-token log-probabilities and this many alternatives


def parse_request(body, gen, limits: Limits, model_id: str) -> CompletionRequest:
    """Check a completions request body; raise ApiError (400/404) naming the bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(body.keys() - _KNOWN_FIELDS)
    if unknown:
        names = [show(n) for n in unknown]  # echoed back: any text must encode as JSON
        raise ApiError(400, f"Unrecognized request argument supplied: {', '.join(names)}",
                       param=names[0], code="unknown_parameter")
    for name, allowed in _UNSUPPORTED_AT_DEFAULT.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"{name} is not supported by this server; leave it out",
                           param=name, code="unsupported_parameter")
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"The model {show(model)} does not exist; this server has {model_id!r}",
                       param="model", code="model_not_found")
    # max_tokens 0 generates nothing: with echo and logprobs it scores the prompt alone
    max_tokens = _integer(body, "max_tokens", 16, minimum=0, maximum=limits.max_tokens_limit,
                          hint=" (the server's --max_tokens_limit)")
    logprobs = None if body.get("logprobs") is None else _integer(
        body, "logprobs", 0, minimum=0, maximum=MAX_LOGPROBS)
    n = _integer(body, "n", 1, minimum=1, maximum=limits.max_n)
    params = _sampling_params(body)
    stops = _stops(body)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, f"seed must be an integer, got {show(seed)}", param="seed",
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
        seed=new_seed() if seed is None else seed % 2**64, stream=stream,
        include_usage=include_usage, echo=echo, ignore_eos=ignore_eos, logprobs=logprobs,
    )

