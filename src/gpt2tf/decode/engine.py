"""The decode engine: one loop behind every generation path, over a backend that gives logits.

The loop owns what generation means: prompts checked and cut to the window, one new token per
row per step, the host sampler (`pick`) with each row's settings and random stream, and the
window sliding past n_ctx (the last 3/4 of the window is re-read as the new context). A
backend owns the arithmetic and the key/value cache:

    backend.start(contexts) -> logits [B, V] after each context's last token (caches filled)
    backend.step(tokens)    -> logits [B, V] after appending one token to every row

Backends: the converted fast path (gpt2tf.decode.fast, TFLite/XNNPACK) for generation, and
the TF graph (gpt2tf.decode.graph) over live variables for the trainer's samples, for a
precision the fast path lacks, and as the fallback. Rows may have different prompt lengths.
"""

import logging
import secrets
from typing import Iterator, Protocol, Sequence

import numpy as np

from gpt2tf import settings
from gpt2tf.decode.pick import RowState, pick
from gpt2tf.decode.text import TextStream
from gpt2tf.errors import FieldError, UserError
from gpt2tf.hparams import HParams

log = logging.getLogger(__name__)

SamplingParams = settings.make_config(
    "SamplingParams", settings.SAMPLING,
    "Validated sampling settings. top_k 0 and top_p 0 (or 1) mean off, as in gpt-2-simple.",
    {"filtered": property(lambda self: self.top_k > 0 or 0 < self.top_p < 1),
     "steers": property(lambda self: any(
         getattr(self, s.name) != s.default for s in settings.STEERING))},
)


def sample_seed(seed: int | None, index: int) -> np.random.Generator:
    """The random stream of sample number `index`: a function of (seed, index) only."""
    return np.random.default_rng([int(seed), index])


def new_seed() -> int:
    return secrets.randbits(62)


class Backend(Protocol):
    def start(self, contexts: list[list[int]]) -> np.ndarray: ...

    def step(self, tokens: np.ndarray) -> np.ndarray: ...


class DecodeEngine:
    """Generation over one backend: `stream` token ids, or `iter_samples` as text."""

    def __init__(self, backend: Backend, hparams: HParams, encoder):
        self.backend = backend
        self.hparams = hparams
        self.encoder = encoder

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

    def row_state(self, prompt: Sequence[int], params: SamplingParams) -> RowState:
        """What `pick` needs to steer a row: its whole prompt, bad words as token ids."""
        bad = [t for t, _ in params.logit_bias if t >= self.hparams.n_vocab]
        if bad:
            raise FieldError("logit_bias", f"names token {bad[0]}, outside the vocabulary"
                             f" [0, {self.hparams.n_vocab})")
        words = tuple(tuple(self.encoder.encode(w)) for w in params.bad_words)
        return RowState(list(prompt), len(prompt), words, self.encoder.eot_token)

    def encode_prompt(self, prefix: str | None) -> list[int]:
        """A prompt's ids; no prompt means <|endoftext|>, the token GPT-2 starts documents with."""
        if prefix:
            return self.encoder.encode(str(prefix))
        if self.encoder.eot_token is None:
            raise UserError("this vocabulary has no <|endoftext|> token: give a --prefix")
        return [self.encoder.eot_token]

    def stream(
        self,
        contexts: Sequence[Sequence[int]],
        *,
        length: int,
        params: Sequence[SamplingParams] | SamplingParams,
        rngs: Sequence[np.random.Generator],
    ) -> Iterator[np.ndarray]:
        """Yield `length` steps of new tokens, [B] int32 each, one row per context.

        Rows may have different prompt lengths and their own sampling settings and random
        streams. Past n_ctx the window slides: the last 3/4 of the window is re-read as the
        new context. Closing the iterator stops the work.
        """
        length = settings.LENGTH.check(length)
        if len(contexts) < 1:
            raise UserError("nothing to generate: no prompts")
        if isinstance(params, SamplingParams):
            params = [params] * len(contexts)
        seqs, states = [], []
        for c, p in zip(contexts, params, strict=True):
            c = [int(t) for t in c]
            if not c:
                raise UserError("empty prompt: give at least one token")
            self.check_tokens(c)
            seqs.append(self._fit_context(c))
            states.append(self.row_state(c, p) if p.steers else None)
        n_ctx = self.hparams.n_ctx
        keep = n_ctx - n_ctx // 4
        logits = self.backend.start(seqs)  # [B, V]
        width = max(len(s) for s in seqs)  # positions the longest row fills
        for step in range(length):
            uniform = np.array([r.random() for r in rngs], np.float32)
            new = pick(logits, params, uniform, states)  # [B]
            for s, state, t in zip(seqs, states, new):
                s.append(int(t))
                if state is not None:
                    state.seen.append(int(t))
            yield new
            if step == length - 1:
                break
            if width >= n_ctx:  # the window is full: slide it
                seqs = [s[-keep:] for s in seqs]
                logits = self.backend.start(seqs)
                width = max(len(s) for s in seqs)
            else:
                logits = self.backend.step(new)
                width += 1

    def iter_samples(self, context: Sequence[int], **kwargs) -> Iterator[TextStream]:
        """`iter_many` of one prompt."""
        return self.iter_many([context], **kwargs)

    def iter_many(
        self,
        contexts: Sequence[Sequence[int]],
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
        """Yield `TextStream`s in prompt order, `nsamples` per prompt, `batch_size` rows at a
        time (rows of different prompts share a batch).

        Sample number i (counting over every prompt's samples in order) uses the random stream
        sample_seed(seed, i), so it does not depend on the batch size. on_token(row, text)
        streams each row's new text (row: the sample's place in its batch).
        """
        nsamples = settings.NSAMPLES.check(nsamples)
        batch_size = settings.BATCH_SIZE.check(batch_size)
        length = settings.LENGTH.check(length)
        seed = new_seed() if seed is None else int(seed)
        eot = self.encoder.eot_token if stop_at_eot else None
        jobs = [list(c) for c in contexts for _ in range(nsamples)]  # sample i's prompt
        index = 0
        while index < len(jobs):
            rows = min(batch_size, len(jobs) - index)
            rngs = [sample_seed(seed, index + r) for r in range(rows)]
            batch = [TextStream(self.encoder, truncate=truncate, eot=eot) for _ in range(rows)]
            steps = self.stream(jobs[index:index + rows], length=length, params=params,
                                rngs=rngs)
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
