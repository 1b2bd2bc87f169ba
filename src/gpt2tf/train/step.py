"""One optimizer step as graph nodes: loss, gradients, accumulation, clipping, update.

This module knows nothing about files, data or logging; the loop in gpt2tf.train.loop feeds it
batches and runs its ops. The batch arrives as a tensor (a placeholder today; a distributed
input later), so the same step can be built per replica.

- The loss is the mean next-token cross-entropy of a window of T+1 tokens: T predictions from
  T inputs (no sliced copy of the [B, T, V] logits).
- `accumulate_gradients` A > 1 runs A micro-batches and applies their mean gradient (the
  gradient of the mean loss over A*B windows); nshepperd's AccumulatingOptimizer applied the sum.
- bf16 mixed precision runs the matmuls in bfloat16; weights, layer norms, softmax, the loss
  and the optimizer stay float32 (see gpt2tf.model.Precision).
- `memory_saving_gradients` recomputes each block's activations in the backward pass.
- `lora` (gpt2tf.model.Lora) trains adapters alone: the gradients, the accumulators and the
  optimizer's state are the adapters' only, and OpenAI's weights stay as restored.
- `reduce` (default: none) maps [loss, *gradients] to their means over the replicas of a
  data-parallel run (gpt2tf.train.distributed), once per optimizer step and before clipping;
  the optimizer then applies them as they are (skip_gradients_aggregation). With several
  local replicas (MirroredStrategy) each builds its own TrainStep; `joined` makes them one.
- No random ops: input noise (nshepperd's --noise) comes in through `inputs`, drawn by the loop
  from a seeded generator, so a step is a pure function of its feeds and the variables.
"""

import tensorflow as tf

from gpt2tf import model, settings
from gpt2tf.checkpoints import var_name
from gpt2tf.hparams import HParams
from gpt2tf.train import optim
from gpt2tf.train.config import StepConfig

tf1 = tf.compat.v1

TRAIN_SCOPE = "train"  # accumulators live here (local variables: never checkpointed)


def check_precision(name: str) -> model.Precision:
    """The model.Precision of a --precision name."""
    settings.by_name(settings.TRAIN)["precision"].check(name)
    return {"fp32": model.FP32, "bf16": model.BF16}[name]


def lm_loss(
    hparams: HParams,
    tokens: tf.Tensor,
    *,
    inputs: tf.Tensor | None = None,
    precision: model.Precision = model.FP32,
    recompute: bool = False,
    lora: model.Lora | None = None,
) -> tf.Tensor:
    """Mean next-token cross-entropy (float32 scalar) of windows tokens: [B, T+1].

    The model reads `inputs` ([B, T], default tokens[:, :-1]) and is scored on tokens[:, 1:].
    """
    if inputs is None:
        inputs = tokens[:, :-1]  # [B, T]
    labels = tokens[:, 1:]  # [B, T]
    logits = model.model(hparams, inputs, precision=precision, recompute=recompute,
                         lora=lora)["logits"]
    # [B, T, V]
    # logits are float32 whatever the precision: the softmax and the loss need the range
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)  # [B, T]
    return tf.reduce_mean(ce)


def trainable(variables: list, only_transformer_layers: bool) -> list:
    """The weights the optimizer updates: all, or only the blocks model/h<i>/ (nshepperd)."""
    if only_transformer_layers:
        return [v for v in variables if v.name.startswith("model/h")]
    return list(variables)


def _dense(g, var):
    # The embedding gathers give IndexedSlices; accumulation and clipping want plain tensors.
    if g is None:
        return tf.zeros_like(var)
    if isinstance(g, tf.IndexedSlices):
        return tf.convert_to_tensor(g)
    return g


class TrainStep:
    """Graph nodes of one training step over the model's variables (built in the current graph).

    tokens: [B, T+1] int32 windows of one micro-batch. With accumulate_gradients A == 1 a step
    is one run of `train_op`; otherwise A runs of `micro_op` (one micro-batch each) and then
    one run of `train_op`. See `run`. With `lora` only the adapters train.
    """

    def __init__(
        self,
        hparams: HParams,
        cfg: StepConfig,
        tokens: tf.Tensor,
        *,
        inputs: tf.Tensor | None = None,
        lora: model.Lora | None = None,
        reduce=None,
    ):
        optim.check_optimizer(cfg.optimizer)
        precision = check_precision(cfg.precision)
        self.cfg = cfg
        self.accumulate = int(cfg.accumulate_gradients)
        assert self.accumulate >= 1
        self.reduce = reduce

        self.global_step = tf1.train.get_or_create_global_step()
        self.loss = lm_loss(
            hparams, tokens, inputs=inputs, precision=precision,
            recompute=cfg.memory_saving_gradients, lora=lora,
        )
        # Read before the optimizer exists: afterwards its slots also live under "model/".
        self.model_variables = model.model_variables()  # OpenAI's weights
        self.lora_variables = model.lora_variables()  # the adapters ([] without lora)
        if lora is not None:
            self.train_variables = list(self.lora_variables)
        else:
            self.train_variables = trainable(self.model_variables,
                                             cfg.only_train_transformer_layers)
        grads = tf.gradients(self.loss, self.train_variables)
        grads = [_dense(g, v) for g, v in zip(grads, self.train_variables)]

        self.learning_rate = optim.learning_rate(
            self.global_step, base=float(cfg.learning_rate), warmup_steps=cfg.warmup_steps,
            schedule=cfg.lr_schedule, decay_steps=cfg.lr_decay_steps,
            min_ratio=float(cfg.min_lr_ratio),
        )
        self.optimizer = optim.make_optimizer(cfg.optimizer, self.learning_rate,
                                              replicated=reduce is not None)

        self.micro_op = None
        self.accumulators: list = []
        if self.accumulate == 1:
            self.step_loss, grads = self._reduce(self.loss, grads)
            grads, self.grad_norm = self._clip(grads)
            self.train_op = self.optimizer.apply_gradients(
                list(zip(grads, self.train_variables)), self.global_step
            )
        else:
            self._build_accumulation(grads)
        self.optimizer_variables = list(self.optimizer.variables)

    def _reduce(self, loss, grads: list):
        if self.reduce is None:
            return loss, grads
        loss, *grads = self.reduce([loss, *grads])
        return loss, grads

    def _clip(self, grads: list):
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            clipped, norm = tf.clip_by_global_norm(grads, float(self.cfg.max_grad_norm))
            return clipped, norm
        return grads, tf.constant(-1.0)  # -1: not computed (no clipping asked for)

    def _build_accumulation(self, grads: list) -> None:
        scale = 1.0 / self.accumulate

        def local(shape, name):
            return tf1.Variable(
                tf.zeros(shape, tf.float32), trainable=False, use_resource=True,
                collections=[tf1.GraphKeys.LOCAL_VARIABLES], name=name,
            )

        with tf1.variable_scope(TRAIN_SCOPE):
            accs = [
                local(v.shape, "accum/" + var_name(v)) for v in self.train_variables
            ]
            loss_acc = local([], "accum/loss")
        self.accumulators = accs + [loss_acc]
        # One micro-batch: add its share of the mean gradient and of the mean loss.
        self.micro_op = tf.group(
            [a.assign_add(g * scale) for a, g in zip(accs, grads)]
            + [loss_acc.assign_add(self.loss * scale)],
            name="accumulate",
        )
        self.step_loss, mean_grads = self._reduce(loss_acc.read_value(),
                                                  [a.read_value() for a in accs])
        mean_grads, self.grad_norm = self._clip(mean_grads)
        apply = self.optimizer.apply_gradients(
            list(zip(mean_grads, self.train_variables)), self.global_step
        )
        # Zero the accumulators after the update (and after step_loss was read) for the next step.
        with tf.control_dependencies([apply, self.step_loss, self.grad_norm]):
            self.train_op = tf.group(
                [a.assign(tf.zeros_like(a)) for a in self.accumulators], name="apply_and_reset"
            )

    def run(self, session, feeds: list[dict]) -> dict:
        """One step: `feeds` holds one feed dict per micro-batch (len == accumulate_gradients).

        Returns the step's mean loss, the learning rate it used and the gradient norm (-1 when
        not clipping).
        """
        assert len(feeds) == self.accumulate, (len(feeds), self.accumulate)
        fetch = {"loss": self.step_loss, "lr": self.learning_rate, "grad_norm": self.grad_norm}
        if self.micro_op is None:
            out = session.run({**fetch, "_": self.train_op}, feeds[0])
        else:
            for feed in feeds:
                session.run(self.micro_op, feed)
            out = session.run({**fetch, "_": self.train_op})
        return {k: float(v) for k, v in out.items() if k != "_"}


def joined(steps: list[TrainStep]) -> TrainStep:
    """The TrainSteps of a process's local replicas as one: the first replica's fetches (after
    the reduce hook its loss and gradient norm are the replicas' means) and ops that run every
    replica's share (each accumulates and resets its own accumulators, and Adafactor updates
    each replica's copy of the weights)."""
    first = steps[0]
    if len(steps) > 1:
        first.train_op = tf.group([s.train_op for s in steps], name="train_replicas")
        if first.micro_op is not None:
            first.micro_op = tf.group([s.micro_op for s in steps], name="accumulate_replicas")
    return first
