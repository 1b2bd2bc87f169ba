"""Reading training text: files, folders, globs, .csv and .jsonl -> documents, streamed.

Files are decoded block by block with bounded memory, strictly: a byte that is not valid in
`encoding` is an error naming the file and offset, never dropped.
"""

import codecs
import csv
import glob
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator


from gpt2tf.encoder import ENDOFTEXT, STARTOFTEXT
from gpt2tf.errors import UserError

READ_BYTES = 1 << 20  # bytes read from a file at a time

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


def incremental_decoder(encoding: str):
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
    decoder = incremental_decoder(encoding)
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
            except UnicodeError as e:  # e.g. utf-16 without a byte-order mark
                raise UserError(f"{path} cannot be read as {encoding} ({e}); pass the file's"
                                " encoding, e.g. --encoding utf-16-le") from None
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


def file_documents(
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
        yield from file_documents(
            file, encoding=encoding, column=column, field=field, progress=progress
        )


