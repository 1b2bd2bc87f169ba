"""Shared pieces of the training tests: tiny model directories, a CLI runner, file snapshots.

(It holds no tests itself; the training tests under tests/train/ import it.)
"""

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from shared_data import shared_data_dir
from tiny import REPO, tiny

TRAIN_PY = REPO / "train.py"

TRAIN_TINY = tiny(n_head=2)


def make_model(out_dir: Path, *, vocab_dir=None, **overrides) -> Path:
    from gpt2tf import checkpoints
    hp = dataclasses.replace(TRAIN_TINY, **overrides)
    return checkpoints.init_model_dir(out_dir, hp, vocab_dir=vocab_dir)


def make_models_dir(tmp_path_factory) -> Path:
    """models/tiny: byte-level vocabulary (257 tokens), n_ctx 64, 2 layers of width 32."""
    root = tmp_path_factory.mktemp("models")
    make_model(root / "tiny")
    return root


def write_text_data(path: Path, n_chars: int = 20000) -> Path:
    """Shakespeare when ../shared has it, else generated prose: training data for byte models."""
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    if src.is_file():
        text = src.read_text(encoding="utf-8")[:n_chars]
    else:
        words = ["the", "king", "and", "queen", "of", "realm", "speak", "to", "people"]
        text = " ".join(words[(i * 7) % len(words)] for i in range(n_chars // 5))
    path.write_text(text, encoding="utf-8")
    return path


def shakespeare() -> Path:
    return shared_data_dir("tinyshakespeare.txt", "encoder.json", "vocab.bpe") / (
        "tinyshakespeare.txt"
    )


def train(args: list[str], capsys=None) -> tuple[int, str, str]:
    """train.py in-process: (exit status, stdout, stderr)."""
    from gpt2tf.cli import train_main

    code = train_main([str(a) for a in args])
    if capsys is None:
        return code, "", ""
    out, err = capsys.readouterr()
    return code, out, err


def base_args(tmp: Path, models: Path, data: Path, run_name: str = "run1", **flags) -> list:
    args = [
        "--dataset", data, "--models_dir", models, "--model_name", "tiny",
        "--checkpoint_dir", tmp / "checkpoint", "--samples_dir", tmp / "samples",
        "--run_name", run_name, "--sample_every", 0, "--seed", 1,
    ]
    for k, v in flags.items():
        args += [f"--{k}", v]
    return args


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def snapshot(root: Path) -> dict[str, str]:
    """Path -> sha256 of every file under root: to show that nothing was written."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = ""
    return out


def latest_name(run_dir: Path) -> str:
    text = (run_dir / "checkpoint").read_text()
    return text.split('model_checkpoint_path: "', 1)[1].split('"', 1)[0]


class Child:
    """train.py in a child process; a thread collects its stdout lines as they come."""

    def __init__(self, args: list, *, env: dict | None = None, cwd=None,
                 pause_in_save: int | None = None):
        import queue
        import threading

        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # pause_in_save: stall (for the test to kill it) inside the save of that step
        script = [str(TRAIN_PY)] if pause_in_save is None else [
            str(Path(__file__).with_name("pause_in_save.py")), str(pause_in_save)]
        self.proc = subprocess.Popen(
            [sys.executable, *script, *[str(a) for a in args]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, needle: str, timeout: float = 120) -> str:
        """Block until a stdout line contains `needle`; return that line."""
        import queue
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.proc.kill()
                raise AssertionError(
                    f"no {needle!r} from the trainer; stdout: {''.join(self.lines)[-2000:]}"
                    f" stderr: {self.proc.stderr.read()[-3000:]}"
                )
            self.lines.append(line)
            if needle in line:
                return line

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        """Wait for exit: (status, the rest of stdout, stderr)."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        rest = []
        while not self._queue.empty():
            item = self._queue.get()
            if item is not None:
                rest.append(item)
        self.lines += rest
        return code, "".join(rest), self.proc.stderr.read()


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config(ports: list[int], index: int) -> str:
    """TF_CONFIG for worker `index` of workers on 127.0.0.1 at `ports`."""
    workers = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    return f'{{"cluster": {{"worker": [{workers}]}}, "task": {{"type": "worker", "index": {index}}}}}'


def start_workers(args: list, n: int = 2, *, layout=tf_config) -> list["Child"]:
    """n train.py processes with `args`, each given its TF_CONFIG (data parallel on loopback)."""
    ports = free_ports(n)
    return [Child(args, env={"TF_CONFIG": layout(ports, i)}) for i in range(n)]
