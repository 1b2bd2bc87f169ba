// GPT-2's forward pass over a KV cache for decoding on x86 CPUs with AVX-512: float32, or
// bf16 weights with AVX512-BF16 (fp32 sums).
//
// Built by gpt2tf.decode.native at first use (c++ -O3 -march=native -fopenmp) and called through
// ctypes. Why it exists: TFLite's XNNPACK GEMM streams every weight matrix from memory once per
// 7-row block, so a 16-row step reads the weights three times and runs at a third of the speed
// the memory allows; this one keeps up to 16 rows in registers and streams each weight once per
// step, with a software prefetch far enough ahead to keep the memory busy while it computes.
//
// One call runs `n` entries, each a token at (cache row, position); entry i attends to slots
// 0..positions[i] of its row. A decode step is one entry per row; a prompt chunk is consecutive
// positions of one row. Every entry's numbers are computed the same way whatever else shares
// the call (no reduction runs across entries, and a GEMM row tile's arithmetic does not depend
// on its height), so a row's tokens never depend on how many rows share a step.
//
// Weights come packed by the Python side: a [K, N] matrix as panels [ceil(N/16)][K][16] (zero
// padded), 64-byte aligned; in bf16, as [ceil(N/16)][ceil(K/2)][16][2] (see gemm_bf16).
// Cache: float32 [L, 2, B, H, S, D] (k then v).
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <vector>

#ifndef __AVX512F__
#error "gpt2tf's native decode step needs AVX-512 (-march=native on a CPU that has it)"
#endif

namespace {

constexpr int PANEL = 16;      // columns per packed panel: one zmm register
constexpr int MAX_TILE = 16;   // rows a GEMM tile keeps in registers (16 accumulators)
constexpr int PREFETCH = 1024; // floats ahead (64 cache lines): measured best of 256..4096

enum Epilogue { STORE = 0, GELU = 1, ADD = 2 };

// exp for float32 lanes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial
// (relative error ~2e-7, well inside the 1e-4 logit tolerance).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// GPT-2's tanh GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh(u) = 1 - 2/(e^2u + 1)
inline __m512 gelu512(__m512 x) {
  __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f),
                           _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x),
                                           _mm512_mul_ps(x, x), x));
  __m512 e = exp512(_mm512_add_ps(u, u));
  __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                           _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(t, _mm512_set1_ps(1.0f)));
}

// A tile's epilogue: y[m, 0:16] (op)= acc[m] + bias, the columns past `mask` untouched.
template <int MR>
inline void store_rows(const __m512* acc, const float* bias, float* y, int ldy, __mmask16 mask,
                       int epilogue) {
  __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
  for (int m = 0; m < MR; ++m) {
    __m512 v = _mm512_add_ps(acc[m], b);
    float* out = y + (int64_t)m * ldy;
    if (epilogue == GELU) v = gelu512(v);
    if (epilogue == ADD) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), v);
    _mm512_mask_storeu_ps(out, mask, v);
  }
}

// y[m, 0:16] (op)= x[m, :] . panel + bias for MR rows; `mask` limits the last panel's columns.
template <int MR>
void tile(const float* x, int K, const float* panel, const float* bias, float* y, int ldy,
          __mmask16 mask, int epilogue) {
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + (int64_t)k * PANEL + PREFETCH), _MM_HINT_T0);
    __m512 w = _mm512_load_ps(panel + (int64_t)k * PANEL);
    for (int m = 0; m < MR; ++m)
      acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[(int64_t)m * K + k]), w, acc[m]);
  }
  store_rows<MR>(acc, bias, y, ldy, mask, epilogue);
}

using TileFn = void (*)(const float*, int, const float*, const float*, float*, int, __mmask16, int);
const TileFn TILES[MAX_TILE + 1] = {
    nullptr,   tile<1>,  tile<2>,  tile<3>,  tile<4>,  tile<5>,  tile<6>,  tile<7>,  tile<8>,
    tile<9>,   tile<10>, tile<11>, tile<12>, tile<13>, tile<14>, tile<15>, tile<16>};

// Every (panel, row tile) of an [M, N] output, panels work-shared among the team (inside a
// parallel region): f(panel, first row, rows <= MAX_TILE, the panel's column mask). Panels
// outside, tiles inside: a panel stays in cache while all its row tiles read it.
template <typename F>
void each_tile(int M, int N, F f) {
  const int panels = (N + PANEL - 1) / PANEL;
#pragma omp for schedule(static)
  for (int j = 0; j < panels; ++j) {
    const int cols = N - j * PANEL < PANEL ? N - j * PANEL : PANEL;
    const __mmask16 mask = (__mmask16)((1u << cols) - 1);
    for (int m0 = 0; m0 < M; m0 += MAX_TILE) f(j, m0, M - m0 < MAX_TILE ? M - m0 : MAX_TILE, mask);
  }
}

// y[M, N] (op)= x[M, K] W[K, N] + b, W packed; inside a parallel region (work-shared panels).
void gemm(const float* x, int M, int K, const float* packed, const float* bias, int N, float* y,
          int epilogue) {
  each_tile(M, N, [&](int j, int m0, int mr, __mmask16 mask) {
    TILES[mr](x + (int64_t)m0 * K, K, packed + (int64_t)j * K * PANEL,
              bias ? bias + j * PANEL : nullptr, y + (int64_t)m0 * N + j * PANEL, N, mask,
              epilogue);
  });
}

#ifdef __AVX512BF16__
// bf16 weights: a [K, N] matrix as panels [ceil(N/16)][ceil(K/2)][16][2] (k pairs side by
// side, as vdpbf16ps takes them); x as bf16 pairs [M][ceil(K/2)]. Products accumulate in fp32.
template <int MR>
void tile_bf16(const uint32_t* xp, int K2, const uint16_t* panel, const float* bias, float* y,
               int ldy, __mmask16 mask, int epilogue) {
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int k = 0; k < K2; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + (int64_t)k * 2 * PANEL + 2 * PREFETCH),
                 _MM_HINT_T0);
    const __m512bh w = (__m512bh)_mm512_load_si512(panel + (int64_t)k * 2 * PANEL);
    for (int m = 0; m < MR; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32((int)xp[(int64_t)m * K2 + k]), w);
  }
  store_rows<MR>(acc, bias, y, ldy, mask, epilogue);
}

using TileBf16 = void (*)(const uint32_t*, int, const uint16_t*, const float*, float*, int,
                          __mmask16, int);
const TileBf16 TILES_BF16[MAX_TILE + 1] = {
    nullptr,        tile_bf16<1>,  tile_bf16<2>,  tile_bf16<3>,  tile_bf16<4>,  tile_bf16<5>,
    tile_bf16<6>,   tile_bf16<7>,  tile_bf16<8>,  tile_bf16<9>,  tile_bf16<10>, tile_bf16<11>,
    tile_bf16<12>,  tile_bf16<13>, tile_bf16<14>, tile_bf16<15>, tile_bf16<16>};

// As gemm, with bf16 weights: x is rounded to bf16 pairs in `xp` first (work-shared rows).
void gemm_bf16(const float* x, int M, int K, const uint16_t* packed, const float* bias, int N,
               float* y, int epilogue, uint32_t* xp) {
  const int K2 = (K + 1) / 2;
#pragma omp for schedule(static)
  for (int m = 0; m < M; ++m) {  // round to nearest even, 16 at a time; pairs are adjacent
    const float* xm = x + (int64_t)m * K;
    uint16_t* out = reinterpret_cast<uint16_t*>(xp + (int64_t)m * K2);
    int k = 0;
    for (; k + 16 <= K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xm + k)));
    if (k < K) {
      const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
      _mm256_mask_storeu_epi16(out + k, mask,
                               (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, xm + k)));
    }
    if (K & 1) out[K] = 0;  // the pad of the last pair (its weight row is zero too)
  }
  each_tile(M, N, [&](int j, int m0, int mr, __mmask16 mask) {
    TILES_BF16[mr](xp + (int64_t)m0 * K2, K2, packed + (int64_t)j * K2 * 2 * PANEL,
                   bias ? bias + j * PANEL : nullptr, y + (int64_t)m0 * N + j * PANEL, N, mask,
                   epilogue);
  });
}
#endif

// LayerNorm of rows [n, C] (work-shared rows), as gpt2tf.model.norm: eps 1e-5, biased variance.
void layer_norm(const float* x, int n, int C, const float* g, const float* b, float* y) {
#pragma omp for schedule(static)
  for (int i = 0; i < n; ++i) {
    const float* xi = x + (int64_t)i * C;
    float* yi = y + (int64_t)i * C;
    float mean = 0.0f, var = 0.0f;
#pragma omp simd reduction(+ : mean)
    for (int c = 0; c < C; ++c) mean += xi[c];
    mean /= C;
#pragma omp simd reduction(+ : var)
    for (int c = 0; c < C; ++c) var += (xi[c] - mean) * (xi[c] - mean);
    const float inv = 1.0f / std::sqrt(var / C + 1e-5f);
#pragma omp simd
    for (int c = 0; c < C; ++c) yi[c] = (xi[c] - mean) * inv * g[c] + b[c];
  }
}

struct Dims {
  int n_layer, n_embd, n_head, n_vocab, n_ctx;
};

// Per layer, 12 pointers in this order (the Python side packs them).
enum LayerWeight { LN1_G, LN1_B, ATTN_W, ATTN_B, APROJ_W, APROJ_B, LN2_G, LN2_B, FC_W, FC_B,
                   MPROJ_W, MPROJ_B, PER_LAYER };
enum ModelWeight { WTE, WPE, LNF_G, LNF_B, HEAD, GLOBAL };

}  // namespace

extern "C" {

// Returns 0, -1 where an entry's (row, position, token) is out of range (nothing written), or
// -2 where bf16 weights are asked of a build without AVX512-BF16. With `bf16`, the packed
// matrices (not the embeddings, norms or biases) are bf16 panels (see gemm_bf16).
int gpt2_forward(const int* dims_in, const float* const* w, int n, const int* tokens,
                 const int* rows, const int* positions, float* cache, int B, int S,
                 int n_logits, const int* logit_entries, float* logits, int threads, int bf16) {
  const Dims d{dims_in[0], dims_in[1], dims_in[2], dims_in[3], dims_in[4]};
  const int C = d.n_embd, H = d.n_head, D = C / H;
  for (int i = 0; i < n; ++i)
    if (rows[i] < 0 || rows[i] >= B || positions[i] < 0 || positions[i] >= S ||
        positions[i] >= d.n_ctx || tokens[i] < 0 || tokens[i] >= d.n_vocab)
      return -1;
  for (int i = 0; i < n_logits; ++i)
    if (logit_entries[i] < 0 || logit_entries[i] >= n) return -1;
#ifndef __AVX512BF16__
  if (bf16) return -2;
#endif
  std::vector<float> h((size_t)n * C), x((size_t)n * C), qkv((size_t)n * 3 * C),
      att((size_t)n * C), fc((size_t)n * 4 * C), last((size_t)(n_logits > 0 ? n_logits : 1) * C);
  const int64_t row_stride = (int64_t)H * S * D, kv_stride = (int64_t)B * row_stride;
  const float scale = 1.0f / std::sqrt((float)D);
  std::vector<uint32_t> xp(bf16 ? (size_t)n * (2 * C + 1) : 0);  // x in bf16 pairs (K <= 4C)
  auto matmul = [&](const float* in, int M, int K, const float* W, const float* b, int N,
                    float* out, int epilogue) {
#ifdef __AVX512BF16__
    if (bf16) {
      gemm_bf16(in, M, K, reinterpret_cast<const uint16_t*>(W), b, N, out, epilogue, xp.data());
      return;
    }
#endif
    gemm(in, M, K, W, b, N, out, epilogue);
  };

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> score(S);
#pragma omp for schedule(static)
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < C; ++c)
        h[(size_t)i * C + c] = w[WTE][(int64_t)tokens[i] * C + c] + w[WPE][(int64_t)positions[i] * C + c];

    for (int l = 0; l < d.n_layer; ++l) {
      const float* const* lw = w + GLOBAL + l * PER_LAYER;
      float* k_cache = cache + (int64_t)l * 2 * kv_stride;  // [B, H, S, D]
      float* v_cache = k_cache + kv_stride;
      layer_norm(h.data(), n, C, lw[LN1_G], lw[LN1_B], x.data());
      matmul(x.data(), n, C, lw[ATTN_W], lw[ATTN_B], 3 * C, qkv.data(), STORE);
#pragma omp for schedule(static)
      for (int i = 0; i < n; ++i)  // this call's keys and values into their slots first
        for (int hh = 0; hh < H; ++hh) {
          const int64_t slot = rows[i] * row_stride + ((int64_t)hh * S + positions[i]) * D;
          for (int e = 0; e < D; ++e) {
            k_cache[slot + e] = qkv[(size_t)i * 3 * C + C + hh * D + e];
            v_cache[slot + e] = qkv[(size_t)i * 3 * C + 2 * C + hh * D + e];
          }
        }
#pragma omp for schedule(static)
      for (int ih = 0; ih < n * H; ++ih) {  // then each entry over its slots 0..position
        const int i = ih / H, hh = ih % H, len = positions[i] + 1;
        const float* q = qkv.data() + (size_t)i * 3 * C + hh * D;
        const float* keys = k_cache + rows[i] * row_stride + (int64_t)hh * S * D;
        const float* values = v_cache + rows[i] * row_stride + (int64_t)hh * S * D;
        float top = -INFINITY;
        for (int j = 0; j < len; ++j) {
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int e = 0; e < D; ++e) s += q[e] * keys[(int64_t)j * D + e];
          score[j] = s * scale;
          top = score[j] > top ? score[j] : top;
        }
        float total = 0.0f;
        int j = 0;
        for (; j + 16 <= len; j += 16) {
          __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(&score[j]), _mm512_set1_ps(top)));
          _mm512_storeu_ps(&score[j], p);
          total += _mm512_reduce_add_ps(p);
        }
        if (j < len) {
          const __mmask16 mask = (__mmask16)((1u << (len - j)) - 1);
          __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, &score[j]), _mm512_set1_ps(top)));
          p = _mm512_maskz_mov_ps(mask, p);
          _mm512_mask_storeu_ps(&score[j], mask, p);
          total += _mm512_reduce_add_ps(p);
        }
        float* out = att.data() + (size_t)i * C + hh * D;
        for (int e = 0; e < D; ++e) out[e] = 0.0f;
        const float inv = 1.0f / total;
        for (int jj = 0; jj < len; ++jj) {
          const float p = score[jj] * inv;
#pragma omp simd
          for (int e = 0; e < D; ++e) out[e] += p * values[(int64_t)jj * D + e];
        }
      }
      matmul(att.data(), n, C, lw[APROJ_W], lw[APROJ_B], C, h.data(), ADD);
      layer_norm(h.data(), n, C, lw[LN2_G], lw[LN2_B], x.data());
      matmul(x.data(), n, C, lw[FC_W], lw[FC_B], 4 * C, fc.data(), GELU);
      matmul(fc.data(), n, 4 * C, lw[MPROJ_W], lw[MPROJ_B], C, h.data(), ADD);
    }
#pragma omp for schedule(static)
    for (int i = 0; i < n_logits; ++i)
      for (int c = 0; c < C; ++c) x[(size_t)i * C + c] = h[(size_t)logit_entries[i] * C + c];
    layer_norm(x.data(), n_logits, C, w[LNF_G], w[LNF_B], last.data());
    matmul(last.data(), n_logits, C, w[HEAD], nullptr, d.n_vocab, logits, STORE);
  }
  return 0;
}

}  // extern "C"
