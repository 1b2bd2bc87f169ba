"""Text generation from a model or run directory: one graph and one session per model.

`Generator` builds its graph once (a one-position decode step over a preallocated key/value
cache, plus the samplers) and reuses it for every call, whatever the prompt, batch size or
sampling settings: they are fed, not baked in. gpt-2-simple rebuilt its graph per call and
slowed down with each one.

The decode loop runs one `session.run` per new token. That keeps the loop lean (the weights are
read once per step, the cache is updated in place) and lets the caller stream tokens, stop rows
at <|endoftext|>, slide the window past n_ctx, and stop early on Ctrl-C or a closed connection.
"""

import codecs
import logging
import os
import secrets
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from gpt2tf import checkpoints, model, modeldir, paths, sample
from gpt2tf.errors import UserError
from gpt2tf.hparams import HParams

tf1 = tf.compat.v1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings. top_k 0 and top_p 0 (or 1) mean "off", as in gpt-2-simple."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0

    def __post_init__(self):
        try:
            temperature, top_p = float(self.temperature), float(self.top_p)
        except (TypeError, ValueError):
            raise UserError(
                f"temperature and top_p must be numbers, got {self.temperature!r}, {self.top_p!r}"
            ) from None
        if not temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 <= top_p <= 1:
            raise UserError(f"--top_p must be in [0, 1] (0 turns it off), got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
            raise UserError(f"--top_k must be an integer (0 turns it off), got {self.top_k!r}")
        if self.top_k < 0:
            raise UserError(f"--top_k must be >= 0 (0 turns it off), got {self.top_k}")
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "top_k", int(self.top_k))

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or 0 < self.top_p < 1


def check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"--{name} must be an integer >= 1, got {value!r}")
    return int(value)


def sample_seed(seed: int | None, index: int) -> np.random.Generator:
    """The random stream of sample number `index`: a function of (seed, index) only."""
    return np.random.default_rng([int(seed), index])


def new_seed() -> int:
    return secrets.randbits(62)


def session_config(threads: int | None = None) -> tf1.ConfigProto:
    config = tf1.ConfigProto()
    if threads:
        config.intra_op_parallelism_threads = threads
        config.inter_op_parallelism_threads = threads
    config.gpu_options.allow_growth = True
    return config


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
        self._cache = sample.KVCache(hp, self._pos)
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
        length = check_positive("length", length)
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
    ) -> Iterator["Sample"]:
        """Yield `Sample`s as batches finish (any nsamples, `batch_size` at a time).

        Sample i uses the random stream sample_seed(seed, i), so it does not depend on the
        batch size. on_token(row, text) streams each row's new text.
        """
        nsamples = check_positive("nsamples", nsamples)
        batch_size = check_positive("batch_size", batch_size)
        length = check_positive("length", length)
        seed = new_seed() if seed is None else int(seed)
        eot = self.encoder.eot_token if stop_at_eot else None
        index = 0
        while index < nsamples:
            rows = min(batch_size, nsamples - index)
            rngs = [sample_seed(seed, index + r) for r in range(rows)]
            batch = [Sample(self.encoder, truncate) for _ in range(rows)]
            steps = self.stream(
                session, [list(context)] * rows, length=length, params=params, rngs=rngs
            )
            try:
                for new in steps:
                    for r, t in enumerate(new):
                        piece = batch[r].add(int(t), eot)
                        if piece is not None and on_token is not None:
                            on_token(r, piece)
                    if all(s.done for s in batch):
                        break
            finally:
                steps.close()
            yield from batch
            index += rows


class Generator:
    """A loaded model that samples text; owns its tf.Graph and tf.Session."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        checkpoint: str | None = None,
        threads: int | None = None,
    ):
        self.model_dir = modeldir.check_dir(model_dir)
        self.hparams = modeldir.load_hparams(self.model_dir)
        self.encoder = modeldir.load_encoder(self.model_dir)
        if self.encoder.n_vocab > self.hparams.n_vocab:
            raise UserError(
                f"{self.model_dir}: the vocabulary has {self.encoder.n_vocab} tokens but"
                f" hparams.json n_vocab={self.hparams.n_vocab}; the files do not belong together"
            )
        self.checkpoint = checkpoint or modeldir.latest_checkpoint(self.model_dir)
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.decoder = Decoder(self.hparams, self.encoder)
            self._saver = checkpoints.make_saver(model.model_variables())
            # Scoring graph (full causal forward, no cache) for tests and evaluation.
            self._score_tokens = tf1.placeholder(tf.int32, [None, None], name="score_tokens")
            self._score_logits = model.model(self.hparams, self._score_tokens)["logits"]
        self.graph.finalize()  # nothing may add nodes later: no slow-down across calls
        self.session = tf1.Session(graph=self.graph, config=session_config(threads))
        checkpoints.restore(self.session, self.checkpoint, self._saver, self.hparams)

    @classmethod
    def from_model(cls, model_name: str, models_dir: str = paths.DEFAULT_MODELS_DIR, **kw):
        return cls(paths.model_path(models_dir, model_name), **kw)

    @classmethod
    def from_run(cls, run_name: str, checkpoint_dir: str = paths.DEFAULT_CHECKPOINT_DIR, **kw):
        return cls(paths.run_path(checkpoint_dir, run_name), **kw)

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def logits(self, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Full forward pass: [B, T] ids -> [B, T, V] logits."""
        return self.session.run(self._score_logits, {self._score_tokens: np.asarray(tokens)})

    def encode_prompt(self, prefix: str | None) -> list[int]:
        return self.decoder.encode_prompt(prefix)

    def stream(self, contexts, *, length, params, rngs) -> Iterator[np.ndarray]:
        """See Decoder.stream."""
        return self.decoder.stream(self.session, contexts, length=length, params=params, rngs=rngs)

    def iter_samples(self, context, **kwargs) -> Iterator["Sample"]:
        """See Decoder.iter_samples."""
        return self.decoder.iter_samples(self.session, context, **kwargs)

    def generate_tokens(self, context: Sequence[int], **kwargs) -> list[list[int]]:
        """Token ids of `nsamples` continuations of one prompt (see Decoder.iter_samples)."""
        return [s.tokens for s in self.iter_samples(context, **kwargs)]


class Sample:
    """One growing continuation: stops at <|endoftext|> or at a truncate string."""

    def __init__(self, encoder, truncate: str | None = None):
        self.encoder = encoder
        self.truncate = truncate or None
        self.tokens: list[int] = []
        self.done = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tail = ""  # the last characters, enough to see a truncate string arrive

    def add(self, token: int, eot: int | None) -> str | None:
        """Append a token unless the sample is complete; return its newly complete text."""
        if self.done:
            return None
        if eot is not None and token == eot:
            self.done = True
            return None
        self.tokens.append(token)
        piece = self._decoder.decode(self.encoder.decode_bytes([token]))
        if self.truncate:
            self._tail = (self._tail + piece)[-(len(piece) + len(self.truncate)):]
            self.done = self.truncate in self._tail
        return piece

    @property
    def text(self) -> str:
        text = self.encoder.decode(self.tokens)
        if self.truncate:
            text = text.split(self.truncate, 1)[0]
        return text


def generate_texts(
    gen: "Generator",
    *,
    prefix: str | None = None,
    nsamples: int = 1,
    batch_size: int = 1,
    length: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    truncate: str | None = None,
    include_prefix: bool = True,
    stop_at_eot: bool = True,
    on_token=None,
    on_sample=None,
) -> list[str]:
    """gpt-2-simple's generate semantics over a loaded Generator; returns the texts.

    include_prefix puts the prompt in front of each text (gpt-2-simple only honoured it with
    truncate). on_sample(index, text) is called as each sample completes.
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    length = gen.hparams.n_ctx - 1 if length is None else length
    prefix = None if prefix is None or prefix == "" else str(prefix)
    context = gen.encode_prompt(prefix)
    texts = []
    for i, s in enumerate(gen.iter_samples(
        context, nsamples=nsamples, batch_size=batch_size, length=length, params=params,
        seed=seed, stop_at_eot=stop_at_eot, truncate=truncate, on_token=on_token,
    )):
        text = (prefix + s.text) if (prefix and include_prefix) else s.text
        texts.append(text)
        if on_sample is not None:
            on_sample(i, text)
    return texts


def format_sample(text: str, sample_delim: str, nsamples: int) -> str:
    """One sample as gpt-2-simple prints and writes it: text, newline, delimiter (none if alone)."""
    return f"{text}\n{sample_delim if nsamples > 1 else ''}"


def write_samples(path: str | os.PathLike, texts: list[str], sample_delim: str) -> None:
    """Write samples the way gpt-2-simple's generate_to_file does, atomically."""
    from gpt2tf import fileio

    with fileio.atomic_open(path, "w") as f:
        for text in texts:
            f.write(format_sample(text, sample_delim, len(texts)))
