"""Checkpoints in OpenAI's layout: restore with checks, read/write weights, new model dirs.

A checkpoint is compatible when every variable in the graph is in it with the same shape;
extra entries (optimizer slots, step counters) are ignored, so runs written by gpt-2-simple
or our trainer load for generation like OpenAI's own files.
"""

import os
import re
from pathlib import Path

import numpy as np
import tensorflow as tf

from gpt2tf import fileio, model, paths
from gpt2tf.errors import UserError
from gpt2tf.hparams import HParams

tf1 = tf.compat.v1

# What to do about a damaged checkpoint, unless the caller knows better (a run can say more).
DEFAULT_FIX = "re-download the model or use another checkpoint"


def list_checkpoint(prefix: str, *, fix: str = DEFAULT_FIX) -> dict[str, list[int]]:
    """Name -> shape of every tensor in a checkpoint; unreadable or truncated files are a
    UserError that ends with `fix` (what the user can do about it)."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError) as e:
        raise UserError(
            f"checkpoint {prefix} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]});"
            f" it is corrupt or incomplete: {fix}"
        ) from None
    check_complete(prefix, shapes, dtypes, fix=fix)
    return {name: list(shape) for name, shape in shapes.items()}


def data_files(prefix: str) -> list[Path]:
    """The data shards of a checkpoint that exist: prefix.data-00000-of-0000N ..."""
    p = Path(prefix)
    shard = re.compile(re.escape(p.name) + r"\.data-\d{5}-of-\d{5}")
    if not p.parent.is_dir():
        return []
    return sorted(f for f in p.parent.iterdir() if shard.fullmatch(f.name))


def check_complete(prefix: str, shapes: dict, dtypes: dict, *, fix: str = DEFAULT_FIX) -> None:
    """Refuse a checkpoint whose data files hold fewer bytes than its index declares.

    TF's bundle stores each tensor's raw bytes back to back, so the numeric tensors' sizes add
    up to the data files' size exactly (strings, of unknown length, only make it larger). A file
    cut short by a full disk or an interrupted copy otherwise restores part of the way and then
    fails deep in TF (OutOfRangeError, or an IndexError when read with numpy).
    """
    need = 0
    for name, shape in shapes.items():
        dtype = dtypes.get(name)
        if dtype is not None:  # (TF gives strings and variants size 0: a lower bound)
            need += int(np.prod(shape, dtype=np.int64)) * dtype.size
    have = 0
    for f in data_files(prefix):
        try:
            have += f.stat().st_size
        except OSError:  # vanished meanwhile: counts as missing
            pass
    if have < need:
        raise UserError(
            f"checkpoint {prefix} is truncated: its data files hold {have:,} of the {need:,}"
            f" bytes its index declares (cut short by a full disk, a crash or a partial copy):"
            f" {fix}"
        )


def check_compatible(
    prefix: str, hparams: HParams, names: list[str] | None = None, *, fix: str = DEFAULT_FIX
) -> None:
    """Raise UserError unless the checkpoint holds every model weight with hparams' shapes."""
    found = list_checkpoint(prefix, fix=fix)
    expected = model.variable_shapes(hparams)
    for name in names or expected:
        if name not in found:
            raise UserError(
                f"checkpoint {prefix} has no variable {name}: hparams.json (n_layer="
                f"{hparams.n_layer}) does not match it, or it is not a GPT-2 checkpoint"
            )
        if list(found[name]) != list(expected[name]):
            raise UserError(
                f"checkpoint {prefix} does not match hparams.json: {name} has shape "
                f"{list(found[name])} in the checkpoint but {expected[name]} from {hparams}"
            )


def var_name(v) -> str:
    return v.name.split(":")[0]


def make_saver(variables: list, **kwargs):
    """A Saver over `variables`; build it inside the graph, before the graph is finalized."""
    return tf1.train.Saver(var_list=variables, **kwargs)


def restore(session, prefix: str, saver, hparams: HParams, *, fix: str = DEFAULT_FIX) -> None:
    """Restore the saver's model weights from `prefix` after checking every name and shape."""
    check_compatible(prefix, hparams, fix=fix)
    restore_saver(session, prefix, saver, fix=fix)


def restore_saver(session, prefix: str, saver, *, fix: str = DEFAULT_FIX) -> None:
    """saver.restore, with TF's errors (a checksum mismatch, a short read) as a UserError."""
    try:
        with session.graph.as_default():  # outside it, TF 2 takes the eager code path
            saver.restore(session, prefix)
    except tf.errors.OpError as e:
        raise UserError(
            f"cannot restore {prefix} ({type(e).__name__}: {op_error_line(e)}); the checkpoint"
            f" is corrupt: {fix}"
        ) from None


def op_error_line(e: Exception) -> str:
    """The line of a TF error that says what went wrong.

    A graph-mode error starts with "Graph execution error:" and node names; the cause (say
    "Read less bytes than requested") is a later line.
    """
    noise = ("Graph execution error", "Detected at node", "Node:", "[[", "Original stack", "File ")
    for line in str(getattr(e, "message", None) or e).splitlines():
        line = line.strip()
        if line and not line.startswith(noise):
            return line
    return type(e).__name__


def read_weights(prefix: str) -> dict[str, np.ndarray]:
    """Every model weight of a checkpoint as numpy arrays (optimizer state and LoRA adapters
    left out: gpt2tf.lora reads those)."""
    list_checkpoint(prefix)  # a clear error for unreadable or truncated files
    try:
        reader = tf.train.load_checkpoint(prefix)
        return {
            name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()
            if name.startswith("model/") and "/Adam" not in name and "/Momentum" not in name
            and not model.is_lora_name(name)
        }
    except (tf.errors.OpError, IndexError) as e:  # a damaged data file: IndexError from numpy
        raise UserError(
            f"cannot read {prefix} ({type(e).__name__}: {op_error_line(e)}); the checkpoint is"
            f" corrupt: {DEFAULT_FIX}"
        ) from None


def init_weights(hparams: HParams, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2's initialisation: normal(0.02) matrices and wte, normal(0.01) wpe, zero biases,
    unit gains (as OpenAI's model.py initialisers)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in model.variable_shapes(hparams).items():
        leaf = name.rsplit("/", 1)[1]
        if leaf == "g":
            out[name] = np.ones(shape, np.float32)
        elif leaf == "b":
            out[name] = np.zeros(shape, np.float32)
        else:
            std = 0.01 if leaf == "wpe" else 0.02
            out[name] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
    return out


def save_weights(prefix: str, hparams: HParams, weights: dict[str, np.ndarray]) -> None:
    """Write weights as a TF checkpoint at `prefix` (with a .meta graph, like OpenAI's)."""
    expected = model.variable_shapes(hparams)
    missing = sorted(expected.keys() - weights.keys())
    if missing:
        raise UserError(f"weights lack {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for name, shape in expected.items():
        if list(weights[name].shape) != shape:
            raise UserError(
                f"{name} has shape {list(weights[name].shape)}, hparams.json implies {shape}"
            )
    graph = tf.Graph()
    with graph.as_default():
        X = tf1.placeholder(tf.int32, [None, None], name="context")
        model.model(hparams, X)  # the .meta file then describes a usable graph
        variables = model.model_variables()
        feeds = {}
        assigns = []
        for v in variables:
            ph = tf1.placeholder(tf.float32, v.shape)
            assigns.append(v.assign(ph))
            feeds[ph] = weights[var_name(v)].astype(np.float32)
        saver = tf1.train.Saver(var_list=variables, save_relative_paths=True)
        with tf1.Session(graph=graph) as sess:
            sess.run(assigns, feeds)
            saver.save(sess, prefix, write_state=True)


def write_model_dir(
    out_dir: str | os.PathLike,
    hparams: HParams,
    weights: dict[str, np.ndarray],
    vocab: tuple[bytes, bytes],
) -> Path:
    """Create a model directory in OpenAI's seven-file layout, atomically.

    Everything is written to a temporary sibling folder that is renamed into place at the end,
    so `out_dir` either does not exist or is complete. An existing non-empty `out_dir` is refused.
    """
    with fileio.publish_dir(out_dir) as tmp:
        fileio.write_text(tmp / paths.HPARAMS, hparams.to_json())
        for name, content in zip(paths.VOCAB_FILES, vocab):
            with fileio.atomic_open(tmp / name, "wb") as f:
                f.write(content)
        save_weights(str(tmp / paths.CKPT_PREFIX), hparams, weights)
    return Path(out_dir)


def init_model_dir(
    out_dir: str | os.PathLike,
    hparams: HParams,
    *,
    vocab_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> Path:
    """A new randomly initialised model directory; byte-level vocabulary without vocab_dir."""
    from gpt2tf import memory

    need = 3 * 4 * hparams.n_params  # float32 weights, their initial values and the saver's copy
    have = memory.available_bytes()
    if have is not None and need > have:
        raise UserError(f"a model of {hparams} has {hparams.n_params:,} weights and needs about"
                        f" {memory.gib(need)} to create; {memory.gib(have)} is available: choose"
                        " smaller n_layer, n_embd, n_ctx or n_vocab")
    from gpt2tf import encoder
    from gpt2tf.source import read_vocab_files

    if vocab_dir is not None:
        vocab = read_vocab_files(vocab_dir)
    else:
        vocab = encoder.byte_level_vocab()
    enc = encoder.Encoder.from_bytes(*vocab, source=str(vocab_dir or "byte-level vocabulary"))
    enc.check_fits(hparams.n_vocab, vocab=str(vocab_dir or "the byte-level vocabulary"),
                   model="n_vocab", fix=f"use --n_vocab {enc.n_vocab} or more")
    return write_model_dir(out_dir, hparams, init_weights(hparams, seed), vocab)
