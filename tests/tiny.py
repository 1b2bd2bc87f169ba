"""The tiny GPT-2 every test builds on, declared once (keras-hub's habit), and the repo root.

Tests that need another shape say only what differs: `tiny(n_ctx=128)`.
"""

import dataclasses
from pathlib import Path

from gpt2tf.hparams import HParams

REPO = Path(__file__).resolve().parents[1]
# 2 layers of width 32 over the byte-level vocabulary (256 bytes + <|endoftext|>).
TINY = HParams(n_vocab=257, n_ctx=64, n_embd=32, n_head=4, n_layer=2)


def tiny(**overrides) -> HParams:
    return dataclasses.replace(TINY, **overrides)
