"""Scoring a text: the loss of every token after the first, with as much context as fits.

The sliding-window method of transformers' perplexity guide: windows of n_ctx tokens start
every `stride` tokens, and each scores only the tokens no earlier window scored. With a stride
below n_ctx every token after the first is scored once, each with at least n_ctx - stride
tokens of context (all of them near the start); stride = n_ctx gives disjoint windows, which is
faster and cruder (the first token of each window is then not scored, as in the guide).

`evaluate` takes a function that scores whole windows (Generator.target_logprobs), so it does
no I/O and needs no TensorFlow itself.
"""

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from gpt2tf.errors import FieldError


@dataclass(frozen=True)
class Window:
    begin: int  # the window is tokens[begin:end]
    end: int
    first: int  # it scores tokens[first:end] (each from the logits one position before)


def windows(n_tokens: int, n_ctx: int, stride: int) -> list[Window]:
    """The windows over n_tokens tokens, in order; together they score tokens 1..n_tokens-1
    (less each window's first token when stride = n_ctx)."""
    if not 1 <= stride <= n_ctx:
        raise FieldError("stride", f"must be 1..n_ctx={n_ctx}, got {stride}")
    out, scored_to = [], 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + n_ctx, n_tokens)
        out.append(Window(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n_tokens:
            break
    return out


def evaluate(
    score: Callable[[np.ndarray], np.ndarray],
    chunks: Sequence[np.ndarray],
    *,
    n_ctx: int,
    stride: int,
    batch_size: int,
    n_bytes: int,
) -> dict:
    """Mean loss over every scored token of every chunk (each chunk a separate text).

    score([B, T] ids) -> [B, T-1] log-probabilities of ids[:, 1:] given what precedes them.
    Windows are scored `batch_size` at a time, shorter ones right-padded (a causal model's
    earlier positions never see the padding). n_bytes: the UTF-8 bytes of the scored tokens,
    for bits_per_byte.
    """
    jobs = [(chunk, w) for chunk in chunks for w in windows(len(chunk), n_ctx, stride)]
    total, count = 0.0, 0
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i:i + batch_size]
        width = max(w.end - w.begin for _, w in batch)
        ids = np.zeros([len(batch), width], np.int32)  # [B, T]
        for r, (chunk, w) in enumerate(batch):
            ids[r, :w.end - w.begin] = chunk[w.begin:w.end]
        logp = np.asarray(score(ids), np.float64)  # [B, T-1]: logp[:, j] is of ids[:, j + 1]
        for r, (_, w) in enumerate(batch):
            picked = logp[r, w.first - w.begin - 1:w.end - w.begin - 1]
            total -= picked.sum()
            count += picked.size
    if not count:
        raise FieldError("dataset", "has no token to score: it needs at least 2 tokens")
    loss = total / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": count,
        "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None,
    }


def scored_bytes(encoder, chunks: Sequence[np.ndarray], n_ctx: int, stride: int) -> int:
    """UTF-8 bytes of the tokens `evaluate` scores (bits_per_byte's denominator)."""
    n = 0
    for chunk in chunks:
        for w in windows(len(chunk), n_ctx, stride):
            n += len(encoder.decode_bytes(chunk[w.first:w.end].tolist()))
    return n
