"""Generation: seeds, batching, stopping, the sliding window, the CLIs and their errors."""

import json
import logging
import shutil

import numpy as np
import pytest

from gpt2tf import checkpoints, cli, paths
from gpt2tf.errors import UserError
from gpt2tf.decode.engine import SamplingParams
from gpt2tf.decode.generator import Generator

from tiny import TINY


def test_same_seed_same_text_different_seed_differs(tiny_generator):
    ctx = tiny_generator.encode_prompt("Hello")
    a = tiny_generator.generate_tokens(ctx, length=30, seed=7, stop_at_eot=False)
    b = tiny_generator.generate_tokens(ctx, length=30, seed=7, stop_at_eot=False)
    c = tiny_generator.generate_tokens(ctx, length=30, seed=8, stop_at_eot=False)
    assert a == b
    assert a != c


def test_sample_depends_on_seed_and_index_not_batch_size(tiny_generator):
    ctx = tiny_generator.encode_prompt("abc")
    kw = dict(length=20, seed=3, stop_at_eot=False, params=SamplingParams(temperature=1.0))
    one = tiny_generator.generate_tokens(ctx, nsamples=5, batch_size=1, **kw)
    two = tiny_generator.generate_tokens(ctx, nsamples=5, batch_size=2, **kw)
    five = tiny_generator.generate_tokens(ctx, nsamples=5, batch_size=5, **kw)
    assert len(one) == 5 and all(len(s) == 20 for s in one)
    assert one == two == five
    assert len({tuple(s) for s in one}) == 5


def test_greedy_left_padded_rows_match_single_prompts(tiny_generator):
    params = SamplingParams(top_k=1)
    prompts = [[5, 6, 7, 8, 9, 10], [42], [100, 101, 102]]
    rngs = [np.random.default_rng(0) for _ in prompts]
    steps = list(tiny_generator.stream(prompts, length=8, params=params, rngs=rngs))
    together = np.stack(steps, axis=1)
    for row, p in enumerate(prompts):
        alone = tiny_generator.generate_tokens(p, length=8, params=params, stop_at_eot=False)[0]
        assert together[row].tolist() == alone


def test_cached_greedy_equals_full_forward_argmax(tiny_generator):
    ctx = [3, 14, 15, 92, 65]
    got = tiny_generator.generate_tokens(ctx, length=10, params=SamplingParams(top_k=1),
                                         stop_at_eot=False)[0]
    seq = list(ctx)
    for _ in range(10):
        seq.append(int(tiny_generator.logits([seq])[0, -1].argmax()))
    assert got == seq[len(ctx):]


def test_window_slides_past_n_ctx(tiny_generator):
    n_ctx = TINY.n_ctx
    ctx = [1, 2, 3]
    length = n_ctx + 20  # forces one slide
    greedy = SamplingParams(top_k=1)
    out = tiny_generator.generate_tokens(ctx, length=length, params=greedy, stop_at_eot=False)[0]
    assert len(out) == length
    # After the slide, the next token is the greedy choice given the last 3/4 window.
    seq = ctx + out
    first_after = n_ctx - len(ctx) + 1  # index in out of the token sampled after the slide
    keep = n_ctx - n_ctx // 4
    window = seq[len(ctx) + first_after - keep: len(ctx) + first_after]
    assert out[first_after] == int(tiny_generator.logits([window])[0, -1].argmax())


def test_long_prompt_is_cut_with_warning(tiny_generator, caplog):
    with caplog.at_level(logging.WARNING, logger="gpt2tf"):
        out = tiny_generator.generate_tokens(list(range(200)), length=3, seed=1, stop_at_eot=False)
    assert len(out[0]) == 3
    assert "keeping the last 63" in caplog.text


@pytest.fixture(scope="module")
def eot_model_dir(tmp_path_factory):
    """A model that always prefers <|endoftext|> (256): ln_f's bias aligns with wte[256]."""
    from gpt2tf import encoder

    w = checkpoints.init_weights(TINY, seed=2)
    w["model/ln_f/b"] = np.full([TINY.n_embd], 5.0, np.float32)
    w["model/wte"][256] = 1.0
    out = tmp_path_factory.mktemp("eot") / "m"
    checkpoints.write_model_dir(out, TINY, w, encoder.byte_level_vocab())
    return out


def test_generation_stops_at_endoftext(eot_model_dir):
    with Generator(eot_model_dir) as gen:
        ctx = gen.encode_prompt("hi")
        assert gen.generate_tokens(ctx, length=20, seed=1) == [[]]
        assert len(gen.generate_tokens(ctx, length=20, seed=1, stop_at_eot=False)[0]) == 20


def test_truncate_and_include_prefix(tiny_generator):
    from gpt2tf.decode import generator as inference

    full = inference.generate_texts(tiny_generator, prefix="xy", length=40, seed=5,
                                    stop_at_eot=False, include_prefix=False)[0]
    cut_at = full[10]
    texts = inference.generate_texts(tiny_generator, prefix="xy", length=40, seed=5,
                                     stop_at_eot=False, truncate=cut_at, include_prefix=True)
    assert texts[0] == "xy" + full.split(cut_at, 1)[0]


def _run(main, argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _gen_args(model_dir, *extra):
    return ["--models_dir", str(model_dir.parent), "--model_name", model_dir.name, *extra]


def test_cli_generate_to_file(tiny_model_dir, tmp_path, capsys):
    dest = tmp_path / "out.txt"
    code, out, err = _run(cli.generate_main, _gen_args(
        tiny_model_dir, "--nsamples", "3", "--batch_size", "2", "--length", "12", "--seed", "4",
        "--prefix", "ab", "--destination_path", str(dest), "--stop_at_eot=False"), capsys)
    assert code == 0, err
    text = dest.read_text(encoding="utf-8")
    assert text.count("=" * 20 + "\n") == 3 and text.startswith("ab")
    # the same seed from Python gives the same samples
    from gpt2tf.decode import generator as inference
    with Generator(tiny_model_dir) as gen:
        texts = inference.generate_texts(gen, prefix="ab", nsamples=3, length=12, seed=4,
                                         stop_at_eot=False)
    assert text == "".join(f"{t}\n{'=' * 20}\n" for t in texts)


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--top_p", "1.5"], "--top_p must be in [0, 1]"),
    (["--top_p", "-0.1"], "--top_p must be in [0, 1]"),
    (["--top_k", "-1"], "--top_k must be an integer in [0, 2147483647]"),
    (["--length", "0"], "--length must be an integer >= 1"),
    (["--nsamples", "0"], "--nsamples must be an integer >= 1"),
    (["--batch_size", "0"], "--batch_size must be an integer >= 1"),
])
def test_cli_bad_sampling_flags(tiny_model_dir, capsys, flags, needle):
    code, out, err = _run(cli.generate_main, _gen_args(tiny_model_dir, *flags), capsys)
    assert code == 1
    assert needle in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_model_dir(tmp_path, capsys):
    code, out, err = _run(cli.generate_main, ["--models_dir", str(tmp_path), "--model_name", "124M"], capsys)
    assert code == 1 and "not found" in err and "download_model.py" in err
    assert err.count("\n") == 1


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_cli_corrupt_and_mismatched_model_dirs(tiny_model_dir, tmp_path, capsys):
    bad_hp = _copy(tiny_model_dir, tmp_path / "badhp")
    (bad_hp / paths.HPARAMS).write_text('{"n_vocab": 257, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_lyr": 1}')
    code, _, err = _run(cli.generate_main, _gen_args(bad_hp), capsys)
    assert code == 1 and "unknown hparams ['n_lyr']" in err

    not_json = _copy(tiny_model_dir, tmp_path / "notjson")
    (not_json / paths.HPARAMS).write_text("{oops")
    code, _, err = _run(cli.generate_main, _gen_args(not_json), capsys)
    assert code == 1 and "not valid JSON" in err

    mismatch = _copy(tiny_model_dir, tmp_path / "mismatch")
    hp = json.loads((mismatch / paths.HPARAMS).read_text())
    hp["n_embd"] = 64
    (mismatch / paths.HPARAMS).write_text(json.dumps(hp))
    code, _, err = _run(cli.generate_main, _gen_args(mismatch), capsys)
    assert code == 1 and "does not match hparams.json" in err and "model/" in err

    truncated = _copy(tiny_model_dir, tmp_path / "truncated")
    data = truncated / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    code, _, err = _run(cli.generate_main, _gen_args(truncated), capsys)
    assert code == 1 and "corrupt" in err and err.count("\n") == 1

    no_ckpt = _copy(tiny_model_dir, tmp_path / "nockpt")
    (no_ckpt / "model.ckpt.index").unlink()
    code, _, err = _run(cli.generate_main, _gen_args(no_ckpt), capsys)
    assert code == 1 and "no complete checkpoint" in err


def test_init_cli_layout_and_refuses_existing(tmp_path, capsys):
    out = tmp_path / "m"
    code, _, err = _run(cli.main, ["init", str(out), "--n_layer", "1", "--n_embd", "16",
                                   "--n_head", "2", "--n_ctx", "32"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(paths.MODEL_FILES)
    names = checkpoints.list_checkpoint(str(out / "model.ckpt"))
    assert names["model/h0/attn/c_attn/w"] == [1, 16, 48]
    assert names["model/wte"] == [257, 16]
    w = checkpoints.read_weights(str(out / "model.ckpt"))
    assert np.all(w["model/h0/ln_1/g"] == 1) and np.all(w["model/h0/attn/c_attn/b"] == 0)
    assert abs(float(w["model/h0/mlp/c_fc/w"].std()) - 0.02) < 0.002
    before = (out / "hparams.json").read_bytes()
    code, _, err = _run(cli.main, ["init", str(out)], capsys)
    assert code == 1 and "already exists" in err
    assert (out / "hparams.json").read_bytes() == before


def test_generator_graph_is_built_once(tiny_generator):
    ops = len(tiny_generator.graph.get_operations())
    for seed in range(3):
        tiny_generator.generate_tokens([1, 2], length=3, seed=seed, nsamples=2, batch_size=2,
                                       params=SamplingParams(top_k=5, top_p=0.9))
    assert len(tiny_generator.graph.get_operations()) == ops
    assert tiny_generator.graph.finalized


def test_bad_token_ids_rejected(tiny_generator):
    with pytest.raises(UserError, match="outside"):
        tiny_generator.generate_tokens([300], length=2)
