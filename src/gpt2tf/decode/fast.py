"""The fast decode path, prepared from a checkpoint: converted once, cached, never stale.

The converted model (gpt2tf.decode.lite: the decode step for TFLite/XNNPACK) is derived from
the checkpoint automatically and written atomically into `.gpt2tf-decode/` beside it. Its
name carries a key over everything it depends on: the checkpoint's .index file (which holds a
CRC of every tensor, so any change of the weights changes it), hparams, the precision, the
converter's format version and TensorFlow's version (and the data files' sizes and times). A new training step saved, or a file
replaced, gives a new key and a fresh conversion; older conversions of the same precision are
then removed. A model folder that cannot be written falls back to the user's cache
($GPT2TF_CACHE_DIR, else $XDG_CACHE_HOME/gpt2tf, else ~/.cache/gpt2tf), and where nothing can
be written the model is converted in memory. A missing or stale cache is never an error.
"""

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from gpt2tf import checkpoints, fileio, memory, paths
from gpt2tf.hparams import HParams
from gpt2tf.source import ModelSource

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "bf16")  # the fast path's; bf16 only on the native step
# TF's converter holds the weights many times over while it works (measured on 124M: a 0.5 GB
# checkpoint peaked at 9.5 GB). A conversion that would not fit is not started: the process
# would be killed, not given an error.
CONVERT_MEMORY_FACTOR = 20


def cache_key(prefix: str, hparams: HParams, precision: str) -> str:
    import tensorflow as tf

    from gpt2tf.decode import lite

    h = hashlib.sha256()
    for part in (f"format {lite.FORMAT_VERSION}", f"tf {tf.__version__}", precision,
                 hparams.to_json(), os.path.basename(prefix)):
        h.update(part.encode() + b"\0")
    h.update(Path(prefix + ".index").read_bytes())
    for data in sorted(Path(prefix).parent.glob(Path(prefix).name + ".data-*")):
        st = data.stat()  # a data file replaced or cut short behind an unchanged index
        h.update(f"{data.name} {st.st_size} {st.st_mtime_ns}".encode() + b"\0")
    return h.hexdigest()[:20]


def user_cache_dir(source: ModelSource) -> Path:
    where = hashlib.sha256(str(source.path.resolve()).encode()).hexdigest()[:16]
    return paths.cache_root() / f"{source.path.name}-{where}"


def prepared_model(source: ModelSource, prefix: str, precision: str, *,
                   lora=None) -> Path | bytes:
    """The converted model for this checkpoint and precision: a cached file, or fresh bytes.

    With `lora` (a gpt2tf.lora.LoraRun; `prefix` is its adapters' checkpoint) the merged
    weights are converted, and the key covers both the adapters and the base.
    """
    from gpt2tf.decode import lite

    key = cache_key(prefix, source.hparams, precision)
    if lora is not None:
        base = cache_key(lora.base_prefix, source.hparams, precision)
        key = hashlib.sha256(f"lora {key} {base} {lora.spec}".encode()).hexdigest()[:20]
    name = f"decode-{precision}-{key}.tflite"
    folders = [Path(prefix).parent / paths.DECODE_CACHE, user_cache_dir(source)]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    need = CONVERT_MEMORY_FACTOR * 4 * source.hparams.n_params  # float32 weights only: a
    # run's checkpoint also holds optimizer slots, which the conversion never reads
    have = memory.available_bytes()
    if have is not None and need > have:
        raise MemoryError(f"converting needs about {memory.gib(need)} of memory and"
                          f" {memory.gib(have)} is available")
    log.info("preparing the fast decode path for %s (%s, once per checkpoint)", source.name,
             precision)
    start = time.perf_counter()
    weights = lora.merged_weights() if lora is not None else checkpoints.read_weights(prefix)
    data = lite.build(weights, source.hparams, precision=precision)
    log.debug("converted in %.1f s", time.perf_counter() - start)
    for folder in folders:
        try:
            with fileio.atomic_open(folder / name, "wb") as f:
                f.write(data)
        except OSError:
            continue  # read-only or full: try the next place
        _remove_stale(folder, precision, keep=name)
        return folder / name
    return data


def _remove_stale(folder: Path, precision: str, keep: str) -> None:
    for old in folder.glob(f"decode-{precision}-*.tflite"):
        if old.name != keep:
            old.unlink(missing_ok=True)


class FastBackend:
    """The engine's backend over a stepper (a NativeStep or a LiteStep, which share one
    interface): rows at their own positions, prompts prefilled."""

    def __init__(self, stepper, hparams: HParams):
        self.stepper = stepper
        self.hparams = hparams
        self.runtime = stepper.runtime  # "native" or "tflite"
        self.positions = np.zeros([0], np.int32)  # [B] the slot each row's next token goes to

    def start(self, contexts: list[list[int]]) -> np.ndarray:
        # room for the longest prompt and its first new token, so prefill never grows it
        self.stepper.start(len(contexts), min(self.hparams.n_ctx, max(map(len, contexts)) + 1))
        logits = np.empty([len(contexts), self.hparams.n_vocab], np.float32)  # [B, V]
        first: dict[tuple, int] = {}  # rows that share a prompt share its prefill
        for row, context in enumerate(contexts):
            key = tuple(context)
            if key in first:
                self.stepper.copy_row(first[key], row, len(context))
                logits[row] = logits[first[key]]
            else:
                logits[row] = self.stepper.prefill(row, context)
                first[key] = row
        self.positions = np.array([len(c) for c in contexts], np.int32)
        return logits

    def step(self, tokens: np.ndarray) -> np.ndarray:
        logits = self.stepper.step(np.asarray(tokens, np.int32), self.positions)
        self.positions = self.positions + 1
        return logits


def _open_native(source: ModelSource, prefix: str, precision: str, threads: int, lora):
    from gpt2tf.decode import native

    native.load_library()  # before reading the weights: where it cannot run, fail fast
    weights = lora.merged_weights() if lora is not None else checkpoints.read_weights(prefix)
    return native.NativeStep(weights, source.hparams, threads=threads, precision=precision)


def open_backend(source: ModelSource, prefix: str, precision: str, *,
                 threads: int | None = None, lora=None,
                 runtime: str = "auto") -> FastBackend | None:
    """The fast backend, or None (after a one-line note) where it cannot run here.

    fp32 takes the native step where it builds (runtime "auto"; see gpt2tf.decode.native),
    else TFLite; int8 always takes TFLite; bf16 takes the native step or nothing (the caller
    runs the TF graph in bf16). runtime "tflite" skips the native step."""
    threads = threads or os.cpu_count() or 1
    if precision in ("fp32", "bf16") and runtime == "auto":
        from gpt2tf.decode.native import NativeUnavailable

        try:
            return FastBackend(_open_native(source, prefix, precision, threads, lora),
                               source.hparams)
        except NativeUnavailable as e:
            log.info("the native decode step cannot run here (%s): decoding with %s", e,
                     "TFLite" if precision == "fp32" else "the TF graph")
    if precision == "bf16":
        return None
    try:
        from gpt2tf.decode import lite

        model = prepared_model(source, prefix, precision, lora=lora)
        step = lite.LiteStep(model, source.hparams, threads=threads)
    except (ImportError, RuntimeError, ValueError, OSError, MemoryError) as e:
        log.warning("the fast decode path cannot run here (%s: %s): generating with the TF"
                    " graph%s", type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                    " in fp32" if precision != "fp32" else "")
        return None
    return FastBackend(step, source.hparams)
