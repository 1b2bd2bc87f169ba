"""The tiny GPT-2 every test builds on, declared once (keras-hub's habit), and the repo root.

Tests that need another shape say only what differs: `tiny(n_ctx=128)`.
"""

import dataclasses
from pathlib import Path

import numpy as np

from gpt2tf.hparams import HParams

REPO = Path(__file__).resolve().parents[1]
# 2 layers of width 32 over the byte-level vocabulary (256 bytes + <|endoftext|>).
TINY = HParams(n_vocab=257, n_ctx=64, n_embd=32, n_head=4, n_layer=2)


def tiny(**overrides) -> HParams:
    return dataclasses.replace(TINY, **overrides)


def random_weights(hparams: HParams, seed: int) -> dict[str, np.ndarray]:
    """Random values for every weight, scaled so logits are well separated (greedy ties between
    two frameworks' rounding are then vanishingly unlikely)."""
    from gpt2tf import model  # TensorFlow: only for the tests that make weights

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in model.variable_shapes(hparams).items():
        leaf = name.rsplit("/", 1)[1]
        noise = rng.standard_normal(shape).astype(np.float32)
        if leaf == "g":
            out[name] = 1.0 + 0.2 * noise
        elif leaf == "b":
            out[name] = 0.1 * noise
        elif leaf in ("wte", "wpe"):
            out[name] = 0.5 * noise
        else:
            out[name] = 0.2 * noise
    return out


def random_model_dir(path: Path, seed: int) -> Path:
    """A TINY model at `path` with random_weights(seed) and the byte-level vocabulary."""
    from gpt2tf import checkpoints, encoder

    return checkpoints.write_model_dir(path, TINY, random_weights(TINY, seed=seed),
                                       encoder.byte_level_vocab())


def hf_twin(model_dir: Path, out: Path):
    """The model converted to HuggingFace and loaded in transformers' GPT2LMHeadModel."""
    from gpt2tf import convert
    from shared_data import reference

    transformers = reference("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(convert.to_hf(model_dir, out)).eval()
