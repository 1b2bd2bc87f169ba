"""Byte-level BPE in OpenAI's format (encoder.json + vocab.bpe), exact, with a native fast path.

Text is first split by GPT-2's regex pre-tokenizer; each piece's UTF-8 bytes are mapped to
printable characters (`bytes_to_unicode`) and merged pairwise in vocab.bpe's rank order. The
pure-Python implementation here is the reference. Any vocabulary whose ids follow its merge
order (GPT-2's, and every one `gpt2tf tokenizer train` writes) is also handed to tiktoken's
Rust BPE, which gives the same ids many times faster (see `Encoder._tiktoken_mismatch` for the
exact condition); tests compare both paths. GPT-2's own files are recognised by sha256 and
skip the checks.

Unlike OpenAI's encoder (and nshepperd's and gpt-2-simple's, which copy it), `<|endoftext|>` in the
text becomes the single end-of-text token (50256 in GPT-2) instead of seven plain-text tokens.
No file I/O here: the caller passes the files' bytes (see `gpt2tf.source.ModelSource.encoder`).
"""

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import numpy as np
import regex

from gpt2tf.errors import UserError

ENDOFTEXT = "<|endoftext|>"
STARTOFTEXT = "<|startoftext|>"  # gpt-2-simple's document start marker: plain text to GPT-2

GPT2_ENCODER_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# OpenAI's pre-tokenizer, unchanged (src/encoder.py). Contractions, letters, numbers and other
# symbols each take at most one leading space; whitespace before a non-space is left for it.
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same pattern for tiktoken's regex engine with the contractions folded into one branch: the
# seven alternatives all start with an apostrophe and differ in their next letter, so both forms
# match the same text at every position, and this one runs ~20% faster in fancy-regex (tests
# check its ids against the pure-Python encoder above).
FAST_PAT_STR = r"""'(?:[stmd]|re|ve|ll)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_CACHE_SIZE = 1 << 16  # pre-token -> ids entries kept by the pure-Python path


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, used to spell tokens in the JSON.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, soft hyphen...)
    map to 256, 257, ... in byte order. The order of the keys is also GPT-2's id order of the
    single-byte tokens (ids 0..255).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in mapping]
    for n, b in enumerate(shifted):
        mapping[b] = chr(256 + n)
    return mapping


def byte_level_vocab() -> tuple[bytes, bytes]:
    """(encoder.json, vocab.bpe) contents of a 257-token vocabulary: 256 bytes + <|endoftext|>.

    The byte tokens get the ids GPT-2 gives single bytes (0..255); there are no merges, so every
    UTF-8 byte is one token. Tiny test models use it in place of GPT-2's 50257-token vocabulary.
    """
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab[ENDOFTEXT] = len(vocab)
    encoder_json = json.dumps(vocab, ensure_ascii=False).encode("utf-8")
    return encoder_json, b"#version: 0.2\n"


def _replace_surrogates(text: str) -> str:
    """Lone surrogates have no UTF-8 form: make them U+FFFD, as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _is_special(token: str) -> bool:
    """A control token such as `<|endoftext|>`, `<pad>` or `[PAD]`: made by no merge."""
    return len(token) > 2 and (token[0], token[-1]) in (("<", ">"), ("[", "]"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_encoder_json(raw: bytes, source: str) -> dict[str, int]:
    """encoder.json's token -> id map, checked: a JSON object of distinct integer ids >= 0."""
    try:
        vocab = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{source}: encoder.json is not valid UTF-8 JSON ({e})") from None
    except RecursionError:  # json's parser recurses once per level of nesting
        raise UserError(f"{source}: encoder.json is nested too deeply to be a vocabulary (a flat"
                        " JSON object of token: id): re-download the model") from None
    if not isinstance(vocab, dict) or not vocab:
        raise UserError(f"{source}: encoder.json must be a non-empty JSON object of token: id")
    for token, idx in vocab.items():
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise UserError(
                f"{source}: encoder.json maps {token!r} to {idx!r}; ids must be integers >= 0"
            )
    if len(set(vocab.values())) != len(vocab):
        raise UserError(f"{source}: encoder.json gives two tokens the same id")
    # The largest id sizes the id -> token table (and the model's embeddings): an id far past
    # the number of tokens would allocate for ids that name nothing.
    largest = max(vocab.values())
    if largest >= 2 * len(vocab):
        raise UserError(f"{source}: encoder.json's largest id is {largest:,} but it has only"
                        f" {len(vocab):,} tokens: ids should number the tokens from 0")
    return vocab


def _parse_vocab_bpe(raw: bytes, source: str) -> list[tuple[str, str]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source}: vocab.bpe is not valid UTF-8 ({e})") from None
    lines = text.split("\n")
    first = 1 if lines and lines[0].startswith("#version") else 0
    merges = []
    for lineno, line in enumerate(lines[first:], start=first + 1):
        line = line.rstrip("\r")
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UserError(
                f"{source}: vocab.bpe line {lineno} should hold two symbols, got {line[:60]!r}"
            )
        merges.append((parts[0], parts[1]))
    return merges


class Encoder:
    """GPT-2's tokenizer: `encode(text) -> ids`, `decode(ids) -> text`.

    `encoder` maps token strings (in bytes_to_unicode spelling) to ids; `bpe_merges` lists the
    merges best first, or is a function returning them, called when first needed (GPT-2's fast
    path never needs them: its files are verified by sha256).

    `fast=None` uses tiktoken when it gives identical ids: when the vocabulary passes
    `_tiktoken_mismatch` (any BPE-trained vocabulary numbered in merge order does), or when the
    caller vouches for it with `tiktoken_exact` (`from_bytes` sets it for GPT-2's own files, by
    sha256). `fast=False` forces the pure-Python reference; `fast=True` requires tiktoken.
    """

    def __init__(
        self,
        encoder: dict[str, int],
        bpe_merges: Sequence[tuple[str, str]] | Callable[[], Sequence[tuple[str, str]]],
        *,
        fast: bool | None = None,
        tiktoken_exact: bool = False,
        source: str = "vocabulary",
    ):
        self.encoder = dict(encoder)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self._n_vocab = max(self.encoder.values()) + 1
        self._merges = bpe_merges
        self._bpe_ranks: dict[tuple[str, str], int] | None = None
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {ch: b for b, ch in self.byte_encoder.items()}
        self.source = source
        if not tiktoken_exact:
            self._check(source)

        # Each piece's UTF-8 bytes, read as Latin-1, become GPT-2's characters in one translate.
        self._byte_table = {b: ch for b, ch in self.byte_encoder.items()}
        self._unbyte_table = {ord(ch): b for b, ch in self.byte_encoder.items()}
        self._byte_chars = frozenset(self.byte_decoder)
        self._pat = regex.compile(PAT_STR)
        self._piece_ids = functools.lru_cache(maxsize=_CACHE_SIZE)(self._piece_ids_uncached)
        self._id_bytes = self._all_token_bytes()

        self._tiktoken_exact = tiktoken_exact
        # fast=False never needs the verdict: skip its cost (one BPE run per token).
        mismatch = None if tiktoken_exact or fast is False else self._tiktoken_mismatch()
        if fast and mismatch:
            raise UserError(
                f"{source}: the tiktoken fast path would not give this vocabulary's ids"
                f" ({mismatch}); use fast=None or fast=False"
            )
        self._tiktoken = None if fast is False or mismatch else self._build_tiktoken()

    @classmethod
    def from_bytes(
        cls,
        encoder_json: bytes,
        vocab_bpe: bytes,
        source: str = "",
        *,
        fast: bool | None = None,
    ) -> "Encoder":
        """Build from the contents of encoder.json and vocab.bpe; `source` names them in errors."""
        where = source or "vocabulary"
        is_gpt2 = (
            _sha256(encoder_json) == GPT2_ENCODER_SHA256
            and _sha256(vocab_bpe) == GPT2_VOCAB_SHA256
        )
        # GPT-2's own files are known good (by sha256): skip checking them entry by entry.
        encoder = json.loads(encoder_json) if is_gpt2 else parse_encoder_json(encoder_json, where)
        if is_gpt2:
            merges = functools.partial(_parse_vocab_bpe, vocab_bpe, where)  # pure path only
        else:
            merges = _parse_vocab_bpe(vocab_bpe, where)
        return cls(encoder, merges, fast=fast, tiktoken_exact=is_gpt2, source=where)

    def _check(self, source: str) -> None:
        missing = [b for b, ch in self.byte_encoder.items() if ch not in self.encoder]
        if missing:
            raise UserError(
                f"{source}: encoder.json lacks {len(missing)} of the 256 byte tokens"
                f" (e.g. byte {missing[0]}); re-download the model or fix the file"
            )
        made = set(self.byte_encoder.values())
        for (first, second), rank in self.bpe_ranks.items():
            if first + second not in self.encoder:
                raise UserError(
                    f"{source}: vocab.bpe merge {rank + 1} ({first} {second}) makes a token that"
                    " encoder.json lacks: the two files do not belong together"
                )
            made.add(first + second)
        # The other way round: each token is a byte, a merge's result or a special token, so
        # len(encoder) = 256 + merges + specials (GPT-2: 256 + 50000 + 1). A token nothing makes
        # means merges are missing, e.g. a vocab.bpe cut short, whose tokens would never appear.
        unmade = [t for t in self.encoder if t not in made and not _is_special(t)]
        if unmade:
            specials = sum(1 for t in self.encoder if t not in made and _is_special(t))
            first = min(unmade, key=self.encoder.__getitem__)
            raise UserError(
                f"{source}: encoder.json has {len(self.encoder):,} tokens but the 256 bytes,"
                f" {len(self.bpe_ranks):,} vocab.bpe merges and {specials} special"
                f" token{'s' * (specials != 1)} make"
                f" only {len(self.encoder) - len(unmade):,}; {len(unmade):,} (e.g. {first!r},"
                f" id {self.encoder[first]}) are made by no merge: vocab.bpe is cut short or"
                " belongs to another vocabulary; re-download the model"
            )

    def _tiktoken_mismatch(self) -> str | None:
        """Why tiktoken could give other ids than the merges, or None when it gives the same.

        tiktoken ranks byte strings, not pairs: it joins the adjacent parts whose joined bytes
        have the lowest rank (here: the lowest id), and a piece that is a token becomes that
        token at once. That reproduces the merges exactly when (1) each merge makes a new
        token, numbered after the previous merge's (ids follow the merge order); (2) both halves
        of a merge are bytes or made by earlier merges, so merging ranks only ever rise; and (3)
        each token's own bytes merge back into that token, so no other split of it (`a`+`bc`
        for `ab`+`c`) can be joined where the merges would not join it. Every vocabulary BPE
        training writes has all three (GPT-2's does); a hand-edited one may lack them.
        """
        ids = self.encoder
        made = set(self.byte_decoder)  # bytes first: no merge's rank is compared with theirs
        last = -1
        for (first, second), rank in sorted(self.bpe_ranks.items(), key=lambda m: m[1]):
            token = first + second
            where = f"vocab.bpe merge {rank + 1} ({first} {second})"
            if token == ENDOFTEXT:
                return f"{where} makes {ENDOFTEXT}, which tiktoken keeps as a special token"
            if ids[token] <= last:
                return (f"{where} makes id {ids[token]}, not one above the previous merge's"
                        f" {last}: the ids are not in merge order")
            for half in (first, second):
                if half not in made:
                    return f"{where} joins {half!r}, which no earlier merge makes"
            made.add(token)
            last = ids[token]
        for (first, second), rank in self.bpe_ranks.items():
            if self.bpe(first + second) != (first + second,):
                return (f"the merges spell token {first + second!r} as"
                        f" {' '.join(self.bpe(first + second))}: vocab.bpe merge {rank + 1}"
                        " cannot apply")
        return None

    def _all_token_bytes(self) -> list[bytes | None]:
        """id -> the token's raw bytes (None for unused ids)."""
        out: list[bytes | None] = [None] * self.n_vocab
        tokens = list(self.encoder)
        joined = "".join(tokens)
        if not self._byte_chars.issuperset(joined):  # special tokens outside the byte alphabet
            for token, idx in self.encoder.items():
                out[idx] = self._token_bytes(token)
            return out
        # One translate for the whole vocabulary: every character is exactly one byte.
        blob = joined.translate(self._unbyte_table).encode("latin-1")
        start = 0
        for token, idx in zip(tokens, self.encoder.values()):
            end = start + len(token)
            out[idx] = blob[start:end]
            start = end
        return out

    def _token_bytes(self, token: str) -> bytes:
        if self._byte_chars.issuperset(token):
            return token.translate(self._unbyte_table).encode("latin-1")
        return token.encode("utf-8")  # a special token outside the byte alphabet

    def _build_tiktoken(self):
        import tiktoken

        # tiktoken ranks whole byte strings: a pair merges when its joined bytes have a rank.
        # Where ids follow the merge order (see _tiktoken_mismatch) that picks the same merges
        # as the pair ranks, so the mergeable ranks are the 256 bytes plus each merge's result,
        # under their own ids. Special tokens stay out: no merge makes them.
        if self._tiktoken_exact:  # GPT-2's files: every token but <|endoftext|> is one of those
            eot = self.encoder.get(ENDOFTEXT)
            ranks = {b: i for i, b in enumerate(self._id_bytes) if b is not None and i != eot}
        else:
            tokens = [*self.byte_decoder, *(a + b for a, b in self.bpe_ranks)]
            ranks = {self._id_bytes[self.encoder[t]]: self.encoder[t] for t in tokens}
        special = {ENDOFTEXT: self.eot_token} if self.eot_token is not None else {}
        return tiktoken.Encoding(
            name=f"gpt2tf:{self.source}",
            pat_str=FAST_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=special,
        )

    # --- properties -------------------------------------------------------------------------

    @property
    def bpe_ranks(self) -> dict[tuple[str, str], int]:
        """Merge pair -> rank (lower merges first), as OpenAI's encoder holds them."""
        if self._bpe_ranks is None:
            merges = self._merges() if callable(self._merges) else self._merges
            self._bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
            self._merges = None
        return self._bpe_ranks

    @property
    def n_vocab(self) -> int:
        """Size of the embedding table this vocabulary needs: the largest id + 1."""
        return self._n_vocab

    def check_fits(self, n_vocab: int, *, vocab: str, model: str, fix: str = "") -> None:
        """UserError unless a model with `n_vocab` embeddings covers every id of this
        vocabulary (`vocab` and `model` name where each number came from)."""
        if self.n_vocab > n_vocab:
            raise UserError(
                f"{vocab} has {self.n_vocab} tokens but {model}={n_vocab}: "
                + (fix or "the vocabulary does not belong to this model"))

    @property
    def eot_token(self) -> int | None:
        """Id of `<|endoftext|>`, or None when the vocabulary has no such token."""
        return self.encoder.get(ENDOFTEXT)

    @property
    def is_fast(self) -> bool:
        """True when encode() runs on tiktoken."""
        return self._tiktoken is not None

    # --- encoding ---------------------------------------------------------------------------

    def bpe(self, token: str) -> tuple[str, ...]:
        """Merge one pre-token (in bytes_to_unicode spelling) by rank: lowest-rank pair first."""
        word = list(token)
        ranks = self.bpe_ranks
        while len(word) > 1:
            best_rank, best = None, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged = []
            i = 0
            while i < len(word):
                # Every occurrence of the best pair merges in one left-to-right pass.
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def _piece_ids_uncached(self, piece: str) -> tuple[int, ...]:
        spelled = piece.encode("utf-8").decode("latin-1").translate(self._byte_table)
        return tuple(self.encoder[t] for t in self.bpe(spelled))

    def _encode_ordinary_pure(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._pat.findall(text):
            ids.extend(self._piece_ids(piece))
        return ids

    def _encode_pure(self, text: str) -> list[int]:
        eot = self.eot_token
        if eot is None or ENDOFTEXT not in text:
            return self._encode_ordinary_pure(text)
        ids: list[int] = []
        for n, part in enumerate(text.split(ENDOFTEXT)):
            if n:
                ids.append(eot)
            ids.extend(self._encode_ordinary_pure(part))
        return ids

    def _allowed_special(self) -> set[str]:
        return {ENDOFTEXT} if self.eot_token is not None else set()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; each `<|endoftext|>` becomes the single end-of-text id."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        try:
            return self._encode(text)
        except UnicodeEncodeError:
            return self._encode(_replace_surrogates(text))

    def _encode(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode(text, allowed_special=self._allowed_special())
        return self._encode_pure(text)

    def encode_batch(
        self, texts: Iterable[str], *, num_threads: int | None = None
    ) -> list[list[int]]:
        """encode() of each text; tiktoken encodes them on several threads."""
        texts = list(texts)
        if self._tiktoken is not None:
            return self._tiktoken.encode_batch(
                texts,
                num_threads=num_threads or os.cpu_count() or 1,
                allowed_special=self._allowed_special(),
            )
        return [self._encode_pure(t) for t in texts]

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """encode() as an int32 array, without building a Python list on the fast path."""
        if self._tiktoken is None:
            return np.asarray(self.encode(text), dtype=np.int32)
        special = self._allowed_special()
        try:
            ids = self._tiktoken.encode_to_numpy(text, allowed_special=special)
        except UnicodeEncodeError:
            ids = self._tiktoken.encode_to_numpy(_replace_surrogates(text), allowed_special=special)
        return ids.view(np.int32)  # uint32 ids below 2**31: the same bits

    def encode_batch_to_numpy(
        self, texts: Iterable[str], *, num_threads: int | None = None
    ) -> list[np.ndarray]:
        """encode_to_numpy() of each text, on several threads when tiktoken does the work."""
        texts = list(texts)
        threads = min(len(texts), num_threads or os.cpu_count() or 1)
        if self._tiktoken is None or threads <= 1:
            return [self.encode_to_numpy(t) for t in texts]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.encode_to_numpy, texts))

    # --- decoding ---------------------------------------------------------------------------

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        """The raw UTF-8 bytes of `tokens` (a token may end inside a character)."""
        table = self._id_bytes
        out = []
        for t in tokens:
            t = int(t)
            piece = table[t] if 0 <= t < len(table) else None
            if piece is None:
                raise UserError(f"token id {t} is not in the vocabulary (n_vocab {self.n_vocab})")
            out.append(piece)
        return b"".join(out)

    def decode(self, tokens: Iterable[int]) -> str:
        """Text of `tokens`; bytes that are not valid UTF-8 become U+FFFD, as in OpenAI's."""
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        path = "tiktoken" if self.is_fast else "python"
        return f"Encoder(n_vocab={self.n_vocab}, merges={len(self.bpe_ranks)}, {path})"
