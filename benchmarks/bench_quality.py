#!/usr/bin/env python3
"""Quality cost of the reduced-precision decode paths (int8, bf16) on a model that was trained.

Speed benchmarks run on random weights; the error int8 or bf16 weights bring only shows on a
model that learnt something. So this trains one (once, then cached): a small GPT-2 (4 layers,
256 wide, 4 heads, window 256, GPT-2's vocabulary) from scratch on the first 95% of
tinyshakespeare with the project's own `init` and train.py. The last 5% is held out. Then, for
each precision, through that precision's own decode path (Generator(precision=...): fp32 and
bf16 on the native step, int8 on TFLite; bf16 on the TF graph where the native step cannot
run):

- validation loss by teacher forcing: the held-out tokens, in windows of n_ctx + 1, are fed one
  by one through backend.start / backend.step (several windows as rows at once) and the logits
  each step gives are scored against the next token. Reported: mean loss (nats/token), its
  change relative to fp32's (target: int8 within 1%), mean KL(fp32 || precision) and how often
  the most likely token agrees with fp32's. fp32's decode path is itself checked against the TF
  graph's full forward pass (Generator.logits) on the same windows.
- greedy agreement: 256 greedy tokens (top_k=1) after a few prompts from the held-out text
  (the window slides past n_ctx, the same way for every precision): the fraction of positions
  equal to fp32's output and the first position where they diverge (after it the texts differ,
  so the later positions mostly agree by chance).

For scale: the loss of a unigram model (token frequencies of the training text) on the same
held-out tokens, and the trainer's own validation loss.

    python benchmarks/bench_quality.py                    # ~10-15 min training (once), ~2 min eval
    python benchmarks/bench_quality.py --retrain          # train again
    python benchmarks/bench_quality.py --steps 20 --val_tokens 512 --greedy_tokens 32  # smoke
    python benchmarks/bench_quality.py --json bench_out/quality.json

The data split and trained models are cached in $GPT2TF_BENCH_DIR/quality (default
<tmp>/gpt2tf-bench/quality), one folder per training configuration.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from run_info import git_rev

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATA = SHARED / "tinyshakespeare.txt"
sys.path.insert(0, str(ROOT / "src"))

HELD_OUT = 0.05  # the last 5% of the text, cut at a line break
INT8_TARGET = 0.01  # |loss(int8) / loss(fp32) - 1|


def bench_dir() -> Path:
    root = Path(os.environ.get("GPT2TF_BENCH_DIR", Path(tempfile.gettempdir()) / "gpt2tf-bench"))
    return root / "quality"


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3")




# ----------------------------------------------------------------------------- data and training


def split_data(folder: Path) -> tuple[Path, Path]:
    """train.txt (the first 95%) and val.txt (the rest), cut at a line break."""
    train, val = folder / "train.txt", folder / "val.txt"
    if not (train.is_file() and val.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        text = DATA.read_text(encoding="utf-8")
        cut = text.index("\n", int(len(text) * (1 - HELD_OUT))) + 1
        train.write_text(text[:cut], encoding="utf-8")
        val.write_text(text[cut:], encoding="utf-8")
    return train, val


def train_key(a) -> str:
    """The cache folder's name: everything the trained weights depend on."""
    return (f"L{a.n_layer}-E{a.n_embd}-H{a.n_head}-C{a.n_ctx}-s{a.steps}-b{a.batch_size}"
            f"-t{a.seq_len}-lr{a.learning_rate:g}-w{a.warmup_steps}-seed{a.seed}")


def train_flags(a, train: Path, val: Path, folder: Path) -> list[str]:
    return [
        "--dataset", str(train), "--val_dataset", str(val),
        "--models_dir", str(folder / "models"), "--model_name", "init",
        "--checkpoint_dir", str(folder / "checkpoint"), "--run_name", "run",
        "--restore_from", "fresh", "--overwrite", "--steps", str(a.steps),
        "--batch_size", str(a.batch_size), "--seq_len", str(a.seq_len),
        "--learning_rate", str(a.learning_rate), "--warmup_steps", str(a.warmup_steps),
        # cosine to 10% over the run: a short run ends with small steps, i.e. a settled model
        "--lr_schedule", "cosine", "--max_grad_norm", "1.0", "--optimizer", "adam",
        "--seed", str(a.seed), "--sample_every", "0", "--save_every", "0",
        "--print_every", str(max(1, a.steps // 40)),
        "--val_every", str(max(1, a.steps // 4)), "--val_batch_size", "8",
        "--val_batch_count", "8",
    ]


def trained_model(a, train: Path, val: Path) -> tuple[Path, dict]:
    """The run folder of the trained model (trained now unless cached) and its training record."""
    folder = bench_dir() / train_key(a)
    record_file = folder / "trained.json"  # written last: its presence means training finished
    if a.retrain and folder.exists():
        shutil.rmtree(folder)
    if record_file.is_file():
        print(f"reusing the trained model in {folder} (--retrain to train again)", flush=True)
        return folder / "checkpoint" / "run", json.loads(record_file.read_text())
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted run: start over
    (folder / "models").mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-c",
         "import sys; from gpt2tf.cli import main; sys.exit(main(sys.argv[1:]))",
         "init", str(folder / "models" / "init"), "--n_layer", str(a.n_layer),
         "--n_embd", str(a.n_embd), "--n_head", str(a.n_head), "--n_ctx", str(a.n_ctx),
         "--vocab_dir", str(SHARED), "--seed", str(a.seed)],
        check=True, env=_env(),
    )
    print(f"training {train_key(a)} ({a.steps} steps) ...", flush=True)
    start = time.perf_counter()
    with open(folder / "train.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                                 *train_flags(a, train, val, folder)],
                                env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:  # echoed, so a long run shows its progress
            log.write(line)
            print("  " + line, end="", flush=True)
    if proc.wait():
        raise SystemExit(f"training failed ({proc.returncode}); see {folder / 'train.log'}")
    run = folder / "checkpoint" / "run"
    record = training_record(run, a, time.perf_counter() - start)
    record_file.write_text(json.dumps(record, indent=1) + "\n")
    return run, record


def training_record(run: Path, a, seconds: float) -> dict:
    """What training reached, from the run's metrics.jsonl."""
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]
    losses = [r for r in rows if "loss" in r]
    vals = [{"step": r["step"], "val_loss": r["val_loss"]} for r in rows if "val_loss" in r]
    tail = [r["loss"] for r in losses[-max(1, len(losses) // 10):]]  # the last tenth, smoothed
    return {"config": train_key(a), "steps": a.steps, "train_s": seconds,
            "tokens_seen": a.steps * a.batch_size * a.seq_len,
            "first_loss": losses[0]["loss"] if losses else None,
            "final_train_loss": float(np.mean(tail)) if tail else None,
            "trainer_val_loss": vals,
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}


def unigram_loss(train_ids: np.ndarray, val_ids: np.ndarray, n_vocab: int) -> float:
    """Cross-entropy (nats) on val of token frequencies counted on train (add-one smoothed)."""
    counts = np.bincount(train_ids, minlength=n_vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_ids].mean())


# ----------------------------------------------------------------------------- teacher forcing


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def windows(ids: np.ndarray, n_ctx: int) -> np.ndarray:
    """[N, n_ctx + 1] non-overlapping windows: n_ctx predictions each, all inside the window."""
    n = (len(ids) - 1) // n_ctx
    if n < 1:
        raise SystemExit(f"need more than {n_ctx} held-out tokens, got {len(ids)}")
    return np.stack([ids[i * n_ctx: i * n_ctx + n_ctx + 1] for i in range(n)])


def teacher_forced(gens: dict, wins: np.ndarray, rows: int) -> dict:
    """Per precision: the loss of every prediction [N, W], and against fp32 the KL and whether
    the argmax agrees. The precisions run in lockstep on each chunk of rows, so fp32's
    log-probabilities need not be stored."""
    n, width = wins.shape[0], wins.shape[1] - 1
    out = {p: {"loss": np.zeros([n, width]), "kl": np.zeros([n, width]),
               "top1": np.zeros([n, width], bool)} for p in gens}
    for lo in range(0, n, rows):
        chunk = wins[lo:lo + rows]  # [R, W + 1]
        backends = {p: g.engine.backend for p, g in gens.items()}
        logits = {p: b.start([[int(t)] for t in chunk[:, 0]]) for p, b in backends.items()}
        for i in range(width):
            target = chunk[:, i + 1]
            logp = {p: log_softmax(x) for p, x in logits.items()}  # [R, V]
            ref = logp["fp32"]
            ref_p = np.exp(ref)
            for p, lp in logp.items():
                out[p]["loss"][lo:lo + len(chunk), i] = -lp[np.arange(len(chunk)), target]
                out[p]["kl"][lo:lo + len(chunk), i] = (ref_p * (ref - lp)).sum(-1)
                out[p]["top1"][lo:lo + len(chunk), i] = lp.argmax(-1) == ref.argmax(-1)
            if i + 1 < width:
                logits = {p: b.step(chunk[:, i + 1]) for p, b in backends.items()}
        print(f"  teacher forcing: {min(lo + rows, n)}/{n} windows", flush=True)
    return out


def full_forward_loss(gen, wins: np.ndarray) -> np.ndarray:
    """[N, W] losses from the TF graph's full causal forward pass (no cache): the reference the
    decode path's teacher forcing must reproduce in fp32."""
    out = np.zeros([wins.shape[0], wins.shape[1] - 1])
    for r, win in enumerate(wins):  # one window at a time: [1, W, V] logits stay small
        lp = log_softmax(gen.logits([win[:-1]])[0])  # [W, V]
        out[r] = -lp[np.arange(len(win) - 1), win[1:]]
    return out


# ----------------------------------------------------------------------------- greedy


def prompts_from(val_text: str, encoder, count: int, tokens: int) -> list[list[int]]:
    """`count` prompts of `tokens` tokens, each the start of a speech spread over the text."""
    speeches = [s for s in val_text.split("\n\n") if len(s) > 4 * tokens]
    picks = [speeches[int(i * len(speeches) / count)] for i in range(count)]
    return [encoder.encode(s)[:tokens] for s in picks]


def greedy(gen, prompts: list[list[int]], length: int) -> np.ndarray:
    """[P, length] greedy continuations (top_k=1; ties go to the lower id), all prompts as rows."""
    from gpt2tf.decode.engine import SamplingParams, sample_seed

    steps = gen.stream(prompts, length=length, params=SamplingParams(top_k=1),
                       rngs=[sample_seed(0, i) for i in range(len(prompts))])
    return np.stack(list(steps), axis=1)


def agreement(ours: np.ndarray, ref: np.ndarray) -> list[dict]:
    out = []
    for a, b in zip(ours, ref):
        diff = np.nonzero(a != b)[0]
        out.append({"agree": float((a == b).mean()),
                    "first_divergence": int(diff[0]) if diff.size else None})
    return out


# ----------------------------------------------------------------------------- main


def evaluate(a, run: Path, val_text: str, train_text: str) -> dict:
    from gpt2tf.quiet import import_tensorflow

    import_tensorflow()
    from gpt2tf.decode.generator import Generator

    gens, load = {}, {}
    for p in a.precisions:
        t = time.perf_counter()
        gens[p] = Generator(run, precision=p)  # fp32/int8 convert here on first use (cached)
        load[p] = time.perf_counter() - t
        print(f"{p}: {gens[p].engine_name} engine, ready in {load[p]:.1f} s", flush=True)
    fp32 = gens["fp32"]
    hp, enc = fp32.hparams, fp32.encoder
    val_ids = np.array(enc.encode(val_text), np.int64)
    held_out = len(val_ids)
    if a.val_tokens:
        val_ids = val_ids[:a.val_tokens]
    wins = windows(val_ids, hp.n_ctx)
    unigram = unigram_loss(np.array(enc.encode(train_text)), wins[:, 1:].ravel(), hp.n_vocab)
    print(f"teacher forcing {wins.shape[0]} windows x {wins.shape[1] - 1} predictions ...",
          flush=True)
    forced = teacher_forced(gens, wins, a.eval_rows)
    graph_loss = full_forward_loss(fp32, wins)
    prompts = prompts_from(val_text, enc, a.prompts, a.prompt_tokens)
    print(f"greedy: {len(prompts)} prompts x {a.greedy_tokens} tokens ...", flush=True)
    greedy_out = {p: greedy(g, prompts, a.greedy_tokens) for p, g in gens.items()}
    base = forced["fp32"]["loss"].mean()
    result = {}
    for p, g in gens.items():
        loss = float(forced[p]["loss"].mean())
        agree = agreement(greedy_out[p], greedy_out["fp32"])
        result[p] = {
            "engine": g.engine_name, "load_s": load[p], "val_loss": loss,
            "perplexity": float(np.exp(loss)), "rel_to_fp32": loss / base - 1,
            "kl_to_fp32": float(forced[p]["kl"].mean()),
            "top1_agree": float(forced[p]["top1"].mean()),
            "greedy": agree, "greedy_agree": float(np.mean([x["agree"] for x in agree])),
            "greedy_tokens": greedy_out[p].tolist(),
            "greedy_text": [enc.decode(row.tolist()) for row in greedy_out[p][:1]],
        }
    for g in gens.values():
        g.close()
    return {
        "precisions": result, "unigram_loss": unigram,
        "held_out_tokens": held_out, "windows": list(wins.shape),
        "predictions": int(wins.shape[0] * (wins.shape[1] - 1)),
        "graph_full_forward_loss": float(graph_loss.mean()),
        "graph_vs_decode_fp32_max_abs": float(np.abs(graph_loss - forced["fp32"]["loss"]).max()),
        "prompts": [enc.decode(p) for p in prompts],
    }


def target(result: dict) -> dict:
    int8 = result["precisions"].get("int8")
    if int8 is None:
        return {"status": "not measured"}
    note = "" if int8["engine"] == "fast" else "int8 ran on the TF graph in fp32 (no fast path)"
    return {"rel": int8["rel_to_fp32"], "limit": INT8_TARGET, "note": note,
            "status": "met" if abs(int8["rel_to_fp32"]) <= INT8_TARGET else "not met"}


def report(result: dict, record: dict) -> None:
    print(f"\ntrained model: {record['config']}, {record['steps']} steps,"
          f" {record['tokens_seen']:,} tokens seen, trained in {record['train_s'] / 60:.1f} min;"
          f" train loss {record['first_loss']:.3f} -> {record['final_train_loss']:.3f}")
    if record["trainer_val_loss"]:
        print("  trainer's val loss: " + ", ".join(
            f"step {v['step']}: {v['val_loss']:.3f}" for v in record["trainer_val_loss"]))
    print(f"held-out: {result['held_out_tokens']} tokens; scored {result['predictions']}"
          f" predictions in {result['windows'][0]} windows of {result['windows'][1] - 1}")
    print(f"unigram loss on them: {result['unigram_loss']:.3f} nats/token")
    print(f"fp32 check: TF graph full forward {result['graph_full_forward_loss']:.5f} vs decode"
          f" path {result['precisions']['fp32']['val_loss']:.5f}, largest per-token difference"
          f" {result['graph_vs_decode_fp32_max_abs']:.2e}")
    print(f"\n{'precision':<10}{'engine':>7}{'val loss':>10}{'ppl':>9}{'vs fp32':>9}"
          f"{'KL':>10}{'top-1 =':>9}{'greedy =':>10}  first divergence per prompt")
    for p, r in result["precisions"].items():
        first = ", ".join("-" if x["first_divergence"] is None else str(x["first_divergence"])
                          for x in r["greedy"])
        print(f"{p:<10}{r['engine']:>7}{r['val_loss']:>10.4f}{r['perplexity']:>9.2f}"
              f"{r['rel_to_fp32']:>+9.3%}{r['kl_to_fp32']:>10.2e}{r['top1_agree']:>9.2%}"
              f"{r['greedy_agree']:>10.2%}  {first}")
    t = result["target"]
    if "rel" in t:
        print(f"\ntarget: int8 val loss within {t['limit']:.0%} of fp32's: {t['rel']:+.3%}"
              f" -> {t['status']}" + (f" ({t['note']})" if t["note"] else ""))
    else:
        print(f"\ntarget: int8 within {INT8_TARGET:.0%} of fp32: {t['status']}")
    sample = result["precisions"]["fp32"]["greedy_text"][0]
    print(f"\nfp32 greedy continuation of {result['prompts'][0]!r}:\n  {sample[:400]!r}")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precisions", default="fp32,int8,bf16", help="fp32 is always included")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--retrain", action="store_true", help="train again even if cached")
    g = ap.add_argument_group("the trained model (each setting gets its own cache folder)")
    g.add_argument("--n_layer", type=int, default=4)
    g.add_argument("--n_embd", type=int, default=256)
    g.add_argument("--n_head", type=int, default=4)
    g.add_argument("--n_ctx", type=int, default=256)
    g.add_argument("--steps", type=int, default=400, help="~1.5 s each on 2 idle cores")
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--seq_len", type=int, default=128)
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--warmup_steps", type=int, default=20)
    g.add_argument("--seed", type=int, default=0)
    e = ap.add_argument_group("evaluation")
    e.add_argument("--val_tokens", type=int, default=0, help="held-out tokens scored; 0: all")
    e.add_argument("--eval_rows", type=int, default=16, help="windows decoded at once")
    e.add_argument("--prompts", type=int, default=4)
    e.add_argument("--prompt_tokens", type=int, default=16)
    e.add_argument("--greedy_tokens", type=int, default=256)
    a = ap.parse_args()
    a.precisions = ["fp32"] + [p for p in a.precisions.split(",") if p and p != "fp32"]
    a.warmup_steps = min(a.warmup_steps, a.steps // 4)
    return a


def main() -> None:
    a = parse_args()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    train, val = split_data(bench_dir())
    run, record = trained_model(a, train, val)
    result = evaluate(a, run, val.read_text(encoding="utf-8"), train.read_text(encoding="utf-8"))
    result["target"] = target(result)
    report(result, record)
    if a.json:
        result.update(started=started, model=str(run), training=record,
                      args=vars(a), cpu_count=os.cpu_count(), git=git_rev())
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"results written to {a.json}")


if __name__ == "__main__":
    main()
