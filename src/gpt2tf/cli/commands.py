"""What each script and `gpt2tf` verb does, once its command line has been read and checked.

Each function takes every one of its command's settings by name (see `COMMANDS`); the flags,
`--help` and the checks come from the declarations in gpt2tf.settings. TensorFlow is imported
(quietly) only by the commands that need it, after their flags are known to be good.
"""

import json
import signal
import sys
import threading

from gpt2tf import settings as S
from gpt2tf.cli.flags import Command
from gpt2tf.errors import FieldError
from gpt2tf.quiet import import_tensorflow
from gpt2tf.source import ModelSource


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _source(model_name, models_dir, run_name, checkpoint_dir) -> ModelSource:
    return ModelSource.resolve(model_name=model_name, models_dir=models_dir, run_name=run_name,
                               checkpoint_dir=checkpoint_dir)


def download(*, model_name, models_dir, base_url, progress):
    from gpt2tf import download as dl

    dl.download_model(model_name, models_dir=models_dir, base_url=base_url or None,
                      progress=progress)


def encode(*, in_path, out_path, model_name, models_dir, encoding, column, field, combine,
           line_by_line):
    from gpt2tf.data.encode import encode_to_npz

    S.check_encoding("encoding", encoding)
    if combine != S.COMBINE.default:
        _say("warning: --combine has no effect: text is encoded as one stream, documents"
             " joined by <|endoftext|>")
    stats = encode_to_npz(in_path, out_path, model_name=model_name, models_dir=models_dir,
                          encoding=encoding, column=column, field=field,
                          line_by_line=line_by_line)
    mb = stats["bytes"] / 1e6
    _say(f"wrote {stats['tokens']:,} tokens from {stats['documents']} documents"
         f" ({mb:.1f} MB, {mb / max(stats['seconds'], 1e-9):.1f} MB/s) to {stats['out_path']}")


def init(*, out_dir, n_layer, n_embd, n_head, n_ctx, n_vocab, vocab_dir, seed):
    import_tensorflow()
    from gpt2tf import checkpoints, encoder
    from gpt2tf.hparams import HParams
    from gpt2tf.source import read_vocab_files

    vocab = read_vocab_files(vocab_dir) if vocab_dir else encoder.byte_level_vocab()
    size = encoder.Encoder.from_bytes(*vocab, source=vocab_dir or "byte-level vocabulary").n_vocab
    hparams = HParams(n_vocab=size if n_vocab is None else n_vocab, n_ctx=n_ctx, n_embd=n_embd,
                      n_head=n_head, n_layer=n_layer)
    checkpoints.init_model_dir(out_dir, hparams, vocab_dir=vocab_dir or None, seed=seed)
    _say(f"created {out_dir} ({hparams})")


def train(*, given: set, **values):
    from gpt2tf.train.config import TrainConfig, check_invocation

    invocation = {s.name: values[s.name] for s in S.TRAIN_INVOCATION}
    # A flag left out is None: a resumed run then takes its stored value.
    config = {s.name: values[s.name] if s.name in given else None for s in S.TRAIN}
    check_invocation(run_name=invocation["run_name"], restore_from=invocation["restore_from"],
                     steps=invocation["steps"], overwrite=invocation["overwrite"])
    TrainConfig.resolve(config)  # cross-setting checks too, before TensorFlow loads
    import_tensorflow()
    from gpt2tf.train.loop import train as run_training

    result = run_training(config, **invocation)
    _say(f"saved {result.checkpoint}")


def generate(*, model_name, models_dir, run_name, checkpoint_dir, checkpoint, seed, nsamples,
             batch_size,
             length, temperature, top_k, top_p, prefix, prefix_file, field, truncate,
             include_prefix, destination_path, sample_delim, stop_at_eot, precision,
             **steering):
    from gpt2tf.decode.engine import SamplingParams
    from gpt2tf.decode.text import format_sample, read_prompts, write_samples

    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, **steering)  # checked
    if prefix and prefix_file:
        raise FieldError("prefix_file", "and --prefix cannot both be given: put the prompt in"
                         " the file")
    if prefix_file:
        prefix = read_prompts(prefix_file, field)
    source = _source(model_name, models_dir, run_name, checkpoint_dir)
    import_tensorflow()  # quietly, before reading `checkpoint` needs TensorFlow
    ckpt = source.named_checkpoint(checkpoint)  # latest, best or e.g. model-120
    from gpt2tf.decode.generator import Generator, generate_texts

    with Generator(source, checkpoint=ckpt, precision=precision) as gen:
        def show(i, text):
            if not destination_path:
                print(format_sample(text, sample_delim, nsamples), end="", flush=True)

        texts = generate_texts(
            gen, prefix=prefix or None, nsamples=nsamples, batch_size=batch_size,
            length=length, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            truncate=truncate or None, include_prefix=include_prefix, stop_at_eot=stop_at_eot,
            on_sample=show, **steering,
        )
        if destination_path:
            write_samples(destination_path, texts, sample_delim)
            _say(f"wrote {len(texts)} samples to {destination_path}")


def evaluate(*, model_dir, dataset, stride, batch_size, precision, encoding, column, field):
    from gpt2tf import score

    source = ModelSource.at(model_dir)
    S.check_encoding("encoding", encoding)
    n_ctx = source.hparams.n_ctx
    stride = max(n_ctx // 2, 1) if stride is None else stride
    score.windows(0, n_ctx, stride)  # checks the stride before anything loads
    import_tensorflow()
    from gpt2tf.data.encode import load_tokens
    from gpt2tf.decode.generator import Generator

    chunks = load_tokens(dataset, encoder=source.encoder, encoding=encoding, column=column,
                         field=field)
    engine = "auto" if precision == "int8" else "graph"  # int8 weights: only the fast path
    with Generator(source, precision=precision, engine=engine) as gen:
        result = score.evaluate(
            gen.target_logprobs, chunks, n_ctx=n_ctx, stride=stride, batch_size=batch_size,
            n_bytes=score.scored_bytes(source.encoder, chunks, n_ctx, stride))
    print(json.dumps(result), flush=True)


PROMPT = "Model prompt >>> "


def interactive(*, model_name, models_dir, run_name, checkpoint_dir, checkpoint, seed,
                nsamples, batch_size, length, temperature, top_k, top_p, stop_at_eot, precision,
                **steering):
    from gpt2tf.decode.engine import SamplingParams

    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, **steering)  # checked
    source = _source(model_name, models_dir, run_name, checkpoint_dir)
    import_tensorflow()
    ckpt = source.named_checkpoint(checkpoint)
    from gpt2tf.decode.generator import Generator, generate_texts

    # A shell starts background jobs with SIGINT ignored; this loop is driven by Ctrl-C.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
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

    with Generator(source, checkpoint=ckpt, precision=precision) as gen:
        while True:
            try:
                prompt = input(PROMPT)
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print("\n(Ctrl-D quits)")
                continue
            if not prompt.strip():
                print("Prompt should not be empty!")
                continue
            try:
                if streaming:
                    banner(0)
                generate_texts(
                    gen, prefix=prompt, nsamples=nsamples, batch_size=batch_size,
                    length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, include_prefix=False, stop_at_eot=stop_at_eot,
                    on_token=stream if streaming else None, on_sample=done, **steering,
                )
            except KeyboardInterrupt:
                print("\n[stopped]")
            print("=" * 80)


def serve(*, model_name, models_dir, run_name, checkpoint_dir, precision, host, port,
          batch_invariant, shutdown_grace_s, log_level, **limits):
    from gpt2tf.serve import server

    source = _source(model_name, models_dir, run_name, checkpoint_dir)
    import_tensorflow()
    server.serve(source, host=host, port=port, limits=limits, batch_invariant=batch_invariant,
                 shutdown_grace_s=shutdown_grace_s, log_level=log_level, precision=precision)


def to_hf(*, src_dir, out_dir, lora):
    import_tensorflow()
    from gpt2tf import convert

    out = convert.to_hf(src_dir, out_dir, lora=lora)
    _say(f"wrote {'PEFT adapter' if lora else 'HuggingFace GPT-2'} directory {out}")


def lora_merge(*, run_dir, out_dir):
    import_tensorflow()
    from gpt2tf import lora

    out = lora.merge(run_dir, out_dir)
    _say(f"wrote model directory {out} ({ModelSource.at(out).hparams})")


def from_hf(*, hf_dir, out_dir):
    import_tensorflow()
    from gpt2tf import convert

    out = convert.from_hf(hf_dir, out_dir)
    _say(f"wrote model directory {out} ({ModelSource.at(out).hparams})")


def tokenizer_train(*, corpus, out_dir, vocab_size, min_frequency, encoding, column, field,
                    progress):
    from gpt2tf.data.tokenizer import train_tokenizer

    S.check_encoding("encoding", encoding)
    out = train_tokenizer(corpus, out_dir, vocab_size=vocab_size, min_frequency=min_frequency,
                          encoding=encoding, column=column, field=field, progress=progress)
    fewer = (f" (the corpus had only {out['merges']:,} merges to learn)"
             if out["n_vocab"] < vocab_size else "")
    _say(f"wrote a vocabulary of {out['n_vocab']:,} tokens to {out['out_dir']}{fewer}")
    if not out["fast"]:
        _say("warning: tiktoken would not give these merges' ids: encoding uses the slower"
             " pure-Python path")


COMMANDS = {
    "download": Command(
        "download", download, S.DOWNLOAD, positional=("model_name",),
        summary="Download an OpenAI GPT-2 model into <models_dir>/<model_name>/.",
        notes="An interrupted download resumes when run again."),
    "encode": Command(
        "encode", encode, S.ENCODE + (S.COMBINE, S.LINE_BY_LINE), positional=("in_path", "out_path"),
        summary="Encode text files, a folder, a glob, .csv or .jsonl into an .npz of token ids."),
    "init": Command(
        "init", init, S.INIT, positional=("out_dir",),
        summary="Create a randomly initialised model directory in OpenAI's layout."),
    "train": Command(
        "train", train, S.TRAIN_INVOCATION + S.TRAIN, wants_given=True,
        summary="Fine-tune GPT-2 on a text file, folder, glob, .csv, .jsonl or .npz.",
        notes="Checkpoints, metrics and samples go to <checkpoint_dir>/<run_name>/ and"
              " <samples_dir>/<run_name>/.\nWithout --steps it trains until Ctrl-C or"
              " SIGTERM, which save a checkpoint and exit.\nResuming (--restore_from latest),"
              " a flag left out keeps the run's stored value."),
    "generate": Command(
        "generate", generate, S.MODEL_SOURCE + (S.CHECKPOINT,) + S.GENERATE,
        summary="Sample text from a model (--model_name) or a fine-tuned run (--run_name).",
        notes="Without --prefix samples are unconditional (they start after <|endoftext|>)."),
    "interactive": Command(
        "interactive", interactive, S.MODEL_SOURCE + (S.CHECKPOINT,) + S.INTERACTIVE,
        summary="Type a prompt, watch the continuation stream in.",
        notes="Ctrl-C stops a generation, Ctrl-D quits."),
    "eval": Command(
        "eval", evaluate, S.EVAL, positional=("model_dir",),
        summary="Score a text: loss, perplexity and bits per byte of every token after the"
                " first, as one JSON line.",
        notes="Windows of n_ctx tokens start every --stride tokens; each scores only the tokens"
              " no earlier window scored (transformers' sliding-window perplexity)."),
    "serve": Command(
        "serve", serve, S.SERVE,
        summary="Serve a model or run: a browser page at / and OpenAI's completions API.",
        notes="POST /v1/completions, GET /v1/models, GET /health, GET /stats. Ctrl-C or"
              " SIGTERM stops it cleanly."),
}
CONVERT = Command(
    "convert", None, (), summary="Convert to and from HuggingFace GPT-2 directories.",
    subcommands={
        "to-hf": Command("to-hf", to_hf, S.TO_HF, positional=("src_dir", "out_dir"),
                         summary="Write a HuggingFace GPT-2 directory from a model or run."),
        "from-hf": Command("from-hf", from_hf, S.FROM_HF, positional=("hf_dir", "out_dir"),
                           summary="Write a model directory in OpenAI's layout from"
                                   " HuggingFace."),
    })
TOKENIZER = Command(
    "tokenizer", None, (), summary="Learn a byte-level BPE vocabulary in GPT-2's format.",
    subcommands={
        "train": Command("train", tokenizer_train, S.TOKENIZER_TRAIN,
                         positional=("corpus", "out_dir"),
                         summary="Learn encoder.json and vocab.bpe from text files, a folder"
                                 " or a glob (HuggingFace tokenizers' BPE trainer).",
                         notes="Then `gpt2tf init OUT --vocab_dir OUT_DIR` makes a model for"
                               " it to train from scratch."),
    })
LORA = Command(
    "lora", None, (), summary="Work with LoRA runs (train --lora_rank R).",
    subcommands={
        "merge": Command("merge", lora_merge, S.LORA_MERGE, positional=("run_dir", "out_dir"),
                         summary="Write a LoRA run's base with its adapters merged as a model"
                                 " folder in OpenAI's layout."),
    })
GPT2TF = Command("gpt2tf", None, (), summary="Download, fine-tune, generate from and serve GPT-2.",
                 subcommands={**COMMANDS, "convert": CONVERT, "tokenizer": TOKENIZER,
                              "lora": LORA})
