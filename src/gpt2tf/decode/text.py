"""Text out of token ids, as it is generated: UTF-8 pieces, stop strings, truncate, samples.

`TextStream` is the one incremental decoder behind the CLIs, the Python API and the server.
"""

import codecs
import json
import os
from typing import Sequence

from gpt2tf import fileio
from gpt2tf.errors import UserError

class TextStream:
    """One growing continuation's text, released piece by piece as tokens arrive.

    Tokens are decoded to UTF-8 incrementally (a character split across tokens appears once it
    is complete). The stream ends at <|endoftext|> (`eot`), after `max_tokens`, or at the first
    of the `stops` strings, which is cut off with everything after it. Text is released only
    once it can no longer turn out to be the start of a stop string, so the released pieces
    always add up to the final text.
    """

    def __init__(self, encoder, *, stops: Sequence[str] = (), truncate: str | None = None,
                 eot: int | None = None, max_tokens: int | None = None):
        self.encoder = encoder
        self.stops = tuple(s for s in (*stops, truncate or "") if s)
        self.eot, self.max_tokens = eot, max_tokens
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.tokens: list[int] = []
        self.done = False
        self.finish_reason: str | None = None  # "stop" or "length" once done
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._released: list[str] = []
        self._unreleased = ""  # text that may still be the start of a stop string

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def text(self) -> str:
        """The text released so far (all of it once done)."""
        return "".join(self._released)

    def add(self, token: int) -> tuple[str, str | None]:
        """Consume one sampled token: (text to release, finish_reason or None). A finished
        stream ignores further tokens."""
        if self.done:
            return "", None
        if token == self.eot:
            return self._finish("stop")
        self.tokens.append(token)
        text = self._unreleased + self._decoder.decode(self._token_bytes(token))
        # Released text holds no stop string nor the start of one, so a stop lies within text.
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._unreleased = ""
            self.done, self.finish_reason = True, "stop"
            return self._release(text[:min(hits)]), "stop"
        self._unreleased = text
        if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
            return self._finish("length")
        keep = self._held_back(text)
        self._unreleased = text[len(text) - keep:]
        return self._release(text[:len(text) - keep]), None

    def finish(self) -> str:
        """End the stream where it is (the caller stopped generating): the held-back text."""
        if self.done:
            return ""
        return self._finish("length")[0]

    def _token_bytes(self, token: int) -> bytes:
        # Ids the model has but the vocabulary lacks (a padded n_vocab) decode to nothing.
        try:
            return self.encoder.decode_bytes([token])
        except UserError:
            return b""

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of text that starts some stop string."""
        for k in range(min(self.longest_stop - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _release(self, piece: str) -> str:
        if piece:
            self._released.append(piece)
        return piece

    def _finish(self, reason: str) -> tuple[str, str]:
        self.done, self.finish_reason = True, reason
        # A character cut off by the end becomes U+FFFD, as in a full decode.
        piece = self._unreleased + self._decoder.decode(b"", final=True)
        self._unreleased = ""
        return self._release(piece), reason


def format_sample(text: str, sample_delim: str, nsamples: int) -> str:
    """One sample as gpt-2-simple prints and writes it: text, newline, delimiter (none if alone)."""
    return f"{text}\n{sample_delim if nsamples > 1 else ''}"


def write_samples(path: str | os.PathLike, texts: list[str], sample_delim: str) -> None:
    """Write samples the way gpt-2-simple's generate_to_file does, atomically."""
    with fileio.atomic_open(path, "w") as f:
        for text in texts:
            f.write(format_sample(text, sample_delim, len(texts)))


def read_prompts(path: str | os.PathLike, field: str = "text") -> list[str]:
    """The prompts in a file: one per line, or from a .jsonl, each line's `field`.

    Lines keep their inner spaces; a text file's empty lines are skipped, as are a .jsonl's."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"cannot read the prompts file {path}: {why}") from None
    if not os.fspath(path).endswith(".jsonl"):
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise UserError(f"{path} line {number} is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise UserError(f"{path} line {number} has no text field {field!r} (give"
                                " --field)")
            prompts.append(record[field])
    if not prompts:
        raise UserError(f"the prompts file {path} holds no prompts")
    return prompts
