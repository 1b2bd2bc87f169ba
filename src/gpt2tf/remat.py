"""Memory-saving gradients that work in TF1-style graphs: recompute each block backward.

Why not tf.recompute_grad: in a tf.compat.v1 graph (not a tf.function) its backward pass gates
the recomputation on the incoming gradient with `where(elem_bool == elem_bool, 0, nan)`. Outside
eager execution, Python `==` on two tensors is object identity, so the condition is the constant
True and the gate disappears: the executor runs every "recomputed" block during the forward
pass, right after the original, and keeps both sets of activations alive. Measured on a 124M
shape: no memory saved at all. Here every op of the recomputation, weight reads included, gets
a control dependency on the block's output gradient, so it cannot start before that gradient
exists and its activations live only while that block's backward runs.

`model_logits` mirrors gpt2tf.model.model (no cache) with each block wrapped this way; it can go
once model.py's recompute path uses `recompute_grad` from here (see the trainer's report).
"""

import tensorflow as tf

from gpt2tf import model
from gpt2tf.hparams import HParams

tf1 = tf.compat.v1


def recompute_grad(fn):
    """Wrap fn(x) -> y (reading variables via get_variable) so its backward pass recomputes it.

    Only the block input x is kept from the forward pass.
    """

    def wrapped(x):
        outer = tf1.get_variable_scope()

        @tf.custom_gradient
        def inner(x):
            y = fn(x)

            def grad(dy, variables=None):
                variables = list(variables or [])
                # Everything built here waits for dy: see the module docstring.
                with tf.control_dependencies([dy]):
                    x_again = tf.identity(x)
                    with tf1.variable_scope(outer, reuse=True):
                        y_again = fn(x_again)
                grads = tf.gradients(y_again, [x_again] + variables, grad_ys=dy)
                grads = [
                    tf.zeros_like(v) if g is None else g
                    for g, v in zip(grads, [x_again] + variables)
                ]
                return grads[0], grads[1:]

            return y, grad

        return inner(x)

    return wrapped


def model_logits(
    hparams: HParams, X: tf.Tensor, *, precision: model.Precision = model.FP32,
    scope: str = "model",
) -> tf.Tensor:
    """GPT-2's full causal forward pass over X: [B, T] -> logits [B, T, V] (float32), with
    each block recomputed in the backward pass. Same variables and numbers as model.model."""
    with tf1.variable_scope(scope, reuse=tf1.AUTO_REUSE):
        batch, t = model.shape_list(X)
        wpe = tf1.get_variable(
            "wpe", [hparams.n_ctx, hparams.n_embd],
            initializer=tf1.random_normal_initializer(stddev=0.01),
        )
        wte = tf1.get_variable(
            "wte", [hparams.n_vocab, hparams.n_embd],
            initializer=tf1.random_normal_initializer(stddev=0.02),
        )
        bias = model.causal_bias(t)  # [1, 1, T, T]
        wte, wpe = wte.read_value(), wpe.read_value()
        h = tf.gather(wte, X) + tf.gather(wpe, tf.range(t)[None, :])  # [B, T, C]
        h = tf.reshape(h, [-1, hparams.n_embd])  # [B*T, C]
        for layer in range(hparams.n_layer):

            def block(x, layer=layer):
                return model.block(
                    x, f"h{layer}", layer=layer, hparams=hparams, batch=batch, t=t,
                    bias=bias, cache=None, precision=precision,
                )

            h = recompute_grad(block)(h)
        h = model.norm(h, "ln_f")  # [B*T, C]
        logits = tf.matmul(precision.cast(h), precision.cast(wte), transpose_b=True)  # [B*T, V]
        return tf.reshape(tf.cast(logits, tf.float32), [batch, t, hparams.n_vocab])
