"""GPT-2's hyperparameters: one frozen dataclass, loaded strictly from hparams.json."""

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from gpt2tf.errors import UserError


@dataclass(frozen=True)
class HParams:
    """The five numbers that fix a GPT-2 graph (OpenAI's names and defaults: the 124M model)."""

    n_vocab: int = 50257
    n_ctx: int = 1024
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"hparams: {f.name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"hparams: n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        """Weights of a model of this shape (wte, wpe, the blocks, the final norm)."""
        c = self.n_embd
        block = 12 * c * c + 13 * c  # c_attn, attn c_proj, c_fc, mlp c_proj, two norms
        return (self.n_vocab + self.n_ctx) * c + self.n_layer * block + 2 * c

    @classmethod
    def from_dict(cls, raw: dict, source: str = "hparams") -> "HParams":
        if not isinstance(raw, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(raw.keys() - known)
        if unknown:
            raise UserError(f"{source}: unknown hparams {unknown}; known are {sorted(known)}")
        missing = sorted(known - raw.keys())
        if missing:
            raise UserError(f"{source}: missing hparams {missing}")
        try:
            return cls(**raw)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "HParams":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path} not found: is this a model or run directory?") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); re-download or fix it") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"
