"""LoRA on tiny models: only the adapters train, merging equals base plus adapters, PEFT loads
the exported adapter with equal logits, resume is exact, generation uses the adapters, and bad
input is one line."""

import json
import shutil

import numpy as np
import pytest
from shared_data import reference
from tiny import random_weights
from train_helpers import TRAIN_TINY, base_args, losses, snapshot, train, write_text_data

LORA_FLAGS = dict(lora_rank=4, lora_alpha=8, lora_targets="c_attn,c_proj,c_fc", batch_size=2,
                  seq_len=32, learning_rate=1e-2, save_every=0)
TOKENS = [[5, 80, 101, 32, 7, 200, 33, 250, 1, 99, 120, 64]]


def _gpt2tf(args) -> int:
    from gpt2tf.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """models/tiny with well-separated random weights (logits far from uniform)."""
    from gpt2tf import checkpoints, encoder

    root = tmp_path_factory.mktemp("models")
    checkpoints.write_model_dir(root / "tiny", TRAIN_TINY, random_weights(TRAIN_TINY, 3),
                                encoder.byte_level_vocab())
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    write_text_data(tmp / "data.txt")
    return tmp


@pytest.fixture(scope="module")
def lora_run(models_dir, work):
    """A LoRA run of 4 steps on every kind of layer; the base's files as they were before."""
    before = snapshot(models_dir)
    code, _, _ = train(base_args(work, models_dir, work / "data.txt", "lora1", steps=4,
                                 **LORA_FLAGS))
    assert code == 0
    assert snapshot(models_dir) == before  # the base is read, never written
    return work / "checkpoint" / "lora1"


def _names(prefix) -> dict:
    from gpt2tf import checkpoints

    return checkpoints.list_checkpoint(str(prefix))


def _tensor(prefix, name):
    import tensorflow as tf

    return tf.train.load_checkpoint(str(prefix)).get_tensor(name)


# --- training ---------------------------------------------------------------------------------


def test_only_adapters_train_and_the_run_holds_them(lora_run, models_dir):
    from gpt2tf import model

    names = _names(lora_run / "model-4")
    adapters = sorted(n for n in names if n.endswith(("/lora_A", "/lora_B")))
    # 2 blocks x (attn/c_attn, attn/c_proj, mlp/c_fc, mlp/c_proj) x (A, B)
    assert len(adapters) == 16, adapters
    assert names["model/h0/attn/c_attn/lora_A"] == [32, 4]
    assert names["model/h0/attn/c_attn/lora_B"] == [4, 96]
    assert names["model/h1/mlp/c_proj/lora_A"] == [128, 4]
    # No base weight in the run's checkpoints; optimizer state for the adapters only.
    assert not [n for n in names if n.startswith("model/") and not model.is_lora_name(n)]
    slots = [n for n in names if "/Adam" in n]
    assert len(slots) == 32 and all("/lora_" in n for n in slots)
    for name in adapters:
        if name.endswith("lora_B"):  # B starts at zero: it moved
            assert np.abs(_tensor(lora_run / "model-4", name)).max() > 0, name
    record = json.loads((lora_run / "lora.json").read_text())
    assert record["lora_rank"] == 4 and record["lora_alpha"] == 8
    assert record["lora_targets"] == ["c_attn", "c_proj", "c_fc"]
    assert record["base_checkpoint"] == str((models_dir / "tiny" / "model.ckpt").resolve())
    config = json.loads((lora_run / "train_config.json").read_text())
    assert config["lora_rank"] == 4 and config["lora_targets"] == "c_attn,c_proj,c_fc"


def test_the_first_step_starts_from_the_base(models_dir, work):
    """B = 0: the first loss of a LoRA run is the base model's, as for full fine-tuning."""
    data = work / "data.txt"
    flags = {k: v for k, v in LORA_FLAGS.items() if not k.startswith("lora_")}
    assert train(base_args(work, models_dir, data, "full1", steps=1, **flags))[0] == 0
    assert train(base_args(work, models_dir, data, "lora_first", steps=1, **LORA_FLAGS))[0] == 0
    full = losses(work / "checkpoint" / "full1")[1]
    assert losses(work / "checkpoint" / "lora_first")[1] == pytest.approx(full, abs=1e-6)


def test_resume_is_exact(models_dir, work):
    data = work / "data.txt"
    assert train(base_args(work, models_dir, data, "straight", steps=4, **LORA_FLAGS))[0] == 0
    assert train(base_args(work, models_dir, data, "resumed", steps=2, **LORA_FLAGS))[0] == 0
    # Resuming: the LoRA settings come from the run's stored config.
    assert train(base_args(work, models_dir, data, "resumed", steps=2))[0] == 0
    a, b = work / "checkpoint" / "straight", work / "checkpoint" / "resumed"
    assert losses(a) == losses(b)
    for name in _names(a / "model-4"):
        np.testing.assert_array_equal(_tensor(a / "model-4", name), _tensor(b / "model-4", name),
                                      err_msg=name)


def test_memory_saving_gradients_train_the_same_adapters(models_dir, work):
    data = work / "data.txt"
    assert train(base_args(work, models_dir, data, "plain2", steps=2, **LORA_FLAGS))[0] == 0
    assert train(base_args(work, models_dir, data, "remat2", steps=2,
                           memory_saving_gradients=True, **LORA_FLAGS))[0] == 0
    a, b = work / "checkpoint" / "plain2", work / "checkpoint" / "remat2"
    np.testing.assert_allclose(list(losses(a).values()), list(losses(b).values()), rtol=1e-5)
    name = "model/h1/mlp/c_fc/lora_B"
    np.testing.assert_allclose(_tensor(a / "model-2", name), _tensor(b / "model-2", name),
                               rtol=1e-4, atol=1e-6)


# --- merging, generation, export --------------------------------------------------------------


@pytest.fixture(scope="module")
def merged(lora_run, work):
    out = work / "merged"
    assert _gpt2tf(["lora", "merge", lora_run, out]) == 0
    return out


def test_merged_model_equals_base_plus_adapters(lora_run, merged, models_dir):
    from gpt2tf import checkpoints
    from gpt2tf.decode.generator import Generator

    base = checkpoints.read_weights(str(models_dir / "tiny" / "model.ckpt"))
    got = checkpoints.read_weights(str(merged / "model.ckpt"))
    assert sorted(got) == sorted(base)  # a plain model in OpenAI's layout
    layer = "model/h0/attn/c_attn"
    a = _tensor(lora_run / "model-4", layer + "/lora_A")  # [nx, R]
    b = _tensor(lora_run / "model-4", layer + "/lora_B")  # [R, nf]
    np.testing.assert_allclose(got[layer + "/w"], base[layer + "/w"] + (8 / 4) * (a @ b)[None],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got["model/wte"], base["model/wte"])
    with Generator(lora_run, engine="graph") as run, Generator(merged, engine="graph") as m, \
            Generator(models_dir / "tiny", engine="graph") as plain:
        want = run.logits(TOKENS)  # the graph with the adapters beside the frozen weights
        np.testing.assert_allclose(m.logits(TOKENS), want, rtol=1e-5, atol=1e-5)
        assert np.abs(plain.logits(TOKENS) - want).max() > 1e-3  # the adapters matter


def test_generation_uses_the_adapters(lora_run, merged):
    """The fast path (merged at load time) and the graph give the merged model's tokens."""
    from gpt2tf.decode.generator import Generator

    kw = dict(nsamples=1, batch_size=1, length=12, temperature=1.0, top_k=1, seed=0)
    with Generator(merged) as m:
        want = m.generate_tokens(TOKENS[0], **_params(kw))
    for engine in ("auto", "tflite", "graph"):  # the native step, TFLite, the TF graph
        with Generator(lora_run, engine=engine) as gen:
            assert gen.generate_tokens(TOKENS[0], **_params(kw)) == want, engine


def test_generate_command_on_a_lora_run(lora_run, merged, capsys):
    """`gpt2tf generate --run_name` takes a LoRA run as it takes any run."""
    flags = ["--nsamples", 1, "--length", 8, "--top_k", 1, "--seed", 0, "--prefix", "the "]
    capsys.readouterr()
    assert _gpt2tf(["generate", "--run_name", lora_run.name, "--checkpoint_dir",
                    lora_run.parent, *flags]) == 0
    from_run = capsys.readouterr().out
    assert _gpt2tf(["generate", "--model_name", merged.name, "--models_dir", merged.parent,
                    *flags]) == 0
    assert from_run and from_run == capsys.readouterr().out


def _params(kw: dict) -> dict:
    from gpt2tf.decode.engine import SamplingParams

    kw = dict(kw)
    params = SamplingParams(temperature=kw.pop("temperature"), top_k=kw.pop("top_k"))
    return {**kw, "params": params}


def test_fast_path_cache_follows_the_adapters(models_dir, work):
    from gpt2tf.decode import fast
    from gpt2tf.decode.generator import Generator

    data = work / "data.txt"
    assert train(base_args(work, models_dir, data, "cached", steps=1, **LORA_FLAGS))[0] == 0
    run = work / "checkpoint" / "cached"
    # TFLite's conversion is the on-disk cache (the native step merges at every load)
    with Generator(run, engine="tflite") as gen:
        engine = gen.engine_name
    if engine != "fast":
        pytest.skip("the fast decode path does not run here")
    first = sorted(p.name for p in (run / ".gpt2tf-decode").iterdir())
    assert train(base_args(work, models_dir, data, "cached", steps=1))[0] == 0  # new adapters
    with Generator(run, engine="tflite") as gen:
        assert gen.engine_name == "fast"
    second = sorted(p.name for p in (run / ".gpt2tf-decode").iterdir())
    assert len(first) == len(second) == 1 and first != second
    assert fast.PRECISIONS[0] in second[0]


def test_peft_loads_the_adapter_with_equal_logits(lora_run, work):
    torch = reference("torch")
    transformers = reference("transformers")
    peft = reference("peft")
    from gpt2tf.decode.generator import Generator

    record = json.loads((lora_run / "lora.json").read_text())
    hf_base, adapter = work / "hf_base", work / "peft"
    base_dir = str(record["base_checkpoint"]).rsplit("/", 1)[0]
    assert _gpt2tf(["convert", "to-hf", base_dir, hf_base]) == 0
    assert _gpt2tf(["convert", "to-hf", "--lora", lora_run, adapter]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["r"] == 4
    from safetensors.numpy import load_file

    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)

    base = transformers.GPT2LMHeadModel.from_pretrained(str(hf_base))
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        got = model(torch.tensor(TOKENS)).logits.numpy()
    with Generator(lora_run, engine="graph") as gen:
        want = gen.logits(TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --- bad input --------------------------------------------------------------------------------


def _fails(code_out_err, *needles):
    code, out, err = code_out_err
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_targets_fail_before_anything_is_written(models_dir, work, capsys):
    flags = {**LORA_FLAGS, "lora_targets": "c_attn,wte"}
    _fails(train(base_args(work, models_dir, work / "data.txt", "badtargets", steps=1, **flags),
                 capsys), "--lora_targets", "'wte'")
    assert not (work / "checkpoint" / "badtargets").exists()
    flags = {**LORA_FLAGS, "only_train_transformer_layers": True}
    _fails(train(base_args(work, models_dir, work / "data.txt", "badonly", steps=1, **flags),
                 capsys), "--only_train_transformer_layers")


def test_resume_keeps_the_adapters_shape(lora_run, models_dir, work, capsys):
    args = base_args(work, models_dir, work / "data.txt", "lora1", steps=1, lora_rank=8)
    _fails(train(args, capsys), "--lora_rank", "rank 4")
    full = base_args(work, models_dir, work / "data.txt", "full1", steps=1, lora_rank=2)
    if (work / "checkpoint" / "full1").is_dir():
        _fails(train(full, capsys), "--lora_rank", "every weight")


def test_a_lora_run_is_not_a_model_to_train_from(lora_run, models_dir, work, capsys):
    args = base_args(work, models_dir, work / "data.txt", "fromlora", steps=1,
                     restore_from=lora_run)
    _fails(train(args, capsys), "is a LoRA run", "gpt2tf lora merge")


def test_merge_and_export_refuse_the_wrong_kind(lora_run, models_dir, work, capsys):
    capsys.readouterr()
    assert _gpt2tf(["lora", "merge", models_dir / "tiny", work / "m2"]) == 1
    _fails((1, "", capsys.readouterr().err), "is not a LoRA run")
    assert _gpt2tf(["convert", "to-hf", lora_run, work / "h2"]) == 1
    _fails((1, "", capsys.readouterr().err), "is a LoRA run", "--lora")
    assert _gpt2tf(["convert", "to-hf", "--lora", models_dir / "tiny", work / "h3"]) == 1
    _fails((1, "", capsys.readouterr().err), "is not a LoRA run")
    assert not any((work / n).exists() for n in ("m2", "h2", "h3"))


def test_a_changed_base_is_refused(tmp_path):
    from gpt2tf import checkpoints, encoder
    from gpt2tf.decode.generator import Generator
    from gpt2tf.errors import UserError

    models = tmp_path / "models"
    models.mkdir()
    vocab = encoder.byte_level_vocab()
    checkpoints.write_model_dir(models / "tiny", TRAIN_TINY, random_weights(TRAIN_TINY, 1),
                                vocab)
    data = write_text_data(tmp_path / "data.txt", 4000)
    assert train(base_args(tmp_path, models, data, "r", steps=1, **LORA_FLAGS))[0] == 0
    shutil.rmtree(models / "tiny")
    with pytest.raises(UserError, match="is missing"):
        Generator(tmp_path / "checkpoint" / "r")
    checkpoints.write_model_dir(models / "tiny", TRAIN_TINY, random_weights(TRAIN_TINY, 2),
                                vocab)
    with pytest.raises(UserError, match="has changed"):
        Generator(tmp_path / "checkpoint" / "r")


def test_the_server_serves_a_lora_run(lora_run, merged):
    """POST /v1/completions on a server over the LoRA run gives the merged model's text."""
    import requests

    from gpt2tf.decode.generator import Generator
    from gpt2tf.serve import app as serve_app
    from gpt2tf.serve import server as serve_server

    body = {"prompt": TOKENS[0], "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    texts = []
    for model in (lora_run, merged):
        with Generator(model) as gen:
            service = serve_app.Service(gen, model_id="m")
            with serve_server.serve_in_thread(service.app()) as url:
                r = requests.post(f"{url}/v1/completions", json=body, timeout=60)
                assert r.status_code == 200, r.text
                texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[1] and texts[0]
