"""A training run's files on disk: checkpoints with their side files, retention, metrics.

The order of a save is what makes a run survive kill -9 at any moment:

1. TF's Saver writes model-<step>.data-* and model-<step>.index (our `checkpoint` file untouched);
2. the side file model-<step>.state.json (data-sampler and noise RNG state, running averages)
   is written atomically;
3. the `checkpoint` state file is replaced atomically to name model-<step>: the commit point;
4. `counter` (gpt-2-simple's step file) is written atomically;
5. with --keep_best, best.json is replaced atomically to name the checkpoint of the lowest
   validation loss (which the side file of every later checkpoint also records);
6. only then are checkpoints beyond max_checkpoints (or, with --overwrite, from an earlier run)
   deleted; the best one stays, and is recorded in `checkpoint` too.

A crash before 3 leaves `checkpoint` naming the previous, complete checkpoint (a half-written
model-<step> is ignored and overwritten by the next save of that step). A crash after 3 leaves
the new one complete; if best.json still names the previous best (not deleted yet), a resumed
run rewrites it from the side file of the checkpoint it resumes from. Disk full at any point is a UserError, and the previous checkpoint stays.

What an interrupted save leaves besides (TF's `*.tempstate<n>` files, which can be as large as
the checkpoint and keep a full disk full) is removed when a run resumes and before each save,
and a save first checks that the disk has room for the whole checkpoint.
"""

import contextlib
import json
import logging
import os
import re
from pathlib import Path

from gpt2tf import fileio, paths
from gpt2tf.errors import UserError

log = logging.getLogger(__name__)

_STEP = re.compile(r"-(\d+)$")
# Files of a save that never finished. TF's Saver (a BundleWriter) writes
# <prefix>.data-00000-of-00001.tempstate<n> and <prefix>.index.tempstate<n> and renames them at
# its end; a sharded Saver writes into <prefix>_temp/ (or _temp_<hex>/); fileio.atomic_open
# writes .<name>.<random>.tmp beside the file it replaces.
_TEMP_FILE = re.compile(
    paths.CHECKPOINT_NAME + r"(?:\.index|\.data-\d{5}-of-\d{5})\.tempstate\d+"
    r"|\.(?:" + paths.CHECKPOINT_NAME + re.escape(paths.STATE_SUFFIX)
    + r"|checkpoint|counter|hparams\.json|encoder\.json|vocab\.bpe|train_config\.json"
    r"|metrics\.jsonl|best\.json)\.[A-Za-z0-9_]+\.tmp"
)
_TEMP_DIR = re.compile(paths.CHECKPOINT_NAME + r"_temp(?:_[0-9a-f]+)?")
SAVE_MARGIN = 1 << 20  # beyond the tensors: the .index, the side file, `checkpoint`, `counter`


def step_of(prefix: str) -> int | None:
    """The step in a checkpoint prefix like .../model-120, or None."""
    m = _STEP.search(str(prefix))
    return int(m.group(1)) if m else None


def latest_committed(run_dir: Path) -> str | None:
    """The complete checkpoint `checkpoint` names in a run directory, or None if there is none.

    When the files of the one it names are gone (the user deleted a damaged checkpoint, as
    `resume_fix` suggests), the newest earlier one it records is the latest.
    """
    if not (run_dir / paths.CKPT_STATE).is_file():
        return None
    latest, recorded = paths.checkpoint_state(run_dir)
    if latest and Path(latest).resolve().parent != Path(run_dir).resolve():
        raise UserError(f"{run_dir / paths.CKPT_STATE} names {latest}, outside the run: a run"
                        " resumes only from its own checkpoints; fix that file")
    if latest and Path(latest + ".index").is_file():
        return latest
    own = Path(run_dir).resolve()
    for prefix in reversed(recorded):
        if Path(prefix).resolve().parent == own and Path(prefix + ".index").is_file():
            return prefix
    return None


def resume_fix(run_dir: Path, prefix: str) -> str:
    """What to do when the checkpoint a run resumes from is damaged (the end of the error)."""
    from gpt2tf import checkpoints

    _, recorded = paths.checkpoint_state(run_dir)
    for earlier in reversed([p for p in recorded if p != prefix]):
        try:
            checkpoints.list_checkpoint(earlier)  # complete, by its index and data files' size
        except UserError:
            continue
        return (f"delete {prefix}.* and resume again: the run then continues from its earlier"
                f" checkpoint {os.path.basename(earlier)}")
    return ("the run keeps no earlier checkpoint: restore the file from a backup, or start the"
            " run over with --restore_from fresh --overwrite")


def checkpoint_files(run_dir: Path) -> dict[str, list[Path]]:
    """Checkpoint prefix (absolute, as a str) -> the files of that checkpoint in run_dir."""
    out: dict[str, list[Path]] = {}
    if not run_dir.is_dir():
        return out
    for f in run_dir.iterdir():
        m = paths.CHECKPOINT_FILE.match(f.name)
        if m and f.is_file():
            out.setdefault(str(run_dir / m.group(1)), []).append(f)
    return out


def write_checkpoint_state(run_dir: Path, prefixes: list[str]) -> None:
    """Atomically point TF's `checkpoint` file at prefixes[-1] (all of them recorded)."""
    fileio.write_text(run_dir / paths.CKPT_STATE, paths.checkpoint_state_text(prefixes))


def read_side_state(prefix: str) -> dict | None:
    path = Path(prefix + paths.STATE_SUFFIX)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): the run's side state is damaged") from None


def read_best(run_dir: Path) -> dict | None:
    """The run's best.json ({"checkpoint": "model-<step>", "step", "val_loss"}), or None."""
    path = Path(run_dir) / paths.BEST
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): delete it, and a resumed run writes it"
                        " again") from None
    if not isinstance(best, dict) or not isinstance(best.get("checkpoint"), str):
        raise UserError(f"{path} does not name a checkpoint: delete it, and a resumed run"
                        " writes it again")
    return best


def read_counter(run_dir: Path) -> int | None:
    try:
        return int((run_dir / paths.COUNTER).read_text(encoding="utf-8").strip())
    except (FileNotFoundError, ValueError):
        return None


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete what interrupted saves left in run_dir (see _TEMP_FILE); the paths removed.

    Call it only while this process is not saving: then no file of the pattern belongs to a
    live save (one trainer per run directory; saves are synchronous).
    """
    import shutil

    removed = []
    if not run_dir.is_dir():
        return removed
    for f in run_dir.iterdir():
        if _TEMP_FILE.fullmatch(f.name) and not f.is_symlink() and f.is_file():
            _remove([f])
            removed.append(f)
        elif _TEMP_DIR.fullmatch(f.name) and not f.is_symlink() and f.is_dir():
            shutil.rmtree(f, ignore_errors=True)
            removed.append(f)
    return removed


def check_free_space(run_dir: Path, tensor_bytes: int, *, what: str, latest: str | None) -> None:
    """A UserError unless the disk of run_dir has room for a checkpoint of tensor_bytes.

    TF writes the whole data file before it renames it into place, and the previous checkpoint
    goes only after the commit point, so a save needs its full size free.
    """
    from gpt2tf import memory

    need = tensor_bytes + tensor_bytes // 100 + SAVE_MARGIN
    have = fileio.free_bytes(run_dir)
    if have is None or have >= need:
        return
    if latest:
        then = (f"the latest checkpoint {latest} is intact: free {memory.size(need - have)} or"
                " more and resume with --restore_from latest")
    else:
        then = f"nothing was saved: free {memory.size(need - have)} or more and try again"
    raise UserError(
        f"not enough disk space to {what}: a checkpoint needs about {memory.size(need)} and"
        f" {fileio.nearest_existing(run_dir)} has {memory.size(have)} free; {then}"
    )


def _remove(files) -> None:
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)


class RunCheckpoints:
    """Saves and prunes model-<step> checkpoints of one run directory (see the module doc)."""

    def __init__(self, run_dir: Path, saver, *, max_checkpoints: int, replace_others: bool,
                 checkpoint_bytes: int = 0, keep_best: bool = False):
        self.run_dir = Path(run_dir)
        # --keep_best: the checkpoint of the lowest val_loss (a prefix), kept beside the latest
        # ones. The trainer sets it from the side state it resumes from and on each new best.
        self.keep_best = keep_best
        self.best: dict | None = None  # {"checkpoint": prefix, "step", "val_loss"}
        self.saver = saver
        # The tensors the saver writes (weights, step, optimizer slots): room checked per save.
        self.checkpoint_bytes = checkpoint_bytes
        self.max_checkpoints = max_checkpoints
        # --overwrite: after the first save, checkpoints this process did not write go.
        self.replace_others = replace_others
        self.on_first_commit = []  # callables run once, right after the first commit point
        # callables run after each save, its commit point and its pruning (gpt2tf.remote's
        # RunMirror uploads the run there: its copy commits only what is committed here)
        self.after_save = []
        _, recorded = paths.checkpoint_state(self.run_dir) if not replace_others else (None, [])
        self.kept: list[str] = [p for p in recorded if Path(p + ".index").is_file()]

    def prefix_of(self, step: int) -> str:
        return str(self.run_dir / f"{paths.RUN_PREFIX}-{step}")

    def save(self, session, step: int, side_state: dict) -> str:
        prefix = self.prefix_of(step)
        for f in remove_leftovers(self.run_dir):
            log.info("removed %s, left by an interrupted save", f)
        self.check_free_space(f"save checkpoint {prefix}")
        try:
            self._write(session, step, prefix, side_state)
        except OSError as e:
            remove_leftovers(self.run_dir)  # a failed save's temp files would keep the disk full
            raise self._save_error(prefix, e) from None
        except Exception as e:  # tf.errors.OpError: the type lives in TF, imported lazily
            import tensorflow as tf

            if isinstance(e, tf.errors.OpError):
                remove_leftovers(self.run_dir)
                raise self._save_error(prefix, e) from None
            raise
        self._after_commit(prefix)
        for hook in self.after_save:
            hook()
        return prefix

    def check_free_space(self, what: str) -> None:
        check_free_space(self.run_dir, self.checkpoint_bytes, what=what,
                         latest=self.kept[-1] if self.kept else None)

    def _save_error(self, prefix: str, e: Exception) -> UserError:
        latest = self.kept[-1] if self.kept else None
        where = (
            f"the latest complete checkpoint {latest} is intact" if latest
            else "no earlier checkpoint of this run exists"
        )
        msg = getattr(e, "message", None) or getattr(e, "strerror", None) or str(e)
        first = str(msg).splitlines()[0] if str(msg) else type(e).__name__
        return UserError(
            f"cannot save checkpoint {prefix} ({type(e).__name__}: {first}); is the disk full?"
            f" {where}: free space and resume with --restore_from latest"
        )

    def _write(self, session, step: int, prefix: str, side_state: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.replace_others:
            self._move_aside(prefix)
        with session.graph.as_default():
            self.saver.save(
                session, str(self.run_dir / paths.RUN_PREFIX), global_step=step,
                write_state=False, write_meta_graph=False,
            )
        fileio.write_json(prefix + paths.STATE_SUFFIX, {"step": step, **side_state})
        best = self.best["checkpoint"] if self.keep_best and self.best else None
        latest = [p for p in self.kept if p not in (prefix, best)] + [prefix]
        kept = latest[-self.max_checkpoints:] if self.max_checkpoints > 0 else latest
        if best is not None and best not in kept:
            kept = [best] + kept  # older than every latest one: `checkpoint` lists by age
        write_checkpoint_state(self.run_dir, kept)  # the commit point
        self.kept = kept
        fileio.write_text(self.run_dir / paths.COUNTER, f"{step}\n")
        self.sync_best_file()

    def sync_best_file(self) -> None:
        """Make best.json name the best checkpoint (none: remove it). Called after a commit
        point only, so what it names is committed; before the old best is deleted."""
        path = self.run_dir / paths.BEST
        if self.keep_best and self.best:
            record = {**self.best, "checkpoint": os.path.basename(self.best["checkpoint"])}
            text = json.dumps(record, indent=2) + "\n"
            with contextlib.suppress(OSError):
                if path.read_text(encoding="utf-8") == text:
                    return
            fileio.write_text(path, text)
        else:
            path.unlink(missing_ok=True)

    def _move_aside(self, prefix: str) -> None:
        """--overwrite: an earlier run's checkpoint has the name we are about to write.

        It must stay loadable until our commit point, so its files are hard-linked under
        another name, `checkpoint` is pointed there (atomically), and only then the original
        names are unlinked for the Saver to write anew.
        """
        files = checkpoint_files(self.run_dir).get(prefix)
        if not files:
            return
        latest, recorded = paths.checkpoint_state(self.run_dir)
        aside = str(self.run_dir / f"{paths.REPLACED}-{step_of(prefix)}")
        for f in files:
            target = Path(aside + f.name[len(os.path.basename(prefix)):])
            target.unlink(missing_ok=True)
            try:
                os.link(f, target)
            except OSError:
                import shutil

                shutil.copy2(f, target)
        if latest is not None:
            new_latest = aside if latest == prefix else latest
            others = [aside if p == prefix else p for p in recorded if p != latest]
            write_checkpoint_state(self.run_dir, others + [new_latest])
        _remove(files)

    def _after_commit(self, prefix: str) -> None:
        hooks, self.on_first_commit = self.on_first_commit, []
        for hook in hooks:
            hook()
        keep = set(self.kept)
        for other, files in checkpoint_files(self.run_dir).items():
            if other in keep:
                continue
            other_step = step_of(other)
            committed_step = step_of(prefix) or 0
            # Delete pruned ones, and with --overwrite everything that came before this run;
            # never a newer half-written one, which a later save of that step will replace.
            if self.replace_others or (other_step is not None and other_step < committed_step):
                _remove(files)
        self.replace_others = False

    def remove_orphans_after(self, step: int) -> None:
        """Drop checkpoint files newer than `step` that `checkpoint` never named (a crash
        mid-save): the resumed run writes those steps again."""
        keep = set(self.kept)
        for other, files in checkpoint_files(self.run_dir).items():
            s = step_of(other)
            if other not in keep and s is not None and s > step:
                _remove(files)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, `step` counted from the run's start.

    On resume, records past the restored step (logged after the last save, before a crash) are
    dropped so the file reads as one run. With `defer` (a --overwrite of an earlier run),
    records are held in memory until `commit()`, after the new run's first checkpoint: until
    then the earlier run's file stays as it was.
    """

    def __init__(self, path: Path, *, keep_through_step: int | None, defer: bool = False):
        self.path = Path(path)
        self._pending: list[str] | None = [] if defer else None
        self._file = None
        if not defer:
            self._truncate(keep_through_step)

    def _truncate(self, keep_through_step: int | None) -> None:
        lines: list[str] = []
        changed = False
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    keep = keep_through_step is not None and int(rec["step"]) <= keep_through_step
                except (ValueError, KeyError, TypeError):
                    keep = False  # e.g. a line cut short by a crash
                if keep:
                    lines.append(line)
                else:
                    changed = True
            if changed:
                fileio.write_text(self.path, "".join(x + "\n" for x in lines))

    def write(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=False)
        if self._pending is not None:
            self._pending.append(line)
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # held open for the run's lifetime; close() ends it
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(line + "\n")
        self._file.flush()

    def commit(self) -> None:
        """Replace the earlier run's file with this run's records (deferred mode)."""
        if self._pending is None:
            return
        fileio.write_text(self.path, "".join(x + "\n" for x in self._pending))
        self._pending = None

    def sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            with contextlib.suppress(OSError):
                os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl (tests and tools)."""
    path = Path(run_dir) / paths.METRICS
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out
