"""Every setting a user can give, declared once: its name, type, default, bound and help.

The command-line flags, the Python API's keywords, `--help`, the checks and the saved
train_config.json all derive from these declarations (see gpt2tf.cli.flags for the flags and
`signature` below for the API). A setting that means different things in two places (the batch
size of training and of generation) is two declarations; one that means the same is shared.

Where nshepperd's train.py and gpt-2-simple's API disagree on a default, the CLI follows
nshepperd's (declared here) and the API follows gpt-2-simple's (`GPT2_SIMPLE_DEFAULTS`, the one
place that states the difference).

Nothing here imports TensorFlow: flags are checked before anything heavy loads.
"""

import codecs
import dataclasses
import functools
import inspect
import math
import re
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Callable, Iterable

import numpy as np

from gpt2tf import paths
from gpt2tf.errors import FieldError

REQUIRED = inspect.Parameter.empty  # the default of a setting that must be given


@dataclass(frozen=True)
class Setting:
    """One setting. `low`/`high` bound numbers (inclusive unless `*_open`); `choices` bounds
    strings; `optional` allows None (its help says what None means); `text` marks free text in
    which the command line understands the escapes users type (`\\n`, `\\t`); `local_path`
    refuses URLs (the settings without it that name folders or data take the URLs that
    gpt2tf.remote stages)."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False
    text: bool = False
    local_path: bool = False
    also_str: bool = False  # an int that may also be given as a name (a CSV column)
    metavar: str = ""

    @property
    def annotation(self):
        t = self.type | str if self.also_str else self.type
        return t | None if self.optional else t

    def check(self, value):
        """`value` normalised to the setting's type, or FieldError saying what is wrong."""
        if value is None:
            if self.optional:
                return None
            raise FieldError(self.name, f"is required: {self.help}")
        if self.type is bool:
            if not isinstance(value, bool):
                raise FieldError(self.name, f"is a switch (true or false), got {value!r}")
            return value
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if self.also_str and isinstance(value, str):
                    return value
                if _is_integral(value):
                    value = int(value)
                else:
                    raise FieldError(self.name, f"must be an integer, got {value!r}")
            return self._bounded(int(value))
        if self.type is float:
            if isinstance(value, bool) or not _is_number(value):
                raise FieldError(self.name, f"must be a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise FieldError(self.name, f"must be a finite number, got {value!r}")
            return self._bounded(value)
        if self.type is tuple:
            return self._texts(value)
        if self.type is dict:
            return self._token_biases(value)
        # str
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # `--run_name 7`: a name that looks like a number
            else:
                raise FieldError(self.name, f"must be text, got {value!r}")
        if self.choices and value not in self.choices:
            raise FieldError(self.name, f"must be one of {', '.join(self.choices)}, got {value!r}")
        if self.local_path and _URL.match(value):
            raise FieldError(
                self.name, f"is a URL ({value}); remote storage is not supported: give a"
                " local folder (copy the files there first)")
        return value

    def _texts(self, value) -> tuple[str, ...]:
        """A list of non-empty texts (a single text is a list of one) -> a tuple."""
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise FieldError(self.name, f"must be a list of texts, got {value!r}")
        for item in items:
            if not isinstance(item, str) or not item:
                raise FieldError(self.name, f"entries must be non-empty texts, got {item!r}")
        return tuple(x for x in items if x)

    def _token_biases(self, value) -> tuple[tuple[int, float], ...]:
        """{token id: bias} (ids may be strings of digits, as JSON keys are) -> sorted pairs."""
        if isinstance(value, tuple):  # already checked (a dataclass copied with replace())
            value = dict(value)
        if not isinstance(value, dict):
            raise FieldError(self.name, f"must map token ids to numbers, got {value!r}")
        out = {}
        for key, bias in value.items():
            if isinstance(key, str) and re.fullmatch(r"\d{1,9}", key):
                key = int(key)
            if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
                raise FieldError(self.name, f"keys must be token ids, got {key!r}")
            if isinstance(bias, bool) or not _is_number(bias) or not \
                    self.low <= float(bias) <= self.high:
                raise FieldError(self.name, f"values must be numbers {self.bound_text()}, got"
                                 f" {bias!r} for token {key}")
            out[int(key)] = float(bias)
        return tuple(sorted(out.items()))

    def _bounded(self, value):
        lo_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        hi_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if lo_ok and hi_ok:
            return value
        kind = "an integer " if self.type is int else ""
        raise FieldError(self.name, f"must be {kind}{self.bound_text()}, got {value!r}")

    def bound_text(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "valid"


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating))


def _is_integral(value) -> bool:
    return isinstance(value, np.integer)


def check_encoding(name: str, encoding: str) -> str:
    try:
        codecs.lookup(str(encoding))
    except LookupError:
        raise FieldError(
            name, f"is an unknown text encoding {encoding!r}: use a Python codec name such as"
            " utf-8 or latin-1") from None
    return encoding


# --- the declarations -----------------------------------------------------------------------

S = Setting

# Where the model comes from: a released model (models/<model_name>) or a run (checkpoint/<run>).
MODEL_NAME = S("model_name", str, paths.DEFAULT_MODEL_NAME,
               "model folder under --models_dir: 124M, 355M, 774M, 1558M or one of your own")
MODELS_DIR = S("models_dir", str, paths.DEFAULT_MODELS_DIR, "folder that holds the models"
               " (or a URL: gs://, s3://, hdfs://)")
RUN_NAME = S("run_name", str, "", "a fine-tuned run under --checkpoint_dir; used instead of"
             " --model_name when given")
CHECKPOINT_DIR = S("checkpoint_dir", str, paths.DEFAULT_CHECKPOINT_DIR,
                   "folder that holds fine-tuning runs (or a URL: gs://, s3://, hdfs://)")
MODEL_SOURCE = (MODEL_NAME, MODELS_DIR, RUN_NAME, CHECKPOINT_DIR)
CHECKPOINT = S("checkpoint", str, "latest", "latest, best (the lowest val_loss of a run trained"
               " with --keep_best) or the name of a checkpoint in the folder (model-120)")

# Generation.
SEED = S("seed", int, None, "random seed: sample i depends only on (seed, i); none: random",
         optional=True)
NSAMPLES = S("nsamples", int, 1, "how many samples to generate", low=1)
BATCH_SIZE = S("batch_size", int, 1, "samples generated together (need not divide nsamples)",
               low=1)
LENGTH = S("length", int, None, "new tokens per sample (may exceed the window: it slides);"
           " none: the window size n_ctx - 1", low=1, optional=True)
TEMPERATURE = S("temperature", float, 1.0, "below 1 less random, above 1 more", low=0,
                low_open=True)
TOP_K = S("top_k", int, 0, "sample from the k most likely tokens; 0 turns it off", low=0,
          high=2**31 - 1)
TOP_P = S("top_p", float, 0.0, "sample from the most likely tokens covering probability p;"
          " 0 (or 1) turns it off", low=0, high=1)
PREFIX = S("prefix", str, "", "text the samples continue; empty: unconditional", text=True)
PREFIX_FILE = S("prefix_file", str, "", "many prompts, --nsamples each, batched together: a"
                " file with one per line, or a .jsonl with the text in --field", local_path=True)
PROMPT_FIELD = S("field", str, "text", "the .jsonl field of --prefix_file holding the prompt")
TRUNCATE = S("truncate", str, "", "cut each sample at the first occurrence of this text",
             text=True)
INCLUDE_PREFIX = S("include_prefix", bool, True, "start each sample with the prefix")
DESTINATION_PATH = S("destination_path", str, "",
                     "write the samples to this file instead of printing them")
SAMPLE_DELIM = S("sample_delim", str, "=" * 20 + "\n", "text written between samples",
                 text=True)
STOP_AT_EOT = S("stop_at_eot", bool, True, "end a sample at <|endoftext|>")
DECODE_PRECISION = S("precision", str, "fp32", "weights generation reads: fp32 (exact), int8"
                     " (per-channel, fastest) or bf16", choices=("fp32", "int8", "bf16"))
# Steering: each changes the logits before temperature and filtering; the defaults are off.
# transformers' processors (repetition_penalty, no_repeat_ngram_size, min_length, bad_words)
# and OpenAI's (presence_penalty, frequency_penalty, logit_bias), with their semantics.
REPETITION_PENALTY = S("repetition_penalty", float, 1.0, "divide the positive logits and"
                       " multiply the negative ones of every token already in the text (prompt"
                       " included), as transformers does; 1 turns it off", low=0, low_open=True)
NO_REPEAT_NGRAM_SIZE = S("no_repeat_ngram_size", int, 0, "never produce an n-gram of this many"
                         " tokens that the text (prompt included) already has; 0 turns it off",
                         low=0)
MIN_LENGTH = S("min_length", int, 0, "no <|endoftext|> before this many new tokens"
               " (transformers' min_new_tokens)", low=0)
BAD_WORDS = S("bad_words", tuple, (), "texts never produced (each as it is encoded: mind the"
              " leading space); on the command line a JSON list or texts separated by |",
              text=True, metavar="TEXTS")
PRESENCE_PENALTY = S("presence_penalty", float, 0.0, "subtracted from the logit of every token"
                     " already generated, as OpenAI's", low=-2, high=2)
FREQUENCY_PENALTY = S("frequency_penalty", float, 0.0, "subtracted from a token's logit once per"
                      " time it was generated, as OpenAI's", low=-2, high=2)
LOGIT_BIAS = S("logit_bias", dict, (), "{token id: bias} added to the logits, as OpenAI's"
               " (-100 bans a token, 100 forces it)", low=-100, high=100, metavar="JSON")
STEERING = (REPETITION_PENALTY, NO_REPEAT_NGRAM_SIZE, MIN_LENGTH, BAD_WORDS, PRESENCE_PENALTY,
            FREQUENCY_PENALTY, LOGIT_BIAS)
SAMPLING = (TEMPERATURE, TOP_K, TOP_P) + STEERING
GENERATE = (SEED, NSAMPLES, BATCH_SIZE, LENGTH, TEMPERATURE, TOP_K, TOP_P, PREFIX,
            PREFIX_FILE, PROMPT_FIELD, TRUNCATE, INCLUDE_PREFIX, DESTINATION_PATH, SAMPLE_DELIM, STOP_AT_EOT,
            DECODE_PRECISION) + STEERING
INTERACTIVE = (SEED, NSAMPLES, BATCH_SIZE, LENGTH, TEMPERATURE, TOP_K, TOP_P, STOP_AT_EOT,
               DECODE_PRECISION) + STEERING

# Reading text.
ENCODING = S("encoding", str, "utf-8", "text encoding of the input files (a Python codec name)")
COLUMN = S("column", int, 0, "CSV column holding the text: its index, or its header name",
           low=0, also_str=True)
FIELD = S("field", str, "text", "JSONL field holding the text")
LINE_BY_LINE = S("line_by_line", bool, False, "each line of a plain text file is a document"
                 " (blank lines skipped), as transformers' run_clm --line_by_line")
COMBINE = S("combine", int, 50000, "accepted for nshepperd's and gpt-2-simple's scripts; has no"
            " effect (text is always one stream with <|endoftext|> between documents)", low=0)
IN_PATH = S("in_path", str, REQUIRED, "text file, folder, glob, .csv or .jsonl to encode")
OUT_PATH = S("out_path", str, REQUIRED, ".npz file to write the token ids to")
ENCODE = (IN_PATH, OUT_PATH, MODEL_NAME, MODELS_DIR, ENCODING, COLUMN, FIELD)

# Scoring a text (gpt2tf eval).
EVAL = (
    S("model_dir", str, REQUIRED, "model or run folder to score with", local_path=True),
    S("dataset", str, REQUIRED, "text file, folder, glob, .csv, .jsonl or .npz to score",
      local_path=True, metavar="PATH"),
    S("stride", int, None, "a window of n_ctx tokens starts every stride tokens, scoring the"
      " ones no earlier window scored; none: n_ctx // 2", low=1, optional=True),
    S("batch_size", int, 1, "windows scored together", low=1),
    S("precision", str, "fp32", "weights to score with: fp32 (exact) or bf16 in the TF graph,"
      " or int8 on the fast path (a decode step per token: slower)",
      choices=("fp32", "bf16", "int8")),
    ENCODING, COLUMN, FIELD,
)

# Downloading.
DOWNLOAD_MODEL_NAME = S("model_name", str, paths.DEFAULT_MODEL_NAME,
                        "124M, 355M, 774M or 1558M (117M and 345M are their old names)")
BASE_URL = S("base_url", str, "", "a mirror of OpenAI's storage (everything before /models/);"
             f" also ${paths.BASE_URL_ENV}")
PROGRESS = S("progress", bool, True, "show a progress bar on a terminal")
# Downloads go to a local folder (copy it to remote storage after).
DOWNLOAD = (DOWNLOAD_MODEL_NAME, dataclasses.replace(MODELS_DIR, local_path=True), BASE_URL,
            PROGRESS)

# A new random model.
INIT = (
    S("out_dir", str, REQUIRED, "new model folder to create", local_path=True),
    S("n_layer", int, 2, "transformer blocks", low=1),
    S("n_embd", int, 64, "width of the residual stream", low=1),
    S("n_head", int, 2, "attention heads (must divide n_embd)", low=1),
    S("n_ctx", int, 128, "window length in tokens", low=1),
    S("n_vocab", int, None, "vocabulary size; none: the vocabulary's own size", low=1,
      optional=True),
    S("vocab_dir", str, "", "copy encoder.json and vocab.bpe from this folder (e.g. models/124M);"
      " empty: a minimal byte-level vocabulary of 257 tokens"),
    S("seed", int, 0, "seed of the random initial weights", low=0),
)

# Training: what a run computes (TrainConfig, stored as train_config.json) ...
OPTIMIZERS = ("adam", "sgd", "adafactor")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")  # bf16: bfloat16 matmuls; weights, norms and the loss in float32
SAMPLE_MODES = ("windows", "documents")
CLUSTERS = ("auto", "slurm", "none")  # see gpt2tf.train.distributed
TRAIN = (
    S("dataset", str, None, "text file, folder, glob, .csv, .jsonl or .npz to train on"
      " (required unless resuming a run that has one; a URL is staged)", optional=True,
      metavar="PATH"),
    MODEL_NAME,
    MODELS_DIR,
    COMBINE,
    ENCODING,
    COLUMN,
    FIELD,
    S("seq_len", int, 0, "tokens per training window; 0: the model's n_ctx", low=0),
    S("batch_size", int, 1, "windows per micro-batch", low=1),
    S("learning_rate", float, 2e-5, "the optimizer's peak learning rate", low=0, low_open=True),
    S("accumulate_gradients", int, 1, "micro-batches per step (their mean gradient is applied)",
      low=1),
    S("optimizer", str, "adam", "adam, sgd or adafactor", choices=OPTIMIZERS),
    S("only_train_transformer_layers", bool, False,
      "train the blocks only (embeddings and the final norm stay frozen)"),
    S("memory_saving_gradients", bool, False,
      "recompute each block in the backward pass: less memory, ~1.6x slower"),
    S("lora_rank", int, 0, "train rank-R LoRA adapters on a frozen base (the run's checkpoints"
      " hold only them); 0: fine-tune the weights themselves", low=0),
    S("lora_alpha", float, 16.0, "LoRA: the adapters' output is scaled by alpha / rank", low=0,
      low_open=True),
    S("lora_targets", str, "c_attn", "LoRA: the layers that get adapters, comma-separated:"
      " c_attn, c_proj (both), c_fc, attn/c_proj, mlp/c_proj"),
    S("precision", str, "fp32", "fp32, or bf16 (bfloat16 matmuls, float32 weights)",
      choices=PRECISIONS),
    S("warmup_steps", int, 0, "steps of linear learning-rate warm-up", low=0),
    S("lr_schedule", str, "constant", "constant or cosine", choices=LR_SCHEDULES),
    S("lr_decay_steps", int, 0, "cosine: decay over this many steps; 0: the first --steps",
      low=0),
    S("min_lr_ratio", float, 0.1, "cosine: the final learning rate as a fraction of the peak",
      low=0, high=1),
    S("max_grad_norm", float, 0.0, "clip gradients to this global norm; 0 turns it off", low=0),
    S("noise", float, 0.0, "probability of replacing each input token with a random one",
      low=0, high=1, high_open=True),
    S("seed", int, None, "seed of the data order and noise; none: random (recorded in the run)",
      low=0, optional=True),
    S("sample_every", int, 100, "print and save samples every N steps; 0 turns them off", low=0),
    S("sample_length", int, 1023, "tokens per periodic sample", low=1),
    S("sample_num", int, 1, "samples each time", low=0),
    S("top_k", int, 40, "top-k of the periodic samples; 0 turns it off", low=0,
      high=2**31 - 1),
    S("top_p", float, 0.0, "top-p of the periodic samples; 0 turns it off", low=0, high=1),
    S("save_every", int, 1000, "save a checkpoint every N steps; 0: only at the end", low=0),
    S("print_every", int, 1, "log the loss every N steps", low=1),
    S("max_checkpoints", int, 1, "checkpoints kept; 0 keeps all", low=0),
    S("val_dataset", str, None, "held-out text or .npz for validation", optional=True,
      metavar="PATH"),
    S("val_fraction", float, 0.0, "hold out this fraction of the dataset for validation",
      low=0, high=1, high_open=True),
    S("val_batch_size", int, 2, "windows per validation batch", low=1),
    S("val_batch_count", int, 40, "validation batches (the same windows every time)", low=1),
    S("val_every", int, 0, "validate every N steps; 0 turns it off", low=0),
    S("keep_best", bool, False, "also keep the checkpoint of the lowest val_loss (named in"
      f" {paths.BEST}; generate with --checkpoint best); --max_checkpoints never deletes it"),
    S("early_stopping_patience", int, 0, "stop, saving first, after N validations in a row"
      " without a lower val_loss; 0 turns it off", low=0),
    S("sample_mode", str, "windows", "windows: anywhere in the text; documents: each window"
      " starts at a document (at the <|endoftext|> before it), short ones packed together",
      choices=SAMPLE_MODES),
    LINE_BY_LINE,
)
# ... and what one invocation does (not stored with the run).
SAMPLES_DIR = S("samples_dir", str, paths.DEFAULT_SAMPLES_DIR,
                "folder for the periodic samples", local_path=True)
TRAIN_INVOCATION = (
    S("run_name", str, paths.DEFAULT_RUN_NAME, "the run's folder under --checkpoint_dir"),
    CHECKPOINT_DIR,
    SAMPLES_DIR,
    S("restore_from", str, "latest", "latest: continue the run (or start from --model_name);"
      " fresh: start from --model_name; or a model/run folder or checkpoint path"),
    S("steps", int, -1, "train this many more steps; -1 until Ctrl-C or SIGTERM (which save)",
      low=-1),
    S("overwrite", bool, False, "with --restore_from fresh: replace the run's checkpoints (after"
      " the new one is saved)"),
    S("cluster", str, "auto", "data-parallel workers: auto (those TF_CONFIG names, else train"
      " alone), slurm (the Slurm allocation's tasks) or none; --batch_size is per worker",
      choices=CLUSTERS),
    S("collective_timeout_s", float, 60.0, "data-parallel: a worker that does not answer an"
      " all-reduce within this many seconds ends training with an error naming it", low=0,
      low_open=True),
    S("devices", int, 0, "local devices to train on data-parallel, one replica each"
      " (MirroredStrategy): 0 every GPU where there are several; N the first N GPUs, or N logical"
      " CPU devices without a GPU (for tests: they share the cores); a cluster's worker takes 1;"
      " --batch_size is per device", low=0),
)

# Serving.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LIMITS = (
    S("max_batch", int, 8, "rows decoded together", low=1),
    S("queue_size", int, 256, "rows that may wait; more is answered 503", low=1),
    S("max_prompt_tokens", int, 2048, "longest prompt accepted (cut to the window)", low=1),
    S("max_tokens_limit", int, 1024, "largest max_tokens a request may ask for", low=1),
    S("max_n", int, 16, "choices per request (n x prompts)", low=1),
    S("max_body_bytes", int, 1_000_000, "largest request body", low=1),
)
# How long a client may take, and how many may be connected: slow or idle clients must not
# hold the server's sockets (each is a file descriptor) for ever.
CONNECTIONS = (
    S("header_timeout_s", float, 10.0, "seconds a client has to send a request's headers,"
      " from opening the connection (or its next request's first byte)", low=0, low_open=True),
    S("body_timeout_s", float, 30.0, "seconds a client has to send a request's body once its"
      " headers are in", low=0, low_open=True),
    S("idle_timeout_s", float, 5.0, "seconds an idle keep-alive connection stays open between"
      " requests", low=0, low_open=True),
    S("max_connections", int, 1000, "open connections; more are refused at once with a 503",
      low=1),
)
# Who may use the server. A browser page on another site could otherwise drive a local server
# (and, with DNS rebinding, read its answers).
API_KEY_ENV = "GPT2TF_API_KEY"
ACCESS = (
    S("allowed_hosts", str, "", "comma-separated Host names the server answers to (a name may"
      " carry :port; *.example.com covers subdomains; * any); empty: localhost, 127.0.0.1,"
      " [::1] and --host"),
    S("allowed_origins", str, "", "comma-separated web origins (https://app.example.com) whose"
      " pages may call the API; * any; empty: only the server's own page"),
    S("api_key", str, "", "require `Authorization: Bearer <key>` on every route but /health"
      f" and the page; also ${API_KEY_ENV}, which other users cannot see in ps"),
)
SERVE = MODEL_SOURCE + (
    DECODE_PRECISION,
    S("host", str, "127.0.0.1", "address to listen on (0.0.0.0: every interface)"),
    S("port", int, 8000, "TCP port; 0: any free port", low=0, high=65535),
) + LIMITS + CONNECTIONS + ACCESS + (
    S("batch_invariant", bool, True, "pad every batch to max_batch rows so that a seed's"
      " completion never depends on the load (a lone request costs a full batch)"),
    S("shutdown_grace_s", float, 5.0, "seconds running requests get after Ctrl-C or SIGTERM",
      low=0),
    S("log_level", str, "info", "critical, error, warning, info or debug", choices=LOG_LEVELS),
)

# Conversion.
TO_HF = (S("src_dir", str, REQUIRED, "model or run folder in OpenAI's layout", local_path=True),
         S("out_dir", str, REQUIRED, "new folder for the HuggingFace model", local_path=True),
         S("lora", bool, False, "SRC_DIR is a LoRA run: write its adapters as a PEFT adapter"
           " (adapter_config.json, adapter_model.safetensors) for its converted base"))
LORA_MERGE = (S("run_dir", str, REQUIRED, "LoRA run folder (trained with --lora_rank)",
                local_path=True),
              S("out_dir", str, REQUIRED, "new model folder for the merged weights",
                local_path=True))
FROM_HF = (S("hf_dir", str, REQUIRED, "HuggingFace GPT-2 folder (config.json, weights)",
             local_path=True),
           S("out_dir", str, REQUIRED, "new model folder in OpenAI's layout", local_path=True))

# Learning a vocabulary (gpt2tf tokenizer train).
TOKENIZER_TRAIN = (
    S("corpus", str, REQUIRED, "text file, folder, glob, .csv or .jsonl to learn the vocabulary"
      " from", local_path=True, metavar="PATH"),
    S("out_dir", str, REQUIRED, "new folder for encoder.json and vocab.bpe", local_path=True),
    S("vocab_size", int, 50257, "tokens at most: the 256 bytes, the merges learned and"
      " <|endoftext|> (the last id)", low=257),
    S("min_frequency", int, 2, "learn only merges of pairs seen at least this many times",
      low=1),
    ENCODING, COLUMN, FIELD, PROGRESS,
)

# gpt-2-simple's API keeps its own defaults where they differ from nshepperd's CLI, so that a
# gpt-2-simple script runs unchanged: its finetune() learns faster by default (lr 1e-4 with 5
# accumulated micro-batches), and its generate() samples cooler (0.7) and fills the window.
# Its other differences are names (model_dir, use_memory_saving_gradients) and "not given"
# defaults (None) where the CLI has an empty string.
GPT2_SIMPLE_DEFAULTS = {
    "learning_rate": 1e-4,
    "accumulate_gradients": 5,
    "temperature": 0.7,
    "length": 1023,
    "run_name": paths.DEFAULT_RUN_NAME,
    "model_name": None,
    "truncate": None,
    "destination_path": None,
    "prefix": None,
}
GPT2_SIMPLE_NAMES = {"models_dir": "model_dir",
                     "memory_saving_gradients": "use_memory_saving_gradients"}
# Parameters only gpt-2-simple's API has.
GPT2_SIMPLE_ONLY = (
    S("sample_dir", str, paths.DEFAULT_SAMPLES_DIR, "accepted for gpt-2-simple; not used"),
    S("return_as_list", bool, False, "return the texts instead of printing them"),
    S("multi_gpu", bool, False, "accepted for gpt-2-simple; warns: training uses one device"),
    S("reuse", bool, False, "accepted for gpt-2-simple; not needed (each model has its graph)"),
    CHECKPOINT,
)


# --- deriving from the declarations ---------------------------------------------------------


def by_name(settings: Iterable[Setting]) -> dict[str, Setting]:
    return {s.name: s for s in settings}


def check_all(settings: Iterable[Setting], values: dict) -> dict:
    """Each value checked by its setting (values not named by a setting are left out)."""
    known = by_name(settings)
    return {k: known[k].check(v) for k, v in values.items() if k in known}


def make_config(name: str, settings: Iterable[Setting], doc: str, namespace: dict | None = None):
    """A frozen dataclass with one field per setting (default included), checked on creation."""
    settings = tuple(settings)
    known = by_name(settings)

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, known[f.name].check(getattr(self, f.name)))
        if namespace and "validate" in namespace:
            self.validate()

    cls = make_dataclass(
        name,
        [(s.name, s.annotation, field(default=s.default)) for s in settings],
        frozen=True,
        namespace={"__post_init__": __post_init__, "__doc__": doc, **(namespace or {})},
    )
    cls.SETTINGS = settings
    return cls


def signature(
    settings: Iterable[Setting],
    *,
    leading: Iterable[str] = (),
    names: dict[str, str] | None = None,
    defaults: dict[str, Any] | None = None,
    keyword_only: Iterable[Setting] = (),
) -> inspect.Signature:
    """A function signature over settings: `leading` plain parameters first, then one parameter
    per setting (spelled `names[s.name]` where an API spells it otherwise, with `defaults`
    overriding the declared default), then `keyword_only` settings."""
    names, defaults = names or {}, defaults or {}
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(n, kind) for n in leading]
    for s in settings:
        params.append(inspect.Parameter(
            names.get(s.name, s.name), kind, default=defaults.get(s.name, s.default),
            annotation=s.annotation))
    for s in keyword_only:
        params.append(inspect.Parameter(
            names.get(s.name, s.name), inspect.Parameter.KEYWORD_ONLY,
            default=defaults.get(s.name, s.default), annotation=s.annotation))
    return inspect.Signature(params)


def takes(sig: inspect.Signature, *, names: dict[str, str] | None = None,
          settings: Iterable[Setting] = ()) -> Callable:
    """Give `fn(**values)` the signature `sig`: calls are bound against it (a wrong keyword is
    a TypeError, as for any function), parameters spelled otherwise are passed under their
    setting's name, and help() lists them with their defaults and help text."""
    back = {v: k for k, v in (names or {}).items()}
    helps = {(names or {}).get(s.name, s.name): s.help for s in settings}

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            return fn(**{back.get(k, k): v for k, v in bound.arguments.items()})

        wrapper.__signature__ = sig
        lines = [f"    {p}: {helps[p]}" for p in sig.parameters if p in helps]
        if lines:
            wrapper.__doc__ = (fn.__doc__ or "").rstrip() + "\n\nParameters:\n" + "\n".join(lines)
        del wrapper.__wrapped__  # inspect.signature must show `sig`, not fn's **values
        return wrapper

    return wrap


def config_values(cfg) -> dict:
    """A config dataclass as a plain dict (what train_config.json stores)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}

