"""--sample_mode documents and --line_by_line: windows start where documents start, short ones
are packed, the draws are fair and resume exactly; each line of a text file is a document."""

import json

import numpy as np
import pytest

from gpt2tf.data.encode import encode_to_npz, load_tokens
from gpt2tf.data.sampler import Sampler, document_starts
from gpt2tf.encoder import Encoder, byte_level_vocab

EOT = 10**6  # no position reaches it: a token's value is its position, or EOT


def _stream(lengths: list[int]) -> tuple[np.ndarray, list[int]]:
    """Documents of these lengths joined by EOT; each token is its own position. And the
    positions where windows may start: 0 and each separator."""
    parts, starts, pos = [], [0], 0
    for i, n in enumerate(lengths):
        if i:
            parts.append([EOT])
            starts.append(pos)
            pos += 1
        parts.append(list(range(pos, pos + n)))
        pos += n
    return np.array([t for p in parts for t in p], dtype=np.int64), starts


def _start_of(window: np.ndarray) -> int:
    return int(window[1]) - 1 if window[0] == EOT else int(window[0])


@pytest.fixture(scope="module")
def tiny() -> Encoder:
    return Encoder.from_bytes(*byte_level_vocab(), source="byte-level")


def test_windows_start_at_documents_and_pack_short_ones():
    lengths = [3, 40, 2, 5, 1, 30, 4, 4, 25, 3]
    chunk, starts = _stream(lengths)
    assert document_starts(chunk, EOT).tolist() == starts
    length = 12
    fits = [p for p in starts if p + length <= len(chunk)]
    s = Sampler([chunk], seed=3, mode="documents", eot=EOT)
    seen = {}
    for _ in range(3000):
        w = s.sample(length)
        p = _start_of(w)
        assert p in fits
        assert np.array_equal(w, chunk[p : p + length])  # consecutive: later documents packed
        seen[p] = seen.get(p, 0) + 1
    assert sorted(seen) == fits  # every start that fits is drawn ...
    counts = np.array(list(seen.values()))
    assert counts.min() > 0.6 * 3000 / len(fits)  # ... about equally often
    packed = s.sample_batch(200, length)
    assert any((row == EOT).sum() >= 2 for row in packed)  # short documents share a window
    # Windows mode, on the same stream, starts anywhere.
    anywhere = {_start_of(Sampler([chunk], seed=3).sample(length)) for _ in range(300)}
    assert not anywhere <= set(starts)


def test_several_chunks_and_an_eot_first():
    a, _ = _stream([5, 5, 5])
    b = np.concatenate([[EOT], _stream([9, 2])[0]])  # a piece that begins with a separator
    assert document_starts(b, EOT).tolist() == [0, 10]
    s = Sampler([a, b], seed=0, mode="documents", eot=EOT)
    windows = s.sample_batch(400, 4)
    # (b's second document is too close to its end for a window of 4 to start there)
    assert {tuple(w) for w in windows} == {
        tuple(a[0:4]), tuple(a[5:9]), tuple(a[11:15]), tuple(b[0:4])}
    assert (s.fixed_windows(4, 50, seed=1) == s.fixed_windows(4, 50, seed=1)).all()
    for w in s.fixed_windows(4, 50, seed=1):  # the validation windows start at documents too
        assert any(np.array_equal(w, x) for x in windows)


def test_state_resumes_the_same_draws_and_records_the_mode():
    chunk, _ = _stream([7, 3, 20, 2, 2, 9] * 20)
    s = Sampler([chunk], seed=11, mode="documents", eot=EOT)
    s.sample_batch(17, 8)
    state = json.loads(json.dumps(s.state_dict()))  # plain JSON, as the side file stores it
    assert state["sample_mode"] == "documents"
    expected = s.sample_batch(30, 8)
    again = Sampler([chunk], seed=999, mode="documents", eot=EOT)
    again.load_state_dict(state)
    assert np.array_equal(again.sample_batch(30, 8), expected)


def test_coverage_and_too_short_documents():
    chunk, _ = _stream([100, 100])
    s = Sampler([chunk], seed=0, mode="documents", eot=EOT)
    assert s.coverage(10) == pytest.approx(20 / len(chunk))  # long documents are cut
    assert Sampler([chunk], seed=0).coverage(10) == 1.0
    from gpt2tf.errors import UserError

    with pytest.raises(UserError, match="needs an <|endoftext|> token"):
        Sampler([chunk], mode="documents", eot=None)
    with pytest.raises(UserError, match="need at least 500"):
        s.sample(500)


def test_line_by_line(tmp_path, tiny):
    text = "first line\r\n\n   \nsecond\nthird, no newline"
    (tmp_path / "a.txt").write_bytes(text.encode())
    eot = tiny.eot_token
    want = (tiny.encode("first line") + [eot] + tiny.encode("second") + [eot]
            + tiny.encode("third, no newline"))
    chunks = load_tokens(str(tmp_path / "a.txt"), encoder=tiny, line_by_line=True)
    assert [c.tolist() for c in chunks] == [want]
    assert load_tokens(str(tmp_path / "a.txt"), encoder=tiny)[0].tolist() == tiny.encode(text)
    stats = encode_to_npz(str(tmp_path / "a.txt"), str(tmp_path / "a.npz"), encoder=tiny,
                          progress=False, line_by_line=True)
    assert stats["documents"] == 3
    with np.load(tmp_path / "a.npz") as npz:
        assert npz["arr_0"].tolist() == want
    # .jsonl keeps one document per line, whatever line_by_line says.
    (tmp_path / "b.jsonl").write_text('{"text": "x\\ny"}\n')
    assert load_tokens(str(tmp_path / "b.jsonl"), encoder=tiny,
                       line_by_line=True)[0].tolist() == tiny.encode("x\ny")


# --- training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from train_helpers import make_models_dir

    return make_models_dir(tmp_path_factory)


def _lines(path, n=300):
    words = ["the", "king", "and", "queen", "of", "realm", "speak", "to", "people"]
    rows = [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 6)) for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_training_in_documents_mode_resumes_exactly(tmp_path, models_dir, capsys, monkeypatch):
    from train_helpers import base_args, losses, train

    from gpt2tf.train.loop import Trainer

    batches = []
    real = Trainer.next_feeds

    def next_feeds(self):
        feeds = real(self)
        batches.extend(next(iter(f.values())) for f in feeds)
        return feeds

    monkeypatch.setattr(Trainer, "next_feeds", next_feeds)
    data = _lines(tmp_path / "lines.txt")
    flags = {"seq_len": 16, "batch_size": 2, "learning_rate": 1e-3,
             "sample_mode": "documents", "line_by_line": True, "save_every": 0}
    code, _, err = train(base_args(tmp_path, models_dir, data, "whole", steps=4, **flags),
                         capsys)
    assert code == 0, err
    eot = 256  # the byte-level vocabulary's <|endoftext|>
    assert batches and all(
        row[0] == eot or row.tolist() == batches[0][0].tolist() for b in batches for row in b)
    code, _, err = train(base_args(tmp_path, models_dir, data, steps=2, **flags), capsys)
    assert code == 0, err
    run = tmp_path / "checkpoint" / "run1"
    stored = json.loads((run / "train_config.json").read_text())
    assert stored["sample_mode"] == "documents" and stored["line_by_line"] is True
    code, _, err = train(["--run_name", "run1", "--checkpoint_dir", tmp_path / "checkpoint",
                          "--samples_dir", tmp_path / "samples", "--steps", 2], capsys)
    assert code == 0, err
    assert "data order" not in err  # the stored mode and data: the same stream
    whole = losses(tmp_path / "checkpoint" / "whole")
    assert losses(run) == pytest.approx(whole, abs=1e-5) and sorted(whole) == [1, 2, 3, 4]


def test_bad_sample_mode_is_one_line(tmp_path, models_dir, capsys):
    from train_helpers import base_args, snapshot, train

    data = _lines(tmp_path / "lines.txt")
    before = snapshot(tmp_path)
    code, _, err = train(base_args(tmp_path, models_dir, data, steps=1,
                                   sample_mode="sentences"), capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "--sample_mode must be one of windows, documents" in err
    assert snapshot(tmp_path) == before
