"""Training a byte-level BPE vocabulary in GPT-2's format (encoder.json + vocab.bpe).

HuggingFace's `tokenizers` learns the merges; everything around them is GPT-2's, so the files
mean the same to gpt2tf.encoder (whose pure-Python path is the reference), to tiktoken and to
tokenizers: text is split by GPT-2's regex (`encoder.PAT_STR`, handed to tokenizers as it is),
each piece's UTF-8 bytes are spelled with `bytes_to_unicode`, and `<|endoftext|>` is never
text (documents are cut at it, as the encoder cuts). The ids are then numbered GPT-2's way: the
256 bytes in `bytes_to_unicode` order, each merge's result in merge order (so an id is its
merge rank, which the encoder's tiktoken fast path relies on), `<|endoftext|>` last.
"""

import json
import sys
from pathlib import Path
from typing import Iterable, Iterator

import regex

from gpt2tf import fileio, paths
from gpt2tf.data.documents import ENCODED_SUFFIXES, file_documents, resolve_paths
from gpt2tf.encoder import ENDOFTEXT, PAT_STR, Encoder, bytes_to_unicode
from gpt2tf.errors import UserError

VOCAB_BPE_HEADER = "#version: 0.2\n"  # GPT-2's vocab.bpe starts so; the encoder skips it
# The last place in a block where the pre-tokenizer splits whatever follows: between a
# non-space and a space. No GPT-2 piece holds a space after a non-space, and no piece's match
# depends on text past a space that follows it, so each side splits as it would in one text.
_CUT = regex.compile(r"(?r)(?<=\S)\s")
MAX_CARRY_CHARS = 1 << 22  # a text with no such place for this long is fed as it stands


def _pipeline(model):
    """A tokenizers.Tokenizer around `model` that splits and spells text as GPT-2 does."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        # use_regex=False: the split above is GPT-2's; this only spells the bytes.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def hf_tokenizer(encoder_json: bytes, vocab_bpe: bytes):
    """The vocabulary as a tokenizers.Tokenizer that gives the same ids as gpt2tf.encoder
    (the tests hold the two to that); `<|endoftext|>` is its special token."""
    from tokenizers import AddedToken, models

    vocab = json.loads(encoder_json)
    merges = [tuple(line.split()) for line in vocab_bpe.decode("utf-8").splitlines()
              if line and not line.startswith("#version")]
    tok = _pipeline(models.BPE(vocab=vocab, merges=merges))
    if ENDOFTEXT in vocab:
        tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return tok


def _pieces(blocks: Iterable[str]) -> Iterator[str]:
    """A document's text, cut where the pre-tokenizer would split anyway and at each
    `<|endoftext|>` (dropped): tokenizers counts words per text it is given, so a cut
    elsewhere would count a word's halves, and the end-of-text marker is no text to learn."""
    carry = ""
    for block in blocks:
        text = carry + block
        cut = _CUT.search(text)
        if cut is None and len(text) < MAX_CARRY_CHARS:
            carry = text
            continue
        end = cut.start() if cut else len(text)
        carry = text[end:]
        yield from filter(None, text[:end].split(ENDOFTEXT))
    yield from filter(None, carry.split(ENDOFTEXT))


def training_texts(corpus: str, *, encoding: str = "utf-8", column: int | str = 0,
                   field: str = "text") -> Iterator[str]:
    """The texts of every document under `corpus` (a file, folder or glob), as `_pieces`."""
    files = resolve_paths(corpus)
    encoded = [f for f in files if f.suffix.lower() in ENCODED_SUFFIXES]
    if encoded:
        raise UserError(f"{encoded[0]} holds token ids ({encoded[0].suffix}), not text: a"
                        " vocabulary is learned from text files, .csv or .jsonl")
    for file in files:
        for _, blocks in file_documents(file, encoding=encoding, column=column, field=field,
                                        progress=None):
            yield from _pieces(blocks)


def learn_merges(texts: Iterable[str], *, vocab_size: int, min_frequency: int,
                 progress: bool = False) -> list[tuple[str, str]]:
    """The merges tokenizers' BPE trainer learns from `texts`, best first, in GPT-2's
    spelling: at most vocab_size - 257 (the bytes and <|endoftext|> take the rest)."""
    from tokenizers import models, pre_tokenizers, trainers

    tok = _pipeline(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[ENDOFTEXT],
        # Every byte gets a token, seen or not, so that any text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    seen = False

    def counted():
        nonlocal seen
        for text in texts:
            seen = True
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if not seen:
        raise UserError("the corpus holds no text to learn a vocabulary from")
    merges = json.loads(tok.to_str())["model"]["merges"]
    # tokenizers >= 0.20 writes a merge as [a, b]; older versions as "a b".
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def vocab_files(merges: list[tuple[str, str]]) -> tuple[bytes, bytes]:
    """(encoder.json, vocab.bpe) contents for `merges`, numbered GPT-2's way (module docstring)."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for first, second in merges:
        vocab[first + second] = len(vocab)
    vocab[ENDOFTEXT] = len(vocab)
    encoder_json = json.dumps(vocab, ensure_ascii=False).encode("utf-8")
    vocab_bpe = (VOCAB_BPE_HEADER + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8")
    return encoder_json, vocab_bpe


def train_tokenizer(corpus: str, out_dir: str, *, vocab_size: int = 50257,
                    min_frequency: int = 2, encoding: str = "utf-8", column: int | str = 0,
                    field: str = "text", progress: bool = False) -> dict:
    """Learn a vocabulary from `corpus` and write encoder.json and vocab.bpe to the new folder
    `out_dir` (which appears only when both are complete). Returns what was written."""
    with fileio.publish_dir(out_dir) as tmp:  # refuses an existing out_dir before any work
        texts = training_texts(corpus, encoding=encoding, column=column, field=field)
        merges = learn_merges(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                              progress=progress and sys.stderr.isatty())
        files = vocab_files(merges)
        # Loading checks the files as every later reader will, and tells whether they take
        # the fast path (they should: the ids follow the merge order).
        enc = Encoder.from_bytes(*files, source=str(out_dir))
        for name, data in zip(paths.VOCAB_FILES, files):
            with fileio.atomic_open(Path(tmp) / name, "wb") as f:
                f.write(data)
    return {"out_dir": str(out_dir), "n_vocab": enc.n_vocab, "merges": len(merges),
            "fast": enc.is_fast}
