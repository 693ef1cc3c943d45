// The row-blocked layout of spectral.h, built once from the entries of F~ (ISA-independent).
#include <algorithm>
#include <atomic>

#include "spectral.h"

namespace qwha {
namespace {
std::atomic<int64_t> g_layouts{0};
std::atomic<int64_t> g_layout_bytes{0};
}  // namespace

int64_t live_layouts() { return g_layouts.load(); }
int64_t live_layout_bytes() { return g_layout_bytes.load(); }

std::shared_ptr<const SpectralLayout> build_layout(int64_t n, int64_t k, int64_t d_out, const float* hk,
                                                   std::vector<Entry>& entries) {
  auto* L = new SpectralLayout();
  L->n = n;
  L->k = k;
  L->p = n / k;
  L->d_out = d_out;
  L->hk.assign(hk, hk + k * k);
  L->hk_plus_start.push_back(0);
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < k; ++b)
      if (hk[a * k + b] > 0) L->hk_plus.push_back(static_cast<int32_t>(b));
    L->hk_plus_start.push_back(static_cast<int32_t>(L->hk_plus.size()));
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.row != b.row ? a.row < b.row : a.col < b.col; });
  std::vector<int64_t> start(d_out + 1, 0);
  for (const Entry& e : entries) start[e.row + 1]++;
  for (int64_t r = 0; r < d_out; ++r) start[r + 1] += start[r];
  std::vector<int32_t> order(d_out);  // rows by number of entries, most first (little padding within a block)
  for (int64_t r = 0; r < d_out; ++r) order[r] = static_cast<int32_t>(r);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return start[a + 1] - start[a] > start[b + 1] - start[b]; });
  L->n_blocks = (d_out + kLanes - 1) / kLanes;
  L->row_of.assign(L->n_blocks * kLanes, -1);
  L->count.assign(L->n_blocks * kLanes, 0);
  L->block_slot.assign(L->n_blocks + 1, 0);
  for (int64_t b = 0; b < L->n_blocks; ++b) {
    int64_t longest = 0;
    for (int l = 0; l < kLanes && b * kLanes + l < d_out; ++l) {
      const int64_t i = b * kLanes + l;
      const int32_t r = order[i];
      L->row_of[i] = r;
      L->count[i] = static_cast<int32_t>(start[r + 1] - start[r]);
      longest = std::max<int64_t>(longest, L->count[i]);
    }
    L->block_slot[b + 1] = L->block_slot[b] + longest;
  }
  const int64_t slots = L->block_slot.back();
  L->col.assign(slots * kLanes, 0);
  L->val.assign(slots * kLanes, 0.0f);
  for (int64_t b = 0; b < L->n_blocks; ++b) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t i = b * kLanes + l;
      const int32_t r = L->row_of[i];
      if (r < 0) continue;
      for (int64_t e = start[r], j = 0; e < start[r + 1]; ++e, ++j) {
        const int64_t s = (L->block_slot[b] + j) * kLanes + l;
        L->col[s] = static_cast<uint16_t>(entries[e].col);
        L->val[s] = entries[e].val;
      }
    }
  }
  L->nnz = static_cast<int64_t>(entries.size());
  const int64_t bytes = static_cast<int64_t>(L->table_bytes());
  g_layouts++;
  g_layout_bytes += bytes;
  return std::shared_ptr<const SpectralLayout>(L, [bytes](const SpectralLayout* p) {
    g_layouts--;
    g_layout_bytes -= bytes;
    delete p;
  });
}

}  // namespace qwha
