"""The BPE encoder: golden ids, tiktoken as an independent reference, <|endoftext|>, bad files."""

import codecs
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import shared_data_dir

from gpt2tf.encoder import ENDOFTEXT, Encoder, bytes_to_unicode, byte_level_vocab
from gpt2tf.errors import UserError

MIXED_CORPUS = {
    "ascii": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "code": 'def f(x):\n\tif x >= 10:\n\t\treturn {"k": [1, 2.5e-3]}  # done\n    pass\r\n',
    "cjk": "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "emoji": "👍🏽 family: 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ☃️!",
    "whitespace": "a  b   c\t\td \n\n\n e   \n  \u3000x\u00a0y trailing   ",
    "newlines": "\n\n\n",
    "only_spaces": "     ",
    "contractions": "I'd've thought you'll say it's they're we've I'm don't 'S 'LL",
    "numbers": "1234567890 3.14159 -42 1,000,000 ½ ⅔ ٣٤٥ 一二三",
    "combining": "e\u0301 a\u0308 n\u0303 \u1e9b\u0323 Z\u0351\u0331a\u0362l\u0344g\u0318o",
    "scripts": "Ελληνικά Русский العربية עברית हिन्दी ไทย",
    "special": "<|endoftext|>",
    "special_inside": "before<|endoftext|>after <|endoftext|><|endoftext|>\n",
    "startoftext": "<|startoftext|>Hi<|endoftext|>",
    "symbols": "~!@#$%^&*()_+`-=[]\\{}|;':\",./<>? §±© ¬ ­soft",
    "controls": "\x00\x01\x1b[31m\x7f\x85\x1c\x1d",
}


@pytest.fixture(scope="module")
def gpt2_files() -> tuple[bytes, bytes]:
    data = shared_data_dir()
    return (data / "encoder.json").read_bytes(), (data / "vocab.bpe").read_bytes()


@pytest.fixture(scope="module")
def fast(gpt2_files) -> Encoder:
    enc = Encoder.from_bytes(*gpt2_files, source="shared")
    assert enc.is_fast
    return enc


@pytest.fixture(scope="module")
def pure(gpt2_files) -> Encoder:
    enc = Encoder.from_bytes(*gpt2_files, source="shared", fast=False)
    assert not enc.is_fast
    return enc


@pytest.fixture(scope="module")
def reference():
    """tiktoken's own GPT-2 encoding, built from the local files (no network, no cache)."""
    import tiktoken
    import tiktoken.load
    from tiktoken_ext.openai_public import r50k_pat_str

    data = shared_data_dir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files directly, write no cache
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data / "vocab.bpe"), encoder_json_file=str(data / "encoder.json")
        )
    return tiktoken.Encoding(
        name="gpt2-reference",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


def ref_ids(reference, text: str) -> list[int]:
    return reference.encode(text, allowed_special={ENDOFTEXT})


# --- GPT-2's vocabulary -------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["fast", "pure"])
def test_golden_ids(which, request):
    enc = request.getfixturevalue(which)
    assert enc.encode("hello world") == [31373, 995]
    assert enc.decode([31373, 995]) == "hello world"
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256


@pytest.mark.parametrize("which", ["fast", "pure"])
def test_endoftext_is_one_token(which, request):
    enc = request.getfixturevalue(which)
    assert enc.encode("<|endoftext|>") == [50256]
    assert enc.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert enc.decode([64, 50256, 65]) == "a<|endoftext|>b"
    # <|startoftext|> is not special to GPT-2: plain text, several tokens.
    sot = enc.encode("<|startoftext|>")
    assert len(sot) > 1 and 50256 not in sot


@pytest.mark.parametrize("text", list(MIXED_CORPUS.values()), ids=list(MIXED_CORPUS))
def test_mixed_corpus_matches_tiktoken(text, fast, pure, reference):
    expected = ref_ids(reference, text)
    assert fast.encode(text) == expected
    assert pure.encode(text) == expected
    assert pure.decode(expected) == text


def test_batch_matches_single(fast, pure):
    texts = list(MIXED_CORPUS.values())
    expected = [pure.encode(t) for t in texts]
    assert fast.encode_batch(texts) == expected
    assert pure.encode_batch(texts) == expected
    for enc in (fast, pure):
        arrays = enc.encode_batch_to_numpy(texts, num_threads=2)
        assert [a.dtype for a in arrays] == [np.int32] * len(texts)
        assert [a.tolist() for a in arrays] == expected


def test_tinyshakespeare_pure_equals_fast(fast, pure):
    text = (shared_data_dir("tinyshakespeare.txt") / "tinyshakespeare.txt").read_text("utf-8")
    text = text[:200_000]
    ids = fast.encode(text)
    assert pure.encode(text) == ids
    assert fast.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_matches_tiktoken_and_round_trips(fast, pure, reference, text):
    expected = ref_ids(reference, text)
    assert pure.encode(text) == expected
    assert fast.encode(text) == expected
    assert pure.decode(expected) == text


WORDISH = st.text(
    alphabet=st.sampled_from(list("ab Z'sdmtlvre0 9\n\t\r.,!-_ \u00a0\u3000éß日😀\u0301")),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(WORDISH, st.just(ENDOFTEXT)), max_size=5).map("".join))
def test_tricky_text_matches_tiktoken(fast, pure, reference, text):
    expected = ref_ids(reference, text)
    assert pure.encode(text) == expected
    assert fast.encode(text) == expected
    assert fast.decode(expected) == text


def test_lone_surrogates_become_replacement_characters(fast, pure):
    text = "a\ud800b\udfff"
    expected = fast.encode("a\ufffdb\ufffd")
    assert fast.encode(text) == pure.encode(text) == expected
    assert fast.encode_to_numpy(text).tolist() == pure.encode_to_numpy(text).tolist() == expected


def test_decode_bytes_streams_with_incremental_utf8(fast):
    text = "héllo 日本 👨‍👩‍👧 end"
    decoder = codecs.getincrementaldecoder("utf-8")()
    out = "".join(decoder.decode(fast.decode_bytes([t])) for t in fast.encode(text))
    assert out + decoder.decode(b"", final=True) == text


def test_decode_replaces_a_cut_character(fast):
    ids = fast.encode("😀")
    assert len(ids) > 1  # the emoji takes several byte-level tokens
    assert fast.decode(ids[:1]) == "\ufffd"


def test_rewritten_gpt2_files_take_the_fast_path_by_their_merge_order(gpt2_files, pure):
    encoder_json, vocab_bpe = gpt2_files
    # The same vocabulary in other bytes (as HuggingFace's vocab.json): no sha256 match, but its
    # ids follow its merge order, which is what makes tiktoken exact.
    rewritten = json.dumps(json.loads(encoder_json), indent=1).encode()
    changed = Encoder.from_bytes(rewritten, vocab_bpe + b"\n", source="rewritten")
    assert changed.is_fast
    for text in MIXED_CORPUS.values():
        assert changed.encode(text) == pure.encode(text)


def test_byte_level_ids_are_gpt2_single_byte_ids(gpt2_files):
    gpt2 = json.loads(gpt2_files[0])
    tiny = json.loads(byte_level_vocab()[0])
    assert tiny.pop(ENDOFTEXT) == 256 and gpt2[ENDOFTEXT] == 50256
    assert len(tiny) == 256
    for token, idx in tiny.items():
        assert gpt2[token] == idx


# --- no shared data needed ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Encoder:
    return Encoder.from_bytes(*byte_level_vocab(), source="byte-level")


def test_bytes_to_unicode_is_a_printable_bijection():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in mapping.values())
    assert mapping[ord("!")] == "!" and mapping[ord(" ")] == "\u0120"  # 'Ġ'


def test_byte_level_vocab(tiny):
    assert tiny.n_vocab == 257 and tiny.eot_token == 256
    assert tiny.encode("hi") == [ord("h") - 33, ord("i") - 33]
    assert tiny.encode(" ") == [220]  # GPT-2's id of the space byte
    assert tiny.encode("é<|endoftext|>") == [127, 102, 256]  # GPT-2's ids of bytes c3 a9
    pure = Encoder.from_bytes(*byte_level_vocab(), fast=False)
    text = "日本 <|endoftext|> x\n"
    assert pure.encode(text) == tiny.encode(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_byte_level_round_trip(tiny, text):
    ids = tiny.encode(text)
    assert tiny.decode(ids) == text
    # One token per UTF-8 byte, except that each 13-byte <|endoftext|> is a single token.
    assert len(ids) == len(text.encode("utf-8")) - 12 * text.count(ENDOFTEXT)


def _vocab_with_merges(merges: list[str]) -> tuple[bytes, bytes]:
    vocab = json.loads(byte_level_vocab()[0])
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    text = "#version: 0.2\n" + "".join(m + "\n" for m in merges)
    return json.dumps(vocab).encode(), text.encode()


def test_merges_apply_in_rank_order():
    ab_first = Encoder.from_bytes(*_vocab_with_merges(["a b", "b c"]))
    bc_first = Encoder.from_bytes(*_vocab_with_merges(["b c", "a b"]))
    assert ab_first.is_fast and bc_first.is_fast  # ids in merge order: tiktoken is exact
    assert ab_first.bpe("abc") == ("ab", "c")
    assert bc_first.bpe("abc") == ("a", "bc")
    assert ab_first.bpe("abab") == ("ab", "ab")
    assert ab_first.bpe("aaa") == ("a", "a", "a")
    assert ab_first.decode(ab_first.encode("abc abc")) == "abc abc"
    for merges in (["a b", "b c"], ["b c", "a b"]):
        text = "abc cab abcabc bcab aaa"
        files = _vocab_with_merges(merges)
        fast, pure = Encoder.from_bytes(*files, fast=True), Encoder.from_bytes(*files, fast=False)
        assert fast.is_fast and not pure.is_fast
        assert fast.encode(text) == pure.encode(text)


def _swap_ids(files: tuple[bytes, bytes], a: str, b: str) -> tuple[bytes, bytes]:
    vocab = json.loads(files[0])
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return json.dumps(vocab).encode(), files[1]


@pytest.mark.parametrize("files, why", [
    # Ids against the merge order: tiktoken would join b+c before a+b.
    (_swap_ids(_vocab_with_merges(["a b", "b c"]), "ab", "bc"), "not in merge order"),
    # A merge that joins a token only a later merge makes.
    (_vocab_with_merges(["ab c", "a b"]), "no earlier merge makes"),
    # Every rank in order, but `abc` is ab+c while the merges leave a+bc: tiktoken, which joins
    # any two parts whose bytes are a token, would make abc.
    (_vocab_with_merges(["b c", "a b", "ab c"]), "spell token 'abc' as a bc"),
])
def test_vocabularies_tiktoken_would_misread_stay_on_the_pure_path(files, why):
    enc = Encoder.from_bytes(*files)
    assert not enc.is_fast
    with pytest.raises(UserError, match=why):
        Encoder.from_bytes(*files, fast=True)
    ids = enc.encode("abc abcab")
    assert enc.decode(ids) == "abc abcab"
    if "spell" in why:  # what tiktoken would have said: the check is needed
        assert ids[:2] == [enc.encoder["a"], enc.encoder["bc"]]
        assert enc._build_tiktoken().encode("abc")[0] == enc.encoder["abc"]


def test_unknown_token_id_is_a_user_error(tiny):
    with pytest.raises(UserError, match="token id 999"):
        tiny.decode([1, 999])


def test_vocabulary_without_endoftext():
    vocab = json.loads(byte_level_vocab()[0])
    del vocab[ENDOFTEXT]
    enc = Encoder.from_bytes(json.dumps(vocab).encode(), b"#version: 0.2\n")
    assert enc.eot_token is None and enc.n_vocab == 256
    assert enc.encode(ENDOFTEXT) == [b - 33 for b in ENDOFTEXT.encode()]


@pytest.mark.parametrize(
    "encoder_json, vocab_bpe, message",
    [
        (b"\xff\xfe", b"", "not valid UTF-8 JSON"),
        (b"{not json", b"", "not valid UTF-8 JSON"),
        (b"[1, 2]", b"", "JSON object"),
        (b'{"a": "x"}', b"", "ids must be integers"),
        (b'{"a": 1, "b": 1}', b"", "same id"),
        (b'{"a": 0}', b"", "lacks 255 of the 256 byte tokens"),
        (None, b"#version: 0.2\na b c\n", "line 2 should hold two symbols"),
        (None, b"#version: 0.2\nx y\n", "merge 1 .*encoder.json lacks"),
        (None, b"\xff", "vocab.bpe is not valid UTF-8"),
    ],
)
def test_corrupt_files_are_user_errors_naming_the_source(encoder_json, vocab_bpe, message):
    if encoder_json is None:
        encoder_json = byte_level_vocab()[0]
    with pytest.raises(UserError, match=message) as info:
        Encoder.from_bytes(encoder_json, vocab_bpe, source="models/broken")
    assert str(info.value).startswith("models/broken: ")
