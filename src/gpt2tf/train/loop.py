"""The training loop: one invocation of training restores, steps, logs, samples and saves.

The maths of a step is gpt2tf.train.step's; the loop owns data, logging, saving, sampling,
validation and signals. Order of work, so bad input costs nothing and writes nothing:

1. check every setting (`TrainConfig`, `check_invocation`);
2. plan the run: which checkpoint to start from, its hparams and vocabulary, and whether this
   resumes (`plan_run`); check the checkpoint matches the hparams;
3. load and encode the data, and check it holds at least one window;
4. build the graph, restore, and only then create or update the run directory.

A run directory checkpoint/<run_name>/ holds hparams.json, encoder.json, vocab.bpe, the
checkpoints (model-<step>, OpenAI's layout plus optimizer state), train_config.json,
metrics.jsonl and TensorBoard events. `--restore_from latest` continues it exactly; flags not
given on the command line come from its train_config.json.

Validation also judges the run: the lowest val_loss so far (of the validations after a step;
the one before the first step only shows where training starts), and how many validations in a
row have not lowered it, are part of each checkpoint's side state, so a resumed run continues
both. With --keep_best, a validation that lowers it saves a checkpoint at once, which stays
(best.json names it) until a lower one replaces it; --early_stopping_patience N ends the run,
saving first, at the N-th validation in a row without a new lowest val_loss.
"""

import contextlib
import dataclasses
import logging
import math
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from gpt2tf import checkpoints, fileio, lora, model, paths, remote, score
from gpt2tf.decode.engine import DecodeEngine, SamplingParams
from gpt2tf.decode.graph import GraphBackend
from gpt2tf.decode.generator import session_config
from gpt2tf.errors import FieldError, UserError
from gpt2tf.train import distributed, run_state
from gpt2tf.train.config import (
    TrainConfig,
    check_invocation,
    require_dataset,
    require_validation,
)
from gpt2tf.train.plan import load_data, plan_run
from gpt2tf.train.step import TrainStep, check_precision, joined, lm_loss

log = logging.getLogger(__name__)

SAMPLE_TEMPERATURE = 1.0  # periodic samples use nshepperd's settings: temperature 1, --top_k
AVG_DECAY = 0.99  # gpt-2-simple's running average of the loss


# --- the graph --------------------------------------------------------------------------------


class Graph:
    """The training graph: step, validation loss, sampler, savers, in its own tf.Graph."""

    def __init__(self, cfg: TrainConfig, hparams, encoder, *, window: int,
                 adapters: model.Lora | None = None, cluster=None,
                 collective_timeout_s: float = 60.0):
        tf1 = tf.compat.v1
        # b: this process's rows, --batch_size for each of its local replicas
        b, t = cfg.batch_size * (cluster.local_replicas if cluster else 1), window - 1
        self.graph = tf.Graph()
        # A cluster: the whole graph is built in the strategy's scope (every op on this worker).
        with self.graph.as_default(), distributed.replicated(
                cluster, timeout_s=collective_timeout_s) as self.replication:
            self.tokens = tf1.placeholder(tf.int32, [b, window], name="tokens")  # [B, T+1]
            # Inputs with noise when --noise > 0 (drawn by the loop); else the clean tokens.
            self.inputs = tf1.placeholder_with_default(self.tokens[:, :-1], [b, t], "inputs")
            if adapters is not None:
                tf1.set_random_seed(cfg.seed)  # the adapters' initial A depends on --seed alone
            rep = self.replication

            def make_step(tokens, inputs):  # (a replica's rows)
                return TrainStep(hparams, cfg.step_config(), tokens, inputs=inputs,
                                 lora=adapters, reduce=rep.mean if rep else None)

            self.step = (joined(rep.build(make_step, self.tokens, self.inputs)) if rep
                         else make_step(self.tokens, self.inputs))
            self.val_tokens = tf1.placeholder(tf.int32, [None, window], name="val_tokens")
            self.val_loss = lm_loss(
                hparams, self.val_tokens,
                precision=check_precision(cfg.precision), lora=adapters,
            )
            # Per-token log-probabilities for the validation perplexity, which scores every
            # validation token once (gpt2tf.score's sliding windows, as `gpt2tf eval` does).
            self.score_tokens = tf1.placeholder(tf.int32, [None, None], name="score_tokens")
            logits = model.model(hparams, self.score_tokens,
                                 precision=check_precision(cfg.precision),
                                 lora=adapters)["logits"]
            logp = tf.nn.log_softmax(logits[:, :-1])  # [B, T-1, V]
            self.score_logprobs = tf.gather(logp, self.score_tokens[:, 1:], batch_dims=2)
            self.sampler = None  # the decode engine over the weights being trained
            if cfg.sample_every and cfg.sample_num:
                with rep.local_variables() if rep else contextlib.nullcontext():
                    self.sampler = DecodeEngine(GraphBackend(hparams, lora=adapters), hparams,
                                                encoder)
            step_var = self.step.global_step
            self.model_saver = tf1.train.Saver(self.step.model_variables)
            lora_vars = self.step.lora_variables
            self.lora_saver = tf1.train.Saver(lora_vars) if lora_vars else None
            self.step_saver = tf1.train.Saver([step_var])
            opt_vars = self.step.optimizer_variables
            self.opt_saver = tf1.train.Saver(opt_vars) if opt_vars else None
            # The run's checkpoints: weights (OpenAI's names; a LoRA run's adapters instead,
            # over the frozen base its lora.json names), step, optimizer state.
            trained = lora_vars or self.step.model_variables
            self.saver = tf1.train.Saver(
                trained + [step_var] + opt_vars, max_to_keep=None, save_relative_paths=True,
            )
            self.step_value = tf1.placeholder(tf.int64, [])
            self.set_step = step_var.assign(self.step_value)
            self.init = [tf1.global_variables_initializer(), tf1.local_variables_initializer()]
        self.graph.finalize()
        # What one checkpoint's tensors take on disk: the room each save needs.
        self.checkpoint_bytes = sum(
            v.shape.num_elements() * v.dtype.base_dtype.size
            for v in trained + [step_var] + opt_vars
        )
        self.names = {
            "step": checkpoints.var_name(step_var),
            "optimizer": [checkpoints.var_name(v) for v in opt_vars],
        }


# --- signals ----------------------------------------------------------------------------------


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, save, return. A second Ctrl-C quits now
    (the previous checkpoint stays the latest)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: saving after this step"
            + (" (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""),
            file=sys.stderr, flush=True,
        )


# --- the loop ---------------------------------------------------------------------------------


class _SamplingStopped(Exception):
    pass



def _say(msg: str) -> None:
    print(msg, flush=True)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Trainer:
    """One invocation of training: restore, loop, save; see `train`."""

    def __init__(self, cfg, plan, data, *, steps, samples_dir, run_name, cluster=None,
                 collective_timeout_s=60.0):
        self.cfg, self.plan, self.data = cfg, plan, data
        self.steps, self.samples_dir, self.run_name = steps, Path(samples_dir), run_name
        self.g = Graph(cfg, plan.hparams, plan.encoder, window=data.window,
                       adapters=plan.lora.spec if plan.lora else None, cluster=cluster,
                       collective_timeout_s=collective_timeout_s)
        self.replication = self.g.replication  # None: training alone
        # Data parallel: worker `rank` trains rows [rank*L*B, (rank+1)*L*B) of each global batch
        # (replicas x B; L its local replicas); the chief (rank 0) alone writes the run
        # directory and samples.
        self.replicas = cluster.replicas if cluster else 1
        self.local_replicas = cluster.local_replicas if cluster else 1  # (several: one worker)
        self.rank = cluster.task if cluster else 0
        self.chief = self.rank == 0
        if self.replication is None:
            self.session = tf.compat.v1.Session(graph=self.g.graph, config=session_config())
        else:
            self.session = self.replication.session(self.g.graph, session_config())
        self.noise_rng = np.random.Generator(np.random.PCG64([cfg.seed, 1]))
        self.avg = [0.0, 0.0]  # gpt-2-simple's running average: (sum, weight)
        self.tokens_seen = 0
        # The lowest val_loss so far {"step", "val_loss"}, and validations since it was set.
        self.best_val: dict | None = None
        self.stale_validations = 0
        self.best_checkpoint: dict | None = None  # --keep_best: {"checkpoint": name, ...}
        self.stopped_early = False
        self.start_step = 0
        self.last_saved = None
        self.writer = None
        self.metrics = None
        self.checkpoints = None

    # restore ---------------------------------------------------------------------------------

    def restore(self) -> None:
        plan, s = self.plan, self.session
        s.run(self.g.init)
        # A LoRA run's weights are its base's; its own checkpoints hold the adapters.
        weights = plan.lora.base_checkpoint if plan.lora else plan.source_prefix
        checkpoints.restore(s, weights, self.g.model_saver, plan.hparams, fix=plan.fix)
        _say(f"Loading checkpoint {weights}")
        if not plan.resume:
            return
        if self.g.lora_saver is not None:
            _say(f"Loading adapters {plan.source_prefix}")
            checkpoints.restore_saver(s, plan.source_prefix, self.g.lora_saver, fix=plan.fix)
        names = set(checkpoints.list_checkpoint(plan.source_prefix, fix=plan.fix))
        side = run_state.read_side_state(plan.source_prefix)
        with self.g.graph.as_default():
            if self.g.names["step"] in names:
                checkpoints.restore_saver(s, plan.source_prefix, self.g.step_saver, fix=plan.fix)
            else:  # gpt-2-simple's run: its step is in `counter` or the file name
                step = (side or {}).get("step") or run_state.read_counter(plan.run_dir)
                step = step or run_state.step_of(plan.source_prefix) or 0
                s.run(self.g.set_step, {self.g.step_value: step})
            opt = self.g.names["optimizer"]
            if self.g.opt_saver is not None and all(n in names for n in opt):
                checkpoints.restore_saver(s, plan.source_prefix, self.g.opt_saver, fix=plan.fix)
            elif opt:
                log.warning(
                    "%s holds no %s state (written by another tool or with another"
                    " --optimizer): the optimizer starts fresh", plan.source_prefix,
                    self.cfg.optimizer,
                )
        self._restore_side(side)

    def _restore_side(self, side: dict | None) -> None:
        if side is None:
            log.warning(
                "%s has no %s file: the data order cannot continue where it stopped",
                self.plan.source_prefix, paths.STATE_SUFFIX,
            )
            return
        sampler_state = side.get("sampler", {})
        if sampler_state.get("total_size") != self.data.train.total_size:
            log.warning(
                "the dataset has changed since the checkpoint (%s tokens, now %s): training"
                " continues, but not with the data order of the run",
                sampler_state.get("total_size"), self.data.train.total_size,
            )
        self.data.train.load_state_dict(sampler_state)
        try:
            bit = np.random.PCG64()
            bit.state = side["noise_rng"]
            self.noise_rng = np.random.Generator(bit)
            self.avg = [float(x) for x in side["avg_loss"]]
            self.tokens_seen = int(side.get("tokens", 0))
            self.best_val = _best_record(side.get("best_val"))
            self.stale_validations = int(side.get("stale_validations", 0))
            self.best_checkpoint = _best_record(side.get("best_checkpoint"), checkpoint=True)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"bad side state for {self.plan.source_prefix} ({e})") from None
        if sampler_state.get("sample_mode", "windows") != self.cfg.sample_mode:
            log.warning(
                "the checkpoint was trained with --sample_mode %s, this run uses %s: training"
                " continues, but not with the data order of the run",
                sampler_state.get("sample_mode", "windows"), self.cfg.sample_mode)

    # run files -------------------------------------------------------------------------------

    def open_run(self) -> None:
        """Create or update the run directory; with --overwrite of another run, defer the
        replacement of its files until our first checkpoint is saved."""
        plan, run_dir = self.plan, self.plan.run_dir
        self.start_step = int(self.session.run(self.g.step.global_step))
        if not self.chief:
            return  # the run directory is the chief's
        replace_files = plan.replace_run and not plan.resume
        old_events = sorted(run_dir.glob("events.out.tfevents.*")) if plan.replace_run else []
        # A kill -9 or a full disk mid-save left these (as large as a checkpoint); no save of
        # ours is under way yet. Then refuse, before writing anything, a disk too full to save.
        for f in run_state.remove_leftovers(run_dir):
            _say(f"Removed {f}, left by an interrupted save")
        latest = plan.source_prefix if plan.resume else None
        run_state.check_free_space(run_dir, self.g.checkpoint_bytes,
                                   what="train (no checkpoint would fit)", latest=latest)
        if not run_dir.exists():
            # A new run appears with its hparams, vocabulary and config, or not at all.
            with fileio.publish_dir(run_dir, make_parents=True) as tmp:
                self._write_run_files(tmp)
            replace_files = False
        run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = run_state.RunCheckpoints(
            run_dir, self.g.saver, max_checkpoints=self.cfg.max_checkpoints,
            replace_others=plan.replace_run, checkpoint_bytes=self.g.checkpoint_bytes,
            keep_best=self.cfg.keep_best,
        )
        if plan.resume:
            self.checkpoints.remove_orphans_after(self.start_step)
            self._resume_best()
        self.metrics = run_state.MetricsLog(
            run_dir / paths.METRICS,
            keep_through_step=self.start_step if plan.resume else None, defer=replace_files,
        )

        def write_run_files():
            self._write_run_files(run_dir)
            self.metrics.commit()
            for f in old_events:
                f.unlink(missing_ok=True)

        if replace_files:
            self.checkpoints.on_first_commit.append(write_run_files)
        else:
            self.checkpoints.on_first_commit.append(
                lambda: [f.unlink(missing_ok=True) for f in old_events]
            )
            self._write_run_files(run_dir)
        with self.g.graph.as_default():
            self.writer = tf.compat.v1.summary.FileWriter(str(run_dir))
            # TensorBoard drops events logged past this step by an earlier, crashed process.
            self.writer.add_session_log(
                tf.compat.v1.SessionLog(status=tf.compat.v1.SessionLog.START), self.start_step
            )

    def _resume_best(self) -> None:
        """The best checkpoint the restored side state names, if it is still there; best.json
        rewritten to match (a crash may have come between a commit and its update)."""
        best = self.best_checkpoint
        if best is None or not self.cfg.keep_best:
            self.best_checkpoint = None  # (without --keep_best it is pruned as any other)
            return
        prefix = self.checkpoints.prefix_of(best["step"])
        if not Path(prefix + ".index").is_file():
            log.warning("the best checkpoint %s is gone: the next validation's checkpoint"
                        " becomes the best", prefix)
            self.best_checkpoint = None
            return
        self.checkpoints.best = {**best, "checkpoint": prefix}
        if not self.plan.replace_run:
            self.checkpoints.sync_best_file()

    def _write_run_files(self, folder: Path | None = None) -> None:
        """hparams, vocabulary (unless the run is its own source), train_config.json and,
        for a LoRA run, lora.json."""
        run_dir = self.plan.run_dir
        folder = run_dir if folder is None else folder
        if self.plan.source.path.resolve() != run_dir.resolve():
            fileio.write_text(folder / paths.HPARAMS, self.plan.hparams.to_json())
            for name, content in zip(paths.VOCAB_FILES, self.plan.source.vocab_files):
                with fileio.atomic_open(folder / name, "wb") as f:
                    f.write(content)
        fileio.write_json(folder / paths.TRAIN_CONFIG, self.cfg.to_dict())
        lora.write_record(folder, self.plan.lora)

    # work ------------------------------------------------------------------------------------

    def next_feeds(self) -> list[dict]:
        """Feed dicts of the next step's micro-batches (advances the data sampler)."""
        g = self.g
        feeds = []
        b = self.cfg.batch_size
        # Every worker draws the same global batch and keeps its rows: the data stream (and the
        # sampler's saved state) is a single run's at the global batch, whatever the topology.
        mine = self.local_replicas * b  # this process's rows (its replicas split them)
        rows = slice(self.rank * mine, (self.rank + 1) * mine)
        for _ in range(self.cfg.accumulate_gradients):
            batch = self.data.train.sample_batch(b * self.replicas, self.data.window)
            feed = {g.tokens: batch[rows]}
            if self.cfg.noise > 0:
                # nshepperd's --noise: each input token is replaced by a random one with
                # probability p; the targets stay clean.
                inputs = batch[:, :-1]
                mask = self.noise_rng.random(inputs.shape) < self.cfg.noise
                rand = self.noise_rng.integers(0, self.plan.hparams.n_vocab, inputs.shape)
                feed[g.inputs] = np.where(mask, rand, inputs).astype(np.int32)[rows]
            feeds.append(feed)
        return feeds

    def validate(self) -> float:
        windows = self.data.val_windows
        n = self.cfg.val_batch_size
        losses = [
            self.session.run(self.g.val_loss, {self.g.val_tokens: windows[i : i + n]})
            for i in range(0, len(windows), n)
        ]
        return float(sum(losses) / len(losses))

    def val_perplexity(self) -> float:
        """exp of the loss over the validation tokens, each scored once as `gpt2tf eval` scores
        a text (windows of the training length, stride half of it). It reads as many tokens as
        the validation windows hold (the first ones), so it costs about twice val_loss."""
        t = self.data.window - 1
        budget, chunks = len(self.data.val_windows) * self.data.window, []
        for chunk in self.data.val_chunks:
            if budget > 1:
                chunks.append(chunk[:budget])
                budget -= len(chunks[-1])
        result = score.evaluate(
            lambda ids: self.session.run(self.g.score_logprobs, {self.g.score_tokens: ids}),
            chunks, n_ctx=t, stride=max(t // 2, 1), batch_size=self.cfg.val_batch_size,
            n_bytes=0)
        return result["perplexity"]

    def sample(self, step: int, stop: StopRequest) -> None:
        engine = self.g.sampler
        engine.backend.session = self.session
        params = SamplingParams(
            temperature=SAMPLE_TEMPERATURE, top_k=self.cfg.top_k, top_p=self.cfg.top_p
        )

        def on_token(row, piece):
            if stop.signum is not None:  # a long sample must not delay the save on SIGTERM
                raise _SamplingStopped

        try:
            texts = [
                s.text for s in engine.iter_samples(
                    engine.encode_prompt(None), nsamples=self.cfg.sample_num,
                    batch_size=min(self.cfg.batch_size, self.cfg.sample_num),
                    length=self.cfg.sample_length, params=params,
                    seed=(self.cfg.seed * 1_000_003 + step) % (1 << 62), on_token=on_token,
                )
            ]
        except _SamplingStopped:
            return
        text = "\n".join(f"======== SAMPLE {i + 1} ========\n{t}\n" for i, t in enumerate(texts))
        _say(text)
        fileio.write_text(self.samples_dir / self.run_name / f"samples-{step}", text)

    def save(self, step: int) -> None:
        if not self.chief:
            self.last_saved = step  # the chief saves for the group
            return
        side = {
            "sampler": self.data.train.state_dict(),
            "noise_rng": self.noise_rng.bit_generator.state,
            "avg_loss": self.avg,
            "tokens": self.tokens_seen,
            "best_val": self.best_val,
            "stale_validations": self.stale_validations,
            "best_checkpoint": self.best_checkpoint,
        }
        _say(f"Saving {self.plan.run_dir / f'{paths.RUN_PREFIX}-{step}'}")
        self.metrics.sync()
        if self.writer is not None:
            self.writer.flush()
        self.checkpoints.save(self.session, step, side)
        self.last_saved = step

    def _summary(self, step: int, record: dict) -> None:
        tf1 = tf.compat.v1
        values = [
            tf1.Summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
            if k != "step"
        ]
        self.writer.add_summary(tf1.Summary(value=values), step)

    def _log(self, record: dict) -> None:
        if not self.chief:
            return
        self.metrics.write(record)
        self._summary(record["step"], record)

    def loop(self, stop: StopRequest) -> int:
        cfg = self.cfg
        step = self.start_step
        # Every replica's tokens (the global batch is replicas x --batch_size).
        tokens_per_step = (cfg.batch_size * self.replicas * (self.data.window - 1)
                           * cfg.accumulate_gradients)
        if self.data.val_windows is not None and step == 0 and not self.plan.resume:
            val, ppl = self.validate(), self.val_perplexity()
            _say(f"[0] val_loss={val:.4f} val_perplexity={ppl:.2f}")
            self._log({"step": 0, "val_loss": val, "val_perplexity": ppl})
        started = time.perf_counter()
        step_time = None  # running average of seconds per step, for the time left
        done = 0
        while (self.steps == -1 or done < self.steps) and not self._stopping(stop):
            feeds = self.next_feeds()
            t0 = time.perf_counter()
            out = self.g.step.run(self.session, feeds)
            dt = time.perf_counter() - t0
            step += 1
            done += 1
            self.tokens_seen += tokens_per_step
            step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
            self.avg = [self.avg[0] * AVG_DECAY + out["loss"], self.avg[1] * AVG_DECAY + 1.0]
            record = {
                "step": step, "loss": out["loss"], "avg_loss": self.avg[0] / self.avg[1],
                "lr": out["lr"], "tokens_per_sec": tokens_per_step / dt,
            }
            if cfg.max_grad_norm:
                record["grad_norm"] = out["grad_norm"]
            if not math.isfinite(out["loss"]):
                raise UserError(
                    f"the loss is {out['loss']} at step {step}: training diverged; lower"
                    " --learning_rate or set --max_grad_norm (the last checkpoint is intact)"
                )
            validate = self.data.val_windows is not None and step % cfg.val_every == 0
            new_best = False
            if validate:
                record["val_loss"] = self.validate()
                record["val_perplexity"] = self.val_perplexity()
                new_best = self._judge(step, record["val_loss"])
            if step % cfg.print_every == 0 or validate:
                self._log(record)
                self._progress(record, started, step_time, done)
            if new_best or (cfg.save_every and step % cfg.save_every == 0):
                self.save(step)
            if validate and self._patience_spent(step):
                break
            if self.g.sampler is not None and self.chief and step % cfg.sample_every == 0:
                self.sample(step, stop)
        if self.last_saved != step and (step != self.start_step or not self.plan.resume):
            self.save(step)  # (a resumed run stopped before its first step changed nothing)
        return step

    def _stopping(self, stop: StopRequest) -> bool:
        """A stop asked here, or (data parallel) on any worker: all stop before the same step."""
        if self.replication is None:
            return stop.signum is not None
        return self.replication.agree_stop(self.session, stop.signum is not None)

    def _judge(self, step: int, val_loss: float) -> bool:
        """Count a validation towards early stopping; True if --keep_best keeps its checkpoint
        (saved right away, as the weights it judged are only there until the next step)."""
        if self.best_val is None or val_loss < self.best_val["val_loss"]:
            self.best_val = {"step": step, "val_loss": val_loss}
            self.stale_validations = 0
        else:
            self.stale_validations += 1
        kept = self.best_checkpoint
        if not self.cfg.keep_best or (kept is not None and val_loss >= kept["val_loss"]):
            return False
        self.best_checkpoint = {"checkpoint": f"{paths.RUN_PREFIX}-{step}", "step": step,
                                "val_loss": val_loss}
        if self.checkpoints is None:  # a worker that is not the chief keeps no checkpoints
            return True
        self.checkpoints.best = {**self.best_checkpoint,
                                 "checkpoint": self.checkpoints.prefix_of(step)}
        _say(f"New best val_loss {val_loss:.4f} at step {step}")
        return True

    def _patience_spent(self, step: int) -> bool:
        patience = self.cfg.early_stopping_patience
        if not patience or self.stale_validations < patience:
            return False
        best = self.best_val
        _say(f"Early stopping at step {step}: val_loss has not gone below {best['val_loss']:.4f}"
             f" (step {best['step']}) in {self.stale_validations} validations"
             f" (--early_stopping_patience {patience})")
        self.stopped_early = True
        return True

    def _progress(self, record: dict, started: float, step_time: float, done: int) -> None:
        line = (
            f"[{record['step']} | {time.perf_counter() - started:.2f}s]"
            f" loss={record['loss']:.4f} avg={record['avg_loss']:.4f}"
            f" lr={record['lr']:.3g} {record['tokens_per_sec']:.0f} tokens/s"
        )
        if "val_loss" in record:
            line += f" val_loss={record['val_loss']:.4f} val_ppl={record['val_perplexity']:.2f}"
        if self.steps != -1:
            line += f" {_fmt_time((self.steps - done) * step_time)} left"
        _say(line)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        self.session.close()


# --- entry points -----------------------------------------------------------------------------


def _best_record(value, *, checkpoint: bool = False) -> dict | None:
    """A side state's best_val / best_checkpoint, checked (a TypeError/ValueError if bad)."""
    if value is None:
        return None
    out = {"step": int(value["step"]), "val_loss": float(value["val_loss"])}
    if checkpoint:
        out = {"checkpoint": str(value["checkpoint"]), **out}
    return out


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # the step of the last checkpoint
    checkpoint: str
    best_checkpoint: str | None = None  # --keep_best: the checkpoint of the lowest val_loss
    stopped_early: bool = False  # --early_stopping_patience ended the run


def train(
    config: dict,
    *,
    run_name: str = paths.DEFAULT_RUN_NAME,
    checkpoint_dir: str = paths.DEFAULT_CHECKPOINT_DIR,
    samples_dir: str = paths.DEFAULT_SAMPLES_DIR,
    restore_from: str = "latest",
    steps: int = -1,
    overwrite: bool = False,
    cluster: str = "auto",
    collective_timeout_s: float = 60.0,
    devices: int = 0,
) -> TrainResult:
    """Train; `config` holds TrainConfig fields (None: from the run's stored config, else the
    default). Returns where the last checkpoint went. When TF_CONFIG (or `cluster` "slurm")
    names several workers, this process is one of them (gpt2tf.train.distributed): one such
    run per process, as its TensorFlow server lives as long as the process."""
    check_invocation(run_name=run_name, restore_from=restore_from, steps=steps,
                     overwrite=overwrite, cluster=cluster,
                     collective_timeout_s=collective_timeout_s, devices=devices)
    workers = distributed.resolve(cluster, devices=devices)
    run_name = str(run_name)
    unknown = sorted(set(config) - {s.name for s in TrainConfig.SETTINGS})
    assert not unknown, unknown  # the edges pass only declared settings
    # The flags alone, before touching any file (a resumed run may take --dataset from its
    # stored config, so that one is checked after planning).
    TrainConfig.resolve(config)
    if config.get("combine") is not None:
        log.warning("--combine has no effect: text is always encoded as one stream with"
                    " <|endoftext|> between documents, and windows cross document boundaries")
    remote.check_urls(checkpoint_dir=checkpoint_dir, **{
        k: config.get(k) for k in ("models_dir", *remote.DATA_SETTINGS)})
    # A URL: the run trains in a local working copy of it, uploaded after each save.
    run_dir, mirror = remote.run_folder(checkpoint_dir, run_name,
                                        worker=workers.task if workers else 0)
    model_name = config.get("model_name") or paths.DEFAULT_MODEL_NAME
    models_dir = config.get("models_dir") or paths.DEFAULT_MODELS_DIR
    plan = plan_run(run_dir=run_dir, restore_from=restore_from, overwrite=overwrite,
                    model_name=model_name, models_dir=models_dir)
    if plan.resume:
        used = (plan.stored or {}).get("model_name")
        given = config.get("model_name")
        if given is not None and used is not None and str(given) != str(used):
            log.warning("run %s continues from its own checkpoint (trained from %s):"
                        " --model_name %s is ignored", run_name, used, given)
            config = {**config, "model_name": used}
    cfg = TrainConfig.resolve(config, plan.stored)
    require_dataset(cfg)
    require_validation(cfg)
    plan = lora.plan_adapters(plan, lora.spec_of(cfg))
    if cfg.seed is None:
        cfg = dataclasses.replace(cfg, seed=secrets.randbits(31))
    if cfg.lr_schedule == "cosine" and not cfg.lr_decay_steps:
        if steps == -1:
            raise FieldError("lr_decay_steps", "is needed by --lr_schedule cosine (or give a"
                             " --steps count)")
        cfg = dataclasses.replace(cfg, lr_decay_steps=steps)
    data = load_data(remote.stage_data(cfg), plan, seed=cfg.seed)  # (train_config: the URLs)
    _say(f"dataset has {data.train.total_size} tokens")

    trainer = Trainer(cfg, plan, data, steps=steps, samples_dir=samples_dir, run_name=run_name,
                      cluster=workers, collective_timeout_s=collective_timeout_s)
    try:
        trainer.restore()
        trainer.open_run()
        if mirror is not None and trainer.checkpoints is not None:  # the chief uploads
            mirror.attach(trainer.checkpoints)
        if workers is None:
            _say("Training...")
        else:
            _say(f"Training {workers.describe()}: global batch"
                 f" {workers.replicas * cfg.batch_size} ({workers.replicas} x --batch_size"
                 f" {cfg.batch_size})...")
        with StopRequest() as stop:
            step = trainer.loop(stop)
    except tf.errors.OpError as e:
        if trainer.replication is None or not workers.multi_worker:
            raise
        latest = (trainer.checkpoints.kept[-1] if trainer.checkpoints
                  else f"in {run_dir}" if not trainer.chief else plan.source_prefix)
        raise trainer.replication.lost_worker(e, latest=str(latest)) from None
    except OSError as e:  # metrics, samples, run files (a failed save says more itself)
        latest = trainer.checkpoints.kept[-1] if trainer.checkpoints else plan.source_prefix
        raise UserError(
            f"cannot write {e.filename or 'a run file'} ({e.strerror or e}); is the disk full?"
            f" The latest checkpoint {latest} is intact"
        ) from None
    finally:
        trainer.close()
    if not trainer.chief:
        return TrainResult(run_dir=run_dir, step=step,
                           checkpoint=str(run_dir / f"{paths.RUN_PREFIX}-{step}"),
                           stopped_early=trainer.stopped_early)
    best = trainer.checkpoints.best
    return TrainResult(run_dir=run_dir, step=step, checkpoint=str(trainer.checkpoints.kept[-1]),
                       best_checkpoint=best["checkpoint"] if best else None,
                       stopped_early=trainer.stopped_early)

