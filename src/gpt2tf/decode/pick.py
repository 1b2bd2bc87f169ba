"""Choosing the next token from logits on the host: temperature, top-k, top-p, inverse CDF.

One sampler for every backend (the TF graph and the converted fast path both hand back
logits). Randomness comes from the caller as one uniform number per row, drawn from that
sample's own seeded stream, so a sample depends on its seed and index only.

The rules (gpt-2-simple's, with per-row settings): logits are divided by the temperature;
top_k > 0 keeps the k most likely tokens; 0 < top_p < 1 then keeps the smallest run of most
likely tokens whose mass reaches p (at least one); the pick is the first token, in order of
decreasing probability for a filtered row (by id for an unfiltered one), whose cumulative mass
exceeds u times the total. Ties in probability are broken by the lower token id.
"""

from typing import Sequence

import numpy as np


def pick(logits: np.ndarray, params: Sequence, uniform: np.ndarray) -> np.ndarray:
    """logits [B, V] float32, one SamplingParams and one uniform in [0, 1) per row -> [B] int32."""
    out = np.empty(len(params), np.int32)
    for b, (row, p, u) in enumerate(zip(logits, params, uniform)):
        out[b] = _pick_row(np.asarray(row, np.float64), p, float(u))
    return out


def _pick_row(logits: np.ndarray, p, u: float) -> int:
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = logits / p.temperature  # [V]
    if np.isnan(scaled).any() or np.isposinf(scaled).any():  # a temperature so small that
        # logits overflow: the limit is greedy (-inf stays a token that is never picked)
        return int(np.argmax(logits))
    if not p.filtered:
        return _inverse_cdf(_softmax(scaled), u)
    k = p.top_k if 0 < p.top_k < scaled.size else scaled.size
    # The k best, most likely first (a stable sort of the negated logits breaks ties by id).
    best = np.argpartition(-scaled, k - 1)[:k] if k < scaled.size else np.arange(scaled.size)
    best = best[np.lexsort((best, -scaled[best]))]  # [k]
    probs = _softmax(scaled[best])  # [k]
    if 0 < p.top_p < 1:
        before = np.cumsum(probs) - probs  # mass of the more likely tokens
        probs = np.where((before < p.top_p) | (np.arange(k) == 0), probs, 0.0)
    return int(best[_inverse_cdf(probs, u)])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The first index whose cumulative mass exceeds u * total; never a zero-probability one."""
    cum = np.cumsum(probs)
    i = int(np.searchsorted(cum, u * cum[-1], side="right"))
    i = min(i, probs.size - 1)
    while probs[i] == 0 and i > 0:  # rounding at the very top end: step back to real mass
        i -= 1
    return i
