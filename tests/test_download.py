"""Model download against a local fake of OpenAI's storage: resume, skip, errors, CLI exit codes.

The fake server runs http.server in a thread on 127.0.0.1 (ephemeral port). It serves a small
model tree, honours `Range: bytes=N-` with 206 + Content-Range, can drop the connection part-way
through one file once, logs every request, and answers 404 for anything it does not hold.
"""

import http.server
import json
import os
import random
import socket
import sys
import threading
from pathlib import Path

import pytest

try:
    import gpt2tf  # noqa: F401
except ImportError:  # a bare clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpt2tf import paths  # noqa: E402
from gpt2tf.cli import download_main  # noqa: E402
from gpt2tf.download import download_model, is_gpt2_downloaded  # noqa: E402
from gpt2tf.errors import UserError  # noqa: E402

DATA = paths.CKPT_PREFIX + ".data-00000-of-00001"
DATA_SIZE = 300_000  # several download chunks, so a drop lands mid-file
DROP_AT = 150_000


def fake_model_files() -> dict[str, bytes]:
    rng = random.Random(0)
    return {
        paths.CKPT_STATE: b'model_checkpoint_path: "model.ckpt"\n'
        b'all_model_checkpoint_paths: "model.ckpt"\n',
        paths.ENCODER: json.dumps({"!": 0, '"': 1, "<|endoftext|>": 2}).encode(),
        paths.HPARAMS: json.dumps(
            {"n_vocab": 3, "n_ctx": 8, "n_embd": 4, "n_head": 2, "n_layer": 1}
        ).encode(),
        DATA: rng.randbytes(DATA_SIZE),
        paths.CKPT_PREFIX + ".index": rng.randbytes(2_000),
        paths.CKPT_PREFIX + ".meta": rng.randbytes(20_000),
        paths.VOCAB: b"#version: 0.2\n\xc4\xa0 t\n",
    }


class FakeStorage:
    """State shared by the handler threads: what to serve, what was asked, what to break."""

    def __init__(self, root: Path):
        self.root = root
        self.log: list[tuple[str, str, str | None]] = []  # (method, file name, Range header)
        self.drop: tuple[str, int] | None = None  # (file name, bytes sent before the drop), once
        self.ignore_range = False  # answer 200 with the whole file, like a server without Range
        self.lock = threading.Lock()
        self.url = ""

    def put_model(
        self, name: str = "124M", files: dict[str, bytes] | None = None, prefix: str = ""
    ) -> Path:
        folder = self.root / prefix / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        for filename, data in (files or fake_model_files()).items():
            (folder / filename).write_bytes(data)
        return folder

    def gets(self, filename: str | None = None) -> list[tuple[str, str, str | None]]:
        return [r for r in self.log if r[0] == "GET" and filename in (None, r[1])]


def make_handler(storage: FakeStorage):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real server would do for requests.Session

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, *, body: bool):
            rel = self.path.split("?")[0].lstrip("/")
            path = (storage.root / rel).resolve()
            rng = self.headers.get("Range")
            with storage.lock:
                storage.log.append((self.command, path.name, rng))
            # "//" names a different blob on real storage: a base URL's trailing '/' must go.
            bad = "//" in self.path or storage.root.resolve() not in path.parents
            if bad or not path.is_file():
                self._send(404, b"<Error><Code>BlobNotFound</Code></Error>", body=body)
                return
            data = path.read_bytes()
            start = 0
            if rng and not storage.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body=body)
                    return
                headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
                status = 206
            else:
                headers, status = {}, 200
            payload = data[start:]
            with storage.lock:
                drop = storage.drop if body and storage.drop else None
                if drop and drop[0] == path.name:
                    storage.drop = None
                else:
                    drop = None
            if drop:
                # Announce the whole length, send a prefix, hang up: a connection lost mid-file.
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[: drop[1]])
                self.wfile.flush()
                self.close_connection = True
                return
            self._send(status, payload, headers, body=body)

        def _send(self, status, payload, headers=None, *, body):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler


@pytest.fixture
def server(tmp_path):
    storage = FakeStorage(tmp_path / "storage")
    storage.root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(storage))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    storage.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield storage
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def models_dir(tmp_path) -> Path:
    return tmp_path / "models"


@pytest.fixture(autouse=True)
def no_env_base_url(monkeypatch):
    # A developer's own mirror setting must not redirect the tests to the network.
    monkeypatch.delenv(paths.BASE_URL_ENV, raising=False)


def assert_identical(src: Path, dst: Path) -> None:
    for filename in paths.MODEL_FILES:
        assert (dst / filename).read_bytes() == (src / filename).read_bytes(), filename
        assert not (dst / (filename + ".part")).exists(), filename
    assert sorted(p.name for p in dst.iterdir()) == sorted(paths.MODEL_FILES)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def cli(server, models_dir, *args) -> list[str]:
    return [*args, "--models_dir", str(models_dir), "--base_url", server.url]


def test_complete_download(server, models_dir):
    src = server.put_model()
    out = download_model("124M", models_dir=models_dir, base_url=server.url, progress=False)
    assert out == models_dir / "124M"
    assert_identical(src, out)
    assert is_gpt2_downloaded(models_dir, "124M")
    assert len(server.gets()) == len(paths.MODEL_FILES)


def test_dropped_connection_resumes(server, models_dir, capsys):
    src = server.put_model()
    server.drop = (DATA, DROP_AT)
    dest = models_dir / "124M" / DATA
    part = dest.with_name(DATA + ".part")

    assert download_main(cli(server, models_dir, "124M")) == 1
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1, err
    assert err.rstrip("\n").splitlines()[-1].startswith("error: ")
    assert "Traceback" not in err
    assert DATA in error_lines(err)[0] and "resume" in error_lines(err)[0]
    assert not dest.exists()
    assert part.is_file()
    done = part.stat().st_size
    assert 0 < done <= DROP_AT
    assert src.joinpath(DATA).read_bytes().startswith(part.read_bytes())
    assert not is_gpt2_downloaded(models_dir, "124M")

    server.log.clear()
    assert download_main(cli(server, models_dir, "124M")) == 0
    assert server.gets(DATA) == [("GET", DATA, f"bytes={done}-")]
    assert_identical(src, models_dir / "124M")
    assert is_gpt2_downloaded(models_dir, "124M")


def test_server_without_range_support_restarts(server, models_dir):
    src = server.put_model()
    server.drop = (DATA, DROP_AT)
    with pytest.raises(UserError, match="resume"):
        download_model("124M", models_dir=models_dir, base_url=server.url, progress=False)
    server.ignore_range = True  # answers 200 with the whole file: must not append it to the .part
    download_model("124M", models_dir=models_dir, base_url=server.url, progress=False)
    assert_identical(src, models_dir / "124M")


def test_complete_part_is_finished_via_416(server, models_dir):
    src = server.put_model()
    dest_dir = models_dir / "124M"
    dest_dir.mkdir(parents=True)
    dest_dir.joinpath(DATA + ".part").write_bytes(src.joinpath(DATA).read_bytes())
    download_model("124M", models_dir=models_dir, base_url=server.url, progress=False)
    assert server.gets(DATA) == [("GET", DATA, f"bytes={DATA_SIZE}-")]
    assert_identical(src, dest_dir)


def test_part_longer_than_file_is_discarded(server, models_dir):
    src = server.put_model()
    dest_dir = models_dir / "124M"
    dest_dir.mkdir(parents=True)
    dest_dir.joinpath(DATA + ".part").write_bytes(b"x" * (DATA_SIZE + 10))
    download_model("124M", models_dir=models_dir, base_url=server.url, progress=False)
    assert [r[2] for r in server.gets(DATA)] == [f"bytes={DATA_SIZE + 10}-", None]
    assert_identical(src, dest_dir)


def test_404_writes_nothing(server, models_dir, capsys):
    # The server holds no model at all.
    assert download_main(cli(server, models_dir, "124M")) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "404" in lines[0] and "/models/124M/checkpoint" in lines[0]
    assert not models_dir.exists()


def test_unknown_model_name(server, models_dir, capsys):
    assert download_main(cli(server, models_dir, "999M")) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "999M" in lines[0]
    assert all(name in lines[0] for name in paths.MODEL_NAMES)
    assert not models_dir.exists()
    assert server.log == []


def test_old_name_downloads_into_new_folder(server, models_dir):
    src = server.put_model("124M")
    assert download_main(cli(server, models_dir, "117M")) == 0
    assert_identical(src, models_dir / "124M")
    assert not (models_dir / "117M").exists()
    assert is_gpt2_downloaded(models_dir, "117M")  # the old name finds the new folder


def test_complete_files_are_skipped(server, models_dir):
    src = server.put_model()
    download_model("124M", models_dir=models_dir, base_url=server.url, progress=False)
    # A wrong-sized final file is fetched again; the other six are only checked with HEAD.
    (models_dir / "124M" / paths.VOCAB).write_bytes(b"truncated")
    server.log.clear()
    download_model("124M", models_dir=models_dir, base_url=server.url, progress=False)
    assert [r[1] for r in server.gets()] == [paths.VOCAB]
    assert len([r for r in server.log if r[0] == "HEAD"]) == len(paths.MODEL_FILES)
    assert_identical(src, models_dir / "124M")


def test_present_files_kept_when_server_cannot_tell_size(server, models_dir):
    # Offline mirror / HEAD failing: a complete local model is used as is, never deleted.
    src = server.put_model()
    download_model("124M", models_dir=models_dir, base_url=server.url, progress=False)
    for filename in paths.MODEL_FILES:
        (src / filename).unlink()  # now every HEAD and GET is a 404
    server.log.clear()
    download_model("124M", models_dir=models_dir, base_url=server.url, progress=False)
    assert server.gets() == []
    assert is_gpt2_downloaded(models_dir, "124M")


def test_bad_hparams_is_a_user_error(server, models_dir):
    files = fake_model_files()
    files[paths.HPARAMS] = json.dumps({"n_vocab": 3, "n_layers": 1}).encode()
    server.put_model(files=files)
    with pytest.raises(UserError, match="hparams"):
        download_model("124M", models_dir=models_dir, base_url=server.url, progress=False)


def test_wrong_checkpoint_name_is_a_user_error(server, models_dir):
    files = fake_model_files()
    files[paths.CKPT_STATE] = b'model_checkpoint_path: "model.ckpt-1000"\n'
    server.put_model(files=files)
    with pytest.raises(UserError, match="checkpoint"):
        download_model("124M", models_dir=models_dir, base_url=server.url, progress=False)


def test_base_url_env_var(server, models_dir, monkeypatch):
    src = server.put_model()
    monkeypatch.setenv(paths.BASE_URL_ENV, server.url + "/")  # a trailing '/' is tolerated
    assert download_main(["124M", "--models_dir", str(models_dir)]) == 0
    assert_identical(src, models_dir / "124M")
    assert len(server.gets()) == len(paths.MODEL_FILES)


def test_base_url_with_path_prefix(server, models_dir):
    # Like https://openaipublic.blob.core.windows.net/gpt-2: a base URL with a path of its own.
    src = server.put_model(prefix="gpt-2")
    download_model("124M", models_dir=models_dir, base_url=server.url + "/gpt-2/", progress=False)
    assert_identical(src, models_dir / "124M")


def test_unreachable_server(models_dir, capsys):
    with socket.socket() as s:  # a port that was just free: nothing listens there now
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert download_main(["124M", "--models_dir", str(models_dir), "--base_url", url]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and url in lines[0] and "re-run" in lines[0]
    assert not models_dir.exists()  # the folders this run created are gone again


def test_is_gpt2_downloaded(tmp_path):
    folder = tmp_path / "models" / "124M"
    assert not is_gpt2_downloaded(tmp_path / "models", "124M")
    folder.mkdir(parents=True)
    for filename in paths.MODEL_FILES:
        (folder / filename).write_bytes(b"x")
    assert is_gpt2_downloaded(tmp_path / "models", "124M")
    (folder / (DATA + ".part")).write_bytes(b"x")
    assert not is_gpt2_downloaded(tmp_path / "models", "124M")
    os.remove(folder / (DATA + ".part"))
    os.remove(folder / paths.VOCAB)
    assert not is_gpt2_downloaded(tmp_path / "models", "124M")
