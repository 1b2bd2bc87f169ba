#!/usr/bin/env python3
"""Generation speed: gpt2tf vs gpt-2-simple 0.8.1 vs HuggingFace transformers, side by side.

A random 124M-shaped model (speed does not depend on weight values), fp32, this machine's CPU.
Each system runs in its own subprocess, one after the other, and is timed on its SECOND
generate() call of 256 new tokens after a short prompt, at batch 1 and batch 8. Also reported:
model-load time, time to first token, and memory-bandwidth utilisation: weight bytes read per
decode step x steps/s over a read bandwidth measured in this run (a numpy GEMV over 512 MB).

    python benchmarks/bench_generate.py [--tokens 256] [--batches 1,8] [--skip hf,g2s]
"""

import argparse
import json
import os
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


OURS = r"""
import json, sys, time
t0 = time.perf_counter()
from gpt2tf.cli import quiet_tensorflow_import
quiet_tensorflow_import()
from gpt2tf import inference
gen = inference.Generator(sys.argv[1])
load = time.perf_counter() - t0
tokens, batches = int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
ctx = gen.encode_prompt(%(prompt)r)
params = inference.SamplingParams(temperature=%(temp)r)
out = {"load_s": load}
t = time.perf_counter()
next(gen.stream([ctx], length=1, params=params, rngs=[inference.sample_seed(0, 0)]))
out["first_token_s"] = time.perf_counter() - t
for b in batches:
    for call in (1, 2):
        t = time.perf_counter()
        got = gen.generate_tokens(ctx, nsamples=b, batch_size=b, length=tokens, params=params,
                                  seed=call, stop_at_eot=False)
        dt = time.perf_counter() - t
        assert all(len(s) == tokens for s in got)
    out[f"b{b}_tok_s"] = b * tokens / dt
print("RESULT " + json.dumps(out))
""" % {"prompt": PROMPT, "temp": TEMPERATURE}

G2S = r"""
import json, sys, time, os
t0 = time.perf_counter()
import gpt_2_simple as gpt2
model_dir = os.path.dirname(sys.argv[1]); name = os.path.basename(sys.argv[1])
sess = gpt2.start_tf_sess()
gpt2.load_gpt2(sess, model_name=name, model_dir=model_dir)
out = {"load_s": time.perf_counter() - t0}
tokens, batches = int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
for b in batches:
    for call in (1, 2):
        t = time.perf_counter()
        gpt2.generate(sess, model_name=name, model_dir=model_dir, length=tokens,
                      prefix=%(prompt)r, nsamples=b, batch_size=b, temperature=%(temp)r,
                      return_as_list=True)
        dt = time.perf_counter() - t
    out[f"b{b}_tok_s"] = b * tokens / dt
print("RESULT " + json.dumps(out))
""" % {"prompt": PROMPT, "temp": TEMPERATURE}

HF = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config()).eval()
out = {"load_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}
tokens, batches = int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
for b in batches:
    x = torch.full((b, 5), 464, dtype=torch.long)
    for call in (1, 2):
        t = time.perf_counter()
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_k=0,
                               temperature=%(temp)r, max_new_tokens=tokens,
                               min_new_tokens=tokens, pad_token_id=50256)
        dt = time.perf_counter() - t
        assert y.shape[1] == 5 + tokens
    out[f"b{b}_tok_s"] = b * tokens / dt
print("RESULT " + json.dumps(out))
""" % {"temp": TEMPERATURE}


def run(name: str, code: str, args: list[str]) -> dict:
    print(f"running {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-c", code, *args], env=_env(), capture_output=True,
                          text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
    return {"error": f"{name} failed (exit {proc.returncode})"}


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
    ap.add_argument("--skip", default="", help="comma list of: g2s, hf")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    mdir = model_dir()
    args = [str(mdir), str(a.tokens), a.batches]
    bw = read_bandwidth()
    results = {"gpt2tf": run("gpt2tf", OURS, args)}
    if "g2s" not in skip:
        results["gpt-2-simple"] = run("gpt-2-simple", G2S, args)
    if "hf" not in skip:
        results["transformers"] = run("transformers", HF, args)

    # Weight bytes one decode step reads: every parameter but wpe (one row of it).
    n_params = 124_439_808
    step_bytes = (n_params - 1024 * 768) * 4
    print(f"\nread bandwidth (numpy GEMV, 512 MB): {bw:.1f} GB/s")
    print(f"{'system':<14}{'load s':>8}{'1st tok s':>10}" +
          "".join(f"{'b' + b + ' tok/s':>12}" for b in a.batches.split(",")))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<14}{r['error']}")
            continue
        row = f"{name:<14}{r['load_s']:>8.2f}{r.get('first_token_s', float('nan')):>10.3f}"
        row += "".join(f"{r[f'b{b}_tok_s']:>12.1f}" for b in a.batches.split(","))
        print(row)
    ours = results["gpt2tf"]
    for b in a.batches.split(","):
        key = f"b{b}_tok_s"
        steps = ours[key] / int(b)
        mbu = step_bytes * steps / (bw * 1e9)
        line = f"batch {b}: gpt2tf {ours[key]:.1f} tok/s, bandwidth utilisation {mbu:.0%}"
        for ref in ("gpt-2-simple", "transformers"):
            if ref in results and key in results[ref]:
                line += f"; {ours[key] / results[ref][key]:.2f}x {ref}"
        print(line)


if __name__ == "__main__":
    main()
