"""`Generator`: a loaded model that samples text; owns its tf.Graph and tf.Session."""

import os
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from gpt2tf import checkpoints, model, paths
from gpt2tf.decode.decoder import Decoder, SamplingParams
from gpt2tf.decode.text import TextStream
from gpt2tf.source import ModelSource

tf1 = tf.compat.v1


def session_config(threads: int | None = None) -> tf1.ConfigProto:
    config = tf1.ConfigProto()
    if threads:
        config.intra_op_parallelism_threads = threads
        config.inter_op_parallelism_threads = threads
    config.gpu_options.allow_growth = True
    return config


class Generator:
    """A loaded model that samples text; owns its tf.Graph and tf.Session."""

    def __init__(
        self,
        model_dir: "str | os.PathLike | ModelSource",
        *,
        checkpoint: str | None = None,
        threads: int | None = None,
    ):
        self.source = ModelSource.at(model_dir)
        self.model_dir = self.source.path
        self.hparams = self.source.hparams
        self.encoder = self.source.encoder
        self.checkpoint = checkpoint or self.source.latest_checkpoint()
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
        return cls(ModelSource.resolve(model_name=model_name, models_dir=models_dir), **kw)

    @classmethod
    def from_run(cls, run_name: str, checkpoint_dir: str = paths.DEFAULT_CHECKPOINT_DIR, **kw):
        return cls(ModelSource.resolve(run_name=run_name, checkpoint_dir=checkpoint_dir), **kw)

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

    def iter_samples(self, context, **kwargs) -> Iterator[TextStream]:
        """See Decoder.iter_samples."""
        return self.decoder.iter_samples(self.session, context, **kwargs)

    def generate_tokens(self, context: Sequence[int], **kwargs) -> list[list[int]]:
        """Token ids of `nsamples` continuations of one prompt (see Decoder.iter_samples)."""
        return [s.tokens for s in self.iter_samples(context, **kwargs)]


def generate_texts(
    gen: Generator,
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
