"""Download OpenAI's released GPT-2 checkpoints into models/<name>/, resumably and verifiably.

Each of the seven files streams into `<file>.part` and is renamed to its real name only once its
size matches what the server announced, so a file under its final name is always complete. An
interrupted download resumes from the .part with an HTTP Range request, complete files are
skipped, and every HTTP or network failure is a one-line UserError that names the URL.
(gpt-2-simple and openai's script wrote in place with no status check, so an XML error page or a
half file could pass as a checkpoint.) No TensorFlow here: downloading must stay cheap.
"""

import os
import re
from pathlib import Path

import requests
from tqdm import tqdm

from gpt2tf import __version__, paths
from gpt2tf.errors import UserError
from gpt2tf.fileio import fsync_dir
from gpt2tf.hparams import HParams

PART_SUFFIX = ".part"
# (connect, read) seconds: a dead server fails fast, a slow but live one is not cut off.
TIMEOUT = (30, 60)
# Small enough that a dropped connection loses little (urllib3 discards a short final read), big
# enough that the Python loop is not the bottleneck on a 6 GB file.
CHUNK_SIZE = 1 << 16

# Where the URL comes from besides the flag (make demo passes only the environment variable).
_MIRROR = f" (or ${paths.BASE_URL_ENV})"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


class _Restart(Exception):
    """Internal: the resume request failed in a way that a fresh download from byte 0 fixes."""


def download_model(
    model_name: str,
    *,
    models_dir: str | os.PathLike = paths.DEFAULT_MODELS_DIR,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Download (or finish downloading) one released model; return its directory.

    `model_name` is 124M, 355M, 774M or 1558M (117M and 345M are accepted as their old names and
    land in the new name's folder, the only one OpenAI's storage still serves). `base_url`, else
    $GPT2_BASE_URL, else OpenAI's storage, is the part of each URL before `/models/`.
    """
    name = paths.canonical_model_name(model_name)
    base = _base_url(base_url)
    model_dir = Path(models_dir) / name
    # Folders this call creates, innermost first, so a failure before any file leaves none.
    created = [d for d in (model_dir, *model_dir.parents) if not d.exists()]
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {model_dir}: {e}") from None
    try:
        with requests.Session() as session:
            # identity: Content-Length must count the bytes we store, not gzip-encoded ones.
            session.headers.update(
                {"User-Agent": f"gpt2tf/{__version__}", "Accept-Encoding": "identity"}
            )
            for filename in paths.MODEL_FILES:
                url = f"{base}/models/{name}/{filename}"
                _fetch(session, url, model_dir / filename, progress=progress)
    except UserError:
        # Leave no empty folder behind when nothing could be fetched (bad URL, offline).
        for folder in created:
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
        raise
    _check_model_dir(model_dir)
    return model_dir


def is_gpt2_downloaded(
    model_dir: str | os.PathLike = paths.DEFAULT_MODELS_DIR,
    model_name: str = paths.DEFAULT_MODEL_NAME,
) -> bool:
    """gpt-2-simple's check: all seven files present in <model_dir>/<model_name>/, none unfinished.

    Unlike gpt-2-simple's, a leftover `.part` means an unfinished download, so the answer is False.
    """
    folder = paths.model_path(model_dir, model_name)
    return all(
        (folder / f).is_file() and not (folder / (f + PART_SUFFIX)).exists()
        for f in paths.MODEL_FILES
    )


def _base_url(base_url: str | None) -> str:
    base = base_url or os.environ.get(paths.BASE_URL_ENV) or paths.DEFAULT_BASE_URL
    return str(base).rstrip("/")


def _fetch(session: requests.Session, url: str, dest: Path, *, progress: bool) -> None:
    """Make `dest` a complete copy of `url`: skip it, resume its .part, or download it whole."""
    part = dest.with_name(dest.name + PART_SUFFIX)
    if dest.is_file():
        size = _remote_size(session, url)
        # Offline or a server without sizes: trust the file rather than fail or re-fetch it.
        if size is None or dest.stat().st_size == size:
            if size is not None and part.exists():
                part.unlink()  # a stale .part from an older attempt; dest is verified
            return
        # Wrong size: fetch a fresh copy into .part; dest is only replaced once that is complete.
    offset = part.stat().st_size if part.is_file() else 0
    try:
        total = _stream(session, url, part, offset=offset, progress=progress)
    except _Restart:
        # The server could not honour our Range: ask for the whole file instead.
        try:
            total = _stream(session, url, part, offset=0, progress=progress)
        except _Restart:
            raise UserError(
                f"{url} answered a plain request with a partial range (HTTP 206): check --base_url{_MIRROR}"
            ) from None
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:
            part.unlink()  # not a prefix of the real file: resuming it would corrupt the result
            raise UserError(
                f"{url} sent {size} bytes but announced {total}: deleted {part}, re-run to retry"
            )
        raise UserError(
            f"{url} stopped at {size} of {total} bytes: re-run the same command to resume"
        )
    os.replace(part, dest)
    fsync_dir(dest.parent)


def _stream(
    session: requests.Session, url: str, part: Path, *, offset: int, progress: bool
) -> int | None:
    """Append the rest of `url` to `part` from `offset`.

    Returns the file's full size (None when the server does not say). Raises _Restart when the
    caller must ask again from byte 0 because the server could not honour the Range.
    """
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=TIMEOUT)
    except requests.RequestException as e:
        raise UserError(
            f"cannot reach {url} ({_connect_error(e)}): check the network or --base_url{_MIRROR}, then"
            " re-run to resume"
        ) from None
    with resp:
        if resp.status_code == 416 and offset:
            # Range starts at or past the end: the .part may already hold the whole file.
            total = _int_match(_UNSATISFIED_RANGE, resp.headers.get("Content-Range"))
            if total is None:
                total = _remote_size(session, url)
            if total == offset:
                _fsync_file(part)
                return total
            part.unlink()  # longer than the file, or a size we cannot confirm: start over
            raise _Restart
        _raise_for_status(resp, url)
        if resp.status_code == 206:
            match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != offset:
                raise _Restart  # a range we did not ask for: appending it would corrupt the file
            total = None if match.group(3) == "*" else int(match.group(3))
        else:
            offset = 0  # 200 to a Range request: the server sends the whole file again
            total = _content_length(resp)
        _write_body(resp, url, part, offset=offset, total=total, progress=progress)
    return total


def _write_body(
    resp: requests.Response, url: str, part: Path, *, offset: int, total: int | None, progress: bool
) -> None:
    mode = "ab" if offset else "wb"
    try:
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=offset,
                desc=part.name[: -len(PART_SUFFIX)],
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
            ) as bar,
        ):
            try:
                for chunk in resp.iter_content(CHUNK_SIZE):
                    f.write(chunk)
                    bar.update(len(chunk))  # bytes received, not the nominal chunk size
            except requests.RequestException as e:
                of_total = f" of {total}" if total is not None else ""
                raise UserError(
                    f"download of {url} broke off at {f.tell()}{of_total} bytes"
                    f" ({_body_error(e)}): re-run the same command to resume"
                ) from None
            f.flush()
            os.fsync(f.fileno())  # the rename that follows must not publish unwritten data
    except OSError as e:
        raise UserError(f"cannot write {part}: {e}") from None


def _remote_size(session: requests.Session, url: str) -> int | None:
    """The server's size for `url` from a HEAD request; None when it cannot tell us."""
    try:
        resp = session.head(url, timeout=TIMEOUT, allow_redirects=True)
    except requests.RequestException:
        return None
    with resp:
        return _content_length(resp) if resp.status_code == 200 else None


def _raise_for_status(resp: requests.Response, url: str) -> None:
    code = resp.status_code
    if code in (200, 206):
        return
    if code == 404:
        raise UserError(f"{url} not found (HTTP 404): check the model name or --base_url{_MIRROR}")
    if code in (401, 403):
        raise UserError(f"{url} refused (HTTP {code}): check --base_url{_MIRROR}")
    if code >= 500:
        raise UserError(f"{url} failed (HTTP {code}): server error, re-run later to resume")
    raise UserError(f"{url} failed (HTTP {code} {resp.reason}): check --base_url{_MIRROR}")


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


def _int_match(pattern: re.Pattern, value: str | None) -> int | None:
    match = pattern.fullmatch((value or "").strip())
    return int(match.group(1)) if match else None


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _connect_error(e: requests.RequestException) -> str:
    # requests nests pool and socket errors several reprs deep; the OS error is what helps.
    match = re.search(r"\[Errno -?\d+\][^'\")]*", str(e))
    if match:
        return match.group(0).strip()
    if isinstance(e, requests.Timeout):
        return "timed out"
    return _one_line(e)


def _body_error(e: requests.RequestException) -> str:
    # urllib3's own text repeats a nested tuple of IncompleteRead reprs: name the cause instead.
    if "timed out" in str(e).lower():
        return "read timed out"
    if isinstance(e, (requests.exceptions.ChunkedEncodingError, requests.ConnectionError)):
        return "connection lost"
    return _one_line(e)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_model_dir(model_dir: Path) -> None:
    """Catch a wrong server early: the files must be GPT-2 hparams and OpenAI's checkpoint."""
    hparams_file = model_dir / paths.HPARAMS
    try:
        HParams.from_json(hparams_file)
    except UserError as e:
        raise UserError(
            f"downloaded {paths.HPARAMS} is not GPT-2's ({e}); check --base_url, then delete"
            f" {hparams_file} and re-run"
        ) from None
    state_file = model_dir / paths.CKPT_STATE
    try:
        text = state_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {state_file}: {e}") from None
    match = re.search(r'^model_checkpoint_path:\s*"([^"]*)"', text, re.MULTILINE)
    named = match.group(1) if match else None
    if named is None or Path(named).name != paths.CKPT_PREFIX:
        raise UserError(
            f"{state_file} names checkpoint {named!r}, expected {paths.CKPT_PREFIX!r}; check"
            f" --base_url, then delete {state_file} and re-run"
        )
