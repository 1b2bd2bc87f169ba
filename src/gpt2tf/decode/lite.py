"""GPT-2's decode step as a TFLite flatbuffer, run by tf.lite's interpreter (XNNPACK) on CPU.

`build` converts a checkpoint's weights into one .tflite file with signatures that share them
(layout version FORMAT_VERSION; B rows, S cache slots, L layers, H heads, D = head_dim):

  step         tokens [B] int32, positions [B] int32, bias [B, S] float32,
               k_0, v_0, ..., k_{L-1}, v_{L-1} [B, H, S, D] float32
               -> logits [B, V], new_k [L, B, H, D], new_v [L, B, H, D]; B and S are dynamic
  extend_<T>   tokens [T] int32 (right-padded), start [1] int32, length [1] int32,
               bias [1, S] float32, k_0, v_0, ..., k_{L-1}, v_{L-1} [1, H, S, D] float32
               -> logits [1, V] of token length-1, k [L, H, T, D], v [L, H, T, D]

`extend` runs a chunk of one row's prompt at positions start..start+length-1 over the row's
cache (its first `start` slots, given as inputs), so a long prompt is prefilled chunk by chunk
(the server runs other rows' decode steps between two chunks), and a prompt of any length
needs only the few chunk sizes of `chunk_sizes`: XNNPACK packs its own copy of the weights for
every signature, so fewer signatures take less memory.

The cache is only read inside the model: row b attends to the slots its `bias` row keeps (0;
MASK_VALUE drops one) plus its own new key/value, so every row sits at its own position (rows
may join and leave). `LiteStep` keeps the cache in the step signature's input buffers and
writes each new key/value into them through numpy views after the step: the cache is never
copied per token, neither by TFLite (no concat or scatter in the model) nor by the host.

The mask is an input, not computed from `positions` in the model: a range over the dynamic
cache length would be a dynamic tensor in TFLite, and XNNPACK does not take any op downstream
of one (measured: batch 8 ran 2x slower, nearly at the speed of TFLite's own kernels).

The math is GPT-2's in float32 (tanh GELU, layer norm eps 1e-5, LM head tied to wte), as in
gpt2tf.model; "int8" quantizes the weights of every matmul (dynamic range, per channel).
"""

import functools
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from gpt2tf import model
from gpt2tf.quiet import native_stderr_hidden
from gpt2tf.errors import UserError
from gpt2tf.hparams import HParams
from gpt2tf.decode.stepper import Stepper, checked_weights

LITE_PRECISIONS = ("fp32", "int8")  # int8: dynamic-range, per-channel weights
FORMAT_VERSION = 3  # bump when the converted model's layout changes (it keys an on-disk cache)
# 2: the step takes its attention mask as the input `bias` (1 computed it from positions)
# 3: prompts run in chunks over the cache ("extend_<T>"), not whole ("prefill_<T>")

STEP = "step"
# tf.lite.Interpreter warns on every construction that it moves to the ai_edge_litert package
# (the same runtime); it is a plain UserWarning with this text.
_DEPRECATION = r"\s*Warning: tf\.lite\.Interpreter is deprecated"


def chunk_sizes(n_ctx: int) -> tuple[int, ...]:
    """Chunk lengths the extend signatures take: 32 and 128 (less where n_ctx is smaller).

    A prompt runs as chunks of the largest size, its last one in the smallest that fits, so
    it computes at most 31 padded positions; 128 keeps the matmuls efficient while a chunk
    stalls the server's running streams for one short step."""
    return tuple(sorted({min(32, n_ctx), min(128, n_ctx)}))


def _extend_key(t: int) -> str:
    return f"extend_{t}"


def _cache_name(kind: str, layer: int) -> str:
    return f"{kind}_{layer}"


# ============================================================================ the graph


def constants(weights: dict[str, np.ndarray], hparams: HParams) -> dict[str, tf.Tensor]:
    """The checkpoint's arrays as TF constants (baked into the flatbuffer), by checkpoint name.

    conv1d weights, stored [1, nx, nf] in OpenAI's layout, become the [nx, nf] matrix they are.
    """
    return {name: tf.constant(array[0] if array.ndim == 3 else array)
            for name, array in checked_weights(weights, hparams).items()}


def norm(x: tf.Tensor, p: dict, scope: str, *, epsilon: float = 1e-5) -> tf.Tensor:
    """LayerNorm over the last axis with gain `scope/g` and bias `scope/b`."""
    u = tf.reduce_mean(x, axis=-1, keepdims=True)
    s = tf.reduce_mean(tf.square(x - u), axis=-1, keepdims=True)
    return (x - u) * tf.math.rsqrt(s + epsilon) * p[scope + "/g"] + p[scope + "/b"]


def conv1d(x: tf.Tensor, p: dict, scope: str) -> tf.Tensor:
    """[N, nx] x [nx, nf] + [nf] -> [N, nf]: one FULLY_CONNECTED in TFLite."""
    return tf.matmul(x, p[scope + "/w"]) + p[scope + "/b"]


def mlp(x: tf.Tensor, p: dict, scope: str) -> tf.Tensor:
    h = model.gelu(conv1d(x, p, scope + "/c_fc"))  # [N, 4C]; the converter fuses a GELU op
    return conv1d(h, p, scope + "/c_proj")  # [N, C]


def lm_head(h: tf.Tensor, p: dict) -> tf.Tensor:
    # Tied to the token embedding. Against wte as stored ([V, C], FULLY_CONNECTED's own weight
    # layout), so the file holds no transposed copy of it.
    return tf.matmul(h, p["model/wte"], transpose_b=True)  # [N, C] x [V, C]^T -> [N, V]


def split_heads(x: tf.Tensor, hparams: HParams) -> tf.Tensor:
    """[T, C] -> [H, T, D]."""
    return tf.transpose(tf.reshape(x, [-1, hparams.n_head, hparams.head_dim]), [1, 0, 2])


def merge_heads(x: tf.Tensor, hparams: HParams) -> tf.Tensor:
    """[H, T, D] -> [T, C]."""
    return tf.reshape(tf.transpose(x, [1, 0, 2]), [-1, hparams.n_embd])


def split_heads_one(x: tf.Tensor, hparams: HParams) -> tf.Tensor:
    """[B, C] -> [B, H, 1, D]: one position per row, so a reshape and no transpose."""
    return tf.reshape(x, [-1, hparams.n_head, 1, hparams.head_dim])


def step_attn(x, p, scope, *, cache_k, cache_v, bias, hparams: HParams):
    """One new position per row over its cache and itself. x: [B, C]; cache_*: [B, H, S, D].

    Returns the attention output [B, C] and the new key and value [B, H, 1, D].
    """
    q, k, v = tf.split(conv1d(x, p, scope + "/c_attn"), 3, axis=-1)  # [B, C] each
    q = split_heads_one(q * (1.0 / math.sqrt(hparams.head_dim)), hparams)  # [B, H, 1, D]
    k, v = split_heads_one(k, hparams), split_heads_one(v, hparams)
    # The new key/value join as a separate score instead of being written into the cache
    # first: a concat or scatter inside the model would copy the whole cache every step.
    w = tf.matmul(q, cache_k, transpose_b=True) + bias  # [B, H, 1, S]
    w_self = tf.reduce_sum(q * k, axis=-1, keepdims=True)  # [B, H, 1, 1]
    # The softmax by hand, over the cache's scores and the row's own together.
    m = tf.maximum(tf.reduce_max(w, axis=-1, keepdims=True), w_self)  # [B, H, 1, 1]
    e, e_self = tf.exp(w - m), tf.exp(w_self - m)
    a = tf.matmul(e, cache_v) + e_self * v  # [B, H, 1, S] x [B, H, S, D] -> [B, H, 1, D]
    a = a / (tf.reduce_sum(e, axis=-1, keepdims=True) + e_self)
    a = tf.reshape(a, [-1, hparams.n_embd])  # [B, C]
    return conv1d(a, p, scope + "/c_proj"), k, v


def extend_attn(x, p, scope, *, cache_k, cache_v, bias, causal, hparams: HParams):
    """A chunk of T positions over the row's cache and itself. x: [T, C]; cache_*:
    [1, H, S, D]; bias: [1, 1, S] (the cache slots to read); causal: [T, T].

    Returns the attention output [T, C] and the chunk's keys and values [H, T, D].
    """
    q, k, v = tf.split(conv1d(x, p, scope + "/c_attn"), 3, axis=-1)  # [T, C] each
    q = split_heads(q * (1.0 / math.sqrt(hparams.head_dim)), hparams)  # [H, T, D]
    k, v = split_heads(k, hparams), split_heads(v, hparams)
    ck = tf.reshape(cache_k, [hparams.n_head, -1, hparams.head_dim])  # [H, S, D]
    cv = tf.reshape(cache_v, [hparams.n_head, -1, hparams.head_dim])
    # The cache's scores and the chunk's own apart, as in step_attn: no concat copies the cache
    w = tf.matmul(q, ck, transpose_b=True) + bias  # [H, T, S]
    w_self = tf.matmul(q, k, transpose_b=True) + causal  # [H, T, T]
    m = tf.maximum(tf.reduce_max(w, axis=-1, keepdims=True),
                   tf.reduce_max(w_self, axis=-1, keepdims=True))  # [H, T, 1]
    e, e_self = tf.exp(w - m), tf.exp(w_self - m)
    a = tf.matmul(e, cv) + tf.matmul(e_self, v)  # [H, T, D]
    a = a / (tf.reduce_sum(e, axis=-1, keepdims=True) + tf.reduce_sum(e_self, axis=-1,
                                                                     keepdims=True))
    return conv1d(merge_heads(a, hparams), p, scope + "/c_proj"), k, v


def block(h, p, layer: int, attend):
    """One pre-norm block: h + attn(ln_1(h)), then + mlp(ln_2(h)). `attend` is step_attn or
    extend_attn with its other arguments bound. Returns the new h and the layer's k and v."""
    scope = f"model/h{layer}"
    a, k, v = attend(norm(h, p, scope + "/ln_1"), p, scope + "/attn")
    h = h + a
    return h + mlp(norm(h, p, scope + "/ln_2"), p, scope + "/mlp"), k, v


def step_function(p: dict, hparams: HParams) -> tf.types.experimental.ConcreteFunction:
    """The "step" signature: one token per row at the row's own position."""
    hp = hparams
    cache_spec = [None, hp.n_head, None, hp.head_dim]  # [B, H, S, D]: B and S dynamic
    specs = [
        tf.TensorSpec([None], tf.int32, "tokens"),
        tf.TensorSpec([None], tf.int32, "positions"),
        tf.TensorSpec([None, None], tf.float32, "bias"),  # [B, S]
    ]
    for layer in range(hp.n_layer):
        specs += [tf.TensorSpec(cache_spec, tf.float32, _cache_name(kind, layer)) for kind in "kv"]

    def step(tokens, positions, bias, *cache):
        h = tf.gather(p["model/wte"], tokens) + tf.gather(p["model/wpe"], positions)  # [B, C]
        # expand_dims, not [:, None, None]: TFLite's strided slice adds no axes to dynamic shapes
        bias = tf.expand_dims(tf.expand_dims(bias, 1), 1)  # [B, 1, 1, S]
        new_k, new_v = [], []
        for layer in range(hp.n_layer):
            attend = functools.partial(step_attn, cache_k=cache[2 * layer],
                                       cache_v=cache[2 * layer + 1], bias=bias, hparams=hp)
            h, k, v = block(h, p, layer, attend)
            new_k.append(tf.reshape(k, [-1, hp.n_head, hp.head_dim]))  # [B, H, D]
            new_v.append(tf.reshape(v, [-1, hp.n_head, hp.head_dim]))
        logits = lm_head(norm(h, p, "model/ln_f"), p)  # [B, V]
        return {"logits": logits, "new_k": tf.stack(new_k), "new_v": tf.stack(new_v)}

    return tf.function(step, input_signature=specs).get_concrete_function()


def extend_function(p: dict, hparams: HParams, t: int) -> tf.types.experimental.ConcreteFunction:
    """The "extend_<t>" signature: a right-padded chunk of up to t tokens of one row, from slot
    `start`, over the row's cache.

    Padding needs no mask of its own: the padded positions come after every real one, so the
    causal mask already hides them (their positions are clamped into the table).
    """
    hp = hparams
    i = tf.range(t)
    causal = tf.where(i[None, :] <= i[:, None], 0.0, model.MASK_VALUE)  # [T, T]
    cache_spec = [1, hp.n_head, None, hp.head_dim]  # [1, H, S, D]: S dynamic
    specs = [
        tf.TensorSpec([t], tf.int32, "tokens"),
        tf.TensorSpec([1], tf.int32, "start"),
        tf.TensorSpec([1], tf.int32, "length"),
        tf.TensorSpec([1, None], tf.float32, "bias"),  # [1, S]
    ]
    for layer in range(hp.n_layer):
        specs += [tf.TensorSpec(cache_spec, tf.float32, _cache_name(kind, layer)) for kind in "kv"]

    def extend(tokens, start, length, bias, *cache):
        positions = tf.minimum(start + i, hp.n_ctx - 1)  # [T]
        h = tf.gather(p["model/wte"], tokens) + tf.gather(p["model/wpe"], positions)  # [T, C]
        bias = tf.expand_dims(bias, 1)  # [1, 1, S]
        ks, vs = [], []
        for layer in range(hp.n_layer):
            attend = functools.partial(extend_attn, cache_k=cache[2 * layer],
                                       cache_v=cache[2 * layer + 1], bias=bias, causal=causal,
                                       hparams=hp)
            h, k, v = block(h, p, layer, attend)
            ks.append(k)
            vs.append(v)
        last = tf.gather(h, length - 1)  # [1, C]: the LM head only for the token sampled from
        logits = lm_head(norm(last, p, "model/ln_f"), p)  # [1, V]
        return {"logits": logits, "k": tf.stack(ks), "v": tf.stack(vs)}  # k, v: [L, H, T, D]

    extend.__name__ = _extend_key(t)  # the converter names the signature after the function
    return tf.function(extend, input_signature=specs).get_concrete_function()


def build(weights: dict[str, np.ndarray], hparams: HParams, *, precision: str) -> bytes:
    """The .tflite flatbuffer: signature "step" and one "extend_<T>" per chunk size, sharing
    the weights.

    The batch dimension and the cache length of "step" are dynamic (-1), so that one file serves
    every batch size; LiteStep resizes them. For 124M this takes 1.5 (fp32) to 3 (int8) minutes
    on 2 cores and about 9 GB of memory at its peak: convert once and keep the file.
    """
    if precision not in LITE_PRECISIONS:
        raise UserError(f"precision must be one of {LITE_PRECISIONS}, got {precision!r}")
    if not tf.executing_eagerly():
        raise RuntimeError("lite.build needs eager execution: call it outside a graph context")
    p = constants(weights, hparams)
    functions = [step_function(p, hparams)]
    functions += [extend_function(p, hparams, t) for t in chunk_sizes(hparams.n_ctx)]
    # Several signatures take the multi-function path, which wants an owner object for them.
    converter = tf.lite.TFLiteConverter.from_concrete_functions(functions, tf.Module())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no dataset: dynamic range
    return converter.convert()


# ============================================================================ the runtime


@dataclass(frozen=True)
class Signature:
    subgraph: int
    inputs: dict[str, int]  # name -> tensor index in the subgraph
    outputs: dict[str, int]


def open_interpreter(model: bytes | str | os.PathLike, threads: int) -> tf.lite.Interpreter:
    # A path is mmapped, so the weights are not copied into the heap; bytes are kept alive by
    # the interpreter itself. num_threads=None would mean 1 thread, not "all".
    source = {"model_content": model} if isinstance(model, bytes) else {
        "model_path": os.fspath(model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=UserWarning)
        try:
            return tf.lite.Interpreter(num_threads=threads, **source)
        except ValueError as e:
            where = "the given bytes" if isinstance(model, bytes) else os.fspath(model)
            raise ValueError(f"cannot load a TFLite model from {where}: {e}") from None


class LiteStep(Stepper):
    """A tf.lite interpreter over build()'s model with the KV cache in its input buffers.

    It starts with 1 row at the smallest cache length. Not thread-safe: one caller at a time.
    Each re-plan (start() with a new row count, or the cache growing to the next length)
    reallocates the step's buffers, lets XNNPACK prepare for the new shapes and zeroes the
    cache: for 124M at 8 rows, 50 ms at 128 slots and 0.5-1 s on growing to 512 or 1024; paid
    once per change, not per token.

    Memory: XNNPACK packs its own copy of the weights for every signature (step and the two
    chunk sizes), so 124M takes about 1.5 GB in fp32 and 0.5 GB in int8, plus the cache (rows x
    2 x n_layer x cache_len x n_embd floats: 600 MB at 8 rows of 1024).
    """

    runtime = "tflite"

    def __init__(self, model: bytes | str | os.PathLike, hparams: HParams, *, threads: int = 2):
        super().__init__(hparams, threads)
        self._interp = open_interpreter(model, threads)
        self._sigs = self._read_signatures()
        self._check_layout(model)
        self._chunks = chunk_sizes(hparams.n_ctx)
        # Once without a subgraph index: that is the call which applies the default delegate
        # (XNNPACK) to every subgraph. Each subgraph is then allocated on its own.
        with native_stderr_hidden():  # XNNPACK announces itself on fd 2
            self._wrapper.AllocateTensors()
        self._allocated: dict[str, int] = {}  # extend signature -> the cache length it has
        self._rows, self._cache_len = 0, 0
        self._replan(1, self._lengths[0], keep=False)

    # ------------------------------------------------------------------ the interpreter

    @property
    def _wrapper(self):
        # The C++ interpreter, whose calls take a subgraph index (the public API reaches only
        # subgraph 0). Never stored: tf.lite counts the references to it to tell whether numpy
        # views into its buffers are still alive.
        return self._interp._interpreter

    def _read_signatures(self) -> dict[str, Signature]:
        sigs = {}
        for key, sig in self._interp._get_full_signature_list().items():
            # The file's subgraph order is not the order the signatures were converted in.
            sub = self._wrapper.GetSubgraphIndexFromSignature(key)
            sigs[key] = Signature(sub, dict(sig["inputs"]), dict(sig["outputs"]))
        return sigs

    def _check_layout(self, model) -> None:
        """The file must be build()'s layout for these hparams (it may come from a disk cache)."""
        hp = self.hparams
        expected = {STEP} | {_extend_key(t) for t in chunk_sizes(hp.n_ctx)}
        step = self._sigs.get(STEP)
        problem = None
        if set(self._sigs) != expected:
            problem = f"signatures {sorted(self._sigs)}, expected {sorted(expected)}"
        elif step.inputs.keys() != {"tokens", "positions", "bias"} | {
                _cache_name(kind, layer) for layer in range(hp.n_layer) for kind in "kv"}:
            problem = f"step inputs {sorted(step.inputs)} (n_layer={hp.n_layer} expected)"
        else:
            signature = list(self._wrapper.TensorSizeSignature(step.inputs["k_0"], step.subgraph))
            logits = list(self._wrapper.TensorSizeSignature(step.outputs["logits"], step.subgraph))
            if signature != [-1, hp.n_head, -1, hp.head_dim] or logits != [-1, hp.n_vocab]:
                problem = f"cache {signature} and logits {logits}"
        if problem:
            where = "the given model" if isinstance(model, bytes) else os.fspath(model)
            raise ValueError(
                f"{where} is not lite.build's layout (version {FORMAT_VERSION}) for {hp}: it has"
                f" {problem}; rebuild it"
            )

    def _view(self, key: str, name: str) -> np.ndarray:
        """A zero-copy view of a signature's tensor. Use it at once and drop it: a buffer moves
        when its subgraph is re-planned, and must not be aliased during invoke()."""
        sig = self._sigs[key]
        index = sig.inputs[name] if name in sig.inputs else sig.outputs[name]
        return self._wrapper.tensor(self._interp, index, sig.subgraph)

    def _invoke(self, key: str) -> None:
        self._wrapper.Invoke(self._sigs[key].subgraph)

    def _output(self, key: str, name: str) -> np.ndarray:
        """A copy of an output tensor (the next invoke() overwrites the buffer)."""
        sig = self._sigs[key]
        return self._wrapper.GetTensor(sig.outputs[name], sig.subgraph)

    def _names(self) -> list[str]:
        return [_cache_name(kind, layer) for layer in range(self.hparams.n_layer) for kind in "kv"]

    # ------------------------------------------------------------------ re-planning

    def _replan(self, rows: int, cache_len: int, *, keep: bool) -> None:
        """Give "step" buffers for `rows` rows of `cache_len` slots. With `keep`, the kept rows'
        kept slots are carried over; every other slot starts at zero."""
        keep_rows = min(rows, self._rows) if keep else 0
        keep_len = min(cache_len, self._cache_len)
        # Reallocation moves every buffer: copy the kept part out first.
        kept = {name: self._view(STEP, name)[:keep_rows, :, :keep_len].copy()
                for name in self._names() if keep_rows}
        sig, hp = self._sigs[STEP], self.hparams
        for name in ("tokens", "positions"):
            self._resize(sig, name, [rows])
        self._resize(sig, "bias", [rows, cache_len])
        for name in self._names():
            self._resize(sig, name, [rows, hp.n_head, cache_len, hp.head_dim])
        self._wrapper.AllocateTensors(sig.subgraph)
        self._rows, self._cache_len = rows, cache_len
        for name in self._names():
            # Fresh buffers hold whatever was in memory. A NaN there would get through the
            # mask (NaN + MASK_VALUE is NaN), zeros never do.
            self._view(STEP, name).fill(0.0)
            if name in kept:
                self._view(STEP, name)[:keep_rows, :, :keep_len] = kept[name]

    def _resize(self, sig: Signature, name: str, shape: list[int]) -> None:
        self._wrapper.ResizeInputTensor(sig.inputs[name], np.array(shape, np.int32), False,
                                        sig.subgraph)

    # ------------------------------------------------------------------ the public calls

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def chunk_size(self) -> int:
        """The most tokens one extend() takes."""
        return self._chunks[-1]

    @property
    def cache_len(self) -> int:
        """The slots each row has now (one of cache_lengths(n_ctx))."""
        return self._cache_len

    def extend(self, row: int, tokens: Sequence[int], start: int) -> np.ndarray:
        """Run 1..max(chunk_sizes) tokens at positions start.. of cache row `row`, whose slots
        0..start-1 must be filled; fill slots start..start+len-1. Returns logits [n_vocab]
        float32 of the last of them (a copy)."""
        tokens = self._check_chunk(row, tokens, start)
        n, hp = len(tokens), self.hparams
        t = min(c for c in self._chunks if c >= n)
        key = _extend_key(t)
        self._fit(start + n)
        if self._allocated.get(key) != self._cache_len:
            # On first use and when the cache grows (so an unused size's activations take no
            # memory; the weights XNNPACK packed for it at start-up are there anyway)
            sig = self._sigs[key]
            self._resize(sig, "bias", [1, self._cache_len])
            for name in self._names():
                self._resize(sig, name, [1, hp.n_head, self._cache_len, hp.head_dim])
            self._wrapper.AllocateTensors(sig.subgraph)
            self._allocated[key] = self._cache_len
            for name in self._names():
                self._view(key, name).fill(0.0)  # never NaN: see _replan
        padded = np.zeros([t], np.int32)
        padded[:n] = tokens
        self._view(key, "tokens")[:] = padded
        self._view(key, "start")[:] = start
        self._view(key, "length")[:] = n
        self._view(key, "bias")[:] = np.where(np.arange(self._cache_len) < start, 0.0,
                                              model.MASK_VALUE)[None]
        for name in self._names():  # the row's filled slots (the rest is masked)
            self._view(key, name)[0, :, :start] = self._view(STEP, name)[row, :, :start]
        self._invoke(key)
        for layer in range(hp.n_layer):
            for kind in "kv":
                # [H, n, D] of this chunk into row `row` of the step's cache [B, H, S, D]
                self._view(STEP, _cache_name(kind, layer))[row, :, start:start + n] = \
                    self._view(key, kind)[layer, :, :n]
        return self._output(key, "logits")[0]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cache slots of row src to row dst (rows sharing a prompt)."""
        self._check_copy(src, dst, length)
        if src == dst:
            return
        for name in self._names():
            view = self._view(STEP, name)  # [B, H, S, D]
            view[dst, :, :length] = view[src, :, :length]

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One new token per row at its own position (positions[b] <= n_ctx - 1; row b's slots
        0..positions[b]-1 must be filled). Writes the new key/value at slot positions[b].
        Returns logits [rows, n_vocab] float32 (a copy). Grows the cache length (to the next
        size among 128, 256, 512, ..., n_ctx, copying the kept slots) when a position needs it."""
        tokens, positions = self._check_step(tokens, positions)
        self._fit(int(positions.max()) + 1)
        self._view(STEP, "tokens")[:] = tokens
        self._view(STEP, "positions")[:] = positions
        # row b sees slots 0..positions[b]-1: whatever later slots hold is stale
        self._view(STEP, "bias")[:] = np.where(
            np.arange(self._cache_len)[None, :] < positions[:, None], 0.0, model.MASK_VALUE)
        self._invoke(STEP)
        self._write_new(positions)
        return self._output(STEP, "logits")

    def _write_new(self, positions: np.ndarray) -> None:
        """Write this step's keys/values into slot positions[b] of each row b."""
        rows = np.arange(self._rows)
        for kind in "kv":
            new = self._view(STEP, "new_" + kind)  # [L, B, H, D], one view for every layer
            for layer in range(self.hparams.n_layer):
                # [B, H, S, D] indexed at (b, :, positions[b]) for every b -> [B, H, D]
                self._view(STEP, _cache_name(kind, layer))[rows, :, positions] = new[layer]
            del new
