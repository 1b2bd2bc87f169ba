"""Fine-tuning on tiny models: learning, exact resume, run layout, bad input, the step's maths."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import (
    REPO,
    base_args,
    latest_name,
    losses,
    make_models_dir,
    metrics,
    shakespeare,
    snapshot,
    train,
    write_text_data,
)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return make_models_dir(tmp_path_factory)


@pytest.fixture
def data(tmp_path):
    return write_text_data(tmp_path / "data.txt")


# --- learning, samples, the run directory ------------------------------------------------------


def test_loss_drops_on_shakespeare_and_run_samples(tmp_path, capsys):
    """GPT-2's vocabulary on a tiny model: train and validation loss fall within 30 steps."""
    from gpt2tf import checkpoints
    from gpt2tf.hparams import HParams
    from gpt2tf.decode.generator import Generator

    text = shakespeare()
    models = tmp_path / "models"
    models.mkdir()
    checkpoints.init_model_dir(
        models / "tiny", HParams(n_vocab=50257, n_ctx=64, n_embd=32, n_head=2, n_layer=2),
        vocab_dir=text.parent,
    )
    args = base_args(
        tmp_path, models, text, steps=30, batch_size=4, learning_rate=3e-3, val_fraction=0.1,
        val_every=10, val_batch_count=4, sample_every=15, sample_length=12, save_every=15,
        print_every=1,
    )
    code, out, err = train(args, capsys)
    assert code == 0, err
    run = tmp_path / "checkpoint" / "run1"
    recs = metrics(run)
    train_losses = [r["loss"] for r in recs if "loss" in r]
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(train_losses) == 30 and len(val) == 4  # steps 0, 10, 20, 30
    assert np.mean(train_losses[-5:]) < np.mean(train_losses[:5]) - 1.5, train_losses
    assert val[-1] < val[0] - 1.5, val
    ppl = [r["val_perplexity"] for r in recs if "val_loss" in r]
    assert len(ppl) == 4 and ppl[-1] < ppl[0] / 3 and ppl[-1] > 1, ppl
    assert abs(np.log(ppl[-1]) - val[-1]) < 0.5  # the same quantity, over other windows
    for key in ("step", "loss", "avg_loss", "lr", "tokens_per_sec"):
        assert key in recs[-1]
    assert "tokens/s" in out and "left" in out and "avg=" in out

    # The run directory is a model directory: our generator loads it without any flags.
    for name in ("hparams.json", "encoder.json", "vocab.bpe", "checkpoint", "counter",
                 "train_config.json", "model-30.index", "model-30.state.json"):
        assert (run / name).is_file(), name
    assert not (run / "model-15.index").exists()  # max_checkpoints 1
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "counter").read_text().strip() == "30"
    assert sorted(p.name for p in (tmp_path / "samples" / "run1").iterdir()) == [
        "samples-15", "samples-30"
    ]
    assert "======== SAMPLE 1 ========" in (tmp_path / "samples/run1/samples-30").read_text()
    with Generator(run) as gen:
        assert gen.checkpoint.endswith("model-30")
        (sample,) = gen.iter_samples(gen.encode_prompt("ROMEO:"), length=8, seed=3)
        assert isinstance(sample.text, str)
    weights = checkpoints.read_weights(str(run / "model-30"))
    assert set(weights) == set(checkpoints.init_weights(HParams(
        n_vocab=50257, n_ctx=64, n_embd=32, n_head=2, n_layer=2)))


def test_exact_resume_matches_uninterrupted_run(tmp_path, models_dir, data, capsys):
    """2N steps in one go == N steps, stop, N more: every loss, the weights and Adam's slots."""
    import tensorflow as tf

    flags = {
        "batch_size": 2, "learning_rate": 3e-3, "accumulate_gradients": 2, "noise": 0.1,
        "max_grad_norm": 1.0, "warmup_steps": 2, "lr_schedule": "cosine", "lr_decay_steps": 8,
        "seq_len": 32, "save_every": 100,
    }
    code, _, err = train(base_args(tmp_path, models_dir, data, "whole", steps=8, **flags), capsys)
    assert code == 0, err
    code, _, err = train(base_args(tmp_path, models_dir, data, "split", steps=4, **flags), capsys)
    assert code == 0, err
    # Resume with no flags but the run: the rest comes from its train_config.json.
    resume = ["--run_name", "split", "--checkpoint_dir", tmp_path / "checkpoint",
              "--samples_dir", tmp_path / "samples", "--steps", 4]
    code, out, err = train(resume, capsys)
    assert code == 0, err
    assert "[5 |" in out  # the step count continues

    whole, split = tmp_path / "checkpoint/whole", tmp_path / "checkpoint/split"
    a, b = losses(whole), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    lr_a = [r["lr"] for r in metrics(whole)]
    assert lr_a == [r["lr"] for r in metrics(split)]
    assert lr_a[0] < lr_a[1] and lr_a[-1] < lr_a[2]  # warmup, then cosine decay
    ra, rb = tf.train.load_checkpoint(str(whole / "model-8")), tf.train.load_checkpoint(
        str(split / "model-8"))
    names = ra.get_variable_to_shape_map()
    assert any(n.endswith("/Adam_1") for n in names) and "global_step" in names
    assert set(names) == set(rb.get_variable_to_shape_map())
    for n in names:
        np.testing.assert_allclose(ra.get_tensor(n), rb.get_tensor(n), atol=1e-5, err_msg=n)


def test_fresh_refuses_existing_run_and_overwrite_replaces_it_after_saving(
    tmp_path, models_dir, data, capsys, monkeypatch
):
    from pause_in_save import pause_before_commit

    from gpt2tf import checkpoints
    from gpt2tf.train import run_state

    args = base_args(tmp_path, models_dir, data, seq_len=16, save_every=100)
    assert train(args + ["--steps", 2], capsys)[0] == 0
    run = tmp_path / "checkpoint" / "run1"
    before = snapshot(tmp_path)
    old_weights = checkpoints.read_weights(str(run / "model-2"))
    old_metrics = (run / "metrics.jsonl").read_bytes()

    code, _, err = train(args + ["--steps", 2, "--restore_from", "fresh"], capsys)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert str(run) in err and "--overwrite" in err
    assert snapshot(tmp_path) == before

    # --overwrite, killed inside its first save (same name model-2 as the old run): the old
    # checkpoint must still be the loadable latest, the old metrics untouched.
    class Crash(BaseException):
        pass

    def crash(_prefix):
        raise Crash

    monkeypatch.setattr(run_state, "write_checkpoint_state", pause_before_commit(2, crash))
    with pytest.raises(Crash):
        train(args + ["--steps", 2, "--restore_from", "fresh", "--overwrite",
                      "--learning_rate", 1e-2])
    capsys.readouterr()
    from gpt2tf.decode.generator import Generator

    with Generator(run) as gen:  # loads whatever `checkpoint` names: the old weights
        assert "replaced" in gen.checkpoint
        still = checkpoints.read_weights(gen.checkpoint)
    for name, value in old_weights.items():
        np.testing.assert_array_equal(still[name], value)
    assert (run / "metrics.jsonl").read_bytes() == old_metrics

    monkeypatch.undo()
    code, _, err = train(args + ["--restore_from", "fresh", "--overwrite", "--steps", 3,
                                 "--learning_rate", 1e-2], capsys)
    assert code == 0, err
    assert latest_name(run) == "model-3"
    leftovers = sorted(p.name for p in run.iterdir() if p.name.startswith("model"))
    assert leftovers == ["model-3.data-00000-of-00001", "model-3.index", "model-3.state.json"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    new = metrics(run)
    assert [r["step"] for r in new] == [1, 2, 3]
    assert json.loads((run / "train_config.json").read_text())["learning_rate"] == 1e-2


def test_sampler_resume_and_orphans_after_a_crash_between_saves(tmp_path, models_dir, data):
    """A crash after the data files but before `checkpoint` was updated: resume from the
    previous checkpoint, drop the orphan, and log each step once."""
    from gpt2tf import paths

    args = base_args(tmp_path, models_dir, data, seq_len=16, save_every=2, max_checkpoints=0)
    assert train(args + ["--steps", 4])[0] == 0
    run = tmp_path / "checkpoint" / "run1"
    assert latest_name(run) == "model-4"
    # Fake the crash: model-6 files exist, `checkpoint` still names model-4, metrics ran ahead.
    for f in run.glob("model-4.*"):
        (run / f.name.replace("model-4", "model-6")).write_bytes(f.read_bytes())
    with open(run / "metrics.jsonl", "a") as m:
        m.write('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    assert train(args + ["--steps", 1])[0] == 0
    assert latest_name(run) == "model-5"
    assert not list(run.glob("model-6.*"))
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]
    _, recorded = paths.checkpoint_state(run)
    assert [p.rsplit("-", 1)[1] for p in recorded] == ["2", "4", "5"]


def test_finetune_api_then_generate(tmp_path, models_dir, data, monkeypatch, capsys):
    import gpt2tf as gpt2

    monkeypatch.chdir(tmp_path)
    sess = gpt2.start_tf_sess()
    result = gpt2.finetune(
        sess, str(data), steps=3, model_name="tiny", model_dir=str(models_dir),
        sample_every=2, sample_length=5, run_name="api", learning_rate=1e-3,
        accumulate_gradients=2, use_memory_saving_gradients=True, seq_len=16,
    )
    assert result.step == 3
    assert sess.current.checkpoint.endswith("model-3")
    (text,) = gpt2.generate(sess, return_as_list=True, length=5, seed=1)
    assert isinstance(text, str)
    assert (tmp_path / "samples" / "api" / "samples-2").is_file()
    cfg = json.loads((tmp_path / "checkpoint/api/train_config.json").read_text())
    assert cfg["accumulate_gradients"] == 2 and cfg["memory_saving_gradients"] is True
    sess.close()
    capsys.readouterr()


@pytest.mark.parametrize("optimizer", ["sgd", "adafactor"])
def test_other_optimizers_and_bf16_train(tmp_path, models_dir, data, optimizer, capsys):
    val = write_text_data(tmp_path / "val.txt", 3000)
    args = base_args(tmp_path, models_dir, data, steps=3, seq_len=16, optimizer=optimizer,
                     precision="bf16", only_train_transformer_layers=True, learning_rate=1e-2,
                     val_dataset=val, val_every=3, val_batch_count=2)
    code, _, err = train(args, capsys)
    assert code == 0, err
    assert [r["step"] for r in metrics(tmp_path / "checkpoint/run1") if "val_loss" in r] == [0, 3]
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(tmp_path / "checkpoint/run1/model-3"))
    names = reader.get_variable_to_shape_map()
    if optimizer == "adafactor":
        assert "optimizer/adafactor/model/h0/mlp/c_fc/w/vr" in names
    init = tf.train.load_checkpoint(str(models_dir / "tiny" / "model.ckpt"))
    # only the blocks moved
    np.testing.assert_array_equal(reader.get_tensor("model/wte"), init.get_tensor("model/wte"))
    assert not np.array_equal(
        reader.get_tensor("model/h0/mlp/c_fc/w"), init.get_tensor("model/h0/mlp/c_fc/w"))


def test_restore_from_a_path_starts_a_new_run_from_its_weights(tmp_path, models_dir, data):
    from gpt2tf import checkpoints

    args = base_args(tmp_path, models_dir, data, "a", seq_len=16, learning_rate=1e-2)
    assert train(args + ["--steps", 2])[0] == 0
    src = tmp_path / "checkpoint" / "a" / "model-2"
    code, _, _ = train(base_args(tmp_path, models_dir, data, "b", seq_len=16,
                                 learning_rate=1e-9, optimizer="sgd")
                       + ["--steps", 1, "--restore_from", src])
    assert code == 0
    b = tmp_path / "checkpoint" / "b"
    assert latest_name(b) == "model-1"  # a new run: its own step count
    wa, wb = checkpoints.read_weights(str(src)), checkpoints.read_weights(str(b / "model-1"))
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], atol=1e-6)


# --- bad input: one line, exit 1, nothing written --------------------------------------------


def _pickled_npz(path):
    np.savez(path, np.array([{"not": "tokens"}], dtype=object))
    return path


@pytest.mark.parametrize("case", [
    "empty", "short", "optimizer", "batch_size", "dotdot", "slash", "mismatch", "pickle",
    "precision", "steps", "restore_path", "seq_len",
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, models_dir, data, case, capsys):
    from train_helpers import make_model

    models = models_dir
    dataset = data
    extra = []
    run_name = "run1"
    if case == "empty":
        dataset = tmp_path / "empty.txt"
        dataset.write_text("")
    elif case == "short":
        dataset = tmp_path / "short.txt"
        dataset.write_text("too short for a window of 65 tokens")
    elif case == "optimizer":
        extra = ["--optimizer", "adamw"]
    elif case == "batch_size":
        extra = ["--batch_size", 0]
    elif case == "dotdot":
        run_name = "../x"
    elif case == "slash":
        run_name = "a/b"
    elif case == "mismatch":
        models = tmp_path / "models"
        models.mkdir()
        make_model(models / "tiny")
        hp = json.loads((models / "tiny/hparams.json").read_text())
        (models / "tiny/hparams.json").write_text(json.dumps({**hp, "n_layer": 3}))
    elif case == "pickle":
        dataset = _pickled_npz(tmp_path / "data.npz")
    elif case == "precision":
        extra = ["--precision", "fp16"]
    elif case == "steps":
        extra = ["--steps", 0]
    elif case == "restore_path":
        extra = ["--restore_from", tmp_path / "nowhere"]
    elif case == "seq_len":
        extra = ["--seq_len", 65]
    before = snapshot(tmp_path)
    models_before = snapshot(models_dir)
    args = base_args(tmp_path, models, dataset, run_name, steps=2) + extra
    code, out, err = train(args, capsys)
    assert code == 1, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before
    assert snapshot(models_dir) == models_before
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "samples").exists()
    expected = {
        "empty": "empty", "short": "window", "optimizer": "adamw", "batch_size": "batch_size",
        "dotdot": "run name", "slash": "run name", "mismatch": "hparams", "pickle": "pickle",
        "precision": "fp16", "steps": "--steps", "restore_path": "nowhere",
        "seq_len": "n_ctx",
    }[case]
    assert expected in err


def test_cli_help_and_light_import(capsys):
    from gpt2tf.cli import train_main

    assert train_main(["--help"]) == 0
    text = "".join(capsys.readouterr())  # fire shows help on stdout or stderr
    for flag in ("--accumulate_gradients", "--memory_saving_gradients", "--val_fraction",
                 "--precision", "--lr_schedule", "--max_grad_norm", "--restore_from"):
        assert flag.lstrip("-") in text
    check = "import sys, gpt2tf, gpt2tf.train.config, gpt2tf.cli.commands; assert 'tensorflow' not in sys.modules"
    code = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert code.returncode == 0, code.stderr
    # A bad flag from the command line: one line on stderr, before TensorFlow loads.
    bad = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--dataset", "x.txt", "--optimizer", "adamw"],
        capture_output=True, text=True, check=False,
    )
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == "error: --optimizer must be one of adam, sgd, adafactor, got 'adamw'\n"


# --- the step's maths (graph only) -------------------------------------------------------------


def _step_updates(hp, cfg, batches, weights):
    """Run one training step (len(batches) micro-batches); return the updated weights."""
    import tensorflow as tf

    from gpt2tf.train import step as train_step

    tf1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        tokens = tf1.placeholder(tf.int32, batches[0].shape)
        step = train_step.TrainStep(hp, cfg, tokens)
        assign = [v.assign(weights[v.name.split(":")[0]]) for v in step.model_variables]
        init = [tf1.global_variables_initializer(), tf1.local_variables_initializer()]
    with tf1.Session(graph=g) as s:
        s.run(init)
        s.run(assign)
        out = step.run(s, [{tokens: b} for b in batches])
        new = {v.name.split(":")[0]: s.run(v) for v in step.model_variables}
    return out, new


@pytest.fixture(scope="module")
def tiny_weights():
    from gpt2tf import checkpoints
    from gpt2tf.hparams import HParams

    hp = HParams(n_vocab=257, n_ctx=32, n_embd=16, n_head=2, n_layer=2)
    rng = np.random.default_rng(0)
    return hp, checkpoints.init_weights(hp, seed=1), rng.integers(0, 257, [2, 17]).astype(np.int32)


def test_accumulation_applies_the_mean_gradient(tiny_weights):
    """Two micro-batches of 1 == one batch of 2: the mean, not nshepperd's sum."""
    from gpt2tf.train.config import StepConfig

    hp, w, batch = tiny_weights
    cfg = StepConfig(optimizer="sgd", learning_rate=0.5)
    out1, big = _step_updates(hp, cfg, [batch], w)
    out2, acc = _step_updates(
        hp, StepConfig(optimizer="sgd", learning_rate=0.5, accumulate_gradients=2),
        [batch[:1], batch[1:]], w,
    )
    assert abs(out1["loss"] - out2["loss"]) < 1e-5
    for name in big:
        np.testing.assert_allclose(acc[name], big[name], atol=2e-6, err_msg=name)


def test_recompute_gives_the_same_gradients(tiny_weights):
    from gpt2tf.train.config import StepConfig

    hp, w, batch = tiny_weights
    _, plain = _step_updates(hp, StepConfig(optimizer="sgd", learning_rate=0.5), [batch], w)
    _, remat = _step_updates(
        hp, StepConfig(optimizer="sgd", learning_rate=0.5, memory_saving_gradients=True),
        [batch], w,
    )
    for name in plain:
        np.testing.assert_allclose(remat[name], plain[name], atol=1e-6, err_msg=name)


def test_bf16_loss_close_to_fp32_and_clipping_bounds_the_update(tiny_weights):
    from gpt2tf.train.config import StepConfig

    hp, w, batch = tiny_weights
    out32, _ = _step_updates(hp, StepConfig(), [batch], w)
    out16, _ = _step_updates(hp, StepConfig(precision="bf16"), [batch], w)
    assert abs(out32["loss"] - out16["loss"]) < 2e-2
    out, clipped = _step_updates(
        hp, StepConfig(optimizer="sgd", learning_rate=1.0, max_grad_norm=1e-3), [batch], w)
    assert out["grad_norm"] > 1e-3
    delta = np.sqrt(sum(np.sum((clipped[n] - w[n]) ** 2) for n in w))
    assert delta == pytest.approx(1e-3, rel=1e-3)


def test_learning_rate_schedule_graph_matches_python():
    import tensorflow as tf

    from gpt2tf.train import optim

    kw = {"base": 1e-3, "warmup_steps": 3, "schedule": "cosine", "decay_steps": 10,
          "min_ratio": 0.1}
    g = tf.Graph()
    with g.as_default():
        step = tf.compat.v1.placeholder(tf.int64, [])
        lr = optim.learning_rate(step, **kw)
    with tf.compat.v1.Session(graph=g) as s:
        got = [s.run(lr, {step: i}) for i in range(13)]
    want = [optim.learning_rate_value(i, **kw) for i in range(13)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert want[0] == pytest.approx(1e-3 / 3) and want[2] == pytest.approx(1e-3)
    assert want[12] == pytest.approx(1e-4)
