"""Conversion between OpenAI-layout model directories and HuggingFace GPT-2 directories.

`to_hf` turns a model or run directory into what `transformers.GPT2LMHeadModel` and
`AutoTokenizer.from_pretrained` load offline: model.safetensors, config.json, vocab.json,
merges.txt and the small tokenizer/generation files. It never imports PyTorch.

`to_hf(..., lora=True)` writes a LoRA run's adapters as a PEFT adapter folder instead
(adapter_config.json, adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads
onto the run's base converted with `to_hf`.

`from_hf` goes the other way: a HuggingFace GPT-2 directory (model.safetensors, sharded or not, or
pytorch_model.bin when PyTorch is installed) becomes OpenAI's seven-file layout, which our train,
generate and serve commands load directly.

The two layouts hold the same numbers under different names. HF's `Conv1D` stores its weight as
[in, out], like OpenAI's conv1d [1, nx, nf] without the leading 1, so no matrix is transposed
and `from_hf(to_hf(d))` reproduces `d` bit for bit.
"""

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from gpt2tf import fileio
from gpt2tf.encoder import ENDOFTEXT, GPT2_ENCODER_SHA256, parse_encoder_json
from gpt2tf.errors import UserError
from gpt2tf.hparams import HParams
from gpt2tf.source import ModelSource

# HuggingFace file names (ours are in gpt2tf.paths).
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded safetensors (large models)
HF_TORCH_WEIGHTS = "pytorch_model.bin"
HF_TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
HF_VOCAB = "vocab.json"  # = OpenAI's encoder.json
HF_MERGES = "merges.txt"  # = OpenAI's vocab.bpe
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS = "special_tokens_map.json"
HF_GENERATION_CONFIG = "generation_config.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's name for the model it wraps

PREFIX = "transformer."  # GPT2LMHeadModel's name for the GPT2Model inside it
LM_HEAD = "lm_head.weight"
# Causal-mask buffers that old PyTorch checkpoints saved; they are not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Both are GPT-2's tanh approximation, the only activation OpenAI's graph has.
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPSILON = 1e-5  # gpt2tf.model.norm's epsilon
VERSION_HEADER = b"#version: 0.2\n"

# TensorFlow, safetensors and torch are imported inside the functions that need them: the
# `gpt2tf` command imports this module for every verb, and `download` should not wait for TF.


# === Names ===


def hf_name(name: str) -> str:
    """OpenAI's checkpoint name -> GPT2LMHeadModel's state-dict name.

    model/wte -> transformer.wte.weight,
    model/h3/attn/c_attn/w -> transformer.h.3.attn.c_attn.weight; g/w -> weight, b -> bias.
    """
    parts = name.split("/")
    assert parts[0] == "model", name
    parts = parts[1:]
    if parts[0].startswith("h") and parts[0][1:].isdigit():
        parts[0:1] = ["h", parts[0][1:]]
    leaf = parts[-1]
    if leaf in ("wte", "wpe"):
        parts.append("weight")
    else:
        parts[-1] = {"g": "weight", "w": "weight", "b": "bias"}[leaf]
    return PREFIX + ".".join(parts)


def expected_shapes(hparams: HParams) -> dict[str, list[int]]:
    """OpenAI checkpoint name -> shape of every weight."""
    from gpt2tf import model

    return model.variable_shapes(hparams)


# === OpenAI layout -> HuggingFace ===


def to_hf(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, lora: bool = False) -> Path:
    """Write a HuggingFace GPT-2 directory from a model or run directory; returns out_dir.
    With `lora`, write the PEFT adapter of a LoRA run instead (see `to_peft`).

    `out_dir` must not exist or be empty. It is written as a temporary sibling folder and renamed
    at the end, so it never holds half a model.
    """
    from safetensors.numpy import save_file

    from gpt2tf import checkpoints

    if lora:
        return to_peft(src_dir, out_dir)
    source = ModelSource.at(src_dir)
    out_dir = Path(out_dir)
    fileio.check_new_dir(out_dir)
    if source.is_lora:
        raise UserError(f"{source.path} is a LoRA run (its checkpoints hold adapters only):"
                        " --lora writes them as a PEFT adapter for its converted base, or"
                        f" `gpt2tf lora merge {source.path} OUT_DIR` makes a full model to"
                        " convert")
    hparams = source.hparams
    encoder_json, vocab_bpe = source.vocab_files
    eot = eot_id(encoder_json, hparams, source=str(source.path))
    prefix = source.latest_checkpoint()
    checkpoints.check_compatible(prefix, hparams)
    weights = checkpoints.read_weights(prefix)

    tensors = {}
    for name, shape in expected_shapes(hparams).items():
        w = np.asarray(weights[name], dtype=np.float32)
        if len(shape) == 3:  # conv1d [1, nx, nf] -> HF Conv1D [nx, nf], same order
            w = w.reshape(shape[1:])
        tensors[hf_name(name)] = np.ascontiguousarray(w)
    # No lm_head.weight: it is wte (tie_word_embeddings), and safetensors refuses to store one
    # tensor under two names; transformers re-ties it on load.

    with fileio.publish_dir(out_dir, make_parents=True) as tmp:
        # "format": "pt" is what transformers checks before it trusts a safetensors file.
        save_file(tensors, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        fileio.fsync_file(tmp / HF_WEIGHTS)
        fileio.write_json(tmp / HF_CONFIG, hf_config(hparams, eot))
        fileio.write_json(tmp / HF_GENERATION_CONFIG, generation_config(eot))
        fileio.write_json(tmp / HF_TOKENIZER_CONFIG, tokenizer_config(hparams, eot))
        fileio.write_json(tmp / HF_SPECIAL_TOKENS, special_tokens_map(eot))
        # The vocabulary files are the same formats under other names: copy the bytes.
        for name, content in ((HF_VOCAB, encoder_json), (HF_MERGES, vocab_bpe)):
            with fileio.atomic_open(tmp / name, "wb") as f:
                f.write(content)
    return out_dir


def peft_name(name: str) -> str:
    """An adapter's checkpoint name -> PEFT's state-dict name for GPT-2's Conv1D modules.

    model/h0/attn/c_attn/lora_A -> base_model.model.transformer.h.0.attn.c_attn.lora_A.weight
    """
    layer, leaf = name.rsplit("/", 1)
    return PEFT_PREFIX + hf_name(layer + "/w")[: -len(".weight")] + f".{leaf}.weight"


def to_peft(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a LoRA run's adapters as a PEFT adapter folder; returns out_dir.

    PEFT's layers are torch Linears: lora_A.weight is [R, nx] and lora_B.weight [nf, R], the
    transposes of ours (A: [nx, R], B: [R, nf]). fan_in_fan_out=True tells PEFT that the base
    Conv1D stores its weight as [nx, nf], so a merge there adds (A B) untransposed, as ours.
    """
    from safetensors.numpy import save_file

    from gpt2tf.lora import LoraRun

    out_dir = Path(out_dir)
    fileio.check_new_dir(out_dir)
    run = LoraRun(ModelSource.at(src_dir))
    tensors = {peft_name(name): np.ascontiguousarray(a.astype(np.float32).T)
               for name, a in run.adapters().items()}
    with fileio.publish_dir(out_dir, make_parents=True) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        fileio.fsync_file(tmp / PEFT_WEIGHTS)
        fileio.write_json(tmp / PEFT_CONFIG, peft_config(run.spec, base=run.base_prefix))
    return out_dir


def peft_config(spec, *, base: str) -> dict:
    """adapter_config.json: PEFT's LoraConfig for adapters of a gpt2tf.model.Lora."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        # Where the base came from (our checkpoint); convert it with to-hf to load this onto.
        "base_model_name_or_path": os.path.dirname(base),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        # PEFT matches a module whose name ends with ".<target>": attn/c_proj -> attn.c_proj
        "target_modules": [t.replace("/", ".") for t in spec.targets],
        "fan_in_fan_out": True,  # GPT-2's Conv1D weight is [in, out]
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def eot_id(encoder_json: bytes, hparams: HParams, *, source: str) -> int | None:
    """The id of <|endoftext|> (None if the vocabulary has none); checks the vocabulary fits."""
    vocab = parse_encoder_json(encoder_json, source)
    top = max(vocab.values())
    if top >= hparams.n_vocab:
        raise UserError(
            f"{source}: encoder.json has token id {top} but hparams n_vocab={hparams.n_vocab}:"
            " the vocabulary does not belong to this model"
        )
    return vocab.get(ENDOFTEXT)


def hf_config(hparams: HParams, eot: int | None) -> dict:
    """config.json for GPT2LMHeadModel, spelling out every setting our graph depends on."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": hparams.n_vocab,
        "n_positions": hparams.n_ctx,
        "n_ctx": hparams.n_ctx,  # older readers (and OpenAI's naming) look for this one
        "n_embd": hparams.n_embd,
        "n_head": hparams.n_head,
        "n_layer": hparams.n_layer,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        # Dropout is a training setting; these are GPT-2's released values, as HF ships them.
        "attn_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "resid_pdrop": 0.1,
        "initializer_range": 0.02,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
        "dtype": "float32",
    }


def generation_config(eot: int | None) -> dict:
    return {"bos_token_id": eot, "eos_token_id": eot}


def tokenizer_config(hparams: HParams, eot: int | None) -> dict:
    special = ENDOFTEXT if eot is not None else None
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": hparams.n_ctx,
        "add_prefix_space": False,
        "errors": "replace",
        "bos_token": special,
        "eos_token": special,
        "unk_token": special,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,  # decode(encode(s)) == s, as our encoder
    }
    if eot is not None:
        # Marks <|endoftext|> as one special token, so text containing it encodes to 50256 as
        # our encoder does, not to seven plain-text tokens.
        config["added_tokens_decoder"] = {
            str(eot): {
                "content": ENDOFTEXT, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False, "special": True,
            }
        }
    return config


def special_tokens_map(eot: int | None) -> dict:
    if eot is None:
        return {}
    return {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}


# === HuggingFace -> OpenAI layout ===


def from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a model directory in OpenAI's layout from a HuggingFace GPT-2 directory."""
    from gpt2tf import checkpoints

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UserError(f"HuggingFace directory {hf_dir} not found")
    out_dir = Path(out_dir)
    fileio.check_new_dir(out_dir)
    hparams = hparams_from_config(hf_dir / HF_CONFIG)
    files, read = weight_files(hf_dir)
    # A config.json that disagrees with the weights (n_layer=100000 over 2 blocks) fails here,
    # from safetensors' headers, before any tensor is read or any graph built.
    if read is read_safetensors:
        check_weight_shapes(declared_shapes(files), hparams, source=str(hf_dir))
    check_memory(hparams, hf_dir / HF_CONFIG)
    vocab = read_hf_vocab(hf_dir, hparams)
    weights = openai_weights(read_tensors(files, read), hparams, source=str(hf_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return checkpoints.write_model_dir(out_dir, hparams, weights, vocab)


def hparams_from_config(path: Path) -> HParams:
    """HParams from HF's config.json; a UserError for anything OpenAI's graph computes otherwise."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: is this a HuggingFace model directory?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    except RecursionError:  # json's parser recurses once per level of nesting
        raise UserError(f"{path} is nested too deeply to be a model config (a JSON object of"
                        " settings): re-download it from the model's repository") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise UserError(f"{path}: model_type is {model_type!r}; only GPT-2 ('gpt2') converts")

    def unsupported(field: str, value, why: str) -> UserError:
        return UserError(
            f"{path}: {field}={json.dumps(value)} is not supported: {why}; this model cannot be"
            " represented in OpenAI's GPT-2 layout"
        )

    # (field, HF default, acceptable?, why not). Defaults are GPT2Config's own.
    checks = (
        ("activation_function", "gelu_new", lambda v: v in GELU_TANH,
         f"OpenAI's graph uses GPT-2's tanh GELU ({' or '.join(GELU_TANH)})"),
        ("layer_norm_epsilon", LAYER_NORM_EPSILON, lambda v: v == LAYER_NORM_EPSILON,
         f"OpenAI's layer norm uses epsilon {LAYER_NORM_EPSILON}"),
        ("scale_attn_weights", True, lambda v: v is True,
         "OpenAI's attention always divides by sqrt(head_dim)"),
        ("scale_attn_by_inverse_layer_idx", False, lambda v: v is False,
         "OpenAI's attention has no per-layer scaling"),
        ("add_cross_attention", False, lambda v: v is False,
         "OpenAI's blocks have no cross-attention"),
        ("n_inner", None, lambda v: v is None or v == 4 * config.get("n_embd", 768),
         "OpenAI's MLP is 4 * n_embd wide"),
    )
    for field, default, ok, why in checks:
        value = config.get(field, default)
        if not ok(value):
            raise unsupported(field, value, why)
    # reorder_and_upcast_attn is accepted: it scales before the matmul and upcasts to float32,
    # the same function as ours in float32; only mixed-precision rounding differs.
    n_ctx = config.get("n_positions", config.get("n_ctx"))
    raw = {
        "n_vocab": config.get("vocab_size"),
        "n_ctx": n_ctx,
        "n_embd": config.get("n_embd"),
        "n_head": config.get("n_head"),
        "n_layer": config.get("n_layer"),
    }
    missing = [k for k, v in raw.items() if v is None]
    if missing:
        names = {"n_vocab": "vocab_size", "n_ctx": "n_positions"}
        raise UserError(f"{path} lacks {', '.join(names.get(k, k) for k in missing)}")
    return HParams.from_dict(raw, source=str(path))


def read_hf_vocab(hf_dir: Path, hparams: HParams) -> tuple[bytes, bytes]:
    """(encoder.json, vocab.bpe) bytes from vocab.json + merges.txt, checked to load."""
    from gpt2tf.encoder import Encoder

    try:
        encoder_json = (hf_dir / HF_VOCAB).read_bytes()
        merges = (hf_dir / HF_MERGES).read_bytes()
    except FileNotFoundError as e:
        raise UserError(
            f"{e.filename} is missing: from_hf needs GPT-2's tokenizer files {HF_VOCAB} and"
            f" {HF_MERGES} (copy them from the base model, e.g. openai-community/gpt2)"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {e.filename}: {e.strerror}") from None
    # OpenAI's encoder.py (and gpt-2-simple) drop vocab.bpe's first and last lines unread:
    # they must be the version header and an empty line after the final newline.
    if not merges.startswith(b"#version"):
        merges = VERSION_HEADER + merges
    if not merges.endswith(b"\n"):
        merges += b"\n"
    encoder_json = openai_spelling(encoder_json)
    enc = Encoder.from_bytes(encoder_json, merges, source=str(hf_dir))  # a clear error if not BPE
    enc.check_fits(hparams.n_vocab, vocab=str(hf_dir / HF_VOCAB), model=f"{HF_CONFIG} vocab_size")
    return encoder_json, merges


def openai_spelling(encoder_json: bytes) -> bytes:
    """GPT-2's vocab.json as OpenAI wrote it, when it is GPT-2's; otherwise unchanged.

    HF's copy holds the same mapping, spaced differently. json.dumps of it reproduces OpenAI's
    encoder.json byte for byte, which the encoder recognises (by sha256) as GPT-2's own and
    then tokenizes through tiktoken, many times faster.
    """
    try:
        canonical = json.dumps(json.loads(encoder_json.decode("utf-8"))).encode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return encoder_json  # Encoder.from_bytes reports it
    if hashlib.sha256(canonical).hexdigest() == GPT2_ENCODER_SHA256:
        return canonical
    return encoder_json


def check_memory(hparams: HParams, config: Path) -> None:
    """Refuse a model that cannot be converted in this machine's memory, before reading it.

    The weights are held three times at the peak: as read, as the graph's variables and as
    the Saver's copy (the estimate init_model_dir uses). Past MemAvailable the kernel would kill
    the process instead of raising.
    """
    from gpt2tf import memory

    need = 3 * 4 * hparams.n_params
    have = memory.available_bytes()
    if have is not None and need > have:
        raise UserError(
            f"{config} declares a model of {hparams.n_params:,} weights ({hparams}), which needs"
            f" about {memory.gib(need)} to convert; {memory.gib(have)} is available: check its"
            " n_layer, n_embd, n_positions and vocab_size, or convert on a larger machine"
        )


def read_hf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the directory's weights file(s) as float32 numpy arrays."""
    return read_tensors(*weight_files(hf_dir))


def weight_files(hf_dir: Path) -> tuple[list[Path], object]:
    """(the directory's weight files, the function that reads one of them)."""
    choices = ((HF_WEIGHTS_INDEX, HF_WEIGHTS), (HF_TORCH_WEIGHTS_INDEX, HF_TORCH_WEIGHTS))
    for index, weights in choices:  # safetensors first: it needs no PyTorch and runs no code
        if (hf_dir / weights).is_file():
            files = [hf_dir / weights]
        elif (hf_dir / index).is_file():
            files = shard_files(hf_dir / index)
        else:
            continue
        return files, read_safetensors if weights == HF_WEIGHTS else read_torch_bin
    raise UserError(
        f"{hf_dir} has no {HF_WEIGHTS} or {HF_TORCH_WEIGHTS}:"
        " is this a HuggingFace model directory?"
    )


def read_tensors(files: list[Path], read) -> dict[str, np.ndarray]:
    tensors = {}
    for f in files:
        tensors.update(read(f))
    return tensors


def declared_shapes(files: list[Path]) -> dict[str, list[int]]:
    """Name -> shape of every tensor in safetensors files, from their headers (no data read)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    shapes[key] = list(f.get_slice(key).get_shape())
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
    return shapes


def shard_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: bad JSON
        raise UserError(f"cannot read the shard index {index}: {e}") from None
    except RecursionError:  # nested deeper than json's parser recurses
        raise UserError(f"cannot read the shard index {index}: it is nested too deeply") from None
    for name in names:
        if Path(name).name != name:  # the index must not point outside the directory
            raise UserError(f"{index} names the shard {name!r}, which is not a plain file name")
    return [index.parent / name for name in names]


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    tensors = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                if f.get_slice(key).get_dtype() == "BF16":
                    continue  # numpy has no bfloat16: read below
                tensors[key] = to_float32(f.get_tensor(key))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    tensors.update(read_bf16_safetensors(path, skip=tensors.keys()))
    return tensors


def read_bf16_safetensors(path: Path, skip) -> dict[str, np.ndarray]:
    """The bfloat16 tensors of a safetensors file, widened to float32 (exactly).

    safetensors' numpy API cannot return bfloat16, so this reads the documented layout itself:
    an 8-byte little-endian header length, a JSON header of name -> dtype/shape/data_offsets,
    then the data.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        out = {}
        for key, info in header.items():
            if key == "__metadata__" or key in skip or info.get("dtype") != "BF16":
                continue
            start, end = info["data_offsets"]
            f.seek(8 + n + start)
            raw = np.frombuffer(f.read(end - start), dtype="<u2")
            # bfloat16 is the top half of a float32: shift it back into place.
            out[key] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    return out


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """A pytorch_model.bin state dict, loaded with weights_only=True (never a plain unpickle)."""
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path} is a PyTorch file and PyTorch is not installed: pip install torch, or"
            f" provide {HF_WEIGHTS} (transformers: save_pretrained(..., safe_serialization=True))"
        ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, ...)
        raise UserError(f"cannot load {path} safely: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    tensors = {}
    for key, value in state.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        tensors[key] = to_float32(value.numpy())
    return tensors


def to_float32(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind != "f":
        return a  # a buffer, not a weight; openai_weights ignores or reports it
    return a if a.dtype == np.float32 else a.astype(np.float32)


def openai_weights(
    tensors: dict[str, np.ndarray], hparams: HParams, *, source: str
) -> dict[str, np.ndarray]:
    """HF state dict (with or without the `transformer.` prefix) -> OpenAI checkpoint weights."""
    by_name = check_weight_shapes(
        {key: list(value.shape) for key, value in tensors.items()}, hparams, source=source
    )
    weights = {
        name: tensors[by_name[hf_name(name)[len(PREFIX):]]].reshape(shape)
        for name, shape in expected_shapes(hparams).items()
    }
    head = tensors.get(LM_HEAD)
    if head is not None and not np.array_equal(head, weights["model/wte"]):
        # OpenAI's graph computes logits with wte itself; a separate head cannot be kept.
        raise UserError(
            f"{source}: {LM_HEAD} differs from the token embedding wte (untied output layer);"
            " OpenAI's GPT-2 layout ties them, so this model cannot be converted"
        )
    return weights


def check_weight_shapes(
    shapes: dict[str, list[int]], hparams: HParams, *, source: str
) -> dict[str, str]:
    """Check HF tensor names and shapes against hparams; the HF key of each GPT-2 weight
    (its name without `transformer.`)."""
    by_name = {}
    for key in shapes:
        if key.endswith(IGNORED_SUFFIXES) or key == LM_HEAD:
            continue
        name = key.removeprefix(PREFIX)
        if name in by_name:
            raise UserError(f"{source}: {name} appears twice (with and without {PREFIX!r})")
        by_name[name] = key
    # Count the blocks before listing n_layer's names: an absurd n_layer then costs nothing.
    blocks = {name.split(".")[1] for name in by_name if name.startswith("h.")}
    if hparams.n_layer > len(blocks):
        first = next(i for i in range(hparams.n_layer) if str(i) not in blocks)
        raise UserError(
            f"{source}: the weights hold {len(blocks)} of the blocks h.0 ..."
            f" h.{hparams.n_layer - 1} (they lack h.{first}.*) but {HF_CONFIG} says"
            f" n_layer={hparams.n_layer}: it does not match them, or this is not a GPT-2 model"
        )

    out = {}
    for name, shape in expected_shapes(hparams).items():
        key = hf_name(name)[len(PREFIX):]
        if key not in by_name:
            raise UserError(
                f"{source}: the weights lack {key}; {HF_CONFIG} (n_layer={hparams.n_layer})"
                " does not match them, or this is not a GPT-2 model"
            )
        full = by_name.pop(key)
        hf_shape = shape[1:] if len(shape) == 3 else shape
        if list(shapes[full]) != hf_shape:
            raise UserError(
                f"{source}: {key} has shape {list(shapes[full])}, but {HF_CONFIG} implies"
                f" {hf_shape}"
            )
        out[key] = full
    if by_name:
        extra = sorted(by_name)
        raise UserError(
            f"{source}: weights {extra[:3]}{' ...' if len(extra) > 3 else ''} have no place in"
            " GPT-2's language model (a different head or architecture?)"
        )
    return out
