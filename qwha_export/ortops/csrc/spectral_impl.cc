// Compute kernels of Y = Base + WHT_n(X) . F~^T (see spectral.h for the layout); y may alias base. Compiled three
// times: with the baseline flags (portable loops), -march=x86-64-v3 (AVX2 + FMA intrinsics) and -march=x86-64-v4
// (AVX-512 where it pays); QWHA_NS names the namespace. Products by number of rows: 1 (sparse_token: 8 rows at a
// time, WHT(x) read by scalar loads), 2..16 (sparse_few: a tile of 4, 8 or 16 tokens per register, 8 rows at a
// time), more (sparse_tile).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "spectral.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QWHA_AVX2 1
#endif
#if defined(__AVX512F__) && defined(QWHA_AVX2)
#define QWHA_AVX512 1  // the x86-64-v4 variant: 16-wide products for several tokens, masked broadcasts for one
#endif

#ifndef QWHA_NS
#error "compile with -DQWHA_NS=qwha_baseline or -DQWHA_NS=qwha_v3"
#endif

namespace QWHA_NS {
namespace {

using qwha::kLanes;
using qwha::SpectralLayout;

// tokens per tile of the multi-token path: 8 AVX2 / 4 AVX-512 accumulators per row. A tile of zt (n x 64 floats)
// stays in L2; 128 tokens (8 AVX-512 accumulators) read 512 bytes of it per entry and were 1.3x slower at 512 tokens.
constexpr int64_t kTile = 64;
constexpr int64_t kFewTokens = 16;  // up to this many tokens: sparse_few (tiles of 4, 8 or 16)
constexpr int64_t kBlockChunk = 32;  // row blocks per parallel task
constexpr int64_t kSlack = 8;        // floats past the last row of the transposed sums (read by add_transposed)
constexpr int64_t kPrefetch = 96;    // slots ahead that the one-token product prefetches (3 KB of values)

// d[j * ds + i] = s[i * ss + j] for i < ri, j < rj (an 8 x 8 block in registers when full).
__attribute__((always_inline)) inline void transpose8(const float* s, int64_t ss, float* d, int64_t ds, int64_t ri = 8, int64_t rj = 8) {
#ifdef QWHA_AVX2
  if (ri == 8 && rj == 8) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ss);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_ps(d + i * ds, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
      _mm256_storeu_ps(d + (i + 4) * ds, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < ri; ++i)
    for (int64_t j = 0; j < rj; ++j) d[j * ds + i] = s[i * ss + j];
}

// d[j * 4 + i] = s[i * ss + j] for i < 4, j < 4 (zero for rows i >= ri): a 4 x 4 block (16 consecutive floats out).
__attribute__((always_inline)) inline void transpose4(const float* s, int64_t ss, float* d, int64_t ri) {
#ifdef QWHA_AVX2
  __m128 r[4];
  for (int i = 0; i < 4; ++i) r[i] = i < ri ? _mm_loadu_ps(s + i * ss) : _mm_setzero_ps();
  _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]);
  for (int j = 0; j < 4; ++j) _mm_storeu_ps(d + 4 * j, r[j]);
#else
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < 4; ++i) d[j * 4 + i] = i < ri ? s[i * ss + j] : 0.0f;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// the transform

// In-place unnormalised Walsh-Hadamard transform of size p on elements of `w` floats each (element i at v + i*w).
void fwht(float* v, int64_t p, int64_t w) {
  for (int64_t h = 1; h < p; h <<= 1) {
    for (int64_t i = 0; i < p; i += 2 * h) {
      float* a = v + i * w;
      float* b = v + (i + h) * w;
      const int64_t len = h * w;  // elements i..i+h-1 are contiguous: one run of h*w floats
      int64_t e = 0;
#ifdef QWHA_AVX512
      for (; e + 16 <= len; e += 16) {
        const __m512 u = _mm512_loadu_ps(a + e), d = _mm512_loadu_ps(b + e);
        _mm512_storeu_ps(a + e, _mm512_add_ps(u, d));
        _mm512_storeu_ps(b + e, _mm512_sub_ps(u, d));
      }
#endif
#ifdef QWHA_AVX2  // explicit 8- and 4-wide steps: the first stages of a few-token tile are runs of 4 or 8 floats
      for (; e + 8 <= len; e += 8) {
        const __m256 u = _mm256_loadu_ps(a + e), d = _mm256_loadu_ps(b + e);
        _mm256_storeu_ps(a + e, _mm256_add_ps(u, d));
        _mm256_storeu_ps(b + e, _mm256_sub_ps(u, d));
      }
      for (; e + 4 <= len; e += 4) {
        const __m128 u = _mm_loadu_ps(a + e), d = _mm_loadu_ps(b + e);
        _mm_storeu_ps(a + e, _mm_add_ps(u, d));
        _mm_storeu_ps(b + e, _mm_sub_ps(u, d));
      }
#endif
      for (; e < len; ++e) {
        const float u = a[e], d = b[e];
        a[e] = u + d;
        b[e] = u - d;
      }
    }
  }
}

#ifdef QWHA_AVX2
struct V8 {  // 8 floats (AVX2)
  using T = __m256;
  static constexpr int kWidth = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T fmsub(T a, T b, T c) { return _mm256_fmsub_ps(a, b, c); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
};
struct V4 {  // 4 floats (SSE registers, VEX-encoded FMA)
  using T = __m128;
  static constexpr int kWidth = 4;
  static T zero() { return _mm_setzero_ps(); }
  static T set1(float v) { return _mm_set1_ps(v); }
  static T load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, T v) { _mm_storeu_ps(p, v); }
  static T fmadd(T a, T b, T c) { return _mm_fmadd_ps(a, b, c); }
};
#endif
#ifdef QWHA_AVX512
struct V16 {  // 16 floats (AVX-512)
  using T = __m512;
  static constexpr int kWidth = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T fmsub(T a, T b, T c) { return _mm512_fmsub_ps(a, b, c); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
};
#endif

#ifdef QWHA_AVX2
// mix_hk on NQ vectors of floats at offset c0 of every block, held in registers while the inputs stream through.
template <class V, int NQ = 4>
void mix_chunk(const SpectralLayout& L, const float* in, int64_t in_stride, float* out, int64_t len, int64_t c0) {
  const int64_t k = L.k;
  const int32_t* plus = L.hk_plus.data();
  const int32_t* start = L.hk_plus_start.data();
  constexpr int w = V::kWidth;
  typename V::T s[NQ];
  for (int q = 0; q < NQ; ++q) s[q] = V::zero();
  for (int64_t b = 0; b < k; ++b)
    for (int q = 0; q < NQ; ++q) s[q] = V::add(s[q], V::load(in + b * in_stride + c0 + q * w));
  const typename V::T two = V::set1(2.0f);
  for (int64_t a = 0; a < k; ++a) {
    typename V::T acc[NQ];
    for (int q = 0; q < NQ; ++q) acc[q] = V::zero();
    for (int32_t j = start[a]; j < start[a + 1]; ++j)
      for (int q = 0; q < NQ; ++q) acc[q] = V::add(acc[q], V::load(in + plus[j] * in_stride + c0 + q * w));
    for (int q = 0; q < NQ; ++q) V::store(out + a * len + c0 + q * w, V::fmsub(two, acc[q], s[q]));
  }
}
#endif

// out[a] = sum_b hk[a, b] * in[b] over k blocks of `len` floats (the H_K factor on the outer axis; block b of `in`
// at b * in_stride). H_K is +1/-1, so out[a] = 2 * sum_{b in plus[a]} in[b] - sum_b in[b]: half the additions of
// the matrix product.
void mix_hk(const SpectralLayout& L, const float* in, int64_t in_stride, float* out, int64_t len) {
  constexpr int64_t kChunk = 32;
  for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
    const int64_t w = std::min(kChunk, len - c0);
#ifdef QWHA_AVX512
    if (c0 + 2 * kChunk <= len) {  // 64 floats in 16-wide registers; the loop's step adds the second chunk
      mix_chunk<V16>(L, in, in_stride, out, len, c0);
      c0 += kChunk;
      continue;
    }
#endif
#ifdef QWHA_AVX2
    if (w == kChunk) {
      mix_chunk<V8>(L, in, in_stride, out, len, c0);
      continue;
    }
    if (w % 8 == 0) {  // 8, 16 or 24 floats (e.g. one token of n = 576 = 36 * 16)
      if (w == 8) mix_chunk<V8, 1>(L, in, in_stride, out, len, c0);
      if (w == 16) mix_chunk<V8, 2>(L, in, in_stride, out, len, c0);
      if (w == 24) mix_chunk<V8, 3>(L, in, in_stride, out, len, c0);
      continue;
    }
#endif
    const int32_t* plus = L.hk_plus.data();
    const int32_t* start = L.hk_plus_start.data();
    float sum[kChunk] = {};
    for (int64_t b = 0; b < L.k; ++b)
      for (int64_t e = 0; e < w; ++e) sum[e] += in[b * in_stride + c0 + e];
    for (int64_t a = 0; a < L.k; ++a) {
      float acc[kChunk] = {};
      for (int32_t j = start[a]; j < start[a + 1]; ++j)
        for (int64_t e = 0; e < w; ++e) acc[e] += in[plus[j] * in_stride + c0 + e];
      for (int64_t e = 0; e < w; ++e) out[a * len + c0 + e] = 2.0f * acc[e] - sum[e];
    }
  }
}

// z = WHT(x) for one vector (natural layout); w is scratch of n floats.
void wht_vector(const SpectralLayout& L, const float* x, float* w, float* z) {
  float* t = L.k > 1 ? w : z;
  std::memcpy(t, x, sizeof(float) * L.n);
  for (int64_t b = 0; b < L.k; ++b) fwht(t + b * L.p, L.p, 1);
  if (L.k > 1) mix_hk(L, t, L.p, z, L.p);
}

// Floats of w that wht_tile needs: K blocks of P * tile, each padded by 16 floats when P is a multiple of 8 (so the
// K inputs of the H_K mixing do not sit a power of two apart and evict each other from L1).
int64_t wht_block_stride(const SpectralLayout& L, int64_t tile) {
  return L.p * tile + ((L.k > 1 && L.p % 8 == 0) ? 16 : 0);
}

// zt[i * tile + t] = WHT(x[t, :])[i] for t < tt (zero for tt <= t < tile); w is scratch of k * wht_block_stride
// floats; pad of 8 * n floats (a zero-padded copy of a last group of fewer than 8 tokens, for whole 8 x 8
// transposes), unused when tile is 4 or tt a multiple of 8.
void wht_tile(const SpectralLayout& L, const float* x, int64_t tt, int64_t tile, float* w, float* zt, float* pad) {
  const int64_t n = L.n, p = L.p, bs = L.k > 1 ? wht_block_stride(L, tile) : p * tile;
  float* t = L.k > 1 ? w : zt;
  if (tt < tile) std::memset(t, 0, sizeof(float) * L.k * bs);
  if (tile == 4 && n % 4 == 0) {  // 4 x 4 transposes: columns i0..i0+3 of the 4 tokens are 16 consecutive floats
    for (int64_t i0 = 0; i0 < n; i0 += 4) {  // (in one block: p is a multiple of 4 when bs is padded)
      float* dst = bs == p * tile ? t + i0 * tile : t + (i0 / p) * bs + (i0 % p) * tile;
      transpose4(x + i0, n, dst, tt);
    }
  } else {
    for (int64_t t0 = 0; t0 < tt; t0 += 8) {
      const float* src = x + t0 * n;
      if (tt - t0 < 8 && tile >= t0 + 8) {  // whole transposes from a zero-padded copy of the last tokens
        std::memset(pad, 0, sizeof(float) * 8 * n);
        std::memcpy(pad, src, sizeof(float) * (tt - t0) * n);
        src = pad;
      }
      const int64_t ri = src == pad ? 8 : std::min<int64_t>(8, tt - t0);
      for (int64_t i0 = 0; i0 < n; i0 += 8) {  // rows i0..i0+7 lie in one block when bs is padded (p % 8 == 0)
        float* dst = bs == p * tile ? t + i0 * tile : t + (i0 / p) * bs + (i0 % p) * tile;
        transpose8(src + i0, n, dst + t0, tile, ri, std::min<int64_t>(8, n - i0));
      }
    }
  }
  for (int64_t b = 0; b < L.k; ++b) fwht(t + b * bs, p, tile);
  if (L.k > 1) mix_hk(L, t, bs, zt, p * tile);
}

// ---------------------------------------------------------------------------------------------------------------
// the sparse product

#ifdef QWHA_AVX2
// [z[c[0]], ..., z[c[7]]]: eight scalar loads at the columns of one slot (the columns read as two 64-bit words),
// merged by masked broadcasts (AVX-512VL) or by inserts (AVX2). Measured on AMD Zen 4 over the 120 layouts of
// SmolLM2's g64 export (31 MB), one token: tables cached 1.44 / 1.50 ms against 2.19 ms with vgatherdps and the
// previous layout (uint8 column steps); tables streamed from memory 2.05 / 2.19 against 2.49 ms.
__attribute__((always_inline)) inline __m256 load_columns(const float* z, const uint16_t* c) {
  uint64_t lo, hi;
  std::memcpy(&lo, c, 8);
  std::memcpy(&hi, c + 4, 8);
#ifdef QWHA_AVX512
  __m256 v = _mm256_broadcast_ss(z + (lo & 0xffff));
  for (int l = 1; l < 8; ++l)
    v = _mm256_mask_broadcastss_ps(v, static_cast<__mmask8>(1u << l),
                                   _mm_load_ss(z + (((l < 4 ? lo : hi) >> (16 * (l & 3))) & 0xffff)));
  return v;
#else
  const auto pair = [z](uint64_t w, int shift) {  // [z[w >> shift & 0xffff], z[w >> (shift + 16) & 0xffff], 0, 0]
    return _mm_insert_ps(_mm_load_ss(z + ((w >> shift) & 0xffff)), _mm_load_ss(z + ((w >> (shift + 16)) & 0xffff)),
                         0x10);
  };
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_movelh_ps(pair(lo, 0), pair(lo, 32))),
                              _mm_movelh_ps(pair(hi, 0), pair(hi, 32)), 1);
#endif
}
#endif

// One token: every lane of a block accumulates its row, 8 rows at a time.
void sparse_token(const SpectralLayout& L, const float* z, const float* base, float* y, int64_t b0, int64_t b1) {
  const float* val = L.val.data();
  const uint16_t* col = L.col.data();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s0 = L.block_slot[b], s1 = L.block_slot[b + 1];
    alignas(32) float acc[kLanes];
#ifdef QWHA_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t s = s0;
    for (; s + 4 <= s1; s += 4) {
      const uint16_t* cp = col + s * kLanes;
      const float* vp = val + s * kLanes;
      _mm_prefetch(reinterpret_cast<const char*>(vp + kPrefetch * kLanes), _MM_HINT_T0);  // the tables stream
      _mm_prefetch(reinterpret_cast<const char*>(vp + kPrefetch * kLanes + 16), _MM_HINT_T0);  // from memory
      _mm_prefetch(reinterpret_cast<const char*>(cp + kPrefetch * kLanes), _MM_HINT_T0);
      a0 = _mm256_fmadd_ps(load_columns(z, cp), _mm256_loadu_ps(vp), a0);
      a1 = _mm256_fmadd_ps(load_columns(z, cp + 8), _mm256_loadu_ps(vp + 8), a1);
      a2 = _mm256_fmadd_ps(load_columns(z, cp + 16), _mm256_loadu_ps(vp + 16), a2);
      a3 = _mm256_fmadd_ps(load_columns(z, cp + 24), _mm256_loadu_ps(vp + 24), a3);
    }
    for (; s < s1; ++s) a0 = _mm256_fmadd_ps(load_columns(z, col + s * kLanes), _mm256_loadu_ps(val + s * kLanes), a0);
    _mm256_store_ps(acc, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
    for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
    for (int64_t s = s0; s < s1; ++s)
      for (int l = 0; l < kLanes; ++l) acc[l] += val[s * kLanes + l] * z[col[s * kLanes + l]];
#endif
    for (int l = 0; l < kLanes; ++l) {
      const int32_t r = L.row_of[b * kLanes + l];
      if (r >= 0) y[r] = base[r] + acc[l];
    }
  }
}

// A tile of `tile` = 8 * NV tokens (transposed activations zt [n, tile]): each row r accumulates its entries over
// the tile into acc[r * tile ...] (transposed output, written back by add_transposed).
template <int NV>
void sparse_tile(const SpectralLayout& L, const float* zt, float* acc, int64_t b0, int64_t b1) {
  constexpr int64_t tile = 8 * NV;
  const float* val = L.val.data();
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s0 = L.block_slot[b];
    for (int l = 0; l < kLanes; ++l) {
      const int32_t r = L.row_of[b * kLanes + l];
      if (r < 0) continue;
      const int64_t cnt = L.count[b * kLanes + l];
      const uint16_t* cp = L.col.data() + s0 * kLanes + l;
      const float* vp = val + s0 * kLanes + l;
      float* out = acc + static_cast<int64_t>(r) * tile;
#ifdef QWHA_AVX512
      if constexpr (NV % 2 == 0) {
        __m512 a[NV / 2];
        for (int q = 0; q < NV / 2; ++q) a[q] = _mm512_setzero_ps();
        for (int64_t j = 0; j < cnt; ++j) {
          const float* zc = zt + static_cast<int64_t>(cp[j * kLanes]) * tile;
          const __m512 v = _mm512_set1_ps(vp[j * kLanes]);
          for (int q = 0; q < NV / 2; ++q) a[q] = _mm512_fmadd_ps(v, _mm512_loadu_ps(zc + 16 * q), a[q]);
        }
        for (int q = 0; q < NV / 2; ++q) _mm512_storeu_ps(out + 16 * q, a[q]);
        continue;
      }
#endif
#ifdef QWHA_AVX2
      __m256 a[NV];
      for (int q = 0; q < NV; ++q) a[q] = _mm256_setzero_ps();
      for (int64_t j = 0; j < cnt; ++j) {
        const float* zc = zt + static_cast<int64_t>(cp[j * kLanes]) * tile;
        const __m256 v = _mm256_set1_ps(vp[j * kLanes]);
        for (int q = 0; q < NV; ++q) a[q] = _mm256_fmadd_ps(v, _mm256_loadu_ps(zc + 8 * q), a[q]);
      }
      for (int q = 0; q < NV; ++q) _mm256_storeu_ps(out + 8 * q, a[q]);
#else
      float a[tile] = {};
      for (int64_t j = 0; j < cnt; ++j) {
        const float* zc = zt + static_cast<int64_t>(cp[j * kLanes]) * tile;
        const float v = vp[j * kLanes];
        for (int64_t t = 0; t < tile; ++t) a[t] += v * zc[t];
      }
      std::memcpy(out, a, sizeof(a));
#endif
    }
  }
}

// A few tokens (2..16, e.g. a batched decode step), tile = 1 << kShift = 4, 8 or 16 tokens (transposed activations
// zt [n, tile]): slot by slot, all 8 lanes of a block at once, each lane's row holding its tile of sums in a
// register. Each slot's columns and values are read once for all tokens of the tile, and the 8 lanes are 8
// independent FMA chains (sparse_tile's one chain per row, for tiles of 8 or 16, was bound by the FMA latency: 2
// to 8 rows cost ~2-3x one). The lanes' columns are scalar loads (a vector of columns read back by vpextrd was
// slower on AMD Zen 4). acc[r * tile + t] as in sparse_tile.
#ifdef QWHA_AVX2
// floats [off, off + V::kWidth) of each token tile, for the rows of one block (slots s0..s1)
template <class V, int kShift>
__attribute__((always_inline)) inline void few_block(const float* zt, const uint16_t* col, const float* val,
                                                     int64_t s0, int64_t s1, float* const* out, int off) {
  typename V::T a[kLanes];
  for (int l = 0; l < kLanes; ++l) a[l] = V::zero();
  const float* z = zt + off;
  for (int64_t s = s0; s < s1; ++s) {
    const uint16_t* cp = col + s * kLanes;
    const float* vp = val + s * kLanes;
    _mm_prefetch(reinterpret_cast<const char*>(vp + kPrefetch * kLanes), _MM_HINT_T0);  // tables from memory
    _mm_prefetch(reinterpret_cast<const char*>(cp + kPrefetch * kLanes), _MM_HINT_T0);
    for (int l = 0; l < kLanes; ++l)
      a[l] = V::fmadd(V::set1(vp[l]), V::load(z + (static_cast<int64_t>(cp[l]) << kShift)), a[l]);
  }
  for (int l = 0; l < kLanes; ++l) V::store(out[l] + off, a[l]);
}
#endif

template <int kShift>
void sparse_few(const SpectralLayout& L, const float* zt, float* acc, int64_t b0, int64_t b1) {
  constexpr int64_t tile = int64_t{1} << kShift;
  alignas(64) float sink[tile];  // the sums of padding lanes
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s0 = L.block_slot[b], s1 = L.block_slot[b + 1];
    float* out[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const int32_t r = L.row_of[b * kLanes + l];
      out[l] = r >= 0 ? acc + static_cast<int64_t>(r) * tile : sink;
    }
#ifdef QWHA_AVX2
    if constexpr (kShift == 2) {
      few_block<V4, kShift>(zt, L.col.data(), L.val.data(), s0, s1, out, 0);
    } else if constexpr (kShift == 3) {
      few_block<V8, kShift>(zt, L.col.data(), L.val.data(), s0, s1, out, 0);
    } else {  // one pass per 16 (AVX-512) or 8 tokens: the block's tables stay in L1 after the first
#ifdef QWHA_AVX512
      for (int off = 0; off < tile; off += 16)
        few_block<V16, kShift>(zt, L.col.data(), L.val.data(), s0, s1, out, off);
#else
      for (int off = 0; off < tile; off += 8)
        few_block<V8, kShift>(zt, L.col.data(), L.val.data(), s0, s1, out, off);
#endif
    }
#else
    float a[kLanes][tile] = {};
    for (int64_t s = s0; s < s1; ++s) {
      const uint16_t* cp = L.col.data() + s * kLanes;
      const float* vp = L.val.data() + s * kLanes;
      for (int l = 0; l < kLanes; ++l) {
        const float* zc = zt + static_cast<int64_t>(cp[l]) * tile;
        const float v = vp[l];
        for (int64_t t = 0; t < tile; ++t) a[l][t] += v * zc[t];
      }
    }
    for (int l = 0; l < kLanes; ++l) std::memcpy(out[l], a[l], sizeof(a[l]));
#endif
  }
}

// y[t, r] = base[t, r] + acc[r * tile + t] for t < tt and r0 <= r < r1: 8 tokens x 16 rows at a time (two 8 x 8
// transposes), so each visit of a row of y and base covers a whole cache line. The transposes always read 8
// floats of each row (for tile 4, the next row's too: acc holds kSlack floats past its last row).
void add_transposed(const float* acc, int64_t tile, const float* base, float* y, int64_t tt, int64_t d_out, int64_t r0,
                    int64_t r1) {
  alignas(64) float blk[8 * 16];
  for (int64_t t0 = 0; t0 < tt; t0 += 8) {
    const int64_t te = std::min<int64_t>(8, tt - t0);
    for (int64_t rb = r0; rb < r1; rb += 16) {
      const int64_t re = std::min<int64_t>(16, r1 - rb);
      transpose8(acc + rb * tile + t0, tile, blk, 16, std::min<int64_t>(8, re), 8);  // blk[t * 16 + r]
      if (re > 8) transpose8(acc + (rb + 8) * tile + t0, tile, blk + 8, 16, re - 8, 8);
      for (int64_t t = 0; t < te; ++t) {
        const float* bp = base + (t0 + t) * d_out + rb;
        float* yp = y + (t0 + t) * d_out + rb;
        const float* ap = blk + t * 16;
#ifdef QWHA_AVX2
        if (re == 16) {
          _mm256_storeu_ps(yp, _mm256_add_ps(_mm256_loadu_ps(bp), _mm256_load_ps(ap)));
          _mm256_storeu_ps(yp + 8, _mm256_add_ps(_mm256_loadu_ps(bp + 8), _mm256_load_ps(ap + 8)));
          continue;
        }
#endif
        for (int64_t r = 0; r < re; ++r) yp[r] = bp[r] + ap[r];
      }
    }
  }
}

// tile 4, 8 or 16 (kFewTokens or fewer tokens): sparse_few; 8 * NV: sparse_tile
void sparse_tile_any(int64_t tile, const SpectralLayout& L, const float* zt, float* acc, int64_t b0, int64_t b1) {
  if (tile == 4) return sparse_few<2>(L, zt, acc, b0, b1);
  if (tile == 8) return sparse_few<3>(L, zt, acc, b0, b1);
  if (tile == 16) return sparse_few<4>(L, zt, acc, b0, b1);
  switch (tile / 8) {
    case 3: return sparse_tile<3>(L, zt, acc, b0, b1);
    case 4: return sparse_tile<4>(L, zt, acc, b0, b1);
    case 5: return sparse_tile<5>(L, zt, acc, b0, b1);
    case 6: return sparse_tile<6>(L, zt, acc, b0, b1);
    case 7: return sparse_tile<7>(L, zt, acc, b0, b1);
    default: return sparse_tile<8>(L, zt, acc, b0, b1);
  }
}

// `count` floats of `buf` from a 64-byte boundary (a tile's row of zt or acc then never straddles two cache lines)
float* aligned_floats(std::vector<float>& buf, int64_t count) {
  buf.resize(static_cast<size_t>(count + 16));
  const uintptr_t a = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((64 - a % 64) % 64) / sizeof(float);
}

void run(const SpectralLayout& L, const float* x, const float* base, float* y, int64_t rows,
         const qwha::ParallelFor& par) {
  const int64_t n = L.n, d_out = L.d_out, nb = L.n_blocks;
  const int64_t chunks = (nb + kBlockChunk - 1) / kBlockChunk;
  if (rows == 1) {
    thread_local std::vector<float> w, z;
    w.resize(n);
    z.resize(n);
    wht_vector(L, x, w.data(), z.data());
    const float* zp = z.data();
    par(static_cast<size_t>(chunks), [&](size_t c) {
      const int64_t b0 = static_cast<int64_t>(c) * kBlockChunk;
      sparse_token(L, zp, base, y, b0, std::min(nb, b0 + kBlockChunk));
    });
    return;
  }
  const int64_t tile = rows >= kTile            ? kTile
                       : rows >= 64            ? 64
                       : rows <= 4             ? 4
                       : rows <= 8             ? 8
                       : rows <= kFewTokens    ? 16
                                               : (rows + 7) / 8 * 8;
  const int64_t tiles = (rows + tile - 1) / tile;
  if (tiles >= 2) {  // prompts: one task per tile, whose transform, product and write-back stay in one core's L2
    par(static_cast<size_t>(tiles), [&](size_t i) {
      thread_local std::vector<float> w, zt, acc, pad;
      w.resize(static_cast<size_t>(L.k * wht_block_stride(L, tile)));
      float* ztp = aligned_floats(zt, n * tile);
      float* accp = aligned_floats(acc, d_out * tile + kSlack);
      pad.resize(static_cast<size_t>(8 * n));
      const int64_t t0 = static_cast<int64_t>(i) * tile, tt = std::min(tile, rows - t0);
      wht_tile(L, x + t0 * n, tt, tile, w.data(), ztp, pad.data());
      sparse_tile_any(tile, L, ztp, accp, 0, nb);
      add_transposed(accp, tile, base + t0 * d_out, y + t0 * d_out, tt, d_out, 0, d_out);
    });
    return;
  }
  // one tile (2..64 tokens, e.g. a batched decode step): the transform once, then row blocks in parallel
  thread_local std::vector<float> w, zt_buf, acc_buf, pad;
  w.resize(static_cast<size_t>(L.k * wht_block_stride(L, tile)));
  pad.resize(static_cast<size_t>(8 * n));
  float* zt = aligned_floats(zt_buf, n * tile);
  float* acc = aligned_floats(acc_buf, d_out * tile + kSlack);
  wht_tile(L, x, rows, tile, w.data(), zt, pad.data());
  par(static_cast<size_t>(chunks), [&](size_t c) {
    const int64_t b0 = static_cast<int64_t>(c) * kBlockChunk;
    sparse_tile_any(tile, L, zt, acc, b0, std::min(nb, b0 + kBlockChunk));
  });
  const int64_t row_chunk = kBlockChunk * kLanes, row_chunks = (d_out + row_chunk - 1) / row_chunk;
  par(static_cast<size_t>(row_chunks), [&](size_t c) {
    const int64_t r0 = static_cast<int64_t>(c) * row_chunk;
    add_transposed(acc, tile, base, y, rows, d_out, r0, std::min(d_out, r0 + row_chunk));
  });
}

}  // namespace

void spectral_add(const SpectralLayout& L, const float* x, const float* base, float* y, int64_t rows,
                  const qwha::ParallelFor& par) {
  if (rows <= 0) return;
  if (L.n_blocks == 0) {  // no entries: Y = Base (y may be base itself: onnxruntime may run the op in place)
    if (y != base) std::memmove(y, base, sizeof(float) * rows * L.d_out);
    return;
  }
  run(L, x, base, y, rows, par);
}

}  // namespace QWHA_NS
