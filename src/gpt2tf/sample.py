"""Graph-level samplers: temperature, top-k and top-p by inverse-CDF picking. No I/O, no session.

Sampling takes its randomness from the caller as one uniform number per row (inverse-CDF
sampling). The caller draws them from a per-sample seeded numpy generator, so a sample depends
on its own seed, not on earlier calls in the session nor on its batch-mates' seeds. (The BLAS
may round differently for different batch sizes, which can rarely flip a token: the server pads
batches to a fixed size where exact reproducibility matters.)
"""

import tensorflow as tf

tf1 = tf.compat.v1

# top_p at or above this means "off": keeps every token even where float sums round to 1.0.
TOP_P_OFF = 2.0

PICK_BLOCK = 256  # tokens per block of the two-level inverse-CDF search


def _pick(probs: tf.Tensor, uniform: tf.Tensor) -> tf.Tensor:
    """Inverse CDF: the first index whose cumulative mass exceeds u * total. probs: [B, N] >= 0.

    Two levels, so no cumulative sum runs over the whole vocabulary (TF's Cumsum takes ~0.6 ms
    per row of 50k on CPU): the block whose running mass passes the target, then the index
    inside that block. The pick always has nonzero probability.
    """
    rows, n = tf.shape(probs)[0], tf.shape(probs)[1]
    n_blocks = (n + PICK_BLOCK - 1) // PICK_BLOCK
    p = tf.pad(probs, [[0, 0], [0, n_blocks * PICK_BLOCK - n]])
    p = tf.reshape(p, [rows, n_blocks, PICK_BLOCK])  # [B, nb, K]
    block_mass = tf.reduce_sum(p, axis=-1)  # [B, nb]
    block_cum = tf.cumsum(block_mass, axis=-1)  # [B, nb]
    target = uniform[:, None] * block_cum[:, -1:]  # [B, 1]
    block = tf.searchsorted(block_cum, target, side="right")[:, 0]  # [B]
    block = tf.minimum(block, n_blocks - 1)
    before = tf.gather(block_cum - block_mass, block, batch_dims=1)  # [B] mass of earlier blocks
    inner = tf.cumsum(tf.gather(p, block, batch_dims=1), axis=-1)  # [B, K]
    # Within the block the target must stay below its mass (rounding could nudge it past).
    rest = tf.minimum(tf.maximum(target[:, 0] - before, 0.0), inner[:, -1] * (1.0 - 2.0**-20))
    idx = tf.searchsorted(inner, rest[:, None], side="right")[:, 0]  # [B]
    return tf.minimum(block * PICK_BLOCK + idx, n - 1)


def sample_plain(logits: tf.Tensor, *, temperature: tf.Tensor, uniform: tf.Tensor) -> tf.Tensor:
    """Sample from softmax(logits / temperature) over the whole vocabulary.

    logits: [B, V]; temperature, uniform: [B]. Returns int32 token ids [B].
    """
    probs = tf.nn.softmax(logits / temperature[:, None], axis=-1)  # [B, V]
    return tf.cast(_pick(probs, uniform), tf.int32)


def sample_filtered(
    logits: tf.Tensor,
    *,
    temperature: tf.Tensor,
    top_k: tf.Tensor,
    top_p: tf.Tensor,
    k_max: tf.Tensor,
    uniform: tf.Tensor,
) -> tf.Tensor:
    """Top-k, then nucleus (top-p) sampling, with per-row settings.

    logits: [B, V]; temperature, top_p, uniform: [B] float; top_k: [B] int (0 = off);
    k_max: int32 scalar >= every row's effective k (V where some row needs the full sort).
    top-p keeps the smallest set of most likely tokens whose mass reaches p (at least one).
    """
    logits = logits / temperature[:, None]
    values, indices = tf.math.top_k(logits, k=k_max, sorted=True)  # [B, K] each, descending
    rank = tf.range(k_max)[None, :]  # [1, K]
    k_row = tf.where(top_k > 0, top_k, k_max)[:, None]  # [B, 1]
    values = tf.where(rank < k_row, values, -float("inf"))
    probs = tf.nn.softmax(values, axis=-1)  # [B, K]
    mass_before = tf.cumsum(probs, axis=-1, exclusive=True)
    keep = (mass_before < top_p[:, None]) | (rank == 0)
    probs = tf.where(keep, probs, 0.0)
    choice = _pick(probs, uniform)  # [B] index into the sorted list
    return tf.gather(indices, choice, batch_dims=1)
