"""The decode-time key/value cache: preallocated variables, written and read in place.

The decode loop (gpt2tf.decode) feeds one position per step and keeps the cache in variables,
so a step reads the weights once and touches only the new position of the cache (an in-place
row scatter, no concatenation).
"""

import tensorflow as tf

from gpt2tf.hparams import HParams

tf1 = tf.compat.v1


class KVCache:
    """Keys and values of every layer in non-trainable variables, time-major [n_ctx, B, H, D].

    Writes are in-place row scatters at pos..pos+T-1 and reads gather rows 0..pos+T-1, so a step
    touches only the positions it needs. (A dense read after a slice-assign would copy the
    whole variable every step: TF keeps sparsely-written variables in copy-on-read mode.)
    One variable per layer and per k/v, so no write waits on another layer's reads.
    """

    def __init__(self, hparams: HParams, pos: tf.Tensor, scope: str = "kv_cache"):
        self.hparams = hparams
        self.pos = pos  # int32 scalar: the first cache slot this step writes
        self._step_rows = None  # (slot, rows to read) of the one-position step graph
        shape = tf.TensorShape([hparams.n_ctx, None, hparams.n_head, hparams.head_dim])
        with tf1.variable_scope(scope):
            self.keys, self.values = [], []
            for i in range(hparams.n_layer):
                for store, name in ((self.keys, "k"), (self.values, "v")):
                    store.append(
                        tf1.Variable(
                            tf.zeros([hparams.n_ctx, 0, hparams.n_head, hparams.head_dim]),
                            shape=shape, trainable=False, use_resource=True,
                            collections=[tf1.GraphKeys.LOCAL_VARIABLES],
                            name=f"h{i}_{name}",
                        )
                    )

    def reset_op(self, batch_size: tf.Tensor) -> tf.Operation:
        """(Re)allocate the cache for `batch_size` rows. Stale contents are never read."""
        zeros = tf.zeros(
            [self.hparams.n_ctx, batch_size, self.hparams.n_head, self.hparams.head_dim]
        )
        return tf.group([v.assign(zeros) for v in self.keys + self.values])

    def _write_read(self, layer: int, slots, visible, k: tf.Tensor, v: tf.Tensor):
        """Scatter k, v ([T, B, H, D]) into rows `slots`, then read rows `visible` of each."""
        out = []
        for var, new in ((self.keys[layer], k), (self.values[layer], v)):
            write = tf1.scatter_update(var, slots, new)
            with tf.control_dependencies([write]):
                out.append(var.sparse_read(visible))  # [S, B, H, D]
        return out[0], out[1]

    def update_rows(self, layer: int, k: tf.Tensor, v: tf.Tensor):
        """One new position: write k, v ([1, B, H, D]) at pos; return rows 0..pos [S, B, H, D]."""
        if self._step_rows is None:  # shared by every layer of the step graph
            self._step_rows = (self.pos[None], tf.range(self.pos + 1))
        return self._write_read(layer, *self._step_rows, k, v)

    def update_time_major(self, layer: int, k: tf.Tensor, v: tf.Tensor):
        """Write k, v ([B, T, H, D]) at pos..pos+T-1; return all keys/values [S, B, H, D]."""
        t = tf.shape(k)[1]
        slots = self.pos + tf.range(t)  # [T]
        visible = tf.range(self.pos + t)  # [S]
        to_rows = [1, 0, 2, 3]  # [B, T, H, D] -> [T, B, H, D]
        return self._write_read(
            layer, slots, visible, tf.transpose(k, to_rows), tf.transpose(v, to_rows)
        )

    def update(self, layer: int, k: tf.Tensor, v: tf.Tensor):
        """Write k, v ([B, T, H, D]) at pos..pos+T-1; return all keys/values [B, H, pos+T, D]."""
        k_all, v_all = self.update_time_major(layer, k, v)
        return tf.transpose(k_all, [1, 2, 0, 3]), tf.transpose(v_all, [1, 2, 0, 3])
