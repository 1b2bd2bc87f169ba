"""Nothing is lost: kill -9 while training or saving, SIGTERM, a full disk."""

import errno
import os
import signal

import numpy as np
import pytest
from train_helpers import (
    Child,
    base_args,
    latest_name,
    losses,
    make_models_dir,
    metrics,
    train,
    write_text_data,
)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return make_models_dir(tmp_path_factory)


@pytest.fixture
def args(tmp_path, models_dir):
    data = write_text_data(tmp_path / "data.txt")
    return base_args(tmp_path, models_dir, data, seq_len=16, batch_size=2, learning_rate=1e-3)


def _resume(tmp_path, steps):
    return ["--run_name", "run1", "--checkpoint_dir", tmp_path / "checkpoint",
            "--samples_dir", tmp_path / "samples", "--steps", steps]


def test_kill_9_while_training_resumes_from_last_checkpoint(tmp_path, args):
    run = tmp_path / "checkpoint" / "run1"
    child = Child(args + ["--steps", -1, "--save_every", 4])
    child.wait_for("Saving")  # model-4 is being written
    child.wait_for("[5 |")  # training on past it
    os.kill(child.proc.pid, signal.SIGKILL)
    child.finish()
    last = int(latest_name(run).split("-")[1])
    assert last in (4, 8)  # (8 only if this machine stalled the test for three steps)
    before = losses(run)  # what the killed process logged, past its last checkpoint too
    assert {1, 2, 3, 4, 5} <= set(before)

    code, _, err = train(_resume(tmp_path, 3))
    assert code == 0, err
    assert latest_name(run) == f"model-{last + 3}"
    after = losses(run)
    assert sorted(after) == list(range(1, last + 4))  # each step once, the lost ones redone
    redone = [s for s in before if last < s <= last + 3]
    for step in redone:  # redone from the checkpoint exactly as the killed process did them
        assert after[step] == pytest.approx(before[step], abs=1e-5)


def test_kill_9_during_a_save_keeps_the_previous_checkpoint(tmp_path, args):
    from gpt2tf.decode.generator import Generator

    run = tmp_path / "checkpoint" / "run1"
    child = Child(args + ["--steps", -1, "--save_every", 2], pause_in_save=4)
    child.wait_for("[test] paused in save")  # model-4's files are written, not committed
    assert (run / "model-4.index").is_file()
    os.kill(child.proc.pid, signal.SIGKILL)
    child.finish()
    assert latest_name(run) == "model-2"
    with Generator(run) as gen:
        assert gen.checkpoint.endswith("model-2")
        assert np.isfinite(gen.logits([[1, 2, 3]])).all()

    code, _, err = train(_resume(tmp_path, 1))
    assert code == 0, err
    assert latest_name(run) == "model-3"
    assert not list(run.glob("model-4.*"))  # the uncommitted orphan is gone
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]


def test_sigterm_saves_and_exits_0(tmp_path, args):
    run = tmp_path / "checkpoint" / "run1"
    child = Child(args + ["--steps", -1, "--save_every", 1000])
    child.wait_for("[3 |")
    child.proc.send_signal(signal.SIGTERM)
    code, _, err = child.finish()
    assert code == 0, err
    assert "SIGTERM" in err and "saved" in err
    step = int(latest_name(run).split("-")[1])
    assert step >= 3
    assert max(r["step"] for r in metrics(run)) == step


@pytest.mark.parametrize("failure", ["oserror", "tf"])
def test_disk_full_during_save_is_an_error_and_latest_stays(tmp_path, args, monkeypatch,
                                                            capsys, failure):
    import tensorflow as tf

    from gpt2tf import fileio, paths
    from gpt2tf.train import run_state
    from gpt2tf.decode.generator import Generator

    run = tmp_path / "checkpoint" / "run1"
    saves = []
    if failure == "oserror":
        real = fileio.write_json

        def write_json(path, obj):
            if str(path).endswith(paths.STATE_SUFFIX):
                saves.append(path)
                if len(saves) == 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, obj)

        monkeypatch.setattr(run_state.fileio, "write_json", write_json)
    else:
        real_save = tf.compat.v1.train.Saver.save

        def save(self, *a, **kw):
            saves.append(1)
            if len(saves) == 2:
                raise tf.errors.ResourceExhaustedError(None, None, "write failed: disk full")
            return real_save(self, *a, **kw)

        monkeypatch.setattr(tf.compat.v1.train.Saver, "save", save)
    code, _, err = train(args + ["--steps", 4, "--save_every", 2], capsys)
    assert code == 1
    assert err.startswith("error: cannot save checkpoint") and err.count("\n") == 1, err
    assert "model-2 is intact" in err
    assert latest_name(run) == "model-2"
    with Generator(run) as gen:
        assert gen.checkpoint.endswith("model-2")
