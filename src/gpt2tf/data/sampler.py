"""The training data sampler: random windows drawn fairly across the corpus, resumable.

Two modes (`--sample_mode`). `windows`: a window may start at any token. `documents`: a window
starts only where a document does, at the `<|endoftext|>` that ends the document before it (or
at a piece's first token), so the model learns how documents begin, as an unconditional sample
begins after `<|endoftext|>`; the documents that follow fill the rest of the window (short ones
are packed together), and one longer than the window is cut at it. Either way the draws depend
only on the data and one random stream, whose state `state_dict()` saves: a resumed run sees
the same windows.
"""

import numpy as np

from gpt2tf.errors import UserError

SAMPLE_MODES = ("windows", "documents")


def split_tokens(
    chunks: list[np.ndarray], val_fraction: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, val): the last `val_fraction` of all tokens held out, in chunk order."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    total = sum(len(c) for c in chunks)
    n_val = int(round(total * float(val_fraction)))
    if n_val < 1 or n_val >= total:
        raise UserError(
            f"val_fraction={val_fraction} of {total} tokens leaves no training or no"
            " validation data"
        )
    train, val = list(chunks), []
    need = n_val
    while need:
        last = train.pop()
        if len(last) <= need:
            val.insert(0, last)
            need -= len(last)
        else:
            train.append(last[: len(last) - need])
            val.insert(0, last[len(last) - need :])
            need = 0
    return train, val


def document_starts(chunk: np.ndarray, eot: int) -> np.ndarray:
    """Where the documents of a chunk start: position 0 and every `<|endoftext|>` (int64)."""
    starts = np.flatnonzero(np.asarray(chunk) == eot).astype(np.int64)
    if not len(starts) or starts[0] != 0:
        starts = np.concatenate([np.zeros(1, np.int64), starts])
    return starts


class Sampler:
    """Fair random windows over token chunks (nshepperd's Sampler, without rejection sampling).

    Every start position whose window fits inside its chunk is equally likely, as if sampling
    from one concatenated array without crossing chunk boundaries; in `documents` mode only the
    starts of documents count (see the module doc; `eot` is the separator's id). The random
    state round-trips through `state_dict()` (plain JSON) so a resumed run sees the same data
    stream.
    """

    def __init__(self, chunks: list[np.ndarray], seed: int | None = None, *,
                 mode: str = "windows", eot: int | None = None):
        if mode not in SAMPLE_MODES:
            raise UserError(f"sample_mode must be one of {', '.join(SAMPLE_MODES)}, got {mode!r}")
        if mode == "documents" and eot is None:
            raise UserError("sample_mode documents needs an <|endoftext|> token to find where"
                            " documents start, and the vocabulary has none: use --sample_mode"
                            " windows")
        self.chunks = [np.asarray(c) for c in chunks]
        self.seed = seed
        self.mode, self.eot = mode, eot
        self.total_size = sum(len(c) for c in self.chunks)
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._starts_for: tuple[int, np.ndarray] | None = None
        self._doc_starts: list[np.ndarray] | None = None

    def _documents(self) -> list[np.ndarray]:
        if self._doc_starts is None:  # one pass over the tokens, only in documents mode
            self._doc_starts = [document_starts(c, self.eot) for c in self.chunks]
        return self._doc_starts

    def _cumulative_starts(self, length: int) -> np.ndarray:
        if length < 1:
            raise UserError(f"window length must be at least 1, got {length}")
        if self._starts_for is None or self._starts_for[0] != length:
            if self.mode == "documents":
                # The starts are sorted: those whose window fits are a prefix of them.
                counts = np.array([
                    np.searchsorted(starts, len(c) - length, side="right")
                    for c, starts in zip(self.chunks, self._documents())
                ], dtype=np.int64)
            else:
                counts = np.array([max(0, len(c) - length + 1) for c in self.chunks],
                                  dtype=np.int64)
            self._starts_for = (length, np.cumsum(counts))
        cum = self._starts_for[1]
        if not len(cum) or cum[-1] == 0:
            longest = max((len(c) for c in self.chunks), default=0)
            raise UserError(
                f"dataset has {self.total_size} tokens (longest piece {longest}), need at least"
                f" {length} in one piece for a window of {length} tokens: add text or use a"
                " shorter window (--seq_len)"
            )
        return cum

    def _window(self, cum: np.ndarray, index: int, length: int) -> np.ndarray:
        i = int(np.searchsorted(cum, index, side="right"))
        start = index - (int(cum[i - 1]) if i else 0)
        if self.mode == "documents":
            start = int(self._documents()[i][start])
        return self.chunks[i][start : start + length]

    def coverage(self, length: int) -> float:
        """The share of the tokens that some window of `length` holds (1.0 in windows mode;
        less in documents mode where documents are longer than the window)."""
        if self.mode == "windows" or not self.total_size:
            return 1.0
        cum = self._cumulative_starts(length)
        covered, before = 0, 0
        for c, starts, n in zip(self.chunks, self._documents(), cum):
            fit = starts[: int(n) - before]
            before = int(n)
            if len(fit):  # each start covers up to the next start, at most `length` tokens
                gaps = np.diff(np.append(fit, fit[-1] + length))
                covered += int(np.minimum(gaps, length).sum())
        return covered / self.total_size

    def sample(self, length: int) -> np.ndarray:
        """One window of `length` consecutive tokens (a copy, int32)."""
        cum = self._cumulative_starts(length)
        index = int(self._rng.integers(cum[-1]))
        return np.array(self._window(cum, index, length), dtype=np.int32)

    def sample_batch(self, batch_size: int, length: int) -> np.ndarray:
        """[batch_size, length] windows, drawn one after another as sample() does."""
        return np.stack([self.sample(length) for _ in range(batch_size)])

    def fixed_windows(self, length: int, count: int, seed: int = 0) -> np.ndarray:
        """[count, length] windows fixed by the data and `seed` alone: a stable validation set."""
        cum = self._cumulative_starts(length)
        rng = np.random.Generator(np.random.PCG64(seed))
        idx = rng.integers(cum[-1], size=count)
        return np.stack([self._window(cum, int(i), length) for i in idx]).astype(np.int32)

    def split(self, val_fraction: float) -> tuple["Sampler", "Sampler"]:
        """(train, val) samplers over the first and the last `val_fraction` of the tokens."""
        train, val = split_tokens(self.chunks, val_fraction)
        return (Sampler(train, seed=self.seed, mode=self.mode, eot=self.eot),
                Sampler(val, seed=self.seed, mode=self.mode, eot=self.eot))

    def state_dict(self) -> dict:
        """The random state as plain JSON types."""
        return {
            "version": 1,
            "total_size": self.total_size,
            "sample_mode": self.mode,
            "bit_generator": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the random stream where `state_dict()` left it."""
        try:
            bit_state = state["bit_generator"]
            bit_generator = np.random.PCG64()
            bit_generator.state = bit_state
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"bad sampler state ({type(e).__name__}: {e})") from None
        self._rng = np.random.Generator(bit_generator)
