"""--keep_best and --early_stopping_patience: the best checkpoint stays, early stopping ends the
run (saving first), and both carry across a resume exactly as an uninterrupted run does."""

import json

import pytest
from train_helpers import (
    base_args,
    latest_name,
    losses,
    make_models_dir,
    metrics,
    snapshot,
    train,
    write_text_data,
)

# The validation loss each step reports: it falls to its lowest at step 4, then never gets
# below it again, so patience 3 runs out at step 10 (validations at 6, 8 and 10).
SCRIPT = {2: 3.0, 4: 2.5, 6: 2.7, 8: 2.6, 10: 2.8, 12: 2.4}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return make_models_dir(tmp_path_factory)


@pytest.fixture
def data(tmp_path):
    return write_text_data(tmp_path / "data.txt", n_chars=6000)


@pytest.fixture
def scripted_val(monkeypatch):
    """Trainer.validate returns SCRIPT[step] (5.0 elsewhere), as keras-hub patches logits to
    test early stopping: the decisions are then known in advance."""
    from gpt2tf.train.loop import Trainer

    def validate(self):
        return SCRIPT.get(int(self.session.run(self.g.step.global_step)), 5.0)

    monkeypatch.setattr(Trainer, "validate", validate)


def _args(tmp_path, models_dir, data, run_name="run1", **flags):
    flags = {"seq_len": 16, "batch_size": 2, "learning_rate": 1e-3, "val_fraction": 0.2,
             "val_every": 2, "val_batch_count": 2, "save_every": 0, **flags}
    return base_args(tmp_path, models_dir, data, run_name, **flags)


def _resume(tmp_path, run_name="run1", *extra):
    return ["--run_name", run_name, "--checkpoint_dir", tmp_path / "checkpoint",
            "--samples_dir", tmp_path / "samples", *extra]


def _best(run) -> dict:
    return json.loads((run / "best.json").read_text())


def test_early_stopping_and_best_checkpoint_across_a_resume(tmp_path, models_dir, data,
                                                            scripted_val, capsys):
    import tensorflow as tf

    from gpt2tf.source import ModelSource

    flags = {"keep_best": True, "early_stopping_patience": 3, "max_checkpoints": 1}
    # One run until it stops by itself ...
    code, out, err = train(_args(tmp_path, models_dir, data, "whole", **flags), capsys)
    assert code == 0, err
    whole = tmp_path / "checkpoint" / "whole"
    assert "Early stopping at step 10" in out and "2.5000 (step 4)" in out
    assert latest_name(whole) == "model-10"  # saved before stopping
    assert _best(whole) == {"checkpoint": "model-4", "step": 4, "val_loss": 2.5}
    assert (whole / "model-4.index").is_file()  # kept beside the latest, max_checkpoints 1
    assert not (whole / "model-2.index").exists()  # the earlier best, replaced, is gone
    assert 'all_model_checkpoint_paths: "model-4"' in (whole / "checkpoint").read_text()

    # ... and one stopped at step 7 and resumed: the same steps, the same stop, the same best.
    code, _, err = train(_args(tmp_path, models_dir, data, **flags) + ["--steps", 7], capsys)
    assert code == 0, err
    run = tmp_path / "checkpoint" / "run1"
    side = json.loads((run / "model-7.state.json").read_text())
    assert side["best_val"] == {"step": 4, "val_loss": 2.5} and side["stale_validations"] == 1
    assert _best(run)["checkpoint"] == "model-4"
    code, out, err = train(_resume(tmp_path), capsys)  # flags from train_config.json
    assert code == 0, err
    assert "Early stopping at step 10" in out
    assert latest_name(run) == "model-10" and _best(run) == _best(whole)
    assert losses(run) == pytest.approx(losses(whole), abs=1e-5)
    assert sorted(losses(run)) == list(range(1, 11))

    # Generation reads the best checkpoint by name; it holds the weights of step 4.
    prefix = ModelSource.at(run).named_checkpoint("best")
    assert prefix == str(run / "model-4")
    assert tf.train.load_variable(prefix, "global_step") == 4
    # A resumed run after the stop goes on until the next validation without a new best.
    code, out, err = train(_resume(tmp_path), capsys)
    assert code == 0, err
    assert "Early stopping at step 12" not in out  # 2.4 at step 12 is a new best
    assert _best(run)["checkpoint"] == "model-12" and not (run / "model-4.index").exists()


def test_real_validation_keeps_the_lowest(tmp_path, models_dir, data, capsys):
    code, _, err = train(_args(tmp_path, models_dir, data, keep_best=True, steps=8), capsys)
    assert code == 0, err
    run = tmp_path / "checkpoint" / "run1"
    val = {r["step"]: r["val_loss"] for r in metrics(run) if "val_loss" in r and r["step"]}
    best_step = min(val, key=val.get)
    assert _best(run) == {"checkpoint": f"model-{best_step}", "step": best_step,
                          "val_loss": pytest.approx(val[best_step])}
    assert (run / f"model-{best_step}.index").is_file() and latest_name(run) == "model-8"


def test_crash_between_commit_and_best_json_is_repaired_on_resume(tmp_path, models_dir, data,
                                                                 scripted_val, capsys):
    code, _, err = train(_args(tmp_path, models_dir, data, keep_best=True, steps=5), capsys)
    assert code == 0, err
    run = tmp_path / "checkpoint" / "run1"
    assert _best(run)["checkpoint"] == "model-4"
    # As if killed after `checkpoint` named model-4 but before best.json was replaced.
    (run / "best.json").write_text(json.dumps({"checkpoint": "model-2", "step": 2,
                                               "val_loss": 3.0}))
    code, _, err = train(_resume(tmp_path, "run1", "--steps", 1), capsys)
    assert code == 0, err
    assert _best(run) == {"checkpoint": "model-4", "step": 4, "val_loss": 2.5}


def test_without_keep_best_the_best_is_pruned_and_best_json_goes(tmp_path, models_dir, data,
                                                                scripted_val, capsys):
    code, _, err = train(_args(tmp_path, models_dir, data, keep_best=True, steps=6), capsys)
    assert code == 0, err
    run = tmp_path / "checkpoint" / "run1"
    assert (run / "best.json").is_file()
    code, _, err = train(_resume(tmp_path, "run1", "--steps", 2, "--keep_best", "false"),
                         capsys)
    assert code == 0, err
    assert not (run / "best.json").exists() and not (run / "model-4.index").exists()
    assert json.loads((run / "train_config.json").read_text())["keep_best"] is False


@pytest.mark.parametrize("flags, field", [
    (["--keep_best"], "keep_best"),  # no validation data
    (["--early_stopping_patience", 2, "--val_fraction", 0.1], "early_stopping_patience"),
])
def test_needs_validation_one_line_and_nothing_written(tmp_path, models_dir, data, capsys,
                                                       flags, field):
    before = snapshot(tmp_path)
    code, _, err = train(base_args(tmp_path, models_dir, data, steps=2) + flags, capsys)
    assert code == 1
    assert err.startswith(f"error: --{field} needs validation") and err.count("\n") == 1, err
    assert "Traceback" not in err and snapshot(tmp_path) == before


def test_generate_best_of_a_run_without_one_is_one_line(tmp_path, models_dir, data, capsys):
    from gpt2tf import compat
    from gpt2tf.cli import generate_main
    from gpt2tf.errors import UserError

    code, _, err = train(_args(tmp_path, models_dir, data, steps=2), capsys)
    assert code == 0, err
    argv = ["--run_name", "run1", "--checkpoint_dir", tmp_path / "checkpoint", "--length", 2]
    assert generate_main([str(a) for a in argv + ["--checkpoint", "best"]]) == 1
    err = capsys.readouterr().err
    assert "has no best checkpoint" in err and "--keep_best" in err and err.count("\n") == 1
    assert generate_main([str(a) for a in argv + ["--checkpoint", "../run1/model-2"]]) == 1
    assert "not a checkpoint name" in capsys.readouterr().err
    sess = compat.start_tf_sess()
    with pytest.raises(UserError, match="no checkpoint model-9 in"):
        compat.load_gpt2(sess, checkpoint="model-9", run_name="run1",
                         checkpoint_dir=str(tmp_path / "checkpoint"))
    compat.load_gpt2(sess, checkpoint="model-2", run_name="run1",
                     checkpoint_dir=str(tmp_path / "checkpoint"))
    assert sess.current.checkpoint == str(tmp_path / "checkpoint" / "run1" / "model-2")
    sess.close()
