"""Reading a model or run directory: hparams, vocabulary and the checkpoint it points to.

Any directory in OpenAI's layout loads, whoever wrote it: OpenAI, gpt-2-simple, our trainer or a
converter. Every problem is a UserError that names the directory and what to do.
"""

import os
from pathlib import Path

from gpt2tf import paths
from gpt2tf.errors import UserError
from gpt2tf.hparams import HParams


def check_dir(model_dir: str | os.PathLike) -> Path:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(
            f"model directory {model_dir} not found: download it (python download_model.py 124M)"
            " or pass the right --models_dir/--model_name or --checkpoint_dir/--run_name"
        )
    return model_dir


def load_hparams(model_dir: str | os.PathLike) -> HParams:
    return HParams.from_json(check_dir(model_dir) / paths.HPARAMS)


def read_vocab_files(model_dir: str | os.PathLike) -> tuple[bytes, bytes]:
    """The raw bytes of encoder.json and vocab.bpe."""
    model_dir = check_dir(model_dir)
    out = []
    for name in paths.VOCAB_FILES:
        try:
            out.append((model_dir / name).read_bytes())
        except FileNotFoundError:
            raise UserError(f"{model_dir / name} is missing: re-download the model") from None
        except OSError as e:
            raise UserError(f"cannot read {model_dir / name}: {e}") from None
    return out[0], out[1]


def load_encoder(model_dir: str | os.PathLike):
    """The BPE encoder of a model directory (tiktoken-backed when the vocabulary is GPT-2's)."""
    from gpt2tf.encoder import Encoder

    encoder_json, vocab_bpe = read_vocab_files(model_dir)
    return Encoder.from_bytes(encoder_json, vocab_bpe, source=str(model_dir))


def latest_checkpoint(model_dir: str | os.PathLike) -> str:
    """The checkpoint prefix that the directory's `checkpoint` file names, checked to exist."""
    model_dir = check_dir(model_dir)
    state = model_dir / paths.CKPT_STATE
    prefix = None
    if state.is_file():
        import tensorflow as tf

        prefix = tf.train.latest_checkpoint(str(model_dir))
    if prefix is None and (model_dir / (paths.CKPT_PREFIX + ".index")).is_file():
        prefix = str(model_dir / paths.CKPT_PREFIX)  # a bare OpenAI layout without `checkpoint`
    if prefix is None or not Path(prefix + ".index").is_file():
        raise UserError(
            f"no complete checkpoint in {model_dir} ({paths.CKPT_STATE} missing or names a"
            " missing file): re-download the model or pick another run"
        )
    return prefix
