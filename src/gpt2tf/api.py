"""gpt-2-simple's Python API over gpt2tf: `import gpt2tf as gpt2` runs a gpt-2-simple script.

Same function names, parameter names and defaults. Differences that users asked for:
- a "session" is a small object holding loaded models; each model owns its own graph, built
  once and reused, so repeated generate() calls do not slow down or leak, and a second model
  loads without a restart (no "Variable model/wpe already exists");
- `seed` makes generation reproducible; `include_prefix=False` works without `truncate`;
  `nsamples` need not be a multiple of `batch_size`; generation stops at <|endoftext|>.
"""

import os
from pathlib import Path

from gpt2tf import paths
from gpt2tf.errors import UserError

DEFAULT_SAMPLE_DELIM = "=" * 20 + "\n"


class Session:
    """What gpt-2-simple's tf.Session stood for: the models loaded for generation."""

    def __init__(self, threads: int = -1):
        self.threads = threads if threads and threads > 0 else None
        self._models: dict[tuple[str, str], object] = {}
        self.current = None  # the Generator generate() uses by default

    def load(self, model_dir: str | os.PathLike, checkpoint: str | None = None):
        """Load (or reuse) a Generator for a model/run directory and make it current."""
        from gpt2tf import modeldir
        from gpt2tf.inference import Generator

        prefix = checkpoint or modeldir.latest_checkpoint(model_dir)
        key = (str(Path(model_dir).resolve()), str(Path(prefix).resolve()))
        if key not in self._models:
            self._models[key] = Generator(model_dir, checkpoint=prefix, threads=self.threads)
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


def _source_dir(run_name, checkpoint_dir, model_name, model_dir) -> Path:
    # gpt-2-simple's rule: a model_name means a released model, else the fine-tuned run.
    if model_name:
        return paths.model_path(model_dir, model_name)
    return paths.run_path(checkpoint_dir, run_name)


def download_gpt2(model_dir: str = "models", model_name: str = "124M") -> None:
    from gpt2tf import download

    download.download_model(model_name, models_dir=model_dir)


def is_gpt2_downloaded(model_dir: str = "models", model_name: str = "124M") -> bool:
    from gpt2tf import download

    return download.is_gpt2_downloaded(model_dir=model_dir, model_name=model_name)


def load_gpt2(
    sess: Session,
    checkpoint: str = "latest",
    run_name: str = "run1",
    checkpoint_dir: str = "checkpoint",
    model_name: str | None = None,
    model_dir: str = "models",
    multi_gpu: bool = False,
    reuse: bool = False,
) -> None:
    """Load a released model (model_name) or a fine-tuned run into the session."""
    source = _source_dir(run_name, checkpoint_dir, model_name, model_dir)
    prefix = None if checkpoint in (None, "latest") else str(source / checkpoint)
    sess.load(source, prefix)


def generate(
    sess: Session,
    run_name: str = "run1",
    checkpoint_dir: str = "checkpoint",
    model_name: str | None = None,
    model_dir: str = "models",
    sample_dir: str = "samples",
    return_as_list: bool = False,
    truncate: str | None = None,
    destination_path: str | None = None,
    sample_delim: str = DEFAULT_SAMPLE_DELIM,
    prefix: str | None = None,
    seed: int | None = None,
    nsamples: int = 1,
    batch_size: int = 1,
    length: int = 1023,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 0.0,
    include_prefix: bool = True,
):
    """Generate text from the session's model (loading it from the arguments if none is)."""
    from gpt2tf import inference

    if batch_size is None:
        batch_size = 1
    gen = sess.current
    if gen is None:
        gen = sess.load(_source_dir(run_name, checkpoint_dir, model_name, model_dir))
    texts = inference.generate_texts(
        gen, prefix=prefix, nsamples=nsamples, batch_size=batch_size, length=length,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, truncate=truncate,
        include_prefix=include_prefix,
    )
    if destination_path:
        inference.write_samples(destination_path, texts, sample_delim)
    elif not return_as_list:
        for text in texts:
            print(inference.format_sample(text, sample_delim, nsamples), end="")
    if return_as_list:
        return texts
    return None


def generate_to_file(
    sess: Session,
    run_name: str = "run1",
    checkpoint_dir: str = "checkpoint",
    model_name: str | None = None,
    model_dir: str = "models",
    truncate: str | None = None,
    destination_path: str = "gpt_2_gen_texts.txt",
    sample_delim: str = DEFAULT_SAMPLE_DELIM,
    prefix: str | None = None,
    seed: int | None = None,
    nsamples: int = 1,
    batch_size: int = 1,
    length: int = 1023,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 0.0,
    include_prefix: bool = True,
) -> None:
    """Generate samples into destination_path (written atomically)."""
    generate(
        sess, run_name=run_name, checkpoint_dir=checkpoint_dir, model_name=model_name,
        model_dir=model_dir, truncate=truncate, destination_path=destination_path,
        sample_delim=sample_delim, prefix=prefix, seed=seed, nsamples=nsamples,
        batch_size=batch_size, length=length, temperature=temperature, top_k=top_k,
        top_p=top_p, include_prefix=include_prefix,
    )


def encode_dataset(
    file_path: str,
    model_dir: str = "models",
    out_path: str = "text_encoded.npz",
    model_name: str = "124M",
    combine: int = 50000,
) -> None:
    """Pre-encode text (file, folder, glob, csv) into an .npz of token ids."""
    from gpt2tf import dataset

    dataset.encode_to_npz(file_path, out_path, model_name=model_name, models_dir=model_dir)
