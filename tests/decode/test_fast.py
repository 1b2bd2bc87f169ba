"""The fast decode path as generation uses it: exact in fp32, close in int8 and bf16, its cache
derived from the checkpoint and never stale, and generation working where it cannot be written."""

import numpy as np
import pytest

from gpt2tf import checkpoints, encoder, paths
from gpt2tf.decode import fast
from gpt2tf.decode.engine import SamplingParams, sample_seed
from gpt2tf.decode.generator import Generator
from tiny import tiny

HP = tiny(n_ctx=96)
GREEDY = SamplingParams(top_k=1)


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in checkpoints.init_weights(HP).items()}
    return {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()}


@pytest.fixture
def model_dir(tmp_path):
    return checkpoints.write_model_dir(tmp_path / "m", HP, _weights(1), encoder.byte_level_vocab())


def _greedy(gen, prompts, length):
    rngs = [sample_seed(0, i) for i in range(len(prompts))]
    return np.stack(list(gen.stream(prompts, length=length, params=GREEDY, rngs=rngs)), axis=1)


def _logits_along(gen, tokens):
    """The fast engine's logits before each next token of `tokens` (prefill, then steps)."""
    backend = gen.engine.backend
    out = [backend.start([tokens[:1]])[0]]
    for t in tokens[1:]:
        out.append(backend.step(np.array([t]))[0])
    return np.stack(out)


@pytest.mark.parametrize("engine, runtime", [("auto", "native"), ("tflite", "tflite")])
def test_fp32_fast_path_equals_the_graph_at_every_step(model_dir, engine, runtime):
    with Generator(model_dir, engine=engine) as gen, Generator(model_dir, engine="graph") as ref:
        assert gen.engine_name == "fast" and ref.engine_name == "graph"
        assert gen.engine.backend.runtime == runtime
        prompts = [[5, 6, 7], [9] * 11, [1]]
        fast_tokens = _greedy(gen, prompts, 150)  # past n_ctx: the window slides
        assert (fast_tokens == _greedy(ref, prompts, 150)).all()
        seq = fast_tokens[0].tolist()[:HP.n_ctx]
        full = gen.logits([seq])[0]  # the TF graph's full forward pass, [T, V]
        np.testing.assert_allclose(_logits_along(gen, seq), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_int8_and_bf16_stay_close(model_dir, precision):
    with Generator(model_dir, precision=precision) as gen, Generator(model_dir) as ref:
        assert gen.engine_name == "fast"  # int8 on TFLite, bf16 on the native step
        prompts = [[5, 6, 7]]
        a, b = _greedy(gen, prompts, 60)[0], _greedy(ref, prompts, 60)[0]
        agree = (a == b).mean()
        assert agree >= 0.5, agree  # random weights: real models agree far more (README)
        seq = b.tolist()
        diff = np.abs(_logits_along(gen, seq) - ref.logits([seq])[0]).max()
        spread = np.ptp(ref.logits([seq])[0])
        assert 1e-4 < diff < 0.1 * spread, (diff, spread)  # rounded, and close


def test_a_changed_checkpoint_is_never_decoded_with_a_stale_cache(model_dir):
    # TFLite's conversion is the cache (the native step packs the weights it reads at start)
    with Generator(model_dir, engine="tflite") as gen, Generator(model_dir) as native:
        before = _greedy(gen, [[3, 4]], 20)
        assert (_greedy(native, [[3, 4]], 20) == before).all()
    cached = list((model_dir / paths.DECODE_CACHE).glob("decode-fp32-*.tflite"))
    assert len(cached) == 1
    # a new checkpoint under the same name, as a training step saved over it would be
    checkpoints.save_weights(str(model_dir / paths.CKPT_PREFIX), HP, _weights(2))
    with Generator(model_dir, engine="tflite") as gen, Generator(model_dir) as native, \
            Generator(model_dir, engine="graph") as ref:
        after = _greedy(gen, [[3, 4]], 20)
        assert (after == _greedy(ref, [[3, 4]], 20)).all()
        assert (after == _greedy(native, [[3, 4]], 20)).all()
    assert not (after == before).all()
    now = list((model_dir / paths.DECODE_CACHE).glob("decode-fp32-*.tflite"))
    assert len(now) == 1 and now != cached  # the stale conversion is gone


def test_an_unwritable_cache_still_generates(model_dir, tmp_path, monkeypatch):
    # A file where the cache folders would go: nothing can be written there, even as root.
    (model_dir / paths.DECODE_CACHE).write_text("not a folder")
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    monkeypatch.setenv(paths.CACHE_ENV, str(blocked / "cache"))
    with Generator(model_dir, engine="tflite") as gen, Generator(model_dir) as native, \
            Generator(model_dir, engine="graph") as ref:
        assert gen.engine_name == "fast" and native.engine.backend.runtime == "native"
        assert (_greedy(gen, [[3]], 10) == _greedy(ref, [[3]], 10)).all()
        assert (_greedy(native, [[3]], 10) == _greedy(ref, [[3]], 10)).all()
    # with a writable user cache, the conversion lands there instead
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    with Generator(model_dir, engine="tflite") as gen:
        _greedy(gen, [[3]], 2)
    assert list((tmp_path / "cache").rglob("decode-fp32-*.tflite"))


def test_the_fallback_is_one_note_and_still_generates(model_dir, monkeypatch, caplog):
    def broken(*a, **kw):
        raise RuntimeError("no XNNPACK here")

    monkeypatch.setattr(fast, "prepared_model", broken)
    with caplog.at_level("WARNING", logger="gpt2tf"):
        with Generator(model_dir, precision="int8") as gen:
            assert gen.engine_name == "graph"
            assert len(_greedy(gen, [[3]], 5)[0]) == 5
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "no XNNPACK here" in notes[0] and "TF graph in fp32" in notes[0]
