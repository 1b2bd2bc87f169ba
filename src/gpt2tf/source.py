"""Where a model comes from: one validated model-or-run directory, used by every entry point.

Any directory in OpenAI's layout loads, whoever wrote it: OpenAI, gpt-2-simple, our trainer or a
converter. `ModelSource.resolve` holds the one rule for "a released model or a fine-tuned run?"
(a run name wins), and each property reads and checks its file once. Every problem is a
UserError that names the directory and what to do.
"""

import functools
import json
import os
from pathlib import Path

from gpt2tf import paths, remote
from gpt2tf.errors import UserError
from gpt2tf.quiet import import_tensorflow
from gpt2tf.hparams import HParams


# GPT-2's encoder.json is 1 MiB and vocab.bpe 0.5 MiB; vocabularies ten times larger are still
# tiny next to this bound, while a file past it is surely not a vocabulary.
MAX_VOCAB_FILE_BYTES = 1 << 28


class ModelSource:
    """A model or run directory, checked to exist; hparams, vocabulary and checkpoint on demand."""

    def __init__(self, path: str | os.PathLike, *, name: str | None = None, is_run: bool = False):
        self.path = Path(path)
        self.name = name or self.path.name
        self.is_run = is_run
        if not self.path.is_dir():
            raise UserError(self._not_found())

    @classmethod
    def resolve(
        cls,
        *,
        model_name: str = paths.DEFAULT_MODEL_NAME,
        models_dir: str | os.PathLike = paths.DEFAULT_MODELS_DIR,
        run_name: str = "",
        checkpoint_dir: str | os.PathLike = paths.DEFAULT_CHECKPOINT_DIR,
    ) -> "ModelSource":
        """The run <checkpoint_dir>/<run_name> when a run name is given, else the model
        <models_dir>/<model_name>. At a URL, a local copy of it (gpt2tf.remote)."""
        if run_name not in (None, ""):
            name = paths.check_run_name(str(run_name))
            if remote.is_url(checkpoint_dir):
                return cls(remote.view_run(checkpoint_dir, name), name=name, is_run=True)
            return cls(paths.run_path(checkpoint_dir, name), name=name, is_run=True)
        name = str(model_name)
        if remote.is_url(models_dir):
            models_dir = remote.stage_models(models_dir, name)
        return cls(paths.model_path(models_dir, name), name=name)

    @classmethod
    def at(cls, path: "str | os.PathLike | ModelSource") -> "ModelSource":
        """A directory given by its path (a run if it holds run checkpoints)."""
        if isinstance(path, ModelSource):
            return path
        return cls(path)

    def _not_found(self) -> str:
        parent = self.path.parent
        if self.is_run:
            runs = _subdirs(parent)
            have = f"runs in {parent}: {', '.join(runs)}" if runs else f"no runs in {parent}"
            return (f"run {self.name!r} not found ({have}); train one with train.py --run_name"
                    f" {self.name}, or pass the right --run_name/--checkpoint_dir")
        canonical = paths.MODEL_ALIASES.get(self.name, self.name)
        if canonical in paths.MODEL_NAMES:
            return (f"model directory {self.path} not found: download it (python"
                    f" download_model.py {canonical}{_models_dir_flag(parent)}) or pass the"
                    " right --models_dir")
        models = _subdirs(parent)
        have = f"models in {parent}: {', '.join(models)}" if models else f"no models in {parent}"
        return (f"model directory {self.path} not found ({have}); pass the right"
                " --model_name/--models_dir, or --run_name for a fine-tuned run")

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def is_lora(self) -> bool:
        """A LoRA run: its checkpoints hold adapters over another folder's base weights
        (gpt2tf.lora.LoraRun loads both)."""
        return (self.path / paths.LORA).is_file()

    @functools.cached_property
    def hparams(self) -> HParams:
        return HParams.from_json(self.path / paths.HPARAMS)

    @functools.cached_property
    def vocab_files(self) -> tuple[bytes, bytes]:
        """The raw bytes of encoder.json and vocab.bpe."""
        return read_vocab_files(self.path)

    @functools.cached_property
    def encoder(self):
        """The BPE encoder (tiktoken-backed when the vocabulary is GPT-2's), checked to fit
        the model's n_vocab (a folder that holds only a vocabulary has none to fit)."""
        from gpt2tf.encoder import Encoder

        enc = Encoder.from_bytes(*self.vocab_files, source=str(self.path))
        if (self.path / paths.HPARAMS).is_file():
            enc.check_fits(self.hparams.n_vocab, vocab=str(self.path),
                           model=f"{paths.HPARAMS} n_vocab")
        return enc

    def latest_checkpoint(self) -> str:
        """The checkpoint prefix that the directory's `checkpoint` file names, checked to exist."""
        state = self.path / paths.CKPT_STATE
        prefix = None
        if state.is_file():
            import_tensorflow()  # quietly: this may be the first use of TensorFlow
            import tensorflow as tf

            try:
                prefix = tf.train.latest_checkpoint(str(self.path))
            except (tf.errors.OpError, ValueError) as e:  # (a binary file: UnicodeDecodeError)
                raise UserError(f"{state} cannot be read ({type(e).__name__}): re-download the"
                                " model, or fix or remove that file") from None
            if prefix is not None and Path(prefix).resolve().parent != self.path.resolve():
                # A folder reads only its own checkpoints (`../victim/model-3` is not one).
                raise UserError(f"{state} names {prefix}, outside {self.path}: a model or run"
                                " folder may only name its own checkpoints; fix that file")
        if prefix is None and (self.path / (paths.CKPT_PREFIX + ".index")).is_file():
            prefix = str(self.path / paths.CKPT_PREFIX)  # a bare OpenAI layout, no `checkpoint`
        if prefix is None or not Path(prefix + ".index").is_file():
            raise UserError(
                f"no complete checkpoint in {self.path} ({paths.CKPT_STATE} missing or names a"
                " missing file): re-download the model or pick another run"
            )
        return prefix

    def named_checkpoint(self, name: str | None = "latest") -> str:
        """A checkpoint prefix by name: latest, best (the one a --keep_best run's best.json
        names) or a checkpoint in the folder such as model-120; checked to exist."""
        if name in (None, "", "latest"):
            return self.latest_checkpoint()
        if name == "best":
            path = self.path / paths.BEST
            try:
                name = json.loads(path.read_text(encoding="utf-8"))["checkpoint"]
            except FileNotFoundError:
                raise UserError(f"{self.path} has no best checkpoint ({paths.BEST}): train the"
                                " run with --keep_best and validation (--val_every with"
                                " --val_dataset or --val_fraction), or use --checkpoint latest"
                                ) from None
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"cannot read {path} ({type(e).__name__}: {e}): resuming the"
                                " run with --keep_best writes it again") from None
        name = str(name)
        # Only the folder's own checkpoints: a name is not a path out of it.
        if os.path.basename(name) != name or name in (".", ".."):
            raise UserError(f"checkpoint {name!r} is not a checkpoint name (latest, best or"
                            f" one in {self.path}, such as model-120)")
        prefix = self.path / name
        if not Path(str(prefix) + ".index").is_file():
            have = sorted(f.name[: -len(".index")] for f in self.path.glob("*.index"))
            raise UserError(f"no checkpoint {name} in {self.path} (its checkpoints:"
                            f" {', '.join(have) or 'none'}; or latest, best)")
        return str(prefix)

    def __repr__(self) -> str:
        return f"ModelSource({str(self.path)!r})"


def read_vocab_files(model_dir: str | os.PathLike) -> tuple[bytes, bytes]:
    """The raw bytes of encoder.json and vocab.bpe of a folder (a model, or a vocabulary)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"vocabulary folder {model_dir} not found")
    out = []
    for name in paths.VOCAB_FILES:
        try:
            size = (model_dir / name).stat().st_size
            if size > MAX_VOCAB_FILE_BYTES:  # checked before reading it all into memory
                raise UserError(f"{model_dir / name} is {size / 2**20:,.0f} MiB, far larger than"
                                " a vocabulary file (GPT-2's are about 1 MiB): is it the right"
                                " file? Re-download the model")
            out.append((model_dir / name).read_bytes())
        except FileNotFoundError:
            raise UserError(f"{model_dir / name} is missing: re-download the model") from None
        except OSError as e:
            raise UserError(f"cannot read {model_dir / name}: {e}") from None
    return out[0], out[1]


def _subdirs(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _models_dir_flag(parent: Path) -> str:
    return "" if str(parent) == paths.DEFAULT_MODELS_DIR else f" --models_dir {parent}"
