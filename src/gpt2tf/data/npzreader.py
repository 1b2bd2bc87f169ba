"""Reading token ids from an .npz (or .npy) without trusting the file: no pickle, bounded memory.

np.load trusts what it reads: it allocates whatever size a .npy header declares (10^12 items is an
`_ArrayMemoryError`, or the kernel's OOM killer), inflates a member whatever it expands to (a
1.5 MB deflate bomb becomes 1.5 GB, and the int32 cast copies it again), and takes any file that
is neither a zip nor a .npy for a pickle. Here each array's declared size is checked against
what its file or archive member holds and against the memory this machine has free, before
anything is allocated; then the ids are read block by block straight into the one int32 array
that is kept, so memory peaks at that array plus one block.
"""

import lzma
import os
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gpt2tf import memory
from gpt2tf.errors import UserError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # an archive's first member; an empty archive
READ_BYTES = 1 << 24  # bytes read (and inflated) at a time
_REENCODE = "re-encode the text with encode.py"
# What a broken archive or stream raises while it is read (lzma and bz2 members included).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError,
                NotImplementedError)


def _first_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(len(NPY_MAGIC))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _not_this_format(path: Path, head: bytes, want: str) -> UserError:
    """The error for a file that is not `want`, saying what it looks like instead."""
    if not head:
        return UserError(f"{path} is empty, not {want}: {_REENCODE}")
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol 2 to 5
        return UserError(f"{path} is a Python pickle, not {want}; refusing to unpickle it"
                         f" (unsafe): {_REENCODE}")
    return UserError(f"{path} is not {want} (it starts with bytes {head.hex(' ')}): the file is"
                     f" corrupt or of another kind; {_REENCODE}")


def read_token_file(path: Path, n_vocab: int) -> list[np.ndarray]:
    """The int32 token arrays of an .npz (each array, in order) or of a .npy (its one array).

    Each must be a 1-D integer array of ids in [0, n_vocab); anything else is a UserError that
    names the file and, in an archive, the array.
    """
    head = _first_bytes(path)
    is_zip, is_npy = head[:4] in ZIP_MAGICS, head.startswith(NPY_MAGIC)
    if path.suffix.lower() == ".npy":
        if is_zip:
            raise UserError(f"{path} is an .npz archive, not a .npy array: rename it to end in"
                            " .npz")
        if not is_npy:
            raise _not_this_format(path, head, "a .npy array")
        try:
            with open(path, "rb") as f:
                return [_read_ids(f, os.fstat(f.fileno()).st_size, str(path), n_vocab)]
        except _READ_ERRORS as e:
            raise UserError(f"cannot read {path} as .npy ({e}): {_REENCODE}") from None
    if is_npy:
        raise UserError(f"{path} is a .npy file, not an .npz; rename it to end in .npy, or save"
                        " the ids with np.savez_compressed")
    if not is_zip:
        raise _not_this_format(path, head, "an .npz, a zip archive of .npy arrays")
    try:
        with zipfile.ZipFile(path) as archive:
            return [_read_member(archive, info, path, n_vocab) for info in archive.infolist()]
    except _READ_ERRORS as e:
        raise UserError(f"{path} is not a complete .npz ({type(e).__name__}: {e}): the file is"
                        f" truncated or corrupt; {_REENCODE}") from None


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path,
                 n_vocab: int) -> np.ndarray:
    name = info.filename.removesuffix(".npy")
    where = f"{path}: array {name!r}"
    if info.flag_bits & 0x1:
        raise UserError(f"{where} is encrypted: save the ids without a password")
    with archive.open(info) as f:
        return _read_ids(f, info.file_size, where, n_vocab)


def _read_ids(f: BinaryIO, size: int, where: str, n_vocab: int) -> np.ndarray:
    """Read one .npy of `size` bytes (as its file or zip member declares) from `f`."""
    head = f.read(len(NPY_MAGIC) + 2)
    if not head.startswith(NPY_MAGIC) or len(head) < len(NPY_MAGIC) + 2:
        raise UserError(f"{where} is not a .npy array: {_REENCODE}")
    version = tuple(head[len(NPY_MAGIC):])
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise UserError(f"{where} is in .npy format {version}, not 1.0 or 2.0: {_REENCODE}")
    # The header is a small dict, read with ast.literal_eval (never unpickled).
    shape, _fortran_order, dtype = read_header(f)
    header_bytes = f.tell()
    if dtype.hasobject:
        raise UserError(f"{where} holds pickled Python objects; refusing to unpickle them"
                        f" (unsafe): {_REENCODE}")
    if len(shape) != 1 or dtype.kind not in "iu":
        raise UserError(f"{where} is {dtype} of shape {shape}; expected a 1-D array of integer"
                        " token ids")
    count = shape[0]
    data_bytes = count * dtype.itemsize
    if data_bytes != size - header_bytes:
        raise UserError(f"{where} declares {count:,} ids ({data_bytes:,} bytes) but holds"
                        f" {max(0, size - header_bytes):,} bytes of data: the file is truncated"
                        f" or corrupt; {_REENCODE}")
    need = count * 4  # the int32 array kept; the file's own dtype is read one block at a time
    have = memory.available_bytes()
    if have is not None and need > have:
        raise UserError(f"{where} declares {count:,} ids, {memory.gib(need)} as int32, but only"
                        f" {memory.gib(have)} of memory is available: free memory, or train on"
                        " a smaller part of the data")
    return _read_blocks(f, count, dtype, where, n_vocab)


def _read_blocks(f: BinaryIO, count: int, dtype: np.dtype, where: str,
                 n_vocab: int) -> np.ndarray:
    ids = np.empty(count, dtype=np.int32)
    step = max(1, READ_BYTES // dtype.itemsize)
    lo, hi = 0, 0  # the smallest and largest id read so far
    for start in range(0, count, step):
        n = min(step, count - start)
        data = f.read(n * dtype.itemsize)  # never more than asked: inflation is bounded here
        if len(data) != n * dtype.itemsize:
            raise UserError(f"{where} ends after {start + len(data) // dtype.itemsize:,} of its"
                            f" {count:,} ids: the file is truncated; {_REENCODE}")
        block = np.frombuffer(data, dtype=dtype)
        block_lo, block_hi = int(block.min()), int(block.max())
        lo, hi = (block_lo, block_hi) if start == 0 else (min(lo, block_lo), max(hi, block_hi))
        ids[start : start + n] = block  # an id past int32 wraps here, but is refused below
    if count and (lo < 0 or hi >= n_vocab):
        raise UserError(f"{where} holds ids in [{lo}, {hi}], outside the vocabulary"
                        f" [0, {n_vocab}): encoded for another model?")
    return ids
