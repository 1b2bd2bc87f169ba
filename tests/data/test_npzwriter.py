"""npzwriter: the hand-written streaming .npz is a valid zip (CRC checked), np.load reads it
exactly, and a failure leaves nothing under the final name."""

import errno
import zipfile

import numpy as np
import pytest

from gpt2tf.data import npzwriter
from gpt2tf.data.npzwriter import NpzWriter, npy_header


def write(path, chunks):
    with NpzWriter(path) as w:
        for c in chunks:
            w.write(c)
    return w


@pytest.mark.parametrize("block_bytes", [64, 1 << 22])
def test_roundtrip_many_blocks(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(npzwriter, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 50257, size=n).astype(np.int32) for n in (1, 0, 17, 3000, 5, 40000)]
    out = tmp_path / "ids.npz"
    w = write(out, chunks)
    expected = np.concatenate(chunks)
    assert w.count == len(expected)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None  # every member's CRC-32 matches its data
        (info,) = zf.infolist()
        assert info.filename == "arr_0.npy" and info.compress_type == zipfile.ZIP_DEFLATED
        assert info.file_size == npzwriter.HEADER_BYTES + 4 * len(expected)
        assert info.compress_size < info.file_size
    with np.load(out, allow_pickle=False) as npz:
        assert npz.files == ["arr_0"]
        arr = npz["arr_0"]
    assert arr.dtype == np.int32 and arr.shape == expected.shape
    np.testing.assert_array_equal(arr, expected)


def test_empty_array(tmp_path):
    out = tmp_path / "empty.npz"
    write(out, [])
    with np.load(out) as npz:
        assert npz["arr_0"].shape == (0,) and npz["arr_0"].dtype == np.int32


def test_header_fixed_size_and_readable():
    for n in (0, 1, 6059561, 10**18):
        h = npy_header(n)
        assert len(h) == npzwriter.HEADER_BYTES
        assert h.endswith(b"\n")
    with pytest.raises(ValueError):
        npy_header(10**120)


def test_error_inside_leaves_old_file(tmp_path):
    out = tmp_path / "ids.npz"
    out.write_bytes(b"precious")
    with pytest.raises(RuntimeError):
        with NpzWriter(out) as w:
            w.write(np.arange(10, dtype=np.int32))
            raise RuntimeError("stop")
    assert out.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["ids.npz"]  # no temp file left


def test_disk_full_on_deflate_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(npzwriter, "BLOCK_BYTES", 16)
    out = tmp_path / "ids.npz"
    out.write_bytes(b"precious")
    real = NpzWriter._deflate

    def full(self, block):
        if self._data_bytes > 64:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, block)

    monkeypatch.setattr(NpzWriter, "_deflate", full)
    with pytest.raises(OSError) as e:
        write(out, [np.arange(8, dtype=np.int32)] * 50)
    assert e.value.errno == errno.ENOSPC
    assert out.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["ids.npz"]
