#!/usr/bin/env python3
"""The all-reduce overhead of data-parallel training per step, on loopback (127.0.0.1).

Three arms, each `train.py` in its own process(es), as a user runs it, and the all-reduce alone:
- 2 workers x batch B: two processes given TF_CONFIG; MultiWorkerMirroredStrategy averages the
  gradients with a ring all-reduce over gRPC once per step (gpt2tf.train.distributed);
- 1 process at batch B: the same work per process, so the difference is what data
  parallelism adds to a step (the all-reduce, and waiting for the slower worker);
- 1 process at batch 2B: the same global batch, i.e. what the two workers replace;
- the all-reduce alone: two processes run the trainer's reduction (Replication.mean) of
  tensors shaped as the gradients, and nothing else.

Every process gets --threads TensorFlow threads (TF_NUM_INTRAOP_THREADS and
TF_NUM_INTEROP_THREADS, default 1), so on a 2-core machine the two workers compute side by side
as two 1-core machines would and the arms are comparable. The model is random, 124M's width
(n_embd 768, 12 heads, GPT-2's 50257-token vocabulary, whose embedding is 38.6M of 124M's
parameters) with --n_layer blocks. A step's time is the chief's own measure of it
(metrics.jsonl: tokens per step / tokens_per_sec), after --warmup steps; the arms run in
interleaved rounds (so a change in the machine's load hits all alike) and the figures are
medians over every timed step of every round. All-reduce bytes per step: the trainable
parameters x 4 (float32 gradients; the loss adds 4 bytes); a ring all-reduce sends and receives
2 (N-1)/N of that on each of N workers.

    python benchmarks/bench_distributed.py                 # ~6 minutes on 2 cores
    python benchmarks/bench_distributed.py --n_layer 12    # 124M's shape (slow on a CPU)

Results also go to bench_out/distributed.json. The model and the encoded data are cached in
$GPT2TF_BENCH_CACHE (default: <tmp>/gpt2tf-bench).
"""

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_info import machine_info

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))


def cache_dir() -> Path:
    return Path(os.environ.get("GPT2TF_BENCH_CACHE") or Path(tempfile.gettempdir()) / "gpt2tf-bench")


def prepare(cache: Path, n_layer: int) -> tuple[Path, str, Path]:
    """A random model of 124M's width with n_layer blocks (GPT-2's vocabulary), and
    tinyshakespeare encoded with it as .npz."""
    from gpt2tf import checkpoints
    from gpt2tf.data import encode as dataset
    from gpt2tf.hparams import HParams
    from gpt2tf.source import ModelSource

    models, name = cache / "models", f"768x{n_layer}-random"
    if not (models / name / "checkpoint").is_file():
        models.mkdir(parents=True, exist_ok=True)
        print(f"creating a random model {name} (once) ...", flush=True)
        checkpoints.init_model_dir(models / name, HParams(n_layer=n_layer),
                                   vocab_dir=SHARED_DATA, seed=0)
    data = cache / "tinyshakespeare.npz"
    if not data.is_file():
        dataset.encode_to_npz(
            str(SHARED_DATA / "tinyshakespeare.txt"), str(data),
            encoder=ModelSource.at(models / name).encoder, progress=False,
        )
    return models, name, data


def trainable_parameters(models: Path, name: str) -> int:
    from gpt2tf import model
    from gpt2tf.hparams import HParams

    hp = HParams.from_json(models / name / "hparams.json")
    return sum(math.prod(s) for s in model.variable_shapes(hp).values())


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def worker_allreduce(args) -> dict:
    """The trainer's all-reduce alone (gpt2tf.train.distributed.Replication.mean) of tensors
    shaped as the model's gradients, timed per run; prints JSON on the chief."""
    import tensorflow as tf

    from gpt2tf import model
    from gpt2tf.decode.generator import session_config
    from gpt2tf.hparams import HParams
    from gpt2tf.train import distributed

    tf1 = tf.compat.v1
    hp = HParams.from_json(Path(args.models) / args.model_name / "hparams.json")
    cluster = distributed.parse_tf_config(os.environ["TF_CONFIG"])
    graph = tf.Graph()
    with graph.as_default(), distributed.replicated(cluster, timeout_s=600) as rep:
        def replica():
            grads = [tf1.Variable(tf.zeros(shape), name=name.replace("/", "_"))
                     for name, shape in model.variable_shapes(hp).items()]
            loss = tf1.Variable(0.0, name="loss")
            means = rep.mean([loss, *grads])
            return tf.group([tf.reduce_sum(m) for m in means])  # (a read of every mean)

        (fetch,) = rep.build(replica)
        init = tf1.global_variables_initializer()
    session = rep.session(graph, session_config())
    session.run(init)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        session.run(fetch)
        times.append(time.perf_counter() - t)
    return {"step_s": times}


def run_allreduce(args) -> list[float]:
    hosts = [f"127.0.0.1:{p}" for p in free_ports(2)]
    cmd = [sys.executable, __file__, "--worker_allreduce", "--n_layer", str(args.n_layer),
           "--steps", str(args.steps)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "TF_NUM_INTRAOP_THREADS": str(args.threads),
           "TF_NUM_INTEROP_THREADS": str(args.threads)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "TF_CONFIG": json.dumps({
                                  "cluster": {"worker": hosts},
                                  "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"the all-reduce workers failed:\n{err[-4000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])["step_s"]


def run_arm(args, *, batch: int, workers: int) -> list[float]:
    """Seconds of each step of one train.py run (the chief's), warm-up steps included."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(REPO / "train.py"), "--dataset", str(args.data),
               "--models_dir", str(args.models), "--model_name", args.model_name,
               "--checkpoint_dir", f"{tmp}/checkpoint", "--samples_dir", f"{tmp}/samples",
               "--run_name", "bench", "--restore_from", "fresh", "--batch_size", str(batch),
               "--seq_len", str(args.seq), "--steps", str(args.steps), "--learning_rate",
               "1e-4", "--sample_every", "0", "--save_every", "0", "--seed", "1"]
        threads = str(args.threads)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_NUM_INTRAOP_THREADS": threads,
               "TF_NUM_INTEROP_THREADS": threads}
        env.pop("TF_CONFIG", None)
        envs = [env]
        if workers > 1:
            hosts = [f"127.0.0.1:{p}" for p in free_ports(workers)]
            envs = [{**env, "TF_CONFIG": json.dumps({"cluster": {"worker": hosts},
                                                    "task": {"type": "worker", "index": i}})}
                    for i in range(workers)]
        procs = [subprocess.Popen(cmd, env=e, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for e in envs]
        errors = [p.communicate()[1] for p in procs]
        for p, err in zip(procs, errors):
            if p.returncode != 0:
                raise SystemExit(f"batch {batch} x {workers} workers failed:\n{err[-4000:]}")
        records = [json.loads(x) for x in
                   Path(tmp, "checkpoint", "bench", "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = batch * workers * args.seq
    return [tokens_per_step / r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_layer", type=int, default=2, help="blocks of the 124M-wide model")
    p.add_argument("--batch", type=int, default=1, help="B: the batch of each worker")
    p.add_argument("--seq", type=int, default=128, help="tokens per window")
    p.add_argument("--steps", type=int, default=12, help="steps of each run")
    p.add_argument("--warmup", type=int, default=3, help="first steps of each run not timed")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the 3 arms")
    p.add_argument("--threads", type=int, default=1, help="TensorFlow threads per process")
    p.add_argument("--out", default=str(REPO / "bench_out" / "distributed.json"))
    p.add_argument("--worker_allreduce", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    args.models, args.model_name, args.data = prepare(cache_dir(), args.n_layer)
    if args.worker_allreduce:
        print(json.dumps(worker_allreduce(args)))
        return
    n_params = trainable_parameters(args.models, args.model_name)
    reduce_bytes = 4 * n_params + 4
    b = args.batch
    arms = {f"1 process x batch {b}": (b, 1), f"1 process x batch {2 * b}": (2 * b, 1),
            f"2 workers x batch {b}": (b, 2), "the all-reduce alone": None}
    print(f"random model: n_layer {args.n_layer}, n_embd 768, n_vocab 50257, {n_params / 1e6:.1f}M"
          f" parameters; all-reduce {reduce_bytes / 1e6:.1f} MB per step; batch {b} x"
          f" {args.seq} tokens per worker; {args.threads} thread(s) per process;"
          f" {os.cpu_count()} CPUs", flush=True)
    runs = {label: [] for label in arms}
    for r in range(args.rounds):
        labels = list(arms)
        labels = labels[r % 4:] + labels[:r % 4]  # a different arm first in each round
        for label in labels:
            load = os.getloadavg()[0]
            if arms[label] is None:
                times = run_allreduce(args)
            else:
                batch, workers = arms[label]
                times = run_arm(args, batch=batch, workers=workers)
            runs[label].append({"step_s": times, "load_before": load})
            timed = times[args.warmup:]
            print(f"round {r + 1} [{label}] {statistics.median(timed):.3f} s/step (median of"
                  f" {len(timed)}), load avg {load:.1f}", flush=True)

    median = {label: statistics.median(t for run in rs for t in run["step_s"][args.warmup:])
              for label, rs in runs.items()}
    one, two_b, dist, reduce_s = (median[label] for label in arms)
    overhead = dist - one
    ring = 2 * (2 - 1) / 2 * reduce_bytes
    summary = {
        "step_s": median,
        "overhead_s": overhead,
        "overhead_vs_batch_B": dist / one,
        "speedup_vs_batch_2B": two_b / dist,
        "allreduce_alone_s": reduce_s,
        "allreduce_bytes": reduce_bytes,
        "ring_bytes_per_worker": ring,
        "allreduce_gbit_per_s": 8 * ring / reduce_s / 1e9,
    }
    print(f"\nmedian step time over {args.rounds} rounds:")
    for label in arms:
        per_round = ", ".join(f"{statistics.median(r['step_s'][args.warmup:]):.3f}"
                              for r in runs[label])
        print(f"  {label:22s} {median[label]:.3f} s   (rounds: {per_round})")
    print(f"2 workers / 1 process at batch {b}: {dist / one:.2f}x ({overhead * 1e3:+.0f} ms a"
          f" step: the all-reduce of {reduce_bytes / 1e6:.1f} MB and the wait for the slower"
          f" worker)")
    print(f"1 process at batch {2 * b} / 2 workers: {two_b / dist:.2f}x (the speed-up at the"
          " same global batch)")
    print(f"the all-reduce alone (the trainer's, of the gradients' shapes): {reduce_s:.3f} s;"
          f" each worker sends and receives {ring / 1e6:.1f} MB of it (ring):"
          f" {8 * ring / reduce_s / 1e9:.2f} Gbit/s each way")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                               "machine": machine_info(), "summary": summary, "runs": runs},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
