"""train.py that stalls inside the save of one step, after its files are written and before
its commit point (the `checkpoint` file): crash tests kill it there.

    python tests/pause_in_save.py STEP [train.py flags...]
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2tf.cli import train_main  # noqa: E402
from gpt2tf import paths  # noqa: E402
from gpt2tf.train import run_state  # noqa: E402


def pause_before_commit(step: int, action):
    """A run_state.write_checkpoint_state that runs `action(prefix)` just before the commit of
    step `step`'s checkpoint (install it in run_state)."""
    commit = run_state.write_checkpoint_state

    def write_checkpoint_state(run_dir, prefixes):
        if prefixes and Path(prefixes[-1]).name == f"{paths.RUN_PREFIX}-{step}":
            action(prefixes[-1])
        return commit(run_dir, prefixes)

    return write_checkpoint_state


def _stall(prefix: str) -> None:
    print(f"[test] paused in save of {prefix}", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    run_state.write_checkpoint_state = pause_before_commit(int(sys.argv[1]), _stall)
    raise SystemExit(train_main(sys.argv[2:]))
