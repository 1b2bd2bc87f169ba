"""GPT-2's graph: a pure function of its inputs and OpenAI's variables.

Variable scopes and shapes are exactly those of OpenAI's released checkpoints (`model/wte`,
`model/h3/attn/c_attn/w` of shape [1, nx, nf], ...), so official weights, gpt-2-simple runs and
ours load into the same graph. No I/O and no session here: callers build, restore and run.

Two ways to attend:
- training and scoring: `cache=None`, a causal mask over the T positions of X;
- decoding: a `cache` object (see gpt2tf.sample.KVCache) keeps keys/values of earlier positions,
  so each new token costs one position, not the whole prefix.

With `lora` (a `Lora`), the chosen conv1d layers also read low-rank adapters, variables beside
their weight (`model/h3/attn/c_attn/lora_A`, `lora_B`): the graph stays a pure function of its
inputs and variables, and OpenAI's weights are untouched (gpt2tf.lora trains, merges, exports).
"""

import math
from dataclasses import dataclass

import tensorflow as tf

from gpt2tf import remat
from gpt2tf.hparams import HParams

tf1 = tf.compat.v1

# A large negative bias rather than -inf keeps fully masked rows (left padding) NaN-free.
MASK_VALUE = -1e9


@dataclass(frozen=True)
class Precision:
    """Which dtype the matmuls run in. Weights, norms, softmax and the loss stay in float32."""

    compute_dtype: tf.DType = tf.float32

    def cast(self, x: tf.Tensor) -> tf.Tensor:
        return x if x.dtype == self.compute_dtype else tf.cast(x, self.compute_dtype)


FP32 = Precision(tf.float32)
BF16 = Precision(tf.bfloat16)

# The conv1d layers adapters may go on, as PEFT's target_modules name them for GPT-2: a bare
# name matches it in every block ("c_proj": attention's and the MLP's), a path only that one.
LORA_TARGETS = ("c_attn", "c_proj", "c_fc", "attn/c_proj", "mlp/c_proj")
LORA_SUFFIXES = ("lora_A", "lora_B")  # variable names beside a layer's w and b


@dataclass(frozen=True)
class Lora:
    """Low-rank adapters (Hu et al. 2021) on some conv1d layers, PEFT's LoRA: a layer computes
    x W + b + (alpha / rank) (x A) B with A: [nx, rank] and B: [rank, nf], so W + scale * A B is
    the merged weight in conv1d's [nx, nf] layout. B starts at zero: training starts from the
    base model exactly."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def applies(self, layer: str) -> bool:
        """Whether the layer `layer` ("model/h0/attn/c_attn") carries adapters."""
        return any(layer.endswith("/" + t) for t in self.targets)


def shape_list(x: tf.Tensor) -> list:
    """Static dims where known, dynamic ones elsewhere."""
    static = x.shape.as_list()
    dynamic = tf.shape(x)
    return [dynamic[i] if s is None else s for i, s in enumerate(static)]


def gelu(x: tf.Tensor) -> tf.Tensor:
    # GPT-2's tanh approximation (HF's "gelu_new"); the exact erf form differs by ~1e-3.
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def norm(x: tf.Tensor, scope: str, *, epsilon: float = 1e-5) -> tf.Tensor:
    """LayerNorm over the last axis with OpenAI's variable names g (gain) and b (bias)."""
    with tf1.variable_scope(scope):
        n_state = x.shape[-1]
        g = tf1.get_variable("g", [n_state], initializer=tf1.constant_initializer(1.0))
        b = tf1.get_variable("b", [n_state], initializer=tf1.constant_initializer(0.0))
        u = tf.reduce_mean(x, axis=-1, keepdims=True)
        s = tf.reduce_mean(tf.square(x - u), axis=-1, keepdims=True)
        return (x - u) * tf.math.rsqrt(s + epsilon) * g + b


def conv1d(x: tf.Tensor, scope: str, nf: int, *, precision: Precision, stddev: float = 0.02,
           lora: Lora | None = None):
    """A dense layer on [N, nx] rows -> [N, nf].

    The weight is stored as [1, nx, nf] because OpenAI's checkpoint says so. Activations stay
    2-D through the blocks: no reshapes (and no shape ops) around every matmul.
    """
    with tf1.variable_scope(scope):
        nx = x.shape[-1]
        w = tf1.get_variable(
            "w", [1, nx, nf], initializer=tf1.random_normal_initializer(stddev=stddev)
        )
        b = tf1.get_variable("b", [nf], initializer=tf1.constant_initializer(0.0))
        c = tf.matmul(precision.cast(x), precision.cast(tf.reshape(w, [nx, nf])))  # [N, nf]
        c = tf.cast(c, tf.float32)
        if lora is not None and lora.applies(tf1.get_variable_scope().name):
            c = c + _lora_delta(x, nx, nf, lora=lora, precision=precision)
        return c + b


def _lora_delta(x: tf.Tensor, nx: int, nf: int, *, lora: Lora, precision: Precision):
    """scale * (x A) B on [N, nx] rows -> [N, nf]; the [nx, nf] product A B is never formed.

    A starts as PEFT's (kaiming-uniform with a=sqrt(5): U(-1/sqrt(nx), 1/sqrt(nx))), B at zero.
    """
    bound = 1.0 / math.sqrt(nx)
    a = tf1.get_variable(
        "lora_A", [nx, lora.rank], initializer=tf1.random_uniform_initializer(-bound, bound)
    )
    b = tf1.get_variable("lora_B", [lora.rank, nf], initializer=tf1.zeros_initializer())
    xa = tf.matmul(precision.cast(x), precision.cast(a))  # [N, rank]
    d = tf.matmul(xa, precision.cast(b))  # [N, nf]
    return lora.scale * tf.cast(d, tf.float32)


def attn(x, scope, *, layer, hparams: HParams, batch, t, bias, cache, precision: Precision,
         lora: Lora | None = None):
    """Multi-head causal self-attention.

    x: [B*T, C]; bias: additive mask broadcastable to [B, H, T, S] (0 keep, MASK_VALUE drop),
    where S = T without a cache and S = positions so far with one; [S, B, 1] when decoding
    one position (T=1) over a cache.
    """
    n_state, n_head, head_dim = hparams.n_embd, hparams.n_head, hparams.head_dim
    with tf1.variable_scope(scope):
        c = conv1d(x, "c_attn", n_state * 3, precision=precision, lora=lora)  # [B*T, 3C]
        if cache is not None and isinstance(t, int) and t == 1:
            # One new position (decoding): attend straight over the time-major cache with
            # elementwise products, so the cached keys/values are never transposed. Every op
            # here runs once per layer and token, so the new row is reshaped, never transposed.
            q, k, v = tf.unstack(tf.reshape(c, [1, -1, 3, n_head, head_dim]), axis=2)
            q = q * (1.0 / math.sqrt(head_dim))  # [1, B, H, D]
            k, v = cache.update_rows(layer, k, v)  # [S, B, H, D]
            w = tf.reduce_sum(k * q, axis=-1) + bias  # [S, B, H]; bias: [S, B, 1]
            # Softmax over S by hand, normalised after the weighted sum: tf.nn.softmax over
            # axis 0 would transpose twice, and oneDNN rebuilds its softmax and transpose
            # kernels for every new S, i.e. every step (~0.1 ms per layer).
            e = tf.exp(w - tf.reduce_max(w, axis=0, keepdims=True))  # [S, B, H]
            a = tf.reduce_sum(v * e[..., None], axis=0)  # [B, H, D]
            a = a / tf.reduce_sum(e, axis=0)[..., None]
            a = tf.reshape(a, [-1, n_state])  # [B, C]
            return conv1d(a, "c_proj", n_state, precision=precision, lora=lora)
        q, k, v = tf.unstack(tf.reshape(c, [batch, t, 3, n_head, head_dim]), axis=2)  # [B,T,H,D]
        q = q * (1.0 / math.sqrt(head_dim))  # scale q, not the [B, H, T, S] scores
        q = tf.transpose(q, [0, 2, 1, 3])  # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, H, S, D] with the earlier positions
        else:
            k, v = tf.transpose(k, [0, 2, 1, 3]), tf.transpose(v, [0, 2, 1, 3])
        # [B, H, T, D] x [B, H, S, D]^T -> [B, H, T, S]
        w = tf.matmul(precision.cast(q), precision.cast(k), transpose_b=True)
        w = tf.cast(w, tf.float32) + bias
        w = tf.nn.softmax(w, axis=-1)
        a = tf.matmul(precision.cast(w), precision.cast(v))  # [B, H, T, D]
        a = tf.reshape(tf.transpose(tf.cast(a, tf.float32), [0, 2, 1, 3]), [-1, n_state])
        return conv1d(a, "c_proj", n_state, precision=precision, lora=lora)  # [B*T, C]


def mlp(x, scope, *, hparams: HParams, precision: Precision, lora: Lora | None = None):
    with tf1.variable_scope(scope):
        h = gelu(conv1d(x, "c_fc", hparams.n_embd * 4, precision=precision, lora=lora))
        # h: [B*T, 4C]
        return conv1d(h, "c_proj", hparams.n_embd, precision=precision, lora=lora)  # [B*T, C]


def block(x, scope, *, layer, hparams, batch, t, bias, cache, precision, lora=None):
    """One pre-norm transformer block on [B*T, C]: x + attn(ln_1(x)), then + mlp(ln_2(x))."""
    with tf1.variable_scope(scope):
        x = x + attn(
            norm(x, "ln_1"), "attn", layer=layer, hparams=hparams, batch=batch, t=t, bias=bias,
            cache=cache, precision=precision, lora=lora,
        )
        return x + mlp(norm(x, "ln_2"), "mlp", hparams=hparams, precision=precision, lora=lora)


def causal_bias(t: tf.Tensor) -> tf.Tensor:
    """[1, 1, T, T] additive mask: position i sees positions j <= i."""
    i = tf.range(t)[:, None]
    j = tf.range(t)[None, :]
    return tf.where(j <= i, 0.0, MASK_VALUE)[None, None]


def model(
    hparams: HParams,
    X: tf.Tensor,
    *,
    cache=None,
    pos=None,
    pad=None,
    scope: str = "model",
    reuse=tf1.AUTO_REUSE,
    last_only: bool = False,
    precision: Precision = FP32,
    recompute: bool = False,
    lora: Lora | None = None,
) -> dict:
    """GPT-2 forward pass.

    X: [B, T] token ids. Without a cache, positions are 0..T-1 and attention is causal.
    With a cache, X holds the tokens at cache positions pos..pos+T-1 (pos: int32 scalar) and
    pad: [B] counts left-padding positions per row: they are never attended to, and position
    embeddings count from the first real token, so a padded row gives the logits it would alone.
    Returns {"logits": [B, T, V] (or [B, V] for the last position with last_only), "hidden":
    the final-norm activations in the same layout}.
    `recompute` rematerialises each block in the backward pass (memory-saving gradients).
    `lora` adds adapters to the layers it targets (see `Lora`).
    """
    with tf1.variable_scope(scope, reuse=reuse):
        batch, t = shape_list(X)
        wpe = tf1.get_variable(
            "wpe", [hparams.n_ctx, hparams.n_embd],
            initializer=tf1.random_normal_initializer(stddev=0.01),
        )
        wte = tf1.get_variable(
            "wte", [hparams.n_vocab, hparams.n_embd],
            initializer=tf1.random_normal_initializer(stddev=0.02),
        )
        if cache is None:
            positions = tf.range(t)[None, :]  # [1, T]
            bias = causal_bias(t)
        elif isinstance(t, int) and t == 1:
            # Decoding one position: the mask is built once per step, in the [S, B, 1] layout
            # the time-major attention adds it in.
            positions = tf.maximum(pos - pad, 0)[:, None]  # [B, 1]
            keys = tf.range(pos + 1)[:, None]  # [S, 1]
            bias = tf.where(keys >= pad[None, :], 0.0, MASK_VALUE)[:, :, None]  # [S, B, 1]
        else:
            cache_pos = pos + tf.range(t)  # [T] cache slots written by this call
            positions = tf.maximum(cache_pos[None, :] - pad[:, None], 0)  # [B, T]
            keys = tf.range(pos + t)  # [S]
            visible = (keys[None, None, :] <= cache_pos[None, :, None]) & (
                keys[None, None, :] >= pad[:, None, None]
            )  # [B, T, S]
            bias = tf.where(visible, 0.0, MASK_VALUE)[:, None]  # [B, 1, T, S]
        # Gather from plain reads: a ResourceGather would switch the variables to
        # copy-on-read mode, and every later read of wte (the LM head) would copy 150 MB.
        wte, wpe = wte.read_value(), wpe.read_value()
        h = tf.gather(wte, X) + tf.gather(wpe, positions)  # [B, T, C]
        h = tf.reshape(h, [-1, hparams.n_embd])  # [B*T, C]

        for layer in range(hparams.n_layer):
            kw = dict(layer=layer, hparams=hparams, batch=batch, t=t, bias=bias,
                      precision=precision, lora=lora)
            if recompute:
                h = _recomputed_block(h, **kw)
            else:
                h = block(h, f"h{layer}", cache=cache, **kw)

        h = norm(h, "ln_f")  # [B*T, C]
        if last_only:
            # [B, C]: the LM head is the biggest matmul; skip the positions nobody samples from
            h = tf.reshape(h, [batch, t, hparams.n_embd])[:, -1]
        # The LM head is tied to the token embedding: [N, C] x [V, C]^T -> [N, V]
        if last_only:
            # Decoding reads all of wte for a few rows: as [V, C] x [C, B] the BLAS streams
            # wte in its stored order (measured ~1.3x faster on CPU than [B, C] x [C, V]).
            logits = tf.transpose(
                tf.matmul(precision.cast(wte), precision.cast(h), transpose_b=True)
            )  # [B, V]
        else:
            logits = tf.matmul(precision.cast(h), precision.cast(wte), transpose_b=True)
        logits = tf.cast(logits, tf.float32)
        if not last_only:
            logits = tf.reshape(logits, [batch, t, hparams.n_vocab])
            h = tf.reshape(h, [batch, t, hparams.n_embd])
        return {"logits": logits, "hidden": h}


def _recomputed_block(h, *, layer, hparams, batch, t, bias, precision, lora):
    """A block whose activations are recomputed in the backward pass instead of stored.

    tf.recompute_grad saves nothing in a TF1-style graph (see gpt2tf.remat for why).
    """

    def fn(x):
        return block(
            x, f"h{layer}", layer=layer, hparams=hparams, batch=batch, t=t, bias=bias,
            cache=None, precision=precision, lora=lora,
        )

    return remat.recompute_grad(fn)(h)


def is_lora_name(name: str) -> bool:
    """Whether a variable or checkpoint name is an adapter's (or its optimizer slot's)."""
    return any(f"/{suffix}" in name for suffix in LORA_SUFFIXES)


def model_variables(scope: str = "model") -> list:
    """The model's weights in the current graph (what a checkpoint in OpenAI's layout holds):
    adapters are not among them (see `lora_variables`)."""
    return [v for v in tf1.global_variables()
            if v.name.startswith(scope + "/") and not is_lora_name(v.name)]


def lora_variables(scope: str = "model") -> list:
    """The adapters in the current graph (`lora_A`, `lora_B` of each targeted layer)."""
    return [v for v in tf1.global_variables()
            if v.name.startswith(scope + "/") and v.name.split(":")[0].rsplit("/", 1)[-1]
            in LORA_SUFFIXES]


def lora_shapes(hparams: HParams, lora: Lora) -> dict[str, list[int]]:
    """Checkpoint name -> shape of every adapter of `lora`, without building a graph."""
    out = {}
    for name, shape in variable_shapes(hparams).items():
        layer, leaf = name.rsplit("/", 1)
        if leaf == "w" and lora.applies(layer):
            out[layer + "/lora_A"] = [shape[1], lora.rank]
            out[layer + "/lora_B"] = [lora.rank, shape[2]]
    return out


def variable_shapes(hparams: HParams) -> dict[str, list[int]]:
    """Checkpoint name -> shape for every weight, computed without building a graph."""
    c, v = hparams.n_embd, hparams.n_vocab
    shapes = {"model/wte": [v, c], "model/wpe": [hparams.n_ctx, c]}
    for i in range(hparams.n_layer):
        p = f"model/h{i}/"
        for ln in ("ln_1", "ln_2"):
            shapes[p + ln + "/g"] = [c]
            shapes[p + ln + "/b"] = [c]
        for name, nx, nf in (
            ("attn/c_attn", c, 3 * c), ("attn/c_proj", c, c),
            ("mlp/c_fc", c, 4 * c), ("mlp/c_proj", 4 * c, c),
        ):
            shapes[p + name + "/w"] = [1, nx, nf]
            shapes[p + name + "/b"] = [nf]
    shapes["model/ln_f/g"] = [c]
    shapes["model/ln_f/b"] = [c]
    return shapes
