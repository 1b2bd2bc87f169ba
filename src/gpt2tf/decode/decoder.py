"""The decode loop over a model's graph: prefill, one position per step, sampling, windows.

`Decoder` builds its nodes once (a one-position decode step over a preallocated key/value
cache, plus the samplers) and reuses them for every call, whatever the prompt, batch size or
sampling settings: they are fed, not baked in. gpt-2-simple rebuilt its graph per call and
slowed down with each one.

The loop runs one `session.run` per new token. That keeps it lean (the weights are read once
per step, the cache is updated in place) and lets the caller stream tokens, stop rows at
<|endoftext|>, slide the window past n_ctx, and stop early on Ctrl-C or a closed connection.
"""

import logging
import secrets
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from gpt2tf import model, sample, settings
from gpt2tf.decode.text import TextStream
from gpt2tf.errors import UserError
from gpt2tf.hparams import HParams
from gpt2tf.kv_cache import KVCache

tf1 = tf.compat.v1
log = logging.getLogger(__name__)


SamplingParams = settings.make_config(
    "SamplingParams", settings.SAMPLING,
    "Validated sampling settings. top_k 0 and top_p 0 (or 1) mean off, as in gpt-2-simple.",
    {"filtered": property(lambda self: self.top_k > 0 or 0 < self.top_p < 1)},
)


def sample_seed(seed: int | None, index: int) -> np.random.Generator:
    """The random stream of sample number `index`: a function of (seed, index) only."""
    return np.random.default_rng([int(seed), index])


def new_seed() -> int:
    return secrets.randbits(62)


class Decoder:
    """The decode-step nodes, built into the current graph over the model's variables.

    Generator uses one; the trainer builds one into its training graph to sample from the
    weights being trained. `session` is passed to each call: the decoder owns no session.
    """

    def __init__(self, hparams: HParams, encoder):
        hp = self.hparams = hparams
        self.encoder = encoder
        self._tokens = tf1.placeholder(tf.int32, [None, None], name="tokens")  # [B, T]
        self._step_tokens = tf1.placeholder(tf.int32, [None, 1], name="step_tokens")  # [B, 1]
        self._pos = tf1.placeholder(tf.int32, [], name="pos")
        self._pad = tf1.placeholder(tf.int32, [None], name="pad")  # [B]
        self._rows = tf1.placeholder(tf.int32, [], name="rows")
        self._cache = KVCache(hp, self._pos)
        self._reset = self._cache.reset_op(self._rows)
        self._temperature = tf1.placeholder(tf.float32, [None], name="temperature")
        self._top_k = tf1.placeholder(tf.int32, [None], name="top_k")
        self._top_p = tf1.placeholder(tf.float32, [None], name="top_p")
        self._k_max = tf1.placeholder(tf.int32, [], name="k_max")
        self._uniform = tf1.placeholder(tf.float32, [None], name="uniform")
        # Two graphs over the same weights and cache: the prompt (any length) and one new
        # token (static T=1, which lets attention skip transposing the cache).
        self._samplers = {}
        for name, tokens in (("prefill", self._tokens), ("step", self._step_tokens)):
            logits = model.model(
                hp, tokens, cache=self._cache, pos=self._pos, pad=self._pad, last_only=True
            )["logits"]  # [B, V]
            self._samplers[name] = (
                sample.sample_plain(logits, temperature=self._temperature, uniform=self._uniform),
                sample.sample_filtered(
                    logits, temperature=self._temperature, top_k=self._top_k,
                    top_p=self._top_p, k_max=self._k_max, uniform=self._uniform,
                ),
            )
        self._cache_rows = {}  # session -> rows the cache is allocated for

    def check_tokens(self, tokens: Sequence[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.hparams.n_vocab]
        if bad:
            raise UserError(f"token ids {bad[:5]} are outside [0, {self.hparams.n_vocab})")

    def _fit_context(self, context: list[int]) -> list[int]:
        limit = self.hparams.n_ctx - 1  # leave room for the first new token
        if len(context) > limit:
            log.warning(
                "prompt has %d tokens, more than the model window allows (n_ctx=%d);"
                " keeping the last %d", len(context), self.hparams.n_ctx, limit,
            )
            context = context[-limit:]
        return context

    def _prefill_feed(self, contexts: list[list[int]]):
        width = max(len(c) for c in contexts)
        pad = np.array([width - len(c) for c in contexts], np.int32)
        tokens = np.zeros([len(contexts), width], np.int32)
        for i, c in enumerate(contexts):
            tokens[i, pad[i]:] = c
        return {self._tokens: tokens, self._pos: 0, self._pad: pad}, pad, width

    def _sampler_feed(self, params: Sequence[SamplingParams]):
        """Which sampler to run (0 plain, 1 filtered) and its feeds: plain unless a row filters."""
        hp = self.hparams
        feed = {self._temperature: np.array([p.temperature for p in params], np.float32)}
        if not any(p.filtered for p in params):
            return 0, feed
        # Top-k needs only the k best; a row with top-p alone needs the full sort.
        full = any(p.top_k == 0 for p in params)
        feed[self._k_max] = hp.n_vocab if full else min(max(p.top_k for p in params), hp.n_vocab)
        feed[self._top_k] = np.array([p.top_k for p in params], np.int32)
        feed[self._top_p] = np.array(
            [p.top_p if 0 < p.top_p < 1 else sample.TOP_P_OFF for p in params], np.float32
        )
        return 1, feed

    def stream(
        self,
        session,
        contexts: Sequence[Sequence[int]],
        *,
        length: int,
        params: Sequence[SamplingParams] | SamplingParams,
        rngs: Sequence[np.random.Generator],
    ) -> Iterator[np.ndarray]:
        """Yield `length` steps of new tokens, [B] int32 each, one row per context.

        Rows may have different prompt lengths (they are left-padded) and their own sampling
        settings and random streams. Past n_ctx the window slides: the last 3/4 of the window
        is re-read as the new context. Closing the iterator stops the work.
        """
        length = settings.LENGTH.check(length)
        rows = len(contexts)
        if rows < 1:
            raise UserError("nothing to generate: no prompts")
        if isinstance(params, SamplingParams):
            params = [params] * rows
        seqs = []
        for c in contexts:
            c = [int(t) for t in c]
            if not c:
                raise UserError("empty prompt: give at least one token")
            self.check_tokens(c)
            seqs.append(self._fit_context(c))
        which, feed = self._sampler_feed(params)
        if self._cache_rows.get(session) != rows:
            session.run(self._reset, {self._rows: rows})
            self._cache_rows[session] = rows

        n_ctx = self.hparams.n_ctx
        keep = n_ctx - n_ctx // 4
        step_feed, pad, pos = self._prefill_feed(seqs)
        fetch = self._samplers["prefill"][which]
        for step in range(length):
            feed[self._uniform] = np.array([r.random() for r in rngs], np.float32)
            new = session.run(fetch, {**feed, **step_feed})
            for s, t in zip(seqs, new):
                s.append(int(t))
            yield new
            if step == length - 1:
                break
            if pos >= n_ctx:  # the window is full: slide it
                seqs = [s[-keep:] for s in seqs]
                step_feed, pad, pos = self._prefill_feed(seqs)
                fetch = self._samplers["prefill"][which]
            else:
                step_feed = {
                    self._step_tokens: new[:, None].astype(np.int32), self._pos: pos,
                    self._pad: pad,
                }
                fetch = self._samplers["step"][which]
                pos += 1

    def encode_prompt(self, prefix: str | None) -> list[int]:
        """A prompt's ids; no prompt means <|endoftext|>, the token GPT-2 starts documents with."""
        if prefix:
            return self.encoder.encode(str(prefix))
        if self.encoder.eot_token is None:
            raise UserError("this vocabulary has no <|endoftext|> token: give a --prefix")
        return [self.encoder.eot_token]

    def iter_samples(
        self,
        session,
        context: Sequence[int],
        *,
        nsamples: int = 1,
        batch_size: int = 1,
        length: int = 1023,
        params: SamplingParams = SamplingParams(),
        seed: int | None = None,
        stop_at_eot: bool = True,
        truncate: str | None = None,
        on_token=None,
    ) -> Iterator[TextStream]:
        """Yield `TextStream`s as batches finish (any nsamples, `batch_size` at a time).

        Sample i uses the random stream sample_seed(seed, i), so it does not depend on the
        batch size. on_token(row, text) streams each row's new text.
        """
        nsamples = settings.NSAMPLES.check(nsamples)
        batch_size = settings.BATCH_SIZE.check(batch_size)
        length = settings.LENGTH.check(length)
        seed = new_seed() if seed is None else int(seed)
        eot = self.encoder.eot_token if stop_at_eot else None
        index = 0
        while index < nsamples:
            rows = min(batch_size, nsamples - index)
            rngs = [sample_seed(seed, index + r) for r in range(rows)]
            batch = [TextStream(self.encoder, truncate=truncate, eot=eot) for _ in range(rows)]
            steps = self.stream(
                session, [list(context)] * rows, length=length, params=params, rngs=rngs
            )
            try:
                for new in steps:
                    for r, t in enumerate(new):
                        piece, _ = batch[r].add(int(t))
                        if piece and on_token is not None:
                            on_token(r, piece)
                    if all(s.done for s in batch):
                        break
            finally:
                steps.close()
            for r, s in enumerate(batch):
                piece = s.finish()  # text held back in case a truncate string was starting
                if piece and on_token is not None:
                    on_token(r, piece)
            yield from batch
            index += rows

