#!/usr/bin/env python3
"""Serving speed: the HTTP server (continuous batching) against the CLI's batch-1 generation.

A randomly initialised model (speed does not depend on weight values; GPT-2's real vocabulary
from ../shared/data) is built once under --cache_dir: 124M-shaped by default, or with
`--shape small` (2 layers, n_embd 128, n_ctx 1024) for quick smoke runs whose numbers mean
nothing. `serve.py` serves it in a subprocess (--precision, --max_batch); the CLI reference runs
in another long-lived subprocess (so TF/TFLite memory is separate from the server's): the same
model folder and precision, `Generator.generate_tokens` at batch 1, prompt PROMPT, temperature
0.7, timed on its second and later calls. Client requests use temperature 0.7 and ignore_eos
(every request makes exactly max_tokens tokens) and stream server-sent events; time to first
token (TTFT) is the arrival of the first SSE chunk, latency that of the last.

1. CLI batch-1: tok/s of --stream_tokens (256) new tokens: the reference.
2. One client streaming --stream_tokens tokens: tok/s (request sent to last chunk, so the
   prefill counts as it does in the CLI's call) and TTFT; ratio to (1), target >= 0.85x.
3. --requests (64) requests of --tokens (64) tokens, seed = request number, first from one
   client one after another, then from --clients (16) client threads at once (each sends its
   next request when the last one ends): throughput (tokens / wall time) of each, their ratio
   (target >= 6x), p50/p99 latency and p50 TTFT, and how many requests got the same text in
   both runs (continuous batching must not change a seeded completion: target all).
4. A --short_tokens (16) token request alone, then the same request (same seed) sent while a
   --long_tokens (512) token request streams (sent once the long one's first chunk is in; the
   long one is dropped once the short ones end, and must still have been streaming): each
   --short_repeats (3) times one after another per round, medians; both latencies and their
   ratio (target <= 2x), and whether all its texts agree.

Parts 1, 2 and 4 repeat over --rounds rounds (1 and 2 alternate which goes first); medians are
reported, and ratios are medians of per-round ratios, so a drift of the shared machine's speed
hits both sides alike. Part 3 runs once, after the rounds. The server's /stats is read around
each part-3 run: rows/step = tokens sampled / decode steps (a request's first token comes from
its prefill, so one client shows slightly over 1); /metrics is saved at the end. The clients
run in this process, on the same CPUs as the server (they are light: a few ms per request).

--max_batch defaults to 16 (= --clients; serve.py's own default is 8). fp32 and bf16 run on
the native decode step (gpt2tf/decode/native.cc) where it builds, int8 on TFLite; where only
the TF graph runs, the server batches statically (a batch runs to its end; new requests wait),
so parts 3 and 4 show that scheduler, not continuous batching; part 4 is then flagged invalid
when the long request ends before the short ones.

The first load of a model in int8 (or in fp32 without the native step) converts it for TFLite
(124M: 1.5-3 minutes and ~9 GB of RAM; the CLI worker does it, before the server starts) and
caches it in <model>/.gpt2tf-decode/; later runs reuse it. --model_dir serves an existing
model instead (e.g. bench_generate.py's <bench dir>/models/124M, whose conversions are
already cached).

    python benchmarks/bench_serve.py [--precision fp32|int8|bf16] [--rounds 3]
        [--requests 64] [--tokens 64] [--clients 16] [--max_batch 16]
        [--json bench_out/serve.json]
    python benchmarks/bench_serve.py --shape small --requests 8 --tokens 16 --rounds 1 \\
        --stream_tokens 32 --long_tokens 128 --clients 4   # a smoke run (seconds; meaningless)

The model is cached in --cache_dir (default $GPT2TF_BENCH_DIR, else <tmp>/gpt2tf-bench).
"""

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from run_info import machine_info

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PROMPT = "The meaning of life is"
TEMPERATURE = 0.7
# --shape -> (model folder name, hparams); n_vocab is GPT-2's 50257 in both
SHAPES = {
    "124M": ("random-124M", {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_ctx": 1024}),
    "small": ("random-small", {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_ctx": 1024}),
}
# (key, description, comparison, goal): each reported met / not met
TARGETS = [
    ("stream_vs_cli", "1 streaming client vs CLI batch-1 tok/s", ">=", 0.85),
    ("concurrency", "concurrent vs 1-client throughput", ">=", 6.0),
    ("identical", "identical texts, 1 client vs concurrent", "==", "all"),
    ("short_under_load", "short request latency under a long stream", "<=", 2.0),
]


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO / "src"), TF_CPP_MIN_LOG_LEVEL="3", **extra)


BUILD = r"""
import json, sys
from gpt2tf import checkpoints
from gpt2tf.hparams import HParams
checkpoints.init_model_dir(sys.argv[1], HParams(**json.loads(sys.argv[2])), vocab_dir=sys.argv[3],
                           seed=0)
"""


def build_model(cache_dir: Path, shape: str) -> Path:
    """<cache_dir>/random-<shape>: random weights, real vocabulary; built once (a subprocess,
    so this process never loads TensorFlow)."""
    name, hp = SHAPES[shape]
    model_dir = cache_dir / name
    if (model_dir / "checkpoint").is_file():
        return model_dir
    if not (SHARED_DATA / "encoder.json").is_file():
        sys.exit(f"{SHARED_DATA} lacks encoder.json / vocab.bpe (GPT-2's vocabulary)")
    print(f"building {model_dir} (once)...", file=sys.stderr, flush=True)
    tmp = cache_dir / (name + ".part")
    subprocess.run(["rm", "-rf", str(tmp)], check=True)
    subprocess.run([sys.executable, "-c", BUILD, str(tmp), json.dumps(hp), str(SHARED_DATA)],
                   check=True, env=_env())
    tmp.replace(model_dir)
    return model_dir


# The CLI reference: loads once, makes one untimed call (the first call sets up kernels and
# plans), prints READY, then answers each stdin line with one timed call ("TIME {...}").
# argv: model dir, precision, tokens, prompt, temperature.
CLI_WORKER = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from gpt2tf.quiet import import_tensorflow
import_tensorflow()
from gpt2tf.decode.engine import SamplingParams
from gpt2tf.decode.generator import Generator
model_dir, precision, tokens, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
gen = Generator(model_dir, precision=precision)
load = time.perf_counter() - t0
ctx = gen.encode_prompt(prompt)
params = SamplingParams(temperature=float(sys.argv[5]))
calls = 0

def call():
    global calls
    calls += 1
    t = time.perf_counter()
    got = gen.generate_tokens(ctx, length=tokens, seed=calls, params=params, stop_at_eot=False)
    return time.perf_counter() - t, len(got[0])

first_s, _ = call()

def rss():  # ru_maxrss is in KiB on Linux: this worker's peak so far
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9

print("READY " + json.dumps({"load_s": load, "first_call_s": first_s,
                             "engine": getattr(gen.engine.backend, "runtime", gen.engine_name),
                             "precision": gen.precision, "peak_rss_gb": rss()}), flush=True)
for line in sys.stdin:
    dt, n = call()
    print("TIME " + json.dumps({"s": dt, "tokens": n, "tok_s": n / dt, "peak_rss_gb": rss()}),
          flush=True)
"""


class CliWorker:
    def __init__(self, model_dir: Path, precision: str, tokens: int, log: Path):
        self.log = log
        print(f"loading the CLI reference ({precision}; converts on a model's first load)...",
              file=sys.stderr, flush=True)
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CLI_WORKER, str(model_dir), precision, str(tokens),
                 PROMPT, str(TEMPERATURE)],
                env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self.info = self._expect("READY ")
        self.peak_rss_gb = self.info["peak_rss_gb"]

    def _expect(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return json.loads(line[len(tag):])
        tail = self.log.read_text()[-2000:]
        raise RuntimeError(f"the CLI worker exited with {self.proc.wait()}; its stderr:\n{tail}")

    def timed(self) -> dict:
        self.proc.stdin.write("gen\n")
        self.proc.stdin.flush()
        got = self._expect("TIME ")
        self.peak_rss_gb = max(self.peak_rss_gb, got["peak_rss_gb"])
        return got

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Server:
    """serve.py in a subprocess, its output in a log file."""

    def __init__(self, models_dir: Path, name: str, a, max_tokens: int, log: Path):
        self.log = log
        print(f"starting the server (--precision {a.precision} --max_batch {a.max_batch})...",
              file=sys.stderr, flush=True)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "serve.py"), "--models_dir", str(models_dir),
                 "--model_name", name, "--port", "0", "--log_level", "warning",
                 "--precision", a.precision, "--max_batch", str(a.max_batch),
                 "--max_tokens_limit", str(max_tokens),
                 f"--batch_invariant={bool(a.batch_invariant)}"],
                stdout=out, stderr=subprocess.STDOUT, env=_env())
        deadline = time.monotonic() + 3600  # a first load converts: minutes on a busy machine
        while True:
            found = re.search(r"serving \S+ on (http://[\d.]+:\d+)/", log.read_text())
            if found:
                self.url = found.group(1)
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                sys.exit("the server did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.2)

    def peak_rss_gb(self) -> float | None:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024 / 1e9
        except (OSError, AttributeError):
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_local = threading.local()


def _session() -> requests.Session:
    """One keep-alive connection per client thread."""
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


def stream_request(url: str, prompt: str, tokens: int, seed: int, *, session=None,
                   on_chunk=None) -> dict:
    """One streaming completion: latency, TTFT (first SSE chunk), text, completion tokens.

    on_chunk(n_chunks) is called after each chunk; if it returns True the request is dropped
    (the connection closes, so the server cancels its row)."""
    body = {"prompt": prompt, "max_tokens": tokens, "seed": seed, "temperature": TEMPERATURE,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    session = session or _session()
    start = time.perf_counter()
    first, parts, usage, chunks, dropped = None, [], None, 0, False
    with session.post(f"{url}/v1/completions", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines(chunk_size=None):  # None: hand over data as it arrives
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"the server answered an error event: {event['error']}")
            if event.get("usage"):
                usage = event["usage"]
            if event["choices"]:
                if first is None:
                    first = time.perf_counter() - start
                parts.append(event["choices"][0]["text"])
                chunks += 1
                if on_chunk is not None and on_chunk(chunks):
                    dropped = True
                    break
    latency = time.perf_counter() - start
    made = usage["completion_tokens"] if usage else None
    if not dropped and made != tokens:
        raise RuntimeError(f"asked for {tokens} tokens (ignore_eos), the server made {made}")
    return {"latency_s": latency, "ttft_s": first, "text": "".join(parts), "tokens": made,
            "chunks": chunks, "dropped": dropped}


def load_prompt(i: int) -> str:
    return f"Request {i}: " + "the meaning of life is " * (1 + i % 4)


def stats(url: str) -> dict:
    return requests.get(f"{url}/stats", timeout=30).json()


def wait_idle(url: str, timeout: float = 60) -> None:
    """Until the server has no running or queued rows (a dropped request leaves at a step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = stats(url)
        if not s["active_rows"] and not s["queued_rows"]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the server is still busy after {timeout} s: {stats(url)}")


def steps_between(before: dict, after: dict) -> dict:
    steps = after["batches"] - before["batches"]
    sampled = after["tokens_sampled"] - before["tokens_sampled"]
    return {"decode_steps": steps, "tokens_sampled": sampled,
            "rows_per_step": sampled / steps if steps else None}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def load_run(url: str, clients: int, n_requests: int, tokens: int) -> dict:
    """n_requests requests (seed = request number) from `clients` closed-loop client threads."""
    before = stats(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(
            lambda i: stream_request(url, load_prompt(i), tokens, seed=i), range(n_requests)))
    wall = time.perf_counter() - start
    made = sum(r["tokens"] for r in results)
    latencies = [r["latency_s"] for r in results]
    ttfts = [r["ttft_s"] for r in results]
    return {
        "clients": clients, "requests": n_requests, "tokens_per_request": tokens,
        "wall_s": wall, "tokens": made, "tok_s": made / wall,
        "latency_p50_s": statistics.median(latencies), "latency_p99_s": pct(latencies, 0.99),
        "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": pct(ttfts, 0.99),
        "latencies_s": latencies, "ttfts_s": ttfts, "server": steps_between(before, stats(url)),
        "texts": [r["text"] for r in results],
    }


def short_alone(url: str, a) -> list[dict]:
    """The short request --short_repeats times, one after another, on an idle server."""
    return [stream_request(url, PROMPT, a.short_tokens, seed=1) for _ in range(a.short_repeats)]


def short_under_load(url: str, a) -> tuple[list[dict], dict]:
    """The short request --short_repeats times, one after another, sent once a long streaming
    request is decoding; then the long one is dropped. The short results, and how far the long
    one had got (it must still be streaming when the last short one ends)."""
    started, stop = threading.Event(), threading.Event()
    seen = {"chunks": 0}
    long_result = {}

    def on_chunk(n: int) -> bool:
        seen["chunks"] = n
        started.set()
        return stop.is_set()

    def run_long():
        try:
            long_result.update(stream_request(url, "A long story: " + PROMPT, a.long_tokens,
                                              seed=2, session=requests.Session(),
                                              on_chunk=on_chunk))
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            long_result["error"] = repr(e)
        started.set()

    thread = threading.Thread(target=run_long, daemon=True)
    thread.start()
    if not started.wait(3600) or "error" in long_result:
        raise RuntimeError(f"the long request failed: {long_result.get('error')}")
    chunks_before = seen["chunks"]
    shorts = [stream_request(url, PROMPT, a.short_tokens, seed=1)
              for _ in range(a.short_repeats)]
    chunks_after = seen["chunks"]
    still_streaming = thread.is_alive()  # the long one had not finished when the short one did
    stop.set()
    thread.join(3600)
    if "error" in long_result:
        raise RuntimeError(f"the long request failed: {long_result['error']}")
    wait_idle(url)
    return shorts, {"chunks_before": chunks_before, "chunks_after": chunks_after,
                    "still_streaming": still_streaming}


def run_rounds(a, cli: CliWorker, url: str) -> dict:
    per = {k: [] for k in ("cli_tok_s", "stream_tok_s", "stream_ttft_s", "stream_decode_tok_s",
                           "stream_vs_cli", "short_alone_s", "short_loaded_s",
                           "short_under_load", "short_same_text", "long_still_streaming")}
    for r in range(a.rounds):
        order = ("cli", "stream") if r % 2 == 0 else ("stream", "cli")
        got = {}
        for part in order:
            time.sleep(1.0)  # let the other process's spinning threads go idle
            if part == "cli":
                got["cli"] = cli.timed()
            else:
                got["stream"] = stream_request(url, PROMPT, a.stream_tokens, seed=r)
        s, c = got["stream"], got["cli"]
        stream_tok_s = s["tokens"] / s["latency_s"]
        decode = (s["tokens"] - 1) / (s["latency_s"] - s["ttft_s"]) if s["tokens"] > 1 else None
        per["cli_tok_s"].append(c["tok_s"])
        per["stream_tok_s"].append(stream_tok_s)
        per["stream_ttft_s"].append(s["ttft_s"])
        per["stream_decode_tok_s"].append(decode)
        per["stream_vs_cli"].append(stream_tok_s / c["tok_s"])
        print(f"round {r + 1}: CLI {c['tok_s']:.1f} tok/s, stream {stream_tok_s:.1f} tok/s"
              f" (TTFT {s['ttft_s'] * 1e3:.0f} ms)", file=sys.stderr, flush=True)
        time.sleep(1.0)
        wait_idle(url)
        alone = short_alone(url, a)
        loaded, long_one = short_under_load(url, a)
        alone_s = statistics.median(x["latency_s"] for x in alone)
        loaded_s = statistics.median(x["latency_s"] for x in loaded)
        per["short_alone_s"].append(alone_s)
        per["short_loaded_s"].append(loaded_s)
        per["short_under_load"].append(loaded_s / alone_s)
        per["short_same_text"].append(len({x["text"] for x in alone + loaded}) == 1)
        per["long_still_streaming"].append(long_one["still_streaming"])
        print(f"round {r + 1}: {a.short_tokens}-token request alone {alone_s:.3f} s, beside a"
              f" {a.long_tokens}-token stream {loaded_s:.3f} s (medians of {a.short_repeats};"
              f" the long one made {long_one['chunks_before']}..{long_one['chunks_after']}"
              f" chunks meanwhile)", file=sys.stderr, flush=True)
    return per


def parse_metrics(text: str) -> dict:
    """Prometheus text -> {name{labels}: value}, histogram buckets left out."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip() or "_bucket{" in line or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out






def check_targets(res: dict) -> list[dict]:
    got = {
        "stream_vs_cli": res["single_stream"]["vs_cli"],
        "concurrency": res["load"]["ratio"],
        "identical": res["load"]["identical"],
        "short_under_load": res["short_request"]["ratio"],
    }
    out = []
    for key, what, op, goal in TARGETS:
        value = got[key]
        if key == "identical":
            met = value == res["load"]["requests"]
            shown, goal_shown = f"{value}/{res['load']['requests']}", "all"
        else:
            met = value >= goal if op == ">=" else value <= goal
            shown, goal_shown = f"{value:.2f}x", f"{op} {goal}x"
        status = "met" if met else "NOT MET"
        if key == "short_under_load" and not res["short_request"]["long_still_streaming"]:
            met, status = None, "invalid: the long request ended first (raise --long_tokens)"
        out.append({"target": key, "what": what, "value": value, "goal": goal, "op": op,
                    "met": met if met is None else bool(met), "status": status, "shown": shown,
                    "goal_shown": goal_shown})
    return out


def report(a, res: dict) -> None:
    s, ld, sh, cli = res["single_stream"], res["load"], res["short_request"], res["cli"]
    one, many = ld["one_client"], ld["concurrent"]
    print(f"\n{res['model']['shape']} model ({res['model']['name']}), --precision {a.precision}"
          f" (CLI engine {cli['engine']}), server --max_batch {a.max_batch};"
          f" {a.rounds} round(s), medians")
    if a.shape != "124M":
        print("  (a --shape small smoke run: the numbers are not meaningful)")
    print(f"1. CLI batch-1, {a.stream_tokens} tokens:       {cli['tok_s']:8.1f} tok/s"
          f"  (rounds: {', '.join(f'{x:.1f}' for x in cli['tok_s_rounds'])})")
    print(f"2. 1 streaming client, {a.stream_tokens} tokens: {s['tok_s']:8.1f} tok/s"
          f"  TTFT {s['ttft_s'] * 1e3:.0f} ms, decode {s['decode_tok_s']:.1f} tok/s;"
          f" {s['vs_cli']:.2f}x the CLI")
    print(f"3. {ld['requests']} requests x {ld['tokens_per_request']} tokens:")
    print(f"   {'clients':>8}{'tok/s':>9}{'wall s':>9}{'p50 s':>8}{'p99 s':>8}{'TTFT p50':>10}"
          f"{'TTFT p99':>10}{'rows/step':>10}")
    for run in (one, many):
        rows = run["server"]["rows_per_step"]
        print(f"   {run['clients']:>8}{run['tok_s']:9.1f}{run['wall_s']:9.1f}"
              f"{run['latency_p50_s']:8.2f}{run['latency_p99_s']:8.2f}"
              f"{run['ttft_p50_s']:10.3f}{run['ttft_p99_s']:10.3f}"
              f"{rows if rows is not None else float('nan'):10.2f}")
    print(f"   throughput ratio {ld['ratio']:.2f}x; identical texts {ld['identical']}"
          f"/{ld['requests']}")
    for i in ld["differing"]:
        print(f"     request {i['request']}: the texts part at character {i['at']}")
    print(f"4. {a.short_tokens}-token request: alone {sh['alone_s']:.3f} s, beside a"
          f" {a.long_tokens}-token stream {sh['loaded_s']:.3f} s: {sh['ratio']:.2f}x"
          f" (same text: {sh['same_text']};"
          f" long one still streaming: {sh['long_still_streaming']})")
    print(f"\n{'target':<46}{'measured':>10}{'goal':>10}  status")
    for t in res["targets"]:
        print(f"{t['what']:<46}{t['shown']:>10}{t['goal_shown']:>10}  {t['status']}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--precision", choices=("fp32", "int8", "bf16"), default="fp32",
                   help="the server's and the CLI reference's --precision")
    p.add_argument("--shape", choices=tuple(SHAPES), default="124M",
                   help="the random model's shape; small: for smoke runs only")
    p.add_argument("--model_dir", default="",
                   help="serve this existing model folder instead of building one")
    p.add_argument("--rounds", type=int, default=3, help="rounds of parts 1, 2 and 4")
    p.add_argument("--stream_tokens", type=int, default=256, help="tokens of parts 1 and 2")
    p.add_argument("--requests", type=int, default=64, help="requests of part 3")
    p.add_argument("--tokens", type=int, default=64, help="tokens per request of part 3")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients of part 3")
    p.add_argument("--short_tokens", type=int, default=16, help="the short request of part 4")
    p.add_argument("--long_tokens", type=int, default=512, help="the long request of part 4")
    p.add_argument("--short_repeats", type=int, default=3,
                   help="short requests per round of part 4, alone and beside the long one")
    p.add_argument("--max_batch", type=int, default=16, help="the server's --max_batch")
    p.add_argument("--batch_invariant", type=int, choices=(0, 1), default=1,
                   help="the server's --batch_invariant (only the TF-graph path uses it)")
    p.add_argument("--cache_dir", default=os.environ.get(
        "GPT2TF_BENCH_DIR", os.path.join(tempfile.gettempdir(), "gpt2tf-bench")),
                   help="where the random model is built once")
    p.add_argument("--json", default="", help="also write every number to this JSON file")
    a = p.parse_args()
    if min(a.rounds, a.stream_tokens, a.requests, a.tokens, a.clients, a.short_tokens,
           a.long_tokens, a.max_batch, a.short_repeats) < 1:
        p.error("counts must be >= 1")
    if a.long_tokens <= a.short_tokens:
        p.error("--long_tokens must be more than --short_tokens")
    return a


def main() -> int:
    a = parse_args()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    machine = machine_info()
    if a.model_dir:
        model_dir = Path(a.model_dir).resolve()
        shape = "given"
    else:
        cache = Path(a.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        model_dir = build_model(cache, a.shape)
        shape = a.shape
    hp = json.loads((model_dir / "hparams.json").read_text())
    log_dir = Path(tempfile.mkdtemp(prefix="bench-serve-logs-"))
    max_tokens = max(a.stream_tokens, a.tokens, a.short_tokens, a.long_tokens)

    # The CLI worker loads first, alone: a model's first load at a precision converts it
    # (several GB), and the server started after it loads the cached file.
    cli = CliWorker(model_dir, a.precision, a.stream_tokens, log_dir / "cli.log")
    server = None
    try:
        t = time.perf_counter()
        server = Server(model_dir.parent, model_dir.name, a, max_tokens, log_dir / "server.log")
        server_load_s = time.perf_counter() - t
        url = server.url
        # Warm-up: the first request sets up the step's plan; a burst touches the larger plans.
        stream_request(url, PROMPT, 4, seed=10**6)
        with ThreadPoolExecutor(min(a.clients, a.max_batch)) as pool:
            list(pool.map(lambda i: stream_request(url, load_prompt(i), 4, seed=10**6 + i),
                          range(min(a.clients, a.max_batch))))
        wait_idle(url)

        per = run_rounds(a, cli, url)
        time.sleep(1.0)
        wait_idle(url)
        print(f"part 3: {a.requests} requests x {a.tokens} tokens from 1 client...",
              file=sys.stderr, flush=True)
        one = load_run(url, 1, a.requests, a.tokens)
        print(f"  {one['tok_s']:.1f} tok/s; now from {a.clients} clients...", file=sys.stderr,
              flush=True)
        time.sleep(1.0)
        many = load_run(url, a.clients, a.requests, a.tokens)
        print(f"  {many['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
        final_stats = stats(url)
        metrics = parse_metrics(requests.get(f"{url}/metrics", timeout=30).text)
        server_rss = server.peak_rss_gb()
    finally:
        if server is not None:
            server.close()
        cli.close()

    differing = []
    for i, (x, y) in enumerate(zip(one["texts"], many["texts"])):
        if x != y:
            at = next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            differing.append({"request": i, "at": at, "chars": len(x)})
    texts = {"one_client": one.pop("texts"), "concurrent": many.pop("texts")}
    res = {
        "started": started, "machine": machine,
        "model": {"dir": str(model_dir), "name": model_dir.name, "shape": shape, "hparams": hp,
                  "meaningful": shape != "small"},
        "settings": {k: v for k, v in vars(a).items() if k != "json"},
        "prompt": PROMPT, "temperature": TEMPERATURE,
        "cli": {**cli.info, "tok_s": med(per["cli_tok_s"]), "tok_s_rounds": per["cli_tok_s"],
                "peak_rss_gb_final": cli.peak_rss_gb},
        "server_info": {"load_s": server_load_s, "peak_rss_gb": server_rss, "stats": final_stats,
                        "metrics": metrics, "log": str(log_dir / "server.log")},
        "single_stream": {
            "tokens": a.stream_tokens, "tok_s": med(per["stream_tok_s"]),
            "ttft_s": med(per["stream_ttft_s"]), "decode_tok_s": med(per["stream_decode_tok_s"]),
            "vs_cli": med(per["stream_vs_cli"]), "tok_s_rounds": per["stream_tok_s"],
            "ttft_s_rounds": per["stream_ttft_s"], "vs_cli_rounds": per["stream_vs_cli"]},
        "load": {"requests": a.requests, "tokens_per_request": a.tokens, "one_client": one,
                 "concurrent": many, "ratio": many["tok_s"] / one["tok_s"],
                 "identical": a.requests - len(differing), "differing": differing,
                 "texts": texts},
        "short_request": {
            "short_tokens": a.short_tokens, "long_tokens": a.long_tokens,
            "alone_s": med(per["short_alone_s"]), "loaded_s": med(per["short_loaded_s"]),
            "ratio": med(per["short_under_load"]), "alone_s_rounds": per["short_alone_s"],
            "loaded_s_rounds": per["short_loaded_s"], "ratio_rounds": per["short_under_load"],
            "same_text": all(per["short_same_text"]),
            "long_still_streaming": all(per["long_still_streaming"])},
        "logs": str(log_dir),
    }
    res["targets"] = check_targets(res)
    res["machine"]["loadavg_end"] = os.getloadavg()
    report(a, res)
    print(f"\nlogs (CLI worker stderr, server output): {log_dir}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
        print(f"results written to {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
