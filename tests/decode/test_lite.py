"""The decode steppers against the TF graph: TFLite's (decode/lite.py) and the native one
(decode/native.py), which share one interface, give GPT-2's logits in step and prefill.

Tiny models with random weights of std 0.3 (biases and gains too, so a misplaced one shows).
Every logit a stepper returns is checked against gpt2tf.model's full forward pass
(cache=None) over the same tokens, at the same position. Tests of the interface run on both.
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf
from tiny import tiny

from gpt2tf import checkpoints, model
from gpt2tf.decode import lite, native, stepper
from gpt2tf.errors import UserError

HP = tiny(n_ctx=320)  # room for a 300-token decode; cache lengths 128, 256, 320
EXACT = 1e-4  # max |logit difference| allowed for fp32


def random_weights(hparams, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in checkpoints.init_weights(hparams, seed=seed).items()}
    return {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def weights():
    return random_weights(HP)


@pytest.fixture(scope="module")
def fp32_model(weights) -> bytes:
    return lite.build(weights, HP, precision="fp32")


@pytest.fixture(scope="module")
def int8_model(weights) -> bytes:
    return lite.build(weights, HP, precision="int8")


@pytest.fixture(params=["tflite", "native"])
def make(request, fp32_model, weights):
    """stepper(threads=2): a LiteStep over fp32_model or a NativeStep over the same weights."""
    if request.param == "tflite":
        return lambda threads=2: lite.LiteStep(fp32_model, HP, threads=threads)
    return lambda threads=2: native.NativeStep(weights, HP, threads=threads)


@pytest.fixture(scope="module")
def reference(weights):
    """tokens [T] -> logits [T, V] of gpt2tf.model.model over the whole sequence."""
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.int32, [1, None])  # [1, T]
        logits = model.model(HP, x)["logits"][0]  # [T, V]
        assign = [v.assign(weights[checkpoints.var_name(v)]) for v in model.model_variables()]
    session = tf.compat.v1.Session(graph=g)
    session.run(assign)
    yield lambda tokens: session.run(logits, {x: np.asarray(tokens, np.int32)[None]})
    session.close()


def greedy(step: lite.LiteStep, prompts: list[list[int]], n: int):
    """Prefill row b with prompts[b], then n greedy steps of every row at once.

    Returns each row's tokens and the logits [len(tokens) - 1, V] it was given after each of
    its tokens from the last prompt token on (so index i belongs to position len(prompt)-1+i).
    """
    step.start(len(prompts))
    seqs = [list(p) for p in prompts]
    got = [[step.prefill(b, p)] for b, p in enumerate(prompts)]
    for _ in range(n):
        tokens = np.array([int(np.argmax(g[-1])) for g in got], np.int32)
        positions = np.array([len(s) for s in seqs], np.int32)
        logits = step.step(tokens, positions)  # [B, V]
        for b in range(len(seqs)):
            seqs[b].append(int(tokens[b]))
            got[b].append(logits[b])
    return seqs, [np.stack(g) for g in got]


def max_error(reference, prompt, seq, got) -> float:
    want = reference(seq)[len(prompt) - 1:len(seq)]  # [n + 1, V]
    return float(np.abs(got[:len(want)] - want).max())


def test_chunk_sizes():
    assert lite.chunk_sizes(64) == (32, 64)
    assert lite.chunk_sizes(1024) == (32, 128)
    assert lite.chunk_sizes(32) == (32,)
    assert lite.chunk_sizes(16) == (16,)


def test_a_prompt_in_chunks_of_any_size(make, reference):
    """Chunks of a row's prompt at their positions, beside another row, equal the full forward
    pass (the server prefills long prompts a chunk at a time between decode steps)."""
    step = make()
    step.start(2)
    rng = np.random.default_rng(9)
    prompt = list(rng.integers(0, HP.n_vocab, 170))
    other = list(rng.integers(0, HP.n_vocab, 9))
    step.prefill(1, other)
    want = reference(prompt)
    got = []
    for start, end in [(0, 1), (1, 33), (33, 161), (161, 170)]:  # 1, 32, 128 and 9 tokens
        got.append(step.extend(0, prompt[start:end], start))
        np.testing.assert_allclose(got[-1], want[end - 1], atol=EXACT)
    assert step.cache_len == 256  # it grew past 128 slots on the way
    # both rows decode on from their own caches
    logits = step.step(np.array([3, 4], np.int32), np.array([170, 9], np.int32))
    np.testing.assert_allclose(logits[0], reference(prompt + [3])[-1], atol=EXACT)
    np.testing.assert_allclose(logits[1], reference(other + [4])[-1], atol=EXACT)
    with pytest.raises(ValueError, match="chunk"):
        step.extend(0, [1] * 129, 0)
    assert stepper.cache_lengths(1024) == (128, 256, 512, 1024)
    assert stepper.cache_lengths(320) == (128, 256, 320)
    assert stepper.cache_lengths(64) == (64,)


def test_fp32_300_steps_equal_the_graph(make, reference):
    step = make(threads=1)
    prompt = [5, 200, 17, 99, 3, 42, 256]
    (seq,), (got,) = greedy(step, [prompt], 300)
    want = reference(seq)[len(prompt) - 1:]  # [301, V]: after the prompt and each new token
    assert np.abs(want).max() > 1  # big enough for errors to show
    assert step.cache_len == HP.n_ctx  # it grew 128 -> 256 -> 320 on the way
    np.testing.assert_allclose(got, want, rtol=0, atol=EXACT)


def test_rows_at_their_own_positions(make, reference):
    """Rows 5 and 17 tokens in, through the 128-slot boundary, each equal to its own run."""
    step = make(threads=2)
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, HP.n_vocab, n)) for n in (5, 17)]
    seqs, got = greedy(step, prompts, 120)  # row 1 reaches position 136
    assert step.cache_len == 256
    for prompt, seq, g in zip(prompts, seqs, got):
        assert max_error(reference, prompt, seq, g) < EXACT


def test_copy_row_and_a_new_row_count(make, reference):
    step = make()
    greedy(step, [[1, 2, 3], [4, 5, 6, 7]], 130)  # leaves stale slots in a 256-slot cache
    step.start(3)
    assert (step.rows, step.cache_len) == (3, 128)
    prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1]
    first = step.prefill(0, prompt)
    for dst in (1, 2):
        step.copy_row(0, dst, len(prompt))
    nxt = np.array([10, 20, 30], np.int32)
    logits = step.step(nxt, np.full([3], len(prompt), np.int32))
    np.testing.assert_allclose(first, reference(prompt)[-1], atol=EXACT)
    for b in range(3):
        np.testing.assert_allclose(logits[b], reference(prompt + [nxt[b]])[-1], atol=EXACT)
    step.start(3)  # the same count: no re-plan, rows refilled by prefill
    assert step.cache_len == 128
    step.start(1)
    (seq,), (got,) = greedy(step, [prompt[:4]], 10)
    assert max_error(reference, prompt[:4], seq, got) < EXACT


def test_start_plans_the_cache_for_the_prompts(make, reference):
    """A generation's grown cache is not kept for the next one with the same rows (attention
    would read every slot); start() sizes it for the longest prompt, so prefill never grows it."""
    step = make()
    greedy(step, [[1, 2, 3], [4, 5, 6, 7]], 130)
    assert (step.rows, step.cache_len) == (2, 256)
    step.start(2)
    assert step.cache_len == 128
    step.start(2, 200)
    assert step.cache_len == 256
    prompt = list(np.random.default_rng(5).integers(0, HP.n_vocab, 199))
    np.testing.assert_allclose(step.prefill(0, prompt), reference(prompt)[-1], atol=EXACT)
    assert step.cache_len == 256
    with pytest.raises(ValueError, match="slots"):
        step.start(2, HP.n_ctx + 1)


def test_long_prompt_and_growth_in_prefill(make, reference):
    step = make()
    prompt = list(np.random.default_rng(4).integers(0, HP.n_vocab, 200))  # bucket 320
    (seq,), (got,) = greedy(step, [prompt], 60)  # 200 -> 260: grows 256 -> 320 mid-decode
    assert step.cache_len == 320
    assert max_error(reference, prompt, seq, got) < EXACT


def test_int8_stays_close_to_fp32(fp32_model, int8_model):
    exact, quant = lite.LiteStep(fp32_model, HP), lite.LiteStep(int8_model, HP)
    assert len(int8_model) < len(fp32_model)
    prompt = [11, 22, 33, 44, 55]
    (seq,), (want,) = greedy(exact, [prompt], 64)
    # int8 reads the fp32 run's tokens, so both give logits for the same positions
    got = [quant.prefill(0, prompt)]
    for pos in range(len(prompt), len(seq)):
        got.append(quant.step(np.array([seq[pos]]), np.array([pos]))[0])
    got = np.stack(got)  # [65, V]
    # Measured: the largest difference is 0.7-1.3% of the logits' range (seeds 0-2); top-1
    # agreed on 98-100% of the positions.
    error, spread = np.abs(got - want).max(), want.max() - want.min()
    assert EXACT < error < 0.05 * spread, (error, spread)  # quantized, and close
    agree = np.mean(got.argmax(-1) == want.argmax(-1))
    assert agree >= 0.8, agree


def test_bad_builds(fp32_model, weights):
    with pytest.raises(UserError, match="precision"):
        lite.build(weights, HP, precision="fp16")
    with pytest.raises(ValueError, match="layout"):
        lite.LiteStep(fp32_model, tiny(n_ctx=320, n_layer=3))
    with pytest.raises(UserError, match="n_layer=3"):
        native.NativeStep(weights, tiny(n_ctx=320, n_layer=3))


def test_bad_calls(make):
    step = make()
    step.start(2)
    with pytest.raises(UserError, match="n_ctx"):
        step.prefill(0, [1] * (HP.n_ctx + 1))
    with pytest.raises(UserError, match="token ids"):
        step.prefill(0, [HP.n_vocab])
    with pytest.raises(ValueError, match="row"):
        step.prefill(2, [1])
    with pytest.raises(UserError, match="positions"):
        step.step(np.array([1, 1]), np.array([0, HP.n_ctx]))
    with pytest.raises(ValueError, match="shape"):
        step.step(np.array([1]), np.array([0]))


def test_opens_a_path_quietly(fp32_model, reference, tmp_path):
    path = tmp_path / "decode.tflite"
    path.write_bytes(fp32_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tf.lite's deprecation warning is silenced at the source
        step = lite.LiteStep(path, HP, threads=1)
    np.testing.assert_allclose(step.prefill(0, [7, 8, 9]), reference([7, 8, 9])[-1], atol=EXACT)
    with pytest.raises(ValueError, match="cannot load"):
        lite.LiteStep(tmp_path / "missing.tflite", HP)
