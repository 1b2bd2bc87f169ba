"""Learning a vocabulary: GPT-2's file format, ids equal in our encoder's two paths and in
HuggingFace tokenizers, exact round trips, and Chinese end to end (compression against GPT-2's
vocabulary, a model trained from scratch that learns and writes readable characters).

The Chinese corpus is made here: sentences of a small seeded grammar over common words, so a
model can learn which word may follow which.
"""

import collections
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import shared_data_dir
from tiny import REPO

from gpt2tf.data import tokenizer
from gpt2tf.encoder import ENDOFTEXT, PAT_STR, Encoder, byte_level_vocab
from gpt2tf.errors import UserError

# --- a small Chinese corpus --------------------------------------------------------------------

TIMES = ["今天", "明天", "昨天", "早上", "晚上", "现在", "每天", "周末", "下午", "去年"]
SUBJECTS = ["我", "你", "他", "她", "我们", "他们", "老师", "学生", "妈妈", "爸爸", "朋友",
            "孩子", "医生", "同学"]
ADVERBS = ["", "", "都", "也", "常常", "一起", "很快地", "慢慢地", "不想", "喜欢"]
PLACES = ["在家里", "在学校", "在公园", "在商店", "在饭馆", "在图书馆", "在北京", "在上海"]
VERB_OBJECTS = {  # each verb takes only its own objects: structure a model can learn
    "吃": ["米饭", "苹果", "面条", "水果", "饺子", "早饭"],
    "喝": ["茶", "咖啡", "牛奶", "水", "果汁"],
    "看": ["电影", "书", "报纸", "电视", "朋友"],
    "听": ["音乐", "故事", "老师说话", "新闻"],
    "学习": ["中文", "数学", "历史", "音乐", "英语"],
    "写": ["作业", "汉字", "日记", "信"],
    "买": ["衣服", "水果", "书", "东西", "电脑"],
    "做": ["饭", "作业", "运动", "工作"],
}
THINGS = ["天气", "这本书", "那个电影", "我的工作", "这家饭馆", "他的中文", "今天的作业"]
ADJECTIVES = ["很好", "很高兴", "非常忙", "有点累", "很漂亮", "太热了", "不错", "很冷"]


def _sentence(rng: random.Random) -> str:
    verb = rng.choice(list(VERB_OBJECTS))
    obj = rng.choice(VERB_OBJECTS[verb])
    who, when = rng.choice(SUBJECTS), rng.choice(TIMES)
    kind = rng.random()
    if kind < 0.4:
        return f"{when}，{who}{rng.choice(ADVERBS)}{verb}{obj}。"
    if kind < 0.7:
        return f"{who}{when}{rng.choice(PLACES)}{verb}{obj}。"
    if kind < 0.85:
        return f"{who}觉得{rng.choice(THINGS)}{rng.choice(ADJECTIVES)}。"
    return f"{who}{when}{verb}{obj}吗？"


def chinese_text(seed: int, n_chars: int) -> str:
    """Paragraphs of 2-6 sentences, one per line, about n_chars characters (3 bytes each)."""
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < n_chars:
        paragraph = "".join(_sentence(rng) for _ in range(rng.randint(2, 6))) + "\n"
        paragraphs.append(paragraph)
        size += len(paragraph)
    return "".join(paragraphs)


ZH_VOCAB_SIZE = 600


@pytest.fixture(scope="module")
def zh_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zh") / "train.txt"
    path.write_text(chinese_text(seed=0, n_chars=60_000), encoding="utf-8")  # ~177 KB
    return path


@pytest.fixture(scope="module")
def zh_vocab(zh_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zh_vocab") / "vocab"
    tokenizer.train_tokenizer(str(zh_corpus), str(out), vocab_size=ZH_VOCAB_SIZE)
    return out


def _files(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "encoder.json").read_bytes(), (folder / "vocab.bpe").read_bytes()


# Mixed scripts, whitespace runs, digits, contractions, code and emoji: a vocabulary trained on
# it has merges across every branch of GPT-2's pre-tokenizer.
MIXED_WORDS = ["the", " the", " quick", "I'm", " don't", " it's", "they're", "  ", "\n\n",
               "\t", " 123", "4567", " 3.14", "def f(x):", "    return", " {}", "->", "!!",
               " naïve", " Ελληνικά", " русский", " 日本語", "한국어", "😀", "👍🏽", " e\u0301"]


@pytest.fixture(scope="module")
def mixed_vocab(tmp_path_factory) -> tuple[bytes, bytes]:
    rng = random.Random(7)
    text = chinese_text(seed=3, n_chars=5000) + "".join(
        rng.choice(MIXED_WORDS) for _ in range(20_000))
    corpus = tmp_path_factory.mktemp("mixed") / "mixed.txt"
    corpus.write_text(text, encoding="utf-8")
    out = corpus.parent / "vocab"
    tokenizer.train_tokenizer(str(corpus), str(out), vocab_size=1500)
    return _files(out)


@pytest.fixture(scope="module")
def mixed_fast(mixed_vocab) -> Encoder:
    return Encoder.from_bytes(*mixed_vocab)


@pytest.fixture(scope="module")
def mixed_pure(mixed_vocab) -> Encoder:
    return Encoder.from_bytes(*mixed_vocab, fast=False)


@pytest.fixture(scope="module")
def mixed_hf(mixed_vocab):
    return tokenizer.hf_tokenizer(*mixed_vocab)


# --- the files -----------------------------------------------------------------------------------


def test_trained_files_are_in_gpt2s_format(zh_vocab):
    encoder_json, vocab_bpe = _files(zh_vocab)
    vocab = json.loads(encoder_json)
    lines = vocab_bpe.decode("utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    assert len(vocab) == ZH_VOCAB_SIZE == 256 + len(merges) + 1
    # The 256 bytes under GPT-2's ids, each merge's result numbered in merge order, then EOT.
    bytes_only = json.loads(byte_level_vocab()[0])
    assert {t: i for t, i in vocab.items() if i < 256} == {
        t: i for t, i in bytes_only.items() if t != ENDOFTEXT}
    assert [vocab[a + b] for a, b in merges] == list(range(256, 256 + len(merges)))
    assert vocab[ENDOFTEXT] == len(vocab) - 1
    enc = Encoder.from_bytes(encoder_json, vocab_bpe, source="trained")
    assert enc.is_fast and enc.n_vocab == ZH_VOCAB_SIZE and enc.eot_token == ZH_VOCAB_SIZE - 1


def test_training_is_deterministic(zh_corpus, zh_vocab, tmp_path):
    tokenizer.train_tokenizer(str(zh_corpus), str(tmp_path / "again"), vocab_size=ZH_VOCAB_SIZE)
    assert _files(tmp_path / "again") == _files(zh_vocab)


def test_reads_folders_globs_csv_and_jsonl_and_learns_no_endoftext(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("low lower lowest " * 50 + ENDOFTEXT * 30)
    (tmp_path / "docs" / "sub" / "b.csv").write_text("text\nnewer newest\n" * 40)
    (tmp_path / "docs" / "sub" / "c.jsonl").write_text('{"body": "widest wider"}\n' * 40)
    texts = list(tokenizer.training_texts(str(tmp_path / "docs"), field="body"))
    joined = "".join(texts)
    assert "lowest" in joined and "newest" in joined and "widest" in joined
    assert ENDOFTEXT not in joined  # documents are cut at it, as the encoder cuts
    tokenizer.train_tokenizer(str(tmp_path / "docs" / "**" / "*.*"), str(tmp_path / "v"),
                              vocab_size=400, field="body")
    vocab = json.loads((tmp_path / "v" / "encoder.json").read_text("utf-8"))
    assert "Ġlowest" in vocab and "widest" in vocab and "Ġnewest" in vocab
    assert not any("endoftext" in t for t in vocab if t != ENDOFTEXT)


def test_a_small_corpus_gives_fewer_tokens_than_asked(tmp_path):
    (tmp_path / "tiny.txt").write_text("abab abab")
    out = tokenizer.train_tokenizer(str(tmp_path / "tiny.txt"), str(tmp_path / "v"),
                                    vocab_size=50257, min_frequency=1)
    assert out["n_vocab"] == 257 + out["merges"] < 270 and out["fast"]


@settings(max_examples=200, deadline=None)
@given(text=st.lists(st.one_of(st.text(st.sampled_from(list("ab c\n\r\t ,.'s日本語\u3000\xa0")),
                                       max_size=30), st.just(ENDOFTEXT)), max_size=12).map("".join),
       cuts=st.lists(st.integers(0, 300), max_size=8))
def test_cut_blocks_split_into_the_same_words_as_the_whole_text(text, cuts):
    """tokenizers counts the words of each text it is given: blocks read from a file must be
    cut only where the pre-tokenizer splits anyway, and at <|endoftext|>."""
    pattern = regex.compile(PAT_STR)
    blocks = [text[i:j] for i, j in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)])]
    pieces = list(tokenizer._pieces(blocks))
    assert all(pieces) and not any(ENDOFTEXT in p for p in pieces)
    words = [w for part in text.split(ENDOFTEXT) for w in pattern.findall(part)]
    assert [w for p in pieces for w in pattern.findall(p)] == words


# --- the same ids everywhere; exact round trips --------------------------------------------------

MIXED_TEXT = st.text(
    alphabet=st.one_of(st.sampled_from(list("abcdefghijklmnopqrstuvwxyz 0123456789'\n\t")),
                       st.sampled_from(list("我你他们今天吃喝看书，。？日本語한국어😀🏽é\u0301"))),
    max_size=120)
ANY_TEXT = st.one_of(st.text(max_size=80), MIXED_TEXT,
                     st.lists(st.sampled_from(MIXED_WORDS + [ENDOFTEXT]), max_size=12).map("".join))


@settings(max_examples=400, deadline=None)
@given(ANY_TEXT)
def test_fast_and_reference_paths_give_the_same_ids_and_round_trip(mixed_fast, mixed_pure, text):
    ids = mixed_pure.encode(text)
    assert mixed_fast.encode(text) == ids
    assert mixed_fast.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
def test_tokenizers_gives_our_ids(mixed_fast, mixed_hf, text):
    text = text.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates in Rust strings
    assert mixed_hf.encode(text).ids == mixed_fast.encode(text)


def test_a_trained_vocabulary_agrees_on_long_mixed_text(mixed_fast, mixed_pure, mixed_hf):
    rng = random.Random(11)
    text = chinese_text(seed=9, n_chars=3000) + "".join(
        rng.choice(MIXED_WORDS + [ENDOFTEXT]) for _ in range(3000))
    ids = mixed_fast.encode(text)
    assert mixed_pure.encode(text) == ids == mixed_hf.encode(text).ids
    assert mixed_fast.decode(ids) == text
    assert mixed_fast.eot_token in ids


# --- Chinese -------------------------------------------------------------------------------------


def tokens_per_char(enc: Encoder, text: str) -> float:
    return len(enc.encode(text)) / len(text)


@pytest.fixture(scope="module")
def held_out() -> str:
    return chinese_text(seed=1, n_chars=5000)  # other sentences of the same grammar


def test_chinese_vocabulary_round_trips_and_compresses(zh_vocab, held_out):
    enc = Encoder.from_bytes(*_files(zh_vocab))
    for text in (held_out, "他们说：“这不是我们的书。”", "未见过的字：龘靐齉 and English 123 😀"):
        assert enc.decode(enc.encode(text)) == text
    # Under one token per character, which GPT-2's vocabulary never reaches on Chinese (it
    # spells most characters with one to three byte-level tokens): words became tokens.
    assert tokens_per_char(enc, held_out) < 0.8


def test_chinese_vocabulary_needs_far_fewer_tokens_than_gpt2s(zh_vocab, held_out):
    gpt2 = Encoder.from_bytes(*_files(shared_data_dir()))
    ours = tokens_per_char(Encoder.from_bytes(*_files(zh_vocab)), held_out)
    theirs = tokens_per_char(gpt2, held_out)
    print(f"tokens per character on held-out Chinese: ours {ours:.3f}, GPT-2's {theirs:.3f}")
    assert ours < theirs / 3, (ours, theirs)


def _unigram_entropy(ids: list[int]) -> float:
    """Nats per token of the best model that ignores context: the corpus' token frequencies."""
    counts = collections.Counter(ids)
    return -sum(c / len(ids) * math.log(c / len(ids)) for c in counts.values())


@pytest.mark.slow
def test_chinese_model_from_scratch_learns_and_writes_readable_text(
        zh_corpus, zh_vocab, tmp_path, capsys):
    from train_helpers import base_args, losses, train

    from gpt2tf.cli import main
    from gpt2tf.decode.engine import SamplingParams
    from gpt2tf.decode.generator import Generator

    models = tmp_path / "models"
    models.mkdir()
    assert main(["init", str(models / "zh"), "--vocab_dir", str(zh_vocab), "--n_layer", "2",
                 "--n_embd", "64", "--n_head", "2", "--n_ctx", "64"]) == 0
    hparams = json.loads((models / "zh" / "hparams.json").read_text())
    assert hparams["n_vocab"] == ZH_VOCAB_SIZE  # init sizes the model to the vocabulary
    code, _, err = train(base_args(tmp_path, models, zh_corpus, model_name="zh", steps=300,
                                   batch_size=8, learning_rate=3e-3, save_every=0), capsys)
    assert code == 0, err

    run = tmp_path / "checkpoint" / "run1"
    enc = Encoder.from_bytes(*_files(run))
    corpus = zh_corpus.read_text("utf-8")
    entropy = _unigram_entropy(enc.encode(corpus))
    loss = losses(run)
    final = sum(list(loss.values())[-20:]) / 20
    print(f"unigram entropy {entropy:.3f} nats/token; loss {loss[1]:.3f} -> {final:.3f}")
    assert final < 0.7 * entropy, (final, entropy)  # it learned which word follows which

    with Generator(run) as gen:
        (ids,) = gen.generate_tokens(enc.encode("今天，"), length=48, seed=3,
                                     params=SamplingParams(top_k=8))
    sample = enc.decode_bytes(ids).decode("utf-8")  # strict: valid UTF-8, no cut character
    print(f"sample: {sample!r}")
    chars = [c for c in sample if not c.isspace()]
    known = set(corpus)
    assert len(chars) >= 20
    assert sum(c in known for c in chars) >= 0.9 * len(chars), sample


# --- the command line --------------------------------------------------------------------------


def _gpt2tf(args, capsys) -> tuple[int, str]:
    from gpt2tf.cli import main

    code = main(["tokenizer", "train", *map(str, args)])
    return code, capsys.readouterr().err


def test_cli_trains_a_vocabulary(zh_corpus, tmp_path, capsys):
    code, err = _gpt2tf([zh_corpus, tmp_path / "v", "--vocab_size", 300, "--noprogress"], capsys)
    assert code == 0, err
    assert err.strip() == f"wrote a vocabulary of 300 tokens to {tmp_path / 'v'}"
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["encoder.json", "vocab.bpe"]


@pytest.mark.parametrize("args, message", [
    (["{corpus}", "{out}", "--vocab_size", "256"], "--vocab_size must be an integer >= 257"),
    (["{corpus}", "{out}", "--min_frequency", "0"], "--min_frequency must be an integer >= 1"),
    (["{corpus}", "{out}", "--encoding", "klingon"], "unknown text encoding"),
    (["{tmp}/missing.txt", "{out}"], "not found"),
    (["{tmp}/empty.txt", "{out}"], "no text to learn a vocabulary from"),
    (["{tmp}/ids.npz", "{out}"], "holds token ids"),
    (["{tmp}/latin1.txt", "{out}"], "is not valid utf-8"),
    (["{corpus}", "{tmp}/full"], "already exists"),
    (["{corpus}", "{tmp}/no/such/parent"], "does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(args, message, zh_corpus, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ids.npz").write_bytes(b"PK")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    before = sorted(tmp_path.rglob("*"))
    code, err = _gpt2tf([a.format(corpus=zh_corpus, out=tmp_path / "out", tmp=tmp_path)
                         for a in args], capsys)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(tmp_path.rglob("*")) == before  # no folder, no temporary left behind
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"


def test_library_refuses_an_existing_folder_before_reading(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(UserError, match="already exists"):
        tokenizer.train_tokenizer(str(tmp_path / "missing.txt"), str(tmp_path / "out"))


def test_misspelled_flag_is_refused_before_any_work(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from gpt2tf.cli import main; sys.exit(main())",
         "tokenizer", "train", "corpus.txt", "out", "--vocab_sise", "1000"],
        cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown flag --vocab_sise; did you mean --vocab_size?")
    assert proc.stderr.count("\n") == 1 and time.monotonic() - start < 10
    assert list(tmp_path.iterdir()) == []
