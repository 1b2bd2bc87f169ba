"""Flags kept for compatibility say they do nothing; a resumed run records what it used."""

import json
import logging

import pytest
from train_helpers import base_args, make_models_dir, train, write_text_data


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return make_models_dir(tmp_path_factory)


def test_combine_warns_and_resume_keeps_the_runs_model(tmp_path, models_dir, capsys, caplog):
    data = write_text_data(tmp_path / "data.txt", 3000)
    args = base_args(tmp_path, models_dir, data, seq_len=16)
    with caplog.at_level(logging.WARNING, logger="gpt2tf"):
        code, _, err = train(args + ["--steps", 1, "--combine", 1000], capsys)
    assert code == 0, err
    assert "--combine has no effect" in caplog.text
    caplog.clear()
    other = models_dir / "other"
    other.symlink_to(models_dir / "tiny")
    with caplog.at_level(logging.WARNING, logger="gpt2tf"):
        code, _, err = train(args + ["--steps", 1, "--model_name", "other"], capsys)
    assert code == 0, err
    assert "--model_name other is ignored" in caplog.text and "trained from tiny" in caplog.text
    stored = json.loads((tmp_path / "checkpoint" / "run1" / "train_config.json").read_text())
    assert stored["model_name"] == "tiny"


def test_multi_gpu_warns(tmp_path, models_dir, caplog):
    import gpt2tf

    sess = gpt2tf.start_tf_sess()
    with caplog.at_level(logging.WARNING, logger="gpt2tf"):
        gpt2tf.load_gpt2(sess, model_name="tiny", model_dir=str(models_dir), multi_gpu=True)
    assert "multi_gpu has no effect" in caplog.text
    sess.close()
