#!/usr/bin/env python3
"""One-shot GPU training benchmark: GPT-2 124M, bf16 mixed precision, XLA, Adam.

Self-contained (random weights, random tokens; needs only this repository and TensorFlow with a
GPU). For each configuration: build the trainer's step (gpt2tf.train_step.TrainStep, the same
graph train.py runs), warm up (XLA compiles here), time steps, and print tokens/s and MFU by
nanoGPT's formula (6N + 12 L H Q T FLOPs per token, N without wpe; ../shared/docs/PERF.md 0.1)
against the H100's dense bf16 peak, 989 TFLOP/s, and against a bf16 matmul measured here.
The goal is llm.c's ~40% on an H100.

    python benchmarks/gpu_train.py                       # bf16 + XLA at batch 8 and 16, 1024
    python benchmarks/gpu_train.py --configs bf16-xla:32 --steps 30

Each configuration runs in a fresh graph and session; a failure (e.g. out of memory) is reported
and the next one runs. Stops starting new configurations after --max_seconds.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

H100_BF16_PEAK = 989e12  # dense bf16 (llm.c's mfu.h; nanoGPT PR #464); not the 2:4-sparse 1979
SEQ = 1024


def flops_per_token(hp, t: int) -> float:
    from gpt2tf import model

    n = sum(math.prod(s) for k, s in model.variable_shapes(hp).items() if k != "model/wpe")
    return 6 * n + 12 * hp.n_layer * hp.n_head * hp.head_dim * t


def session_config(xla: bool):
    import tensorflow as tf

    tf1 = tf.compat.v1
    config = tf1.ConfigProto()
    config.gpu_options.allow_growth = True
    if xla:
        config.graph_options.optimizer_options.global_jit_level = tf1.OptimizerOptions.ON_1
    return config


def measure_matmul_peak(n: int = 8192, chain: int = 8) -> float:
    """Best bf16 FLOP/s of independent n x n x n matmuls on this GPU."""
    import tensorflow as tf

    tf1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        a = tf.cast(tf1.Variable(tf1.random_normal([n, n], seed=1)), tf.bfloat16)
        b = tf.cast(tf1.Variable(tf1.random_normal([n, n], seed=2)), tf.bfloat16)
        prods = [tf.matmul(a + tf.cast(i, tf.bfloat16), b) for i in range(chain)]
        fetch = tf.add_n([tf.cast(p[0, 0], tf.float32) for p in prods])
        init = tf1.global_variables_initializer()
    with tf1.Session(graph=g, config=session_config(False)) as s:
        s.run(init)
        s.run(fetch)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            s.run(fetch)
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 * chain / best


def run_config(precision: str, xla: bool, batch: int, steps: int, warmup: int, hp) -> dict:
    import numpy as np
    import tensorflow as tf

    from gpt2tf.train import step as train_step

    tf1 = tf.compat.v1
    cfg = train_step.StepConfig(precision=precision, learning_rate=1e-4, optimizer="adam")
    g = tf.Graph()
    with g.as_default():
        tokens = tf1.placeholder(tf.int32, [batch, SEQ + 1])
        step = train_step.TrainStep(hp, cfg, tokens)
        init = [tf1.global_variables_initializer(), tf1.local_variables_initializer()]
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, hp.n_vocab, [batch, SEQ + 1]).astype(np.int32) for _ in range(4)]
    with tf1.Session(graph=g, config=session_config(xla)) as s:
        s.run(init)
        t0 = time.perf_counter()
        for i in range(warmup):
            step.run(s, [{tokens: batches[i % 4]}])
        compile_s = time.perf_counter() - t0
        times, losses = [], []
        for i in range(steps):
            t = time.perf_counter()
            out = step.run(s, [{tokens: batches[i % 4]}])  # fetching the loss syncs the GPU
            times.append(time.perf_counter() - t)
            losses.append(out["loss"])
    times.sort()
    median = times[len(times) // 2]
    tps = batch * SEQ / median
    fpt = flops_per_token(hp, SEQ)
    return {
        "precision": precision, "xla": xla, "batch": batch, "step_ms": 1e3 * median,
        "tokens_per_sec": tps, "mfu_h100": tps * fpt / H100_BF16_PEAK,
        "warmup_s": compile_s, "loss_first_last": [losses[0], losses[-1]],
        "flops_per_token": fpt,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="bf16-xla:8,bf16-xla:16,bf16-noxla:16,fp32-xla:8",
                   help="comma-separated precision-xla|noxla:batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max_seconds", type=float, default=420)
    p.add_argument("--peak_n", type=int, default=8192, help="size of the peak matmul")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: a CPU smoke test")
    args = p.parse_args()

    import tensorflow as tf

    from gpt2tf.hparams import HParams

    hp = HParams(n_layer=2, n_embd=64, n_head=2) if args.tiny else HParams()

    gpus = tf.config.list_physical_devices("GPU")
    print(f"TensorFlow {tf.__version__}; GPUs: {[d.name for d in gpus]}", flush=True)
    if not gpus:
        print("no GPU visible: the numbers below are not GPU numbers", flush=True)
    start = time.perf_counter()
    peak = measure_matmul_peak(args.peak_n)
    print(f"bf16 matmul {args.peak_n}^3 measured here: {peak / 1e12:.0f} TFLOP/s"
          f" ({100 * peak / H100_BF16_PEAK:.0f}% of 989)", flush=True)
    results = []
    for spec in args.configs.split(","):
        if time.perf_counter() - start > args.max_seconds:
            print(f"skipping {spec}: past --max_seconds", flush=True)
            continue
        mode, batch = spec.split(":")
        precision, xla = mode.split("-")
        try:
            r = run_config(precision, xla == "xla", int(batch), args.steps, args.warmup, hp)
        except Exception as e:  # noqa: BLE001 (report OOM and the like, go on with the next)
            print(f"{spec}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                  flush=True)
            continue
        r["mfu_measured_peak"] = r["tokens_per_sec"] * r["flops_per_token"] / peak
        results.append(r)
        print(f"{spec}: {r['step_ms']:.1f} ms/step, {r['tokens_per_sec']:.0f} tokens/s, MFU"
              f" {100 * r['mfu_h100']:.1f}% of 989 TF ({100 * r['mfu_measured_peak']:.1f}% of"
              f" the measured matmul), warm-up {r['warmup_s']:.1f} s, loss"
              f" {r['loss_first_last'][0]:.3f} -> {r['loss_first_last'][1]:.3f}", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_train.json").write_text(json.dumps(
            {"matmul_peak": peak, "results": results}, indent=1))


if __name__ == "__main__":
    main()
