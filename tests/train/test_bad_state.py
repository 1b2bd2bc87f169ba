"""A run's files damaged on disk, or no room for the next save: one line, exit 1, nothing lost.

A checkpoint cut short (a full disk, a partial copy) is named as such before TF restores part
of it; what an interrupted save leaves (TF's *.tempstate<n> files) is removed on resume; a
save that would not fit on the disk is refused before it writes anything.
"""

import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from tiny import REPO
from train_helpers import (
    base_args,
    latest_name,
    make_models_dir,
    snapshot,
    train,
    write_text_data,
)

DATA = "model-{}.data-00000-of-00001"
GPT2TF = [sys.executable, "-c", "import sys; from gpt2tf.cli import main; sys.exit(main())"]
TRAIN = [sys.executable, str(REPO / "train.py")]


def _run(argv, cwd):
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=300, env=env)
    return proc.returncode, proc.stderr


def _one_line(code, err, *needles):
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(models dir, data, a finished run of 2 steps with checkpoints model-1 and model-2)."""
    root = tmp_path_factory.mktemp("made")
    models = make_models_dir(tmp_path_factory)
    data = write_text_data(root / "data.txt")
    code, _, err = train(base_args(root, models, data, seq_len=16, batch_size=2, steps=2,
                                   save_every=1, max_checkpoints=2))
    assert code == 0, err
    return models, data, root / "checkpoint" / "run1"


@pytest.fixture
def run(made, tmp_path):
    """A copy of the made run at tmp_path/checkpoint/run1 (its latest checkpoint: model-2)."""
    shutil.copytree(made[2], tmp_path / "checkpoint" / "run1")
    return tmp_path / "checkpoint" / "run1"


def _resume_args(tmp_path, steps=1):
    return ["--checkpoint_dir", tmp_path / "checkpoint", "--run_name", "run1",
            "--samples_dir", tmp_path / "samples", "--steps", steps]


def _cut(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


# --- a damaged checkpoint -----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["half", "tail"])  # tail: only the optimizer slots' last bytes
def test_resume_from_a_truncated_checkpoint(run, tmp_path, where):
    data = run / DATA.format(2)
    size = data.stat().st_size
    _cut(data, size // 2 if where == "half" else size - 100)
    for f in run.glob("model-1.*"):  # no earlier checkpoint either: the advice starts over
        f.unlink()
    before = snapshot(tmp_path)
    code, err = _run([*TRAIN, *_resume_args(tmp_path)], tmp_path)
    _one_line(code, err, f"{run / 'model-2'} is truncated", "--restore_from fresh --overwrite")
    assert snapshot(tmp_path) == before


def test_the_advice_for_a_truncated_checkpoint_works(run, tmp_path, made, capsys):
    """With an earlier checkpoint: delete the damaged one, and the run continues from it."""
    _cut(run / DATA.format(2), 1000)
    code, _, err = train(_resume_args(tmp_path), capsys)
    assert code == 1
    _one_line(code, err, f"delete {run / 'model-2'}.* and resume again",
              "earlier checkpoint model-1")
    for f in run.glob("model-2.*"):
        f.unlink()
    code, out, err = train(_resume_args(tmp_path), capsys)
    assert code == 0, err
    assert "Loading checkpoint" in out and "model-1" in out
    assert latest_name(run) == "model-2"  # step 1 resumed and saved as step 2 again


def test_starting_over_from_a_truncated_checkpoint(run, tmp_path, made, capsys):
    """The advice when there is no earlier checkpoint: --restore_from fresh --overwrite."""
    models, data, _ = made
    _cut(run / DATA.format(2), 1000)
    _cut(run / DATA.format(1), 1000)  # the earlier one too
    code, _, err = train(base_args(tmp_path, models, data, seq_len=16, batch_size=2, steps=1,
                                   restore_from="fresh") + ["--overwrite"], capsys)
    assert code == 0, err
    assert latest_name(run) == "model-1"
    assert not list(run.glob("model-2.*"))


def test_resume_with_corrupt_optimizer_state(run, tmp_path):
    """The size is right but the last bytes are not (a checksum mismatch in TF)."""
    data = run / DATA.format(2)
    raw = bytearray(data.read_bytes())
    raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])
    data.write_bytes(bytes(raw))
    before = snapshot(tmp_path)
    code, err = _run([*TRAIN, *_resume_args(tmp_path)], tmp_path)
    _one_line(code, err, "the checkpoint is corrupt", "earlier checkpoint model-1")
    assert snapshot(tmp_path) == before


def test_generate_from_a_truncated_checkpoint(run, tmp_path):
    _cut(run / DATA.format(2), 5000)
    before = snapshot(tmp_path)
    code, err = _run([*GPT2TF, "generate", "--models_dir", run.parent, "--model_name", "run1",
                      "--length", 2], tmp_path)
    _one_line(code, err, "is truncated")
    assert snapshot(tmp_path) == before  # no decode cache of a broken checkpoint either


# --- what interrupted saves leave -------------------------------------------------------------


def test_leftovers_of_interrupted_saves_are_removed_on_resume(run, tmp_path, capsys):
    # The names TF 2.21's Saver writes before renaming (seen with strace on a save), a sharded
    # Saver's folder, and fileio's temp files beside the run's small files.
    leftovers = [DATA.format(3) + ".tempstate9380345787513808720",
                 "model-3.index.tempstate8852878095632462463", ".counter.k2j4h_x1.tmp",
                 ".model-3.state.json.abcdefgh.tmp", ".checkpoint.q1w2e3r4.tmp"]
    for name in leftovers:
        (run / name).write_bytes(b"\0" * 4096)
    (run / "model-3_temp").mkdir()
    (run / "model-3_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"\0")
    others = ["notes.tempstate1", "model-3.data-00000-of-00001.bak", ".hidden.tmp"]
    for name in others:
        (run / name).write_text("the user's", encoding="utf-8")
    code, out, err = train(_resume_args(tmp_path), capsys)
    assert code == 0, err
    for name in leftovers + ["model-3_temp"]:
        assert not (run / name).exists(), name
        assert f"Removed {run / name}" in out
    for name in others:
        assert (run / name).read_text(encoding="utf-8") == "the user's"
    assert latest_name(run) == "model-3"


# --- no room for a save -------------------------------------------------------------------------

DiskUsage = namedtuple("DiskUsage", "total used free")


def _low_disk(monkeypatch, free: int, when=lambda: True):
    real = shutil.disk_usage

    def disk_usage(path):
        usage = real(path)
        return DiskUsage(usage.total, usage.used, free) if when() else usage

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_a_save_that_would_not_fit_is_refused_and_latest_stays(tmp_path, made, monkeypatch,
                                                               capsys):
    from gpt2tf.decode.generator import Generator

    models, data, _ = made
    run = tmp_path / "checkpoint" / "run1"
    # The disk fills up once model-2 is saved: the save of model-4 must not start.
    _low_disk(monkeypatch, 50_000, when=lambda: (run / "model-2.index").is_file())
    code, _, err = train(base_args(tmp_path, models, data, seq_len=16, batch_size=2, steps=4,
                                   save_every=2), capsys)
    _one_line(code, err, f"not enough disk space to save checkpoint {run / 'model-4'}",
              "has 48.8 KiB free", f"the latest checkpoint {run / 'model-2'} is intact")
    assert latest_name(run) == "model-2"
    assert not list(run.glob("model-4*")) and not list(run.glob("*tempstate*"))
    monkeypatch.undo()
    with Generator(run) as gen:  # the latest checkpoint still restores
        assert gen.checkpoint.endswith("model-2")
        assert np.isfinite(gen.logits([[1, 2, 3]])).all()


def test_resume_on_a_full_disk_writes_nothing(run, tmp_path, monkeypatch, capsys):
    _low_disk(monkeypatch, 0)
    before = snapshot(tmp_path)
    code, _, err = train(_resume_args(tmp_path), capsys)
    _one_line(code, err, "not enough disk space to train", "has 0 bytes free",
              f"the latest checkpoint {run / 'model-2'} is intact")
    assert snapshot(tmp_path) == before


def test_the_size_checked_is_the_whole_checkpoint(run, tmp_path, monkeypatch, capsys):
    """Weights, step and optimizer slots: exactly the data file TF then writes."""
    from gpt2tf.train import run_state

    asked = []
    real = run_state.check_free_space

    def check_free_space(run_dir, tensor_bytes, **kw):
        asked.append(tensor_bytes)
        return real(run_dir, tensor_bytes, **kw)

    monkeypatch.setattr(run_state, "check_free_space", check_free_space)
    code, _, err = train(_resume_args(tmp_path), capsys)
    assert code == 0, err
    assert asked and set(asked) == {(run / DATA.format(3)).stat().st_size}
