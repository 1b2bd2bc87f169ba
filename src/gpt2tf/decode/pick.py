"""Choosing the next token from logits on the host: temperature, top-k, top-p, inverse CDF.

One sampler for every backend (the TF graph and the converted fast path both hand back
logits). Randomness comes from the caller as one uniform number per row, drawn from that
sample's own seeded stream, so a sample depends on its seed and index only.

The rules (gpt-2-simple's, with per-row settings): logits are divided by the temperature;
top_k > 0 keeps the k most likely tokens; 0 < top_p < 1 then keeps the smallest run of most
likely tokens whose mass reaches p (at least one); the pick is the first token, in order of
decreasing probability for a filtered row (by id for an unfiltered one), whose cumulative mass
exceeds u times the total. Ties in probability are broken by the lower token id.

Steering comes first, on the model's logits, where a row asks for it (`steer`): transformers'
repetition penalty, no-repeat n-grams, bad words and minimum length, and OpenAI's presence and
frequency penalties and logit bias, each with its library's semantics. It needs the row's
tokens so far (`RowState`), which the decode loop keeps.
"""

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class RowState:
    """A row's tokens so far (its whole prompt, then what it generated) for its steering.

    `bad_words` are token sequences never to produce; `eot` is the token min_length holds back.
    """

    seen: list[int]
    n_prompt: int
    bad_words: tuple[tuple[int, ...], ...] = ()
    eot: int | None = None
    # no_repeat_ngram_size's index, (n-1)-gram -> tokens that followed it, built as tokens come
    _followers: dict = field(default_factory=dict, repr=False)
    _indexed: int = field(default=0, repr=False)  # n-grams of `seen` in the index

    @property
    def n_new(self) -> int:
        return len(self.seen) - self.n_prompt


def pick(logits: np.ndarray, params: Sequence, uniform: np.ndarray,
         states: Sequence[RowState] | None = None) -> np.ndarray:
    """logits [B, V] float32, one SamplingParams and one uniform in [0, 1) per row -> [B] int32.

    `states` (one per row) is needed by the rows whose params steer."""
    out = np.empty(len(params), np.int32)
    for b, (row, p, u) in enumerate(zip(logits, params, uniform)):
        row = np.asarray(row, np.float64)
        if p.steers:
            row = steer(row, p, states[b])
        out[b] = _pick_row(row, p, float(u))
    return out


def steer(logits: np.ndarray, p, state: RowState) -> np.ndarray:
    """logits [V] after the row's penalties, biases and bans (a new float64 array)."""
    x = np.array(logits, np.float64)
    seen = state.seen
    # transformers' order: biases, then the repetition penalty, then bans
    for token, bias in p.logit_bias:
        x[token] += bias
    if p.repetition_penalty != 1 and seen:
        ids = np.unique(np.asarray(seen))
        v = x[ids]
        x[ids] = np.where(v < 0, v * p.repetition_penalty, v / p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and state.n_new:
        ids, counts = np.unique(np.asarray(seen[state.n_prompt:]), return_counts=True)
        x[ids] -= counts * p.frequency_penalty + p.presence_penalty
    banned = []
    n = p.no_repeat_ngram_size
    if n and len(seen) + 1 >= n:
        banned += _repeating(state, n)
    for words in state.bad_words:
        if len(words) == 1 or (len(words) - 1 <= len(seen) and
                               tuple(seen[len(seen) - len(words) + 1:]) == words[:-1]):
            banned.append(words[-1])
    if state.eot is not None and state.n_new < p.min_length:
        banned.append(state.eot)
    if banned:
        kept = x.copy()
        x[banned] = -np.inf
        if not np.isfinite(x).any():  # every token banned: the bans cannot all hold
            return kept
    return x


def _repeating(state: RowState, n: int) -> list[int]:
    """Tokens that would complete an n-gram the row already has (transformers' rule)."""
    seen, followers = state.seen, state._followers
    for i in range(state._indexed, len(seen) - n + 1):  # each step adds its one new n-gram
        followers.setdefault(tuple(seen[i:i + n - 1]), []).append(seen[i + n - 1])
    state._indexed = max(state._indexed, len(seen) - n + 1)
    return followers.get(tuple(seen[len(seen) - n + 1:]), [])


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


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log-probabilities over the last axis (shifted by the max, so large logits are safe)."""
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


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
