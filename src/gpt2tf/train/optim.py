"""Optimizers and learning-rate schedules for the training step (TF1-style graph ops).

Adam and SGD are TensorFlow's own (fused C++ update kernels, the slot names gpt-2-simple and
nshepperd's checkpoints use: `<var>/Adam`, `<var>/Adam_1`). Adafactor is written here: factored
second moments (a row and a column vector per matrix instead of a full copy), no first moment,
update clipping, so its state is a few MB where Adam's is twice the model.

The learning rate is a graph tensor of the global step, so a restored step restores the schedule.
"""

import math

import tensorflow as tf

from gpt2tf import settings
from gpt2tf.checkpoints import var_name

tf1 = tf.compat.v1

# Adam's constants as gpt-2-simple and nshepperd use them (TF's defaults).
ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON = 0.9, 0.999, 1e-8
# Adafactor (Shazeer & Stern 2018, section 7): beta2_t = 1 - t^-0.8, update clipping at RMS 1.
ADAFACTOR_DECAY = 0.8
ADAFACTOR_CLIP = 1.0
ADAFACTOR_EPS = 1e-30  # added to squared gradients so a zero gradient never divides by zero
SLOT_SCOPE = "optimizer"  # our own slots live outside "model/": weight readers ignore them


def check_optimizer(name: str) -> str:
    return settings.by_name(settings.TRAIN)["optimizer"].check(name)


def check_schedule(name: str) -> str:
    return settings.by_name(settings.TRAIN)["lr_schedule"].check(name)


def learning_rate(
    step: tf.Tensor,
    *,
    base: float,
    warmup_steps: int = 0,
    schedule: str = "constant",
    decay_steps: int = 0,
    min_ratio: float = 0.1,
) -> tf.Tensor:
    """The learning rate of the update that follows `step` completed updates (float32 scalar).

    Linear warmup from base/warmup_steps to base over the first warmup_steps updates; then
    constant, or a cosine from base down to base * min_ratio at update decay_steps (and flat
    after it). decay_steps counts from the start of the run, warmup included.
    """
    check_schedule(schedule)
    s = tf.cast(step, tf.float32)
    factor = tf.constant(1.0)
    if warmup_steps > 0:
        factor = tf.minimum(1.0, (s + 1.0) / float(warmup_steps))
    if schedule == "cosine" and decay_steps > warmup_steps:
        progress = tf.clip_by_value(
            (s - float(warmup_steps)) / float(decay_steps - warmup_steps), 0.0, 1.0
        )
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        factor = factor * (min_ratio + (1.0 - min_ratio) * cosine)
    return tf.identity(base * factor, name="learning_rate")


def learning_rate_value(
    step: int, *, base: float, warmup_steps: int = 0, schedule: str = "constant",
    decay_steps: int = 0, min_ratio: float = 0.1,
) -> float:
    """`learning_rate` in plain Python (for planning and tests)."""
    factor = 1.0
    if warmup_steps > 0:
        factor = min(1.0, (step + 1.0) / warmup_steps)
    if schedule == "cosine" and decay_steps > warmup_steps:
        progress = min(1.0, max(0.0, (step - warmup_steps) / (decay_steps - warmup_steps)))
        factor *= min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base * factor


class Adafactor:
    """Adafactor without parameter scaling or relative steps: `learning_rate` is the step size.

    Each update divides the gradient by the root of a running mean of its square. For a matrix
    that mean is factored: the outer product of row and column means, renormalised. Updates
    whose RMS exceeds ADAFACTOR_CLIP are scaled down to it.
    """

    def __init__(self, learning_rate: tf.Tensor):
        self.learning_rate = learning_rate
        self.variables: list = []

    @staticmethod
    def _factored(shape: list[int]) -> bool:
        dims = [d for d in shape if d != 1]
        return len(dims) >= 2

    def _slot(self, var, suffix: str, shape: list[int]):
        v = tf1.Variable(
            tf.zeros(shape, tf.float32), trainable=False, use_resource=True,
            name=f"{SLOT_SCOPE}/adafactor/{var_name(var)}/{suffix}",
        )
        self.variables.append(v)
        return v

    def apply_gradients(self, grads_and_vars, global_step) -> tf.Operation:
        t = tf.cast(global_step, tf.float32) + 1.0  # this update's number, from 1
        beta2 = 1.0 - tf.pow(t, -ADAFACTOR_DECAY)
        lr = self.learning_rate
        updates = []
        for g, var in grads_and_vars:
            shape = var.shape.as_list()
            g2 = tf.square(g) + ADAFACTOR_EPS
            if self._factored(shape):
                # [..., R, C]: keep a mean over columns per row and over rows per column
                vr = self._slot(var, "vr", shape[:-1])
                vc = self._slot(var, "vc", shape[:-2] + shape[-1:])
                new_vr = beta2 * vr + (1.0 - beta2) * tf.reduce_mean(g2, axis=-1)
                new_vc = beta2 * vc + (1.0 - beta2) * tf.reduce_mean(g2, axis=-2)
                row = new_vr / tf.reduce_mean(new_vr, axis=-1, keepdims=True)  # [..., R]
                u = g * tf.math.rsqrt(row)[..., None] * tf.math.rsqrt(new_vc)[..., None, :]
                assigns = [vr.assign(new_vr), vc.assign(new_vc)]
            else:
                v = self._slot(var, "v", shape)
                new_v = beta2 * v + (1.0 - beta2) * g2
                u = g * tf.math.rsqrt(new_v)
                assigns = [v.assign(new_v)]
            rms = tf.sqrt(tf.reduce_mean(tf.square(u)))
            u = u / tf.maximum(1.0, rms / ADAFACTOR_CLIP)
            with tf.control_dependencies(assigns):
                updates.append(var.assign_sub(lr * u))
        # Data parallel with several local replicas, each updates its own copy of the weights
        # in the replica context: the step (which the update and the learning rate read) may
        # advance only after every replica's update, so the count goes through a merge_call.
        ctx = tf.distribute.get_replica_context()
        if ctx is None:  # built in a strategy's cross-replica context
            return _advance(tf.distribute.get_strategy(), tf.group(updates), global_step)
        return ctx.merge_call(_advance, args=(tf.group(updates), global_step))


def _advance(strategy, update, global_step) -> tf.Operation:
    with tf.control_dependencies(strategy.experimental_local_results(update)):
        return tf.group(global_step.assign_add(1), name="adafactor_apply")


class _TFOptimizer:
    """tf.compat.v1's Adam or SGD behind the same two attributes as Adafactor.

    replicated: the gradients are already the replicas' mean (gpt2tf.train.distributed);
    without skipping its own aggregation TF1's optimizer would sum them across replicas."""

    def __init__(self, opt, *, replicated: bool = False):
        self._opt = opt
        self._replicated = replicated
        self.variables: list = []

    def apply_gradients(self, grads_and_vars, global_step) -> tf.Operation:
        before = {id(v) for v in tf1.global_variables()}
        op = self._opt.apply_gradients(grads_and_vars, global_step=global_step,
                                       skip_gradients_aggregation=self._replicated)
        self.variables = [v for v in tf1.global_variables() if id(v) not in before]
        return op


def make_optimizer(name: str, learning_rate: tf.Tensor, *, replicated: bool = False):
    """An object with apply_gradients(grads_and_vars, global_step) -> op, and `variables`
    (its state, filled in by apply_gradients) for the checkpoint. replicated: the gradients
    given are already averaged across replicas (Adafactor never aggregates)."""
    check_optimizer(name)
    if name == "adam":
        return _TFOptimizer(tf1.train.AdamOptimizer(
            learning_rate, beta1=ADAM_BETA1, beta2=ADAM_BETA2, epsilon=ADAM_EPSILON
        ), replicated=replicated)
    if name == "sgd":
        return _TFOptimizer(tf1.train.GradientDescentOptimizer(learning_rate),
                            replicated=replicated)
    return Adafactor(learning_rate)
