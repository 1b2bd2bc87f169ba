"""GPT-2's decode step in native code (native.cc), for x86 CPUs with AVX-512: fp32, or bf16
weights (AVX512-BF16's dot products, accumulated in fp32).

The fp32 fast path's first choice, and bf16's only one. TFLite's XNNPACK GEMM re-reads every
weight matrix once per 7-row block, so its 16-row step costs 3.8x its 1-row step; native.cc
keeps up to 16 rows in registers, reads each weight once per step and attends to a row's
filled slots only (TFLite reads every slot of the cache, masked or not). Measured on 2 cores:
a chain of GPT-2 124M's block matrices at 1 / 8 / 16 rows took 14.8 / 17.0 / 21.9 ms against
XNNPACK's 13.5 / 36.3 / 43.1 ms, with each row's numbers bit-identical whatever the row count.

The library is compiled at first use with the system's C++ compiler ($CXX, else c++, g++ or
clang++; -O3 -march=native -fopenmp) into the user's cache (gpt2tf.paths.cache_root()), under a
name keyed by the source, the compiler and the CPU, written atomically. Where there is no
compiler, no AVX-512 or no OpenMP, `NativeUnavailable` says why and the caller takes TFLite.

bf16 stores every matmul's weights (the tied LM head too) as bfloat16, rounded to nearest
even, and rounds each matmul's input to bf16 before it; products and sums, attention, norms
and the residual stream stay in fp32. It reads half of fp32's bytes per step.

`NativeStep` has LiteStep's interface (start, resize, extend, prefill, copy_row, step), with
the cache in one numpy array [L, 2, B, H, S, D] that the library reads and writes in place.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpt2tf import paths
from gpt2tf.decode.stepper import Stepper, checked_weights
from gpt2tf.errors import UserError
from gpt2tf.hparams import HParams

SOURCE = Path(__file__).with_name("native.cc")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
PRECISIONS = ("fp32", "bf16")
PANEL = 16  # columns per packed panel (native.cc's PANEL)
ALIGN = 64  # bytes: native.cc loads the panels with aligned AVX-512 loads
# Every prompt chunk runs at its own length (no padding: the library takes any row count);
# 128 keeps a chunk's stall of the server's running streams to one short step.
CHUNK = 128
COMPILERS = ("c++", "g++", "clang++")
SPINCOUNT = "50000"  # libgomp's GOMP_SPINCOUNT unless the user set one (see load_library)
_lock = threading.Lock()
_library: ctypes.CDLL | None = None


class NativeUnavailable(RuntimeError):
    """The native step cannot run on this machine (the message says why)."""


# ============================================================================ the library


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str:
    for name in ([os.environ["CXX"]] if os.environ.get("CXX") else []) + list(COMPILERS):
        found = shutil.which(name)
        if found:
            return found
    raise NativeUnavailable("no C++ compiler found (set CXX, or install g++)")


def library_path() -> Path:
    """Where the compiled library for this source, compiler and CPU lives (or will)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise NativeUnavailable(f"it is written for x86-64 CPUs, this is {platform.machine()}")
    flags = _cpu_flags()
    if "avx512f" not in flags:
        raise NativeUnavailable("this CPU has no AVX-512")
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"{cxx} --version failed: {e}") from None
    h = hashlib.sha256()
    for part in (SOURCE.read_text(), cxx, version, " ".join(FLAGS), " ".join(sorted(flags))):
        h.update(part.encode() + b"\0")
    return paths.cache_root() / "native" / f"gpt2tf-native-{h.hexdigest()[:20]}.so"


def _compile(target: Path) -> None:
    """Compile into a temp file beside `target`, then rename it there. OSError: the folder
    cannot be written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([_compiler(), *FLAGS, "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["(no message)"])[0]
            raise NativeUnavailable(f"compiling {SOURCE.name} failed: {first}")
        os.replace(tmp, target)
    except subprocess.SubprocessError as e:
        raise NativeUnavailable(f"compiling {SOURCE.name} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library() -> ctypes.CDLL:
    """The compiled library, compiled first where needed (once per process: later calls reuse
    it). Raises NativeUnavailable where it cannot be built or loaded."""
    global _library
    with _lock:
        if _library is None:
            target = library_path()
            if not target.is_file():
                try:
                    _compile(target)
                except OSError:  # the cache cannot be written: build a private copy
                    try:
                        target = Path(tempfile.mkdtemp(prefix="gpt2tf-native-")) / target.name
                        _compile(target)
                    except OSError as e:
                        raise NativeUnavailable(f"cannot build {SOURCE.name}: {e}") from None
            # libgomp's idle threads spin (300000 rounds by default) before they sleep: after
            # a step, that spin took a core from the server's HTTP thread (one streaming
            # client fell to 0.82x the CLI; 0.98x at 50000, with 16 clients at 6.15x one).
            os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
            try:
                lib = ctypes.CDLL(str(target))
            except OSError as e:
                raise NativeUnavailable(f"cannot load {target}: {e}") from None
            lib.gpt2_forward.restype = ctypes.c_int
            ptr, i32 = ctypes.c_void_p, ctypes.c_int  # in gpt2_forward's order
            lib.gpt2_forward.argtypes = [ptr, ptr, i32, ptr, ptr, ptr, ptr, i32, i32, i32, ptr,
                                         ptr, i32, i32]
            _library = lib
        return _library


# ============================================================================ the weights


def _aligned(shape: Sequence[int]) -> np.ndarray:
    n = int(np.prod(shape))
    buf = np.empty(n + ALIGN // 4, np.float32)
    skip = (-buf.ctypes.data % ALIGN) // 4
    return buf[skip:skip + n].reshape(shape)


def pack(w: np.ndarray) -> np.ndarray:
    """[K, N] -> panels [ceil(N/16), K, 16], zero-padded, 64-byte aligned: each panel is one
    contiguous stream for the GEMM."""
    k, n = w.shape
    panels = -(-n // PANEL)
    padded = np.zeros([k, panels * PANEL], np.float32)
    padded[:, :n] = w
    out = _aligned([panels, k, PANEL])
    out[...] = padded.reshape(k, panels, PANEL).transpose(1, 0, 2)
    return out


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even (as the CPU's vcvtneps2bf16)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def pack_bf16(w: np.ndarray) -> np.ndarray:
    """[K, N] -> bf16 panels [ceil(N/16), ceil(K/2), 16, 2] (the two k of a pair side by side,
    as vdpbf16ps takes them), zero-padded, 64-byte aligned; returned as its float32 view's
    owner (uint16 data)."""
    k, n = w.shape
    panels, pairs = -(-n // PANEL), -(-k // 2)
    padded = np.zeros([pairs * 2, panels * PANEL], np.float32)
    padded[:k, :n] = w
    out = _aligned([panels * pairs * PANEL]).view(np.uint16).reshape(panels, pairs, PANEL, 2)
    out[...] = to_bf16(padded).reshape(pairs, 2, panels, PANEL).transpose(2, 0, 3, 1)
    return out


_LAYER = ("ln_1/g", "ln_1/b", "attn/c_attn/w", "attn/c_attn/b", "attn/c_proj/w", "attn/c_proj/b",
          "ln_2/g", "ln_2/b", "mlp/c_fc/w", "mlp/c_fc/b", "mlp/c_proj/w", "mlp/c_proj/b")


def pack_weights(weights: dict[str, np.ndarray], hparams: HParams,
                 precision: str = "fp32") -> list[np.ndarray]:
    """The arrays native.cc takes, in its order (WTE, WPE, LNF_G, LNF_B, HEAD, then per layer
    _LAYER's), matrices packed (in bf16 with precision "bf16")."""
    packer = pack_bf16 if precision == "bf16" else pack
    w = checked_weights(weights, hparams)
    wte = np.ascontiguousarray(w["model/wte"])  # [V, C]
    out = [wte, np.ascontiguousarray(w["model/wpe"]), w["model/ln_f/g"], w["model/ln_f/b"],
           packer(wte.T)]  # the LM head is tied to wte: [C, V]
    for layer in range(hparams.n_layer):
        for part in _LAYER:
            array = w[f"model/h{layer}/{part}"]
            out.append(packer(array[0]) if part.endswith("/w") else np.ascontiguousarray(array))
    return out


# ============================================================================ the step


class NativeStep(Stepper):
    """native.cc's forward over a cache of `rows` rows; LiteStep's interface.

    Attention reads only a row's filled slots, so the cache length costs memory, not time: it
    grows through cache_lengths() as positions need it (the server shrinks it back with
    resize). Not thread-safe: one caller at a time. Memory: the packed weights (0.5 GB for 124M:
    the checkpoint's arrays can go) plus the cache (rows x 2 x n_layer x cache_len x n_embd
    floats)."""

    runtime = "native"

    def __init__(self, weights: dict[str, np.ndarray], hparams: HParams, *, threads: int = 2,
                 precision: str = "fp32"):
        super().__init__(hparams, threads)
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "bf16" and "avx512_bf16" not in _cpu_flags():
            raise NativeUnavailable("this CPU has no AVX512-BF16 (bf16 dot products)")
        if hparams.n_embd % hparams.n_head:
            raise NativeUnavailable(f"n_embd={hparams.n_embd} is not a multiple of n_head")
        self._lib = load_library()
        self.threads = threads
        self.precision = precision
        # kept alive here: the library reads them in place
        self._arrays = pack_weights(weights, hparams, precision)
        self._pointers = (ctypes.c_void_p * len(self._arrays))(
            *[a.ctypes.data for a in self._arrays])
        hp = hparams
        self._dims = np.array([hp.n_layer, hp.n_embd, hp.n_head, hp.n_vocab, hp.n_ctx], np.int32)
        self._cache = np.zeros([hp.n_layer, 2, 0, hp.n_head, 0, hp.head_dim], np.float32)
        self._replan(1, self._lengths[0], keep=False)

    # ------------------------------------------------------------------ the cache

    def _replan(self, rows: int, cache_len: int, *, keep: bool) -> None:
        hp = self.hparams
        cache = np.zeros([hp.n_layer, 2, rows, hp.n_head, cache_len, hp.head_dim], np.float32)
        if keep:
            r, s = min(rows, self.rows), min(cache_len, self.cache_len)
            cache[:, :, :r, :, :s] = self._cache[:, :, :r, :, :s]
        self._cache = cache

    @property
    def rows(self) -> int:
        return self._cache.shape[2]

    @property
    def cache_len(self) -> int:
        return self._cache.shape[4]

    @property
    def chunk_size(self) -> int:
        """The most tokens one extend() takes."""
        return min(CHUNK, self.hparams.n_ctx)

    # ------------------------------------------------------------------ running

    def _forward(self, tokens: np.ndarray, rows: np.ndarray, positions: np.ndarray,
                 logit_entries: np.ndarray) -> np.ndarray:
        tokens, rows, positions, logit_entries = (
            np.ascontiguousarray(a, np.int32) for a in (tokens, rows, positions, logit_entries))
        logits = np.empty([len(logit_entries), self.hparams.n_vocab], np.float32)
        c = self._cache
        status = self._lib.gpt2_forward(
            self._dims.ctypes.data, self._pointers, len(tokens), tokens.ctypes.data,
            rows.ctypes.data, positions.ctypes.data, c.ctypes.data, c.shape[2], c.shape[4],
            len(logit_entries), logit_entries.ctypes.data, logits.ctypes.data, self.threads,
            int(self.precision == "bf16"))
        if status != 0:  # the Python checks come first; this is the library's own guard
            raise ValueError("native step: a token, row or position out of range")
        return logits

    def extend(self, row: int, tokens: Sequence[int], start: int) -> np.ndarray:
        """Run 1..chunk_size tokens at positions start.. of cache row `row` (slots 0..start-1
        filled); fill slots start..start+len-1. Returns logits [n_vocab] of the last."""
        tokens = self._check_chunk(row, tokens, start)
        n = len(tokens)
        self._fit(start + n)
        return self._forward(tokens, np.full(n, row), np.arange(start, start + n),
                             np.array([n - 1]))[0]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cache slots of row src to row dst (rows sharing a prompt)."""
        self._check_copy(src, dst, length)
        if src != dst:
            self._cache[:, :, dst, :, :length] = self._cache[:, :, src, :, :length]

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One new token per row at its own position (row b's slots 0..positions[b]-1 filled);
        writes its key/value at slot positions[b]. Returns logits [rows, n_vocab] float32."""
        tokens, positions = self._check_step(tokens, positions)
        self._fit(int(positions.max()) + 1)
        every = np.arange(self.rows)
        return self._forward(tokens, every, positions, every)

    def step_rows(self, rows: np.ndarray, tokens: np.ndarray, positions: np.ndarray,
                  chunk: tuple[int, Sequence[int], int] | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
        """One token for each of `rows` (distinct cache rows) at its position, and with `chunk`
        = (row, tokens, start) a prompt chunk of another row, in one pass over the weights (the
        server admits a prompt while the others decode, at little more than a step's cost; each
        entry's numbers are the same as alone). Rows not listed are not computed. Returns
        (logits [len(rows), n_vocab], the chunk's last logits [n_vocab] or None)."""
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 1 or len(set(rows.tolist())) != len(rows) or \
                (len(rows) and not (0 <= rows.min() and rows.max() < self.rows)):
            raise ValueError(f"rows must be distinct rows of 0..{self.rows - 1}, got {rows}")
        tokens, positions = self._check_step(tokens, positions, len(rows))
        need = int(positions.max()) + 1 if len(rows) else 1
        parts = [(tokens, rows, positions)]
        if chunk is not None:
            row, ids, start = chunk
            ids = self._check_chunk(row, ids, start)
            if row in rows:
                raise ValueError(f"row {row} both steps and takes a prompt chunk")
            parts.append((ids, np.full(len(ids), row), np.arange(start, start + len(ids))))
            need = max(need, start + len(ids))
        self._fit(need)
        entries = [np.concatenate(x) for x in zip(*parts)]
        wanted = np.arange(len(rows))
        if chunk is not None:
            wanted = np.append(wanted, len(entries[0]) - 1)
        logits = self._forward(*entries, wanted)
        return logits[:len(rows)], (logits[-1] if chunk is not None else None)

