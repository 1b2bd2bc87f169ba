"""Bad input found by hand that once ended in a traceback: now one line, exit 1, nothing written."""

import shutil
import subprocess
import sys

import pytest

from gpt2tf import checkpoints
from tiny import REPO, TINY

GPT2TF = [sys.executable, "-c", "import sys; from gpt2tf.cli import main; sys.exit(main())"]


def _run(argv, cwd):
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    return proc.returncode, proc.stderr


def _one_line(code, err, needle):
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return checkpoints.init_model_dir(tmp_path_factory.mktemp("m") / "tiny", TINY, seed=0)


def test_seed_that_is_not_a_number(model, tmp_path):
    code, err = _run([*GPT2TF, "generate", "--models_dir", str(model.parent), "--model_name",
                      "tiny", "--seed", "abc"], tmp_path)
    _one_line(code, err, "--seed must be an integer, got 'abc'")


def test_huge_init_is_refused_before_allocating(tmp_path):
    code, err = _run([*GPT2TF, "init", str(tmp_path / "big"), "--n_ctx", "1000000000"], tmp_path)
    _one_line(code, err, "choose smaller n_layer, n_embd, n_ctx or n_vocab")
    assert not (tmp_path / "big").exists()


def test_run_name_too_long(model, tmp_path):
    code, err = _run([sys.executable, str(REPO / "train.py"), "--dataset", "x.txt",
                      "--run_name", "r" * 300], tmp_path)
    _one_line(code, err, "at most 255 bytes")


def test_utf16_without_a_byte_order_mark(model, tmp_path):
    src = tmp_path / "t.txt"
    src.write_bytes("hello".encode("utf-16-le"))
    code, err = _run([sys.executable, str(REPO / "encode.py"), str(src), str(tmp_path / "o.npz"),
                      "--models_dir", str(model.parent), "--model_name", "tiny",
                      "--encoding", "utf-16"], tmp_path)
    _one_line(code, err, "cannot be read as utf-16")
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe\x00binary\x00", "cannot be read"),
    (b'model_checkpoint_path: "../victim/model.ckpt"\n', "may only name its own checkpoints"),
])
def test_a_bad_checkpoint_file(model, tmp_path, content, needle):
    victim = tmp_path / "victim"
    shutil.copytree(model, victim)
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    (bad / "checkpoint").write_bytes(content)
    code, err = _run([sys.executable, str(REPO / "generate_unconditional.py"), "--models_dir",
                      str(tmp_path), "--model_name", "bad", "--length", "2"], tmp_path)
    _one_line(code, err, needle)


def test_a_run_never_resumes_from_another_runs_checkpoint(model, tmp_path):
    runs = tmp_path / "checkpoint"
    (runs / "victim").mkdir(parents=True)
    shutil.copytree(model, runs / "mine")
    (runs / "mine" / "checkpoint").write_text('model_checkpoint_path: "../victim/model-3"\n')
    data = tmp_path / "d.txt"
    data.write_text("hello world " * 200)
    code, err = _run([sys.executable, str(REPO / "train.py"), "--dataset", str(data),
                      "--checkpoint_dir", str(runs), "--run_name", "mine", "--models_dir",
                      str(model.parent), "--model_name", "tiny", "--steps", "1"], tmp_path)
    _one_line(code, err, "resumes only from its own checkpoints")
