"""Every file and folder name the toolkit uses, in one place.

A model directory holds OpenAI's seven files; a run directory (checkpoint/<run_name>/) holds the
same layout plus the training state, so both load with the same code, ours or gpt-2-simple's.
"""

import json
import os
import re
from pathlib import Path

from gpt2tf.errors import UserError

HPARAMS = "hparams.json"
ENCODER = "encoder.json"
VOCAB = "vocab.bpe"
CKPT_STATE = "checkpoint"  # TF's text file that names the latest checkpoint prefix
CKPT_PREFIX = "model.ckpt"  # OpenAI's checkpoint prefix; runs add "-<step>"
MODEL_FILES = (
    CKPT_STATE,
    ENCODER,
    HPARAMS,
    CKPT_PREFIX + ".data-00000-of-00001",
    CKPT_PREFIX + ".index",
    CKPT_PREFIX + ".meta",
    VOCAB,
)
VOCAB_FILES = (ENCODER, VOCAB)

DECODE_CACHE = ".gpt2tf-decode"  # converted decode models, beside the checkpoint they come from
CACHE_ENV = "GPT2TF_CACHE_DIR"  # where they go when the model folder is read-only, and the
# local copies of remote storage (gpt2tf.remote) go
TRAIN_CONFIG = "train_config.json"
LORA = "lora.json"  # a LoRA run: its adapters' shape and the base they apply to
METRICS = "metrics.jsonl"
BEST = "best.json"  # a run's checkpoint of the lowest validation loss (--keep_best)
SAMPLER_STATE = "sampler_state.json"
RUN_PREFIX = "model"  # gpt-2-simple's and nshepperd's run checkpoints: model-<step>
STATE_SUFFIX = ".state.json"  # our side file beside each checkpoint: model-<step>.state.json
COUNTER = "counter"  # gpt-2-simple's file holding the step of the latest checkpoint
REPLACED = "model-replaced"  # --overwrite: an earlier run's checkpoint whose name we reuse
# A checkpoint's name (prefix) in a model or run folder: model.ckpt, model-<step>, ...
CHECKPOINT_NAME = r"(?:model(?:-replaced)?(?:-\d+)?|model\.ckpt(?:-\d+)?)"
# A file of one checkpoint; group 1 is the checkpoint's name.
CHECKPOINT_FILE = re.compile(
    "^(" + CHECKPOINT_NAME + r")(\.index|\.meta|\.data-\d{5}-of-\d{5}|"
    + re.escape(STATE_SUFFIX) + r")$"
)

DEFAULT_MODELS_DIR = "models"
DEFAULT_CHECKPOINT_DIR = "checkpoint"
DEFAULT_SAMPLES_DIR = "samples"
DEFAULT_RUN_NAME = "run1"
DEFAULT_MODEL_NAME = "124M"

# OpenAI's public storage; GPT2_BASE_URL (or --base_url) replaces everything before /models/.
DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2"
BASE_URL_ENV = "GPT2_BASE_URL"

MODEL_NAMES = ("124M", "355M", "774M", "1558M")
MODEL_ALIASES = {"117M": "124M", "345M": "355M"}  # OpenAI renamed the first two sizes in 2019


def cache_root() -> Path:
    """$GPT2TF_CACHE_DIR, else $XDG_CACHE_HOME/gpt2tf, else ~/.cache/gpt2tf."""
    return Path(os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2tf"))


def checkpoint_state(folder: Path) -> tuple[str | None, list[str]]:
    """(latest prefix, every recorded prefix) from a folder's `checkpoint` file, as
    folder / name; (None, []) without one."""
    state_file = Path(folder) / CKPT_STATE
    if not state_file.is_file():
        return None, []
    from gpt2tf.quiet import import_tensorflow

    import_tensorflow()  # quietly: this may be the first use of TensorFlow
    import tensorflow as tf

    try:
        state = tf.train.get_checkpoint_state(str(folder))
    except (tf.errors.OpError, ValueError) as e:  # (a binary file: UnicodeDecodeError)
        raise UserError(f"{state_file} cannot be read ({e}): fix or remove it") from None
    if state is None:
        return None, []
    # TF has joined relative entries with the folder: paths comparable to folder / "model-N"
    return state.model_checkpoint_path, list(state.all_model_checkpoint_paths)


def checkpoint_state_text(prefixes: list[str]) -> str:
    """A `checkpoint` file naming prefixes[-1] as the latest, all of them recorded. Relative
    names, so the folder stays valid when copied or moved elsewhere."""
    names = [json.dumps(os.path.basename(p)) for p in prefixes]  # a C-style quoted string
    return f"model_checkpoint_path: {names[-1]}\n" + "".join(
        f"all_model_checkpoint_paths: {n}\n" for n in names)


def canonical_model_name(name: str) -> str:
    """Map a model name (old names included) to its current name, or raise UserError."""
    name = str(name)
    name = MODEL_ALIASES.get(name, name)
    if name not in MODEL_NAMES:
        raise UserError(
            f"unknown model name {name!r}; choose one of {', '.join(MODEL_NAMES)}"
            " (117M and 345M are accepted as old names of 124M and 355M)"
        )
    return name


def model_path(models_dir: str | os.PathLike, model_name: str) -> Path:
    """models/<model_name>/ for a released (or user-made) model directory."""
    name = str(model_name)
    name = MODEL_ALIASES.get(name, name)
    # Old-name directories made by older tools still load: prefer what is on disk.
    for candidate in (name, str(model_name)):
        if (Path(models_dir) / candidate).is_dir():
            return Path(models_dir) / candidate
    return Path(models_dir) / name


def check_run_name(run_name: str) -> str:
    """A run name is one folder name: no separators, no '..', not empty."""
    run_name = str(run_name)
    if (
        not run_name
        or run_name in (".", "..")
        or "/" in run_name
        or "\\" in run_name
        or ".." in run_name
        or "\0" in run_name
        or len(run_name.encode("utf-8", "surrogatepass")) > 255  # one folder name, at most
    ):
        raise UserError(
            f"bad run name {run_name[:80]!r}: use a plain folder name (at most 255 bytes)"
            " without '/', '\\' or '..'"
        )
    return run_name


def run_path(checkpoint_dir: str | os.PathLike, run_name: str) -> Path:
    """checkpoint/<run_name>/: a fine-tuning run's directory."""
    return Path(checkpoint_dir) / check_run_name(run_name)


def samples_path(samples_dir: str | os.PathLike, run_name: str) -> Path:
    """samples/<run_name>/: where training writes its periodic samples."""
    return Path(samples_dir) / check_run_name(run_name)
