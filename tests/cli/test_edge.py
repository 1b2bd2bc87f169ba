"""The command-line edge: strict flags, plain help, escapes, exit codes, nothing written.

The scripts run as a user runs them (a child process, no terminal): a misspelled flag must be
refused before any work, TensorFlow included, so within a few seconds and with nothing written.
"""

import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2tf import settings
from gpt2tf.cli import commands, flags

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "download_model.py": "download", "encode.py": "encode", "train.py": "train",
    "generate_unconditional.py": "generate", "interactive_conditional.py": "interactive",
    "serve.py": "serve",
}
GPT2TF = [sys.executable, "-c", "import sys; from gpt2tf.cli import main; sys.exit(main())"]
VERBS = [[v] for v in commands.COMMANDS] + [["convert", "to-hf"], ["convert", "from-hf"]]
# A misspelling of a real flag of each command, and the flag it should be taken for.
TYPO = {"download": ("--model_nam", "--model_name"), "encode": ("--encodng", "--encoding"),
        "init": ("--n_layers", "--n_layer"), "train": ("--learning_rte", "--learning_rate"),
        "generate": ("--temprature", "--temperature"),
        "interactive": ("--temprature", "--temperature"), "serve": ("--prot", "--port"), "eval": ("--strid", "--stride"),
        "to-hf": ("--out_dri", "--out_dir"), "from-hf": ("--out_dri", "--out_dir")}


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    env.pop("GPT2TF_TF_LOGS", None)
    return env


def _run(argv, cwd):
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=_env(),
                          stdin=subprocess.DEVNULL, timeout=60)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_refuses_misspelled_flag_before_any_work(script, tmp_path):
    typo, meant = TYPO[SCRIPTS[script]]
    proc, took = _run([sys.executable, str(REPO / script), typo, "1"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown flag " + typo), proc.stderr
    assert f"did you mean {meant}?" in lines[0]
    assert took < 10  # refused before TensorFlow loads
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert proc.stdout == ""


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_gpt2tf_verb_refuses_misspelled_flag(verb, tmp_path):
    typo, meant = TYPO[verb[-1]]
    proc, took = _run([*GPT2TF, *verb, typo, "1"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: unknown flag {typo}; did you mean {meant}?")
    assert proc.stderr.count("\n") == 1 and took < 10
    assert list(tmp_path.iterdir()) == []


def test_unknown_verb_and_stray_argument(tmp_path):
    proc, _ = _run([*GPT2TF, "generat"], tmp_path)
    assert proc.returncode == 2 and "did you mean generate?" in proc.stderr
    proc, _ = _run([sys.executable, str(REPO / "generate_unconditional.py"), "extra"], tmp_path)
    assert proc.returncode == 2 and "unexpected argument 'extra'" in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_plain_and_describes_every_flag(script, tmp_path):
    command = commands.COMMANDS[SCRIPTS[script]]
    for ask in ("--help", "-h"):  # -h is help, never --host
        proc, _ = _run([sys.executable, str(REPO / script), ask], tmp_path)
        assert proc.returncode == 0 and proc.stderr == ""
        out = proc.stdout
        assert out.startswith(f"usage: {script}") and "INFO:" not in out
        for s in command.settings:
            line = next(x for x in out.splitlines() if x.strip().startswith(
                f"--[no]{s.name}" if s.type is bool else f"--{s.name} "))
            assert s.help in line
            if s.default not in (None, "", (), settings.REQUIRED):
                assert "default:" in line


def test_help_shows_real_defaults_of_training():
    text = flags.help_text(commands.COMMANDS["train"], "train.py")
    lr = next(x for x in text.splitlines() if x.strip().startswith("--learning_rate"))
    assert "(default: 2e-05)" in lr and "None" not in text


def test_text_flags_understand_escapes():
    cmd = commands.COMMANDS["generate"]
    values, given = flags.parse(cmd, ["--prefix", r"ROMEO:\nJULIET:", r"--truncate=\n\n",
                                      "--sample_delim", r"\t--\\n"])
    assert values["prefix"] == "ROMEO:\nJULIET:" and values["truncate"] == "\n\n"
    assert values["sample_delim"] == "\t--\\n"
    assert given == {"prefix", "truncate", "sample_delim"}


def test_values_are_read_by_declared_type():
    cmd = commands.COMMANDS["train"]
    values, _ = flags.parse(cmd, ["--run_name", "7", "--noonly_train_transformer_layers",
                                  "--memory_saving_gradients", "--column", "body",
                                  "--learning_rate", "1e-3", "--seed", "None"])
    assert values["run_name"] == "7" and values["learning_rate"] == 1e-3
    assert values["only_train_transformer_layers"] is False
    assert values["memory_saving_gradients"] is True
    assert values["column"] == "body" and values["seed"] is None
    assert flags.parse(cmd, ["--steps", "1", "--steps=2"])[0]["steps"] == 2  # last wins
    with pytest.raises(flags.UsageError, match="--steps needs a value"):
        flags.parse(cmd, ["--steps"])


def test_bad_value_is_one_line_exit_1(tmp_path):
    proc, took = _run([sys.executable, str(REPO / "train.py"), "--dataset", "x.txt",
                       "--optimizer", "adamw"], tmp_path)
    assert proc.returncode == 1 and took < 10
    assert proc.stderr == "error: --optimizer must be one of adam, sgd, adafactor, got 'adamw'\n"
    assert list(tmp_path.iterdir()) == []


def test_url_paths_are_refused(tmp_path):
    # (--checkpoint_dir, --dataset and --models_dir take URLs: tests/train/test_remote.py)
    proc, _ = _run([sys.executable, str(REPO / "train.py"), "--dataset", "x.txt",
                    "--samples_dir", "gs://bucket/x"], tmp_path)
    assert proc.returncode == 1 and "--samples_dir is a URL" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no local folder named gs:


def test_missing_model_hints_the_right_download_or_lists_runs(tmp_path):
    proc, _ = _run([sys.executable, str(REPO / "generate_unconditional.py"), "--model_name",
                    "355M", "--models_dir", str(tmp_path / "models")], tmp_path)
    assert proc.returncode == 1 and "python download_model.py 355M" in proc.stderr
    (tmp_path / "checkpoint" / "shakes").mkdir(parents=True)
    proc, _ = _run([sys.executable, str(REPO / "generate_unconditional.py"), "--run_name",
                    "run9", "--checkpoint_dir", str(tmp_path / "checkpoint")], tmp_path)
    assert proc.returncode == 1 and "runs in" in proc.stderr and "shakes" in proc.stderr
    assert "download_model" not in proc.stderr and proc.stderr.count("\n") == 1


def test_finetune_signature_is_gpt2_simples():
    import gpt2tf

    sig = inspect.signature(gpt2tf.finetune)
    expected = ("sess, dataset, steps=-1, model_name='124M', model_dir='models', combine=50000,"
                " batch_size=1, learning_rate=0.0001, accumulate_gradients=5,"
                " restore_from='latest', run_name='run1', checkpoint_dir='checkpoint',"
                " sample_every=100, sample_length=1023, sample_num=1, multi_gpu=False,"
                " save_every=1000, print_every=1, max_checkpoints=1,"
                " use_memory_saving_gradients=False, only_train_transformer_layers=False,"
                " optimizer='adam', overwrite=False, reuse=False")
    plain = ", ".join(
        p.name if p.default is p.empty else f"{p.name}={p.default!r}"
        for p in sig.parameters.values() if p.kind is not p.KEYWORD_ONLY)
    assert plain == expected
    assert "precision" in sig.parameters and "learning_rate" in (gpt2tf.finetune.__doc__ or "")
    with pytest.raises(TypeError):
        gpt2tf.finetune(None, "x.txt", learning_rte=1e-3)
    gen = inspect.signature(gpt2tf.generate)
    assert gen.parameters["temperature"].default == 0.7
    assert gen.parameters["length"].default == 1023 and gen.parameters["top_k"].default == 0
