"""Remote storage: --models_dir, --dataset/--val_dataset and --checkpoint_dir given as URLs of
TensorFlow's file systems (tf.io.gfile), met by local copies.

A URL is `scheme://...`; anything else is a local path and never comes here. The schemes are
the ones tf.io.gfile has registered: gs:// (and ram://, in-process memory) are built into
TensorFlow; s3://, hdfs:// and az:// come with tensorflow-io (`pip install tensorflow-io`,
imported here when a URL needs it). Any other scheme is a FieldError that names the setting,
raised before any work.

The rest of the toolkit reads and writes local files only, so:

- An input (a model folder under --models_dir, a --dataset file, folder or glob) is staged
  into the cache ($GPT2TF_CACHE_DIR, else ~/.cache/gpt2tf, under remote/): each file is
  downloaded to a temporary name and renamed, so a staged file is always whole. A file is
  fetched again when the remote one's size differs or it is newer; staged files the remote no
  longer has are removed.
- A run at <checkpoint_dir>/<run_name> trains in a local working copy (`RunMirror`). At the
  start the remote run replaces the working copy (the remote is the truth, whatever a crashed
  process left locally): its small files and the checkpoints its `checkpoint` file records.
  Every worker of a data-parallel run downloads its own copy of what it restores. After each
  save of the chief, committed locally as gpt2tf.train.run_state describes, the upload repeats
  that order:
    1. the new checkpoint's files (data, index, side state), then every other file that
       changed (hparams, vocabulary, train_config.json, metrics.jsonl, TensorBoard events);
    2. the `checkpoint` state file: the remote commit point;
    3. counter and best.json (written after the commit point locally too);
    4. only then the remote files the working copy no longer has are deleted: checkpoints
       pruned by --max_checkpoints, an overwritten run's, half-uploaded leftovers.
  A crash or an upload error before 2 leaves the remote `checkpoint` naming the previous
  checkpoint, complete, since nothing is deleted before 4. A resumed run continues from it and
  its next commit deletes what the interrupted upload left. (With --overwrite, a checkpoint
  name the remote `checkpoint` still records is first copied aside to model-replaced-<step>,
  and `checkpoint` pointed there, as run_state does locally.) A run is downloaded whole each
  time, never trusted from an earlier copy; the local disk needs room for it, and the cache
  keeps the last copy (gpt2tf.finetune loads it), which may be deleted at any time. Periodic
  samples (--samples_dir) stay local.

Each file is uploaded all or nothing:
- file systems with an atomic rename (hdfs://, file://, ram://): written to a hidden temporary
  name beside it, then renamed over the final name with tf.io.gfile.rename;
- object stores (gs://, s3://, az://) have no atomic rename (TensorFlow copies, then deletes),
  but they publish a written object only when its upload completes, whole: there a file is
  written under its final name directly, so a reader sees the old `checkpoint` or the new one.
"""

import contextlib
import dataclasses
import glob
import hashlib
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

from gpt2tf import fileio, paths
from gpt2tf.errors import FieldError, UserError
from gpt2tf.quiet import import_tensorflow

log = logging.getLogger(__name__)

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
OBJECT_STORES = ("gs", "s3", "az")  # an object appears whole when written; rename is a copy
NEEDS_TENSORFLOW_IO = ("s3", "hdfs", "az")
DATA_SETTINGS = ("dataset", "val_dataset")  # TrainConfig's inputs that may be URLs
_UPLOAD_TEMP = re.compile(r"^\..+\.[0-9a-f]{16}\.part$")  # what an interrupted upload leaves
_STEPPED = re.compile(r"-\d+$")  # a run's checkpoint name (model-<step>), not a model's


def is_url(path) -> bool:
    """A URL (scheme://...), not a local path."""
    return isinstance(path, str) and URL.match(path) is not None


def _tf():
    import_tensorflow()  # quietly: this may be the first use of TensorFlow
    import tensorflow as tf

    return tf


def _join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def _first_line(e: BaseException) -> str:
    msg = str(getattr(e, "message", None) or getattr(e, "strerror", None) or e)
    return msg.splitlines()[0] if msg else type(e).__name__


def check_url(field: str, url: str) -> str:
    """`url`, if TensorFlow has a file system for its scheme here; else a FieldError."""
    tf = _tf()
    scheme = URL.match(url).group(1)
    schemes = set(tf.io.gfile.get_registered_schemes())
    if scheme not in schemes and scheme in NEEDS_TENSORFLOW_IO:
        with contextlib.suppress(ImportError, tf.errors.OpError):
            import tensorflow_io  # noqa: F401  (registers s3://, hdfs://, az://)
        schemes = set(tf.io.gfile.get_registered_schemes())
    if scheme not in schemes:
        have = ", ".join(f"{s}://" for s in sorted(schemes) if s)
        raise FieldError(field, f"{url}: TensorFlow has no file system for {scheme}:// here"
                         f" (it has {have}; s3://, hdfs:// and az:// need `pip install"
                         " tensorflow-io`); give a supported URL or a local folder")
    if any(part in (".", "..") for part in url[URL.match(url).end():].split("/")):
        raise FieldError(field, f"{url}: a URL here may not hold '.' or '..' folders")
    return url


def check_urls(**values) -> None:
    """check_url for each setting (name=value) whose value is a URL."""
    for field, value in values.items():
        if is_url(value):
            check_url(field, value)


@contextlib.contextmanager
def _io(what: str):
    """A file system error inside becomes a UserError: `what` failed, and why."""
    tf = _tf()
    try:
        yield
    except (tf.errors.OpError, OSError) as e:
        raise UserError(f"{what} ({type(e).__name__}: {_first_line(e)})") from None


def _cache(kind: str, url: str) -> Path:
    """A cache folder of its own for each remote folder or file."""
    key = hashlib.sha256(url.rstrip("/").encode("utf-8")).hexdigest()[:16]
    return paths.cache_root() / "remote" / kind / key


def _files(url: str) -> list[str]:
    """The names of the files in a remote folder (not its subfolders; no hidden names)."""
    g = _tf().io.gfile
    top = next(iter(g.walk(url)), None)
    return sorted(f.rstrip("/") for f in (top[2] if top else []) if not f.startswith("."))


def _tree(url: str) -> list[str]:
    """The URLs of every file under a remote folder, hidden names left out."""
    g = _tf().io.gfile
    out = []
    for top, dirs, files in g.walk(url):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # walk honours the edit
        out += [_join(top, f) for f in files if not f.startswith(".")]
    return sorted(out)


# --- downloads --------------------------------------------------------------------------------


def download(url: str, local: Path, *, if_changed: bool = False) -> None:
    """Copy one remote file to `local`, which appears only when complete. With `if_changed`, a
    local copy of the same size that is not older than the remote file is kept."""
    g = _tf().io.gfile
    local = Path(local)
    if if_changed and local.is_file():
        st, have = g.stat(url), local.stat()
        if st.length == have.st_size and st.mtime_nsec <= have.st_mtime_ns:
            return
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{secrets.token_hex(8)}.part")
    try:
        g.copy(url, str(tmp), overwrite=True)
        fileio.fsync_file(tmp)
        os.replace(tmp, local)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_unlisted(root: Path, keep: set[Path], *, hidden_dirs: bool = True) -> None:
    """Delete the files under `root` that are not in `keep` (a staged copy's stale files);
    hidden folders (a decode cache beside a checkpoint) stay when `hidden_dirs`."""
    if not root.is_dir():
        return
    for top, dirs, files in os.walk(root):
        if hidden_dirs:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            path = Path(top) / f
            if path not in keep:
                path.unlink(missing_ok=True)


def stage_input(field: str, url: str) -> str:
    """A local path standing for `url` (a file, a folder or a glob), its files staged."""
    check_url(field, url)
    g = _tf().io.gfile
    area = _cache("inputs", url)

    def local_of(u: str) -> Path:
        return area.joinpath(*[p for p in u[URL.match(u).end():].split("/") if p])

    with _io(f"cannot read {url}"):
        if g.isdir(url):
            found = _tree(url)
        elif g.exists(url):
            found = [url]
        elif glob.has_magic(url):
            found = sorted({f for m in g.glob(url) for f in (_tree(m) if g.isdir(m) else [m])})
        else:
            found = None
        if found is None:
            raise FieldError(field, f"{url} not found: give a file, a folder or a glob there")
        staged = {local_of(u): u for u in found}
        for local, remote in staged.items():
            download(remote, local, if_changed=True)
    _remove_unlisted(area, set(staged), hidden_dirs=False)
    log.info("staged %s (%d file%s) in %s", url, len(staged), "s"[:len(staged) != 1],
             local_of(url))
    return str(local_of(url))


def stage_data(cfg):
    """A TrainConfig whose URL inputs (--dataset, --val_dataset) are local staged copies;
    `cfg` itself when it has none."""
    changes = {name: stage_input(name, getattr(cfg, name)) for name in DATA_SETTINGS
               if is_url(getattr(cfg, name))}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def stage_models(models_dir: str, model_name: str) -> Path:
    """A local models folder holding <models_dir>/<model_name> staged (its files, as a model
    folder has no subfolders); a UserError if the remote has no such folder."""
    check_url("models_dir", models_dir)
    g = _tf().io.gfile
    name = str(model_name)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise FieldError("model_name", f"{name!r} is not a folder name")
    area = _cache("models", models_dir)
    with _io(f"cannot read {models_dir}"):
        # Old-name folders made by older tools still load, as paths.model_path does locally.
        found = [c for c in dict.fromkeys((paths.MODEL_ALIASES.get(name, name), name))
                 if g.isdir(_join(models_dir, c))]
        if not found:
            canonical = paths.MODEL_ALIASES.get(name, name)
            raise UserError(
                f"model directory {_join(models_dir, canonical)} not found: upload a model"
                f" folder there (such as one `python download_model.py {canonical}` makes) or"
                " pass the right --models_dir/--model_name")
        folder = found[0]
        names = _files(_join(models_dir, folder))
        for f in names:
            download(_join(models_dir, folder, f), area / folder / f, if_changed=True)
    _remove_unlisted(area / folder, {area / folder / f for f in names})
    return area


# --- runs -------------------------------------------------------------------------------------


def upload(source: "Path | str", url: str, *, direct: bool) -> None:
    """Copy one file (local, or a URL on the same file system) to `url`, all or nothing (see
    the module doc): `direct` on object stores, else to a hidden temporary name renamed over
    `url`. (A fresh name also because ram:// appends to a file opened again for writing.)"""
    g = _tf().io.gfile
    if direct:
        g.copy(str(source), url, overwrite=True)
        return
    head, name = url.rsplit("/", 1)
    tmp = f"{head}/.{name}.{secrets.token_hex(8)}.part"
    g.copy(str(source), tmp, overwrite=True)
    g.rename(tmp, url, overwrite=True)


def _recorded(folder: Path) -> tuple[str | None, list[str]]:
    """(latest, every recorded) checkpoint name in a local folder's `checkpoint` file."""
    latest, recorded = paths.checkpoint_state(folder)
    if latest is None:
        return None, []
    latest = os.path.basename(latest)
    return latest, list(dict.fromkeys([os.path.basename(p) for p in recorded] + [latest]))


class RunMirror:
    """A run folder at a URL and its local working copy (see the module doc)."""

    def __init__(self, url: str, local: Path):
        self.url = url
        self.local = Path(local)
        self.direct = URL.match(url).group(1) in OBJECT_STORES
        # local name -> (size, mtime_ns) of the file the remote holds, as downloaded/uploaded
        self.synced: dict[str, tuple[int, int]] = {}
        self.latest: str | None = None  # what the remote `checkpoint` names, and records
        self.recorded: list[str] = []

    @classmethod
    def pull(cls, checkpoint_dir: str, run_name: str, *, copy: str = "train") -> "RunMirror":
        """The run <checkpoint_dir>/<run_name> downloaded into a fresh local copy (none if the
        remote has no such run). `copy` names the copy: one per worker, and one to read."""
        check_url("checkpoint_dir", checkpoint_dir)
        name = paths.check_run_name(run_name)
        url = _join(checkpoint_dir, name)
        mirror = cls(url, _cache("runs", url) / copy / name)
        mirror.local.parent.mkdir(parents=True, exist_ok=True)
        for left in mirror.local.parent.glob(f".{name}.*"):  # by a pull that was killed
            shutil.rmtree(left, ignore_errors=True)
        g = _tf().io.gfile
        tmp = fileio.temp_dir_beside(mirror.local)
        try:
            with _io(f"cannot download the run {url}"):
                exists = g.isdir(url)
                if exists:
                    mirror._download(tmp)
            old = mirror.local.with_name(f".{name}.{secrets.token_hex(8)}.old")
            if mirror.local.exists():
                os.replace(mirror.local, old)
            if exists:
                os.replace(tmp, mirror.local)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return mirror

    def _download(self, into: Path) -> None:
        names = _files(self.url)
        if paths.CKPT_STATE in names:
            download(_join(self.url, paths.CKPT_STATE), into / paths.CKPT_STATE)
            self.latest, self.recorded = _recorded(into)
        for n in names:
            m = paths.CHECKPOINT_FILE.match(n)
            if m and m.group(1) not in self.recorded and _STEPPED.search(m.group(1)):
                continue  # pruned or half-uploaded: the next commit deletes it remotely
            if n != paths.CKPT_STATE:
                download(_join(self.url, n), into / n)
            st = (into / n).stat()
            self.synced[n] = (st.st_size, st.st_mtime_ns)
        log.info("downloaded %s (latest checkpoint %s) to %s", self.url, self.latest,
                 self.local)

    def attach(self, run_checkpoints) -> None:
        """Upload after each save of a gpt2tf.train.run_state.RunCheckpoints."""
        run_checkpoints.after_save.append(self.push)

    def _local_files(self) -> list[str]:
        return sorted(f.name for f in self.local.iterdir()
                      if f.is_file() and not f.name.startswith("."))

    def _changed(self, name: str) -> bool:
        st = (self.local / name).stat()
        return self.synced.get(name) != (st.st_size, st.st_mtime_ns)

    def _put(self, name: str) -> None:
        st = (self.local / name).stat()
        upload(self.local / name, _join(self.url, name), direct=self.direct)
        self.synced[name] = (st.st_size, st.st_mtime_ns)

    def push(self) -> None:
        """Upload what the last local save changed, and commit it remotely (module doc)."""
        g = _tf().io.gfile
        names = self._local_files()
        changed = [n for n in names if self._changed(n)]
        ckpt = [n for n in changed if paths.CHECKPOINT_FILE.match(n)]
        after = [n for n in (paths.COUNTER, paths.BEST) if n in changed]
        first = ckpt + [n for n in changed
                        if n not in ckpt and n not in after and n != paths.CKPT_STATE]
        latest, recorded = _recorded(self.local)
        with self._uploading():
            g.makedirs(self.url)
            self._move_aside({paths.CHECKPOINT_FILE.match(n).group(1) for n in ckpt})
            for n in first:
                self._put(n)
            self._put(paths.CKPT_STATE)  # the commit point
            self.latest, self.recorded = latest, recorded
            for n in after:
                self._put(n)
            keep = set(names)
            for n in _files_and_temps(self.url):
                if n not in keep:
                    g.remove(_join(self.url, n))
                    self.synced.pop(n, None)
        log.info("uploaded %s to %s", latest, self.url)

    def _move_aside(self, prefixes: set[str]) -> None:
        """Checkpoints about to be uploaded under a name the remote `checkpoint` records (an
        --overwrite run reaching a step of the run it replaces): copy them aside first and
        point `checkpoint` there, so the remote's latest stays whole meanwhile."""
        reused = prefixes & set(self.recorded)
        if not reused:
            return
        rename = {}
        for prefix in reused:
            aside = f"{paths.REPLACED}-{_STEPPED.search(prefix).group(0)[1:]}"
            for n in _files(self.url):
                m = paths.CHECKPOINT_FILE.match(n)
                if m and m.group(1) == prefix:
                    upload(_join(self.url, n), _join(self.url, aside + n[len(prefix):]),
                           direct=self.direct)
            rename[prefix] = aside
        latest = rename.get(self.latest, self.latest)
        recorded = [rename.get(p, p) for p in self.recorded]
        state = self.local.with_name(f".{paths.CKPT_STATE}.{secrets.token_hex(8)}.aside")
        try:
            text = paths.checkpoint_state_text([p for p in recorded if p != latest] + [latest])
            state.write_text(text, encoding="utf-8")
            upload(state, _join(self.url, paths.CKPT_STATE), direct=self.direct)
        finally:
            state.unlink(missing_ok=True)
        self.latest, self.recorded = latest, recorded

    @contextlib.contextmanager
    def _uploading(self):
        tf = _tf()
        try:
            yield
        except (tf.errors.OpError, OSError) as e:
            where = (f"its latest complete checkpoint there is still {self.latest}"
                     if self.latest else "it holds no complete checkpoint yet")
            raise UserError(
                f"cannot upload the run to {self.url} ({type(e).__name__}: {_first_line(e)});"
                f" {where} (the `{paths.CKPT_STATE}` file goes up after every file it names):"
                " resume with --restore_from latest") from None


def _files_and_temps(url: str) -> list[str]:
    """The remote run's files, and the temporary files interrupted uploads left there."""
    g = _tf().io.gfile
    top = next(iter(g.walk(url)), None)
    names = [f.rstrip("/") for f in (top[2] if top else [])]
    return [n for n in names if not n.startswith(".") or _UPLOAD_TEMP.match(n)]


def run_folder(checkpoint_dir: str, run_name: str, *, worker: int = 0
               ) -> tuple[Path, "RunMirror | None"]:
    """Where a run trains: <checkpoint_dir>/<run_name>, or for a URL a local working copy
    downloaded now (worker 0, the chief, uploads it after each save; see `RunMirror`)."""
    if not is_url(checkpoint_dir):
        return paths.run_path(checkpoint_dir, run_name), None
    mirror = RunMirror.pull(checkpoint_dir, run_name,
                            copy="train" if worker == 0 else f"worker-{worker}")
    return mirror.local, mirror


def view_run(checkpoint_dir: str, run_name: str) -> Path:
    """A local copy of the remote run <checkpoint_dir>/<run_name>, to generate from."""
    mirror = RunMirror.pull(checkpoint_dir, run_name, copy="view")
    if not mirror.local.is_dir():
        g = _tf().io.gfile
        with _io(f"cannot read {checkpoint_dir}"):
            runs = ([d.rstrip("/") for d in g.listdir(checkpoint_dir)
                     if g.isdir(_join(checkpoint_dir, d.rstrip("/")))]
                    if g.isdir(checkpoint_dir) else [])
        have = f"runs there: {', '.join(sorted(runs))}" if runs else "no runs there"
        raise UserError(f"run {run_name!r} not found in {checkpoint_dir} ({have}); train one"
                        f" with train.py --checkpoint_dir {checkpoint_dir} --run_name"
                        f" {run_name}, or pass the right --run_name/--checkpoint_dir")
    return mirror.local
