"""interactive_conditional.py as a user drives it: prompts, streaming, Ctrl-C, Ctrl-D."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tiny import REPO as ROOT


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job


def _start(model_dir, *extra, background=False):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "interactive_conditional.py"), "--models_dir",
         str(model_dir.parent), "--model_name", model_dir.name, "--seed", "1", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        text=True, encoding="utf-8", errors="replace",
        preexec_fn=_ignore_sigint if background else None,
    )


def test_prompt_loop_and_ctrl_d(tiny_model_dir):
    proc = _start(tiny_model_dir, "--length", "5", "--nsamples", "2")
    out, err = proc.communicate("\nHello\n", timeout=120)
    assert proc.returncode == 0, err
    assert out.count("Model prompt >>> ") == 3  # empty prompt asks again; EOF ends the loop
    assert "Prompt should not be empty!" in out
    assert "SAMPLE 1" in out and "SAMPLE 2" in out
    assert "Traceback" not in err


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "sigint-ignored"])
def test_ctrl_c_stops_generation_and_returns_to_prompt(tiny_model_dir, background):
    # Whether started from a terminal or as a background job (SIGINT ignored), Ctrl-C works.
    proc = _start(tiny_model_dir, "--length", "100000", "--stop_at_eot=False",
                  background=background)
    proc.stdin.write("Hi\n")
    proc.stdin.flush()
    # Wait until text streams (the banner, then tokens), then press Ctrl-C.
    deadline = time.time() + 120
    seen = ""
    while "SAMPLE 1" not in seen and time.time() < deadline:
        seen += proc.stdout.read(1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("", timeout=60)
    assert proc.returncode == 0, err
    assert "[stopped]" in out
    assert (seen + out).count("Model prompt >>> ") == 2  # back at the prompt, then Ctrl-D


def test_ctrl_c_at_the_prompt_says_how_to_quit(tiny_model_dir):
    proc = _start(tiny_model_dir, background=True)
    seen = ""
    deadline = time.time() + 120
    while "Model prompt >>> " not in seen and time.time() < deadline:
        seen += proc.stdout.read(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("", timeout=60)
    assert proc.returncode == 0, err
    assert "(Ctrl-D quits)" in out and out.count("Model prompt >>> ") == 1
