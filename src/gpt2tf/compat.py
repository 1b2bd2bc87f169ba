"""gpt-2-simple's Python API over gpt2tf: `import gpt2tf as gpt2` runs a gpt-2-simple script.

Same function names, parameter names, order and defaults: the signatures are built from the
settings' declarations with gpt-2-simple's spellings and defaults (settings.GPT2_SIMPLE_*), so
help(gpt2tf.finetune) lists every parameter. Differences that users asked for:
- a "session" is a small object holding loaded models; each model owns its own graph, built
  once and reused, so repeated generate() calls do not slow down or leak, and a second model
  loads without a restart (no "Variable model/wpe already exists");
- `seed` makes generation reproducible; `include_prefix=False` works without `truncate`;
  `nsamples` need not be a multiple of `batch_size`; generation stops at <|endoftext|>;
- finetune checkpoints the optimizer and data order (resume is exact), applies the mean of
  accumulated gradients, and its memory-saving gradients work; Ctrl-C saves and returns.
"""

import logging
import os
from pathlib import Path

from gpt2tf import settings as S
from gpt2tf.errors import UserError
from gpt2tf.quiet import import_tensorflow
from gpt2tf.source import ModelSource

log = logging.getLogger(__name__)


def _settings(*names: str) -> list:
    """The declarations behind gpt-2-simple's parameters, in gpt-2-simple's order."""
    pool = {}
    for group in (S.GENERATE, S.MODEL_SOURCE, S.GPT2_SIMPLE_ONLY):
        for s in group:
            pool.setdefault(s.name, s)
    return [pool[n] for n in names]


def _api(names: tuple[str, ...], *, leading=("sess",), settings=None, keyword_only=()):
    settings = settings or _settings(*names)
    keyword_only = tuple(keyword_only)
    sig = S.signature(settings, leading=leading, names=S.GPT2_SIMPLE_NAMES,
                      defaults=S.GPT2_SIMPLE_DEFAULTS, keyword_only=keyword_only)
    return S.takes(sig, names=S.GPT2_SIMPLE_NAMES, settings=[*settings, *keyword_only])


class Session:
    """What gpt-2-simple's tf.Session stood for: the models loaded for generation."""

    def __init__(self, threads: int = -1):
        self.threads = threads if threads and threads > 0 else None
        self._models: dict[tuple[str, str], object] = {}
        self.current = None  # the Generator generate() uses by default

    def load(self, source: "str | os.PathLike | ModelSource", checkpoint: str | None = None,
             precision: str = S.DECODE_PRECISION.default):
        """Load (or reuse) a Generator for a model/run directory and make it current."""
        import_tensorflow()
        from gpt2tf.decode.generator import Generator

        source = ModelSource.at(source)
        prefix = checkpoint or source.latest_checkpoint()
        key = (str(source.path.resolve()), str(Path(prefix).resolve()), precision)
        if key not in self._models:
            self._models[key] = Generator(source, checkpoint=prefix, threads=self.threads,
                                          precision=precision)
        self.current = self._models[key]
        return self.current

    def close(self) -> None:
        for gen in self._models.values():
            gen.close()
        self._models.clear()
        self.current = None


def start_tf_sess(threads: int = -1, server=None) -> Session:
    """A new session (gpt-2-simple returned a tf.Session; ours holds loaded models)."""
    if server is not None:
        raise UserError("distributed TF servers are not supported by start_tf_sess")
    return Session(threads)


def reset_session(sess: Session, threads: int = -1, server=None) -> Session:
    """Close the session's models and return a fresh session."""
    if sess is not None:
        sess.close()
    return start_tf_sess(threads, server)


def _source(run_name, checkpoint_dir, model_name, models_dir) -> ModelSource:
    # gpt-2-simple's rule: a model_name means a released model, else the fine-tuned run.
    if model_name:
        return ModelSource.resolve(model_name=model_name, models_dir=models_dir)
    return ModelSource.resolve(run_name=run_name, checkpoint_dir=checkpoint_dir)


def download_gpt2(model_dir: str = "models", model_name: str = "124M") -> None:
    """Download an OpenAI GPT-2 model into <model_dir>/<model_name>/ (resumes if interrupted)."""
    from gpt2tf import download

    download.download_model(model_name, models_dir=model_dir)


def is_gpt2_downloaded(model_dir: str = "models", model_name: str = "124M") -> bool:
    """Whether every file of the model is there and complete."""
    from gpt2tf import download

    return download.is_gpt2_downloaded(model_dir=model_dir, model_name=model_name)


@_api(("checkpoint", "run_name", "checkpoint_dir", "model_name", "models_dir", "multi_gpu",
       "reuse"), keyword_only=(S.DECODE_PRECISION,))
def load_gpt2(*, sess, checkpoint, run_name, checkpoint_dir, model_name, models_dir, multi_gpu,
              reuse, precision) -> None:
    """Load a released model (model_name) or a fine-tuned run into the session."""
    if multi_gpu:
        log.warning("multi_gpu has no effect: generation runs on one device")
    source = _source(run_name, checkpoint_dir, model_name, models_dir)
    prefix = source.named_checkpoint(checkpoint)  # latest, best or e.g. model-120
    sess.load(source, prefix, precision=precision)


_GENERATE = ("run_name", "checkpoint_dir", "model_name", "models_dir", "sample_dir",
             "return_as_list", "truncate", "destination_path", "sample_delim", "prefix", "seed",
             "nsamples", "batch_size", "length", "temperature", "top_k", "top_p",
             "include_prefix")


@_api(_GENERATE, keyword_only=S.STEERING)
def generate(*, sess, run_name, checkpoint_dir, model_name, models_dir, sample_dir,
             return_as_list, truncate, destination_path, sample_delim, prefix, seed, nsamples,
             batch_size, length, temperature, top_k, top_p, include_prefix, **steering):
    """Generate text from the session's model (loading it from the arguments if none is)."""
    from gpt2tf.decode import generator, text

    gen = sess.current
    if gen is None:
        gen = sess.load(_source(run_name, checkpoint_dir, model_name, models_dir))
    texts = generator.generate_texts(
        gen, prefix=prefix, nsamples=nsamples, batch_size=batch_size or 1, length=length,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, truncate=truncate,
        include_prefix=include_prefix, **steering,
    )
    if destination_path:
        text.write_samples(destination_path, texts, sample_delim)
    elif not return_as_list:
        for t in texts:
            print(text.format_sample(t, sample_delim, nsamples), end="")
    return texts if return_as_list else None


_TO_FILE = tuple(n for n in _GENERATE if n not in ("sample_dir", "return_as_list"))


@S.takes(S.signature(_settings(*_TO_FILE), leading=("sess",), names=S.GPT2_SIMPLE_NAMES,
                     defaults={**S.GPT2_SIMPLE_DEFAULTS,
                               "destination_path": "gpt_2_gen_texts.txt"}),
         names=S.GPT2_SIMPLE_NAMES, settings=_settings(*_TO_FILE))
def generate_to_file(**values) -> None:
    """Generate samples into destination_path (written atomically)."""
    generate(**{S.GPT2_SIMPLE_NAMES.get(k, k): v for k, v in values.items()})


def encode_dataset(file_path: str, model_dir: str = "models", out_path: str = "text_encoded.npz",
                   model_name: str = "124M", combine: int = S.COMBINE.default) -> None:
    """Pre-encode text (file, folder, glob, csv) into an .npz of token ids."""
    from gpt2tf.data.encode import encode_to_npz

    if combine != S.COMBINE.default:
        log.warning("combine has no effect: text is encoded as one stream")
    encode_to_npz(file_path, out_path, model_name=model_name, models_dir=model_dir)


# finetune(): gpt-2-simple's parameters in its order, then every other training setting by name.
_FINETUNE = ("dataset", "steps", "model_name", "models_dir", "combine", "batch_size",
             "learning_rate", "accumulate_gradients", "restore_from", "run_name",
             "checkpoint_dir", "sample_every", "sample_length", "sample_num", "multi_gpu",
             "save_every", "print_every", "max_checkpoints", "memory_saving_gradients",
             "only_train_transformer_layers", "optimizer", "overwrite", "reuse")
_TRAIN_POOL = {s.name: s for s in (*S.TRAIN_INVOCATION, *S.TRAIN, *S.GPT2_SIMPLE_ONLY)}
_FINETUNE_SETTINGS = [_TRAIN_POOL[n] for n in _FINETUNE]
_FINETUNE_EXTRA = [s for s in (*S.TRAIN, *S.TRAIN_INVOCATION)
                   if s.name not in _FINETUNE]
_FINETUNE_SIG = S.signature(
    _FINETUNE_SETTINGS, leading=("sess",), names=S.GPT2_SIMPLE_NAMES,
    defaults={**S.GPT2_SIMPLE_DEFAULTS, "model_name": S.MODEL_NAME.default},
    keyword_only=_FINETUNE_EXTRA)
# dataset has no default in gpt-2-simple
_FINETUNE_SIG = _FINETUNE_SIG.replace(parameters=[
    p.replace(default=p.empty) if p.name == "dataset" else p
    for p in _FINETUNE_SIG.parameters.values()])


@S.takes(_FINETUNE_SIG, names=S.GPT2_SIMPLE_NAMES, settings=_FINETUNE_SETTINGS + _FINETUNE_EXTRA)
def finetune(*, sess, multi_gpu, reuse, run_name, checkpoint_dir, samples_dir, restore_from,
             steps, overwrite, cluster, collective_timeout_s, devices, **config):
    """gpt-2-simple's finetune(): train, then load the run into `sess` for generate()."""
    import_tensorflow()
    from gpt2tf.train.loop import train

    if multi_gpu:
        log.warning("multi_gpu has no effect: several local GPUs train data-parallel anyway"
                    " (devices=0); across machines set TF_CONFIG on each worker (or"
                    " cluster='slurm')")
    if config.get("combine") == S.COMBINE.default:
        config["combine"] = None  # only a value the user chose is worth a warning
    for extra in _FINETUNE_EXTRA:  # settings beyond gpt-2-simple's: a resumed run keeps its own
        if extra.name in config and config[extra.name] == extra.default:
            del config[extra.name]
    result = train(
        config, run_name=run_name, checkpoint_dir=checkpoint_dir, samples_dir=samples_dir,
        restore_from=restore_from, steps=-1 if steps in (None, 0) else steps,
        overwrite=overwrite, cluster=cluster, collective_timeout_s=collective_timeout_s,
        devices=devices)
    if sess is not None:
        sess.load(result.run_dir)
    return result
