"""The TF graph as a decode backend: the model's own graph over live variables.

It decodes from whatever weights its session holds, so the trainer samples from the weights it
is training, and it serves any precision the graph has (bf16 matmuls) where the fast path has
none. Two sets of nodes over the same weights and the preallocated cache (gpt2tf.kv_cache):
the prompt (any length; rows left-padded) and one new token (static T=1, which lets attention
skip transposing the cache). Both hand logits back to the engine, which samples on the host.
"""

import numpy as np
import tensorflow as tf

from gpt2tf import model
from gpt2tf.hparams import HParams
from gpt2tf.kv_cache import KVCache

tf1 = tf.compat.v1


class GraphBackend:
    """Decode nodes built into the current graph; `session` (set by the owner) runs them."""

    def __init__(self, hparams: HParams, *, precision: model.Precision = model.FP32,
                 session=None, lora: model.Lora | None = None):
        self.hparams = hparams
        self.session = session
        self._tokens = tf1.placeholder(tf.int32, [None, None], name="tokens")  # [B, T]
        self._step_tokens = tf1.placeholder(tf.int32, [None, 1], name="step_tokens")  # [B, 1]
        self._pos = tf1.placeholder(tf.int32, [], name="pos")
        self._pad = tf1.placeholder(tf.int32, [None], name="pad")  # [B]
        self._rows = tf1.placeholder(tf.int32, [], name="rows")
        self._cache = KVCache(hparams, self._pos)
        self._reset = self._cache.reset_op(self._rows)
        self._logits = {
            name: model.model(hparams, tokens, cache=self._cache, pos=self._pos, pad=self._pad,
                              last_only=True, precision=precision,
                              lora=lora)["logits"]  # [B, V]
            for name, tokens in (("prefill", self._tokens), ("step", self._step_tokens))
        }
        self._cache_rows = None  # rows the cache is allocated for
        self._pad_rows = None  # [B] left padding of the current batch
        self._next = 0  # the cache slot the next token goes to

    def start(self, contexts: list[list[int]]) -> np.ndarray:
        rows = len(contexts)
        if self._cache_rows != rows:
            self.session.run(self._reset, {self._rows: rows})
            self._cache_rows = rows
        width = max(len(c) for c in contexts)
        pad = np.array([width - len(c) for c in contexts], np.int32)
        tokens = np.zeros([rows, width], np.int32)  # [B, T], each row right-aligned
        for i, c in enumerate(contexts):
            tokens[i, pad[i]:] = c
        self._pad_rows, self._next = pad, width
        return self.session.run(self._logits["prefill"],
                                {self._tokens: tokens, self._pos: 0, self._pad: pad})

    def step(self, tokens: np.ndarray) -> np.ndarray:
        logits = self.session.run(self._logits["step"], {
            self._step_tokens: np.asarray(tokens, np.int32)[:, None], self._pos: self._next,
            self._pad: self._pad_rows})
        self._next += 1
        return logits
