"""Atomic file writes: a file under its final name is always complete.

Every write that matters goes to a temporary file in the same folder, is flushed and fsynced,
then renamed over the final name (rename is atomic on POSIX within one filesystem). A crash or
a full disk leaves the old file, never a half-written one.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from gpt2tf.errors import UserError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temp file beside `path`; on success fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file owner-only; give it the permissions open() would have.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new empty folder next to `path`, to fill and then rename over it (normal permissions)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def publish_dir(path: str | os.PathLike, *, make_parents: bool = False) -> Iterator[Path]:
    """Fill a new folder that appears under `path` only when complete.

    Yields an empty temporary sibling; on success it is renamed to `path` (replacing an empty
    folder there: rename(2) does that atomically), on any error it is removed. An existing
    non-empty `path` is refused before anything is written, so a user's folder is never touched.
    """
    path = Path(path)
    check_new_dir(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise UserError(f"parent folder {path.parent} does not exist: create it first")
    tmp = temp_dir_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)  # fails, rightly, if something appeared in `path` meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def check_new_dir(path: Path) -> None:
    """Refuse a path that holds anything: only an absent or empty folder may be published."""
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise UserError(f"{path} already exists: choose a new directory or remove it first")


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable: fsync the directory entry (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path`, or its nearest existing ancestor: where a folder about to be made would live."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem of `path`, or of its
    nearest existing ancestor (None where that cannot be told)."""
    path = nearest_existing(path)
    try:
        return shutil.disk_usage(path).free  # statvfs f_bavail: what is left for non-root
    except OSError:
        return None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
