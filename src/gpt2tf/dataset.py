"""Training data: text, folders, globs, .csv, .jsonl -> token ids; .npz in and out; Sampler.

Everything streams with bounded memory: files are decoded block by block (strictly: a byte that is
not valid in `encoding` is an error naming the file and offset, never dropped), long texts are cut
only where GPT-2's pre-tokenizer splits anyway (so the ids equal encoding the whole text at once),
and `encode_to_npz` deflates the ids into the .npz while encoding goes on (gpt2tf.npzwriter).

Documents (files, csv rows, jsonl lines) are joined by exactly one `<|endoftext|>` token: none is
added next to a document that already ends or starts with one, and empty documents add nothing.
The .npz holds one int32 array `arr_0`, loadable by nshepperd/gpt-2 and gpt-2-simple.
"""

import codecs
import contextlib
import csv
import glob
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from gpt2tf import paths
from gpt2tf.encoder import ENDOFTEXT, STARTOFTEXT, Encoder
from gpt2tf.errors import UserError
from gpt2tf.npzwriter import NpzWriter

READ_BYTES = 1 << 20  # bytes read from a file at a time
BLOCK_CHARS = 1 << 20  # a long text is encoded in pieces of about this many characters

ProgressFn = Callable[[int], None]


# --- finding and reading files ----------------------------------------------------------------


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_paths(path: str | os.PathLike) -> list[Path]:
    """The files `path` names: itself, a folder's files (recursive, sorted, not hidden), a glob."""
    text = str(path)
    p = Path(text)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not _is_hidden(f, p))
        if not files:
            raise UserError(f"folder {text} holds no (non-hidden) files to read")
        return files
    matches = sorted(glob.glob(text, recursive=True))
    files: list[Path] = []
    for m in matches:
        mp = Path(m)
        if mp.is_dir():
            files.extend(sorted(f for f in mp.rglob("*") if f.is_file() and not _is_hidden(f, mp)))
        elif mp.is_file():
            files.append(mp)
    if not files:
        if glob.has_magic(text):
            raise UserError(f"no input files match {text!r}")
        raise UserError(f"input {text} not found: give a text file, a folder or a glob")
    return files


def _incremental_decoder(encoding: str):
    try:
        return codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise UserError(
            f"unknown encoding {encoding!r}: use a Python codec name such as utf-8 or latin-1"
        ) from None


def _pending_bytes(decoder) -> int:
    """How many bytes the decoder holds back from earlier input (part of one character)."""
    try:
        state = decoder.getstate()
    except (AttributeError, NotImplementedError):
        return 0
    return len(state[0]) if isinstance(state[0], (bytes, bytearray)) else 0


def read_text_blocks(
    path: str | os.PathLike,
    *,
    encoding: str = "utf-8",
    block_bytes: int | None = None,
    progress: ProgressFn | None = None,
) -> Iterator[str]:
    """Decode a file block by block, strictly; line endings are kept as they are."""
    block_bytes = block_bytes or READ_BYTES
    decoder = _incremental_decoder(encoding)
    offset = 0  # bytes of the file fed to the decoder so far
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        while True:
            try:
                data = f.read(block_bytes)
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror or e}") from None
            pending = _pending_bytes(decoder)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                byte = e.object[e.start : e.start + 1].hex()
                hint = "latin-1" if encoding.lower().replace("_", "-") != "latin-1" else "utf-8"
                raise UserError(
                    f"{path}: byte 0x{byte} at offset {bad} is not valid {encoding} ({e.reason});"
                    f" pass the file's encoding, e.g. --encoding {hint}"
                ) from None
            if progress is not None and data:
                progress(len(data))
            offset += len(data)
            if text:
                yield text
            if not data:
                return


def _iter_lines(blocks: Iterable[str]) -> Iterator[str]:
    """Lines ending in '\\n' (kept); only '\\n' splits, as JSON Lines and csv expect."""
    partial: list[str] = []
    for block in blocks:
        start = 0
        while True:
            end = block.find("\n", start)
            if end < 0:
                if start < len(block):
                    partial.append(block[start:])
                break
            partial.append(block[start : end + 1])
            yield "".join(partial)
            partial = []
            start = end + 1
    if partial:
        yield "".join(partial)


def _csv_documents(
    path: Path, blocks: Iterable[str], column: int | str
) -> Iterator[tuple[str, Iterator[str]]]:
    # One row is one document: lift csv's default 128 KiB limit on a field's size.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.reader(_iter_lines(blocks))
    try:
        header = next(reader, None)
        if header is None:
            return
        if isinstance(column, str) and not column.lstrip("-").isdigit():
            if column not in header:
                raise UserError(f"{path}: no column {column!r} in the header row {header}")
            index = header.index(column)
        else:
            index = int(column)
        for row in reader:
            if not row:
                continue  # a blank line
            if not -len(row) <= index < len(row):
                raise UserError(
                    f"{path}:{reader.line_num}: row has {len(row)} columns, no column {column!r}"
                )
            yield f"{path}:{reader.line_num}", iter((STARTOFTEXT + row[index] + ENDOFTEXT,))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: bad CSV ({e})") from None


def _jsonl_documents(
    path: Path, blocks: Iterable[str], field: str
) -> Iterator[tuple[str, Iterator[str]]]:
    for lineno, line in enumerate(_iter_lines(blocks), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or field not in obj:
            raise UserError(f"{path}:{lineno}: expected a JSON object with a {field!r} field")
        text = obj[field]
        if not isinstance(text, str):
            raise UserError(
                f"{path}:{lineno}: field {field!r} holds {type(text).__name__}, not a string"
            )
        yield f"{path}:{lineno}", iter((text,))


def _file_documents(
    path: Path,
    *,
    encoding: str,
    column: int | str,
    field: str,
    progress: ProgressFn | None,
) -> Iterator[tuple[str, Iterator[str]]]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        raise UserError(
            f"{path} is already encoded (.npz): pass it to training directly, not to encode"
        )
    blocks = read_text_blocks(path, encoding=encoding, progress=progress)
    if suffix == ".csv":
        yield from _csv_documents(path, blocks, column)
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path, blocks, field)
    else:
        yield str(path), blocks


def iter_documents(
    path: str,
    *,
    encoding: str = "utf-8",
    column: int | str = 0,
    field: str = "text",
    progress: ProgressFn | None = None,
) -> Iterator[tuple[str, Iterator[str]]]:
    """(name, text blocks) of each document under `path`: a file, a folder or a glob.

    A plain text file is one document; each row of a .csv (after its header row; `column` by
    index or header name) is one, wrapped as gpt-2-simple does, `<|startoftext|>` + text +
    `<|endoftext|>`; each line of a .jsonl is one (its `field`). Consume each document's blocks
    before moving on to the next.
    """
    for file in resolve_paths(path):
        yield from _file_documents(
            file, encoding=encoding, column=column, field=field, progress=progress
        )


# --- streaming encode -------------------------------------------------------------------------


def _last_cut(text: str, lo: int) -> int | None:
    """The last position p >= lo where GPT-2's pre-tokenizer surely starts a new piece.

    p qualifies when text[p-1] is '\\n' (or, failing that, text[p] is ' ') with non-whitespace
    on both sides: no pattern alternative lets a letter, number or symbol run absorb the newline
    or space, and a lone newline or space before a non-space is never glued to what precedes it.
    str.isspace() is a superset of the regex's \\s, so this errs on the side of not cutting.
    """
    n = len(text)
    lo = max(lo, 2)
    i = text.rfind("\n", lo - 1, n - 1)  # i = p - 1, with p in [lo, n - 1]
    while i >= 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", lo - 1, i)
    i = text.rfind(" ", max(lo, 1), n - 1)  # i = p, with text[p + 1] present
    while i >= 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", max(lo, 1), i)
    return None


def split_blocks(blocks: Iterable[str], min_chars: int | None = None) -> Iterator[str]:
    """Regroup a text's blocks into pieces of about `min_chars` or more, cut only at safe points.

    Encoding the pieces one by one gives exactly the ids of encoding their concatenation. A text
    without any safe point stays one piece.
    """
    min_chars = min_chars or BLOCK_CHARS
    parts: list[str] = []
    size = 0
    context = ""  # the last two characters of `parts`
    for block in blocks:
        if not block:
            continue
        if size + len(block) >= min_chars:
            window = context + block
            cut = _last_cut(window, len(context))
            if cut is not None:
                k = cut - len(context)
                if k:
                    parts.append(block[:k])
                yield "".join(parts)
                parts, size, block = [], 0, block[k:]
                context = window[cut - 2 : cut]
        parts.append(block)
        size += len(block)
        context = (context + block)[-2:]
    if parts:
        yield "".join(parts)


class _TokenSink:
    """Collects ids, placing one end-of-text separator between documents (never two)."""

    def __init__(self, encoder: Encoder, write: Callable[[np.ndarray], None]):
        self.eot = encoder.eot_token
        # Without an <|endoftext|> token the separator is its text, as nshepperd's encoder gives.
        self.sep = encoder.encode_to_numpy(ENDOFTEXT)
        self._write = write
        self.count = 0
        self.documents = 0
        self._last: int | None = None
        self._pending_sep = False

    def start_document(self) -> None:
        self._pending_sep = self.count > 0

    def put(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        if self._pending_sep:
            self._pending_sep = False
            if self.eot is None or (self._last != self.eot and ids[0] != self.eot):
                self._emit(self.sep)
        self._emit(ids)

    def _emit(self, ids: np.ndarray) -> None:
        self._write(ids)
        self.count += len(ids)
        self._last = int(ids[-1])


def _encode_documents(
    documents: Iterable[tuple[str, Iterator[str]]],
    encoder: Encoder,
    sink: _TokenSink,
    *,
    block_chars: int | None = None,
    batch_chars: int | None = None,
) -> None:
    """Encode each document's safe pieces, several at a time (tiktoken spreads them on threads)."""
    block_chars = block_chars or BLOCK_CHARS
    batch_chars = batch_chars or block_chars * max(1, os.cpu_count() or 1)
    batch: list[str | None] = []  # text pieces; None marks the start of a document
    size = 0

    def flush():
        nonlocal batch, size
        encoded = iter(encoder.encode_batch_to_numpy([t for t in batch if t is not None]))
        for item in batch:
            if item is None:
                sink.start_document()
            else:
                sink.put(next(encoded))
        batch, size = [], 0

    for _name, blocks in documents:
        batch.append(None)
        for piece in split_blocks(blocks, block_chars):
            batch.append(piece)
            size += len(piece)
            if size >= batch_chars:
                flush()
        sink.documents += 1
    flush()


# --- .npz output ------------------------------------------------------------------------------


def _check_out_path(out_path: str) -> Path:
    out = Path(out_path)
    if out.suffix.lower() != ".npz":
        raise UserError(f"output {out_path} must end in .npz (np.load reads it as an archive)")
    if out.is_dir():
        raise UserError(f"output {out_path} is a folder; give a file name ending in .npz")
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist: create it first")
    return out


def _total_bytes(files: list[Path]) -> int:
    total = 0
    for f in files:
        with contextlib.suppress(OSError):
            total += f.stat().st_size
    return total


def encode_to_npz(
    in_path: str,
    out_path: str,
    *,
    model_dir: str | os.PathLike | None = None,
    model_name: str = paths.DEFAULT_MODEL_NAME,
    models_dir: str | os.PathLike = paths.DEFAULT_MODELS_DIR,
    encoding: str = "utf-8",
    column: int | str = 0,
    field: str = "text",
    encoder: Encoder | None = None,
    progress: bool = True,
) -> dict:
    """Encode everything under `in_path` into one int32 array `arr_0` in the .npz `out_path`.

    Returns statistics: files, documents, bytes, tokens, seconds. On any error nothing is
    written under `out_path` (an existing file there is left as it was).
    """
    import tqdm

    start = time.perf_counter()
    out = _check_out_path(out_path)
    # Re-running into the input folder must not read the previous output back in.
    files = [f for f in resolve_paths(in_path) if f.resolve() != out.resolve()]
    if not files:
        raise UserError(f"input {in_path} holds no files besides the output {out_path}")
    if encoder is None:
        from gpt2tf.modeldir import load_encoder

        encoder = load_encoder(model_dir or paths.model_path(models_dir, model_name))
    _incremental_decoder(encoding)  # an unknown encoding fails before any work

    # disable=None shows the bar on a terminal only, so logs and captured stderr stay clean.
    bar = tqdm.tqdm(
        total=_total_bytes(files),
        unit="B",
        unit_scale=True,
        desc="encoding",
        disable=None if progress else True,
    )
    n_bytes = 0

    def advance(n: int) -> None:
        nonlocal n_bytes
        n_bytes += n
        bar.update(n)

    try:
        # Ids are deflated into the .npz on a background thread as they come (see npzwriter).
        with NpzWriter(out) as writer:
            sink = _TokenSink(encoder, writer.write)
            documents = (
                doc
                for file in files
                for doc in _file_documents(
                    file, encoding=encoding, column=column, field=field, progress=advance
                )
            )
            _encode_documents(documents, encoder, sink)
            if sink.count == 0:
                raise UserError(f"input {in_path} holds no text to encode")
    except OSError as e:
        bar.leave = False
        raise UserError(f"cannot write {out_path}: {e.strerror or e}") from None
    except BaseException:
        bar.leave = False  # the error message alone, not a half-filled bar above it
        raise
    finally:
        bar.close()
    return {
        "files": len(files),
        "documents": sink.documents,
        "bytes": n_bytes,
        "tokens": sink.count,
        "seconds": time.perf_counter() - start,
        "out_path": str(out),
    }


# --- loading training data --------------------------------------------------------------------


def _load_npz(path: Path, n_vocab: int) -> list[np.ndarray]:
    chunks = []
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise UserError(f"{path} is a .npy array, not an .npz archive")
            for name in npz.files:
                arr = npz[name]
                if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                    raise UserError(
                        f"{path}: array {name!r} is {arr.dtype} of shape {arr.shape};"
                        " expected a 1-D array of integer token ids"
                    )
                if arr.size and (arr.min() < 0 or arr.max() >= n_vocab):
                    raise UserError(
                        f"{path}: array {name!r} holds ids in [{arr.min()}, {arr.max()}],"
                        f" outside the vocabulary [0, {n_vocab}): encoded for another model?"
                    )
                chunks.append(arr.astype(np.int32))
    except UserError:
        raise
    except ValueError as e:
        if "pickle" in str(e):
            raise UserError(
                f"{path} holds pickled Python objects; refusing to unpickle them (unsafe):"
                " re-encode the text with encode.py"
            ) from None
        raise UserError(f"{path} is not a valid .npz of token ids ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {path} as .npz ({e})") from None
    return chunks


def load_tokens(
    path: str,
    *,
    encoder: Encoder,
    encoding: str = "utf-8",
    column: int | str = 0,
    field: str = "text",
) -> list[np.ndarray]:
    """Training data as token chunks: each array of an .npz, and one chunk per run of text files.

    Text of any kind is encoded on the fly (documents joined by one `<|endoftext|>`). An .npz is
    loaded without pickle; its arrays must be 1-D integers inside the vocabulary.
    """
    chunks: list[np.ndarray] = []
    pending: list[np.ndarray] = []

    def flush_text():
        if pending:
            chunks.append(np.concatenate(pending))
            pending.clear()

    sink = _TokenSink(encoder, pending.append)
    for file in resolve_paths(path):
        if file.suffix.lower() == ".npz":
            flush_text()
            sink = _TokenSink(encoder, pending.append)
            chunks.extend(_load_npz(file, encoder.n_vocab))
            continue
        docs = _file_documents(file, encoding=encoding, column=column, field=field, progress=None)
        _encode_documents(docs, encoder, sink)
    flush_text()
    chunks = [c for c in chunks if c.size]
    if not chunks:
        raise UserError(f"dataset {path} is empty: no tokens to train on")
    return chunks


# --- sampling ---------------------------------------------------------------------------------


def split_tokens(
    chunks: list[np.ndarray], val_fraction: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, val): the last `val_fraction` of all tokens held out, in chunk order."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    total = sum(len(c) for c in chunks)
    n_val = int(round(total * float(val_fraction)))
    if n_val < 1 or n_val >= total:
        raise UserError(
            f"val_fraction={val_fraction} of {total} tokens leaves no training or no"
            " validation data"
        )
    train, val = list(chunks), []
    need = n_val
    while need:
        last = train.pop()
        if len(last) <= need:
            val.insert(0, last)
            need -= len(last)
        else:
            train.append(last[: len(last) - need])
            val.insert(0, last[len(last) - need :])
            need = 0
    return train, val


class Sampler:
    """Fair random windows over token chunks (nshepperd's Sampler, without rejection sampling).

    Every start position whose window fits inside its chunk is equally likely, as if sampling
    from one concatenated array without crossing chunk boundaries. The random state round-trips
    through `state_dict()` (plain JSON) so a resumed run sees the same data stream.
    """

    def __init__(self, chunks: list[np.ndarray], seed: int | None = None):
        self.chunks = [np.asarray(c) for c in chunks]
        self.seed = seed
        self.total_size = sum(len(c) for c in self.chunks)
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._starts_for: tuple[int, np.ndarray] | None = None

    def _cumulative_starts(self, length: int) -> np.ndarray:
        if length < 1:
            raise UserError(f"window length must be at least 1, got {length}")
        if self._starts_for is None or self._starts_for[0] != length:
            counts = np.array([max(0, len(c) - length + 1) for c in self.chunks], dtype=np.int64)
            self._starts_for = (length, np.cumsum(counts))
        cum = self._starts_for[1]
        if not len(cum) or cum[-1] == 0:
            longest = max((len(c) for c in self.chunks), default=0)
            raise UserError(
                f"dataset has {self.total_size} tokens (longest piece {longest}), need at least"
                f" {length} in one piece for a window of {length} tokens: add text or use a"
                " shorter window (--seq_len)"
            )
        return cum

    def _window(self, cum: np.ndarray, index: int, length: int) -> np.ndarray:
        i = int(np.searchsorted(cum, index, side="right"))
        start = index - (int(cum[i - 1]) if i else 0)
        return self.chunks[i][start : start + length]

    def sample(self, length: int) -> np.ndarray:
        """One window of `length` consecutive tokens (a copy, int32)."""
        cum = self._cumulative_starts(length)
        index = int(self._rng.integers(cum[-1]))
        return np.array(self._window(cum, index, length), dtype=np.int32)

    def sample_batch(self, batch_size: int, length: int) -> np.ndarray:
        """[batch_size, length] windows, drawn one after another as sample() does."""
        return np.stack([self.sample(length) for _ in range(batch_size)])

    def fixed_windows(self, length: int, count: int, seed: int = 0) -> np.ndarray:
        """[count, length] windows fixed by the data and `seed` alone: a stable validation set."""
        cum = self._cumulative_starts(length)
        rng = np.random.Generator(np.random.PCG64(seed))
        idx = rng.integers(cum[-1], size=count)
        return np.stack([self._window(cum, int(i), length) for i in idx]).astype(np.int32)

    def split(self, val_fraction: float) -> tuple["Sampler", "Sampler"]:
        """(train, val) samplers over the first and the last `val_fraction` of the tokens."""
        train, val = split_tokens(self.chunks, val_fraction)
        return Sampler(train, seed=self.seed), Sampler(val, seed=self.seed)

    def state_dict(self) -> dict:
        """The random state as plain JSON types."""
        return {
            "version": 1,
            "total_size": self.total_size,
            "bit_generator": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the random stream where `state_dict()` left it."""
        try:
            bit_state = state["bit_generator"]
            bit_generator = np.random.PCG64()
            bit_generator.state = bit_state
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"bad sampler state ({type(e).__name__}: {e})") from None
        self._rng = np.random.Generator(bit_generator)
