"""Runs move between gpt-2-simple 0.8.1 and us, both ways.

gpt-2-simple turns eager execution off for the whole process when imported, so it only ever
runs in a child process here. Without it these tests skip, unless GPT2TF_REQUIRE_REFERENCE=1.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
from train_helpers import (
    base_args,
    latest_name,
    make_model,
    start_workers,
    train,
    write_text_data,
)

pytestmark = pytest.mark.reference


def _require_gpt2_simple():
    if importlib.util.find_spec("gpt_2_simple") is None:
        if os.environ.get("GPT2TF_REQUIRE_REFERENCE", "") not in ("", "0"):
            pytest.fail("gpt_2_simple is not installed and GPT2TF_REQUIRE_REFERENCE is set")
        pytest.skip("gpt_2_simple is not installed")


def _run_gpt2_simple(code: str, cwd) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
        text=True, timeout=300, check=False, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _samples_in_gpt2_simple(workdir, run_name: str) -> None:
    """gpt-2-simple's load_gpt2 restores our run and generate samples from it."""
    out = _run_gpt2_simple(f"""
        import json
        import gpt_2_simple as gpt2
        sess = gpt2.start_tf_sess()
        gpt2.load_gpt2(sess, run_name={run_name!r})
        texts = gpt2.generate(sess, run_name={run_name!r}, length=10, return_as_list=True,
                              seed=1)
        print(json.dumps(texts))
    """, workdir)
    texts = json.loads(out.strip().splitlines()[-1])
    assert len(texts) == 1 and isinstance(texts[0], str)


@pytest.fixture
def workdir(tmp_path):
    _require_gpt2_simple()
    # gpt-2-simple trains on 1024-token windows whatever the model: n_ctx must be 1024.
    (tmp_path / "models").mkdir()
    make_model(tmp_path / "models" / "tiny", n_ctx=1024)
    write_text_data(tmp_path / "data.txt")
    return tmp_path


def test_gpt2_simple_run_loads_and_resumes_here(workdir, capsys, caplog):
    from gpt2tf.decode.generator import Generator

    _run_gpt2_simple("""
        import gpt_2_simple as gpt2
        sess = gpt2.start_tf_sess()
        gpt2.finetune(sess, "data.txt", model_name="tiny", steps=2, run_name="g2s",
                      sample_every=1000, save_every=1000, accumulate_gradients=1)
    """, workdir)
    run = workdir / "checkpoint" / "g2s"
    assert latest_name(run) == "model-2"
    with Generator(run) as gen:
        (sample,) = gen.iter_samples(gen.encode_prompt("To be"), length=5, seed=1)
        assert isinstance(sample.text, str)
    # Our trainer continues it: weights and step from gpt-2-simple, fresh Adam (it saved none).
    args = ["--run_name", "g2s", "--checkpoint_dir", workdir / "checkpoint", "--dataset",
            workdir / "data.txt", "--steps", 2, "--seq_len", 32, "--sample_every", 0,
            "--samples_dir", workdir / "samples"]
    code, out, err = train(args, capsys)
    assert code == 0, err
    assert "[3 |" in out and "holds no adam state" in caplog.text
    assert latest_name(run) == "model-4"


def test_our_run_loads_in_gpt2_simple(workdir, capsys):
    args = base_args(workdir, workdir / "models", workdir / "data.txt", "ours", steps=2,
                     seq_len=32)
    code, _, err = train(args, capsys)
    assert code == 0, err
    _samples_in_gpt2_simple(workdir, "ours")


def test_a_data_parallel_run_loads_in_gpt2_simple(workdir, monkeypatch):
    """2 workers on loopback write the run (the chief alone): gpt-2-simple's load_gpt2 restores
    it and samples from it (test_distributed checks the names equal a single process's)."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    args = base_args(workdir, workdir / "models", workdir / "data.txt", "dist", steps=2,
                     seq_len=32, batch_size=1)
    results = [k.finish(timeout=240) for k in start_workers(args)]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    assert latest_name(workdir / "checkpoint" / "dist") == "model-2"
    _samples_in_gpt2_simple(workdir, "dist")
