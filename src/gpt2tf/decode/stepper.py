"""What the two decode steppers share: rows of a KV cache at their own positions, its lengths,
and the checks on every call.

A stepper (decode/native.py's NativeStep, decode/lite.py's LiteStep) keeps `rows` cache rows of
`cache_len` slots and runs tokens into them: `extend` a chunk of one row's prompt, `step` one
token per row at the row's own position. This base holds the interface and its checks; a
subclass supplies `rows`, `cache_len`, `chunk_size`, `_replan`, `extend`, `copy_row` and `step`.
"""

from collections.abc import Sequence

import numpy as np

from gpt2tf.errors import UserError
from gpt2tf.hparams import HParams


def cache_lengths(n_ctx: int) -> tuple[int, ...]:
    """Cache lengths a stepper runs at: 128, 256, 512, ... below n_ctx, and n_ctx itself.

    TFLite's attention reads every slot of the cache, so a short context should not pay for
    n_ctx slots; doubling keeps the re-plans (one per size crossed) few. (The native step reads
    only the filled slots: for it the length is memory, not time.)
    """
    sizes, s = [], 128
    while s < n_ctx:
        sizes.append(s)
        s *= 2
    return tuple(sizes) + (n_ctx,)


def checked_weights(weights: dict[str, np.ndarray], hparams: HParams) -> dict[str, np.ndarray]:
    """A checkpoint's arrays as float32, each of the shape `hparams` give it (OpenAI's layout),
    by checkpoint name; a missing or misshapen one is a UserError."""
    from gpt2tf import model  # TensorFlow: only for the variable shapes

    shapes = model.variable_shapes(hparams)
    missing = sorted(shapes.keys() - weights.keys())
    if missing:
        raise UserError(
            f"the weights lack {len(missing)} of GPT-2's tensors (e.g. {missing[0]}): is this "
            f"a GPT-2 checkpoint of n_layer={hparams.n_layer}?"
        )
    out = {}
    for name, shape in shapes.items():
        out[name] = np.asarray(weights[name], np.float32)
        if list(out[name].shape) != shape:
            raise UserError(
                f"weight {name} has shape {list(out[name].shape)}, but the hparams give {shape}"
            )
    return out


class Stepper:
    """The cache's rows and lengths, and the argument checks both steppers make."""

    hparams: HParams
    runtime: str  # what FastBackend reports: "native" or "tflite"

    def __init__(self, hparams: HParams, threads: int):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise UserError(f"threads must be a positive integer, got {threads!r}")
        self.hparams = hparams
        self._lengths = cache_lengths(hparams.n_ctx)

    # ------------------------------------------------------------------ a subclass's part

    @property
    def rows(self) -> int:
        raise NotImplementedError

    @property
    def cache_len(self) -> int:
        """The slots each row has now (one of cache_lengths(n_ctx))."""
        raise NotImplementedError

    @property
    def chunk_size(self) -> int:
        """The most tokens one extend() takes."""
        raise NotImplementedError

    def _replan(self, rows: int, cache_len: int, *, keep: bool) -> None:
        """`rows` rows of `cache_len` slots; with `keep`, the kept rows' kept slots carried."""
        raise NotImplementedError

    def extend(self, row: int, tokens: Sequence[int], start: int) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def _fit(self, slots: int) -> None:
        """Grow the cache to the next length that holds `slots` slots (it never shrinks here)."""
        if slots > self.cache_len:
            self._replan(self.rows, self._length_for(slots), keep=True)

    def _length_for(self, slots: int) -> int:
        """The shortest cache length (of cache_lengths) that holds `slots` slots."""
        if not 1 <= slots <= self.hparams.n_ctx:
            raise ValueError(f"slots must be 1..n_ctx={self.hparams.n_ctx}, got {slots!r}")
        return min(s for s in self._lengths if s >= slots)

    @staticmethod
    def _check_rows(rows) -> int:
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"rows must be a positive integer, got {rows!r}")
        return int(rows)

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.rows:
            raise ValueError(f"row must be 0..{self.rows - 1} (start() made {self.rows}),"
                             f" got {row}")

    def _token_ids(self, tokens, what: str) -> np.ndarray:
        ids = np.asarray(tokens)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"{what} must be a 1-D sequence of token ids, got {ids.dtype}"
                             f" of shape {list(ids.shape)}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.hparams.n_vocab):
            raise UserError(f"{what}: token ids must be 0..{self.hparams.n_vocab - 1}, got "
                            f"{ids.min()}..{ids.max()}")
        return ids.astype(np.int32)

    def _check_chunk(self, row: int, tokens, start: int) -> np.ndarray:
        """extend()'s arguments checked; the chunk's token ids."""
        self._check_row(row)
        tokens = self._token_ids(tokens, "the prompt")
        n, n_ctx = len(tokens), self.hparams.n_ctx
        if not 1 <= n <= self.chunk_size or not 0 <= start <= n_ctx - n:
            raise ValueError(f"a chunk must have 1 to {self.chunk_size} tokens within n_ctx="
                             f"{n_ctx}, got {n} from position {start}")
        return tokens

    def _check_step(self, tokens, positions, rows: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """step()'s arguments checked (one per row of `rows` rows, default all of them):
        (token ids, positions) as int32."""
        rows = self.rows if rows is None else rows
        tokens = self._token_ids(tokens, "tokens")
        positions = np.asarray(positions)
        if tokens.shape != (rows,) or positions.shape != (rows,):
            raise ValueError(
                f"tokens and positions must have shape [{rows}] (one per row), got"
                f" {list(tokens.shape)} and {list(positions.shape)}")
        if positions.size and (positions.dtype.kind not in "iu" or positions.min() < 0 or
                               positions.max() >= self.hparams.n_ctx):
            raise UserError(f"positions must be 0..n_ctx-1={self.hparams.n_ctx - 1}, got "
                            f"{positions.min()}..{positions.max()} ({positions.dtype})")
        return tokens, positions.astype(np.int32)

    def _check_copy(self, src: int, dst: int, length: int) -> None:
        self._check_row(src)
        self._check_row(dst)
        if not 0 <= length <= self.cache_len:
            raise ValueError(f"length must be 0..{self.cache_len} (the cache length), got"
                             f" {length}")

    # ------------------------------------------------------------------ the public calls

    def start(self, rows: int, slots: int = 1) -> None:
        """Make room for `rows` rows, all empty, at the shortest cache length that holds `slots`
        slots (the longest prompt to prefill): re-plan only when the row count or that length
        changes.

        Nothing is cleared otherwise: stale slots are never read (masked, or past the row's
        position) until a prefill or step writes them. A cache that an earlier generation grew
        goes back to the length these prompts need: TFLite's attention reads every slot, so a
        batch of 8 left at 512 slots would step at 94 ms instead of 67 (124M).
        """
        rows, length = self._check_rows(rows), self._length_for(slots)
        if rows != self.rows or length != self.cache_len:
            self._replan(rows, length, keep=False)

    def resize(self, rows: int, slots: int | None = None) -> None:
        """Change the row count keeping rows 0..min(old, new)-1 as they are (the server's rows
        come and go between steps; a row's numbers never depend on how many rows share a step).

        With `slots`, the cache also takes the shortest length that holds that many slots, up
        or down; the kept rows' first `slots` slots are carried over, so every filled slot
        must lie below it."""
        rows = self._check_rows(rows)
        length = self.cache_len if slots is None else self._length_for(slots)
        if rows != self.rows or length != self.cache_len:
            self._replan(rows, length, keep=True)

    def prefill(self, row: int, tokens: Sequence[int]) -> np.ndarray:
        """Run one prompt (1 <= len <= n_ctx) into cache row `row` at slots 0..len-1 (other rows
        untouched), chunk by chunk. Returns logits [n_vocab] float32 of the last prompt token."""
        tokens = self._token_ids(tokens, "the prompt")
        n = len(tokens)
        if not 1 <= n <= self.hparams.n_ctx:
            raise UserError(f"a prompt must have 1 to n_ctx={self.hparams.n_ctx} tokens, got {n}")
        size = self.chunk_size
        for start in range(0, n, size):
            logits = self.extend(row, tokens[start:start + size], start)
        return logits
