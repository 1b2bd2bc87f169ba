"""Dataset: reading and encoding files into .npz, safe streaming cuts, load_tokens, Sampler."""

import json
import os
import zipfile

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import shared_data_dir

from gpt2tf.data import documents, encode, sampler
from gpt2tf.cli import encode_main
from gpt2tf.data.encode import encode_to_npz, load_tokens
from gpt2tf.data.sampler import Sampler
from gpt2tf.encoder import ENDOFTEXT, PAT_STR, STARTOFTEXT, Encoder, byte_level_vocab
from gpt2tf.errors import UserError


@pytest.fixture(scope="module")
def tiny() -> Encoder:
    return Encoder.from_bytes(*byte_level_vocab(), source="byte-level")


@pytest.fixture(scope="module")
def gpt2() -> Encoder:
    data = shared_data_dir()
    return Encoder.from_bytes(
        (data / "encoder.json").read_bytes(), (data / "vocab.bpe").read_bytes()
    )


@pytest.fixture
def models_dir(tmp_path):
    """models/124M/ holding only the two vocabulary files (all that load_encoder reads)."""
    model = tmp_path / "models" / "124M"
    model.mkdir(parents=True)
    encoder_json, vocab_bpe = byte_level_vocab()
    (model / "encoder.json").write_bytes(encoder_json)
    (model / "vocab.bpe").write_bytes(vocab_bpe)
    return tmp_path / "models"


def joined_ids(enc: Encoder, docs: list[str]) -> list[int]:
    """The documented result: each document encoded whole, one <|endoftext|> between them."""
    out: list[int] = []
    for doc in docs:
        ids = enc.encode(doc)
        if not ids:
            continue
        if out and out[-1] != enc.eot_token and ids[0] != enc.eot_token:
            out.append(enc.eot_token)
        out.extend(ids)
    return out


def npz_ids(path) -> list[int]:
    with np.load(path) as npz:
        assert npz.files == ["arr_0"]
        arr = npz["arr_0"]
    assert arr.dtype == np.int32 and arr.ndim == 1
    return arr.tolist()


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- encode_to_npz --------------------------------------------------------------------------------


def test_encode_file_via_model_dir(tmp_path, models_dir):
    text = "Hello world.\nÜnïcödé 日本語 😀\n\n<|endoftext|> x"
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "out.npz"
    stats = encode_to_npz(str(src), str(out), models_dir=str(models_dir), progress=False)
    tiny = Encoder.from_bytes(*byte_level_vocab())
    assert npz_ids(out) == tiny.encode(text)
    assert stats["tokens"] == len(tiny.encode(text)) and stats["bytes"] == src.stat().st_size
    assert leftovers(tmp_path) == []


def test_encode_folder_sorted_recursive_skips_hidden(tmp_path, tiny):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("bravo\n")
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "c.md").write_text("charlie<|endoftext|>")
    (root / "sub" / "d.txt").write_text("")  # empty: adds nothing, not even a separator
    (root / "sub" / "e.txt").write_text("echo")
    (root / ".hidden.txt").write_text("HIDDEN")
    (root / ".git" / "config").write_text("HIDDEN")
    out = tmp_path / "out.npz"
    stats = encode_to_npz(str(root), str(out), encoder=tiny, progress=False)
    docs = ["alpha", "bravo\n", "charlie<|endoftext|>", "", "echo"]
    assert npz_ids(out) == joined_ids(tiny, docs)
    expected = "alpha<|endoftext|>bravo\n<|endoftext|>charlie<|endoftext|>echo"
    assert tiny.decode(npz_ids(out)) == expected
    assert stats["files"] == 5


def test_encode_glob(tmp_path, tiny):
    for name, text in [("x1.txt", "one"), ("x2.txt", "two"), ("y.txt", "not me")]:
        (tmp_path / name).write_text(text)
    out = tmp_path / "out.npz"
    encode_to_npz(str(tmp_path / "x*.txt"), str(out), encoder=tiny, progress=False)
    assert npz_ids(out) == joined_ids(tiny, ["one", "two"])


def test_encode_csv_rows_wrapped_like_gpt2_simple(tmp_path, tiny):
    src = tmp_path / "data.csv"
    src.write_text('title,body\n"first, row",a\n"multi\nline",b\n\nthird,c\n', encoding="utf-8")
    out = tmp_path / "out.npz"
    encode_to_npz(str(src), str(out), encoder=tiny, progress=False)
    rows = ["first, row", "multi\nline", "third"]
    expected = tiny.encode("".join(STARTOFTEXT + r + ENDOFTEXT for r in rows))
    assert npz_ids(out) == expected
    encode_to_npz(str(src), str(out), encoder=tiny, column="body", progress=False)
    assert npz_ids(out) == tiny.encode("".join(STARTOFTEXT + r + ENDOFTEXT for r in "abc"))
    with pytest.raises(UserError, match="no column 'nope'"):
        encode_to_npz(str(src), str(out), encoder=tiny, column="nope", progress=False)


def test_encode_jsonl(tmp_path, tiny):
    src = tmp_path / "data.jsonl"
    lines = [
        {"text": "first doc\n"},
        {"text": "second 日本", "id": 2},
        {"content": "x", "text": "3"},
    ]
    src.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    out = tmp_path / "out.npz"
    encode_to_npz(str(src), str(out), encoder=tiny, progress=False)
    assert npz_ids(out) == joined_ids(tiny, ["first doc\n", "second 日本", "3"])
    with pytest.raises(UserError, match=r"data.jsonl:1: expected a JSON object with a 'content'"):
        encode_to_npz(str(src), str(out), encoder=tiny, field="content", progress=False)


def test_encode_many_small_blocks_equals_whole(tmp_path, gpt2, monkeypatch):
    """Tiny read and encode blocks force many cuts; the ids must not change."""
    data = shared_data_dir("tinyshakespeare.txt")
    text = (data / "tinyshakespeare.txt").read_text("utf-8")[:100_000] + " café 日本\n"
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    monkeypatch.setattr(documents, "READ_BYTES", 777)
    monkeypatch.setattr(encode, "BLOCK_CHARS", 2_000)
    out = tmp_path / "out.npz"
    encode_to_npz(str(src), str(out), encoder=gpt2, progress=False)
    assert npz_ids(out) == gpt2.encode(text)


def test_tinyshakespeare_split_equals_whole(gpt2):
    data = shared_data_dir("tinyshakespeare.txt")
    text = (data / "tinyshakespeare.txt").read_text("utf-8")
    blocks = [text[i : i + 10_000] for i in range(0, len(text), 10_000)]
    pieces = list(encode.split_blocks(blocks, min_chars=50_000))
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [t for p in gpt2.encode_batch(pieces) for t in p] == gpt2.encode(text)


_PRETOKEN = regex.compile(PAT_STR)
SPLITTY = st.text(alphabet=st.sampled_from(list("ab1 '\n\t\r.\u00a0\u3000\x1c日s")), max_size=80)


@settings(max_examples=500, deadline=None)
@given(SPLITTY)
def test_every_cut_is_a_pretokenizer_boundary(text):
    starts = {m.start() for m in _PRETOKEN.finditer(text)}
    hi = len(text)
    while (cut := encode._last_cut(text[:hi], 0)) is not None:
        assert cut in starts
        # The prefix splits the same way up to the cut.
        assert {m.start() for m in _PRETOKEN.finditer(text[:cut])} == {s for s in starts if s < cut}
        hi = cut


@settings(max_examples=200, deadline=None)
@given(st.lists(SPLITTY, max_size=8), st.integers(1, 40))
def test_split_blocks_keeps_text_and_cuts_at_boundaries(blocks, min_chars):
    text = "".join(blocks)
    pieces = list(encode.split_blocks(blocks, min_chars))
    assert "".join(pieces) == text
    assert all(pieces)
    starts = {m.start() for m in _PRETOKEN.finditer(text)}
    pos = 0
    for piece in pieces[:-1]:
        pos += len(piece)
        assert pos in starts


# --- decoding errors and the CLI --------------------------------------------------------------


def test_latin1_file_names_file_and_offset(tmp_path, tiny):
    src = tmp_path / "latin.txt"
    src.write_bytes("Café au lait\n".encode("latin-1"))
    out = tmp_path / "out.npz"
    with pytest.raises(UserError) as info:
        encode_to_npz(str(src), str(out), encoder=tiny, progress=False)
    msg = str(info.value)
    assert str(src) in msg and "offset 3" in msg and "0xe9" in msg and "--encoding latin-1" in msg
    assert not out.exists() and leftovers(tmp_path) == []


def test_bad_byte_offset_across_read_blocks(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(documents, "READ_BYTES", 4)
    src = tmp_path / "x.txt"
    data = "aé日本".encode() + b"\xff" + b"tail"  # a=1, é=2, 日=3, 本=3 bytes: 0xff at 9
    src.write_bytes(data)
    with pytest.raises(UserError, match="offset 9 "):
        list(documents.read_text_blocks(src))
    src.write_bytes("ab日".encode()[:-1])  # truncated at the end of the file
    with pytest.raises(UserError, match="offset 2 "):
        list(documents.read_text_blocks(src))


def test_cli_reports_encoding_error_then_latin1_works(tmp_path, models_dir, capsys):
    src = tmp_path / "latin.txt"
    src.write_bytes("Café\n".encode("latin-1"))
    out = tmp_path / "out.npz"
    argv = [str(src), str(out), "--models_dir", str(models_dir), "--model_name", "124M"]
    assert encode_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "offset 3" in err[0]
    assert not out.exists() and leftovers(tmp_path) == []

    assert encode_main([*argv, "--encoding", "latin-1"]) == 0
    tiny = Encoder.from_bytes(*byte_level_vocab())
    assert tiny.decode(npz_ids(out)) == "Café\n"


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_match", "no input files match"),
        ("missing", "not found"),
        ("empty", "holds no text"),
        ("out_dir_missing", "does not exist"),
        ("not_npz", "must end in .npz"),
        ("out_is_dir", "is a folder"),
        ("bad_encoding", "unknown encoding"),
        ("npz_input", "already encoded"),
    ],
)
def test_encode_errors_leave_nothing(tmp_path, tiny, case, message):
    (tmp_path / "in.txt").write_text("some text")
    (tmp_path / "empty.txt").write_text("")
    np.savez(tmp_path / "pre.npz", np.arange(3))
    src, out, kwargs = tmp_path / "in.txt", tmp_path / "out.npz", {}
    if case == "no_match":
        src = tmp_path / "*.nothing"
    elif case == "missing":
        src = tmp_path / "absent.txt"
    elif case == "empty":
        src = tmp_path / "empty.txt"
    elif case == "out_dir_missing":
        out = tmp_path / "nope" / "out.npz"
    elif case == "not_npz":
        out = tmp_path / "out.npy"
    elif case == "out_is_dir":
        out = tmp_path / "dir.npz"
        out.mkdir()
    elif case == "bad_encoding":
        kwargs["encoding"] = "no-such-codec"
    elif case == "npz_input":
        src = tmp_path / "pre.npz"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=message):
        encode_to_npz(str(src), str(out), encoder=tiny, progress=False, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_rerun_into_the_input_folder(tmp_path, tiny):
    (tmp_path / "a.txt").write_text("alpha")
    out = tmp_path / "out.npz"
    for _ in range(2):  # the second run must not trip over the first run's .npz
        encode_to_npz(str(tmp_path), str(out), encoder=tiny, progress=False)
    assert npz_ids(out) == tiny.encode("alpha")


def test_error_keeps_an_existing_output(tmp_path, tiny):
    out = tmp_path / "out.npz"
    out.write_bytes(b"old")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff")
    with pytest.raises(UserError):
        encode_to_npz(str(tmp_path / "bad.txt"), str(out), encoder=tiny, progress=False)
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []


# --- load_tokens ------------------------------------------------------------------------------


def test_load_tokens_text_and_npz(tmp_path, tiny):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    chunks = load_tokens(str(tmp_path), encoder=tiny)
    assert [c.tolist() for c in chunks] == [joined_ids(tiny, ["alpha", "beta"])]

    encode_to_npz(str(tmp_path), str(tmp_path / "ours.npz"), encoder=tiny, progress=False)
    (tmp_path / "a.txt").unlink()
    (tmp_path / "b.txt").unlink()
    # nshepperd's encode.py: several arrays, savez_compressed, int64 from np.stack.
    np.savez_compressed(tmp_path / "theirs.npz", np.array([1, 2, 3]), np.array([4, 5]))
    chunks = load_tokens(str(tmp_path), encoder=tiny)
    assert [c.tolist() for c in chunks] == [joined_ids(tiny, ["alpha", "beta"]), [1, 2, 3], [4, 5]]
    assert all(c.dtype == np.int32 for c in chunks)


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return "boom"


class _Payload:
    def __reduce__(self):
        return _record_unpickling, ()


def test_pickled_npz_is_refused_never_unpickled(tmp_path, tiny):
    arr = np.empty(1, dtype=object)
    arr[0] = _Payload()
    np.savez(tmp_path / "evil.npz", arr)
    assert b"_record_unpickling" in zipfile.ZipFile(tmp_path / "evil.npz").read("arr_0.npy")
    with pytest.raises(UserError, match="pickled"):
        load_tokens(str(tmp_path / "evil.npz"), encoder=tiny)
    assert _UNPICKLED == []


@pytest.mark.parametrize(
    "arr, message",
    [
        (np.array([[1, 2], [3, 4]]), "1-D array of integer"),
        (np.array([1.0, 2.0]), "1-D array of integer"),
        (np.array([1, 257]), "outside the vocabulary"),
        (np.array([-1, 3]), "outside the vocabulary"),
    ],
)
def test_bad_npz_arrays(tmp_path, tiny, arr, message):
    np.savez(tmp_path / "bad.npz", arr)
    with pytest.raises(UserError, match=message):
        load_tokens(str(tmp_path / "bad.npz"), encoder=tiny)


def test_not_an_npz(tmp_path, tiny):
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip")
    with pytest.raises(UserError, match="junk.npz"):
        load_tokens(str(tmp_path / "junk.npz"), encoder=tiny)


def test_empty_dataset(tmp_path, tiny):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_tokens(str(tmp_path / "e.txt"), encoder=tiny)


# --- Sampler ----------------------------------------------------------------------------------


def test_sampler_is_uniform_over_valid_windows():
    chunks = [np.arange(10), np.arange(100, 105), np.arange(200, 202)]
    sampler = Sampler(chunks, seed=0)
    counts: dict[int, int] = {}
    n = 11_000
    for _ in range(n):
        w = sampler.sample(3)
        assert w.tolist() == list(range(w[0], w[0] + 3))  # never crosses a chunk boundary
        counts[int(w[0])] = counts.get(int(w[0]), 0) + 1
    # 8 starts in the first chunk, 3 in the second, none in the third (too short).
    assert sorted(counts) == [*range(8), 100, 101, 102]
    expected = n / 11
    assert all(abs(c - expected) < 5 * expected**0.5 for c in counts.values()), counts


def test_sampler_state_round_trip():
    chunks = [np.arange(1000), np.arange(5000, 5300)]
    a = Sampler(chunks, seed=7)
    for _ in range(5):
        a.sample(16)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.sample(16).tolist() for _ in range(10)]
    b = Sampler(chunks, seed=12345)
    b.load_state_dict(state)
    assert [b.sample(16).tolist() for _ in range(10)] == expected
    assert Sampler(chunks, seed=7).sample_batch(3, 8).shape == (3, 8)


def test_sampler_bad_state():
    with pytest.raises(UserError, match="bad sampler state"):
        Sampler([np.arange(10)]).load_state_dict({"bit_generator": {"state": "nonsense"}})


def test_too_short_corpus():
    sampler = Sampler([np.arange(5), np.arange(3)], seed=0)
    assert sampler.sample(5).tolist() == [0, 1, 2, 3, 4]  # exactly one window fits
    with pytest.raises(UserError, match="dataset has 8 tokens .* need at least 6"):
        sampler.sample(6)


def test_fixed_windows_are_fixed():
    sampler = Sampler([np.arange(500)], seed=1)
    first = sampler.fixed_windows(32, 4, seed=3)
    sampler.sample(32)
    assert np.array_equal(first, sampler.fixed_windows(32, 4, seed=3))
    assert first.shape == (4, 32)
    assert not np.array_equal(first, sampler.fixed_windows(32, 4, seed=4))


def test_split_holds_out_the_last_tokens():
    chunks = [np.arange(60), np.arange(100, 140)]
    train, val = sampler.split_tokens(chunks, 0.5)
    assert [c.tolist() for c in train] == [list(range(50))]
    assert [c.tolist() for c in val] == [list(range(50, 60)), list(range(100, 140))]
    train_s, val_s = Sampler(chunks, seed=0).split(0.1)
    assert train_s.total_size == 90 and val_s.total_size == 10
    with pytest.raises(UserError, match="val_fraction"):
        sampler.split_tokens(chunks, 1.0)


def test_dataset_module_does_not_import_tensorflow():
    import subprocess
    import sys

    code = "import sys, gpt2tf.data.encode, gpt2tf.data.sampler; print('tensorflow' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.strip() == "False", result.stderr

