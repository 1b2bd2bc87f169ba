"""Fine-tuning: train.py / `gpt2tf train`, gpt-2-simple's finetune(), and the training loop.

The loop owns data, logging, saving, sampling, validation and signals; the maths of a step is
gpt2tf.train_step's. Order of work, so bad input costs nothing and writes nothing:

1. check every flag (`TrainConfig.check`, `check_invocation`);
2. plan the run: which checkpoint to start from, its hparams and vocabulary, and whether this
   resumes (`plan_run`); check the checkpoint matches the hparams;
3. load and encode the data, and check it holds at least one window;
4. build the graph, restore, and only then create or update the run directory.

A run directory checkpoint/<run_name>/ holds hparams.json, encoder.json, vocab.bpe, the
checkpoints (model-<step>, OpenAI's layout plus optimizer state), train_config.json,
metrics.jsonl and TensorBoard events. `--restore_from latest` continues it exactly; flags not
given on the command line come from its train_config.json.
"""

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from gpt2tf import fileio, paths, run_state
from gpt2tf.errors import UserError
from gpt2tf.train_options import LR_SCHEDULES, OPTIMIZERS, PRECISIONS, check_choice

log = logging.getLogger(__name__)

RESTORE_MODES = ("latest", "fresh")
SAMPLE_TEMPERATURE = 1.0  # periodic samples use nshepperd's settings: temperature 1, --top_k
AVG_DECAY = 0.99  # gpt-2-simple's running average of the loss
VAL_WINDOW_SEED = 0  # the validation windows depend on the data alone


# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a run computes. Stored as train_config.json; a resumed run
    takes each field from the command line if given, else from the file, else these defaults
    (nshepperd's train.py where it has the flag, else gpt-2-simple's finetune)."""

    dataset: str | None = None
    model_name: str = paths.DEFAULT_MODEL_NAME
    models_dir: str = paths.DEFAULT_MODELS_DIR
    combine: int = 50000
    encoding: str = "utf-8"
    column: int | str = 0
    field: str = "text"
    seq_len: int = 0  # 0: the model's n_ctx
    batch_size: int = 1
    learning_rate: float = 2e-5
    accumulate_gradients: int = 1
    optimizer: str = "adam"
    only_train_transformer_layers: bool = False
    memory_saving_gradients: bool = False
    precision: str = "fp32"
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    lr_decay_steps: int = 0  # cosine: decay over this many steps; 0: the first invocation's --steps
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 0.0
    noise: float = 0.0
    seed: int | None = None
    sample_every: int = 100
    sample_length: int = 1023
    sample_num: int = 1
    top_k: int = 40
    top_p: float = 0.0
    save_every: int = 1000
    print_every: int = 1
    max_checkpoints: int = 1
    val_dataset: str | None = None
    val_fraction: float = 0.0
    val_batch_size: int = 2
    val_batch_count: int = 40
    val_every: int = 0

    @classmethod
    def resolve(cls, given: dict, stored: dict | None = None) -> "TrainConfig":
        """Command line (values not None) over the stored config over the defaults."""
        known = {f.name for f in fields(cls)}
        values = {}
        for name, value in (stored or {}).items():
            if name in known:
                values[name] = value
        for name, value in given.items():
            if value is not None:
                values[name] = value
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, *, require_dataset: bool = True) -> "TrainConfig":
        """Raise UserError for the first bad value; return self. Needs no TensorFlow."""
        if require_dataset and (self.dataset is None or str(self.dataset) == ""):
            raise UserError(
                "--dataset is required: a text file, folder, glob, .csv, .jsonl or .npz"
            )
        _int("batch_size", self.batch_size, 1)
        _int("accumulate_gradients", self.accumulate_gradients, 1)
        _int("combine", self.combine, 0)
        _int("seq_len", self.seq_len, 0)
        _int("warmup_steps", self.warmup_steps, 0)
        _int("lr_decay_steps", self.lr_decay_steps, 0)
        _int("sample_every", self.sample_every, 0)
        _int("sample_length", self.sample_length, 1)
        _int("sample_num", self.sample_num, 0)
        _int("top_k", self.top_k, 0)
        _int("save_every", self.save_every, 0)
        _int("print_every", self.print_every, 1)
        _int("max_checkpoints", self.max_checkpoints, 0)
        _int("val_batch_size", self.val_batch_size, 1)
        _int("val_batch_count", self.val_batch_count, 1)
        _int("val_every", self.val_every, 0)
        if self.seed is not None:
            _int("seed", self.seed, 0)
        lr = _float("learning_rate", self.learning_rate)
        if not lr > 0:
            raise UserError(f"--learning_rate must be > 0, got {self.learning_rate}")
        _float_in("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _float_in("top_p", self.top_p, 0.0, 1.0)
        _float_in("noise", self.noise, 0.0, 1.0, high_open=True)
        _float_in("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        if _float("max_grad_norm", self.max_grad_norm) < 0:
            raise UserError(f"--max_grad_norm must be >= 0 (0 turns clipping off), got "
                            f"{self.max_grad_norm}")
        for name in ("only_train_transformer_layers", "memory_saving_gradients"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"--{name} is a switch: give it alone or as --{name}=True/False,"
                                f" got {getattr(self, name)!r}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("precision", self.precision, PRECISIONS)
        _check_encoding(self.encoding)
        if self.val_dataset and self.val_fraction:
            raise UserError("give --val_dataset or --val_fraction, not both")
        return self

    def step_config(self):
        from gpt2tf import train_step

        return train_step.StepConfig(
            optimizer=self.optimizer, learning_rate=float(self.learning_rate),
            warmup_steps=self.warmup_steps, lr_schedule=self.lr_schedule,
            lr_decay_steps=self.lr_decay_steps, min_lr_ratio=float(self.min_lr_ratio),
            accumulate_gradients=self.accumulate_gradients,
            max_grad_norm=float(self.max_grad_norm), precision=self.precision,
            memory_saving_gradients=self.memory_saving_gradients,
            only_train_transformer_layers=self.only_train_transformer_layers,
        )


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"--{name} must be an integer, got {value!r}")
    if value < minimum:
        raise UserError(f"--{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise UserError(f"--{name} must be a number, got {value!r}")
    return float(value)


def _float_in(name, value, low, high, *, high_open=False) -> float:
    v = _float(name, value)
    if not (low <= v < high if high_open else low <= v <= high):
        raise UserError(
            f"--{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value}"
        )
    return v


def _check_encoding(encoding: str) -> None:
    import codecs

    try:
        codecs.lookup(str(encoding))
    except LookupError:
        raise UserError(
            f"unknown encoding {encoding!r}: use a Python codec name such as utf-8 or latin-1"
        ) from None


def check_invocation(*, run_name, restore_from, steps, overwrite) -> None:
    """The per-invocation flags (not stored with the run)."""
    paths.check_run_name(run_name)
    if not isinstance(restore_from, str) or not restore_from:
        raise UserError(
            f"--restore_from must be latest, fresh or a checkpoint path, got {restore_from!r}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or (steps < 1 and steps != -1):
        raise UserError(f"--steps must be >= 1, or -1 to train until stopped; got {steps!r}")
    if not isinstance(overwrite, bool):
        raise UserError(f"--overwrite is a switch, got {overwrite!r}")


# --- planning: where the weights come from ----------------------------------------------------


@dataclass
class Plan:
    run_dir: Path
    source_dir: Path  # hparams.json and the vocabulary come from here
    source_prefix: str  # the checkpoint whose weights training starts from
    resume: bool  # continue this run: step, optimizer state and data order from source_prefix
    replace_run: bool  # --overwrite over existing checkpoints: delete them after our first save
    hparams: object
    encoder: object
    stored: dict | None  # the run's train_config.json when resuming


def _source_of(restore_from: str) -> tuple[Path, str]:
    from gpt2tf import modeldir

    p = Path(restore_from)
    if p.is_dir():
        return p, modeldir.latest_checkpoint(p)
    if Path(restore_from + ".index").is_file():
        return p.parent, restore_from
    raise UserError(
        f"--restore_from {restore_from}: not 'latest', 'fresh', a model or run folder, nor a"
        " checkpoint prefix (a path whose .index file exists)"
    )


def plan_run(
    *, run_dir: Path, restore_from: str, overwrite: bool, model_name: str, models_dir: str
) -> Plan:
    from gpt2tf import checkpoints, modeldir

    latest = run_state.latest_checkpoint(run_dir) if run_dir.is_dir() else None
    resume = restore_from == "latest" and latest is not None
    if resume:
        source_dir, prefix = run_dir, latest
    else:
        if latest is not None and not overwrite:
            raise UserError(
                f"run folder {run_dir} already has checkpoints (latest"
                f" {os.path.basename(latest)}): --restore_from latest continues it,"
                " --overwrite starts over (its checkpoints are deleted once the new run's"
                " first checkpoint is saved), or pick another --run_name"
            )
        if restore_from in ("latest", "fresh"):
            source_dir = paths.model_path(models_dir, str(model_name))
            prefix = modeldir.latest_checkpoint(source_dir)
        else:
            source_dir, prefix = _source_of(restore_from)
    hparams = modeldir.load_hparams(source_dir)
    encoder = modeldir.load_encoder(source_dir)
    if encoder.n_vocab > hparams.n_vocab:
        raise UserError(
            f"{source_dir}: the vocabulary has {encoder.n_vocab} tokens but hparams.json"
            f" n_vocab={hparams.n_vocab}; the files do not belong together"
        )
    checkpoints.check_compatible(prefix, hparams)
    stored = None
    if resume and (run_dir / paths.TRAIN_CONFIG).is_file():
        try:
            stored = json.loads((run_dir / paths.TRAIN_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {run_dir / paths.TRAIN_CONFIG} ({e})") from None
        if not isinstance(stored, dict):
            raise UserError(f"{run_dir / paths.TRAIN_CONFIG} is not a JSON object")
    return Plan(
        run_dir=run_dir, source_dir=source_dir, source_prefix=prefix, resume=resume,
        replace_run=overwrite and latest is not None, hparams=hparams, encoder=encoder,
        stored=stored,
    )


# --- data -------------------------------------------------------------------------------------


@dataclass
class Data:
    train: object  # dataset.Sampler
    val_windows: object | None  # [N, T+1] int32, the same every evaluation
    window: int  # tokens per training window: seq_len + 1


def load_data(cfg: TrainConfig, plan: Plan, *, seed: int) -> Data:
    from gpt2tf import dataset

    hp = plan.hparams
    seq_len = cfg.seq_len or hp.n_ctx
    if seq_len > hp.n_ctx:
        raise UserError(f"--seq_len={seq_len} exceeds the model window n_ctx={hp.n_ctx}")
    window = seq_len + 1  # T inputs and T next-token targets

    def load(path):
        return dataset.load_tokens(
            str(path), encoder=plan.encoder, encoding=cfg.encoding, column=cfg.column,
            field=cfg.field,
        )

    train = dataset.Sampler(load(cfg.dataset), seed=seed)
    val = None
    if cfg.val_dataset:
        val = dataset.Sampler(load(cfg.val_dataset), seed=seed)
    elif cfg.val_fraction:
        train, val = train.split(cfg.val_fraction)
    train.fixed_windows(window, 1)  # a UserError now if no window fits
    val_windows = None
    if val is not None:
        if cfg.val_every == 0:
            log.warning("validation data given but --val_every is 0: no validation will run")
        else:
            val_windows = val.fixed_windows(
                window, cfg.val_batch_size * cfg.val_batch_count, seed=VAL_WINDOW_SEED
            )
    return Data(train=train, val_windows=val_windows, window=window)


# --- the graph --------------------------------------------------------------------------------


class Graph:
    """The training graph: step, validation loss, sampler, savers, in its own tf.Graph."""

    def __init__(self, cfg: TrainConfig, hparams, encoder, *, window: int):
        import tensorflow as tf

        from gpt2tf import inference, train_step

        tf1 = tf.compat.v1
        b, t = cfg.batch_size, window - 1
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.tokens = tf1.placeholder(tf.int32, [b, window], name="tokens")  # [B, T+1]
            # Inputs with noise when --noise > 0 (drawn by the loop); else the clean tokens.
            self.inputs = tf1.placeholder_with_default(self.tokens[:, :-1], [b, t], "inputs")
            self.step = train_step.TrainStep(
                hparams, cfg.step_config(), self.tokens, inputs=self.inputs
            )
            self.val_tokens = tf1.placeholder(tf.int32, [None, window], name="val_tokens")
            self.val_loss = train_step.lm_loss(
                hparams, self.val_tokens,
                precision=train_step.check_precision(cfg.precision),
            )
            self.decoder = None
            if cfg.sample_every and cfg.sample_num:
                self.decoder = inference.Decoder(hparams, encoder)
            step_var = self.step.global_step
            self.model_saver = tf1.train.Saver(self.step.model_variables)
            self.step_saver = tf1.train.Saver([step_var])
            opt_vars = self.step.optimizer_variables
            self.opt_saver = tf1.train.Saver(opt_vars) if opt_vars else None
            # The run's checkpoints: weights (OpenAI's names), step, optimizer state.
            self.saver = tf1.train.Saver(
                self.step.model_variables + [step_var] + opt_vars, max_to_keep=None,
                save_relative_paths=True,
            )
            self.step_value = tf1.placeholder(tf.int64, [])
            self.set_step = step_var.assign(self.step_value)
            self.init = [tf1.global_variables_initializer(), tf1.local_variables_initializer()]
        self.graph.finalize()
        self.names = {
            "step": _name(step_var),
            "optimizer": [_name(v) for v in opt_vars],
        }


def _name(v) -> str:
    return v.name.split(":")[0]


# --- signals ----------------------------------------------------------------------------------


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, save, return. A second Ctrl-C quits now
    (the previous checkpoint stays the latest)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: saving after this step"
            + (" (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""),
            file=sys.stderr, flush=True,
        )


# --- the loop ---------------------------------------------------------------------------------


class _SamplingStopped(Exception):
    pass



def _say(msg: str) -> None:
    print(msg, flush=True)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Trainer:
    """One invocation of training: restore, loop, save; see `train`."""

    def __init__(self, cfg, plan, data, *, steps, samples_dir, run_name):
        import numpy as np
        import tensorflow as tf

        from gpt2tf import inference

        self.tf1 = tf.compat.v1
        self.np = np
        self.cfg, self.plan, self.data = cfg, plan, data
        self.steps, self.samples_dir, self.run_name = steps, Path(samples_dir), run_name
        self.g = Graph(cfg, plan.hparams, plan.encoder, window=data.window)
        self.session = self.tf1.Session(graph=self.g.graph, config=inference.session_config())
        self.noise_rng = np.random.Generator(np.random.PCG64([cfg.seed, 1]))
        self.avg = [0.0, 0.0]  # gpt-2-simple's running average: (sum, weight)
        self.tokens_seen = 0
        self.start_step = 0
        self.last_saved = None
        self.writer = None
        self.metrics = None
        self.checkpoints = None

    # restore ---------------------------------------------------------------------------------

    def restore(self) -> None:
        from gpt2tf import checkpoints

        plan, s = self.plan, self.session
        s.run(self.g.init)
        checkpoints.restore(s, plan.source_prefix, self.g.model_saver, plan.hparams)
        _say(f"Loading checkpoint {plan.source_prefix}")
        if not plan.resume:
            return
        names = set(checkpoints.list_checkpoint(plan.source_prefix))
        side = run_state.read_side_state(plan.source_prefix)
        with self.g.graph.as_default():
            if self.g.names["step"] in names:
                self.g.step_saver.restore(s, plan.source_prefix)
            else:  # gpt-2-simple's run: its step is in `counter` or the file name
                step = (side or {}).get("step") or run_state.read_counter(plan.run_dir)
                step = step or run_state.step_of(plan.source_prefix) or 0
                s.run(self.g.set_step, {self.g.step_value: step})
            opt = self.g.names["optimizer"]
            if self.g.opt_saver is not None and all(n in names for n in opt):
                self.g.opt_saver.restore(s, plan.source_prefix)
            elif opt:
                log.warning(
                    "%s holds no %s state (written by another tool or with another"
                    " --optimizer): the optimizer starts fresh", plan.source_prefix,
                    self.cfg.optimizer,
                )
        self._restore_side(side)

    def _restore_side(self, side: dict | None) -> None:
        if side is None:
            log.warning(
                "%s has no %s file: the data order cannot continue where it stopped",
                self.plan.source_prefix, run_state.STATE_SUFFIX,
            )
            return
        sampler_state = side.get("sampler", {})
        if sampler_state.get("total_size") != self.data.train.total_size:
            log.warning(
                "the dataset has changed since the checkpoint (%s tokens, now %s): training"
                " continues, but not with the data order of the run",
                sampler_state.get("total_size"), self.data.train.total_size,
            )
        self.data.train.load_state_dict(sampler_state)
        try:
            bit = self.np.random.PCG64()
            bit.state = side["noise_rng"]
            self.noise_rng = self.np.random.Generator(bit)
            self.avg = [float(x) for x in side["avg_loss"]]
            self.tokens_seen = int(side.get("tokens", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"bad side state for {self.plan.source_prefix} ({e})") from None

    # run files -------------------------------------------------------------------------------

    def open_run(self) -> None:
        """Create or update the run directory; with --overwrite of another run, defer the
        replacement of its files until our first checkpoint is saved."""
        import tensorflow as tf

        plan, run_dir = self.plan, self.plan.run_dir
        self.start_step = int(self.session.run(self.g.step.global_step))
        replace_files = plan.replace_run and not plan.resume
        old_events = sorted(run_dir.glob("events.out.tfevents.*")) if plan.replace_run else []
        run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = run_state.RunCheckpoints(
            run_dir, self.g.saver, max_checkpoints=self.cfg.max_checkpoints,
            replace_others=plan.replace_run,
        )
        if plan.resume:
            self.checkpoints.remove_orphans_after(self.start_step)
        self.metrics = run_state.MetricsLog(
            run_dir / paths.METRICS,
            keep_through_step=self.start_step if plan.resume else None, defer=replace_files,
        )

        def write_run_files():
            self._write_run_files()
            self.metrics.commit()
            for f in old_events:
                f.unlink(missing_ok=True)

        if replace_files:
            self.checkpoints.on_first_commit.append(write_run_files)
        else:
            self.checkpoints.on_first_commit.append(
                lambda: [f.unlink(missing_ok=True) for f in old_events]
            )
            self._write_run_files()
        with self.g.graph.as_default():
            self.writer = tf.compat.v1.summary.FileWriter(str(run_dir))
            # TensorBoard drops events logged past this step by an earlier, crashed process.
            self.writer.add_session_log(
                tf.compat.v1.SessionLog(status=tf.compat.v1.SessionLog.START), self.start_step
            )

    def _write_run_files(self) -> None:
        from gpt2tf import modeldir

        run_dir = self.plan.run_dir
        if self.plan.source_dir.resolve() != run_dir.resolve():
            fileio.write_text(run_dir / paths.HPARAMS, self.plan.hparams.to_json())
            for name, content in zip(
                paths.VOCAB_FILES, modeldir.read_vocab_files(self.plan.source_dir)
            ):
                with fileio.atomic_open(run_dir / name, "wb") as f:
                    f.write(content)
        fileio.write_json(run_dir / paths.TRAIN_CONFIG, self.cfg.to_dict())

    # work ------------------------------------------------------------------------------------

    def next_feeds(self) -> list[dict]:
        """Feed dicts of the next step's micro-batches (advances the data sampler)."""
        g, np = self.g, self.np
        feeds = []
        for _ in range(self.cfg.accumulate_gradients):
            batch = self.data.train.sample_batch(self.cfg.batch_size, self.data.window)
            feed = {g.tokens: batch}
            if self.cfg.noise > 0:
                # nshepperd's --noise: each input token is replaced by a random one with
                # probability p; the targets stay clean.
                inputs = batch[:, :-1]
                mask = self.noise_rng.random(inputs.shape) < self.cfg.noise
                rand = self.noise_rng.integers(0, self.plan.hparams.n_vocab, inputs.shape)
                feed[g.inputs] = np.where(mask, rand, inputs).astype(np.int32)
            feeds.append(feed)
        return feeds

    def validate(self) -> float:
        windows = self.data.val_windows
        n = self.cfg.val_batch_size
        losses = [
            self.session.run(self.g.val_loss, {self.g.val_tokens: windows[i : i + n]})
            for i in range(0, len(windows), n)
        ]
        return float(sum(losses) / len(losses))

    def sample(self, step: int, stop: StopRequest) -> None:
        from gpt2tf import inference

        dec = self.g.decoder
        params = inference.SamplingParams(
            temperature=SAMPLE_TEMPERATURE, top_k=self.cfg.top_k, top_p=self.cfg.top_p
        )

        def on_token(row, piece):
            if stop.signum is not None:  # a long sample must not delay the save on SIGTERM
                raise _SamplingStopped

        try:
            texts = [
                s.text for s in dec.iter_samples(
                    self.session, dec.encode_prompt(None), nsamples=self.cfg.sample_num,
                    batch_size=min(self.cfg.batch_size, self.cfg.sample_num),
                    length=self.cfg.sample_length, params=params,
                    seed=(self.cfg.seed * 1_000_003 + step) % (1 << 62), on_token=on_token,
                )
            ]
        except _SamplingStopped:
            return
        text = "\n".join(f"======== SAMPLE {i + 1} ========\n{t}\n" for i, t in enumerate(texts))
        _say(text)
        fileio.write_text(self.samples_dir / self.run_name / f"samples-{step}", text)

    def save(self, step: int) -> None:
        side = {
            "sampler": self.data.train.state_dict(),
            "noise_rng": self.noise_rng.bit_generator.state,
            "avg_loss": self.avg,
            "tokens": self.tokens_seen,
        }
        _say(f"Saving {self.plan.run_dir / f'{run_state.RUN_PREFIX}-{step}'}")
        self.metrics.sync()
        if self.writer is not None:
            self.writer.flush()
        self.checkpoints.save(self.session, step, side)
        self.last_saved = step

    def _summary(self, step: int, record: dict) -> None:
        tf1 = self.tf1
        values = [
            tf1.Summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
            if k != "step"
        ]
        self.writer.add_summary(tf1.Summary(value=values), step)

    def _log(self, record: dict) -> None:
        self.metrics.write(record)
        self._summary(record["step"], record)

    def loop(self, stop: StopRequest) -> int:
        cfg = self.cfg
        step = self.start_step
        tokens_per_step = cfg.batch_size * (self.data.window - 1) * cfg.accumulate_gradients
        if self.data.val_windows is not None and step == 0 and not self.plan.resume:
            val = self.validate()
            _say(f"[0] val_loss={val:.4f}")
            self._log({"step": 0, "val_loss": val})
        started = time.perf_counter()
        step_time = None  # running average of seconds per step, for the time left
        done = 0
        while stop.signum is None and (self.steps == -1 or done < self.steps):
            feeds = self.next_feeds()
            t0 = time.perf_counter()
            out = self.g.step.run(self.session, feeds)
            dt = time.perf_counter() - t0
            step += 1
            done += 1
            self.tokens_seen += tokens_per_step
            step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
            self.avg = [self.avg[0] * AVG_DECAY + out["loss"], self.avg[1] * AVG_DECAY + 1.0]
            record = {
                "step": step, "loss": out["loss"], "avg_loss": self.avg[0] / self.avg[1],
                "lr": out["lr"], "tokens_per_sec": tokens_per_step / dt,
            }
            if cfg.max_grad_norm:
                record["grad_norm"] = out["grad_norm"]
            if not math.isfinite(out["loss"]):
                raise UserError(
                    f"the loss is {out['loss']} at step {step}: training diverged; lower"
                    " --learning_rate or set --max_grad_norm (the last checkpoint is intact)"
                )
            validate = self.data.val_windows is not None and step % cfg.val_every == 0
            if validate:
                record["val_loss"] = self.validate()
            if step % cfg.print_every == 0 or validate:
                self._log(record)
                self._progress(record, started, step_time, done)
            if cfg.save_every and step % cfg.save_every == 0:
                self.save(step)
            if self.g.decoder is not None and step % cfg.sample_every == 0:
                self.sample(step, stop)
        if self.last_saved != step and (step != self.start_step or not self.plan.resume):
            self.save(step)  # (a resumed run stopped before its first step changed nothing)
        return step

    def _progress(self, record: dict, started: float, step_time: float, done: int) -> None:
        line = (
            f"[{record['step']} | {time.perf_counter() - started:.2f}s]"
            f" loss={record['loss']:.4f} avg={record['avg_loss']:.4f}"
            f" lr={record['lr']:.3g} {record['tokens_per_sec']:.0f} tokens/s"
        )
        if "val_loss" in record:
            line += f" val_loss={record['val_loss']:.4f}"
        if self.steps != -1:
            line += f" {_fmt_time((self.steps - done) * step_time)} left"
        _say(line)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        self.session.close()


# --- entry points -----------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # the step of the last checkpoint
    checkpoint: str


def train(
    config: dict,
    *,
    run_name: str = paths.DEFAULT_RUN_NAME,
    checkpoint_dir: str = paths.DEFAULT_CHECKPOINT_DIR,
    samples_dir: str = paths.DEFAULT_SAMPLES_DIR,
    restore_from: str = "latest",
    steps: int = -1,
    overwrite: bool = False,
) -> TrainResult:
    """Train; `config` holds TrainConfig fields (None: from the run's stored config, else the
    default). Returns where the last checkpoint went."""
    import secrets

    check_invocation(run_name=run_name, restore_from=restore_from, steps=steps,
                     overwrite=overwrite)
    run_name = str(run_name)  # fire makes "--run_name 7" an int
    unknown = sorted(set(config) - {f.name for f in fields(TrainConfig)})
    assert not unknown, unknown
    # The flags alone, before touching any file (a resumed run may take --dataset from its
    # stored config, so that one is checked after planning).
    TrainConfig.resolve(config).check(require_dataset=False)
    run_dir = paths.run_path(checkpoint_dir, run_name)
    model_name = config.get("model_name") or paths.DEFAULT_MODEL_NAME
    models_dir = config.get("models_dir") or paths.DEFAULT_MODELS_DIR
    plan = plan_run(run_dir=run_dir, restore_from=restore_from, overwrite=overwrite,
                    model_name=model_name, models_dir=models_dir)
    cfg = TrainConfig.resolve(config, plan.stored).check()
    if cfg.seed is None:
        cfg = dataclasses.replace(cfg, seed=secrets.randbits(31))
    if cfg.lr_schedule == "cosine" and not cfg.lr_decay_steps:
        if steps == -1:
            raise UserError("--lr_schedule cosine needs --lr_decay_steps (or a --steps count)")
        cfg = dataclasses.replace(cfg, lr_decay_steps=steps)
    data = load_data(cfg, plan, seed=cfg.seed)
    _say(f"dataset has {data.train.total_size} tokens")

    trainer = Trainer(cfg, plan, data, steps=steps, samples_dir=samples_dir, run_name=run_name)
    try:
        trainer.restore()
        trainer.open_run()
        _say("Training...")
        with StopRequest() as stop:
            step = trainer.loop(stop)
    except OSError as e:  # metrics, samples, run files (a failed save says more itself)
        latest = trainer.checkpoints.kept[-1] if trainer.checkpoints else plan.source_prefix
        raise UserError(
            f"cannot write {e.filename or 'a run file'} ({e.strerror or e}); is the disk full?"
            f" The latest checkpoint {latest} is intact"
        ) from None
    finally:
        trainer.close()
    return TrainResult(run_dir=run_dir, step=step, checkpoint=str(trainer.checkpoints.kept[-1]))


def train_cli(
    dataset: str | None = None,
    model_name: str | None = None,
    models_dir: str | None = None,
    run_name: str = paths.DEFAULT_RUN_NAME,
    checkpoint_dir: str = paths.DEFAULT_CHECKPOINT_DIR,
    samples_dir: str = paths.DEFAULT_SAMPLES_DIR,
    restore_from: str = "latest",
    steps: int = -1,
    overwrite: bool = False,
    combine: int | None = None,
    encoding: str | None = None,
    column: int | str | None = None,
    field: str | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    accumulate_gradients: int | None = None,
    optimizer: str | None = None,
    only_train_transformer_layers: bool | None = None,
    memory_saving_gradients: bool | None = None,
    precision: str | None = None,
    warmup_steps: int | None = None,
    lr_schedule: str | None = None,
    lr_decay_steps: int | None = None,
    min_lr_ratio: float | None = None,
    max_grad_norm: float | None = None,
    noise: float | None = None,
    seed: int | None = None,
    sample_every: int | None = None,
    sample_length: int | None = None,
    sample_num: int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    save_every: int | None = None,
    print_every: int | None = None,
    max_checkpoints: int | None = None,
    val_dataset: str | None = None,
    val_fraction: float | None = None,
    val_batch_size: int | None = None,
    val_batch_count: int | None = None,
    val_every: int | None = None,
):
    """Fine-tune GPT-2 on a text file, folder, glob, .csv, .jsonl or pre-encoded .npz.

    Checkpoints, samples and metrics go to <checkpoint_dir>/<run_name>/ and
    <samples_dir>/<run_name>/. --restore_from latest (the default) continues the run exactly
    where it stopped; fresh starts from <models_dir>/<model_name>; a folder or checkpoint path
    starts from those weights. --steps N trains N more steps (-1: until Ctrl-C or SIGTERM,
    which save and exit). A flag left out takes the run's stored value when resuming, else its
    default: model_name 124M, models_dir models, combine 50000, encoding utf-8, column 0,
    field text, seq_len n_ctx, batch_size 1, learning_rate 2e-5, accumulate_gradients 1
    (applies the mean gradient), optimizer adam (adam|sgd|adafactor), precision fp32
    (fp32|bf16), warmup_steps 0, lr_schedule constant (constant|cosine), lr_decay_steps
    --steps, min_lr_ratio 0.1, max_grad_norm 0 (off), noise 0, seed random, sample_every 100,
    sample_length 1023, sample_num 1, top_k 40, top_p 0, save_every 1000, print_every 1,
    max_checkpoints 1 (0 keeps all), val_fraction 0, val_batch_size 2, val_batch_count 40,
    val_every 0 (off). --combine is accepted as in nshepperd's and gpt-2-simple's tools, but
    text is always encoded as one stream with <|endoftext|> between documents, so windows
    cross file boundaries whatever its value.
    """
    from gpt2tf import cli

    given = dict(locals())
    invocation = {k: given.pop(k) for k in (
        "run_name", "checkpoint_dir", "samples_dir", "restore_from", "steps", "overwrite",
    )}
    given.pop("cli")
    # Bad flags fail before TensorFlow loads (train() checks them again, cheaply).
    check_invocation(run_name=invocation["run_name"], restore_from=invocation["restore_from"],
                     steps=invocation["steps"], overwrite=invocation["overwrite"])
    TrainConfig.resolve(given).check(require_dataset=False)
    cli.quiet_tensorflow_import()
    result = train(given, **invocation)
    print(f"saved {result.checkpoint}", file=sys.stderr)


def finetune(
    sess,
    dataset,
    steps=-1,
    model_name="124M",
    model_dir="models",
    combine=50000,
    batch_size=1,
    learning_rate=0.0001,
    accumulate_gradients=5,
    restore_from="latest",
    run_name="run1",
    checkpoint_dir="checkpoint",
    sample_every=100,
    sample_length=1023,
    sample_num=1,
    multi_gpu=False,
    save_every=1000,
    print_every=1,
    max_checkpoints=1,
    use_memory_saving_gradients=False,
    only_train_transformer_layers=False,
    optimizer="adam",
    overwrite=False,
    reuse=False,
    **extra,
):
    """gpt-2-simple's finetune(): train, then load the run into `sess` for generate().

    Differences: optimizer state and data order are checkpointed (resume is exact),
    accumulate_gradients applies the mean gradient, memory-saving gradients work (with
    accumulation too), Ctrl-C saves and returns. `multi_gpu` and `reuse` are accepted and
    ignored (each run has its own graph). Any other flag of train.py can be passed by name
    (e.g. precision="bf16", val_fraction=0.05, samples_dir=...).
    """
    if multi_gpu:
        log.warning("multi_gpu is ignored: training uses one device")
    invocation_keys = ("samples_dir",)
    invocation = {k: extra.pop(k) for k in invocation_keys if k in extra}
    unknown = sorted(set(extra) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise UserError(f"finetune() got unknown arguments {unknown}")
    config = dict(
        dataset=dataset, model_name=model_name, models_dir=model_dir, combine=combine,
        batch_size=batch_size, learning_rate=learning_rate,
        accumulate_gradients=accumulate_gradients, sample_every=sample_every,
        sample_length=sample_length, sample_num=sample_num, save_every=save_every,
        print_every=print_every, max_checkpoints=max_checkpoints,
        memory_saving_gradients=use_memory_saving_gradients,
        only_train_transformer_layers=only_train_transformer_layers, optimizer=optimizer,
        **extra,
    )
    result = train(
        config, run_name=run_name, checkpoint_dir=checkpoint_dir, restore_from=restore_from,
        steps=-1 if steps in (None, 0) else int(steps), overwrite=overwrite, **invocation,
    )
    if sess is not None:
        sess.load(result.run_dir)
    return result
