"""Text -> token ids: streamed into an .npz (`encode_to_npz`) or into memory (`load_tokens`).

Long texts are cut only where GPT-2's pre-tokenizer splits anyway (so the ids equal encoding
the whole text at once), and `encode_to_npz` deflates the ids into the .npz while encoding goes
on (gpt2tf.data.npzwriter).

Documents (files, csv rows, jsonl lines) are joined by exactly one `<|endoftext|>` token: none is
added next to a document that already ends or starts with one, and empty documents add nothing.
The .npz holds one int32 array `arr_0`, loadable by nshepperd/gpt-2 and gpt-2-simple.
"""

import contextlib
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from gpt2tf import paths
from gpt2tf.encoder import ENDOFTEXT, Encoder
from gpt2tf.errors import UserError
from gpt2tf.source import ModelSource
from gpt2tf.data.npzreader import read_token_file
from gpt2tf.data.npzwriter import NpzWriter
from gpt2tf.data.documents import (ENCODED_SUFFIXES, file_documents, incremental_decoder,
                                   resolve_paths)

BLOCK_CHARS = 1 << 20  # a long text is encoded in pieces of about this many characters



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
    line_by_line: bool = False,
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
        source = (ModelSource.at(model_dir) if model_dir else
                  ModelSource.resolve(model_name=model_name, models_dir=models_dir))
        encoder = source.encoder
    incremental_decoder(encoding)  # an unknown encoding fails before any work

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
                for doc in file_documents(
                    file, encoding=encoding, column=column, field=field, progress=advance,
                    line_by_line=line_by_line,
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


def load_tokens(
    path: str,
    *,
    encoder: Encoder,
    encoding: str = "utf-8",
    column: int | str = 0,
    field: str = "text",
    line_by_line: bool = False,
) -> list[np.ndarray]:
    """Training data as token chunks: each array of an .npz, and one chunk per run of text files.

    Text of any kind is encoded on the fly (documents joined by one `<|endoftext|>`; with
    `line_by_line` each line of a plain text file is a document). An .npz (or
    .npy) is loaded without pickle and with its declared sizes checked first (npzreader); its
    arrays must be 1-D integers inside the vocabulary.
    """
    chunks: list[np.ndarray] = []
    pending: list[np.ndarray] = []

    def flush_text():
        if pending:
            chunks.append(np.concatenate(pending))
            pending.clear()

    sink = _TokenSink(encoder, pending.append)
    for file in resolve_paths(path):
        if file.suffix.lower() in ENCODED_SUFFIXES:
            flush_text()
            sink = _TokenSink(encoder, pending.append)
            chunks.extend(read_token_file(file, encoder.n_vocab))
            continue
        docs = file_documents(file, encoding=encoding, column=column, field=field, progress=None,
                              line_by_line=line_by_line)
        _encode_documents(docs, encoder, sink)
    flush_text()
    chunks = [c for c in chunks if c.size]
    if not chunks:
        raise UserError(f"dataset {path} is empty: no tokens to train on")
    return chunks


