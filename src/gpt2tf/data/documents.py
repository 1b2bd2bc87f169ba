"""Reading training text: files, folders, globs, .csv and .jsonl -> documents, streamed.

Files are decoded block by block with bounded memory, strictly: a byte that is not valid in
`encoding` is an error naming the file and offset, never dropped.
"""

import codecs
import csv
import fnmatch
import glob
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator


from gpt2tf.encoder import ENDOFTEXT, STARTOFTEXT
from gpt2tf.errors import UserError

READ_BYTES = 1 << 20  # bytes read from a file at a time
ENCODED_SUFFIXES = (".npz", ".npy")  # token ids already: training loads them, encode refuses

ProgressFn = Callable[[int], None]


# --- finding and reading files ----------------------------------------------------------------


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _folder_files(folder: str) -> list[str]:
    """A folder's files, recursively, sorted, hidden ones skipped.

    Symlinked folders inside are not entered: a `self -> .` link would list every file again,
    and two links to each other would never end.
    """
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        found.extend(os.path.join(root, f) for f in files if not _hidden(f))
    # Sorted as paths (part by part), so d/a, d/b/c, d/c: the order documents are encoded in.
    return sorted((p for p in found if os.path.isfile(p)), key=lambda p: Path(p).parts)


def _glob(base: str, parts: list[str]) -> Iterator[str]:
    """The paths under `base` that match the pattern components `parts`, as glob.glob does with
    recursive=True, except that `**` never descends through a symlinked folder (glob's own
    `**` follows them, so link loops repeat files or never end)."""
    if not parts:
        if os.path.lexists(base or "."):
            yield base
        return
    head, rest = parts[0], parts[1:]
    here = base or os.curdir
    if head == "**":
        # Zero or more folders, then the rest of the pattern (a final `**`: each file in them).
        for root, dirs, files in os.walk(here, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not _hidden(d))
            prefix = base if root == here else os.path.join(base, os.path.relpath(root, here))
            if rest:
                yield from _glob(prefix, rest)
            else:
                yield from (os.path.join(prefix, f) for f in sorted(files) if not _hidden(f))
        return
    if not glob.has_magic(head):
        path = os.path.join(base, head)
        if not rest or os.path.isdir(path):
            yield from _glob(path, rest)
        return
    try:
        names = os.listdir(here)
    except OSError:
        return
    if not _hidden(head):
        names = [n for n in names if not _hidden(n)]  # glob's rule: `*` skips hidden names
    for name in sorted(fnmatch.filter(names, head)):
        path = os.path.join(base, name)
        if not rest or os.path.isdir(path):
            yield from _glob(path, rest)


def _expand(pattern: str) -> Iterator[str]:
    if os.path.isabs(pattern):
        base, pattern = os.sep, pattern.lstrip(os.sep)
    else:
        base = ""
    parts = [p for p in pattern.split(os.sep) if p not in ("", ".")]
    return _glob(base, parts)


def _unique(paths: Iterable[str]) -> list[Path]:
    """Each file once, by its resolved path (a symlink to a file read elsewhere is skipped)."""
    seen: set[str] = set()
    out = []
    for p in paths:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append(Path(p))
    return out


def resolve_paths(path: str | os.PathLike) -> list[Path]:
    """The files `path` names: itself, a folder's files (recursive, sorted, not hidden), a glob.

    Each file comes once, however many links or overlapping matches lead to it.
    """
    text = str(path)
    p = Path(text)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = _unique(_folder_files(text))
        if not files:
            raise UserError(f"folder {text} holds no (non-hidden) files to read")
        return files
    found: list[str] = []
    if glob.has_magic(text):
        for m in sorted(set(_expand(text))):
            if os.path.isdir(m):
                found.extend(_folder_files(m))
            elif os.path.isfile(m):
                found.append(m)
    files = _unique(found)
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
    # strict: a quote left open is an error at the end of the file, not the rest of the file
    # silently read as one field (a quoted field may still span lines, as documents do).
    reader = csv.reader(_iter_lines(blocks), strict=True)
    row_start = 1  # the line the row being read starts on
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
        row_start = reader.line_num + 1
        for row in reader:
            name = f"{path}:{row_start}"
            row_start = reader.line_num + 1
            if not row:
                continue  # a blank line
            if not -len(row) <= index < len(row):
                raise UserError(f"{name}: row has {len(row)} columns, no column {column!r}")
            yield name, iter((STARTOFTEXT + row[index] + ENDOFTEXT,))
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise UserError(
                f"{path}:{row_start}: a quoted field in the row that starts here is never closed"
                " (the rest of the file would be one field): close the quote, or write a quote"
                ' inside a quoted field as ""'
            ) from None
        if reader.line_num > row_start:  # the error shows only where a long quoted field ends
            raise UserError(
                f"{path}:{row_start}: bad CSV in the row that starts here, at line"
                f" {reader.line_num} ({e}): is a quote in this row left open?"
            ) from None
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
        except RecursionError:  # json's parser recurses once per level of nesting
            raise UserError(f"{path}:{lineno}: JSON nested too deeply to read: a line should"
                            ' be an object like {"text": "..."}') from None
        if not isinstance(obj, dict) or field not in obj:
            raise UserError(f"{path}:{lineno}: expected a JSON object with a {field!r} field")
        text = obj[field]
        if not isinstance(text, str):
            raise UserError(
                f"{path}:{lineno}: field {field!r} holds {type(text).__name__}, not a string"
            )
        yield f"{path}:{lineno}", iter((text,))


def _line_documents(path: Path, blocks: Iterable[str]) -> Iterator[tuple[str, Iterator[str]]]:
    """--line_by_line: each line of a text file is a document, without its line break; blank
    lines are skipped, as transformers' LineByLineTextDataset does."""
    for lineno, line in enumerate(_iter_lines(blocks), start=1):
        text = line.rstrip("\n").rstrip("\r")
        if text.strip():
            yield f"{path}:{lineno}", iter((text,))


def file_documents(
    path: Path,
    *,
    encoding: str,
    column: int | str,
    field: str,
    progress: ProgressFn | None,
    line_by_line: bool = False,
) -> Iterator[tuple[str, Iterator[str]]]:
    suffix = path.suffix.lower()
    if suffix in ENCODED_SUFFIXES:
        raise UserError(
            f"{path} is already encoded ({suffix}): pass it to training directly, not to encode"
        )
    blocks = read_text_blocks(path, encoding=encoding, progress=progress)
    if suffix == ".csv":
        yield from _csv_documents(path, blocks, column)
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path, blocks, field)
    elif line_by_line:
        yield from _line_documents(path, blocks)
    else:
        yield str(path), blocks


def iter_documents(
    path: str,
    *,
    encoding: str = "utf-8",
    column: int | str = 0,
    field: str = "text",
    progress: ProgressFn | None = None,
    line_by_line: bool = False,
) -> Iterator[tuple[str, Iterator[str]]]:
    """(name, text blocks) of each document under `path`: a file, a folder or a glob.

    A plain text file is one document (with `line_by_line`, each of its non-blank lines is
    one); each row of a .csv (after its header row; `column` by
    index or header name) is one, wrapped as gpt-2-simple does, `<|startoftext|>` + text +
    `<|endoftext|>`; each line of a .jsonl is one (its `field`). Consume each document's blocks
    before moving on to the next.
    """
    for file in resolve_paths(path):
        yield from file_documents(
            file, encoding=encoding, column=column, field=field, progress=progress,
            line_by_line=line_by_line,
        )


