#!/usr/bin/env python3
"""Memory and speed of LoRA against full fine-tuning, on random 124M- and 774M-shaped GPT-2s.

Each (model, mode) runs in its own subprocess, so its peak RSS (VmHWM) is its own: the trainer's
graph, restore and a few Adam steps of batch 1 x --seq_len tokens. Modes:
- full: every weight trains (Adam state for all of them);
- full_remat: the same with --memory_saving_gradients;
- lora: --lora_rank R adapters on c_attn, c_proj and c_fc, the base frozen;
- lora_remat: LoRA with --memory_saving_gradients.
The first step is a warm-up and not timed. The models are made as `gpt2tf init` makes them
(OpenAI's layout, GPT-2's vocabulary when ../shared/data has it, else the byte-level one with
n_vocab 50257) and cached in $GPT2TF_BENCH_CACHE (default <tmp>/gpt2tf-bench).

    python benchmarks/bench_lora.py                       # 124M and 774M, ~15 min on 2 cores
    python benchmarks/bench_lora.py --models 124M --steps 3

Results also go to bench_out/lora.json.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))

from run_info import machine_info  # noqa: E402

# OpenAI's shapes (n_vocab 50257, n_ctx 1024).
SHAPES = {"124M": dict(n_embd=768, n_head=12, n_layer=12),
          "774M": dict(n_embd=1280, n_head=20, n_layer=36)}
MODES = {
    "full": {},
    "full_remat": {"memory_saving_gradients": True},
    "lora": {"lora": True},
    "lora_remat": {"lora": True, "memory_saving_gradients": True},
}
LORA_TARGETS = "c_attn,c_proj,c_fc"


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    return float("nan")


def cache_dir() -> Path:
    return Path(os.environ.get("GPT2TF_BENCH_CACHE")
                or Path(tempfile.gettempdir()) / "gpt2tf-bench")


def make_model(out_dir: Path, size: str) -> None:
    """`gpt2tf init` of a size's shape (in a subprocess: the parent must stay small, or the
    memory it kept would count against the runs it measures)."""
    from gpt2tf import checkpoints
    from gpt2tf.hparams import HParams

    vocab = SHARED_DATA if (SHARED_DATA / "encoder.json").is_file() else None
    checkpoints.init_model_dir(out_dir, HParams(**SHAPES[size]), vocab_dir=vocab)


def prepare(cache: Path, size: str) -> tuple[Path, Path]:
    """models/<size>-random (made once) and a text file to train on."""
    models = cache / "models"
    name = f"{size}-random"
    if not (models / name / "checkpoint").is_file():
        models.mkdir(parents=True, exist_ok=True)
        print(f"creating a random {size} model (once) ...", flush=True)
        subprocess.run([sys.executable, __file__, "--make_model", str(models / name),
                        "--size", size], check=True)
    text = cache / "train.txt"
    if not text.is_file():
        src = SHARED_DATA / "tinyshakespeare.txt"
        body = src.read_text(encoding="utf-8")[:200_000] if src.is_file() else \
            " ".join(f"word{i % 997}" for i in range(40_000))
        text.write_text(body, encoding="utf-8")
    return models, text


# --- the worker (a subprocess per model and mode) -----------------------------------------


def worker(args) -> dict:
    from gpt2tf import lora, paths
    from gpt2tf.train.config import TrainConfig
    from gpt2tf.train.loop import Trainer
    from gpt2tf.train.plan import load_data, plan_run

    mode = MODES[args.mode]
    name = f"{args.size}-random"
    with tempfile.TemporaryDirectory() as tmp:
        config = dict(
            dataset=args.data, model_name=name, models_dir=args.models, batch_size=1,
            seq_len=args.seq_len, learning_rate=1e-4, optimizer="adam", sample_every=0,
            save_every=0, seed=1,
            memory_saving_gradients=mode.get("memory_saving_gradients", False),
            lora_rank=args.lora_rank if mode.get("lora") else 0, lora_alpha=2 * args.lora_rank,
            lora_targets=LORA_TARGETS,
        )
        cfg = TrainConfig.resolve(config)
        plan = plan_run(run_dir=paths.run_path(tmp, "bench"), restore_from="fresh",
                        overwrite=False, model_name=name, models_dir=args.models)
        plan = lora.plan_adapters(plan, lora.spec_of(cfg))
        data = load_data(cfg, plan, seed=cfg.seed)
        started = time.perf_counter()
        trainer = Trainer(cfg, plan, data, steps=args.steps, samples_dir=tmp, run_name="bench")
        trainer.restore()
        ready = time.perf_counter() - started
        trained = sum(v.shape.num_elements() for v in trainer.g.step.train_variables)
        slots = sum(v.shape.num_elements() for v in trainer.g.step.optimizer_variables)
        times, step_losses = [], []
        for _ in range(args.steps):
            feeds = trainer.next_feeds()
            t = time.perf_counter()
            out = trainer.g.step.run(trainer.session, feeds)
            times.append(time.perf_counter() - t)
            step_losses.append(out["loss"])
        trainer.close()
    timed = times[1:] or times
    return {"size": args.size, "mode": args.mode, "seq_len": args.seq_len,
            "graph_and_restore_s": ready, "step_s": statistics.median(timed),
            "tokens_per_s": args.seq_len / statistics.median(timed),
            "peak_rss_gib": peak_rss_gb(), "trained_weights": trained,
            "optimizer_floats": slots, "losses": step_losses}


def run_worker(size: str, mode: str, models: Path, data: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--size", size, "--mode", mode,
           "--models", str(models), "--data", str(data), "--steps", str(args.steps),
           "--seq_len", str(args.seq_len), "--lora_rank", str(args.lora_rank)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"size": size, "mode": mode, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="124M,774M", help="comma-separated: 124M, 774M")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    p.add_argument("--steps", type=int, default=3, help="Adam steps per run (the first untimed)")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per step (batch 1)")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "bench_out" / "lora.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--make_model", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_model:
        make_model(Path(args.make_model), args.size)
        return 0
    if args.worker:
        args.models = str(args.models)
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    results = []
    for size in args.models.split(","):
        models, data = prepare(cache_dir(), size)
        for mode in args.modes.split(","):
            r = run_worker(size, mode, models, data, args)
            results.append(r)
            if "error" in r:
                print(f"{size:>5} {mode:<11} FAILED: {r['error']}", flush=True)
            else:
                print(f"{size:>5} {mode:<11} peak RSS {r['peak_rss_gib']:6.2f} GiB"
                      f"  {r['tokens_per_s']:7.1f} tokens/s  trains {r['trained_weights']:,}"
                      f" weights (Adam state {r['optimizer_floats']:,} floats)", flush=True)
    print()
    ok = {(r["size"], r["mode"]): r for r in results if "error" not in r}
    for size in args.models.split(","):
        full = ok.get((size, "full"))
        for mode in ("full_remat", "lora", "lora_remat"):
            r = ok.get((size, mode))
            if full and r:
                rss = r["peak_rss_gib"] / full["peak_rss_gib"]
                speed = r["tokens_per_s"] / full["tokens_per_s"]
                print(f"{size:>5} {mode:<11} vs full: peak RSS x{rss:.2f}, tokens/s x{speed:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(), "steps": args.steps,
                               "seq_len": args.seq_len, "lora_rank": args.lora_rank,
                               "lora_targets": LORA_TARGETS, "results": results}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
