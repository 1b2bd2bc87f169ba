#!/usr/bin/env python3
"""Training speed and memory on a random 124M-shaped GPT-2, batch 1 x 1024 tokens, Adam.

Side by side in one invocation, each in its own subprocess (so peak memory is its own):
- ours fp32, ours bf16 (bf16 matmuls, fp32 weights/norms/loss), ours fp32 with
  --memory_saving_gradients;
- gpt-2-simple 0.8.1's finetune() on the same model directory and the same .npz;
- TF's fp32 and bf16 matmul throughput (a big tf.matmul), the peaks MFU is measured against.

Ours runs the trainer's own step and data feed (gpt2tf.trainer.Trainer); gpt-2-simple's step
times come from the lines it prints. A few warm-up steps are skipped. MFU uses nanoGPT's formula
(../shared/docs/PERF.md section 0.1): 6N + 12 L H Q T FLOPs per token, N without wpe.
The fp32 and bf16 runs start from the same weights and see the same windows, so their loss
curves are comparable step by step.

    python benchmarks/bench_train.py                  # ~10 minutes on 2 busy cores
    python benchmarks/bench_train.py --steps 8 --no-reference   # a quick look at ours only

Results also go to bench_out/train.json. The model and the encoded data are cached in
$GPT2TF_BENCH_CACHE (default: <tmp>/gpt2tf-bench).
"""

import argparse
import contextlib
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))

MODEL_NAME = "124M-random"
SEQ = 1024
G2S_LINE = re.compile(r"^\[(\d+) \| ([\d.]+)\] loss=([\d.]+)")


# --- helpers shared by parent and workers ---------------------------------------------------


def proc_status(key: str) -> float:
    """VmRSS / VmHWM of this process in GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def cache_dir() -> Path:
    return Path(os.environ.get("GPT2TF_BENCH_CACHE") or Path(tempfile.gettempdir()) / "gpt2tf-bench")


def prepare(cache: Path) -> tuple[Path, Path]:
    """The random 124M model directory (GPT-2 vocabulary) and tinyshakespeare as .npz."""
    from gpt2tf import checkpoints
    from gpt2tf.data import encode as dataset
    from gpt2tf.source import ModelSource
    from gpt2tf.hparams import HParams

    models = cache / "models"
    if not (models / MODEL_NAME / "checkpoint").is_file():
        models.mkdir(parents=True, exist_ok=True)
        print("creating a random 124M model (once) ...", flush=True)
        checkpoints.init_model_dir(models / MODEL_NAME, HParams(), vocab_dir=SHARED_DATA, seed=0)
    data = cache / "tinyshakespeare.npz"
    if not data.is_file():
        dataset.encode_to_npz(
            str(SHARED_DATA / "tinyshakespeare.txt"), str(data),
            encoder=ModelSource.at(models / MODEL_NAME).encoder, progress=False,
        )
    return models, data


def flops_per_token(hp, t: int = SEQ) -> float:
    """nanoGPT's estimate: 6N + 12 L H Q T, N = all parameters but wpe (wte is the LM head)."""
    from gpt2tf import model

    n = sum(math.prod(s) for k, s in model.variable_shapes(hp).items() if k != "model/wpe")
    return 6 * n + 12 * hp.n_layer * hp.n_head * hp.head_dim * t


# --- workers (run in subprocesses) ----------------------------------------------------------


def worker_peak(args) -> dict:
    """Best GFLOP/s of an n x n x n tf.matmul in fp32 and in bf16."""
    import tensorflow as tf

    tf1 = tf.compat.v1
    out = {}
    n, chain = 2048, 8
    for name, dtype in (("fp32", tf.float32), ("bf16", tf.bfloat16)):
        g = tf.Graph()
        with g.as_default():
            a = tf1.Variable(tf1.random_normal([n, n], seed=1))
            b = tf1.Variable(tf1.random_normal([n, n], seed=2))
            a16, b16 = tf.cast(a, dtype), tf.cast(b, dtype)
            # independent products, so the measure is the matmul alone
            prods = [tf.matmul(a16 + tf.cast(i, dtype), b16) for i in range(chain)]
            fetch = tf.add_n([tf.cast(p[0, 0], tf.float32) for p in prods])
            cast_only = tf.add_n([tf.cast((a16 + tf.cast(i, dtype))[0, 0], tf.float32)
                                  for i in range(chain)])
            init = tf1.global_variables_initializer()
        with tf1.Session(graph=g) as s:
            s.run(init)
            s.run(fetch)
            best = float("inf")
            base = float("inf")
            for _ in range(args.peak_reps):
                t = time.perf_counter()
                s.run(fetch)
                best = min(best, time.perf_counter() - t)
                t = time.perf_counter()
                s.run(cast_only)
                base = min(base, time.perf_counter() - t)
        out[name] = 2 * n**3 * chain / max(best - base, 1e-9) / 1e9
    return out


def worker_ours(args) -> dict:
    """The trainer's step and data feed, timed per step (wall and CPU seconds)."""
    from gpt2tf import paths, trainer

    models, data = Path(args.models), Path(args.data)
    flags = json.loads(args.flags)
    with tempfile.TemporaryDirectory() as tmp:
        config = dict(
            dataset=str(data), model_name=MODEL_NAME, models_dir=str(models), batch_size=1,
            learning_rate=args.lr, optimizer="adam", sample_every=0, save_every=0, seed=1,
            **flags,
        )
        cfg = trainer.TrainConfig.resolve(config).check()
        plan = trainer.plan_run(
            run_dir=paths.run_path(tmp, "bench"), restore_from="fresh", overwrite=False,
            model_name=MODEL_NAME, models_dir=str(models),
        )
        loaded = trainer.load_data(cfg, plan, seed=cfg.seed)
        t = trainer.Trainer(cfg, plan, loaded, steps=args.steps, samples_dir=tmp,
                            run_name="bench")
        t.restore()
        rss_before = proc_status("VmRSS")
        steps = []
        for _ in range(args.steps):
            feeds = t.next_feeds()
            w, c = time.perf_counter(), time.process_time()
            out = t.g.step.run(t.session, feeds)
            steps.append({"wall": time.perf_counter() - w, "cpu": time.process_time() - c,
                          "loss": out["loss"]})
        t.close()
    return {"steps": steps, "rss_before_gb": rss_before, "peak_rss_gb": proc_status("VmHWM"),
            "flops_per_token": flops_per_token(plan.hparams)}


class _StepClock(io.TextIOBase):
    """A stdout that notes wall and CPU time whenever gpt-2-simple prints a step line."""

    def __init__(self):
        self.lines, self.stamps, self._partial = [], [], ""

    def write(self, text: str) -> int:
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            self.lines.append(line)
            if G2S_LINE.match(line):
                self.stamps.append((time.perf_counter(), time.process_time()))
        return len(text)


def worker_g2s(args) -> dict:
    """gpt-2-simple's finetune(); a step's time runs from one printed step line to the next."""
    import gpt_2_simple as gpt2  # disables eager execution: only ever in this subprocess

    with tempfile.TemporaryDirectory() as tmp:
        sess = gpt2.start_tf_sess()
        clock = _StepClock()
        with contextlib.redirect_stdout(clock):
            gpt2.finetune(
                sess, args.data, steps=args.steps, model_name=MODEL_NAME, model_dir=args.models,
                batch_size=1, learning_rate=args.lr, accumulate_gradients=1,
                run_name="bench", checkpoint_dir=tmp, sample_every=10**9, save_every=10**9,
                print_every=1,
            )
    losses = [float(m.group(3)) for m in map(G2S_LINE.match, clock.lines) if m]
    # The first step has no earlier line to start from: it is a warm-up step anyway.
    steps = [{"wall": float("nan"), "cpu": float("nan"), "loss": losses[0]}] + [
        {"wall": b[0] - a[0], "cpu": b[1] - a[1], "loss": loss}
        for a, b, loss in zip(clock.stamps, clock.stamps[1:], losses[1:])
    ]
    return {"steps": steps, "peak_rss_gb": proc_status("VmHWM")}


WORKERS = {"peak": worker_peak, "ours": worker_ours, "g2s": worker_g2s}


# --- parent ---------------------------------------------------------------------------------


def spawn(kind: str, args, **extra) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--models", str(args.models),
           "--data", str(args.data), "--lr", str(args.lr), "--peak_reps", str(args.peak_reps)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO / "src")}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {extra} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - start
    result["load_before"] = load
    result["load_after"] = os.getloadavg()[0]
    return result


def summarize(result: dict, warmup: int) -> dict:
    timed = result["steps"][warmup:]
    return {
        "step_s": statistics.median(s["wall"] for s in timed),
        "cpu_step_s": statistics.median(s["cpu"] for s in timed),
        "timed_steps": len(timed),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=sorted(WORKERS))
    p.add_argument("--models")
    p.add_argument("--data")
    p.add_argument("--flags", default="{}")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of the runs")
    p.add_argument("--curve_steps", type=int, default=20,
                   help="steps of ours fp32 and bf16 in round 1 (their loss curves)")
    p.add_argument("--steps", type=int, default=10, help="steps of ours in later rounds")
    p.add_argument("--msg_steps", type=int, default=8, help="steps with memory-saving grads")
    p.add_argument("--g2s_steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--peak_reps", type=int, default=5)
    p.add_argument("--no-reference", dest="reference", action="store_false")
    p.add_argument("--out", default=str(REPO / "bench_out" / "train.json"))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    from gpt2tf.hparams import HParams

    args.models, args.data = prepare(cache_dir())
    hp = HParams()
    fpt = flops_per_token(hp)
    print(f"random 124M, batch 1 x {SEQ}, Adam lr {args.lr}; nanoGPT FLOPs/token {fpt / 1e9:.3f} G"
          f"; {os.cpu_count()} CPUs", flush=True)
    peaks = []

    def measure_peak():
        # Measured at the start and after every round: the best is the machine's peak (other
        # users' load makes single measurements low).
        peaks.append(spawn("peak", args))
        print(f"matmul: fp32 {peaks[-1]['fp32']:.0f} GFLOP/s, bf16 {peaks[-1]['bf16']:.0f}"
              " GFLOP/s", flush=True)

    measure_peak()
    results = {"peak": {}}
    ours32 = json.dumps({"precision": "fp32"})
    ours16 = json.dumps({"precision": "bf16"})
    plan = []
    for r in range(args.rounds):
        # Runs alternate, so a change in the machine's load hits all of them alike.
        n = args.curve_steps if r == 0 else args.steps
        if args.reference:
            plan.append(("gpt-2-simple 0.8.1", "g2s", {"steps": args.g2s_steps}, 2))
        plan.append(("ours fp32", "ours", {"steps": n, "flags": ours32}, args.warmup))
        plan.append(("ours bf16", "ours", {"steps": n, "flags": ours16}, args.warmup))
        if r == 0:
            plan.append(("ours fp32 memory_saving", "ours", {"steps": args.msg_steps, "flags":
                         json.dumps({"precision": "fp32", "memory_saving_gradients": True})},
                         args.warmup))
    for i, (label, kind, extra, warmup) in enumerate(plan):
        if i and label == plan[0][0]:  # a new round
            measure_peak()
        print(f"[{label}] running ({i + 1}/{len(plan)}) ...", flush=True)
        r = spawn(kind, args, **extra)
        r.update(summarize(r, warmup))
        results.setdefault(label, {"runs": []})["runs"].append(r)
        print(f"[{label}] {r['step_s']:.2f} s/step (median of {r['timed_steps']}; CPU"
              f" {r['cpu_step_s']:.2f} s), peak RSS {r['peak_rss_gb']:.2f} GB, load avg"
              f" {r['load_before']:.1f}->{r['load_after']:.1f}", flush=True)
    measure_peak()
    peak = results["peak"] = {
        "fp32": max(p["fp32"] for p in peaks), "bf16": max(p["bf16"] for p in peaks),
        "measurements": peaks,
    }
    for label, entry in results.items():
        if label == "peak":
            continue
        warmup = 2 if label.startswith("gpt-2-simple") else args.warmup
        timed = [s for r in entry["runs"] for s in r["steps"][warmup:]]
        entry["step_s"] = statistics.median(s["wall"] for s in timed)
        entry["cpu_step_s"] = statistics.median(s["cpu"] for s in timed)
        entry["timed_steps"] = len(timed)
        entry["tokens_per_sec"] = SEQ / entry["step_s"]
        entry["tokens_per_cpu_sec"] = SEQ / entry["cpu_step_s"]
        entry["peak_rss_gb"] = max(r["peak_rss_gb"] for r in entry["runs"])
        entry["mfu_vs_fp32_peak"] = entry["tokens_per_sec"] * fpt / (peak["fp32"] * 1e9)
        entry["mfu_vs_bf16_peak"] = entry["tokens_per_sec"] * fpt / (peak["bf16"] * 1e9)
    report(results, hp)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


def report(results: dict, hp) -> None:
    from gpt2tf import model

    peak = results["peak"]
    ref = results.get("gpt-2-simple 0.8.1")
    print(f"\nsummary: median over every timed step of every round; MFU by nanoGPT's formula"
          f" against the best matmul of this run (fp32 {peak['fp32']:.0f}, bf16"
          f" {peak['bf16']:.0f} GFLOP/s, of {len(peak['measurements'])} measurements)")
    print(f"  {'':26s} {'tokens/s':>8s} {'vs g2s':>7s} {'tok/CPU-s':>9s} {'vs g2s':>7s}"
          f" {'MFU fp32pk':>10s} {'MFU bf16pk':>10s} {'peak RSS':>9s} steps")
    for label, e in results.items():
        if label == "peak":
            continue
        r1 = f"{e['tokens_per_sec'] / ref['tokens_per_sec']:.2f}x" if ref else "-"
        r2 = f"{e['tokens_per_cpu_sec'] / ref['tokens_per_cpu_sec']:.2f}x" if ref else "-"
        print(f"  {label:26s} {e['tokens_per_sec']:8.0f} {r1:>7s} {e['tokens_per_cpu_sec']:9.0f}"
              f" {r2:>7s} {100 * e['mfu_vs_fp32_peak']:9.0f}% {100 * e['mfu_vs_bf16_peak']:9.0f}%"
              f" {e['peak_rss_gb']:7.2f}GB {e['timed_steps']:5d}")
    if ref:
        for label in ("ours fp32", "ours bf16"):
            per_round = [
                f"{SEQ / r['step_s'] / (SEQ / g['step_s']):.2f}x"
                for r, g in zip(results[label]["runs"], ref["runs"])
            ]
            print(f"  {label} / gpt-2-simple, round by round: {', '.join(per_round)}")

    fp32 = results["ours fp32"]["runs"][0]
    bf16 = results["ours bf16"]["runs"][0]
    msg = results["ours fp32 memory_saving"]["runs"][0]
    # Weights' gradients (float32, all parameters) are live at the peak in both runs.
    grads = 4 * sum(math.prod(s) for s in model.variable_shapes(hp).values()) / 1e9
    act = fp32["peak_rss_gb"] - fp32["rss_before_gb"]
    act_msg = msg["peak_rss_gb"] - msg["rss_before_gb"]
    print(f"\nmemory above the restored weights + Adam state: fp32 {act:.2f} GB, memory-saving"
          f" {act_msg:.2f} GB ({act / act_msg:.2f}x less); without the {grads:.2f} GB of weight"
          f" gradients (live in both): {act - grads:.2f} vs {act_msg - grads:.2f} GB"
          f" ({(act - grads) / max(act_msg - grads, 1e-9):.2f}x less)")
    la = [s["loss"] for s in fp32["steps"]]
    lb = [s["loss"] for s in bf16["steps"]]
    n = min(len(la), len(lb))
    diffs = [b - a for a, b in zip(la[:n], lb[:n])]
    # Step-to-step variation of the fp32 curve (different batches): the scale of the noise.
    jitter = statistics.pstdev([la[i + 1] - la[i] for i in range(n - 1)]) if n > 2 else 0.0
    print(f"\nloss, fp32 vs bf16 on the same windows ({n} steps): fp32 {la[0]:.3f} -> "
          f"{la[n - 1]:.3f}, bf16 {lb[0]:.3f} -> {lb[n - 1]:.3f}; max |diff|"
          f" {max(abs(d) for d in diffs):.4f}, mean diff {statistics.mean(diffs):+.4f};"
          f" step-to-step change of the fp32 loss: std {jitter:.4f}")
    print("  step  fp32     bf16")
    for i in range(n):
        print(f"  {i + 1:4d}  {la[i]:.4f}  {lb[i]:.4f}")


if __name__ == "__main__":
    main()
