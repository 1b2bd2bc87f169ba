#!/usr/bin/env python3
"""Encoding speed: `python encode.py IN OUT.npz` against gpt-2-simple's `encode_dataset`.

Both run as whole commands in subprocesses (interpreter start, imports, reading, encoding,
writing the .npz) on the same input: tinyshakespeare repeated to --mb megabytes. Prints MB/s of
each, the ratio, and whether the token ids are identical (gpt-2-simple's arrays concatenated; the
input holds no <|endoftext|>, so its 7-token bug does not show).

    python benchmarks/bench_encode.py            # 20 MB, 3 alternating rounds (~90 s)
    python benchmarks/bench_encode.py --mb 2 --rounds 1     # a quick check
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

SIMPLE_SCRIPT = """
import sys, time
t0 = time.perf_counter()
import gpt_2_simple as gpt2
t1 = time.perf_counter()
gpt2.encode_dataset(sys.argv[1], model_dir=sys.argv[2], out_path=sys.argv[3], model_name="124M")
t2 = time.perf_counter()
print(f"import {t1 - t0:.2f} s, encode_dataset {t2 - t1:.2f} s", file=sys.stderr)
"""


def make_input(path: Path, data_dir: Path, mb: float) -> int:
    text = (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")
    target = int(mb * 1_000_000)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < target:
            piece = text[: target - written] if target - written < len(text) else text
            f.write(piece)
            written += len(piece.encode("utf-8"))
    return path.stat().st_size


def run(cmd: list[str], label: str) -> float:
    env = {**os.environ, "PYTHONUTF8": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - start
    print(f"[{label}] done in {seconds:.2f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="input size in MB (default 20)")
    parser.add_argument(
        "--data_dir",
        type=Path,
        default=SHARED_DATA,
        help="folder with encoder.json, vocab.bpe, tinyshakespeare.txt (default ../shared/data)",
    )
    parser.add_argument("--skip_simple", action="store_true", help="time only our encode.py")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_encode_") as tmp:
        tmp = Path(tmp)
        models = tmp / "models"
        (models / "124M").mkdir(parents=True)
        for name in ("encoder.json", "vocab.bpe"):
            shutil.copy(args.data_dir / name, models / "124M" / name)
        src = tmp / "input.txt"
        size = make_input(src, args.data_dir, args.mb)
        mb = size / 1e6
        print(f"input: tinyshakespeare repeated to {mb:.1f} MB, {os.cpu_count()} CPUs", flush=True)

        ours_out = tmp / "ours.npz"
        ours_cmd = [sys.executable, str(REPO / "encode.py"), str(src), str(ours_out),
                    "--models_dir", str(models), "--model_name", "124M"]
        simple_out = tmp / "simple.npz"
        simple_cmd = [sys.executable, "-c", SIMPLE_SCRIPT, str(src), str(models), str(simple_out)]
        # Alternate the two commands over rounds: this shared machine's speed drifts, so each
        # ratio compares neighbours, and the medians are reported.
        ours_runs, simple_runs = [], []
        for r in range(args.rounds):
            ours_runs.append(run(ours_cmd, f"gpt2tf, round {r + 1}"))
            if not args.skip_simple:
                simple_runs.append(run(simple_cmd, f"gpt-2-simple, round {r + 1}"))
        with np.load(ours_out) as npz:
            ours = np.concatenate([npz[k] for k in npz.files])
        ours_s = statistics.median(ours_runs)
        print(f"gpt2tf:       {mb / ours_s:8.2f} MB/s  (median {ours_s:.2f} s, {len(ours)} tokens;"
              f" rounds {', '.join(f'{x:.2f}' for x in ours_runs)} s)")
        if args.skip_simple:
            return
        with np.load(simple_out) as npz:
            simple = np.concatenate([npz[k] for k in npz.files])
        identical = ours.shape == simple.shape and bool(np.array_equal(ours, simple))
        simple_s = statistics.median(simple_runs)
        ratios = [s_ / o for o, s_ in zip(ours_runs, simple_runs)]
        print(f"gpt-2-simple: {mb / simple_s:8.2f} MB/s  (median {simple_s:.2f} s,"
              f" {len(simple)} tokens; rounds {', '.join(f'{x:.2f}' for x in simple_runs)} s)")
        print(f"speed-up: {statistics.median(ratios):.1f}x median of rounds"
              f" ({', '.join(f'{x:.1f}' for x in ratios)}; target >= 10x);"
              f" identical ids: {identical}")


if __name__ == "__main__":
    main()
