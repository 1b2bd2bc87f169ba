#!/usr/bin/env python3
"""Generation speed: gpt2tf vs gpt-2-simple 0.8.1 vs HuggingFace transformers, side by side.

A random 124M-shaped model (speed does not depend on weight values), fp32, this machine's CPU.
Each system runs in its own long-lived subprocess and is timed on its SECOND generate() call
of 256 new tokens after a short prompt, at batch 1 and batch 8 (gpt-2-simple is reloaded before
each measurement, as its calls slow down one after another). The systems take turns over several
rounds and the medians are reported, so drifts in this shared machine's memory bandwidth fall on
all of them alike. Also reported:
model-load time, time to first token, and memory-bandwidth utilisation: weight bytes read per
decode step x steps/s over a read bandwidth measured in this run (a numpy GEMV over 512 MB).

    python benchmarks/bench_generate.py [--tokens 256] [--batches 1,8] [--rounds 3] [--skip hf,g2s]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PROMPT = "The meaning of life is"
TEMPERATURE = 0.7


def model_dir() -> Path:
    """A cached random 124M model in OpenAI's layout (made once by gpt2tf's own init)."""
    root = Path(os.environ.get("GPT2TF_BENCH_DIR", Path(tempfile.gettempdir()) / "gpt2tf-bench"))
    out = root / "models" / "124M"
    if not out.is_dir():
        root.joinpath("models").mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-c",
             "import sys; from gpt2tf.cli import main; sys.exit(main(sys.argv[1:]))",
             "init", str(out), "--n_layer", "12", "--n_embd", "768", "--n_head", "12",
             "--n_ctx", "1024", "--vocab_dir", str(SHARED)],
            check=True, env=_env(),
        )
    return out


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3")


# Each system runs as a long-lived worker: it loads once, prints READY, then answers "gen B"
# lines on stdin with one timed generate() of `tokens` new tokens at batch B ("TIME {...}").
# The parent interleaves the systems round by round, so the machine's drifting memory bandwidth
# (a shared host) hits all of them alike, and reports medians over the rounds.

WORKER_LOOP = r"""
for line in sys.stdin:
    b = int(line.split()[1])
    dt = timed_call(b)
    print("TIME " + json.dumps({"b": b, "tok_s": b * tokens / dt}), flush=True)
"""

# The second and later calls of a system that builds its graph once: warm up once per batch.
WARM_THEN_TIME = r"""
def timed_call(b):
    if b not in warm:
        call(b)
        warm.add(b)
    t = time.perf_counter()
    call(b)
    return time.perf_counter() - t
"""

OURS = r"""
import json, sys, time
t0 = time.perf_counter()
from gpt2tf.quiet import import_tensorflow as quiet_tensorflow_import
quiet_tensorflow_import()
from gpt2tf.decode import decoder, generator
gen = generator.Generator(sys.argv[1])
load = time.perf_counter() - t0
tokens = int(sys.argv[2])
ctx = gen.encode_prompt(%(prompt)r)
params = decoder.SamplingParams(temperature=%(temp)r)
t = time.perf_counter()
next(gen.stream([ctx], length=1, params=params, rngs=[decoder.sample_seed(0, 0)]))
first = time.perf_counter() - t
warm, calls = set(), 0

def call(b):
    global calls
    calls += 1
    got = gen.generate_tokens(ctx, nsamples=b, batch_size=b, length=tokens, params=params,
                              seed=calls, stop_at_eot=False)
    assert all(len(s) == tokens for s in got)

print("READY " + json.dumps({"load_s": load, "first_token_s": first}), flush=True)
""" % {"prompt": PROMPT, "temp": TEMPERATURE} + WARM_THEN_TIME + WORKER_LOOP

G2S = r"""
import json, sys, time, os
t0 = time.perf_counter()
import gpt_2_simple as gpt2
model_dir = os.path.dirname(sys.argv[1]); name = os.path.basename(sys.argv[1])
sess = gpt2.start_tf_sess()
gpt2.load_gpt2(sess, model_name=name, model_dir=model_dir)
load = time.perf_counter() - t0
tokens = int(sys.argv[2])
fresh = True

def call(b):
    gpt2.generate(sess, model_name=name, model_dir=model_dir, length=tokens,
                  prefix=%(prompt)r, nsamples=b, batch_size=b, temperature=%(temp)r,
                  return_as_list=True)

def timed_call(b):
    # gpt-2-simple adds a new graph on every call and slows down call after call; the issue
    # measures its SECOND call, so every measurement starts from a freshly loaded session.
    global sess, fresh
    if not fresh:
        sess = gpt2.reset_session(sess)
        gpt2.load_gpt2(sess, model_name=name, model_dir=model_dir)
    fresh = False
    call(b)
    t = time.perf_counter()
    call(b)
    return time.perf_counter() - t

print("READY " + json.dumps({"load_s": load}), flush=True)
""" % {"prompt": PROMPT, "temp": TEMPERATURE} + WORKER_LOOP

HF = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config()).eval()
load = time.perf_counter() - t0
tokens = int(sys.argv[2])
warm = set()

def call(b):
    x = torch.full((b, 5), 464, dtype=torch.long)
    with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_k=0,
                           temperature=%(temp)r, max_new_tokens=tokens,
                           min_new_tokens=tokens, pad_token_id=50256)
    assert y.shape[1] == 5 + tokens

print("READY " + json.dumps({"load_s": load, "threads": torch.get_num_threads()}), flush=True)
""" % {"temp": TEMPERATURE} + WARM_THEN_TIME + WORKER_LOOP


class Worker:
    """One system in its own process, loaded once, timed on request."""

    def __init__(self, name: str, code: str, args: list[str]):
        self.name = name
        print(f"loading {name} ...", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], env=_env(), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.info = self._expect("READY ")

    def _expect(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return json.loads(line[len(tag):])
        raise RuntimeError(f"{self.name} exited with {self.proc.wait()} (run it by hand to see why)")

    def tok_s(self, batch: int) -> float:
        self.proc.stdin.write(f"gen {batch}\n")
        self.proc.stdin.flush()
        return self._expect("TIME ")["tok_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def read_bandwidth() -> float:
    """GB/s of a multithreaded fp32 GEMV over 512 MB: the weight-streaming rate BLAS reaches."""
    import numpy as np

    w = np.random.default_rng(0).standard_normal((2048, 65536), dtype=np.float32)
    x = np.ones((1, 2048), np.float32)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        x @ w
        best = max(best, w.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of: g2s, hf")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    batches = [int(b) for b in a.batches.split(",")]
    mdir = model_dir()
    args = [str(mdir), str(a.tokens)]
    systems = [("gpt2tf", OURS), ("gpt-2-simple", G2S), ("transformers", HF)]
    systems = [(n, c) for n, c in systems if not (n == "gpt-2-simple" and "g2s" in skip)
               and not (n == "transformers" and "hf" in skip)]
    workers = [Worker(n, c, args) for n, c in systems]
    runs = {(w.name, b): [] for w in workers for b in batches}
    bws = []
    try:
        for r in range(a.rounds):
            bws.append(read_bandwidth())
            order = workers[r % len(workers):] + workers[:r % len(workers)]  # rotate
            for b in batches:
                for w in order:
                    time.sleep(1.0)  # let the previous system's spinning threads go idle
                    runs[(w.name, b)].append(w.tok_s(b))
                    print(f"round {r + 1} b{b} {w.name}: {runs[(w.name, b)][-1]:.1f} tok/s",
                          file=sys.stderr, flush=True)
    finally:
        for w in workers:
            w.close()

    def med(xs):
        return statistics.median(xs)

    # Weight bytes one decode step reads: every parameter but wpe (one row of it).
    n_params = 124_439_808
    step_bytes = (n_params - 1024 * 768) * 4
    bw = med(bws)
    print(f"\n{a.rounds} interleaved rounds, medians; {a.tokens} new tokens per call")
    print(f"read bandwidth (numpy GEMV, 512 MB): {bw:.1f} GB/s"
          f" (rounds: {', '.join(f'{x:.1f}' for x in bws)})")
    print(f"{'system':<14}{'load s':>8}{'1st tok s':>10}" +
          "".join(f"{'b' + str(b) + ' tok/s':>12}" for b in batches))
    for w in workers:
        row = f"{w.name:<14}{w.info['load_s']:>8.2f}{w.info.get('first_token_s', float('nan')):>10.3f}"
        row += "".join(f"{med(runs[(w.name, b)]):>12.1f}" for b in batches)
        print(row)
    for b in batches:
        ours = med(runs[("gpt2tf", b)])
        mbu = step_bytes * ours / b / (bw * 1e9)
        line = f"batch {b}: gpt2tf {ours:.1f} tok/s, bandwidth utilisation {mbu:.0%}"
        for w in workers[1:]:
            # the median of per-round ratios: each pair ran minutes apart at most
            ratios = [o / t for o, t in zip(runs[("gpt2tf", b)], runs[(w.name, b)])]
            line += f"; {med(ratios):.2f}x {w.name} (rounds {', '.join(f'{x:.2f}' for x in ratios)})"
        print(line)


if __name__ == "__main__":
    main()
