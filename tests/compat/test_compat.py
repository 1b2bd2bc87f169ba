"""gpt-2-simple's Python API: a gpt-2-simple script runs with `import gpt2tf as gpt2`."""

import gpt2tf as gpt2
from gpt2tf import checkpoints
from tiny import TINY


def test_gpt2_simple_script_runs_unchanged(tiny_model_dir, tmp_path):
    model_dir, model_name = str(tiny_model_dir.parent), tiny_model_dir.name
    sess = gpt2.start_tf_sess()
    gpt2.load_gpt2(sess, model_name=model_name, model_dir=model_dir)
    first = gpt2.generate(sess, model_name=model_name, model_dir=model_dir, length=10,
                          prefix="The", seed=3, nsamples=3, batch_size=2, return_as_list=True)
    again = gpt2.generate(sess, model_name=model_name, model_dir=model_dir, length=10,
                          prefix="The", seed=3, nsamples=3, batch_size=2, return_as_list=True)
    assert len(first) == 3 and first == again and all(t.startswith("The") for t in first)
    dest = tmp_path / "gen.txt"
    gpt2.generate_to_file(sess, model_name=model_name, model_dir=model_dir, length=5,
                          destination_path=str(dest), seed=1, nsamples=2)
    assert dest.read_text(encoding="utf-8").count("=" * 20) == 2

    # A second model loads without restarting anything (gpt-2-simple needed reset_session).
    other = tmp_path / "models" / "other"
    other.parent.mkdir()
    checkpoints.init_model_dir(other, TINY, seed=9)
    gpt2.load_gpt2(sess, model_name="other", model_dir=str(other.parent))
    third = gpt2.generate(sess, length=10, prefix="The", seed=3, nsamples=1, return_as_list=True)
    assert third[0] != first[0]
    sess = gpt2.reset_session(sess)
    assert sess.current is None


def test_generate_prints_like_gpt2_simple(tiny_model_dir, capsys):
    sess = gpt2.start_tf_sess()
    gpt2.generate(sess, model_name=tiny_model_dir.name, model_dir=str(tiny_model_dir.parent),
                  length=5, seed=1, nsamples=2, prefix="x")
    out = capsys.readouterr().out
    assert out.count("=" * 20 + "\n") == 2


def test_python_api_and_convert_print_no_tensorflow_chatter(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    from tiny import REPO

    env = {k: v for k, v in os.environ.items() if k not in ("GPT2TF_TF_LOGS",
                                                              "TF_CPP_MIN_LOG_LEVEL")}
    env["PYTHONPATH"] = str(REPO / "src")
    code = ("import gpt2tf as gpt2; s = gpt2.start_tf_sess();"
            f" gpt2.load_gpt2(s, model_name={tiny_model_dir.name!r},"
            f" model_dir={str(tiny_model_dir.parent)!r});"
            " print(len(gpt2.generate(s, length=3, seed=1, return_as_list=True)))")
    api = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert api.returncode == 0 and api.stdout == "1\n" and api.stderr == "", api.stderr
    convert = subprocess.run(
        [sys.executable, "-c", "import sys; from gpt2tf.cli import main; sys.exit(main())",
         "convert", "to-hf", str(tiny_model_dir), str(tmp_path / "hf")],
        capture_output=True, text=True, env=env, timeout=120)
    assert convert.returncode == 0, convert.stderr
    assert convert.stderr.splitlines() == [f"wrote HuggingFace GPT-2 directory {tmp_path / 'hf'}"]
