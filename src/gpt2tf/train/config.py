"""What a training run computes: `TrainConfig`, stored in the run as train_config.json.

Its fields, defaults, bounds and help are the `settings.TRAIN` declarations. A resumed run takes
each field from the command line if given, else from the file, else the defaults. The
per-invocation flags (`settings.TRAIN_INVOCATION`: run name, where to restore from, how many
steps) are not stored: they say what this invocation does, not what the run is.
"""

from gpt2tf import settings
from gpt2tf.errors import FieldError

RESTORE_MODES = ("latest", "fresh")
# The fields a train step depends on (gpt2tf.train.step); the rest belong to the loop.
STEP_FIELDS = (
    "optimizer", "learning_rate", "warmup_steps", "lr_schedule", "lr_decay_steps",
    "min_lr_ratio", "accumulate_gradients", "max_grad_norm", "precision",
    "memory_saving_gradients", "only_train_transformer_layers",
)


def _validate(self) -> None:
    if self.val_dataset and self.val_fraction:
        raise FieldError("val_fraction", "cannot be given with --val_dataset: pick one")
    settings.check_encoding("encoding", self.encoding)


def _resolve(cls, given: dict, stored: dict | None = None):
    """Given values (None: not given) over the stored config over the defaults."""
    known = {s.name for s in cls.SETTINGS}
    values = {k: v for k, v in (stored or {}).items() if k in known}
    values.update({k: v for k, v in given.items() if v is not None and k in known})
    return cls(**values)


def _step_config(self):
    return StepConfig(**{name: getattr(self, name) for name in STEP_FIELDS})


def _to_dict(self) -> dict:
    return settings.config_values(self)


TrainConfig = settings.make_config(
    "TrainConfig", settings.TRAIN,
    "Everything that decides what a run computes; one field per `settings.TRAIN` setting.",
    {"validate": _validate, "resolve": classmethod(_resolve), "step_config": _step_config,
     "to_dict": _to_dict},
)
StepConfig = settings.make_config(
    "StepConfig", [s for s in settings.TRAIN if s.name in STEP_FIELDS],
    "What a training step computes; each field is the training setting of the same name.",
)


def require_dataset(cfg) -> None:
    if cfg.dataset is None or str(cfg.dataset) == "":
        raise FieldError("dataset", "is required: a text file, folder, glob, .csv, .jsonl or .npz")


def require_validation(cfg) -> None:
    """--keep_best and --early_stopping_patience judge checkpoints by their validation loss."""
    has_val = (cfg.val_dataset or cfg.val_fraction) and cfg.val_every
    for name in ("keep_best", "early_stopping_patience"):
        if getattr(cfg, name) and not has_val:
            raise FieldError(name, "needs validation: give --val_dataset PATH or --val_fraction"
                             " F, and --val_every N")


def check_invocation(*, run_name, restore_from, steps, overwrite, cluster="auto",
                     collective_timeout_s=60.0, devices=0) -> None:
    """The per-invocation settings (not stored with the run)."""
    from gpt2tf import paths

    values = settings.check_all(settings.TRAIN_INVOCATION, {
        "run_name": run_name, "restore_from": restore_from, "steps": steps,
        "overwrite": overwrite, "cluster": cluster,
        "collective_timeout_s": collective_timeout_s, "devices": devices})
    paths.check_run_name(values["run_name"])
    if values["restore_from"] == "":
        raise FieldError("restore_from", "must be latest, fresh or a checkpoint path, got ''")
    if values["steps"] == 0:
        raise FieldError("steps", "must be >= 1, or -1 to train until stopped; got 0")
