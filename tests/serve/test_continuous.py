"""Continuous batching: rows join and leave between steps, each text is its seed's alone, a
short request does not wait for a long one, and /metrics tells what the server is doing."""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from gpt2tf import checkpoints
from gpt2tf.decode.engine import SamplingParams
from gpt2tf.decode.generator import Generator
from gpt2tf.serve import app as serve_app
from gpt2tf.serve import schema as serve_schema
from gpt2tf.serve import server as serve_server
from gpt2tf.serve.batcher import ContinuousBatcher
from tiny import tiny

TINY = tiny(n_ctx=128, n_head=2)
LIMITS = serve_schema.Limits(max_batch=8, max_tokens_limit=5000, max_prompt_tokens=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = checkpoints.init_model_dir(tmp_path_factory.mktemp("models") / "tiny", TINY, seed=3)
    with Generator(model) as gen:
        service = serve_app.Service(gen, model_id="tiny", limits=LIMITS)
        assert isinstance(service.batcher, ContinuousBatcher)
        with serve_server.serve_in_thread(service.app()) as url:
            yield url, gen


def _complete(url, **body):
    r = requests.post(f"{url}/v1/completions", json={"prompt": "Hello", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_sixteen_staggered_requests_each_equal_their_text_alone(served):
    url, _ = served
    bodies = [{"prompt": "Tale " + "x" * (i % 7), "max_tokens": 5 + 7 * (i % 6), "seed": i,
               "temperature": 0.7 + 0.1 * (i % 3), "top_k": (0, 20, 5)[i % 3],
               "top_p": (1.0, 0.9)[i % 2], "ignore_eos": True} for i in range(16)]
    alone = [_complete(url, **b)["text"] for b in bodies]
    delays = random.Random(0).sample([0.01 * i for i in range(16)], 16)

    def call(i):
        time.sleep(delays[i])  # arrivals spread over the others' decoding
        return _complete(url, **bodies[i])["text"]

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(call, range(16)))
    assert together == alone


def test_server_text_equals_the_engines_past_the_window(served):
    """The server samples as the CLI does: same seed, same text, also where the window slides."""
    url, gen = served
    text = _complete(url, prompt="Once", max_tokens=300, seed=11, temperature=0.9,
                     ignore_eos=True)["text"]  # 300 > n_ctx: slides twice
    tokens = gen.generate_tokens(gen.encode_prompt("Once"), length=300, seed=11,
                                 params=SamplingParams(temperature=0.9), stop_at_eot=False)[0]
    assert text == gen.encoder.decode(tokens)


def test_a_short_request_does_not_wait_for_a_long_one(served):
    url, _ = served
    long_done = {}

    def long_request():
        _complete(url, max_tokens=5000, seed=1, ignore_eos=True)
        long_done["at"] = time.monotonic()

    started = time.monotonic()
    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.3)  # the long one is decoding
    sent = time.monotonic()
    _complete(url, max_tokens=8, seed=2, ignore_eos=True)
    short_latency = time.monotonic() - sent
    assert "at" not in long_done  # it finished while the long one still runs
    thread.join(300)
    assert short_latency < (long_done["at"] - started) / 4


def test_metrics_parse_and_move(served):
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = served

    def scrape():
        r = requests.get(f"{url}/metrics", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {s.name: s.value for family in text_string_to_metric_families(r.text)
                for s in family.samples}

    before = scrape()
    _complete(url, max_tokens=6, seed=3, ignore_eos=True)
    after = scrape()
    assert after["gpt2tf_tokens_generated_total"] >= before["gpt2tf_tokens_generated_total"] + 6
    assert after["gpt2tf_requests_total"] >= before.get("gpt2tf_requests_total", 0) + 1
    assert after["gpt2tf_time_to_first_token_seconds_count"] >= \
        before["gpt2tf_time_to_first_token_seconds_count"] + 1
    assert after["gpt2tf_request_seconds_count"] >= before["gpt2tf_request_seconds_count"] + 1
    assert after["gpt2tf_queued_rows"] == 0 and after["gpt2tf_running_rows"] == 0


def test_a_row_numbers_do_not_depend_on_how_many_rows_share_the_step(served):
    """Why no padding is needed: the step computes each row alike whatever the row count."""
    _, gen = served
    lite = gen.engine.backend.stepper
    outputs = []
    for rows in (1, 3, 8):
        lite.start(rows)
        for r in range(rows):
            lite.prefill(r, [5, 6, 7] if r == 0 else [r] * (r + 2))
        positions = np.array([3] + [r + 2 for r in range(1, rows)], np.int32)
        outputs.append(lite.step(np.full(rows, 9, np.int32), positions)[0])
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])


def test_a_client_that_stops_reading_does_not_hold_a_row(served):
    import json
    import socket
    from urllib.parse import urlparse

    url, _ = served
    where = urlparse(url)
    body = json.dumps({"prompt": "Hi", "max_tokens": 2000, "stream": True, "seed": 5,
                       "ignore_eos": True}).encode()
    with socket.create_connection((where.hostname, where.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # stops reading at once
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        deadline = time.monotonic() + 60
        seen_running = False
        while time.monotonic() < deadline:
            running = requests.get(f"{url}/stats", timeout=10).json()["active_rows"]
            seen_running |= running > 0
            if seen_running and running == 0:
                break
            time.sleep(0.05)
        assert seen_running and running == 0  # the row is free while the socket stays open


def test_a_lone_request_runs_at_batch_one_after_a_busy_spell(served):
    url, gen = served
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda i: _complete(url, max_tokens=40, seed=i, ignore_eos=True), range(3)))
    _complete(url, max_tokens=5, seed=9, ignore_eos=True)
    assert gen.engine.backend.stepper.rows == 1  # no idle rows computed for a lone client


def test_a_long_prompt_is_prefilled_in_chunks_between_the_others_steps(tmp_path_factory):
    """A 300-token prompt arriving while another row decodes runs as 3 chunks, each between two
    of the other's decode steps; both texts equal their texts alone."""
    hp = tiny(n_ctx=320, n_head=2)  # chunks of 128 (and 32)
    model = checkpoints.init_model_dir(tmp_path_factory.mktemp("long") / "tiny", hp, seed=4)
    limits = serve_schema.Limits(max_batch=4, max_tokens_limit=500, max_prompt_tokens=310)
    long_prompt = list(np.random.default_rng(0).integers(0, 256, 300))
    bodies = [{"prompt": "Hello", "max_tokens": 60, "seed": 1, "ignore_eos": True},
              {"prompt": [int(t) for t in long_prompt], "max_tokens": 5, "seed": 2,
               "ignore_eos": True}]
    with Generator(model) as gen:
        service = serve_app.Service(gen, model_id="tiny", limits=limits)
        stepper = service.batcher.stepper
        calls = []
        extend, step = stepper.extend, stepper.step
        stepper.extend = lambda row, tokens, start: calls.append(("extend", len(tokens))) or \
            extend(row, tokens, start)
        stepper.step = lambda tokens, positions: calls.append(("step", len(tokens))) or \
            step(tokens, positions)
        if hasattr(stepper, "step_rows"):  # the native step: a chunk rides along with a step
            step_rows = stepper.step_rows

            def logged(rows, tokens, positions, chunk=None):
                calls.append(("step", len(rows)))
                if chunk is not None:
                    calls.append(("extend", len(chunk[1])))
                return step_rows(rows, tokens, positions, chunk)

            stepper.step_rows = logged
        with serve_server.serve_in_thread(service.app()) as url:
            alone = [_complete(url, **b)["text"] for b in bodies]
            calls.clear()
            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(_complete, url, **bodies[0])
                while not any(c[0] == "step" for c in calls):  # the short one is decoding
                    time.sleep(0.001)
                second = pool.submit(_complete, url, **bodies[1])
                together = [first.result()["text"], second.result()["text"]]
    assert together == alone
    chunks = [i for i, c in enumerate(calls) if c == ("extend", 128) or c == ("extend", 44)]
    assert [calls[i][1] for i in chunks] == [128, 128, 44]
    for a, b in zip(chunks, chunks[1:]):
        assert any(c[0] == "step" for c in calls[a:b]), calls[a:b]  # the other decoded between


def test_the_cache_shrinks_once_long_requests_are_gone(tmp_path):
    """A long request grows every row's cache (attention reads all of it); once it is gone the
    short ones step over a short cache again, and their texts do not change."""
    model = checkpoints.init_model_dir(tmp_path / "tiny", tiny(n_ctx=512, n_head=2), seed=3)
    with Generator(model) as gen:
        service = serve_app.Service(gen, model_id="tiny", limits=LIMITS)
        lite = service.batcher.stepper
        with serve_server.serve_in_thread(service.app()) as url:
            short = {"max_tokens": 20, "seed": 4, "temperature": 0.8, "ignore_eos": True}
            before = _complete(url, **short)["text"]
            assert lite.cache_len == 128
            _complete(url, max_tokens=300, seed=5, ignore_eos=True)
            assert lite.cache_len == 512  # grew 128 -> 256 -> 512 on the way
            assert _complete(url, **short)["text"] == before
            assert lite.cache_len == 128
