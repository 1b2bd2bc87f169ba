"""Steering generation: transformers' logits processors and OpenAI's penalties, against the
libraries that define them.

Greedy tokens must equal transformers' `generate` with the same setting on the converted
checkpoint (min_length is transformers' min_new_tokens, logit_bias its sequence_bias over single
tokens). OpenAI's presence and frequency penalties have no reference library: they are checked
against their formula. The penalties also work with sampling, and beside rows that do not use
them in one batch.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from shared_data import reference

from gpt2tf.decode import pick as picking
from gpt2tf.decode.engine import SamplingParams
from gpt2tf.decode.generator import Generator, generate_texts
from gpt2tf.errors import FieldError
from tiny import REPO, hf_twin, random_model_dir

torch = reference("torch")
transformers = reference("transformers")

EOT = 256
LENGTH = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("steer") / "model", seed=4)


@pytest.fixture(scope="module")
def hf_model(model_dir, tmp_path_factory):
    return hf_twin(model_dir, tmp_path_factory.mktemp("hf") / "out")


@pytest.fixture(scope="module")
def gen(model_dir):
    with Generator(model_dir, threads=1) as g:
        yield g


def hf_greedy(hf_model, context, length=LENGTH, *, stop=False, **kw):
    ids = torch.tensor([context], dtype=torch.long)
    if not stop:  # run the whole length even past <|endoftext|>, as stop_at_eot=False does
        kw.setdefault("eos_token_id", None)
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=length, pad_token_id=EOT, **kw)
    tokens = out[0, len(context):].tolist()
    return tokens[:tokens.index(EOT)] if stop and EOT in tokens else tokens


def ours_greedy(gen, context, length=LENGTH, *, stop=False, **steering):
    params = SamplingParams(top_k=1, **steering)
    return gen.generate_tokens(context, length=length, params=params, seed=0,
                               stop_at_eot=stop)[0]


CONTEXT = [72, 101, 108, 108, 111, 32, 104, 101, 108, 108]  # "Hello hell"


def test_plain_greedy_repeats_so_the_steering_has_something_to_change(gen, hf_model):
    plain = ours_greedy(gen, CONTEXT)
    assert plain == hf_greedy(hf_model, CONTEXT)
    assert len(set(plain)) < len(plain)  # it repeats tokens (random weights loop quickly)


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_equals_transformers(gen, hf_model, penalty):
    ours = ours_greedy(gen, CONTEXT, repetition_penalty=penalty)
    assert ours == hf_greedy(hf_model, CONTEXT, repetition_penalty=penalty)
    assert ours != ours_greedy(gen, CONTEXT)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size_equals_transformers(gen, hf_model, n):
    ours = ours_greedy(gen, CONTEXT, no_repeat_ngram_size=n)
    assert ours == hf_greedy(hf_model, CONTEXT, no_repeat_ngram_size=n)
    assert not _repeats(CONTEXT + ours, n, len(CONTEXT))


def _repeats(seq, n, start):
    """Whether a token from `start` on completes an n-gram that occurred before it."""
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return any(grams[i] in grams[:i] for i in range(max(start - n + 1, 0), len(grams)))


def test_bad_words_equal_transformers(gen, hf_model):
    enc = gen.encoder
    # Random weights favour bytes that are no text alone: a bias towards letters (the same in
    # both) makes greedy write words that can be banned.
    letters = {enc.encode(c)[0]: 4.0 for c in "abcdefghijklmnopqrstuvwxyz "}
    plain = ours_greedy(gen, CONTEXT, logit_bias=letters)
    assert plain == hf_greedy(hf_model, CONTEXT, sequence_bias={(t,): b for t, b in
                                                                letters.items()})

    def is_text(ids):
        return enc.encode(enc.decode(ids)) == ids

    # ban a letter greedy writes, and a pair it makes later
    i = next(i for i, t in enumerate(plain) if is_text([t]))
    one = [plain[i]]
    two = next(plain[j:j + 2] for j in range(i + 1, len(plain) - 1)
               if one[0] not in plain[j:j + 2] and is_text(plain[j:j + 2]))
    words = [enc.decode(one), enc.decode(two)]
    assert [enc.encode(w) for w in words] == [one, two]
    ours = ours_greedy(gen, CONTEXT, logit_bias=letters, bad_words=words)
    assert ours == hf_greedy(hf_model, CONTEXT, bad_words_ids=[one, two],
                             sequence_bias={(t,): b for t, b in letters.items()})
    assert one[0] not in ours
    assert all(ours[i:i + 2] != two for i in range(len(ours) - 1))
    assert ours != plain


def test_min_length_and_logit_bias_equal_transformers(gen, hf_model):
    bias = {EOT: 6.0}  # makes <|endoftext|> the greedy pick early
    stopped = ours_greedy(gen, CONTEXT, stop=True, logit_bias=bias)
    assert stopped == hf_greedy(hf_model, CONTEXT, stop=True, sequence_bias={(EOT,): 6.0})
    assert len(stopped) < 5
    held = ours_greedy(gen, CONTEXT, stop=True, logit_bias=bias, min_length=9)
    assert held == hf_greedy(hf_model, CONTEXT, stop=True, sequence_bias={(EOT,): 6.0},
                             min_new_tokens=9)
    assert len(held) >= 9
    banned = ours_greedy(gen, CONTEXT, logit_bias={str(held[0]): -100})  # keys as JSON has them
    assert held[0] not in banned


def test_presence_and_frequency_penalties_follow_openais_formula():
    logits = np.linspace(-1, 1, 8)
    state = picking.RowState(seen=[5, 3, 3, 7, 3], n_prompt=2)  # generated: 3, 7, 3
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = picking.steer(logits, p, state)
    want = logits.copy()
    want[3] -= 2 * 0.25 + 0.5
    want[7] -= 1 * 0.25 + 0.5
    np.testing.assert_allclose(got, want)  # token 5 is only in the prompt: untouched


def test_penalties_with_sampling_and_beside_rows_without_them(gen):
    rng_rows = [np.random.default_rng(i) for i in range(3)]
    steered = SamplingParams(temperature=0.8, repetition_penalty=1.5, no_repeat_ngram_size=2,
                             presence_penalty=1.0)
    plain = SamplingParams(temperature=0.8)
    params = [plain, steered, plain]
    together = np.stack(list(gen.stream([CONTEXT] * 3, length=LENGTH, params=params,
                                        rngs=rng_rows)), axis=1)
    for r, p in enumerate(params):
        alone = np.stack(list(gen.stream([CONTEXT], length=LENGTH, params=[p],
                                         rngs=[np.random.default_rng(r)])), axis=1)[0]
        assert together[r].tolist() == alone.tolist()
    assert not _repeats(CONTEXT + together[1].tolist(), 2, len(CONTEXT))  # sampling obeys it


def test_many_prompts_in_prompt_order(gen):
    prompts = ["ab", "Hello", "x"]
    texts = generate_texts(gen, prefix=prompts, nsamples=2, batch_size=4, length=6, seed=3,
                           stop_at_eot=False)
    assert len(texts) == 6
    for i, t in enumerate(texts):
        assert t.startswith(prompts[i // 2])
    # sample i depends on (seed, i), not on which prompts shared its batch
    alone = generate_texts(gen, prefix="Hello", nsamples=2, length=6, seed=3, stop_at_eot=False)
    one_by_one = generate_texts(gen, prefix=prompts, nsamples=2, batch_size=1, length=6, seed=3,
                                stop_at_eot=False)
    assert one_by_one == texts
    assert alone[0] == generate_texts(gen, prefix="Hello", nsamples=1, length=6, seed=3,
                                      stop_at_eot=False)[0]


@pytest.mark.parametrize("kw, field", [
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": "x"}, "repetition_penalty"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"bad_words": [3]}, "bad_words"),
    ({"bad_words": [""]}, "bad_words"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"logit_bias": {"3": 101}}, "logit_bias"),
])
def test_bad_values_name_their_field(kw, field):
    with pytest.raises(FieldError) as e:
        SamplingParams(**kw)
    assert e.value.field == field


def test_logit_bias_outside_the_vocabulary(gen):
    with pytest.raises(FieldError, match="outside the vocabulary"):
        ours_greedy(gen, CONTEXT, logit_bias={"999": 1})


def _cli(args, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "generate_unconditional.py"), *args], cwd=cwd,
        capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO / "src"),
                                                          "PATH": "/usr/bin:/bin"})


def test_cli_steering_and_prefix_file(model_dir, tmp_path, gen):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"q": "Hello"}) + "\n\n" + json.dumps({"q": "ab"}) + "\n")
    out = tmp_path / "out.txt"
    proc = _cli(["--models_dir", str(model_dir.parent), "--model_name", model_dir.name,
                 "--prefix_file", str(prompts), "--field", "q", "--top_k", "1", "--length", "8",
                 "--nostop_at_eot", "--repetition_penalty", "1.3", "--bad_words", "l|lo",
                 "--destination_path", str(out), "--sample_delim", "|\n"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    texts = [t[:-1] for t in out.read_text().split("|\n")[:-1]]  # each: text, newline, delim
    want = generate_texts(gen, prefix=["Hello", "ab"], top_k=1, length=8, stop_at_eot=False,
                          repetition_penalty=1.3, bad_words=["l", "lo"])
    assert texts == want


@pytest.mark.parametrize("args, needle", [
    (["--repetition_penalty", "abc"], "--repetition_penalty must be a number, got 'abc'"),
    (["--logit_bias", "[1]"], "--logit_bias must be a JSON object"),
    (["--bad_words", "[1, 2]"], "--bad_words entries must be non-empty texts"),
    (["--prefix_file", "missing.txt"], "cannot read the prompts file missing.txt"),
    (["--prefix", "a", "--prefix_file", "x.txt"], "--prefix_file and --prefix cannot both"),
])
def test_cli_bad_steering_is_one_line(model_dir, tmp_path, args, needle):
    proc = _cli(["--models_dir", str(model_dir.parent), "--model_name", model_dir.name,
                 *args], tmp_path)
    assert proc.returncode in (1, 2), proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
