"""Planning a run before anything is built: where its weights come from, whether it resumes,
and the data it trains on. Bad input fails here, before TensorFlow builds a graph."""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from gpt2tf import paths
from gpt2tf.errors import FieldError, UserError
from gpt2tf.data.encode import load_tokens
from gpt2tf.data.sampler import Sampler
from gpt2tf.source import ModelSource
from gpt2tf.train import run_state
from gpt2tf.train.config import TrainConfig

log = logging.getLogger(__name__)

VAL_WINDOW_SEED = 0  # the validation windows depend on the data alone


@dataclass
class Plan:
    run_dir: Path
    source: ModelSource  # hparams.json and the vocabulary come from here
    source_prefix: str  # the checkpoint whose weights training starts from
    resume: bool  # continue this run: step, optimizer state and data order from source_prefix
    fix: str  # what to do if source_prefix turns out damaged (ends its UserError)
    replace_run: bool  # --overwrite over existing checkpoints: delete them after our first save
    hparams: object
    encoder: object
    stored: dict | None  # the run's train_config.json when resuming
    # gpt2tf.lora.Record: the adapters trained and the base under them (None: every weight)
    lora: object = None


def _source_of(restore_from: str) -> tuple[ModelSource, str]:
    p = Path(restore_from)
    if p.is_dir():
        source = ModelSource.at(p)
        return source, source.latest_checkpoint()
    if Path(restore_from + ".index").is_file():
        return ModelSource.at(p.parent), restore_from
    raise FieldError(
        "restore_from", f"{restore_from!r} is not 'latest', 'fresh', a model or run folder, nor"
        " a checkpoint prefix (a path whose .index file exists)"
    )


def plan_run(
    *, run_dir: Path, restore_from: str, overwrite: bool, model_name: str, models_dir: str
) -> Plan:
    from gpt2tf import checkpoints, lora

    latest = run_state.latest_committed(run_dir) if run_dir.is_dir() else None
    resume = restore_from == "latest" and latest is not None
    if resume:
        source, prefix = ModelSource.at(run_dir), latest
    else:
        if latest is not None and not overwrite:
            raise UserError(
                f"run folder {run_dir} already has checkpoints (latest"
                f" {os.path.basename(latest)}): --restore_from latest continues it,"
                " --overwrite starts over (its checkpoints are deleted once the new run's"
                " first checkpoint is saved), or pick another --run_name"
            )
        if restore_from in ("latest", "fresh"):
            source = ModelSource.resolve(model_name=model_name, models_dir=models_dir)
            prefix = source.latest_checkpoint()
        else:
            source, prefix = _source_of(restore_from)
    hparams, encoder = source.hparams, source.encoder
    # A damaged checkpoint of the run itself: say how to continue (an earlier one, or afresh).
    fix = run_state.resume_fix(run_dir, prefix) if resume else checkpoints.DEFAULT_FIX
    record = lora.read_record(source.path)  # a LoRA run's checkpoints hold adapters only
    if record is None:
        checkpoints.check_compatible(prefix, hparams, fix=fix)
    else:
        lora.check_run(record, prefix, hparams, resume=resume, fix=fix)
    stored = None
    if resume and (run_dir / paths.TRAIN_CONFIG).is_file():
        try:
            stored = json.loads((run_dir / paths.TRAIN_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {run_dir / paths.TRAIN_CONFIG} ({e})") from None
        if not isinstance(stored, dict):
            raise UserError(f"{run_dir / paths.TRAIN_CONFIG} is not a JSON object")
    return Plan(
        run_dir=run_dir, source=source, source_prefix=prefix, resume=resume, fix=fix,
        replace_run=overwrite and latest is not None, hparams=hparams, encoder=encoder,
        stored=stored, lora=record,
    )


# --- data -------------------------------------------------------------------------------------


@dataclass
class Data:
    train: Sampler
    val_windows: object | None  # [N, T+1] int32, the same every evaluation
    window: int  # tokens per training window: seq_len + 1
    val_chunks: list | None = None  # the validation tokens, for the sliding-window perplexity


def load_data(cfg: TrainConfig, plan: Plan, *, seed: int) -> Data:
    hp = plan.hparams
    seq_len = cfg.seq_len or hp.n_ctx
    if seq_len > hp.n_ctx:
        raise FieldError("seq_len", f"{seq_len} exceeds the model window n_ctx={hp.n_ctx}")
    window = seq_len + 1  # T inputs and T next-token targets

    eot = plan.encoder.eot_token
    if cfg.sample_mode == "documents" and eot is None:
        raise FieldError("sample_mode", "documents needs an <|endoftext|> token to find where"
                         " documents start, and the model's vocabulary has none: use windows")

    def load(path):
        return load_tokens(
            str(path), encoder=plan.encoder, encoding=cfg.encoding, column=cfg.column,
            field=cfg.field, line_by_line=cfg.line_by_line,
        )

    train = Sampler(load(cfg.dataset), seed=seed, mode=cfg.sample_mode, eot=eot)
    val = None
    if cfg.val_dataset:
        val = Sampler(load(cfg.val_dataset), seed=seed, mode=cfg.sample_mode, eot=eot)
    elif cfg.val_fraction:
        train, val = train.split(cfg.val_fraction)
    train.fixed_windows(window, 1)  # a UserError now if no window fits
    coverage = train.coverage(window)
    if coverage < 0.9:
        log.warning(
            "--sample_mode documents: windows hold only %.0f%% of the training tokens (a"
            " document longer than the %d-token window is cut at it): use --sample_mode"
            " windows to train on all of them", 100 * coverage, window)
    val_windows = None
    if val is not None:
        if cfg.val_every == 0:
            log.warning("validation data given but --val_every is 0: no validation will run")
        else:
            val_windows = val.fixed_windows(
                window, cfg.val_batch_size * cfg.val_batch_count, seed=VAL_WINDOW_SEED
            )
    return Data(train=train, val_windows=val_windows, window=window,
                val_chunks=val.chunks if val_windows is not None else None)

