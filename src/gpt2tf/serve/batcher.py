"""The worker: one thread owns the model and serves queued rows in batches.

Requests never touch TensorFlow: each choice of a request becomes a `Row` in a bounded queue.
The worker takes up to `max_batch` waiting rows, left-pads them into one `Generator.stream`
call (each row with its own sampling settings and random stream) and runs until every row is
done: max_tokens, <|endoftext|> or a stop string. New text goes to each request's asyncio
queue as it is sampled. A client that disconnects cancels its rows; a batch whose rows are all
cancelled or done stops at once.

The same seed gives the same completion, however busy the server is. Per-row random streams are
not enough for that: CPU matmul kernels change with the number of rows (one row, a few, eight
or more take different code paths), and the different rounding flips a sampled token now and
then (2 of 64 requests of 64 tokens on a 124M model). So by default (`batch_invariant`) every
batch is padded to exactly max_batch rows, and rows are only batched with rows that sample
alike (same sampler and top-k width); a lone request then costs about as much as a full batch.

A row whose sampling fails (a bug, or settings the checks let through) fails alone: its request
gets an error ("failed"), and the rows decoded with it carry on as if nothing happened. Only a
failure of the whole step (the model itself) fails every row of the batch ("error").
"""

import asyncio
import collections
import logging
import threading
import time

import numpy as np

from gpt2tf.decode.pick import RowState, log_softmax, pick
from gpt2tf.decode.text import TextStream

log = logging.getLogger(__name__)



class _Row:
    """One choice: a prompt, its sampling settings and random stream, and its text so far.

    `state` (a RowState) is what steering needs, for rows whose settings steer; `logprobs`
    asks for each sampled token's log-probability and that many top alternatives, which
    `scores` collects: (token, logprob, [(token, logprob)] * logprobs) per token.
    """

    def __init__(self, job: "_Job", index: int, context: list[int], params, rng,
                 max_tokens: int, stops: tuple[str, ...], eot: int | None, encoder, *,
                 state: RowState | None = None, logprobs: int | None = None):
        self.job, self.index, self.context = job, index, context
        self.params, self.rng, self.max_tokens = params, rng, max_tokens
        self.text = TextStream(encoder, stops=stops, eot=eot, max_tokens=max_tokens)
        self.state, self.logprobs = state, logprobs
        self.scores: list[tuple] = []
        self._sent = 0  # scores already delivered with an event
        self.done = False
        self.cancelled = False  # set by the event loop when the client goes away

    @property
    def n_tokens(self) -> int:
        return self.text.n_tokens

    def pick(self, logits: np.ndarray, u: np.float32) -> int:
        """This row's next token from its logits [V], exactly as `pick` samples it in a batch."""
        return int(pick(logits[None], [self.params], np.array([u], np.float32),
                        [self.state])[0])

    def add(self, token: int, logits: np.ndarray | None = None) -> tuple[str, str | None]:
        """Consume one sampled token (and the logits it was sampled from, for its score):
        (text to release, finish_reason or None)."""
        if self.logprobs is not None and logits is not None:
            self.scores.append(token_scores(logits, token, self.logprobs))
        if self.state is not None:
            self.state.seen.append(token)
        piece, finish = self.text.add(token)
        self.done = self.text.done
        return piece, finish

    def event(self, piece: str, finish: str | None) -> tuple:
        """The event for released text: it carries the scores of the tokens sampled since the
        row's last event (those of tokens past the end of the text included)."""
        scores, self._sent = self.scores[self._sent:], len(self.scores)
        return (self.job, self.index, piece, finish, scores)


def token_scores(logits: np.ndarray, token: int, top: int) -> tuple:
    """(token, its log-probability, the `top` most likely tokens and theirs) under the model's
    own distribution: the logits before steering, temperature and filtering, as OpenAI's."""
    logp = log_softmax(np.asarray(logits, np.float64))
    best = np.argpartition(-logp, top)[:top] if 0 < top < logp.size else np.arange(0)
    best = best[np.lexsort((best, -logp[best]))]
    return token, float(logp[token]), [(int(t), float(logp[t])) for t in best]


class _Job:
    """The event-loop side of one request: its rows and a queue of their events."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.started = time.monotonic()
        self.rows: list[_Row] = []
        self.events: asyncio.Queue = asyncio.Queue()

    def push(self, events: list[tuple]) -> None:  # runs on the event loop
        for event in events:
            self.events.put_nowait(event)

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled = True


class QueueFull(Exception):
    pass


def _failed(row: _Row) -> tuple:
    """Mark a row whose sampling raised as done; the event that fails its request alone."""
    log.exception("sampling failed for one row (its request fails, the others go on)")
    row.done = True
    return (row.job, row.index, "", "failed")


class Batcher:
    """Owns the Generator from a single thread; serves rows in batches of up to max_batch."""

    def __init__(self, gen, *, max_batch: int, queue_size: int, batch_invariant: bool = True):
        self.gen = gen
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_invariant = batch_invariant
        self._pending: collections.deque[_Row] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.active_rows = 0
        self.batches = 0
        self.tokens_sampled = 0  # every sampled token, kept or discarded
        self.rows_cancelled = 0

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpt2tf-worker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Refuse new rows and end the queued and running ones (their requests get an error)."""
        with self._cond:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        self._deliver([(r.job, r.index, "", "error") for r in dropped])

    def stop(self, timeout: float = 30) -> None:
        """close(), then wait for the worker thread to finish its current step."""
        self.close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, rows: list[_Row]) -> None:
        """Queue all of a request's rows, or none of them (QueueFull)."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            self._drop_cancelled()
            if len(self._pending) + len(rows) > self.queue_size:
                raise QueueFull(
                    f"the server is busy ({len(self._pending)} rows queued, room for"
                    f" {self.queue_size}); retry shortly"
                )
            self._pending.extend(rows)
            self._cond.notify()

    @property
    def queued_rows(self) -> int:
        with self._cond:
            return sum(not r.cancelled for r in self._pending)

    def _drop_cancelled(self) -> None:
        kept = [r for r in self._pending if not r.cancelled]
        self.rows_cancelled += len(self._pending) - len(kept)
        self._pending = collections.deque(kept)

    def _take(self) -> list[_Row] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                self._drop_cancelled()
                if self._pending:
                    return self._take_batch()
                self._cond.wait()

    def _take_batch(self) -> list[_Row]:
        """The oldest waiting rows, up to max_batch (sampling is per row: any rows mix)."""
        batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._run(batch)
            except Exception:  # a bug or a TF failure: fail this batch, keep serving
                log.exception("generation failed for a batch of %d rows", len(batch))
                self._deliver([(r.job, r.index, "", "error") for r in batch if not r.done])
            finally:
                self.active_rows = 0

    def _run(self, batch: list[_Row]) -> None:
        """Decode one batch in lockstep until its rows are done.

        This is DecodeEngine.stream's loop (same backend calls, same draws, same sampler, so a
        seed gives the CLI's text) with each row sampled on its own: a row whose sampling
        raises is failed and fed token 0 from then on, like a filler row."""
        self.batches += 1
        self.active_rows = len(batch)
        n_ctx = self.gen.hparams.n_ctx
        keep = n_ctx - n_ctx // 4
        lanes: list[_Row | None] = list(batch)
        if self.batch_invariant:
            # Filler rows (copies of the first, sampled and thrown away) give every decode step
            # the same shapes, so a row computes exactly what it would in a full batch.
            lanes += [None] * (self.max_batch - len(batch))
        seqs = [list((r or batch[0]).context[-(n_ctx - 1):]) for r in lanes]  # room for 1 new
        rngs = [r.rng if r else np.random.default_rng(0) for r in lanes]
        backend = self.gen.engine.backend
        logits = backend.start(seqs)  # [B, V]
        width = max(len(q) for q in seqs)
        length = max(r.max_tokens for r in batch)
        for step in range(length):
            uniform = np.array([g.random() for g in rngs], np.float32)  # every lane draws
            new = np.zeros([len(lanes)], np.int32)  # [B]
            events = []
            for i, row in enumerate(lanes):
                if row is not None and row.done:
                    continue  # token 0: nothing reads a finished row
                if row is None:  # a filler: any token will do, nothing reads it
                    new[i] = int(np.argmax(logits[i]))
                    continue
                try:
                    new[i] = row.pick(logits[i], uniform[i])
                except Exception:
                    events.append(_failed(row))
                    continue
                if row.cancelled:
                    row.done = True
                    self.rows_cancelled += 1
                    continue
                self.tokens_sampled += 1
                piece, finish = row.add(int(new[i]), logits[i])
                if piece or finish:
                    events.append(row.event(piece, finish))
            for q, t in zip(seqs, new):
                q.append(int(t))
            self._deliver(events)
            self.active_rows = sum(not r.done for r in batch)
            if self.active_rows == 0 or self._stopping or step == length - 1:
                break
            if width >= n_ctx:  # the window is full: slide it, as DecodeEngine.stream does
                seqs = [q[-keep:] for q in seqs]
                logits = backend.start(seqs)
                width = max(len(q) for q in seqs)
            else:
                logits = backend.step(new)
                width += 1
        if self._stopping:
            self._deliver([(r.job, r.index, "", "error") for r in batch if not r.done])

    @staticmethod
    def _deliver(events: list[tuple]) -> None:
        by_job: dict[_Job, list] = {}
        for job, index, piece, finish, *scores in events:
            by_job.setdefault(job, []).append((index, piece, finish, scores[0] if scores else []))
        for job, items in by_job.items():
            try:
                job.loop.call_soon_threadsafe(job.push, items)
            except RuntimeError:  # its event loop has closed: nobody is waiting any more
                pass


def _tile(rows: int, max_batch: int) -> int:
    """Rows the step is planned for: a power of two, so the plan changes rarely."""
    return min(max_batch, 1 << max(0, rows - 1).bit_length())


class _Slot:
    """A row's decode state. Running: `tokens` is its window, all of it in the cache but the
    newest token, and `logits` the prediction for its next token. Still being prefilled:
    `tokens` is the part of its prompt in the cache, `pending` the rest, `logits` None."""

    def __init__(self, row: _Row, pending: list[int]):
        self.row, self.logits, self.tokens, self.pending = row, None, [], list(pending)

    @property
    def cached(self) -> int:
        """How many of the row's cache slots are filled."""
        return len(self.tokens) - (0 if self.pending or self.logits is None else 1)


class ContinuousBatcher(Batcher):
    """Iteration-level batching over the fast decode path: a request's rows join the running
    batch at the next step when there is room and leave as soon as they finish.

    Every running row sits at its own position in its own cache row (the backend's stepper
    keeps them apart), a new prompt is prefilled into a free row between two steps, and a row's
    numbers never depend on how many rows share a step (the native step and XNNPACK both
    compute each row alike whatever the row count; tests check it bit for bit), so a seeded
    request gives the same text alone or under load with no padding. The step is planned for
    a power-of-two row count (re-planning costs tens of milliseconds), shrinking when few rows
    remain.
    """

    batch_invariant = True

    def __init__(self, gen, *, max_batch: int, queue_size: int, **_):
        super().__init__(gen, max_batch=max_batch, queue_size=queue_size)
        self.stepper = gen.engine.backend.stepper
        # The native step takes a prompt chunk and the running rows' step in one pass over the
        # weights (TFLite runs a chunk as a pass of its own, between two steps).
        self._mixed = hasattr(self.stepper, "step_rows")
        self.n_ctx = gen.hparams.n_ctx
        self.keep = self.n_ctx - self.n_ctx // 4  # the window slides as in DecodeEngine
        self.slots: list[_Slot] = []

    def _loop(self) -> None:
        while self._wait_for_work():
            try:
                self._admit()
                self._sample()
                self._step()
            except Exception:  # a bug or a runtime failure: fail the running rows, keep serving
                log.exception("generation failed for %d running rows", len(self.slots))
                self._deliver([(s.row.job, s.row.index, "", "error") for s in self.slots])
                self.slots = []
            self.active_rows = len(self.slots)
        self._deliver([(s.row.job, s.row.index, "", "error") for s in self.slots])
        self.slots = []

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._stopping:
                self._drop_cancelled()
                if self.slots or self._pending:
                    return True
                self._cond.wait()
            return False

    def _admit(self) -> None:
        """Prefill waiting rows into free cache rows, between two steps of the running ones.

        While others decode, one chunk of one prompt runs per step (a long prompt takes several
        steps, so the running streams pause for one chunk at a time, never a whole prompt);
        when nothing runs, as many whole prompts as fit."""
        if any(slot.logits is not None for slot in self.slots):
            filling = next((s for s in self.slots if s.pending), None)
            if filling is None and self._new_slot() is None:
                return
            if not self._mixed:  # else the chunk runs inside the next step (_step)
                self._fill(filling or self.slots[-1], whole=False)
            return
        for slot in [s for s in self.slots if s.pending]:
            self._fill(slot, whole=True)
        while len(self.slots) < self.max_batch and (slot := self._new_slot()) is not None:
            self._fill(slot, whole=True)

    def _new_slot(self) -> "_Slot | None":
        """The oldest waiting row in a new slot (its cache row: the next free one), or None."""
        if len(self.slots) >= self.max_batch:
            return None
        with self._cond:
            self._drop_cancelled()
            if not self._pending:
                return None
            row = self._pending.popleft()
        n = len(self.slots)
        if self.stepper.rows < n + 1:
            self.stepper.resize(_tile(n + 1, self.max_batch))
        slot = _Slot(row, row.context[-(self.n_ctx - 1):])  # room for the first new token
        self.slots.append(slot)
        return slot

    def _fill(self, slot: "_Slot", *, whole: bool) -> None:
        """Prefill the next chunk of a slot's prompt (all of it if `whole`); a failure fails
        this row alone (its slot is dropped; its cache row is refilled by the next one)."""
        i = self.slots.index(slot)
        size = self.stepper.chunk_size
        try:
            while slot.pending:
                chunk, slot.pending = slot.pending[:size], slot.pending[size:]
                logits = self.stepper.extend(i, chunk, len(slot.tokens))  # [V]
                slot.tokens += chunk
                if not whole:
                    break
        except Exception:
            log.exception("prefill failed for one row (its request fails)")
            self._deliver([(slot.row.job, slot.row.index, "", "failed")])
            self._keep([s for s in self.slots if s is not slot])
            return
        if not slot.pending:
            slot.logits = logits

    def _sample(self) -> None:
        """Pick every running row's next token; deliver text; retire finished rows."""
        events, kept = [], []
        for slot in self.slots:
            row = slot.row
            if row.cancelled:
                self.rows_cancelled += 1
                continue
            if slot.logits is None:  # still being prefilled: nothing to sample yet
                kept.append(slot)
                continue
            try:  # each row draws from its own stream: the order of the rows does not matter
                token = row.pick(slot.logits, np.float32(row.rng.random()))
                piece, finish = row.add(token, slot.logits)
            except Exception:  # this row's settings broke the sampler: it fails alone
                events.append(_failed(row))
                continue
            self.tokens_sampled += 1
            slot.tokens.append(token)
            if piece or finish:
                events.append(row.event(piece, finish))
            if not row.done:
                kept.append(slot)
        self._deliver(events)
        self._keep(kept)

    def _keep(self, kept: list[_Slot]) -> None:
        """Move the kept rows' caches to rows 0..len(kept)-1."""
        for dst, slot in enumerate(kept):
            src = self.slots.index(slot)
            if src != dst:
                self.stepper.copy_row(src, dst, slot.cached)
        self.slots = kept

    def _step(self) -> None:
        """One decode step for every running row; a row whose window is full slides instead
        (its kept tokens are prefilled again, as DecodeEngine does)."""
        if not self.slots:
            return
        self.batches += 1
        want = _tile(len(self.slots), self.max_batch)
        # The slots the rows will fill: a running row's newest token, a prefilling row's prompt.
        slots = min(self.n_ctx, max(len(s.tokens) + len(s.pending) + 1 for s in self.slots))
        # Half the planned rows idle: plan for fewer (a lone client then runs at batch 1), the
        # cache fitted to the rows left. Half the cache unneeded: shrink it, since attention
        # reads every slot of every row (once the long requests are gone, a cache they grew to
        # 1024 slots would cost short ones 2x per step at 16 rows). Else no re-plan.
        fewer = want * 2 <= self.stepper.rows
        self.stepper.resize(want if fewer else self.stepper.rows,
                            slots if fewer or slots * 2 <= self.stepper.cache_len else None)
        rows = self.stepper.rows
        tokens = np.zeros([rows], np.int32)  # [rows]; unused rows: token 0 at slot 0, unread
        positions = np.zeros([rows], np.int32)
        slid = set()
        for i, slot in enumerate(self.slots):
            if slot.logits is None:  # being prefilled: the step writes a throwaway at its next
                positions[i] = len(slot.tokens)  # free slot, which its next chunk overwrites
                slid.add(i)
            elif len(slot.tokens) - 1 >= self.n_ctx:  # the newest token has no slot left
                slot.tokens = slot.tokens[-self.keep:]
                slot.logits = self.stepper.prefill(i, slot.tokens)
                slid.add(i)
                # The step below writes a throwaway at this row's next free slot, which its
                # own next step overwrites before anything attends to it.
                positions[i] = len(slot.tokens)
            else:
                tokens[i], positions[i] = slot.tokens[-1], len(slot.tokens) - 1
        if self._mixed:
            self._step_mixed([i for i in range(len(self.slots)) if i not in slid], tokens,
                             positions)
        elif len(slid) < len(self.slots):
            logits = self.stepper.step(tokens, positions)  # [rows, V]
            for i, slot in enumerate(self.slots):
                if i not in slid:
                    slot.logits = logits[i]

    def _step_mixed(self, running: list[int], tokens: np.ndarray, positions: np.ndarray) -> None:
        """The running rows' step and the next chunk of one prefilling row's prompt, in one
        call (only the listed rows are computed: no idle rows). Where that call fails, the
        chunk runs alone (_fill: a failure there fails that row only) and the step again."""
        slots = [self.slots[i] for i in running]
        tokens, positions = tokens[running], positions[running]
        filling = next((s for s in self.slots if s.pending and s.logits is None), None)
        logits = None
        if filling is not None and slots:
            chunk = filling.pending[:self.stepper.chunk_size]
            try:
                logits, last = self.stepper.step_rows(
                    np.array(running), tokens, positions,
                    (self.slots.index(filling), chunk, len(filling.tokens)))
            except Exception:
                log.exception("a step with a prompt chunk failed: running them apart")
                self._fill(filling, whole=False)  # may drop that row: find the others again
            else:
                filling.tokens += chunk
                filling.pending = filling.pending[len(chunk):]
                if not filling.pending:
                    filling.logits = last
        if logits is None and slots:
            rows = np.array([self.slots.index(s) for s in slots])
            logits = self.stepper.step_rows(rows, tokens, positions)[0]
        for slot, row_logits in zip(slots, logits if slots else []):
            slot.logits = row_logits
