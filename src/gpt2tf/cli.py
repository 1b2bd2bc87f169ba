"""Command-line edge: fire turns each function's signature into its flags.

This is the only place a `UserError` becomes `error: <message>` on stderr and exit status 1.
The library never exits or prints errors itself.
"""

import os
import sys
from typing import Callable

from gpt2tf.api import DEFAULT_SAMPLE_DELIM

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF's C++ start-up chatter hides real output


def quiet_tensorflow_import() -> None:
    """Import TensorFlow with its native start-up log lines (oneDNN, CUDA probing) hidden.

    They are written to fd 2 by C++ before any Python-level setting can apply; set
    GPT2TF_TF_LOGS=1 to see them.
    """
    if "tensorflow" in sys.modules or os.environ.get("GPT2TF_TF_LOGS"):
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run_cli(component, argv: list[str] | None = None, name: str | None = None) -> int:
    """Run a fire component; turn UserError (and Ctrl-C) into an exit status."""
    import logging

    import fire

    from gpt2tf.errors import UserError

    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    logging.getLogger("gpt2tf").setLevel(logging.INFO)
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.INFO, "info")
    try:
        fire.Fire(component, command=argv, name=name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except fire.core.FireExit as e:  # --help (0) or a usage error (2): fire printed why
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _script(fn: Callable) -> Callable[[list[str] | None], int]:
    def main(argv: list[str] | None = None) -> int:
        return run_cli(fn, argv, name=fn.__name__)

    main.__doc__ = fn.__doc__
    return main


def download(
    model_name: str = "124M",
    models_dir: str = "models",
    base_url: str = "",
    progress: bool = True,
):
    """Download an OpenAI GPT-2 model (124M, 355M, 774M, 1558M) into <models_dir>/<model_name>/.

    base_url replaces OpenAI's storage (everything before /models/); the environment variable
    GPT2_BASE_URL does the same. An interrupted download resumes when run again.
    """
    from gpt2tf import download as dl

    dl.download_model(
        str(model_name), models_dir=models_dir, base_url=base_url or None, progress=progress
    )


def encode(
    in_path: str,
    out_path: str,
    model_name: str = "124M",
    models_dir: str = "models",
    encoding: str = "utf-8",
    column: int | str = 0,
    field: str = "text",
):
    """Encode text files, a folder, a glob, .csv or .jsonl into an .npz of token ids."""
    from gpt2tf import dataset

    stats = dataset.encode_to_npz(
        str(in_path),
        str(out_path),
        model_dir=None,
        model_name=str(model_name),
        models_dir=models_dir,
        encoding=encoding,
        column=column,
        field=field,
    )
    mb = stats["bytes"] / 1e6
    print(
        f"wrote {stats['tokens']:,} tokens from {stats['documents']} documents"
        f" ({mb:.1f} MB, {mb / max(stats['seconds'], 1e-9):.1f} MB/s) to {stats['out_path']}",
        file=sys.stderr,
    )


def _generator(model_name, models_dir, run_name, checkpoint_dir):
    """A Generator for --run_name (a fine-tuned run) if given, else --model_name."""
    quiet_tensorflow_import()
    from gpt2tf import paths
    from gpt2tf.inference import Generator

    if run_name:
        return Generator(paths.run_path(checkpoint_dir, str(run_name)))
    return Generator(paths.model_path(models_dir, str(model_name)))


def generate(
    model_name: str = "124M",
    models_dir: str = "models",
    run_name: str = "",
    checkpoint_dir: str = "checkpoint",
    seed: int | None = None,
    nsamples: int = 1,
    batch_size: int = 1,
    length: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    prefix: str = "",
    truncate: str = "",
    include_prefix: bool = True,
    destination_path: str = "",
    sample_delim: str = DEFAULT_SAMPLE_DELIM,
    stop_at_eot: bool = True,
):
    """Sample text from a model (--model_name) or a fine-tuned run (--run_name).

    Without --prefix samples are unconditional (they start after <|endoftext|>). top_k 0 and
    top_p 0 turn those filters off; --length may exceed the window (it slides).
    """
    quiet_tensorflow_import()
    from gpt2tf import inference

    gen = _generator(model_name, models_dir, run_name, checkpoint_dir)
    with gen:
        def show(i, text):
            if not destination_path:
                print(inference.format_sample(text, sample_delim, nsamples), end="", flush=True)

        texts = inference.generate_texts(
            gen, prefix=str(prefix) if prefix != "" else None, nsamples=nsamples,
            batch_size=batch_size, length=length, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, truncate=str(truncate) if truncate != "" else None,
            include_prefix=include_prefix, stop_at_eot=stop_at_eot, on_sample=show,
        )
        if destination_path:
            inference.write_samples(destination_path, texts, sample_delim)
            print(f"wrote {len(texts)} samples to {destination_path}", file=sys.stderr)


def interactive(
    model_name: str = "124M",
    models_dir: str = "models",
    run_name: str = "",
    checkpoint_dir: str = "checkpoint",
    seed: int | None = None,
    nsamples: int = 1,
    batch_size: int = 1,
    length: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    stop_at_eot: bool = True,
):
    """Type a prompt, watch the continuation stream in. Ctrl-C stops it, Ctrl-D quits."""
    quiet_tensorflow_import()
    from gpt2tf import inference

    # Check the flags before loading the model, so a typo costs no load time.
    inference.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    for name in ("nsamples", "batch_size") + (("length",) if length is not None else ()):
        inference.check_positive(name, locals()[name])
    gen = _generator(model_name, models_dir, run_name, checkpoint_dir)
    with gen:
        while True:
            try:
                prompt = input("Model prompt >>> ")
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            if not prompt.strip():
                print("Prompt should not be empty!")
                continue
            streaming = batch_size == 1  # one sample at a time: its text can stream

            def banner(i):
                print("=" * 40 + f" SAMPLE {i + 1} " + "=" * 40, flush=True)

            def stream(row, piece):
                sys.stdout.write(piece)
                sys.stdout.flush()

            def done(i, text):
                if streaming:
                    print()
                    if i + 1 < nsamples:
                        banner(i + 1)
                else:
                    banner(i)
                    print(text)

            try:
                if streaming:
                    banner(0)
                inference.generate_texts(
                    gen, prefix=prompt, nsamples=nsamples, batch_size=batch_size,
                    length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, include_prefix=False, stop_at_eot=stop_at_eot,
                    on_token=stream if streaming else None, on_sample=done,
                )
            except KeyboardInterrupt:
                print("\n[stopped]")
            print("=" * 80)


def init(
    out_dir: str,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_ctx: int = 128,
    n_vocab: int | None = None,
    vocab_dir: str = "",
    seed: int = 0,
):
    """Create a randomly initialised model directory in OpenAI's layout (GPT-2's init).

    --vocab_dir copies encoder.json and vocab.bpe from there (e.g. models/124M); without it a
    minimal byte-level vocabulary (257 tokens) is written. n_vocab defaults to the vocabulary's size.
    """
    quiet_tensorflow_import()
    from gpt2tf import checkpoints, encoder, modeldir
    from gpt2tf.hparams import HParams

    vocab = modeldir.read_vocab_files(vocab_dir) if vocab_dir else encoder.byte_level_vocab()
    size = encoder.Encoder.from_bytes(*vocab, source=vocab_dir or "byte-level vocabulary").n_vocab
    hparams = HParams(
        n_vocab=size if n_vocab is None else n_vocab, n_ctx=n_ctx, n_embd=n_embd,
        n_head=n_head, n_layer=n_layer,
    )
    checkpoints.init_model_dir(out_dir, hparams, vocab_dir=vocab_dir or None, seed=seed)
    print(f"created {out_dir} ({hparams})", file=sys.stderr)


download_main = _script(download)
encode_main = _script(encode)
generate_main = _script(generate)
interactive_main = _script(interactive)


def commands() -> dict:
    """Every verb of the `gpt2tf` command. Command modules import TensorFlow lazily."""
    from gpt2tf import convert, serve, trainer

    return {
        "download": download,
        "encode": encode,
        "init": init,
        "train": trainer.train_cli,
        "generate": generate,
        "interactive": interactive,
        "serve": serve.serve_cli,
        "convert": {"to-hf": convert.to_hf_cli, "from-hf": convert.from_hf_cli},
    }


def train_main(argv: list[str] | None = None) -> int:
    from gpt2tf import trainer

    return run_cli(trainer.train_cli, argv, name="train")


def serve_main(argv: list[str] | None = None) -> int:
    from gpt2tf import serve

    return run_cli(serve.serve_cli, argv, name="serve")


def main(argv: list[str] | None = None) -> int:
    """The `gpt2tf` console command: one verb per workflow step."""
    return run_cli(commands(), argv, name="gpt2tf")
