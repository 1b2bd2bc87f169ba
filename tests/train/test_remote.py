"""Remote storage (gpt2tf.remote) on TensorFlow's in-memory file system, ram://, which works
offline in this process: a tiny model, its dataset and its runs all at URLs.

Training goes through train.py's main in-process (ram:// is per process), so each test is a
few small training runs.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from train_helpers import REPO, make_models_dir, write_text_data

tf = pytest.importorskip("tensorflow")
g = tf.io.gfile

FLAGS = ["--model_name", "tiny", "--sample_every", "0", "--seed", "1", "--batch_size", "2",
         "--seq_len", "16", "--save_every", "2", "--print_every", "1"]


def _copy_tree(src: str, dst: str) -> None:
    for top, _, files in g.walk(src):
        here = dst + top[len(src):]
        g.makedirs(here)
        for f in files:
            g.copy(f"{top}/{f}", f"{here}/{f}")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """ram://<id>/: models/tiny, data/data.txt and ckpt/run1, a run trained 2 steps there."""
    models = make_models_dir(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("template")
    root = f"ram://{uuid.uuid4().hex}"
    _copy_tree(str(models / "tiny"), f"{root}/models/tiny")
    g.makedirs(f"{root}/data")
    g.copy(str(write_text_data(tmp / "data.txt")), f"{root}/data/data.txt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT2TF_CACHE_DIR", str(tmp / "cache"))
        from gpt2tf.cli import train_main

        assert train_main([str(a) for a in _args(root, "--steps", 2)]) == 0
    return root


@pytest.fixture
def bucket(template, tmp_path, monkeypatch, capsys):
    """A fresh copy of the template "bucket"; the cache in tmp_path."""
    monkeypatch.setenv("GPT2TF_CACHE_DIR", str(tmp_path / "cache"))
    root = f"ram://{uuid.uuid4().hex}"
    _copy_tree(template, root)
    capsys.readouterr()
    return root


def _args(root, *extra, checkpoint_dir=None):
    return ["--dataset", f"{root}/data/data.txt", "--models_dir", f"{root}/models",
            "--checkpoint_dir", checkpoint_dir or f"{root}/ckpt", *FLAGS, *extra]


def _train(args, capsys) -> tuple[int, str]:
    from gpt2tf.cli import train_main

    code = train_main([str(a) for a in args])
    return code, capsys.readouterr().err


def _remote_latest(run_url) -> str:
    text = g.GFile(f"{run_url}/checkpoint").read()
    return text.split('model_checkpoint_path: "', 1)[1].split('"', 1)[0]


def _losses(run_dir_or_url) -> dict[int, float]:
    with g.GFile(f"{run_dir_or_url}/metrics.jsonl") as f:
        recs = [json.loads(x) for x in f.read().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_train_resume_and_generate_on_remote_storage(bucket, tmp_path, capsys, monkeypatch):
    from gpt2tf import remote

    run = f"{bucket}/ckpt/run1"  # trained 2 steps (the template)
    assert _remote_latest(run) == "model-2"
    have = set(g.listdir(run))
    assert {"hparams.json", "encoder.json", "vocab.bpe", "train_config.json", "counter",
            "metrics.jsonl", "model-2.index", "model-2.state.json"} <= have
    assert any(n.startswith("events.out.tfevents.") for n in have)
    assert not [n for n in have if n.startswith(".")]  # no temporary file left
    stored = json.loads(g.GFile(f"{run}/train_config.json").read())
    assert stored["dataset"].endswith("/data/data.txt")  # the URL, not the staged copy
    assert stored["dataset"].startswith("ram://") and stored["models_dir"].startswith("ram://")

    # Resume in a fresh working copy (as on another machine), recording the upload order.
    events = []
    real_upload, real_remove = remote.upload, g.remove
    monkeypatch.setattr(remote, "upload", lambda local, url, **kw: (
        events.append(("put", url.rsplit("/", 1)[1])), real_upload(local, url, **kw)))
    monkeypatch.setattr(g, "remove", lambda url: (
        events.append(("rm", url.rsplit("/", 1)[1])), real_remove(url)))
    code, err = _train(_args(bucket, "--steps", 2, "--max_checkpoints", 1), capsys)
    assert code == 0, err
    assert _remote_latest(run) == "model-4"
    assert g.GFile(f"{run}/counter").read().strip() == "4"
    assert not [n for n in g.listdir(run) if n.startswith("model-2.")]  # pruned
    order = [name for _, name in events]
    commit = order.index("checkpoint")
    assert {"model-4.index", "model-4.data-00000-of-00001", "model-4.state.json",
            "metrics.jsonl"} <= set(order[:commit])  # everything it names goes up first
    assert order.index("counter") > commit
    assert all(order.index(name) > commit for kind, name in events if kind == "rm")
    assert ("rm", "model-2.index") in events

    # The same 4 steps trained in one go, locally: the remote resume was exact.
    g.copy(f"{bucket}/data/data.txt", str(tmp_path / "data.txt"))
    code, err = _train(["--dataset", tmp_path / "data.txt", "--models_dir",
                        f"{bucket}/models", "--checkpoint_dir", tmp_path / "local", *FLAGS,
                        "--steps", 4], capsys)
    assert code == 0, err
    local = _losses(tmp_path / "local" / "run1")
    assert list(local) == [1, 2, 3, 4]
    np.testing.assert_allclose([_losses(run)[s] for s in local], list(local.values()),
                               rtol=1e-6)

    # Generate from the remote run.
    from gpt2tf.cli import generate_main

    code = generate_main(["--checkpoint_dir", f"{bucket}/ckpt", "--run_name", "run1",
                          "--length", "8", "--seed", "1", "--nsamples", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip()

    # Every worker of a data-parallel run downloads what it restores, into its own copy.
    folder, _ = remote.run_folder(f"{bucket}/ckpt", "run1", worker=1)
    assert folder.parent.name == "worker-1" and (folder / "model-4.index").is_file()
    assert not (folder / "model-2.index").exists()


def test_crash_during_upload_keeps_the_previous_commit(bucket, capsys, monkeypatch):
    """An upload dies half-way (a partial temporary file left behind), first of the new
    checkpoint's index, then of the `checkpoint` file itself: each time the remote `checkpoint`
    still names model-2, whose files are all there, and a resume continues from it."""
    from gpt2tf import remote

    run = f"{bucket}/ckpt/run1"
    before = {n: g.stat(f"{run}/{n}").length for n in g.listdir(run) if n.startswith("model-2")}
    real_upload = remote.upload
    for failing in ("model-4.index", "checkpoint"):
        def dying_upload(local, url, failing=failing, **kw):
            if url.endswith("/" + failing):
                head, name = url.rsplit("/", 1)
                with g.GFile(f"{head}/.{name}.0123456789abcdef.part", "w") as f:
                    f.write("half")  # what a copy cut short leaves
                raise OSError(28, "No space left on device")
            real_upload(local, url, **kw)

        monkeypatch.setattr(remote, "upload", dying_upload)
        code, err = _train(_args(bucket, "--steps", 2), capsys)
        assert code == 1
        lines = err.strip().splitlines()
        assert lines[-1].startswith("error: cannot upload the run to"), err
        assert "still model-2" in lines[-1] and "Traceback" not in err
        assert _remote_latest(run) == "model-2"
        assert {n: g.stat(f"{run}/{n}").length for n in before} == before  # not pruned

    monkeypatch.setattr(remote, "upload", real_upload)
    code, err = _train(_args(bucket, "--steps", 1), capsys)
    assert code == 0, err
    assert _remote_latest(run) == "model-3"  # resumed at step 2
    assert sorted(_losses(run)) == [1, 2, 3]
    names = g.listdir(run)
    assert not [n for n in names if n.startswith((".", "model-2.", "model-4."))], names


def test_overwrite_reusing_a_committed_name_keeps_it_whole_meanwhile(bucket, capsys,
                                                                     monkeypatch):
    """--restore_from fresh --overwrite saves model-2 again: the old model-2 is moved aside
    (and `checkpoint` names it) while the new one uploads."""
    from gpt2tf import remote

    run = f"{bucket}/ckpt/run1"
    seen = {}
    real_upload = remote.upload

    def spy(local, url, **kw):
        if url.endswith("/model-2.index"):
            seen["latest"] = _remote_latest(run)
            seen["aside"] = sorted(n for n in g.listdir(run) if n.startswith("model-replaced"))
        real_upload(local, url, **kw)

    monkeypatch.setattr(remote, "upload", spy)
    code, err = _train(_args(bucket, "--steps", 2, "--restore_from", "fresh", "--overwrite",
                             "--learning_rate", 1e-3), capsys)
    assert code == 0, err
    assert seen["latest"] == "model-replaced-2" and "model-replaced-2.index" in seen["aside"]
    assert _remote_latest(run) == "model-2"
    assert not [n for n in g.listdir(run) if n.startswith(("model-replaced", "."))]
    stored = json.loads(g.GFile(f"{run}/train_config.json").read())
    assert stored["learning_rate"] == 1e-3


def test_staged_inputs_follow_the_remote(bucket, tmp_path):
    """A staged folder drops the files the remote no longer has and refetches changed ones."""
    from gpt2tf import remote

    g.makedirs(f"{bucket}/docs/sub")
    for name, text in (("a.txt", "one"), ("sub/b.txt", "two")):
        with g.GFile(f"{bucket}/docs/{name}", "w") as f:
            f.write(text)
    local = remote.stage_input("dataset", f"{bucket}/docs")
    assert (Path(local) / "sub" / "b.txt").read_text() == "two"
    g.remove(f"{bucket}/docs/sub/b.txt")
    g.remove(f"{bucket}/docs/a.txt")  # (ram:// appends to a file opened again for writing)
    with g.GFile(f"{bucket}/docs/a.txt", "w") as f:
        f.write("three")
    assert remote.stage_input("dataset", f"{bucket}/docs") == local
    assert (Path(local) / "a.txt").read_text() == "three"
    assert not (Path(local) / "sub" / "b.txt").exists()
    glob_local = remote.stage_input("dataset", f"{bucket}/docs/*.txt")
    assert sorted(p.name for p in Path(glob_local).parent.glob("*.txt")) == ["a.txt"]


def test_missing_remote_things_and_bad_schemes_are_user_errors(bucket, capsys):
    from gpt2tf import remote, settings
    from gpt2tf.cli import generate_main
    from gpt2tf.errors import FieldError, UserError
    from gpt2tf.train.config import TrainConfig

    TrainConfig(models_dir="gs://bucket/models", dataset="s3://b/x.txt")  # accepted as flags
    with pytest.raises(FieldError, match="is a URL"):  # downloads write a local folder
        {s.name: s for s in settings.DOWNLOAD}["models_dir"].check("gs://b/models")
    with pytest.raises(FieldError, match="no file system for foo://"):
        remote.check_url("dataset", "foo://x")
    with pytest.raises(FieldError, match="not found"):
        remote.stage_input("dataset", f"{bucket}/data/nope.txt")
    with pytest.raises(UserError, match="model directory .*/models/124M not found"):
        remote.stage_models(f"{bucket}/models", "124M")
    code = generate_main(["--checkpoint_dir", f"{bucket}/ckpt", "--run_name", "nope"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: run 'nope' not found in") and err.count("\n") == 1
    code = generate_main(["--models_dir", "hdfs://nn/models", "--model_name", "tiny"])
    err = capsys.readouterr().err
    assert code == 1 and "--models_dir hdfs://nn/models" in err and "tensorflow-io" in err


def test_unknown_scheme_through_the_cli_is_one_line_and_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"),
           "GPT2TF_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--dataset", "x.txt", "--checkpoint_dir",
         "foo://bucket/runs"], check=False, cwd=tmp_path, capture_output=True, text=True,
        timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --checkpoint_dir foo://bucket/runs: TensorFlow has"
                                  " no file system for foo://")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
