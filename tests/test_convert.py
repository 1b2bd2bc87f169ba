"""Conversion to and from HuggingFace GPT-2 directories (gpt2tf.convert, `gpt2tf convert`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from shared_data import shared_data_dir, reference

from gpt2tf import checkpoints, cli, convert, encoder, model, source
from gpt2tf.errors import UserError
from gpt2tf.hparams import HParams
from tiny import REPO, tiny

TINY = tiny(n_ctx=32, n_embd=16, n_head=2)  # small: conversion tests copy weights around
ATOL = 1e-4
SRC = REPO / "src"


def random_weights(hparams: HParams, seed: int) -> dict[str, np.ndarray]:
    """Every weight random (biases and gains too), so a misplaced tensor changes the output."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in model.variable_shapes(hparams).items():
        leaf = name.rsplit("/", 1)[1]
        noise = rng.standard_normal(shape).astype(np.float32)
        out[name] = (1.0 + 0.2 * noise) if leaf == "g" else 0.2 * noise
    return out


def make_model_dir(path: Path, hparams: HParams = TINY, *, vocab=None, seed: int = 0) -> Path:
    vocab = vocab or encoder.byte_level_vocab()
    return checkpoints.write_model_dir(path, hparams, random_weights(hparams, seed), vocab)


def read_model_dir(path: Path):
    """(hparams, weights, (encoder.json bytes, vocab.bpe bytes)) of a model directory."""
    weights = checkpoints.read_weights(source.ModelSource.at(path).latest_checkpoint())
    return source.ModelSource.at(path).hparams, weights, source.read_vocab_files(path)


def assert_same_model(a: Path, b: Path) -> None:
    hp_a, w_a, vocab_a = read_model_dir(a)
    hp_b, w_b, vocab_b = read_model_dir(b)
    assert hp_a == hp_b
    assert vocab_a == vocab_b  # byte for byte
    assert w_a.keys() == w_b.keys()
    for name in w_a:
        assert w_a[name].dtype == w_b[name].dtype == np.float32, name
        assert np.array_equal(w_a[name], w_b[name]), name


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_hf(tiny_dir, tmp_path_factory) -> Path:
    return convert.to_hf(tiny_dir, tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def gpt2_vocab_dir(tmp_path_factory) -> Path:
    """A tiny model with GPT-2's real 50257-token vocabulary."""
    vocab = source.read_vocab_files(shared_data_dir())
    hp = HParams(n_vocab=50257, n_ctx=16, n_embd=8, n_head=2, n_layer=1)
    return make_model_dir(tmp_path_factory.mktemp("real") / "model", hp, vocab=vocab, seed=3)


# === to_hf ===


def test_to_hf_files_and_config(tiny_hf):
    assert sorted(os.listdir(tiny_hf)) == sorted([
        "config.json", "generation_config.json", "merges.txt", "model.safetensors",
        "special_tokens_map.json", "tokenizer_config.json", "vocab.json",
    ])
    config = json.loads((tiny_hf / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "gpt2"
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu_new"
    assert config["layer_norm_epsilon"] == 1e-5
    assert (config["vocab_size"], config["n_positions"], config["n_ctx"]) == (257, 32, 32)
    assert (config["n_embd"], config["n_head"], config["n_layer"]) == (16, 2, 2)
    assert config["bos_token_id"] == config["eos_token_id"] == 256  # <|endoftext|>
    tensors = load_file(str(tiny_hf / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied to wte; safetensors cannot alias
    assert tensors["transformer.h.1.attn.c_attn.weight"].shape == (16, 48)  # [in, out]
    assert tensors["transformer.wte.weight"].shape == (257, 16)


def test_to_hf_weights_are_the_checkpoints(tiny_dir, tiny_hf):
    _, weights, (encoder_json, vocab_bpe) = read_model_dir(tiny_dir)
    tensors = load_file(str(tiny_hf / "model.safetensors"))
    assert np.array_equal(tensors["transformer.wpe.weight"], weights["model/wpe"])
    assert np.array_equal(tensors["transformer.h.0.ln_2.bias"], weights["model/h0/ln_2/b"])
    c_proj = weights["model/h1/mlp/c_proj/w"]  # [1, 4C, C] -> [4C, C]
    assert np.array_equal(tensors["transformer.h.1.mlp.c_proj.weight"], c_proj[0])
    assert np.array_equal(tensors["transformer.ln_f.weight"], weights["model/ln_f/g"])
    assert len(tensors) == len(weights)
    assert (tiny_hf / "vocab.json").read_bytes() == encoder_json
    assert (tiny_hf / "merges.txt").read_bytes() == vocab_bpe


def test_to_hf_loads_in_transformers_without_missing_keys(tiny_hf):
    transformers = reference("transformers")
    reference("torch")
    m, info = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    # The head is tied to wte, as in our graph.
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()


def test_to_hf_tokenizer_gives_gpt2_ids(gpt2_vocab_dir, tmp_path):
    transformers = reference("transformers")
    out = convert.to_hf(gpt2_vocab_dir, tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("hello world")["input_ids"] == [31373, 995]
    assert tok.decode([31373, 995]) == "hello world"
    assert tok("<|endoftext|>")["input_ids"] == [50256]  # one special token, as ours
    assert tok.eos_token_id == tok.bos_token_id == 50256
    ours = source.ModelSource.at(gpt2_vocab_dir).encoder
    text = "Ünïcødé  text, numbers 12345 and emoji 🤗<|endoftext|>\n\n tabs\there's"
    assert tok(text)["input_ids"] == ours.encode(text)


def test_to_hf_does_not_import_torch(tiny_dir, tmp_path):
    out = tmp_path / "hf"
    code = (
        "import sys; from gpt2tf import convert; "
        f"convert.to_hf({str(tiny_dir)!r}, {str(out)!r}); "
        "assert 'torch' not in sys.modules, 'convert.to_hf imported torch'"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").is_file()


def test_to_hf_accepts_an_empty_out_dir(tiny_dir, tmp_path):
    (tmp_path / "hf").mkdir()
    convert.to_hf(tiny_dir, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    assert os.listdir(tmp_path) == ["hf"]  # no temporary folder left


def test_to_hf_failure_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert.fileio, "write_json", disk_full)
    with pytest.raises(OSError):
        convert.to_hf(tiny_dir, tmp_path / "hf")
    assert os.listdir(tmp_path) == []


def test_to_hf_refuses_a_non_empty_out_dir(tiny_dir, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="already exists"):
        convert.to_hf(tiny_dir, tmp_path / "hf")
    assert os.listdir(tmp_path / "hf") == ["keep.txt"]
    assert os.listdir(tmp_path) == ["hf"]


# === round trip ===


def test_round_trip_is_bit_identical(tiny_dir, tiny_hf, tmp_path):
    back = convert.from_hf(tiny_hf, tmp_path / "back")
    assert_same_model(tiny_dir, back)


def test_round_trip_with_gpt2_vocab_is_bit_identical(gpt2_vocab_dir, tmp_path):
    hf = convert.to_hf(gpt2_vocab_dir, tmp_path / "hf")
    back = convert.from_hf(hf, tmp_path / "back")
    assert_same_model(gpt2_vocab_dir, back)


def test_from_hf_writes_gpt2_vocab_in_openai_spelling(gpt2_vocab_dir, tmp_path):
    """HF's vocab.json for GPT-2 is spaced differently; ours must be OpenAI's exact file."""
    hf = convert.to_hf(gpt2_vocab_dir, tmp_path / "hf")
    vocab = json.loads((hf / "vocab.json").read_text(encoding="utf-8"))
    compact = json.dumps(vocab, separators=(",", ":"), ensure_ascii=False)
    (hf / "vocab.json").write_text(compact, encoding="utf-8")
    back = convert.from_hf(hf, tmp_path / "back")
    assert (back / "encoder.json").read_bytes() == (shared_data_dir() / "encoder.json").read_bytes()


def test_round_trip_from_a_run_dir(tiny_dir, tmp_path):
    """A run directory's latest checkpoint (model.ckpt-<step>) is what gets converted."""
    _, weights, vocab = read_model_dir(tiny_dir)
    run = tmp_path / "run1"
    run.mkdir()
    for name, content in zip(("encoder.json", "vocab.bpe"), vocab):
        (run / name).write_bytes(content)
    (run / "hparams.json").write_text(TINY.to_json(), encoding="utf-8")
    checkpoints.save_weights(str(run / "model.ckpt-5"), TINY, weights)
    later = {k: v + 1.0 for k, v in weights.items()}
    checkpoints.save_weights(str(run / "model.ckpt-9"), TINY, later)
    back = convert.from_hf(convert.to_hf(run, tmp_path / "hf"), tmp_path / "back")
    _, got, _ = read_model_dir(back)
    assert all(np.array_equal(got[k], later[k]) for k in later)


# === from_hf on directories written by transformers ===


def hf_model(n_layer: int, seed: int):
    """A random transformers GPT-2 (biases and norms perturbed too) with the byte-level vocab."""
    torch = reference("torch")
    transformers = reference("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=257, n_positions=24, n_embd=16, n_head=4, n_layer=n_layer,
        bos_token_id=256, eos_token_id=256,
    )
    m = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in m.parameters():  # lm_head is wte itself: it stays tied
            p.add_(0.1 * torch.randn_like(p))
    return m


def write_hf_vocab(hf_dir: Path) -> None:
    encoder_json, _ = encoder.byte_level_vocab()
    (hf_dir / "vocab.json").write_bytes(encoder_json)
    (hf_dir / "merges.txt").write_bytes(b"")  # no merges and no "#version" header


def assert_logits_match(hf, model_dir: Path) -> None:
    import torch

    from gpt2tf.decode.generator import Generator

    tokens = np.random.default_rng(0).integers(0, 257, size=[2, 24])
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    with Generator(model_dir, threads=1) as gen:
        ours = gen.logits(tokens)
    assert np.abs(ours - theirs).max() < ATOL


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch_model.bin"])
def test_from_hf_transformers_model_logits_match(fmt, tmp_path):
    torch = reference("torch")
    hf = hf_model(n_layer=6, seed=0)  # distilgpt2's depth
    hf_dir = tmp_path / "hf"
    if fmt == "safetensors":
        hf.save_pretrained(hf_dir)
    else:
        # transformers 5 only writes safetensors; older versions wrote exactly this file,
        # lm_head.weight and the causal-mask buffers included.
        hf.config.save_pretrained(hf_dir)
        state = dict(hf.state_dict())
        for i in range(hf.config.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 24, 24))
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, hf_dir / "pytorch_model.bin")
        assert not (hf_dir / "model.safetensors").exists()
    write_hf_vocab(hf_dir)
    out = convert.from_hf(hf_dir, tmp_path / "out")
    assert source.ModelSource.at(out).hparams == HParams(
        n_vocab=257, n_ctx=24, n_embd=16, n_head=4, n_layer=6
    )
    # merges.txt had no header: vocab.bpe gets one, as OpenAI's encoder.py expects
    assert (out / "vocab.bpe").read_bytes() == b"#version: 0.2\n"
    assert_logits_match(hf, out)


def test_from_hf_gpt2model_keys_without_prefix(tmp_path):
    """A bare GPT2Model saves `h.0...` rather than `transformer.h.0...` and has no lm_head."""
    transformers = reference("transformers")
    hf = hf_model(n_layer=2, seed=1)
    hf_dir = tmp_path / "hf"
    base = transformers.GPT2Model(hf.config)
    base.load_state_dict(hf.transformer.state_dict())
    base.save_pretrained(hf_dir)
    assert "h.0.ln_1.weight" in load_file(str(hf_dir / "model.safetensors"))
    write_hf_vocab(hf_dir)
    out = convert.from_hf(hf_dir, tmp_path / "out")
    _, weights, _ = read_model_dir(out)
    assert np.array_equal(weights["model/wte"], hf.transformer.wte.weight.detach().numpy())
    c_attn = hf.transformer.h[1].attn.c_attn.weight.detach().numpy()
    assert np.array_equal(weights["model/h1/attn/c_attn/w"][0], c_attn)


def test_from_hf_bfloat16_and_float16(tmp_path):
    torch = reference("torch")
    hf = hf_model(n_layer=1, seed=2)
    for dtype in (torch.bfloat16, torch.float16):
        hf_dir = tmp_path / str(dtype)
        hf.to(dtype).save_pretrained(hf_dir)
        write_hf_vocab(hf_dir)
        out = convert.from_hf(hf_dir, tmp_path / f"out-{dtype}")
        _, weights, _ = read_model_dir(out)
        for name, hf_param in (
            ("model/wte", hf.transformer.wte.weight),
            ("model/h0/mlp/c_fc/w", hf.transformer.h[0].mlp.c_fc.weight[None]),
            ("model/ln_f/b", hf.transformer.ln_f.bias),
        ):
            assert np.array_equal(weights[name], hf_param.detach().float().numpy()), name


# === from_hf refusals ===


def copy_hf(src: Path, dst: Path, *, config: dict | None = None, tensors=None) -> Path:
    """A copy of a HF directory with config.json fields and/or the tensors replaced."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config:
        raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
        (dst / "config.json").write_text(json.dumps({**raw, **config}), encoding="utf-8")
    if tensors is not None:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "field,value",
    [
        ("activation_function", "relu"),
        ("activation_function", "gelu"),  # the erf GELU differs from GPT-2's tanh form
        ("layer_norm_epsilon", 1e-6),
        ("scale_attn_weights", False),
        ("scale_attn_by_inverse_layer_idx", True),
        ("add_cross_attention", True),
        ("n_inner", 40),
        ("model_type", "gpt_neo"),
    ],
)
def test_from_hf_refuses_what_openai_layout_cannot_represent(tiny_hf, tmp_path, field, value):
    hf = copy_hf(tiny_hf, tmp_path / "hf", config={field: value})
    with pytest.raises(UserError, match=field):
        convert.from_hf(hf, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_from_hf_accepts_equivalent_settings(tiny_dir, tiny_hf, tmp_path):
    hf = copy_hf(tiny_hf, tmp_path / "hf", config={
        "activation_function": "gelu_pytorch_tanh", "n_inner": 64, "reorder_and_upcast_attn": True,
    })
    assert_same_model(tiny_dir, convert.from_hf(hf, tmp_path / "out"))


def test_from_hf_tied_lm_head_is_accepted_untied_refused(tiny_dir, tiny_hf, tmp_path):
    tensors = load_file(str(tiny_hf / "model.safetensors"))
    wte = tensors["transformer.wte.weight"]
    tied = copy_hf(tiny_hf, tmp_path / "tied", tensors={**tensors, "lm_head.weight": wte.copy()})
    assert_same_model(tiny_dir, convert.from_hf(tied, tmp_path / "out"))

    untied = copy_hf(tiny_hf, tmp_path / "untied", tensors={**tensors, "lm_head.weight": wte + 1})
    with pytest.raises(UserError, match="lm_head.weight differs"):
        convert.from_hf(untied, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_from_hf_refuses_missing_and_unknown_weights(tiny_hf, tmp_path):
    tensors = load_file(str(tiny_hf / "model.safetensors"))
    short = {k: v for k, v in tensors.items() if not k.startswith("transformer.h.1.")}
    hf = copy_hf(tiny_hf, tmp_path / "short", tensors=short)
    with pytest.raises(UserError, match=r"lack h\.1\..*n_layer=2"):
        convert.from_hf(hf, tmp_path / "out")
    extra = {**tensors, "score.weight": np.zeros([2, 16], np.float32)}
    hf = copy_hf(tiny_hf, tmp_path / "extra", tensors=extra)
    with pytest.raises(UserError, match="score.weight"):
        convert.from_hf(hf, tmp_path / "out")
    wrong = {**tensors, "transformer.wpe.weight": np.zeros([31, 16], np.float32)}
    hf = copy_hf(tiny_hf, tmp_path / "wrong", tensors=wrong)
    with pytest.raises(UserError, match=r"wpe.weight has shape \[31, 16\]"):
        convert.from_hf(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_from_hf_pytorch_bin_without_torch(tiny_hf, tmp_path, monkeypatch):
    hf = copy_hf(tiny_hf, tmp_path / "hf")
    os.rename(hf / "model.safetensors", hf / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(UserError, match="pip install torch.*model.safetensors"):
        convert.from_hf(hf, tmp_path / "out")


def test_from_hf_pytorch_bin_is_never_unpickled(tiny_hf, tmp_path):
    """weights_only=True: a pickle that would run code is refused, not executed."""
    reference("torch")
    import pickle

    hf = copy_hf(tiny_hf, tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (hf / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(UserError, match="cannot load"):
        convert.from_hf(hf, tmp_path / "out")
    assert not marker.exists()


@pytest.mark.parametrize("file", ["config.json", "vocab.json", "model.safetensors.index.json"])
def test_from_hf_deeply_nested_json_is_refused(tiny_hf, tmp_path, file):
    hf = copy_hf(tiny_hf, tmp_path / "hf")
    if file == "model.safetensors.index.json":
        (hf / "model.safetensors").unlink()
    (hf / file).write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(UserError, match="nested too deeply"):
        convert.from_hf(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_from_hf_absurd_n_layer_fails_before_reading_any_weight(tiny_hf, tmp_path, monkeypatch):
    """The safetensors headers hold 2 blocks: n_layer=100000 is refused from them alone."""
    import time

    hf = copy_hf(tiny_hf, tmp_path / "hf", config={"n_layer": 100_000})

    def read(path):
        raise AssertionError(f"read {path} before checking its shapes")

    monkeypatch.setattr(convert, "read_safetensors", read)
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"hold 2 of the blocks .*lack h\.2\..*n_layer=100000"):
        convert.from_hf(hf, tmp_path / "out")
    assert time.perf_counter() - started < 5  # it took 21 s and 3 GB
    assert not (tmp_path / "out").exists()


def test_from_hf_model_too_large_for_memory_is_refused_before_reading(tiny_hf, tmp_path,
                                                                     monkeypatch):
    from gpt2tf import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 100_000)
    monkeypatch.setattr(convert, "read_hf_vocab", lambda *a: pytest.fail("read the vocabulary"))
    with pytest.raises(UserError, match=r"needs about .* to convert; 0\.0 GiB is available"):
        convert.from_hf(tiny_hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_from_hf_needs_tokenizer_files(tiny_hf, tmp_path):
    hf = copy_hf(tiny_hf, tmp_path / "hf")
    (hf / "merges.txt").unlink()
    with pytest.raises(UserError, match="merges.txt is missing"):
        convert.from_hf(hf, tmp_path / "out")


# === CLI ===


def test_cli_to_hf_and_from_hf(tiny_dir, tmp_path, capsys):
    rc, err = run_main(["convert", "to-hf", str(tiny_dir), str(tmp_path / "hf")], capsys)
    assert rc == 0, err
    assert len(err.strip().splitlines()) == 1 and str(tmp_path / "hf") in err
    rc, err = run_main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")], capsys)
    assert rc == 0, err
    assert len(err.strip().splitlines()) == 1 and str(tmp_path / "back") in err
    assert_same_model(tiny_dir, tmp_path / "back")


def test_cli_takes_numeric_folder_names(tiny_hf, tmp_path, monkeypatch, capsys):
    """fire reads a bare 124 as an int; it is still a folder name."""
    monkeypatch.chdir(tmp_path)
    assert run_main(["convert", "from-hf", str(tiny_hf), "124"], capsys)[0] == 0
    assert run_main(["convert", "to-hf", "124", "355"], capsys)[0] == 0
    assert (tmp_path / "355" / "model.safetensors").is_file()


def _damaged_copy(model_dir: Path, dst: Path, how: str) -> Path:
    import shutil

    shutil.copytree(model_dir, dst)
    data = dst / "model.ckpt.data-00000-of-00001"
    raw = data.read_bytes()
    if how == "truncated":
        data.write_bytes(raw[: len(raw) // 2])
    else:  # the right size, wrong bytes: TF's checksum catches it
        data.write_bytes(raw[:100] + bytes(b ^ 0xFF for b in raw[100:200]) + raw[200:])
    return dst


@pytest.mark.parametrize("how, needle", [("truncated", "is truncated: its data files hold"),
                                         ("flipped", "Checksum does not match")])
def test_cli_to_hf_on_a_damaged_checkpoint(tiny_dir, tmp_path, how, needle):
    """A subprocess, as a user runs it: one line, exit 1, no out dir (it was an IndexError)."""
    bad = _damaged_copy(tiny_dir, tmp_path / "bad", how)
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from gpt2tf.cli import main; sys.exit(main())",
         "convert", "to-hf", str(bad), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, check=False,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_read_weights_of_a_damaged_checkpoint_is_a_user_error(tiny_dir, tmp_path):
    for how in ("truncated", "flipped"):
        bad = _damaged_copy(tiny_dir, tmp_path / how, how)
        with pytest.raises(UserError, match="the checkpoint is corrupt|is truncated"):
            checkpoints.read_weights(str(bad / "model.ckpt"))


def test_cli_from_hf_deeply_nested_config_is_one_line(tiny_hf, tmp_path, capsys):
    hf = copy_hf(tiny_hf, tmp_path / "hf")
    (hf / "config.json").write_text('{"model_type": "gpt2", "n_embd": ' + "[" * 100_000
                                    + "]" * 100_000 + "}", encoding="utf-8")
    rc, err = run_main(["convert", "from-hf", str(hf), str(tmp_path / "o")], capsys)
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "nested too deeply" in err and not (tmp_path / "o").exists()


def test_cli_errors_are_one_line_and_leave_nothing(tiny_dir, tiny_hf, tmp_path, capsys):
    def fails(argv: list[str], expect: str) -> None:
        before = sorted(os.listdir(tmp_path))
        rc, err = run_main(argv, capsys)
        assert rc == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
        assert sorted(os.listdir(tmp_path)) == before

    fails(["convert", "to-hf", str(tmp_path / "nope"), str(tmp_path / "o")], "nope")
    fails(["convert", "from-hf", str(tmp_path / "nope"), str(tmp_path / "o")], "nope")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x", encoding="utf-8")
    fails(["convert", "to-hf", str(tiny_dir), str(tmp_path / "taken")], "already exists")
    fails(["convert", "from-hf", str(tiny_hf), str(tmp_path / "taken")], "already exists")
    relu = copy_hf(tiny_hf, tmp_path / "relu", config={"activation_function": "relu"})
    fails(["convert", "from-hf", str(relu), str(tmp_path / "o")], "activation_function")
    assert os.listdir(tmp_path / "taken") == ["file"]
