"""The HTTP server against a real uvicorn on 127.0.0.1 (ephemeral port), over a tiny model.

The model is byte-level (257 tokens, eot 256) and random, so requests pass `ignore_eos` where
they need an exact token count. Every check goes through a real HTTP client: `requests`, and
OpenAI's own client where it is installed.
"""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from shared_data import reference
import requests

from gpt2tf import checkpoints
from gpt2tf.decode import generator as inference
from gpt2tf.serve import app as serve_app
from gpt2tf.serve import batcher as serve_batcher
from gpt2tf.serve import schema as serve_schema
from gpt2tf.serve import server as serve_server
from gpt2tf.errors import UserError
from tiny import REPO, tiny

TINY = tiny(n_ctx=128, n_head=2)  # room for long prompts and the window limits
LIMITS = serve_schema.Limits(max_batch=8, queue_size=256, max_tokens_limit=20000, max_prompt_tokens=300,
                      max_body_bytes=64_000)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    checkpoints.init_model_dir(root / "tiny", TINY, seed=0)
    return root


@pytest.fixture(scope="module")
def server(models_dir):
    """(base URL, Service) of a server that runs for the whole module."""
    with inference.Generator(models_dir / "tiny") as gen:
        service = serve_app.Service(gen, model_id="tiny", limits=LIMITS)
        with serve_server.serve_in_thread(service.app()) as url:
            yield url, service


@pytest.fixture
def url(server) -> str:
    return server[0]


def complete(url: str, **body) -> dict:
    r = requests.post(f"{url}/v1/completions", json={"prompt": "Hello", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def sse_data(response) -> list[str]:
    return [line[6:].decode() for line in response.iter_lines() if line.startswith(b"data: ")]


def stream_text(url: str, **body) -> tuple[str, list[dict]]:
    r = requests.post(f"{url}/v1/completions", json={"prompt": "Hello", "stream": True, **body},
                      stream=True, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    data = sse_data(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["text"] for chunk in chunks for c in chunk["choices"])
    return text, chunks


def stats(url: str) -> dict:
    return requests.get(f"{url}/stats", timeout=10).json()


def wait_idle(url: str, seconds: float = 10) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = stats(url)
        if s["active_rows"] == 0 and s["queued_rows"] == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"the server is still generating after {seconds} s: {stats(url)}")


def test_health_and_models(url):
    r = requests.get(f"{url}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["object"] == "model"
    assert requests.get(f"{url}/v1/models/tiny", timeout=10).json()["id"] == "tiny"


def test_completion_shape_and_exact_token_count(url):
    out = complete(url, max_tokens=12, seed=3, ignore_eos=True)
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert out["id"].startswith("cmpl-") and isinstance(out["created"], int)
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}


def test_default_max_tokens_is_16(url):
    assert complete(url, seed=1, ignore_eos=True)["usage"]["completion_tokens"] == 16


def test_same_seed_same_text_other_seeds_differ(url):
    a = complete(url, max_tokens=24, seed=7)["choices"][0]["text"]
    assert complete(url, max_tokens=24, seed=7)["choices"][0]["text"] == a
    others = {complete(url, max_tokens=24, seed=s)["choices"][0]["text"] for s in (8, 9)}
    assert a not in others and len(others) == 2
    assert complete(url, max_tokens=4, seed=-1)["choices"][0]["text"] == complete(
        url, max_tokens=4, seed=2**64 - 1)["choices"][0]["text"]  # any integer is a seed
    # Without a seed every request draws a fresh one.
    unseeded = {complete(url, max_tokens=24)["choices"][0]["text"] for _ in range(2)}
    assert len(unseeded) == 2


def test_stop_string_cuts_before_it(url):
    full = complete(url, max_tokens=60, seed=11, ignore_eos=True)["choices"][0]["text"]
    stop = full[20:22]
    expected = full[: full.index(stop)]
    out = complete(url, max_tokens=60, seed=11, ignore_eos=True, stop=["~never~", stop])
    assert out["choices"][0]["text"] == expected
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 60
    # A single string works too, and streaming never leaks the stop string's first characters.
    streamed, chunks = stream_text(url, max_tokens=60, seed=11, ignore_eos=True, stop=stop)
    assert streamed == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_n_choices_are_independent_rows(url):
    out = complete(url, max_tokens=16, seed=5, n=3, ignore_eos=True)
    choices = out["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["text"] for c in choices}) == 3
    assert out["usage"]["completion_tokens"] == 48
    # Choice 0 is what a single request with that seed gives.
    alone = complete(url, max_tokens=16, seed=5, ignore_eos=True)["choices"][0]["text"]
    assert choices[0]["text"] == alone


def test_stream_concatenates_to_the_non_streamed_text(url):
    body = {"prompt": "Once upon a time", "max_tokens": 30, "seed": 21, "temperature": 0.9,
            "top_k": 50, "top_p": 0.95}
    expected = complete(url, **body)["choices"][0]
    text, chunks = stream_text(url, **body, stream_options={"include_usage": True})
    assert text == expected["text"]
    assert len(chunks) > 3  # it did stream
    assert all(c["object"] == "text_completion" and c["model"] == "tiny" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    finals = [c for ch in chunks for c in ch["choices"] if c["finish_reason"]]
    assert [c["finish_reason"] for c in finals] == [expected["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 16


def test_token_id_prompt_and_echo(server):
    url, service = server
    by_text = complete(url, prompt="Hi there", max_tokens=10, seed=2)["choices"][0]["text"]
    ids = service.gen.encoder.encode("Hi there")
    assert complete(url, prompt=ids, max_tokens=10, seed=2)["choices"][0]["text"] == by_text
    assert complete(url, prompt=[ids], max_tokens=10, seed=2)["choices"][0]["text"] == by_text
    echoed = complete(url, prompt="Hi there", max_tokens=10, seed=2, echo=True)
    assert echoed["choices"][0]["text"] == "Hi there" + by_text


def test_several_prompts_in_one_request(url):
    out = complete(url, prompt=["A", "B"], n=2, max_tokens=8, seed=4, ignore_eos=True)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    alone = complete(url, prompt="B", max_tokens=8, seed=4, ignore_eos=True)["choices"][0]["text"]
    assert out["choices"][2]["text"] == alone
    assert out["usage"]["prompt_tokens"] == 2


def test_temperature_zero_is_greedy(url):
    texts = {complete(url, max_tokens=12, seed=s, temperature=0)["choices"][0]["text"]
             for s in (1, 2, 3)}
    assert len(texts) == 1


def test_long_prompt_is_cut_to_the_window_and_over_the_limit_rejected(url):
    long = "x" * 200  # 200 byte tokens > n_ctx=128: the Generator keeps the last 127
    out = complete(url, prompt=long, max_tokens=5, seed=1, ignore_eos=True)
    assert out["usage"] == {"prompt_tokens": 200, "completion_tokens": 5, "total_tokens": 205}
    r = requests.post(f"{url}/v1/completions", json={"prompt": "x" * 301}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_many_concurrent_requests_match_their_single_runs(url):
    """40 requests at once are batched, and each gets exactly its own seed's text."""
    bodies = [{"prompt": "Request " + "#" * (i % 9), "max_tokens": 12 + i % 5, "seed": 100 + i,
               "temperature": 0.8 + 0.05 * (i % 4), "top_k": (0, 40)[i % 2], "ignore_eos": True}
              for i in range(40)]
    expected = [complete(url, **b)["choices"][0]["text"] for b in bodies]  # one at a time
    before = stats(url)
    start = threading.Barrier(len(bodies))

    def call(body):
        start.wait()
        return complete(url, **body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(call, bodies))
    assert [r["choices"][0]["text"] for r in results] == expected
    assert all(r["usage"]["completion_tokens"] == b["max_tokens"] for r, b in zip(results, bodies))
    after = stats(url)
    steps = after["batches"] - before["batches"]  # decode steps, each shared by its rows
    tokens = after["tokens_sampled"] - before["tokens_sampled"]
    assert tokens >= sum(b["max_tokens"] for b in bodies)
    assert tokens / steps > 3, f"{tokens} tokens in {steps} steps: no batching"


def test_streaming_client_that_disconnects_stops_its_generation(url):
    wait_idle(url)
    before = stats(url)
    r = requests.post(f"{url}/v1/completions", stream=True, timeout=60, json={
        "prompt": "Hello", "max_tokens": 20000, "stream": True, "ignore_eos": True})
    lines = r.iter_lines()
    got = [line for _, line in zip(range(10), (ln for ln in lines if ln))]
    assert len(got) == 10 and stats(url)["active_rows"] == 1
    r.close()
    after = wait_idle(url, seconds=5)
    assert after["rows_cancelled"] == before["rows_cancelled"] + 1
    # 20000 tokens take tens of seconds here: the batch stopped long before that.
    assert after["tokens_sampled"] - before["tokens_sampled"] < 10000


def test_non_streaming_client_that_disconnects_stops_its_generation(url):
    wait_idle(url)
    before = stats(url)
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "Hello", "max_tokens": 20000, "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while stats(url)["active_rows"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    after = wait_idle(url, seconds=5)
    assert after["rows_cancelled"] == before["rows_cancelled"] + 1
    assert after["tokens_sampled"] - before["tokens_sampled"] < 10000


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, None),
    (b'{"prompt": "a", "temperature": -1}', 400, "temperature", "invalid_value"),
    (b'{"prompt": "a", "top_p": 1.5}', 400, "top_p", "invalid_value"),
    (b'{"prompt": "a", "temperature": "hot"}', 400, "temperature", "invalid_type"),
    (b'{"prompt": "a", "max_tokens": "10"}', 400, "max_tokens", "invalid_type"),
    (b'{"prompt": "a", "max_tokens": 20001}', 400, "max_tokens", "invalid_value"),
    (b'{"prompt": "a", "n": 17}', 400, "n", "invalid_value"),
    (b'{"prompt": "a", "top_k": -1}', 400, "top_k", "invalid_value"),
    (b'{"prompt": "a", "seed": 1.5}', 400, "seed", "invalid_type"),
    (b'{"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop", None),
    (b'{"prompt": "a", "stream": "yes"}', 400, "stream", "invalid_type"),
    (b'{"prompt": 5}', 400, "prompt", None),
    (b'{"prompt": [1, 999]}', 400, "prompt", None),
    (b'{"prompt": "a", "logprobs": 6}', 400, "logprobs", "invalid_value"),
    (b'{"prompt": "a", "logprobs": "3"}', 400, "logprobs", "invalid_type"),
    (b'{"prompt": "a", "presence_penalty": "x"}', 400, "presence_penalty", "invalid_value"),
    (b'{"prompt": "a", "frequency_penalty": 2.5}', 400, "frequency_penalty", "invalid_value"),
    (b'{"prompt": "a", "repetition_penalty": 0}', 400, "repetition_penalty", "invalid_value"),
    (b'{"prompt": "a", "bad_words": [3]}', 400, "bad_words", "invalid_value"),
    (b'{"prompt": "a", "logit_bias": {"x": 1}}', 400, "logit_bias", "invalid_value"),
    (b'{"prompt": "a", "logit_bias": {"999": 1}}', 400, "logit_bias", "invalid_value"),
    (b'{"prompt": "a", "min_tokens": -1}', 400, "min_tokens", "invalid_value"),
    (b'{"prompt": "a", "best_of": 3}', 400, "best_of", "unsupported_parameter"),
    (b'{"prompt": "a", "bogus": 1}', 400, "bogus", "unknown_parameter"),
    (b'{"prompt": "a", "model": "gpt-4"}', 404, "model", "model_not_found"),
    # once 500s: a huge integer, an unencodable key echoed back, JSON nested 5,000 deep
    (b'{"prompt": "a", "temperature": 1' + b"0" * 400 + b"}", 400, "temperature", None),
    (b'{"prompt": "a", "\\ud800x": 1}', 400, "\\ud800x", "unknown_parameter"),
    (b"[" * 5000 + b"]" * 5000, 400, None, "invalid_json"),
    # once overflowed int32 inside the decode step, failing every request batched with it
    (b'{"prompt": "a", "top_k": 2147483648}', 400, "top_k", "invalid_value"),
], ids=lambda v: v.decode()[:40] if isinstance(v, bytes) else None)
def test_bad_requests_get_openai_style_errors(url, body, status, param, code):
    r = requests.post(f"{url}/v1/completions", data=body,
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_other_http_errors_and_the_server_keeps_working(url):
    r = requests.post(f"{url}/v1/completions", data=b'{"prompt": "' + b"a" * 70_000 + b'"}',
                      timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = requests.get(f"{url}/no/such/route", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.get(f"{url}/v1/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    assert complete(url, max_tokens=4, seed=1, ignore_eos=True)["usage"]["completion_tokens"] == 4
    assert requests.get(f"{url}/health", timeout=10).json() == {"status": "ok"}


def test_bad_temperature_message_comes_from_sampling_params(url):
    r = requests.post(f"{url}/v1/completions", json={"prompt": "a", "temperature": -0.5},
                      timeout=10)
    assert r.json()["error"]["message"] == "temperature must be > 0, got -0.5"


def test_openai_client_works_unchanged(url):
    openai = reference("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=10, seed=9,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 10 and out.choices[0].finish_reason == "length"
    expected = out.choices[0].text
    assert expected == complete(url, max_tokens=10, seed=9, ignore_eos=True)["choices"][0]["text"]
    parts = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Hello", max_tokens=10, seed=9, stream=True,
        extra_body={"ignore_eos": True}) if c.choices]
    assert "".join(parts) == expected
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt="Hello", top_p=1.5)


def test_full_queue_answers_503(models_dir):
    limits = serve_schema.Limits(max_batch=1, queue_size=1, max_tokens_limit=20000)
    body = {"prompt": "a", "max_tokens": 20000, "ignore_eos": True, "stream": True}
    with inference.Generator(models_dir / "tiny") as gen:
        service = serve_app.Service(gen, model_id="tiny", limits=limits)
        with serve_server.serve_in_thread(service.app()) as url:
            running = requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=30)
            lines = running.iter_lines()  # keep it: a dropped iterator closes the connection
            next(lines)  # the worker is busy with it
            queued = requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=30)
            deadline = time.monotonic() + 10
            while stats(url)["queued_rows"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = requests.post(f"{url}/v1/completions", json={"prompt": "a"}, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "server_error"
            queued.close()  # a client that leaves while queued frees its place
            running.close()
            wait_idle(url)
            assert complete(url, max_tokens=3)["choices"][0]["finish_reason"] in ("length", "stop")


class _FakeGenerator:
    """A model whose every row predicts the token for "A"; records the prompts of each batch
    (the backend's start calls)."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.hparams = TINY
        self.calls = []
        a = encoder.encode("A")[0]
        gen = self

        class Backend:
            def start(self, contexts):
                gen.calls.append([c[0] for c in contexts])
                return self.step(np.zeros(len(contexts), np.int32))

            def step(self, tokens):
                logits = np.zeros([len(tokens), TINY.n_vocab], np.float32)
                logits[:, a] = 50
                return logits

        self.engine = type("Engine", (), {"backend": Backend()})()


@pytest.mark.parametrize("invariant", [True, False], ids=["batch_invariant", "plain"])
def test_static_batches_mix_any_sampling_settings(models_dir, invariant):
    """The TF graph's static batcher (bf16, or the fallback): rows of any sampling settings
    share a batch (sampling is per row, on the host); with batch_invariant every batch is
    padded to max_batch rows (fixed shapes, exact results)."""
    from gpt2tf.source import ModelSource
    from gpt2tf.decode.engine import SamplingParams

    gen = _FakeGenerator(ModelSource.at(models_dir / "tiny").encoder)
    batcher = serve_batcher.Batcher(gen, max_batch=4, queue_size=16, batch_invariant=invariant)
    kinds = [SamplingParams(), SamplingParams(top_k=40), SamplingParams(), SamplingParams(top_k=50),
             SamplingParams(top_p=0.9), SamplingParams(), SamplingParams(top_k=40)]

    async def run():
        job = serve_batcher._Job(asyncio.get_running_loop())
        job.rows = [serve_batcher._Row(job, i, [10 + i, 2], p, np.random.default_rng(i), 3, (),
                                       None, gen.encoder) for i, p in enumerate(kinds)]
        batcher.submit(job.rows)  # all queued before the worker starts: a fixed grouping
        batcher.start()
        texts = [""] * len(kinds)
        finished = 0
        while finished < len(kinds):
            index, piece, reason, _ = await asyncio.wait_for(job.events.get(), 10)
            texts[index] += piece
            finished += reason is not None
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop)
        return texts

    assert asyncio.run(run()) == ["AAA"] * len(kinds)
    real = [call[:n] for call, n in zip(gen.calls, (4, 3))]
    assert real == [[10, 11, 12, 13], [14, 15, 16]]  # oldest first, whatever their settings
    sizes = [len(call) for call in gen.calls]
    assert sizes == ([4, 4] if invariant else [4, 3])


def test_busy_port_is_a_user_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UserError, match="cannot listen"):
            serve_server.bind_socket("127.0.0.1", taken.getsockname()[1])


def test_bad_limits_are_user_errors():
    with pytest.raises(UserError, match="max_batch"):
        serve_schema.Limits(max_batch=0)


def _start_cli_server(models_dir: Path, grace_s: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "serve.py"), "--models_dir", str(models_dir),
         "--model_name", "tiny", "--port", "0", "--log_level", "warning",
         "--max_tokens_limit", "20000", "--shutdown_grace_s", str(grace_s)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"serving tiny on (http://[\d.]+:\d+)/", line)
        if found:
            return proc, found.group(1)
    raise AssertionError("the server did not start:\n" + "".join(lines))


@pytest.mark.parametrize("sig, grace_s, max_tokens, finished", [
    (signal.SIGINT, 20, 200, True),  # a short stream finishes within the grace period
    (signal.SIGTERM, 1, 20000, False),  # a long one ends with an error event when it is over
], ids=["SIGINT", "SIGTERM"])
def test_cli_server_stops_cleanly_on_signal(models_dir, sig, grace_s, max_tokens, finished):
    proc, url = _start_cli_server(models_dir, grace_s)
    try:
        out = complete(url, max_tokens=3, seed=1, ignore_eos=True)
        assert out["usage"]["completion_tokens"] == 3
        busy = requests.post(f"{url}/v1/completions", stream=True, timeout=60, json={
            "prompt": "a", "max_tokens": max_tokens, "ignore_eos": True, "stream": True})
        lines = busy.iter_lines()
        next(lines)
        started = time.monotonic()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=grace_s + 30)
        assert proc.returncode == 0, out
        assert time.monotonic() - started < grace_s + 10
        assert "Traceback" not in out, out
        try:
            rest = [line for line in lines if line]
        except requests.RequestException:  # the connection was cut mid-chunk
            rest = []
        if finished:
            assert rest[-1] == b"data: [DONE]"
        else:  # an error event, then the end of the stream as every stream ends
            assert rest[-1] == b"data: [DONE]"
            assert json.loads(rest[-2][6:])["error"]["code"] == "interrupted"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
