"""Our GPT-2 graph against HuggingFace's: the same weights must give the same numbers.

A tiny random model is converted with `convert.to_hf` and loaded in transformers'
GPT2LMHeadModel. Then: full-forward logits agree, greedy decoding agrees token for token with
`generate`, our key/value-cache decoding agrees with repeated full forward passes, and rows of
different prompt lengths in one left-padded batch decode as they would alone.

The weights are random everywhere, biases and gains included: GPT-2's initialisation (zero
biases, unit gains) would hide a bias or gain that is misplaced, in either implementation.
"""

import numpy as np
import pytest
from shared_data import reference

torch = reference("torch")
transformers = reference("transformers")

from tiny import TINY, hf_twin, random_model_dir  # noqa: E402
from gpt2tf.decode.engine import SamplingParams
from gpt2tf.decode.generator import Generator  # noqa: E402

ATOL = 1e-4  # float32 through two frameworks' kernels; real bugs are orders of magnitude larger
GREEDY = SamplingParams(top_k=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.fixture(scope="module")
def hf_model(model_dir, tmp_path_factory):
    return hf_twin(model_dir, tmp_path_factory.mktemp("hf") / "out")


@pytest.fixture(scope="module")
def gen(model_dir):
    with Generator(model_dir, threads=1) as g:
        yield g


def hf_logits(hf_model, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def hf_greedy(hf_model, context: list[int], length: int) -> list[int]:
    ids = torch.tensor([context], dtype=torch.long)
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=length,
            min_new_tokens=length, pad_token_id=256,
        )
    return out[0, len(context):].tolist()


def greedy_without_cache(gen: Generator, context: list[int], length: int) -> list[int]:
    """Greedy decoding by a full forward pass over the whole sequence at every step."""
    seq = list(context)
    for _ in range(length):
        seq.append(int(np.argmax(gen.logits([seq])[0, -1])))
    return seq[len(context):]


def stream_greedy(gen: Generator, contexts: list[list[int]], length: int) -> np.ndarray:
    """[B, length] greedy tokens from the cached decoder, all rows in one batch."""
    rngs = [np.random.default_rng(i) for i in range(len(contexts))]
    steps = list(gen.stream(contexts, length=length, params=GREEDY, rngs=rngs))
    return np.stack(steps, axis=1)


def test_logits_match_hf(gen, hf_model):
    rng = np.random.default_rng(0)
    for shape in ([3, 17], [2, TINY.n_ctx]):  # the full window exercises every position row
        tokens = rng.integers(0, TINY.n_vocab, size=shape)
        ours = gen.logits(tokens)
        theirs = hf_logits(hf_model, tokens)
        assert ours.shape == theirs.shape == (*shape, TINY.n_vocab)
        assert np.abs(ours - theirs).max() < ATOL
        # The logits are not trivially small: an ATOL match means something.
        assert np.abs(theirs).std() > 0.5


def test_greedy_matches_hf_generate(gen, hf_model):
    rng = np.random.default_rng(1)
    for n in (1, 7):
        context = rng.integers(0, TINY.n_vocab, size=n).tolist()
        ours = gen.generate_tokens(
            context, length=20, params=GREEDY, seed=0, stop_at_eot=False
        )[0]
        assert ours == hf_greedy(hf_model, context, 20)


def test_cached_decoding_matches_full_forward(gen):
    rng = np.random.default_rng(2)
    context = rng.integers(0, TINY.n_vocab, size=8).tolist()
    length = TINY.n_ctx - len(context)  # fill the window to its last position, without sliding
    cached = stream_greedy(gen, [context], length)[0].tolist()
    assert cached == greedy_without_cache(gen, context, length)
    assert len(set(cached)) > 3  # a degenerate model (one token repeated) would prove little


def test_left_padded_rows_decode_as_alone(gen):
    rng = np.random.default_rng(3)
    contexts = [rng.integers(0, TINY.n_vocab, size=n).tolist() for n in (3, 14, 1, 9)]
    together = stream_greedy(gen, contexts, 15)
    for row, context in zip(together, contexts):
        assert row.tolist() == stream_greedy(gen, [context], 15)[0].tolist()
