"""model.py against a NumPy reference forward pass written from GPT-2's definition.

No torch needed: random weights (biases and gains too, so a misplaced one shows), the full
causal forward pass in float64 NumPy, compared with the TF graph's logits.
"""

import math

import numpy as np
import pytest

from gpt2tf import checkpoints
from gpt2tf.hparams import HParams

HP = HParams(n_vocab=97, n_ctx=16, n_embd=24, n_head=3, n_layer=2)


def _layer_norm(x, g, b, eps=1e-5):
    u = x.mean(-1, keepdims=True)
    s = ((x - u) ** 2).mean(-1, keepdims=True)
    return (x - u) / np.sqrt(s + eps) * g + b


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(w: dict, hp: HParams, tokens: np.ndarray) -> np.ndarray:
    """[B, T] ids -> [B, T, V] logits, GPT-2 as published (pre-norm blocks, tied LM head)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    b, t = tokens.shape
    h = w["model/wte"][tokens] + w["model/wpe"][:t]  # [B, T, C]
    mask = np.tril(np.ones((t, t), bool))
    d = hp.n_embd // hp.n_head
    for i in range(hp.n_layer):
        p = f"model/h{i}/"
        x = _layer_norm(h, w[p + "ln_1/g"], w[p + "ln_1/b"])
        qkv = x @ w[p + "attn/c_attn/w"][0] + w[p + "attn/c_attn/b"]  # [B, T, 3C]
        q, k, v = np.split(qkv, 3, axis=-1)
        heads = lambda a: a.reshape(b, t, hp.n_head, d).transpose(0, 2, 1, 3)  # [B, H, T, D]
        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)  # [B, H, T, T]
        scores = np.where(mask, scores, -1e10)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        att = (scores / scores.sum(-1, keepdims=True)) @ v  # [B, H, T, D]
        att = att.transpose(0, 2, 1, 3).reshape(b, t, hp.n_embd)
        h = h + att @ w[p + "attn/c_proj/w"][0] + w[p + "attn/c_proj/b"]
        x = _layer_norm(h, w[p + "ln_2/g"], w[p + "ln_2/b"])
        m = _gelu(x @ w[p + "mlp/c_fc/w"][0] + w[p + "mlp/c_fc/b"])
        h = h + m @ w[p + "mlp/c_proj/w"][0] + w[p + "mlp/c_proj/b"]
    h = _layer_norm(h, w["model/ln_f/g"], w["model/ln_f/b"])
    return h @ w["model/wte"].T


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    shapes = {k: v.shape for k, v in checkpoints.init_weights(HP, seed=0).items()}
    return {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()}


def test_graph_equals_numpy_reference(weights):
    import tensorflow as tf

    from gpt2tf import model

    tokens = np.random.default_rng(1).integers(0, HP.n_vocab, (2, HP.n_ctx)).astype(np.int32)
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.int32, [None, None])
        logits = model.model(HP, x)["logits"]
        assign = [v.assign(weights[v.name.split(":")[0]]) for v in model.model_variables()]
    with tf.compat.v1.Session(graph=g) as s:
        s.run(assign)
        ours = s.run(logits, {x: tokens})
    ref = reference_logits(weights, HP, tokens)
    assert np.abs(ref).max() > 1  # the weights are big enough for errors to show
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_reference_is_causal(weights):
    tokens = np.arange(10)[None] % HP.n_vocab
    changed = tokens.copy()
    changed[0, 7] = 5
    a, b = reference_logits(weights, HP, tokens), reference_logits(weights, HP, changed)
    np.testing.assert_array_equal(a[0, :7], b[0, :7])
    assert not np.allclose(a[0, 7:], b[0, 7:])
