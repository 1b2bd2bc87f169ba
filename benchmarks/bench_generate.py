#!/usr/bin/env python3
"""Generation speed: gpt2tf per precision vs gpt-2-simple 0.8.1 vs HuggingFace transformers.

A random 124M-shaped model (speed does not depend on weight values), this machine's CPU.
gpt2tf is measured once per decode path (--precisions):

    fp32   gpt2tf-fp32        the fast path in fp32: the native step (decode/native.cc)
    tflite gpt2tf-tflite-fp32 the fast path in fp32 on TFLite/XNNPACK (engine="tflite")
    int8   gpt2tf-int8        the fast path, int8 weights on TFLite (dynamic range, per channel)
    bf16   gpt2tf-bf16        the TF graph with bfloat16 matmuls
    graph  gpt2tf-graph-fp32  the TF graph in fp32 (engine="graph", the old path; a reference)

Each system runs in its own long-lived subprocess and is timed on its SECOND generate() call
of --tokens new tokens after a short prompt, temperature 0.7, at batch 1 and batch 8
(gpt-2-simple is reloaded before each measurement, as its calls slow down one after another).
The systems take turns over several rounds and the medians are reported, so drifts in this
shared machine's memory bandwidth fall on all of them alike; ratios are medians of per-round
ratios. Also reported, per system: load time (imports included; for gpt2tf with the converted
model already cached), time to first token (the first call after loading, and warm), peak RSS
of the worker (ru_maxrss), and for the fast path the one-off conversion time: the first
Generator() on a fresh cache, measured once per precision in its own process before the rounds
(the benchmark model's cached conversion of that precision is deleted first).

Memory-bandwidth utilisation (../shared/docs/PERF.md 0.3, 3, 6.1) = weight bytes read per decode
step x steps/s / the read bandwidth of a numpy GEMV over 512 MB measured in each round. Weight
bytes per step: the block matrices and wte (the tied LM head) at 4 bytes a parameter (fp32),
2 (bf16) or 1 plus a float32 scale per output channel (int8), plus the float32 biases and norm
gains (0.1%). The KV cache reads are left out (at batch 1 and 256 tokens they add ~2%; at
batch 8 ~15%). The bf16 graph casts its float32 variables to bf16 each step, so it streams more
than its nominal 2 bytes: its figure says how far it is from what bf16 weights could give.

    python benchmarks/bench_generate.py [--tokens 256] [--batches 1,8] [--rounds 3]
        [--precisions fp32,tflite,int8,bf16,graph] [--skip hf,g2s,convert] [--threads N]
        [--json bench_out/generate.json]
    python benchmarks/bench_generate.py --tokens 16 --rounds 1 --skip g2s   # a quick check

The model and its conversions are cached in $GPT2TF_BENCH_DIR (default <tmp>/gpt2tf-bench).
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_info import machine_info

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PROMPT = "The meaning of life is"
TEMPERATURE = 0.7
DECODE_CACHE = ".gpt2tf-decode"  # gpt2tf.paths.DECODE_CACHE (the parent does not import gpt2tf)

# --precisions name -> (system name, Generator precision, Generator engine)
OURS_SYSTEMS = {
    "fp32": ("gpt2tf-fp32", "fp32", "auto"),
    "tflite": ("gpt2tf-tflite-fp32", "fp32", "tflite"),
    "int8": ("gpt2tf-int8", "int8", "auto"),
    "bf16": ("gpt2tf-bf16", "bf16", "auto"),
    "graph": ("gpt2tf-graph-fp32", "fp32", "graph"),
}
FAST = {"fp32", "tflite", "int8"}  # the fast path's: a conversion (TFLite) or a build (native)
REFERENCES = ("transformers", "gpt-2-simple")
# (system, batch, reference, ratio): the goals, each reported met / not met
TARGETS = [
    ("gpt2tf-fp32", 1, "transformers", 1.5),
    ("gpt2tf-fp32", 1, "gpt-2-simple", 2.2),
    ("gpt2tf-fp32", 8, "gpt-2-simple", 2.0),
    ("gpt2tf-int8", 1, "transformers", 4.0),
    ("gpt2tf-bf16", 1, "transformers", 2.0),
]


def bench_dir() -> Path:
    return Path(os.environ.get("GPT2TF_BENCH_DIR", Path(tempfile.gettempdir()) / "gpt2tf-bench"))


def model_dir() -> Path:
    """A cached random 124M model in OpenAI's layout (made once by gpt2tf's own init)."""
    out = bench_dir() / "models" / "124M"
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-c",
             "import sys; from gpt2tf.cli import main; sys.exit(main(sys.argv[1:]))",
             "init", str(out), "--n_layer", "12", "--n_embd", "768", "--n_head", "12",
             "--n_ctx", "1024", "--vocab_dir", str(SHARED)],
            check=True, env=_env(),
        )
    return out


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3", **extra)


# Each system runs as a long-lived worker: it loads once, prints READY, then answers "gen B"
# lines on stdin with one timed generate() of `tokens` new tokens at batch B ("TIME {...}").
# The parent interleaves the systems round by round, so the machine's drifting memory bandwidth
# (a shared host) hits all of them alike, and reports medians over the rounds.
# argv: model dir, tokens, threads (0: the system's default).

WORKER_LOOP = r"""
import resource
for line in sys.stdin:
    b = int(line.split()[1])
    dt = timed_call(b)
    # ru_maxrss is in KiB on Linux: the peak so far of this worker
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print("TIME " + json.dumps({"b": b, "tok_s": b * tokens / dt, "peak_rss_gb": rss}),
          flush=True)
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

# gpt2tf; argv[4]: {"precision", "engine"} for Generator.
OURS = r"""
import json, sys, time
t0 = time.perf_counter()
from gpt2tf.quiet import import_tensorflow
import_tensorflow()
import tensorflow as tf
from gpt2tf.decode.engine import SamplingParams, sample_seed
from gpt2tf.decode.generator import Generator
tokens, threads, cfg = int(sys.argv[2]), int(sys.argv[3]) or None, json.loads(sys.argv[4])
t1 = time.perf_counter()
gen = Generator(sys.argv[1], precision=cfg["precision"], engine=cfg["engine"], threads=threads)
construct = time.perf_counter() - t1
load = time.perf_counter() - t0
ctx = gen.encode_prompt(%(prompt)r)
params = SamplingParams(temperature=%(temp)r)

def first_token(seed):
    t = time.perf_counter()
    steps = gen.stream([ctx], length=1, params=params, rngs=[sample_seed(seed, 0)])
    next(steps)
    steps.close()
    return time.perf_counter() - t

first = first_token(0)  # the first call after loading: sets up kernels / plans
warm_first = sorted(first_token(s) for s in range(1, 6))[2]  # median of 5 more
warm, calls = set(), 0

def call(b):
    global calls
    calls += 1
    got = gen.generate_tokens(ctx, nsamples=b, batch_size=b, length=tokens, params=params,
                              seed=calls, stop_at_eot=False)
    assert all(len(s) == tokens for s in got)

print("READY " + json.dumps({
    "load_s": load, "construct_s": construct, "first_token_s": first,
    "first_token_warm_s": warm_first, "precision": gen.precision,
    "engine": getattr(gen.engine.backend, "runtime", gen.engine_name),
    "threads": threads, "tf": tf.__version__}), flush=True)
""" % {"prompt": PROMPT, "temp": TEMPERATURE} + WARM_THEN_TIME + WORKER_LOOP

# The one-off conversion: the first Generator() of a precision on a fresh cache.
CONVERT = r"""
import json, resource, sys, time
from gpt2tf.quiet import import_tensorflow
import_tensorflow()
from gpt2tf.decode.generator import Generator
threads = int(sys.argv[3]) or None
t = time.perf_counter()
gen = Generator(sys.argv[1], precision=sys.argv[2], threads=threads, engine=sys.argv[4])
dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
engine = getattr(gen.engine.backend, "runtime", gen.engine_name)
print("DONE " + json.dumps({"convert_s": dt, "engine": engine, "peak_rss_gb": rss}),
      flush=True)
"""

G2S = r"""
import json, sys, time, os
t0 = time.perf_counter()
import gpt_2_simple as gpt2
import tensorflow as tf
model_dir = os.path.dirname(sys.argv[1]); name = os.path.basename(sys.argv[1])
threads = int(sys.argv[3]) or -1
sess = gpt2.start_tf_sess(threads=threads)
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
        sess = gpt2.reset_session(sess, threads=threads)
        gpt2.load_gpt2(sess, model_name=name, model_dir=model_dir)
    fresh = False
    call(b)
    t = time.perf_counter()
    call(b)
    return time.perf_counter() - t

print("READY " + json.dumps({"load_s": load, "tf": tf.__version__}), flush=True)
""" % {"prompt": PROMPT, "temp": TEMPERATURE} + WORKER_LOOP

HF = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel
if int(sys.argv[3]):
    torch.set_num_threads(int(sys.argv[3]))
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

print("READY " + json.dumps({"load_s": load, "threads": torch.get_num_threads(),
                             "torch": torch.__version__,
                             "transformers": transformers.__version__}), flush=True)
""" % {"temp": TEMPERATURE} + WARM_THEN_TIME + WORKER_LOOP


class Worker:
    """One system in its own process, loaded once, timed on request."""

    def __init__(self, name: str, code: str, args: list[str], log_dir: Path, env=None):
        self.name = name
        self.log = log_dir / f"{name}.log"  # its stderr: warnings (e.g. a fast-path fallback)
        print(f"loading {name} ...", file=sys.stderr, flush=True)
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, *args], env=env or _env(), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, text=True,
            )
        self.peak_rss_gb = 0.0
        self.info = self._expect("READY ")

    def _expect(self, tag: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return json.loads(line[len(tag):])
        tail = self.log.read_text()[-2000:]
        raise RuntimeError(f"{self.name} exited with {self.proc.wait()}; its stderr ends:\n{tail}")

    def tok_s(self, batch: int) -> float:
        self.proc.stdin.write(f"gen {batch}\n")
        self.proc.stdin.flush()
        got = self._expect("TIME ")
        self.peak_rss_gb = max(self.peak_rss_gb, got["peak_rss_gb"])
        return got["tok_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def measure_conversion(mdir: Path, key: str, threads: int, log_dir: Path) -> dict:
    """The first Generator() of `precision` on a fresh cache, in its own process.

    The model folder's cached conversions of this precision are deleted, and the user cache is
    pointed at an empty folder (fast.prepared_model also looks there, and the native step builds
    its library there: its figure is that build plus packing the weights). The new file stays in
    the model folder, so the timed workers load it warm.
    """
    _, precision, engine = OURS_SYSTEMS[key]
    for old in (mdir / DECODE_CACHE).glob(f"decode-{precision}-*.tflite"):
        if key != "fp32":  # the native step converts nothing; the tflite worker needs it
            old.unlink()
    print(f"converting {precision} (fresh cache) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as empty, open(log_dir / f"convert-{key}.log", "w") as err:
        proc = subprocess.run(
            [sys.executable, "-c", CONVERT, str(mdir), precision, str(threads), engine],
            env=_env(GPT2TF_CACHE_DIR=empty), stdout=subprocess.PIPE, stderr=err, text=True,
            check=False,
        )
    done = [ln for ln in proc.stdout.splitlines() if ln.startswith("DONE ")]
    if proc.returncode or not done:
        tail = (log_dir / f"convert-{key}.log").read_text()[-2000:]
        raise RuntimeError(f"converting {precision} failed ({proc.returncode}):\n{tail}")
    out = json.loads(done[-1][len("DONE "):])
    files = list((mdir / DECODE_CACHE).glob(f"decode-{precision}-*.tflite"))
    out["file_mb"] = files[0].stat().st_size / 1e6 if files else None
    return out


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


def weight_bytes(hp: dict, precision: str) -> float:
    """Weight bytes one decode step reads (see the module docstring); wpe's one row left out."""
    c, layers, vocab = hp["n_embd"], hp["n_layer"], hp["n_vocab"]
    matrices = layers * 12 * c * c + vocab * c  # c_attn 3C², attn c_proj C², c_fc and mlp c_proj 4C² each; wte
    channels = layers * 9 * c + vocab  # output channels of those matrices (int8: one scale each)
    vectors = layers * 13 * c + 2 * c  # biases (9C), ln_1 and ln_2 (4C) per block; ln_f
    per_param = {"fp32": 4, "bf16": 2, "int8": 1}[precision]
    scales = 4 * channels if precision == "int8" else 0
    return matrices * per_param + scales + vectors * 4


def med(xs):
    return statistics.median(xs) if xs else float("nan")






def make_workers(a, mdir: Path, log_dir: Path) -> list[Worker]:
    args = [str(mdir), str(a.tokens), str(a.threads)]
    workers = []
    for key in a.precisions:
        name, precision, engine = OURS_SYSTEMS[key]
        cfg = json.dumps({"precision": precision, "engine": engine})
        workers.append(Worker(name, OURS, args + [cfg], log_dir))
    if "g2s" not in a.skip:
        workers.append(Worker("gpt-2-simple", G2S, args, log_dir))
    if "hf" not in a.skip:
        workers.append(Worker("transformers", HF, args, log_dir))
    return workers


def run_rounds(a, workers: list[Worker]) -> tuple[dict, list[float]]:
    """runs[(system, batch)] = tok/s per round; and the GEMV bandwidth of each round."""
    runs = {(w.name, b): [] for w in workers for b in a.batches}
    bws = []
    for r in range(a.rounds):
        bws.append(read_bandwidth())
        order = workers[r % len(workers):] + workers[:r % len(workers)]  # rotate
        for b in a.batches:
            for w in order:
                time.sleep(1.0)  # let the previous system's spinning threads go idle
                runs[(w.name, b)].append(w.tok_s(b))
                print(f"round {r + 1} b{b} {w.name}: {runs[(w.name, b)][-1]:.1f} tok/s",
                      file=sys.stderr, flush=True)
    return runs, bws


def summarise(a, workers, runs, bws, conversions, hp) -> dict:
    """Everything measured, as one JSON-able dict (per system, per batch)."""
    bw = med(bws)
    names = [w.name for w in workers]
    systems = {}
    for w in workers:
        key = next((k for k, v in OURS_SYSTEMS.items() if v[0] == w.name), None)
        entry = dict(w.info, peak_rss_gb=w.peak_rss_gb, batches={})
        if key is not None:
            entry["requested_precision"] = OURS_SYSTEMS[key][1]
            entry["conversion"] = conversions.get(key)
            nominal = OURS_SYSTEMS[key][1]  # the weights it stores
            entry["weight_mb_per_step"] = weight_bytes(hp, nominal) / 1e6
        for b in a.batches:
            xs = runs[(w.name, b)]
            row = {"tok_s_rounds": xs, "tok_s": med(xs), "ratios": {}}
            if key is not None:
                steps_s = row["tok_s"] / b
                row["steps_s"] = steps_s
                row["bandwidth_gb_s"] = entry["weight_mb_per_step"] * steps_s / 1e3
                row["bandwidth_utilisation"] = row["bandwidth_gb_s"] / bw
                # the median of per-round ratios: each pair ran minutes apart at most
                for ref in REFERENCES + ("gpt2tf-fp32", "gpt2tf-graph-fp32"):
                    if ref in names and ref != w.name:
                        rs = [o / t for o, t in zip(xs, runs[(ref, b)])]
                        row["ratios"][ref] = {"median": med(rs), "rounds": rs}
            entry["batches"][str(b)] = row
        systems[w.name] = entry
    return {"systems": systems, "bandwidth_gb_s": bw, "bandwidth_rounds": bws,
            "targets": check_targets(systems)}


def check_targets(systems: dict) -> list[dict]:
    out = []
    for name, b, ref, want in TARGETS:
        row = systems.get(name, {}).get("batches", {}).get(str(b), {})
        got = row.get("ratios", {}).get(ref, {}).get("median")
        status = "not measured" if got is None else ("met" if got >= want else "not met")
        note = ""
        engine = systems.get(name, {}).get("engine")
        if name in ("gpt2tf-fp32", "gpt2tf-tflite-fp32", "gpt2tf-int8") and \
                engine not in (None, "native", "tflite"):
            note = f"ran on the {engine} engine: the fast path was unavailable (see its log)"
        out.append({"system": name, "batch": b, "vs": ref, "target": want, "ratio": got,
                    "status": status, "note": note})
    return out


def report(a, result: dict) -> None:
    systems, bw = result["systems"], result["bandwidth_gb_s"]
    print(f"\n{a.rounds} interleaved rounds, medians; {a.tokens} new tokens per call, "
          f"temperature {TEMPERATURE}; threads {a.threads or 'default'}")
    print(f"read bandwidth (numpy GEMV, 512 MB): {bw:.1f} GB/s"
          f" (rounds: {', '.join(f'{x:.1f}' for x in result['bandwidth_rounds'])})")
    head = (f"{'system':<19}{'engine':>7}{'convert s':>10}{'load s':>8}{'1st tok s':>10}"
            f"{'warm 1st':>9}{'peak GB':>8}")
    print(head + "".join(f"{'b' + str(b) + ' tok/s':>12}" for b in a.batches))
    for name, s in systems.items():
        conv = (s.get("conversion") or {}).get("convert_s")
        row = (f"{name:<19}{s.get('engine', '-'):>7}{_num(conv, 10, 1)}{_num(s['load_s'], 8, 2)}"
               f"{_num(s.get('first_token_s'), 10, 3)}{_num(s.get('first_token_warm_s'), 9, 3)}"
               f"{_num(s['peak_rss_gb'], 8, 2)}")
        print(row + "".join(_num(s["batches"][str(b)]["tok_s"], 12, 1) for b in a.batches))
    print()
    for name, s in systems.items():
        if "weight_mb_per_step" not in s:
            continue
        for b in a.batches:
            row = s["batches"][str(b)]
            line = (f"{name} b{b}: {row['tok_s']:.1f} tok/s, {s['weight_mb_per_step']:.0f} MB"
                    f" of weights/step -> {row['bandwidth_gb_s']:.1f} GB/s, bandwidth"
                    f" utilisation {row['bandwidth_utilisation']:.0%}")
            for ref, r in row["ratios"].items():
                line += (f"; {r['median']:.2f}x {ref} (rounds "
                         f"{', '.join(f'{x:.2f}' for x in r['rounds'])})")
            print(line)
    for name, s in systems.items():
        conv = s.get("conversion")
        if conv:
            print(f"{name} conversion: {conv['convert_s']:.1f} s, peak RSS "
                  f"{conv['peak_rss_gb']:.2f} GB, file {conv['file_mb'] or float('nan'):.0f} MB,"
                  f" engine {conv['engine']}")
    print("\ntargets:")
    for t in result["targets"]:
        got = "-" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        print(f"  {t['system']} batch {t['batch']} >= {t['target']}x {t['vs']}: {got}"
              f" -> {t['status']}" + (f" ({t['note']})" if t["note"] else ""))


def _num(x, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,tflite,int8,bf16,graph",
                    help="comma list of gpt2tf paths: " + ", ".join(OURS_SYSTEMS))
    ap.add_argument("--skip", default="", help="comma list of: g2s, hf, convert (reuse the cache)")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for every system; 0: each one's default (all cores)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    a = ap.parse_args()
    a.skip = set(filter(None, a.skip.split(",")))
    a.batches = [int(b) for b in a.batches.split(",")]
    a.precisions = [p for p in a.precisions.split(",") if p]
    bad = [p for p in a.precisions if p not in OURS_SYSTEMS]
    if bad or a.skip - {"g2s", "hf", "convert"}:
        ap.error(f"unknown --precisions {bad} or --skip {sorted(a.skip)}")
    return a


def main() -> None:
    a = parse_args()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    machine = machine_info()
    mdir = model_dir()
    hp = json.loads((mdir / "hparams.json").read_text())
    log_dir = Path(tempfile.mkdtemp(prefix="bench-generate-logs-"))
    conversions = {}
    if "convert" not in a.skip:
        for key in a.precisions:
            if key in FAST:  # one at a time, before the rounds: it takes several GB and cores
                conversions[key] = measure_conversion(mdir, key, a.threads, log_dir)
    workers = make_workers(a, mdir, log_dir)
    try:
        runs, bws = run_rounds(a, workers)
    finally:
        for w in workers:
            w.close()
    result = summarise(a, workers, runs, bws, conversions, hp)
    machine["loadavg_end"] = os.getloadavg()
    result.update(started=started, machine=machine, model=str(mdir), hparams=hp,
                  tokens=a.tokens, batches=a.batches, rounds=a.rounds, temperature=TEMPERATURE,
                  prompt=PROMPT, threads=a.threads or None, worker_logs=str(log_dir))
    report(a, result)
    print(f"\nworker logs (stderr): {log_dir}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"results written to {a.json}")


if __name__ == "__main__":
    main()
