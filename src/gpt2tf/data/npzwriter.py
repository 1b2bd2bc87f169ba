"""A streaming writer of one-array .npz files: ids are deflated while the encoder still runs.

An .npz is a zip archive whose member `arr_0.npy` is a .npy header followed by the raw array.
`np.savez_compressed` (and zipfile) need the whole array, or at least its length, before the
first byte is compressed, because the header that names the length comes first. Encoding a
corpus learns the length only at the end, and deflating afterwards costs as much as a third of
the whole encode. So `NpzWriter` deflates each block of ids on a background thread as it
arrives, and writes what depends on the length last:

- the .npy header sits in a deflate *stored* block of fixed size (the header is padded to a
  fixed length), reserved at the start and filled in at the end; the ids follow as an ordinary
  deflate stream. Stored block + stream is one valid deflate stream.
- the zip CRC-32 covers header + ids. It is computed over a placeholder header while the ids
  stream past, then corrected for the real header with CRC-32's linearity (no second pass over
  the ids).
- the zip headers (always zip64, so any size works) are written by hand, since zipfile cannot
  take pre-compressed data; the local header is rewritten in place once sizes are known.

The file is written beside its final name and renamed over it only when complete (fileio).
"""

import struct
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gpt2tf import fileio

MEMBER = "arr_0.npy"  # np.savez's name for the first positional array
HEADER_BYTES = 128  # .npy magic + header dict, padded: room for any 1-D length
BLOCK_BYTES = 1 << 22  # ids gathered into blocks of about this size before deflating
MAX_PENDING = 4  # blocks queued for the deflate thread (bounds memory)
LEVEL = 1  # zlib level: most of level 6's size at several times its speed

_ZIP64_EXTRA = struct.Struct("<HHQQ")  # tag 1, size 16, uncompressed size, compressed size
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_VERSION = 45  # zip64
_MAX32 = 0xFFFFFFFF


def npy_header(n: int, dtype: np.dtype = np.dtype("<i4")) -> bytes:
    """A .npy v1.0 header for a 1-D array of `n` items, padded to exactly HEADER_BYTES."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': (%d,), }" % (
        np.lib.format.dtype_to_descr(dtype), n,
    )
    body_len = HEADER_BYTES - 10  # after magic (6), version (2) and the length field (2)
    body = text.ljust(body_len - 1) + "\n"
    if len(body) != body_len:
        raise ValueError(f"a .npy header for {n} items does not fit {HEADER_BYTES} bytes")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body_len) + body.encode("latin-1")


def _stored_block(data: bytes) -> bytes:
    """A non-final deflate stored block holding `data` (starts and ends on a byte boundary)."""
    return b"\x00" + struct.pack("<HH", len(data), 0xFFFF ^ len(data)) + data


def _crc_with_zeros(prefix: bytes, n_zeros: int) -> int:
    crc = zlib.crc32(prefix)
    zeros = bytes(min(n_zeros, 1 << 20))
    while n_zeros > 0:
        step = min(n_zeros, len(zeros))
        crc = zlib.crc32(zeros[:step] if step < len(zeros) else zeros, crc)
        n_zeros -= step
    return crc


def _dos_time(t: float) -> tuple[int, int]:
    lt = time.localtime(t)
    year = max(lt.tm_year, 1980)
    date = (year - 1980) << 9 | lt.tm_mon << 5 | lt.tm_mday
    clock = lt.tm_hour << 11 | lt.tm_min << 5 | lt.tm_sec // 2
    return clock, date


class NpzWriter:
    """Write int32 ids into `path` (an .npz with one array `arr_0`), atomically.

        with NpzWriter(out) as w:
            w.write(ids)          # any number of times
        # out now exists, complete; on an error it is untouched

    Deflating runs on one background thread, in order, at most MAX_PENDING blocks behind.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0  # ids written
        self._name = MEMBER.encode("ascii")
        self._mtime = _dos_time(time.time())

    def __enter__(self) -> "NpzWriter":
        self._atomic = fileio.atomic_open(self.path, "wb")
        self._file = self._atomic.__enter__()
        try:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="npz-deflate")
            self._pending: list[Future] = []
            self._buffer: list[bytes] = []
            self._buffered = 0
            self._zlib = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
            self._crc = zlib.crc32(npy_header(0))  # over the placeholder header, then the ids
            self._data_bytes = 0
            self._compressed = 0
            self._file.write(self._local_header(0, 0, 0))
            self._file.write(_stored_block(npy_header(0)))  # rewritten at the end
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def write(self, ids: np.ndarray) -> None:
        data = np.ascontiguousarray(ids, dtype="<i4").tobytes()
        self.count += len(data) // 4
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= BLOCK_BYTES:
            self._submit()

    def _submit(self) -> None:
        if not self._buffer:
            return
        block = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        self._pending.append(self._pool.submit(self._deflate, block))
        while len(self._pending) > MAX_PENDING or (self._pending and self._pending[0].done()):
            self._pending.pop(0).result()  # re-raises a write error here

    def _deflate(self, block: bytes) -> None:
        # Runs on the deflate thread, one block at a time in submission order.
        self._crc = zlib.crc32(block, self._crc)
        self._data_bytes += len(block)
        out = self._zlib.compress(block)
        self._compressed += len(out)
        self._file.write(out)

    def _finish_stream(self) -> None:
        out = self._zlib.flush(zlib.Z_FINISH)
        self._compressed += len(out)
        self._file.write(out)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._submit()
                self._pending.append(self._pool.submit(self._finish_stream))
            for f in self._pending:
                if exc_type is None:
                    f.result()
                else:
                    f.cancel()
            self._pool.shutdown(wait=True)
            if exc_type is None:
                self._finish_archive()
        except BaseException as e:
            if not self._atomic.__exit__(type(e), e, e.__traceback__):
                raise
            return False
        return self._atomic.__exit__(exc_type, exc, tb)

    def _finish_archive(self) -> None:
        header = npy_header(self.count)
        n = self._data_bytes
        # CRC-32 is affine over GF(2): for equal-length messages crc(a ^ b ^ c) equals
        # crc(a) ^ crc(b) ^ crc(c). With a = placeholder+ids, b = header+zeros and
        # c = placeholder+zeros, a ^ b ^ c = header+ids.
        crc = self._crc ^ _crc_with_zeros(header, n) ^ _crc_with_zeros(npy_header(0), n)
        usize = HEADER_BYTES + n
        csize = len(_stored_block(header)) + self._compressed
        f = self._file
        cd_offset = f.tell()
        f.write(self._central_header(crc, csize, usize))
        cd_size = f.tell() - cd_offset
        end64 = f.tell()
        f.write(_ZIP64_END.pack(
            0x06064B50, _ZIP64_END.size - 12, _VERSION, _VERSION, 0, 0, 1, 1, cd_size, cd_offset,
        ))
        f.write(_ZIP64_LOCATOR.pack(0x07064B50, 0, end64, 1))
        f.write(_END.pack(0x06054B50, 0, 0, 1, 1, min(cd_size, _MAX32), min(cd_offset, _MAX32), 0))
        f.seek(0)
        f.write(self._local_header(crc, csize, usize))
        f.write(_stored_block(header))
        f.seek(0, 2)

    def _local_header(self, crc: int, csize: int, usize: int) -> bytes:
        clock, date = self._mtime
        extra = _ZIP64_EXTRA.pack(1, 16, usize, csize)
        return _LOCAL.pack(
            0x04034B50, _VERSION, 0, zlib.DEFLATED, clock, date, crc, _MAX32, _MAX32,
            len(self._name), len(extra),
        ) + self._name + extra

    def _central_header(self, crc: int, csize: int, usize: int) -> bytes:
        clock, date = self._mtime
        extra = _ZIP64_EXTRA.pack(1, 16, usize, csize)
        return _CENTRAL.pack(
            0x02014B50, 3 << 8 | _VERSION, _VERSION, 0, zlib.DEFLATED, clock, date, crc,
            _MAX32, _MAX32, len(self._name), len(extra), 0, 0, 0, 0o100644 << 16, 0,
        ) + self._name + extra
