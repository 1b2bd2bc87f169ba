"""`Generator`: a loaded model that samples text, over the decode engine."""

import os
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from gpt2tf import checkpoints, lora, model, paths, settings
from gpt2tf.decode import fast
from gpt2tf.decode.engine import DecodeEngine, SamplingParams
from gpt2tf.decode.graph import GraphBackend
from gpt2tf.decode.pick import log_softmax
from gpt2tf.decode.text import TextStream
from gpt2tf.errors import FieldError
from gpt2tf.source import ModelSource

tf1 = tf.compat.v1


def session_config(threads: int | None = None) -> tf1.ConfigProto:
    config = tf1.ConfigProto()
    if threads:
        config.intra_op_parallelism_threads = threads
        config.inter_op_parallelism_threads = threads
    config.gpu_options.allow_growth = True
    return config


ENGINES = ("auto", "tflite", "graph")


class Generator:
    """A loaded model that samples text.

    Generation runs on the fast path (gpt2tf.decode.fast) in fp32 (exact), bf16 or int8
    weights: fp32 on the native step (gpt2tf.decode.native) where it builds, else on the
    checkpoint converted for TFLite/XNNPACK (cached beside it); bf16 on the native step, else
    the TF graph with bfloat16 matmuls; int8 on TFLite. Where the fast path cannot run, the TF
    graph takes over with a one-line note. The TF graph (own tf.Graph and tf.Session) is built
    only when something needs it: `logits`, bf16 without the native step, the fallback, or
    engine="graph". engine="tflite" takes TFLite for fp32 too (to compare the two).

    A LoRA run (gpt2tf.lora) loads as its base plus its adapters: the fast path converts the
    merged weights (its cache key covers the adapters' checkpoint and the base), the TF graph
    computes the adapters beside the frozen weights as training did.
    """

    def __init__(
        self,
        model_dir: "str | os.PathLike | ModelSource",
        *,
        checkpoint: str | None = None,
        threads: int | None = None,
        precision: str = settings.DECODE_PRECISION.default,
        engine: str = "auto",
    ):
        self.source = ModelSource.at(model_dir)
        self.model_dir = self.source.path
        self.hparams = self.source.hparams
        self.encoder = self.source.encoder
        self.checkpoint = checkpoint or self.source.latest_checkpoint()
        self.precision = settings.DECODE_PRECISION.check(precision)
        self.threads = threads
        # A LoRA run: the adapters of self.checkpoint over the base its lora.json names.
        self.lora = lora.LoraRun(self.source, self.checkpoint) if self.source.is_lora else None
        if self.lora is None:
            checkpoints.check_compatible(self.checkpoint, self.hparams)
        # (graph, session, backend, score tokens, score logits, target logprobs), on demand
        self._graph = None
        self._graph_lock = threading.Lock()
        backend = None
        if engine not in ENGINES:
            raise FieldError("engine", f"must be one of {', '.join(ENGINES)}, got {engine!r}")
        if engine != "graph" and self.precision in fast.PRECISIONS:
            backend = fast.open_backend(self.source, self.checkpoint, self.precision,
                                        threads=threads, lora=self.lora, runtime=engine)
        if backend is None:
            backend = self._graph_parts().backend
        self.engine_name = "fast" if isinstance(backend, fast.FastBackend) else "graph"
        self.engine = DecodeEngine(backend, self.hparams, self.encoder)

    def _graph_parts(self) -> "_Graph":
        with self._graph_lock:  # the server scores prompts on other threads than its worker
            return self._build_graph()

    def _build_graph(self) -> "_Graph":
        if self._graph is None:
            graph = tf.Graph()
            precision = model.BF16 if self.precision == "bf16" else model.FP32
            adapters = self.lora.spec if self.lora else None
            with graph.as_default():
                backend = GraphBackend(self.hparams, precision=precision, lora=adapters)
                saver = checkpoints.make_saver(model.model_variables())
                lora_saver = checkpoints.make_saver(model.lora_variables()) if adapters else None
                # Scoring graph (full causal forward, no cache) for tests and evaluation.
                tokens = tf1.placeholder(tf.int32, [None, None], name="score_tokens")
                logits = model.model(self.hparams, tokens, lora=adapters)["logits"]
                # logits: [B, T, V], fp32
                scored = logits if precision is model.FP32 else model.model(
                    self.hparams, tokens, precision=precision, lora=adapters)["logits"]
                # log p(tokens[:, t+1] | tokens[:, :t+1]) without sending [B, T, V] to the host
                logp = tf.nn.log_softmax(tf.cast(scored[:, :-1], tf.float32))  # [B, T-1, V]
                targets = tf.gather(logp, tokens[:, 1:], batch_dims=2)  # [B, T-1]
                k = tf1.placeholder_with_default(1, [], name="top_k")
                top = tf.math.top_k(logp, k)  # values, indices: [B, T-1, k]
            graph.finalize()  # nothing may add nodes later: no slow-down across calls
            session = tf1.Session(graph=graph, config=session_config(self.threads))
            if self.lora is None:
                checkpoints.restore(session, self.checkpoint, saver, self.hparams)
            else:
                checkpoints.restore(session, self.lora.base_prefix, saver, self.hparams)
                checkpoints.restore_saver(session, self.checkpoint, lora_saver)
            backend.session = session
            self._graph = _Graph(graph, session, backend, tokens, logits, targets, k,
                                 top.values, top.indices)
        return self._graph

    @property
    def graph(self):
        return self._graph_parts().graph

    @property
    def session(self):
        return self._graph_parts().session

    @classmethod
    def from_model(cls, model_name: str, models_dir: str = paths.DEFAULT_MODELS_DIR, **kw):
        return cls(ModelSource.resolve(model_name=model_name, models_dir=models_dir), **kw)

    @classmethod
    def from_run(cls, run_name: str, checkpoint_dir: str = paths.DEFAULT_CHECKPOINT_DIR, **kw):
        return cls(ModelSource.resolve(run_name=run_name, checkpoint_dir=checkpoint_dir), **kw)

    def close(self) -> None:
        if self._graph is not None:
            self._graph.session.close()
        close = getattr(self.engine.backend, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def logits(self, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Full forward pass in the TF graph (fp32): [B, T] ids -> [B, T, V] logits."""
        g = self._graph_parts()
        return g.session.run(g.logits, {g.tokens: np.asarray(tokens)})

    def target_logprobs(self, tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """Each token's log-probability given the ones before it: [B, T] ids -> [B, T-1].

        At the Generator's precision: fp32 and bf16 in the TF graph (one batched forward
        pass; bf16 there rounds each matmul's output too, where the native step sums in fp32);
        int8 on the fast path, whose weights only it has, one decode step per position with
        the text's own tokens fed in (slower, and exactly what generation computes)."""
        ids = np.asarray(tokens)
        if self.precision == "int8" and self.engine_name == "fast":
            return self._stepped_logprobs(ids)
        g = self._graph_parts()
        return g.session.run(g.targets, {g.tokens: ids})

    def _stepped_logprobs(self, ids: np.ndarray) -> np.ndarray:
        lite = self.engine.backend.stepper
        lite.start(len(ids), min(ids.shape[1], self.hparams.n_ctx))
        out = np.zeros([ids.shape[0], ids.shape[1] - 1])  # [B, T-1]
        for t in range(ids.shape[1] - 1):
            logits = lite.step(ids[:, t].astype(np.int32), np.full(len(ids), t, np.int32))
            logp = log_softmax(np.asarray(logits, np.float64))  # [B, V]
            out[:, t] = logp[np.arange(len(ids)), ids[:, t + 1]]
        return out

    def prompt_logprobs(self, tokens: Sequence[int], top: int = 0):
        """One text's scores: each token after the first, its log-probability given the ones
        before it, and the `top` most likely tokens there with theirs.

        Returns (logprobs [T-1], top ids [T-1, top], top logprobs [T-1, top]), float64 logprobs
        of the model's own distribution (no temperature or filtering)."""
        g = self._graph_parts()
        ids = np.asarray([tokens], np.int32)  # [1, T]
        if ids.shape[1] < 2:
            return np.zeros([0]), np.zeros([0, top], np.int64), np.zeros([0, top])
        k = max(int(top), 1)
        got, values, idx = g.session.run([g.targets, g.top_values, g.top_ids],
                                         {g.tokens: ids, g.top_k: k})
        return (got[0].astype(np.float64), idx[0, :, :top].astype(np.int64),
                values[0, :, :top].astype(np.float64))


    def encode_prompt(self, prefix: str | None) -> list[int]:
        return self.engine.encode_prompt(prefix)

    def stream(self, contexts, *, length, params, rngs) -> Iterator[np.ndarray]:
        """See DecodeEngine.stream."""
        return self.engine.stream(contexts, length=length, params=params, rngs=rngs)

    def iter_samples(self, context, **kwargs) -> Iterator[TextStream]:
        """See DecodeEngine.iter_samples."""
        return self.engine.iter_samples(context, **kwargs)

    def generate_tokens(self, context: Sequence[int], **kwargs) -> list[list[int]]:
        """Token ids of `nsamples` continuations of one prompt (see DecodeEngine.iter_samples)."""
        return [s.tokens for s in self.iter_samples(context, **kwargs)]

@dataclass(frozen=True)
class _Graph:
    """The TF graph a Generator builds on demand, and its tensors."""

    graph: tf.Graph
    session: object  # tf.compat.v1.Session
    backend: GraphBackend
    tokens: tf.Tensor  # [B, T] ids to score
    logits: tf.Tensor  # [B, T, V] fp32
    targets: tf.Tensor  # [B, T-1] log p(tokens[:, t+1] | tokens[:, :t+1])
    top_k: tf.Tensor  # how many alternatives `top_values`/`top_ids` give
    top_values: tf.Tensor  # [B, T-1, k]
    top_ids: tf.Tensor  # [B, T-1, k]

def generate_texts(
    gen: Generator,
    *,
    prefix: str | Sequence[str] | None = None,
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
    **steering,
) -> list[str]:
    """gpt-2-simple's generate semantics over a loaded Generator; returns the texts.

    `prefix` may be a list of prompts: each gets `nsamples` samples, rows of different prompts
    share batches, and the texts come back in prompt order. include_prefix puts the prompt in
    front of each text (gpt-2-simple only honoured it with truncate). on_sample(index, text)
    is called as each sample completes. `steering`: the settings in gpt2tf.settings.STEERING.
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, **steering)
    length = gen.hparams.n_ctx - 1 if length is None else length
    prompts = _prompts(prefix)
    contexts = [gen.encode_prompt(p) for p in prompts]
    texts = []
    for i, s in enumerate(gen.engine.iter_many(
        contexts, nsamples=nsamples, batch_size=batch_size, length=length, params=params,
        seed=seed, stop_at_eot=stop_at_eot, truncate=truncate, on_token=on_token,
    )):
        p = prompts[i // nsamples]
        text = (p + s.text) if (p and include_prefix) else s.text
        texts.append(text)
        if on_sample is not None:
            on_sample(i, text)
    return texts


def _prompts(prefix) -> list[str | None]:
    """A prefix (none, a text, or a list of texts) -> the prompts, None meaning unconditional."""
    if prefix is None or isinstance(prefix, str):
        return [str(prefix) if prefix else None]
    if not isinstance(prefix, (list, tuple)) or not prefix:
        raise FieldError("prefix", f"must be a text or a non-empty list of texts, got {prefix!r}")
    for p in prefix:
        if not isinstance(p, str):
            raise FieldError("prefix", f"entries must be texts, got {p!r}")
    return [p if p else None for p in prefix]
