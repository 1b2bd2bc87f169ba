"""`gpt2tf eval` against transformers' sliding-window perplexity on the converted checkpoint."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from shared_data import reference

from gpt2tf import encoder, score
from gpt2tf.decode.generator import Generator
from gpt2tf.errors import FieldError
from tiny import REPO, TINY, hf_twin, random_model_dir

torch = reference("torch")
transformers = reference("transformers")

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
        " the slings and arrows of outrageous fortune, or to take arms against a sea of"
        " troubles, and by opposing end them. To die: to sleep; no more; ") * 2  # 400+ tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("score") / "model", seed=5)


@pytest.fixture(scope="module")
def hf_model(model_dir, tmp_path_factory):
    return hf_twin(model_dir, tmp_path_factory.mktemp("hf") / "out")


def hf_sliding_window(hf_model, ids, max_length, stride):
    """The loop of transformers' perplexity guide, counting exactly the labels the loss used."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        n = int((target[:, 1:] != -100).sum())  # the model shifts labels: position 0 drops
        if n:
            with torch.no_grad():
                loss = hf_model(input_ids, labels=target).loss.double().item()
            nll, count = nll + loss * n, count + n
        prev_end = end
        if end == len(ids):
            break
    return nll / count, count


@pytest.mark.parametrize("stride", [16, 37, TINY.n_ctx])
def test_eval_equals_transformers_sliding_window(model_dir, hf_model, stride):
    with Generator(model_dir, engine="graph", threads=1) as gen:
        ids = np.array(gen.encoder.encode(TEXT))
        assert len(ids) > 5 * TINY.n_ctx
        got = score.evaluate(gen.target_logprobs, [ids], n_ctx=TINY.n_ctx, stride=stride,
                             batch_size=3, n_bytes=1)
    want, count = hf_sliding_window(hf_model, ids.tolist(), TINY.n_ctx, stride)
    assert got["tokens"] == count
    if stride < TINY.n_ctx:
        assert count == len(ids) - 1  # every token after the first, once
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


def test_windows_score_each_token_once():
    for n, n_ctx, stride in [(10, 4, 1), (10, 4, 3), (100, 16, 5), (3, 8, 4), (2, 2, 2)]:
        scored = [t for w in score.windows(n, n_ctx, stride) for t in range(w.first, w.end)]
        assert scored == list(range(1, n)) or stride == n_ctx
        for w in score.windows(n, n_ctx, stride):
            assert w.end - w.begin <= n_ctx and w.begin < w.first <= w.end
    with pytest.raises(FieldError, match="stride"):
        score.windows(10, 4, 5)


def _eval(args, cwd):
    return subprocess.run(
        [sys.executable, "-c", "import sys; from gpt2tf.cli import main; sys.exit(main())",
         "eval", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})


def test_cli_prints_one_json_line(model_dir, hf_model, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    proc = _eval([str(model_dir), "--dataset", str(data), "--stride", "32",
                  "--batch_size", "4"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    got = json.loads(line)
    ids = encoder.Encoder.from_bytes(*encoder.byte_level_vocab(), source="v").encode(TEXT)
    want, count = hf_sliding_window(hf_model, ids, TINY.n_ctx, 32)
    assert got["tokens"] == count == len(ids) - 1
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    # bits per byte: all the nats over the scored bytes (one byte per token here)
    assert got["bits_per_byte"] == pytest.approx(want * count / math.log(2) / count, rel=1e-5)


@pytest.mark.parametrize("args, needle", [
    (["--stride", "0"], "--stride must be an integer >= 1, got 0"),
    (["--stride", "65"], "--stride must be 1..n_ctx=64, got 65"),
    (["--precision", "fp16"], "--precision must be one of fp32, bf16, int8"),
])
def test_cli_bad_values(model_dir, tmp_path, args, needle):
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    proc = _eval([str(model_dir), "--dataset", str(data), *args], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr


def test_cli_text_too_short(model_dir, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("a")
    proc = _eval([str(model_dir), "--dataset", str(data)], tmp_path)
    assert proc.returncode == 1 and "at least 2 tokens" in proc.stderr, proc.stderr


def test_prompt_logprobs_equal_log_softmax_of_transformers(model_dir, hf_model):
    ids = encoder.Encoder.from_bytes(*encoder.byte_level_vocab(), source="v").encode(TEXT[:50])
    with Generator(model_dir, threads=1) as gen:
        got, top_ids, top_lp = gen.prompt_logprobs(ids, top=5)
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    want = logp[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(got, want, atol=1e-4)
    order = np.argsort(-logp[:-1], axis=-1, kind="stable")[:, :5]
    assert (top_ids == order).mean() > 0.99  # near-ties may swap between two frameworks
    np.testing.assert_allclose(top_lp, np.take_along_axis(logp[:-1], top_ids, -1), atol=1e-4)


def test_int8_scores_on_the_fast_path_close_to_fp32(model_dir):
    """int8 weights live only in the fast path's model: scored there, a step per position; the
    same stepping in fp32 equals the TF graph's scores."""
    ids = encoder.Encoder.from_bytes(*encoder.byte_level_vocab(), source="v").encode(TEXT[:150])
    run = dict(n_ctx=TINY.n_ctx, stride=32, batch_size=2, n_bytes=1)
    with Generator(model_dir, engine="graph", threads=1) as gen:
        graph = score.evaluate(gen.target_logprobs, [np.array(ids)], **run)
    with Generator(model_dir, threads=1) as fast32:
        stepped = score.evaluate(fast32._stepped_logprobs, [np.array(ids)], **run)
    with Generator(model_dir, precision="int8", threads=1) as gen8:
        assert gen8.engine_name == "fast"
        int8 = score.evaluate(gen8.target_logprobs, [np.array(ids)], **run)
    assert stepped["loss"] == pytest.approx(graph["loss"], rel=1e-5)
    assert int8["loss"] != graph["loss"] and int8["loss"] == pytest.approx(graph["loss"], rel=0.05)
