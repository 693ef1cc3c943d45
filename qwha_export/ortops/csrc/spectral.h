// Spectral adapter kernels of the qwha onnxruntime ops: Y = Base + WHT_n(X) . F~^T (float32).
//
// WHT_n(x) = x . M_n^T with M_n = H_K (x) H_P (P = 2^m, Sylvester natural order, K the outer index): x is viewed
// as [K, P], every row gets the unnormalised fast transform of size P, then the rows are mixed by H_K (+1/-1).
//
// F~ (d_out x n, sparse) is held in a row-blocked layout rebuilt once per session from the model's tables: rows
// sorted by their number of entries (most first) and grouped in blocks of 8 lanes; slot s of a block holds one
// entry of each of its 8 rows, lanes interleaved: col[s*8 + lane] (uint16) is the entry's column, val[s*8 + lane]
// its value. A row with fewer entries than the block's longest is padded with (column 0, value 0). 6 bytes per
// entry; n <= 65536 (kMaxN). Absolute columns let the one-token product read WHT(x)[col] with scalar loads, which
// beat vgatherdps on AMD Zen 4 (see load_columns), and need no bridging slots for long gaps.
//
// The same source is compiled three times: a baseline (portable C++), an x86-64-v3 variant (AVX2 + FMA intrinsics)
// and an x86-64-v4 variant (AVX-512 for the multi-token products and the one-token loads), in namespaces
// qwha_baseline, qwha_v3 and qwha_v4; qwha_ops.cc picks one at run time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace qwha {

constexpr int kLanes = 8;
constexpr int64_t kMaxN = 65536;  // columns fit uint16

struct SpectralLayout {
  int64_t n = 0, k = 1, p = 1, d_out = 0;
  std::vector<float> hk;             // k * k, row-major, +1/-1
  std::vector<int32_t> hk_plus;      // for each row a of H_K, the columns b with H_K[a, b] = +1 ...
  std::vector<int32_t> hk_plus_start;  // ... at hk_plus[hk_plus_start[a] .. hk_plus_start[a + 1])
  int64_t n_blocks = 0;
  std::vector<int32_t> row_of;       // n_blocks * 8: output row of each lane (-1: padding lane)
  std::vector<int32_t> count;        // n_blocks * 8: entries of each lane's row
  std::vector<int64_t> block_slot;   // n_blocks + 1: first slot of each block
  std::vector<uint16_t> col;         // slots * 8 columns
  std::vector<float> val;            // slots * 8 values
  int64_t nnz = 0;                   // entries of F~ (padding slots excluded)

  int64_t slots() const { return block_slot.empty() ? 0 : block_slot.back(); }
  // bytes of the tables read per call (indices + values + per-lane metadata)
  size_t table_bytes() const {
    return val.size() * sizeof(float) + col.size() * sizeof(uint16_t) + row_of.size() * 4 + count.size() * 4 +
           block_slot.size() * 8;
  }
};

struct Entry {  // F~[row, col] += val
  int32_t row, col;
  float val;
};

// The layout of F~ (d_out x n) from its entries (sorted in place); hk: H_K, k * k floats. Counted while alive.
// n <= kMaxN (the kernel checks it with the other attributes).
std::shared_ptr<const SpectralLayout> build_layout(int64_t n, int64_t k, int64_t d_out, const float* hk,
                                                   std::vector<Entry>& entries);
int64_t live_layouts();
int64_t live_layout_bytes();

// Runs fn(i) for i in [0, total), possibly on several threads (onnxruntime's intra-op pool).
using ParallelFor = std::function<void(size_t total, const std::function<void(size_t)>& fn)>;

}  // namespace qwha

#define QWHA_DECLARE_KERNELS(ns)                                                                             \
  namespace ns {                                                                                              \
  /* y[t, :] = base[t, :] + WHT(x[t, :]) . F~^T for t < rows; x [rows, n], base/y [rows, d_out] */           \
  void spectral_add(const qwha::SpectralLayout& L, const float* x, const float* base, float* y, int64_t rows, \
                    const qwha::ParallelFor& par);                                                           \
  }

// The build defines QWHA_HAVE_V3 / QWHA_HAVE_V4 for the variants it compiled (x86-64 only).
QWHA_DECLARE_KERNELS(qwha_baseline)
#ifdef QWHA_HAVE_V3
QWHA_DECLARE_KERNELS(qwha_v3)
#endif
#ifdef QWHA_HAVE_V4
QWHA_DECLARE_KERNELS(qwha_v4)
#endif
