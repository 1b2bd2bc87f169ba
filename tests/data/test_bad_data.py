"""Bad data files found by hand (issue 14) that once gave a traceback, a silently wrong result or
an unbounded allocation: now one line naming the file, exit 1, nothing written."""

import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from shared_data import shared_data_dir
from tiny import REPO

from gpt2tf.data.documents import iter_documents, resolve_paths
from gpt2tf.data.encode import load_tokens
from gpt2tf.data.npzwriter import npy_header
from gpt2tf.encoder import Encoder, byte_level_vocab
from gpt2tf.errors import UserError

DEEP = 100_000  # levels of nesting: far past Python's recursion limit
MIB = 1 << 20


def _run(argv, cwd, env=None, timeout=120):
    path = f"{REPO / 'src'}{os.pathsep}{REPO / 'tests'}"
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False, env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin",
                                            **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def _one_line(code, err, needle):
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err, err


def _encode(src, out, models_dir, model_name="tiny"):
    return _run([sys.executable, str(REPO / "encode.py"), str(src), str(out), "--models_dir",
                 str(models_dir), "--model_name", model_name], src.parent)


@pytest.fixture
def vocab_dir(tmp_path):
    """models/tiny/ holding only the byte-level vocabulary (all that encode.py reads)."""
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    for name, content in zip(("encoder.json", "vocab.bpe"), byte_level_vocab()):
        (model / name).write_bytes(content)
    return model


@pytest.fixture(scope="module")
def tiny():
    return Encoder.from_bytes(*byte_level_vocab(), source="byte-level")


# --- JSON nested deeper than the parser recurses ----------------------------------------------


def test_deeply_nested_jsonl_line(tmp_path, vocab_dir):
    src = tmp_path / "deep.jsonl"
    src.write_text('{"text": "ok"}\n{"text": ' + "[" * DEEP + "]" * DEEP + "}\n")
    code, _, err = _encode(src, tmp_path / "out.npz", vocab_dir.parent)
    _one_line(code, err, "deep.jsonl:2: JSON nested too deeply")
    assert not (tmp_path / "out.npz").exists()


def test_deeply_nested_encoder_json(tmp_path, vocab_dir):
    (vocab_dir / "encoder.json").write_text('{"a": ' + "[" * DEEP + "]" * DEEP + "}")
    (tmp_path / "t.txt").write_text("hello")
    code, _, err = _encode(tmp_path / "t.txt", tmp_path / "out.npz", vocab_dir.parent)
    _one_line(code, err, "encoder.json is nested too deeply")
    assert not (tmp_path / "out.npz").exists()


# --- vocab.bpe must make every token of encoder.json ------------------------------------------


def test_vocab_bpe_cut_to_half_its_merges(tmp_path):
    data = shared_data_dir()
    model = tmp_path / "models" / "half"
    model.mkdir(parents=True)
    (model / "encoder.json").write_bytes((data / "encoder.json").read_bytes())
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines(keepends=True)
    (model / "vocab.bpe").write_text("".join(lines[: 1 + 25_000]), encoding="utf-8")
    (tmp_path / "t.txt").write_text("hello world")
    code, _, err = _encode(tmp_path / "t.txt", tmp_path / "out.npz", model.parent, "half")
    _one_line(code, err, "encoder.json has 50,257 tokens but the 256 bytes, 25,000 vocab.bpe"
                         " merges and 1 special token make only 25,257")
    assert "cut short" in err and not (tmp_path / "out.npz").exists()


def _with_merges(merges: list[str], extra: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    vocab = json.loads(byte_level_vocab()[0])
    for token in ["".join(m.split()) for m in merges] + list(extra):
        vocab[token] = len(vocab)
    return json.dumps(vocab).encode(), ("#version: 0.2\n" + "".join(m + "\n" for m in merges)
                                        ).encode()


def test_full_vocabularies_pass_the_merge_count():
    data = shared_data_dir()
    encoder_json = (data / "encoder.json").read_bytes()
    vocab_bpe = (data / "vocab.bpe").read_bytes()
    # An added blank line changes the sha256, so the files are checked entry by entry.
    checked = Encoder.from_bytes(encoder_json, vocab_bpe + b"\n", source="edited")
    assert len(checked.encoder) == 256 + len(checked.bpe_ranks) + 1  # GPT-2: 50257 tokens
    Encoder.from_bytes(*byte_level_vocab())  # 256 + 0 merges + <|endoftext|>
    Encoder.from_bytes(*_with_merges(["a b", "ab c"], extra=("<|pad|>", "<unk>", "[PAD]")))


def test_a_token_no_merge_makes_is_refused():
    with pytest.raises(UserError, match=r"1 \(e.g. 'zz', id 258\) are made by no merge"):
        Encoder.from_bytes(*_with_merges(["a b"], extra=("zz",)), source="models/odd")


def test_an_id_far_past_the_number_of_tokens(tmp_path):
    vocab = json.loads(byte_level_vocab()[0])
    vocab["<|endoftext|>"] = 10**12  # the id -> token table would take 8 TB
    with pytest.raises(UserError, match="largest id is 1,000,000,000,000 but it has only 257"):
        Encoder.from_bytes(json.dumps(vocab).encode(), b"", source="models/odd")


def test_a_vocabulary_file_too_large_to_be_one(tmp_path, vocab_dir):
    with open(vocab_dir / "encoder.json", "r+b") as f:
        f.truncate(300 * MIB)  # sparse: no disk used, nothing read
    (tmp_path / "t.txt").write_text("hello")
    code, _, err = _encode(tmp_path / "t.txt", tmp_path / "out.npz", vocab_dir.parent)
    _one_line(code, err, "encoder.json is 300 MiB, far larger than a vocabulary file")


# --- .npz / .npy datasets -----------------------------------------------------------------------


def test_npy_renamed_npz_for_training(tmp_path, tiny_model_dir):
    np.save(tmp_path / "ids.npy", np.arange(100))
    (tmp_path / "ids.npy").rename(tmp_path / "ids.npz")
    code, _, err = _run([sys.executable, str(REPO / "train.py"), "--dataset", "ids.npz",
                         "--models_dir", str(tiny_model_dir.parent), "--model_name", "tiny",
                         "--checkpoint_dir", "ck", "--steps", "1"], tmp_path)
    _one_line(code, err, "ids.npz is a .npy file, not an .npz; rename it to end in .npy")
    assert not (tmp_path / "ck").exists()


def test_npy_and_npz_swapped_or_real(tmp_path, tiny):
    np.save(tmp_path / "ids.npy", np.arange(5, dtype=">i8"))
    assert [c.tolist() for c in load_tokens(str(tmp_path / "ids.npy"), encoder=tiny)] == [
        [0, 1, 2, 3, 4]]
    np.savez(tmp_path / "ids.npz", np.arange(3))
    (tmp_path / "ids.npz").rename(tmp_path / "z.npy")
    with pytest.raises(UserError, match="z.npy is an .npz archive, not a .npy array"):
        load_tokens(str(tmp_path / "z.npy"), encoder=tiny)


def _zip64(path, data: bytes, *, usize: int, crc: int, method: int = zipfile.ZIP_STORED):
    """An archive of one member `arr_0.npy` (`data`, compressed by `method`) whose zip headers
    declare `usize` bytes inflated and CRC `crc`, in the zip64 layout any size needs."""
    name = b"arr_0.npy"
    extra = struct.pack("<HHQQ", 1, 16, usize, len(data))
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, method, 0, 0x21, crc, 0xFFFFFFFF,
                        0xFFFFFFFF, len(name), len(extra)) + name + extra
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, method, 0, 0x21, crc,
                          0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra), 0, 0, 0, 0, 0)
    central += name + extra
    cd_offset = len(local) + len(data)
    end64 = cd_offset + len(central)
    tail = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1, 1, len(central), cd_offset)
    tail += struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
    tail += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), 0xFFFFFFFF, 0)
    path.write_bytes(local + data + central + tail)


TRILLION = 10**12


def test_npz_declaring_a_trillion_ids_in_a_small_member(tmp_path, tiny):
    # The .npy header says 10^12 ids; the member holds ten.
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as z:
        z.writestr("arr_0.npy", npy_header(TRILLION) + np.arange(10, dtype="<i4").tobytes())
    with pytest.raises(UserError, match="declares 1,000,000,000,000 ids .* but holds 40 bytes"):
        load_tokens(str(tmp_path / "big.npz"), encoder=tiny)


def test_npz_whose_zip_headers_declare_a_trillion_ids(tmp_path, tiny):
    # Header and zip sizes agree on 4 TB; the file holds 168 bytes of it.
    member = npy_header(TRILLION) + bytes(40)
    _zip64(tmp_path / "big.npz", member, usize=128 + 4 * TRILLION, crc=zlib.crc32(member))
    with pytest.raises(UserError, match="declares 1,000,000,000,000 ids, 3725.3 GiB as int32,"
                                        " but only .* of memory is available"):
        load_tokens(str(tmp_path / "big.npz"), encoder=tiny)


_PEAK = """
import resource, sys
from gpt2tf import memory
from gpt2tf.data.encode import load_tokens
from gpt2tf.encoder import Encoder, byte_level_vocab
from gpt2tf.errors import UserError

if sys.argv[2] != "-":
    memory.available_bytes = lambda: int(sys.argv[2])
enc = Encoder.from_bytes(*byte_level_vocab())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    tokens = sum(len(c) for c in load_tokens(sys.argv[1], encoder=enc))
    result = f"loaded {tokens}"
except UserError as e:
    result = f"error: {e}"
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
print(grown // 1024, result)
"""


def _peak_mib(path, available: int | None) -> tuple[int, str]:
    """(MiB the peak RSS grew by, the outcome) of load_tokens(path) in a fresh process."""
    code, out, err = _run([sys.executable, "-c", _PEAK, str(path),
                           "-" if available is None else str(available)], path.parent)
    assert code == 0, err
    grown, result = out.strip().split(" ", 1)
    return int(grown), result


BOMB_IDS = 64 * MIB  # 256 MiB of int32 zeros, deflated to about 250 KiB


def _deflate_bomb(path, ids: int = BOMB_IDS):
    zeros = bytes(16 * MIB)
    with (zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z,
          z.open("arr_0.npy", "w", force_zip64=True) as f):
        f.write(npy_header(ids))
        for _ in range(ids * 4 // len(zeros)):
            f.write(zeros)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    _deflate_bomb(path)
    assert path.stat().st_size < MIB
    return path


def test_deflate_bomb_is_refused_before_inflating(bomb):
    grown, result = _peak_mib(bomb, available=128 * MIB)
    assert result.startswith("error: ") and "declares 67,108,864 ids, 0.2 GiB as int32, but" \
        " only 0.1 GiB of memory is available" in result, result
    assert grown < 32, f"peak memory grew by {grown} MiB"


def test_a_large_npz_loads_with_one_copy_in_memory(bomb):
    # np.load held the inflated bytes, the array and its int32 cast: three times 256 MiB.
    grown, result = _peak_mib(bomb, available=None)
    assert result == f"loaded {BOMB_IDS}"
    assert grown < 256 + 64, f"peak memory grew by {grown} MiB for a 256 MiB array"


def test_a_member_that_inflates_past_its_declared_size_is_read_no_further(tmp_path):
    # The zip headers declare ten ids (and their CRC); the deflate stream goes on for 256 MiB.
    member = npy_header(10) + bytes(40)
    stream = zlib.compressobj(1, zlib.DEFLATED, -15)
    data = stream.compress(member) + stream.compress(bytes(BOMB_IDS * 4)) + stream.flush()
    _zip64(tmp_path / "liar.npz", data, usize=len(member), crc=zlib.crc32(member),
           method=zipfile.ZIP_DEFLATED)
    grown, result = _peak_mib(tmp_path / "liar.npz", available=None)
    assert result == "loaded 10", result
    assert grown < 32, f"peak memory grew by {grown} MiB"


@pytest.mark.parametrize("name, content, message", [
    ("random.npz", bytes(range(7, 250)) * 40, ("random.npz is not an .npz, a zip archive of .npy"
                                               " arrays (it starts with bytes 07 08 09 0a 0b 0c)")),
    ("random.npy", b"\x00garbage" * 40, "random.npy is not a .npy array (it starts with bytes"),
    ("empty.npz", b"", "empty.npz is empty, not an .npz"),
    ("pickle.npz", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
     "pickle.npz is a Python pickle, not an .npz"),
], ids=["random-npz", "random-npy", "empty", "raw-pickle"])
def test_bytes_that_are_no_npz_say_what_they_are(tmp_path, tiny, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError) as info:
        load_tokens(str(tmp_path / name), encoder=tiny)
    assert message in str(info.value)
    assert ("pickled" in str(info.value)) is False


def test_truncated_npz(tmp_path, tiny):
    np.savez_compressed(tmp_path / "ids.npz", np.arange(10_000))
    data = (tmp_path / "ids.npz").read_bytes()
    (tmp_path / "ids.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="ids.npz is not a complete .npz .* truncated or corrupt"):
        load_tokens(str(tmp_path / "ids.npz"), encoder=tiny)


def test_corrupt_npz_member(tmp_path, tiny):
    np.savez(tmp_path / "ids.npz", np.arange(10_000, dtype=np.int32))
    data = bytearray((tmp_path / "ids.npz").read_bytes())
    data[400] ^= 0xFF  # an id's byte: the CRC no longer matches
    (tmp_path / "ids.npz").write_bytes(bytes(data))
    with pytest.raises(UserError, match="ids.npz is not a complete .npz \\(BadZipFile: Bad CRC"):
        load_tokens(str(tmp_path / "ids.npz"), encoder=tiny)


# --- globs and folders: each file once, and an end ----------------------------------------------


def _tree_with_links(tmp_path):
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.txt").write_text("beta")
    (root / "self").symlink_to(".")  # one link back: glob's ** listed a.txt 41 times
    (root / "again.txt").symlink_to("a.txt")  # the same file under a second name
    return root


@pytest.mark.parametrize("pattern", ["d", "d/**", "d/**/*.txt", "d/*", "d/**/**", "**/*.txt"])
def test_each_file_once_through_symlinks(tmp_path, pattern, monkeypatch):
    _tree_with_links(tmp_path)
    monkeypatch.chdir(tmp_path)
    files = resolve_paths(pattern)
    # (`d/*` names the link d/self itself, and may reach sub/b.txt through it: still once.)
    assert sorted(os.path.realpath(p) for p in files) == [
        os.path.realpath(tmp_path / "d" / "a.txt"), os.path.realpath(tmp_path / "d/sub/b.txt")]
    if pattern != "d/*":
        assert [str(p) for p in files] == [os.path.join("d", "a.txt"), os.path.join("d/sub/b.txt")]
    names = [name for name, _ in iter_documents(pattern)]
    assert len(names) == 2


@pytest.mark.parametrize("pattern", ["d", "d/**"])
def test_files_come_in_path_order(tmp_path, pattern, monkeypatch):
    for name in ("c.txt", "b/c.txt", "a.txt"):
        (tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / name).write_text(name)
    monkeypatch.chdir(tmp_path)
    assert [p.as_posix() for p in resolve_paths(pattern)] == ["d/a.txt", "d/b/c.txt", "d/c.txt"]


def test_a_glob_through_symlink_loops_ends(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.txt").write_text("alpha")
    (root / "s1").symlink_to(".")
    (root / "s2").symlink_to(".")  # with glob's **: 2^40 paths, never finished
    (root / "x").mkdir()
    (root / "x" / "loop").symlink_to("../y")
    (root / "y").symlink_to("x")
    script = ("import sys; from gpt2tf.data.documents import resolve_paths;"
              " print([str(p) for p in resolve_paths(sys.argv[1])])")
    code, out, err = _run([sys.executable, "-c", script, str(root / "**")], tmp_path, timeout=60)
    assert code == 0, err
    assert out.strip() == repr([str(root / "a.txt")])


def test_encode_counts_a_linked_file_once(tmp_path, vocab_dir):
    root = _tree_with_links(tmp_path)
    code, out, err = _run([sys.executable, str(REPO / "encode.py"), str(root / "**"),
                           str(tmp_path / "out.npz"), "--models_dir", str(vocab_dir.parent),
                           "--model_name", "tiny"], tmp_path)
    assert code == 0, err
    assert "from 2 documents" in out + err


# --- CSV ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, needle", [
    ('text\none\n"two\nthree\nfour\n',
     "q.csv:3: a quoted field in the row that starts here is never closed"),
    ('text\n"one"\n"two\nthree\n"four"\nfive\n',
     "q.csv:3: bad CSV in the row that starts here, at line 5"),
    ('"text\none\n', "q.csv:1: a quoted field in the row that starts here is never closed"),
], ids=["open-to-the-end", "closed-lines-later", "in-the-header"])
def test_csv_unclosed_quote(tmp_path, vocab_dir, content, needle):
    (tmp_path / "q.csv").write_text(content)
    code, _, err = _encode(tmp_path / "q.csv", tmp_path / "out.npz", vocab_dir.parent)
    _one_line(code, err, needle)
    assert not (tmp_path / "out.npz").exists()


def test_csv_quoted_fields_may_span_lines(tmp_path):
    (tmp_path / "q.csv").write_text('text,n\n"one\n\ntwo, ""2""",1\n\nthree,3\n')
    docs = [(name, "".join(blocks)) for name, blocks in iter_documents(str(tmp_path / "q.csv"))]
    assert [(os.path.basename(n), t) for n, t in docs] == [
        ("q.csv:2", '<|startoftext|>one\n\ntwo, "2"<|endoftext|>'),
        ("q.csv:6", "<|startoftext|>three<|endoftext|>")]
