"""LoRA runs: low-rank adapters trained on a frozen base, and what is made from them.

`train --lora_rank R --lora_alpha A --lora_targets c_attn,...` adds adapters to the targeted
conv1d layers (gpt2tf.model.Lora: variables `model/h<i>/<layer>/lora_A` [nx, R] and `lora_B`
[R, nf], B zero at the start, scale A / R, as PEFT's LoRA) and trains them alone: the
optimizer holds state for the adapters only. The run's checkpoints hold the adapters, the step
and that state, never the base weights; the run's lora.json records the adapters' shape and
the base checkpoint they apply to, with a hash of its .index file (which holds a CRC of every
tensor), so a base that changed since is refused rather than silently used.

Made from a run: `merge` writes a full model in OpenAI's layout (W + (alpha / R) * A @ B in
conv1d's [nx, nf] layout); gpt2tf.convert.to_peft writes a PEFT adapter; `LoraRun` is what
generation and serving load (gpt2tf.decode.generator).
"""

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2tf import checkpoints, fileio, model, paths
from gpt2tf.errors import FieldError, UserError
from gpt2tf.hparams import HParams
from gpt2tf.source import ModelSource

RECORD_VERSION = 1


# === The adapters' shape ===


def make_spec(rank: int, alpha: float, targets: str) -> model.Lora | None:
    """The adapters the training settings ask for; None when lora_rank is 0 (full fine-tuning)."""
    if not rank:
        return None
    names = tuple(dict.fromkeys(t.strip() for t in str(targets).split(",") if t.strip()))
    if not names:
        raise FieldError("lora_targets", f"names no layer: give some of"
                         f" {', '.join(model.LORA_TARGETS)} separated by commas")
    bad = [t for t in names if t not in model.LORA_TARGETS]
    if bad:
        raise FieldError("lora_targets", f"has unknown layer {bad[0]!r}: choose among"
                         f" {', '.join(model.LORA_TARGETS)} (comma-separated)")
    return model.Lora(rank=int(rank), alpha=float(alpha), targets=names)


def spec_of(cfg) -> model.Lora | None:
    """The adapters of a TrainConfig."""
    spec = make_spec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    if spec is not None and cfg.only_train_transformer_layers:
        raise FieldError("only_train_transformer_layers", "cannot be combined with"
                         " --lora_rank: LoRA trains the adapters only")
    return spec


def _describe(spec: model.Lora) -> str:
    return f"rank {spec.rank}, alpha {spec.alpha:g}, targets {','.join(spec.targets)}"


# === The run's record: which adapters, over which base ===


@dataclass(frozen=True)
class Record:
    """What a LoRA run's lora.json says: the adapters' shape and the base they apply to."""

    spec: model.Lora
    base_checkpoint: str  # absolute checkpoint prefix of the frozen base weights
    base_index_sha256: str  # of its .index file: any change of the base's weights changes it

    def to_dict(self) -> dict:
        return {
            "version": RECORD_VERSION, "lora_rank": self.spec.rank,
            "lora_alpha": self.spec.alpha, "lora_targets": list(self.spec.targets),
            "base_checkpoint": self.base_checkpoint,
            "base_index_sha256": self.base_index_sha256,
        }

    def checked_base(self, hparams: HParams) -> str:
        """The base checkpoint prefix, checked to exist, be unchanged and fit hparams."""
        prefix = self.base_checkpoint
        if not Path(prefix + ".index").is_file():
            raise UserError(f"the base model of this LoRA run, {prefix}, is missing: put it"
                            " back there (the run's adapters apply to it alone)")
        if _index_sha256(prefix) != self.base_index_sha256:
            raise UserError(f"the base model {prefix} has changed since this LoRA run was"
                            " trained on it: restore the original base weights")
        checkpoints.check_compatible(prefix, hparams)
        return prefix


def _index_sha256(prefix: str) -> str:
    try:
        return hashlib.sha256(Path(prefix + ".index").read_bytes()).hexdigest()
    except OSError as e:
        raise UserError(f"cannot read {prefix}.index ({e.strerror or e})") from None


def new_record(spec: model.Lora, base_prefix: str) -> Record:
    prefix = os.path.abspath(base_prefix)
    return Record(spec=spec, base_checkpoint=prefix, base_index_sha256=_index_sha256(prefix))


def read_record(folder: str | os.PathLike) -> Record | None:
    """The LoRA record of a run folder; None for a model or a run that trains every weight."""
    path = Path(folder) / paths.LORA
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        spec = make_spec(int(raw["lora_rank"]), float(raw["lora_alpha"]),
                         ",".join(raw["lora_targets"]))
        record = Record(spec=spec, base_checkpoint=str(raw["base_checkpoint"]),
                        base_index_sha256=str(raw["base_index_sha256"]))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}: {e}): it is damaged;"
                        " the run cannot be used without it") from None
    if spec is None:
        raise UserError(f"{path} has lora_rank 0: it is damaged")
    return record


def write_record(folder: Path, record: Record | None) -> None:
    """Write the run's lora.json, or remove a stale one when the run trains every weight."""
    if record is None:
        (folder / paths.LORA).unlink(missing_ok=True)
    else:
        fileio.write_json(folder / paths.LORA, record.to_dict())


# === Training ===


def check_adapters(prefix: str, hparams: HParams, spec: model.Lora, *,
                   fix: str = checkpoints.DEFAULT_FIX) -> None:
    """Raise UserError unless the checkpoint holds every adapter of `spec` with its shape."""
    found = checkpoints.list_checkpoint(prefix, fix=fix)
    for name, shape in model.lora_shapes(hparams, spec).items():
        if list(found.get(name, [])) != shape:
            raise UserError(f"checkpoint {prefix} lacks the adapter {name} {shape} that the"
                            f" run's {paths.LORA} ({_describe(spec)}) declares: {fix}")


def check_run(record: Record, prefix: str, hparams: HParams, *, resume: bool, fix: str) -> str:
    """Where a run planned from a LoRA run's `prefix` takes its model weights from: the base."""
    if not resume:
        folder = Path(prefix).parent
        raise UserError(f"{folder} is a LoRA run (its checkpoints hold adapters only): to train"
                        f" from it, first merge it into a model (gpt2tf lora merge {folder}"
                        " OUT_DIR) and train from that")
    check_adapters(prefix, hparams, record.spec, fix=fix)
    return record.checked_base(hparams)


def plan_adapters(plan, spec: model.Lora | None):
    """The plan with the adapters this invocation trains (`plan.lora`), checked against the
    run: a resumed run keeps its adapters' shape, and a run never changes kind."""
    if plan.resume and plan.lora is not None:
        if spec != plan.lora.spec:
            asked = _describe(spec) if spec else "lora_rank 0 (every weight)"
            raise FieldError("lora_rank", f"and the other LoRA settings must stay those of the"
                             f" run ({_describe(plan.lora.spec)}); asked for {asked}: start"
                             " another run (or --restore_from fresh --overwrite)")
        return plan
    if spec is None:
        return dataclasses.replace(plan, lora=None)
    if plan.resume:
        raise FieldError("lora_rank", "cannot be given when resuming a run that trains every"
                         " weight: start another --run_name (or --restore_from fresh"
                         " --overwrite)")
    return dataclasses.replace(plan, lora=new_record(spec, plan.source_prefix))


# === Loading and merging ===


class LoraRun:
    """A LoRA run's adapters (from `prefix`, default its latest checkpoint) over its base."""

    def __init__(self, source: ModelSource, prefix: str | None = None):
        record = read_record(source.path)
        if record is None:
            raise UserError(f"{source.path} is not a LoRA run (it has no {paths.LORA}): train"
                            " one with --lora_rank")
        self.source = source
        self.record = record
        self.spec = record.spec
        self.hparams = source.hparams
        self.prefix = prefix or source.latest_checkpoint()
        check_adapters(self.prefix, self.hparams, self.spec)
        self.base_prefix = record.checked_base(self.hparams)

    def adapters(self) -> dict[str, np.ndarray]:
        """Adapter name -> array: lora_A [nx, R], lora_B [R, nf] of each targeted layer."""
        import tensorflow as tf

        names = model.lora_shapes(self.hparams, self.spec)
        try:
            reader = tf.train.load_checkpoint(self.prefix)
            return {name: reader.get_tensor(name) for name in names}
        except (tf.errors.OpError, IndexError) as e:
            raise UserError(f"cannot read {self.prefix} ({type(e).__name__}:"
                            f" {checkpoints.op_error_line(e)}); the checkpoint is corrupt:"
                            " use another one") from None

    def merged_weights(self) -> dict[str, np.ndarray]:
        """The base weights with the adapters folded in: a plain model in OpenAI's layout."""
        return merge_weights(checkpoints.read_weights(self.base_prefix), self.adapters(),
                             self.spec)


def merge_weights(weights: dict[str, np.ndarray], adapters: dict[str, np.ndarray],
                  spec: model.Lora) -> dict[str, np.ndarray]:
    """W + scale * A @ B for every adapted layer; W: [1, nx, nf], A: [nx, R], B: [R, nf]."""
    out = dict(weights)
    for name in adapters:
        layer, leaf = name.rsplit("/", 1)
        if leaf != "lora_A":
            continue
        a = adapters[name].astype(np.float64)  # [nx, R]
        b = adapters[layer + "/lora_B"].astype(np.float64)  # [R, nf]
        w = weights[layer + "/w"]  # [1, nx, nf]
        out[layer + "/w"] = (w.astype(np.float64) + spec.scale * (a @ b)[None]).astype(
            np.float32)
    return out


def merge(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the run's base with its adapters merged as a new model folder (OpenAI's layout)."""
    fileio.check_new_dir(Path(out_dir))
    source = ModelSource.at(run_dir)
    run = LoraRun(source)
    return checkpoints.write_model_dir(out_dir, run.hparams, run.merged_weights(),
                                       source.vocab_files)
