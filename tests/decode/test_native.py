"""decode/native.py's own promises: a row's numbers never depend on the rows beside it, the
library is built once into the cache (or a private folder where the cache cannot be written),
and where it cannot be built generation takes TFLite with a note. Its logits against the TF
graph are checked in test_lite.py, beside TFLite's."""

import numpy as np
import pytest
from tiny import random_weights, tiny

from gpt2tf import checkpoints, encoder, paths
from gpt2tf.decode import native
from gpt2tf.decode.engine import SamplingParams
from gpt2tf.decode.generator import Generator

HP = tiny(n_ctx=96, n_embd=48, n_head=3)  # 48 columns: the GEMM's last panel is partial


@pytest.fixture(scope="module")
def weights():
    return random_weights(HP, seed=3)


def test_a_rows_logits_are_bitwise_the_same_among_any_rows(weights):
    """Row 0's logits alone, among 2, 16 and 17 rows (past one 16-row tile) at other positions
    and tokens: identical to the bit, as the server's reproducibility needs."""
    rng = np.random.default_rng(0)
    prompt = list(rng.integers(0, HP.n_vocab, 7))
    alone = None
    for rows in (1, 2, 16, 17):
        step = native.NativeStep(weights, HP, threads=2)
        step.start(rows, 40)
        step.prefill(0, prompt)
        for r in range(1, rows):
            step.prefill(r, list(rng.integers(0, HP.n_vocab, 1 + r)))
        positions = np.array([7] + [1 + r for r in range(1, rows)], np.int32)
        tokens = np.array([5] + list(rng.integers(0, HP.n_vocab, rows - 1)), np.int32)
        got = []
        for _ in range(3):
            got.append(step.step(tokens, positions)[0])
            positions += 1
        got = np.stack(got)
        if alone is None:
            alone = got
        assert np.array_equal(got, alone), rows


def test_a_step_with_a_prompt_chunk_equals_them_apart(weights):
    """step_rows: two rows' step and a third row's prompt chunk in one pass give, to the bit,
    what a separate extend and step give (the server admits prompts this way), and leave the
    same cache."""
    rng = np.random.default_rng(1)
    p0, p1, p2 = (list(rng.integers(0, HP.n_vocab, n)) for n in (5, 9, 20))
    together, apart = native.NativeStep(weights, HP), native.NativeStep(weights, HP)
    for step in (together, apart):
        step.start(3, 40)
        step.prefill(0, p0)
        step.prefill(1, p1)
    rows, tokens, positions = np.array([0, 1]), np.array([3, 4]), np.array([5, 9])
    logits, last = together.step_rows(rows, tokens, positions, (2, p2, 0))
    want_last = apart.extend(2, p2, 0)
    want, none = apart.step_rows(rows, tokens, positions)
    assert none is None
    assert np.array_equal(logits, want) and np.array_equal(last, want_last)
    nxt = (np.array([7, 8, 9]), np.array([6, 10, 20]))
    assert np.array_equal(together.step(*nxt), apart.step(*nxt))
    with pytest.raises(ValueError, match="both steps"):
        together.step_rows(rows, tokens, positions + 2, (1, [1], 11))
    with pytest.raises(ValueError, match="distinct"):
        together.step_rows(np.array([0, 0]), tokens, positions)


def test_the_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_library", None)
    native.load_library()
    built = list((tmp_path / "cache" / "native").glob("gpt2tf-native-*.so"))
    assert len(built) == 1 and not list((tmp_path / "cache" / "native").glob(".tmp-*"))
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_library", None)  # a new process: found, not rebuilt
    native.load_library()
    assert built[0].stat().st_mtime_ns == mtime


def test_an_unwritable_cache_builds_a_private_copy(tmp_path, monkeypatch, weights):
    blocked = tmp_path / "blocked"
    blocked.write_text("")  # a file where the cache folder would go
    monkeypatch.setenv(paths.CACHE_ENV, str(blocked / "cache"))
    monkeypatch.setattr(native, "_library", None)
    step = native.NativeStep(weights, HP)
    assert step.prefill(0, [1, 2, 3]).shape == (HP.n_vocab,)


def test_without_a_compiler_generation_takes_tflite_with_a_note(tmp_path, monkeypatch, caplog):
    model_dir = checkpoints.write_model_dir(tmp_path / "m", HP, random_weights(HP, seed=4),
                                            encoder.byte_level_vocab())
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))  # nothing built there yet
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(native, "COMPILERS", ())
    monkeypatch.setattr(native, "_library", None)
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler"):
        native.load_library()
    with caplog.at_level("INFO", logger="gpt2tf"):
        with Generator(model_dir) as gen, Generator(model_dir, engine="graph") as ref:
            assert gen.engine.backend.runtime == "tflite"
            greedy = SamplingParams(top_k=1)
            a = gen.generate_tokens([97, 98], length=8, params=greedy, stop_at_eot=False)
            assert a == ref.generate_tokens([97, 98], length=8, params=greedy, stop_at_eot=False)
    notes = [r.getMessage() for r in caplog.records if "native" in r.getMessage()]
    assert len(notes) == 1 and "no C++ compiler" in notes[0], notes


def test_a_compile_error_is_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "native.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "SOURCE", bad)
    monkeypatch.setattr(native, "_library", None)
    with pytest.raises(native.NativeUnavailable, match="compiling native.cc failed") as e:
        native.load_library()
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache" / "native").iterdir())  # no half-built library
