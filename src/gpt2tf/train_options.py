"""The values training's choice flags accept: importable without TensorFlow, so train.py checks
its flags before loading anything heavy."""

from gpt2tf.errors import UserError

OPTIMIZERS = ("adam", "sgd", "adafactor")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")  # bf16: bfloat16 matmuls; weights, norms and the loss in float32


def check_choice(flag: str, value, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, else a UserError naming the flag and the choices."""
    if value not in choices:
        raise UserError(f"unknown {flag} {value!r}: choose one of {', '.join(choices)}")
    return value
