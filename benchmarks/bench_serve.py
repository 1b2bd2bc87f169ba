#!/usr/bin/env python3
"""Server throughput under load: one client at a time vs N concurrent clients.

A randomly initialised 124M-shaped model (GPT-2's real vocabulary from ../shared/data, built
once under --cache_dir) is served by `serve.py` in a subprocess. The same R requests of T new
tokens each (ignore_eos, so every request makes exactly T tokens; seed = request number) run
first from one client, one after the other, then from N client threads at once. Prints tokens/s
and p50/p99 latency of both runs, their ratio (the target is >= 3x with 16 clients), and
whether every request got the same text in both runs (with --batch_invariant 1, the server's
default, batching must not change results; with 0 a few tokens may differ).

    python benchmarks/bench_serve.py                       # 64 requests x 64 tokens, 16 clients
    python benchmarks/bench_serve.py --requests 8 --tokens 16   # a quick check
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MODEL_NAME = "random-124M"


def build_model(cache_dir: Path) -> Path:
    """models/random-124M under cache_dir: GPT-2 124M's shapes, random weights, real vocab."""
    model_dir = cache_dir / MODEL_NAME
    if (model_dir / "checkpoint").is_file():
        return model_dir
    if not (SHARED_DATA / "encoder.json").is_file():
        sys.exit(f"{SHARED_DATA} lacks encoder.json / vocab.bpe (GPT-2's vocabulary)")
    sys.path.insert(0, str(REPO / "src"))
    from gpt2tf import checkpoints
    from gpt2tf.hparams import HParams

    print(f"building {model_dir} (once)...", file=sys.stderr)
    tmp = cache_dir / (MODEL_NAME + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoints.init_model_dir(tmp, HParams(), vocab_dir=SHARED_DATA, seed=0)
    tmp.replace(model_dir)
    return model_dir


def start_server(models_dir: Path, max_batch: int, max_tokens: int,
                 batch_invariant: bool) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "serve.py"), "--models_dir", str(models_dir),
         "--model_name", MODEL_NAME, "--port", "0", "--log_level", "warning",
         "--max_batch", str(max_batch), "--max_tokens_limit", str(max(max_tokens, 16)),
         f"--batch_invariant={batch_invariant}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"serving \S+ on (http://[\d.]+:\d+)/", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, found.group(1)
    sys.exit("the server did not start:\n" + "".join(lines))


def one_request(url: str, i: int, tokens: int) -> tuple[float, str, int]:
    start = time.perf_counter()
    r = requests.post(f"{url}/v1/completions", timeout=3600, json={
        "prompt": f"Request {i}: " + "the meaning of life is " * (1 + i % 4),
        "max_tokens": tokens, "seed": i,
        "ignore_eos": True, "top_k": 40})
    r.raise_for_status()
    out = r.json()
    return time.perf_counter() - start, out["choices"][0]["text"], out["usage"]["completion_tokens"]


def run(url: str, clients: int, n_requests: int, tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(url, i, tokens), range(n_requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    made = sum(r[2] for r in results)
    return {
        "clients": clients, "wall_s": wall, "tokens": made, "tok_s": made / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "texts": [r[1] for r in results],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max_batch", type=int, default=8, help="the server's --max_batch")
    p.add_argument("--batch_invariant", type=int, choices=(0, 1), default=1,
                   help="the server's --batch_invariant: 1 pads every batch to max_batch rows")
    p.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "gpt2tf-bench"),
                   help="where the random 124M model is built once")
    args = p.parse_args()

    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    build_model(cache)
    proc, url = start_server(cache, args.max_batch, args.tokens, bool(args.batch_invariant))
    try:
        one_request(url, 10**6, 4)  # warm-up: the first session.run pays graph set-up
        single = run(url, 1, args.requests, args.tokens)
        print(f"1 client:   {single['tok_s']:7.1f} tokens/s  p50 {single['p50_s']:6.2f} s"
              f"  p99 {single['p99_s']:6.2f} s  ({single['wall_s']:.0f} s)", flush=True)
        many = run(url, args.clients, args.requests, args.tokens)
        print(f"{args.clients} clients: {many['tok_s']:7.1f} tokens/s  p50 {many['p50_s']:6.2f} s"
              f"  p99 {many['p99_s']:6.2f} s  ({many['wall_s']:.0f} s)", flush=True)
        stats = requests.get(f"{url}/stats", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(60)
    ratio = many["tok_s"] / single["tok_s"]
    same = sum(a == b for a, b in zip(single["texts"], many["texts"]))
    print(f"throughput ratio {ratio:.2f}x (target >= 3x) with max_batch {args.max_batch},"
          f" batch_invariant {bool(args.batch_invariant)}; {stats['batches']} batches in all")
    print(f"identical texts in both runs: {same}/{args.requests}")
    for i, (a, b) in enumerate(zip(single["texts"], many["texts"])):
        if a != b:
            at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"  request {i}: the texts part at character {at} of {len(a)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
