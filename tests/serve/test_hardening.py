"""The server under hostile or unlucky clients (issue 14): slow, idle and excess connections,
huge prompts, other sites' pages, missing keys, a second Ctrl-C, a row that fails, and any
request body at all (hypothesis). Each test fails if its guard is taken away.

Most run against an in-process server (serve_in_thread) with short timeouts; the log and
signal checks run the real CLI in a subprocess and read its whole output.
"""

import json
import logging
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

import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families
from shared_data import reference

from gpt2tf import checkpoints
from gpt2tf.cli import main as gpt2tf_main
from gpt2tf.decode import pick as pick_module
from gpt2tf.decode.generator import Generator
from gpt2tf.serve import app as serve_app
from gpt2tf.serve import schema as serve_schema
from gpt2tf.serve import server as serve_server
from gpt2tf.serve.batcher import Batcher, ContinuousBatcher
from tiny import REPO, tiny

TINY = tiny(n_ctx=128, n_head=2)
FAST = serve_server.Connections(header_timeout_s=1.0, body_timeout_s=1.0, idle_timeout_s=1.0,
                                max_connections=100)
LIMITS = serve_schema.Limits(max_batch=8, max_tokens_limit=2000, max_prompt_tokens=120,
                             max_body_bytes=2_000_000)
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return checkpoints.init_model_dir(tmp_path_factory.mktemp("models") / "tiny", TINY, seed=0)


@pytest.fixture(scope="module")
def gen(model):
    with Generator(model) as g:
        yield g


def _serve(gen, *, limits=LIMITS, access=serve_app.Access(), connections=FAST):
    service = serve_app.Service(gen, model_id="tiny", limits=limits, access=access)
    return serve_server.serve_in_thread(service.app(), connections=connections)


@pytest.fixture(scope="module")
def url(gen):
    with _serve(gen) as u:
        yield u


def _addr(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _closed_after(sock: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes `sock` (reading all it sends), and what it sent."""
    sock.settimeout(limit)
    start, got = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return time.monotonic() - start, got


def _error(r: requests.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["code"] == code, error
    return error


def _post(url: str, body: dict, **kw) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


# --- 1. timeouts and the connection cap ------------------------------------------------------


def test_a_body_that_never_arrives_is_closed_within_the_body_timeout(url):
    with socket.create_connection(_addr(url)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"")
        seconds, got = _closed_after(sock, 10)
    assert FAST.body_timeout_s * 0.8 < seconds < FAST.body_timeout_s + 1.5
    assert got.startswith(b"HTTP/1.1 408 ")
    assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}


def test_idle_trickling_and_kept_alive_connections_are_closed_within_their_timeouts(url):
    host, port = _addr(url)
    idle = [socket.create_connection((host, port)) for _ in range(30)]
    trickling = [socket.create_connection((host, port)) for _ in range(30)]
    kept = socket.create_connection((host, port))
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # then stays open
    stop = threading.Event()

    def trickle():  # a byte of headers every 0.1 s: never done, never silent
        line = b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
        for i in range(len(line)):
            if stop.is_set():
                return
            for s in trickling:
                try:
                    s.send(line[i:i + 1])
                except OSError:
                    pass
            time.sleep(0.1)

    feeder = threading.Thread(target=trickle, daemon=True)
    started = time.monotonic()
    feeder.start()
    try:
        with ThreadPoolExecutor(61) as pool:
            results = list(pool.map(lambda s: _closed_after(s, 10), idle + trickling + [kept]))
    finally:
        stop.set()
        feeder.join()
        for s in idle + trickling + [kept]:
            s.close()
    assert time.monotonic() - started < FAST.header_timeout_s + 3
    assert all(seconds < FAST.header_timeout_s + 1.5 for seconds, _ in results)
    assert all(got == b"" for _, got in results[:30])  # idle: closed without a word
    assert all(got.startswith(b"HTTP/1.1 408 ") for _, got in results[30:60])
    assert results[60][1].startswith(b"HTTP/1.1 200 ")  # answered, then closed when idle
    assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}


def test_connections_beyond_the_cap_are_refused_at_once(gen, caplog):
    cap = serve_server.Connections(header_timeout_s=30, max_connections=10)
    with _serve(gen, connections=cap) as url, caplog.at_level(logging.WARNING):
        overload = serve_server.serve_in_thread.last.overload
        held = [socket.create_connection(_addr(url)) for _ in range(10)]
        time.sleep(0.2)  # the server has accepted them all
        refused = []
        started = time.monotonic()
        for _ in range(200):
            with socket.create_connection(_addr(url)) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                refused.append(_closed_after(s, 5))
        assert time.monotonic() - started < 10  # refused cheaply, not after a timeout
        assert all(got == b"" or got.startswith(b"HTTP/1.1 503 ") for _, got in refused)
        assert overload.counts["connections"] == 200
        for s in held:
            s.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # /metrics counts them too, by reason (prometheus_client's own parser reads it)
        closed = {s.labels["reason"]: s.value
                  for family in text_string_to_metric_families(
                      requests.get(f"{url}/metrics", timeout=5).text)
                  if family.name == "gpt2tf_connections_closed" for s in family.samples
                  if s.name.endswith("_total")}
        assert closed == {"connections": 200, "header_timeout": 0, "body_timeout": 0,
                          "accept": 0}
    lines = [r for r in caplog.records if r.name.startswith(("gpt2tf", "uvicorn"))]
    assert len(lines) <= 2, [r.getMessage() for r in lines]  # one line, not 200
    assert not any(r.exc_info for r in lines)


def _start_cli(model: Path, *flags: str, env: dict | None = None,
               grace_s: float = 5) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "serve.py"), "--models_dir", str(model.parent),
         "--model_name", model.name, "--port", "0", "--max_tokens_limit", "20000",
         "--shutdown_grace_s", str(grace_s), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})},
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"serving tiny on http://[^:]+:(\d+)/", line)
        if found:
            return proc, f"http://127.0.0.1:{found.group(1)}", lines
    raise AssertionError("the server did not start:\n" + "".join(lines))


def _stop(proc: subprocess.Popen, lines: list[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    return "".join(lines) + out


def test_a_flood_of_bad_slow_and_excess_connections_writes_a_few_log_lines(model):
    proc, url, lines = _start_cli(model, "--log_level", "warning", "--max_connections", "20",
                                  "--header_timeout_s", "1", "--body_timeout_s", "1")
    try:
        host, port = _addr(url)
        held = [socket.create_connection((host, port)) for _ in range(15)]  # then idle
        for s in held[:5]:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        for _ in range(50):  # not HTTP at all
            with socket.create_connection((host, port)) as s:
                s.sendall(b"\x16\x03\x01 garbage\r\n\r\n")
                _closed_after(s, 5)
        extra = [socket.create_connection((host, port)) for _ in range(300)]
        time.sleep(2.5)  # every timeout has passed
        for s in held + extra:
            s.close()
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        out = _stop(proc, lines)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert len(out.splitlines()) <= 12, out  # one line per kind of trouble, not per connection


# --- 2. tokenizing off the event loop --------------------------------------------------------


def test_health_answers_promptly_while_sixteen_huge_prompts_are_tokenized(url):
    prompt = "the quick brown fox, " * (990_000 // 21)  # ~1 MB, ~200k tokens each
    stop, worst = threading.Event(), [0.0]

    def poll():
        while not stop.is_set():
            started = time.monotonic()
            assert requests.get(f"{url}/health", timeout=10).status_code == 200
            worst[0] = max(worst[0], time.monotonic() - started)
            time.sleep(0.02)

    def big(_):
        return _post(url, {"prompt": prompt, "max_tokens": 1})

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(big, range(16)))
    finally:
        stop.set()
        poller.join()
    for r in answers:  # tokenized in full, then refused as too long
        _error(r, 400, "context_length_exceeded")
    assert worst[0] < 1.0, f"/health took {worst[0]:.2f} s"


# --- 3. Host, Origin, Content-Type -----------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "LOCALHOST:1234"])
def test_loopback_host_names_are_answered(url, host):
    r = requests.get(f"{url}/v1/models", headers={"Host": host}, timeout=10)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example",
                                  "", "localhost.evil"])
def test_other_host_names_are_refused(url, host):
    r = requests.get(f"{url}/v1/models", headers={"Host": host}, timeout=10)
    _error(r, 400, "invalid_host")
    r = _post(url, {"prompt": "a"}, headers={"Host": host})
    _error(r, 400, "invalid_host")


def test_allowed_hosts_widen_the_list(gen):
    access = serve_app.Access(allowed_hosts="api.example.com, *.lan:8000")
    with _serve(gen, access=access) as url:
        for host, ok in [("api.example.com", True), ("api.example.com:9", True),
                         ("box.lan:8000", True), ("box.lan:9", False), ("localhost", False)]:
            r = requests.get(f"{url}/v1/models", headers={"Host": host}, timeout=10)
            assert (r.status_code == 200) == ok, (host, r.text)


def test_cross_origin_requests_are_refused_and_the_page_keeps_working(url):
    evil = {"Origin": "https://evil.example"}
    _error(_post(url, {"prompt": "a"}, headers=evil), 403, "origin_not_allowed")
    _error(requests.get(f"{url}/v1/models", headers=evil, timeout=10), 403,
           "origin_not_allowed")
    # text/plain is what a page may send without asking the browser first
    r = requests.post(f"{url}/v1/completions", data='{"prompt": "a"}', timeout=10,
                      headers={**evil, "Content-Type": "text/plain"})
    _error(r, 403, "origin_not_allowed")
    # the server's own page: same origin
    same = {"Origin": url}
    assert requests.get(f"{url}/", headers=same, timeout=10).status_code == 200
    assert requests.get(f"{url}/static/app.js", headers=same, timeout=10).status_code == 200
    r = _post(url, {"prompt": "a", "max_tokens": 2}, headers=same)
    assert r.status_code == 200, r.text


def test_allowed_origins_may_call_the_api_with_cors(gen):
    access = serve_app.Access(allowed_origins="https://app.example")
    with _serve(gen, access=access) as url:
        origin = {"Origin": "https://app.example"}
        r = _post(url, {"prompt": "a", "max_tokens": 2}, headers=origin)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        pre = requests.options(f"{url}/v1/completions", timeout=10, headers={
            **origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert pre.status_code == 200
        _error(_post(url, {"prompt": "a"}, headers={"Origin": "https://other.example"}), 403,
               "origin_not_allowed")


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_the_api_takes_json_only(url, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    r = requests.post(f"{url}/v1/completions", data=b'{"prompt": "a"}', headers=headers,
                      timeout=10)
    _error(r, 415, "unsupported_media_type")
    r = requests.post(f"{url}/v1/completions", data=b'{"prompt": "a", "max_tokens": 1}',
                      headers={"Content-Type": "application/json; charset=utf-8"}, timeout=10)
    assert r.status_code == 200


# --- 4. the API key --------------------------------------------------------------------------


def test_an_api_key_is_required_when_set(gen):
    with _serve(gen, access=serve_app.Access(api_key="s3cret-key")) as url:
        body = {"prompt": "a", "max_tokens": 2}
        r = _post(url, body)
        _error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
        _error(_post(url, body, headers={"Authorization": "Bearer s3cret-kex"}), 401,
               "invalid_api_key")
        _error(_post(url, body, headers={"Authorization": "Basic s3cret-key"}), 401,
               "invalid_api_key")
        _error(requests.get(f"{url}/v1/models", timeout=10), 401, "invalid_api_key")
        _error(requests.get(f"{url}/stats", timeout=10), 401, "invalid_api_key")
        assert _post(url, body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        # open: the health check, and the page (it holds no secret)
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        assert requests.get(f"{url}/", timeout=10).status_code == 200

        openai = reference("openai")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret-key", max_retries=0)
        out = client.completions.create(model="tiny", prompt="Hello", max_tokens=5,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5
        parts = [c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="Hello", max_tokens=5, stream=True) if c.choices]
        assert parts
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="tiny", prompt="Hello", max_tokens=5)


def test_cli_warns_on_an_open_address_without_a_key_and_reads_the_key_from_the_env(model):
    proc, url, lines = _start_cli(model, "--host", "0.0.0.0", "--log_level", "warning")
    out = _stop(proc, lines)
    warnings = [line for line in out.splitlines() if "anyone on the network" in line]
    assert len(warnings) == 1, out

    proc, url, lines = _start_cli(model, "--host", "0.0.0.0", "--log_level", "warning",
                                  env={"GPT2TF_API_KEY": "from-env"})
    try:
        _error(_post(url, {"prompt": "a"}), 401, "invalid_api_key")
        r = _post(url, {"prompt": "a", "max_tokens": 2},
                  headers={"Authorization": "Bearer from-env"})
        assert r.status_code == 200, r.text
    finally:
        out = _stop(proc, lines)
    assert "anyone on the network" not in out and "Traceback" not in out, out


# --- 5. a second Ctrl-C ----------------------------------------------------------------------


def test_a_second_ctrl_c_ends_every_stream_with_an_error_and_done(model):
    proc, url, lines = _start_cli(model, "--log_level", "info", grace_s=60)
    try:
        streams = [_post(url, {"prompt": "a", "max_tokens": 20000, "ignore_eos": True,
                               "stream": True, "seed": i}, stream=True) for i in range(4)]
        readers = [s.iter_lines() for s in streams]
        for r in readers:
            next(r)  # every stream is running
        with ThreadPoolExecutor(4) as pool:  # clients read on, as real ones do
            rests = [pool.submit(lambda r=r: [line for line in r if line]) for r in readers]
            proc.send_signal(signal.SIGINT)
            time.sleep(1.0)  # the graceful stop waits for the streams (60 s)
            assert proc.poll() is None
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            assert time.monotonic() - started < 8
            for rest in rests:
                rest = rest.result(timeout=10)
                assert rest[-1] == b"data: [DONE]", rest[-3:]
                assert json.loads(rest[-2][6:])["error"]["code"] == "interrupted", rest[-3:]
    finally:
        out = _stop(proc, lines)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "CancelledError" not in out, out


# --- 6. a row that fails fails alone ---------------------------------------------------------

POISON = 0.777  # a temperature the patched sampler fails on


@pytest.fixture
def poisoned_sampler(monkeypatch):
    real = pick_module._pick_row

    def pick_row(logits, p, u):
        if p.temperature == POISON:
            raise FloatingPointError("injected failure in the host sampler")
        return real(logits, p, u)

    monkeypatch.setattr(pick_module, "_pick_row", pick_row)


@pytest.mark.parametrize("engine", ["fast", "graph"])
def test_a_row_that_fails_in_the_decode_step_fails_alone(model, engine, poisoned_sampler,
                                                          caplog):
    normal = [{"prompt": f"Story {i}", "max_tokens": 12, "seed": i, "ignore_eos": True,
               "temperature": 0.9} for i in range(6)]
    poisoned = {"prompt": "x", "max_tokens": 12, "ignore_eos": True, "temperature": POISON}
    with Generator(model, engine="auto" if engine == "fast" else "graph") as g:
        with _serve(g) as url:
            scheduler = {"fast": ContinuousBatcher, "graph": Batcher}[engine]
            assert type(serve_server.serve_in_thread.last.config.app.state.batcher) is scheduler
            alone = [_post(url, b).json()["choices"][0]["text"] for b in normal]
            # a long request first: the others queue behind it and share the next batch
            first = _post(url, {"prompt": "a", "max_tokens": 200, "ignore_eos": True},
                          stream=True)
            next(first.iter_lines())
            bodies = normal[:3] + [poisoned, {**poisoned, "stream": True}] + normal[3:]
            with ThreadPoolExecutor(len(bodies)) as pool:
                answers = list(pool.map(lambda b: _post(url, b), bodies))
            first.close()
            texts = [a.json()["choices"][0]["text"] for a in answers[:3] + answers[5:]]
            assert [a.status_code for a in answers[:3] + answers[5:]] == [200] * 6
            assert texts == alone
            _error(answers[3], 500, "generation_failed")
            events = [line for line in answers[4].iter_lines() if line]
            assert events[-1] == b"data: [DONE]"
            assert json.loads(events[-2][6:])["error"]["code"] == "generation_failed"
            assert _post(url, normal[0]).json()["choices"][0]["text"] == alone[0]


# --- 7. any body at all ----------------------------------------------------------------------

_KNOWN = sorted(serve_schema._KNOWN_FIELDS)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
_plausible = {
    "prompt": st.text(max_size=40) | st.lists(st.integers(-3, 300), max_size=6)
    | st.lists(st.text(max_size=10), max_size=3),
    "max_tokens": st.integers(-2, 10), "n": st.integers(-1, 5), "seed": st.integers(),
    "temperature": st.floats(-1, 3) | st.integers(0, 2), "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-5, 2**40), "stream": st.booleans(), "echo": st.booleans(),
    "ignore_eos": st.booleans(), "stop": st.text(max_size=3) | st.lists(st.text(max_size=3)),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "model": st.just("tiny") | st.text(max_size=5),
}
_bodies = st.one_of(
    st.fixed_dictionaries({}, optional=_plausible),  # mostly well-formed: some generate
    st.fixed_dictionaries({}, optional={k: _plausible.get(k, _json) | _json for k in _KNOWN}),
    st.dictionaries(st.sampled_from(_KNOWN) | st.text(max_size=8), _json, max_size=5),
    _json,
).map(lambda b: json.dumps(b).encode()) | st.binary(max_size=200)


@pytest.fixture(scope="module")
def small_url(gen):
    limits = serve_schema.Limits(max_tokens_limit=8, max_n=4, max_prompt_tokens=64,
                                 max_body_bytes=20_000)
    with _serve(gen, limits=limits) as u:
        yield u


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_bodies)
def test_any_body_gets_a_json_answer_and_never_a_5xx(small_url, body):
    r = requests.post(f"{small_url}/v1/completions", data=body, timeout=30,
                      headers={"Content-Type": "application/json"}, stream=True)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == ERROR_KEYS and isinstance(error["message"], str), error
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert [line for line in r.iter_lines() if line][-1] == b"data: [DONE]"
    else:
        assert r.json()["object"] == "text_completion"


def test_health_answers_after_the_property_test(small_url):
    assert requests.get(f"{small_url}/health", timeout=5).json() == {"status": "ok"}


# --- the CLI: the same bad value --------------------------------------------------------------


def test_cli_top_k_past_int32_is_a_one_line_error(capsys):
    assert gpt2tf_main(["generate", "--top_k", "2147483648"]) in (1, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --top_k") and "2147483647" in err
