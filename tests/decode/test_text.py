"""TextStream: the one incremental decoder of the CLIs, the Python API and the server."""

import pytest

from gpt2tf.decode.text import TextStream
from gpt2tf.encoder import Encoder, byte_level_vocab


@pytest.fixture(scope="module")
def enc():
    return Encoder.from_bytes(*byte_level_vocab())


def _ids(enc, data: bytes) -> list[int]:
    """One token per byte: the byte-level vocabulary has no merges."""
    return [enc.encode(bytes([b]).decode("latin-1"))[0] if b < 128 else _byte_token(enc, b)
            for b in data]


def _byte_token(enc, b: int) -> int:
    return next(t for t in range(256) if enc.decode_bytes([t]) == bytes([b]))


def _feed(stream, data: bytes, enc):
    pieces, finish = [], None
    for token in _ids(enc, data):
        piece, finish = stream.add(token)
        pieces.append(piece)
        if finish:
            break
    return pieces, finish


def test_multibyte_characters_appear_once_complete(enc):
    s = TextStream(enc)
    pieces, finish = _feed(s, "a日b".encode(), enc)
    assert pieces == ["a", "", "", "日", "b"] and finish is None
    assert s.text == "a日b" and s.n_tokens == 5


def test_stop_string_is_held_back_then_cut(enc):
    s = TextStream(enc, stops=("END",))
    pieces, finish = _feed(s, b"abEXENDzz", enc)
    assert finish == "stop" and s.done and s.text == "abEX"
    assert "".join(pieces) == "abEX"
    assert pieces[2] == ""  # "E" might start "END": held back until it cannot


def test_truncate_and_eot_and_max_tokens(enc):
    s = TextStream(enc, truncate="\n\n", eot=256)
    _feed(s, b"one\ntwo\n\nthree", enc)
    assert s.text == "one\ntwo" and s.finish_reason == "stop"
    x, y, a = _ids(enc, b"xya")
    s = TextStream(enc, eot=256)
    assert s.add(x) == ("x", None) and s.add(256) == ("", "stop")
    assert s.add(y) == ("", None) and s.tokens == [x]
    s = TextStream(enc, max_tokens=2, stops=("ab",))
    assert s.add(x) == ("x", None)
    assert s.add(a) == ("a", "length")  # the end releases what was held back


def test_cut_off_character_becomes_replacement_as_in_a_full_decode(enc):
    s = TextStream(enc)
    _feed(s, "日".encode()[:2], enc)
    assert s.finish() == "\ufffd" and s.text == enc.decode(_ids(enc, "日".encode()[:2]))
