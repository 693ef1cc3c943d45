// Native onnxruntime kernels of the qwha domain (custom-op library, loaded with
// SessionOptions.register_custom_ops_library or genai_config.json's custom_ops_library).
//
//   qwha::SpectralAdd(X, Base, HK, values, flat, cols, pieces) -> Y = Base + WHT_n(X) . F~^T
//   qwha::SpectralAddDense(X, Base, HK, FT)                    -> Y = Base + WHT_n(X) . FT
//
// X float32 [..., n], Base/Y float32 [..., d_out] (same leading dims), HK float32 [K, K] (+1/-1, n = K * 2^m),
// attributes n and K. SpectralAdd reads F~ from the exporter's ELL tables: values float32 [S] and flat int32 [S],
// flat = col * d_out + row of each slot (padding slots have value 0); cols/pieces are read by the ONNX function
// body only. SpectralAddDense reads FT float32 [n, d_out] (F~ transposed). The models carry ONNX function bodies
// of the same ops; onnxruntime uses these kernels instead when the library is registered.
//
// The library needs no link against libonnxruntime: ORT_API_MANUAL_INIT, and RegisterCustomOps takes the API of
// the running onnxruntime (an older runtime without this API version gets an error status, and the caller falls
// back to the function bodies). The row-blocked layout (spectral.h) is built once per table at kernel creation
// when the tables are initializers (else at the first call), and shared by the kernels of both If branches.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "spectral.h"

#ifndef QWHA_SOURCE_HASH
#define QWHA_SOURCE_HASH "unknown"
#endif

#define QWHA_EXPORT extern "C" __attribute__((visibility("default")))

#define QWHA_STR2(x) #x
#define QWHA_STR(x) QWHA_STR2(x)
// found in the file by qwha_export.ortops without loading it (stale / corrupt cache, C API version)
__attribute__((used)) static const char kSourceTag[] =
    "QWHA_ORTOPS_SOURCE=" QWHA_SOURCE_HASH ";API=" QWHA_STR(ORT_API_VERSION) ";";

namespace {

using qwha::Entry;
using qwha::SpectralLayout;
using qwha::build_layout;

std::atomic<int64_t> g_kernels{0}, g_baseline_kernels{0};

// ---------------------------------------------------------------------------------------------------------------
// instruction set

using SpectralFn = void (*)(const SpectralLayout&, const float*, const float*, float*, int64_t,
                            const qwha::ParallelFor&);

bool cpu_has(int level) {  // 3: x86-64-v3 (AVX2, FMA, ...), 4: x86-64-v4 (AVX-512 F/BW/DQ/VL)
#if defined(QWHA_HAVE_V3)
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  if (level == 3) return v3;
#if defined(QWHA_HAVE_V4)
  return v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
#endif
  (void)level;
  return false;
}

// QWHA_ORT_OPS_ISA=baseline|x86-64-v3 caps the variant (read at each kernel creation); otherwise the best the CPU
// runs: x86-64-v4, x86-64-v3 or baseline.
const char* chosen_isa() {
  static const bool v3 = cpu_has(3), v4 = cpu_has(4);
  const char* env = std::getenv("QWHA_ORT_OPS_ISA");
  if (env && std::strcmp(env, "baseline") == 0) return "baseline";
  if (v4 && !(env && std::strcmp(env, "x86-64-v3") == 0)) return "x86-64-v4";
  return v3 ? "x86-64-v3" : "baseline";
}

SpectralFn spectral_fn() {
#if defined(QWHA_HAVE_V3)
  const char* isa = chosen_isa();
#if defined(QWHA_HAVE_V4)
  if (std::strcmp(isa, "x86-64-v4") == 0) return &qwha_v4::spectral_add;
#endif
  if (std::strcmp(isa, "x86-64-v3") == 0) return &qwha_v3::spectral_add;
#endif
  return &qwha_baseline::spectral_add;
}

// Layouts shared by kernels reading the same tables (the If branches of one session): keyed by the tables' data
// pointers, sizes and a sample of their contents.
struct Key {
  const void* a;
  const void* b;
  int64_t size, n, k, d_out;
  uint64_t sample;
  bool operator<(const Key& o) const {
    return std::tie(a, b, size, n, k, d_out, sample) < std::tie(o.a, o.b, o.size, o.n, o.k, o.d_out, o.sample);
  }
};

uint64_t sample_hash(const void* data, size_t bytes) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = 1469598103934665603ull ^ bytes;
  const size_t step = bytes > 4096 ? bytes / 4096 : 1;
  for (size_t i = 0; i < bytes; i += step) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

std::mutex g_mu;
std::map<Key, std::weak_ptr<const SpectralLayout>> g_cache;

template <class Build>
std::shared_ptr<const SpectralLayout> cached_layout(const Key& key, Build build) {
  std::lock_guard<std::mutex> lock(g_mu);
  for (auto it = g_cache.begin(); it != g_cache.end();) it = it->second.expired() ? g_cache.erase(it) : std::next(it);
  auto found = g_cache.find(key);
  if (found != g_cache.end()) {
    if (auto sp = found->second.lock()) return sp;
  }
  std::shared_ptr<const SpectralLayout> sp = build();
  g_cache[key] = sp;
  return sp;
}

[[noreturn]] void fail(const std::string& msg) { throw Ort::Exception(std::string("qwha ops: ") + msg, ORT_FAIL); }

int64_t last_dim(const std::vector<int64_t>& shape) { return shape.empty() ? 1 : shape.back(); }

int64_t elements(const std::vector<int64_t>& shape) {
  int64_t c = 1;
  for (int64_t d : shape) c *= d;
  return c;
}

// ---------------------------------------------------------------------------------------------------------------
// kernels

// Errors become an OrtStatus: no C++ exception leaves the library (its libstdc++ is linked statically).
OrtStatus* to_status(const OrtApi& api, const std::exception& e) { return api.CreateStatus(ORT_FAIL, e.what()); }

struct Tables {  // the inputs a layout is built from (constant initializers, or this call's inputs)
  Ort::ConstValue hk, a, b;
};

class SpectralKernel {
 public:
  SpectralKernel(const OrtKernelInfo* info, bool dense) : dense_(dense), fn_(spectral_fn()) {
    Ort::ConstKernelInfo ki(info);
    n_ = ki.GetAttribute<int64_t>("n");
    k_ = ki.GetAttribute<int64_t>("K");
    const int64_t p = k_ > 0 ? n_ / k_ : 0;
    if (n_ < 1 || k_ < 1 || n_ % k_ != 0 || (p & (p - 1)) != 0)
      fail("attributes n=" + std::to_string(n_) + ", K=" + std::to_string(k_) + " are not n = K * 2^m");
    if (n_ > qwha::kMaxN)
      fail("transform size n=" + std::to_string(n_) + " is over " + std::to_string(qwha::kMaxN) +
           ", the largest the native layout holds (16-bit columns); run with QWHA_ORT_OPS=0");
    if (!dense_) {  // rows_shape = [d_out, depth]: d_out before any call (rows without entries included)
      std::vector<int64_t> rs = ki.GetAttributes<int64_t>("rows_shape");
      if (rs.size() != 2 || rs[0] < 1) fail("attribute rows_shape must be [d_out, depth]");
      d_out_attr_ = rs[0];
    }
    g_kernels++;
    if (fn_ == &qwha_baseline::spectral_add) g_baseline_kernels++;
    int c_hk = 0, c_a = 0, c_b = 0;
    Tables t{ki.GetTensorConstantInput(2, &c_hk), ki.GetTensorConstantInput(3, &c_a),
             dense_ ? Ort::ConstValue{nullptr} : ki.GetTensorConstantInput(4, &c_b)};
    constant_ = c_hk && c_a && (dense_ || c_b);
    if (constant_) layout_ = layout(t, -1);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const std::exception& e) {
      return to_status(Ort::GetApi(), e);
    }
  }

 private:
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ort::ConstValue x = ctx.GetInput(0), base = ctx.GetInput(1);
    const std::vector<int64_t> xs = x.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> bs = base.GetTensorTypeAndShapeInfo().GetShape();
    if (last_dim(xs) != n_) fail("X has last dimension " + std::to_string(last_dim(xs)) + ", n=" + std::to_string(n_));
    const int64_t rows = elements(xs) / n_, d_out = last_dim(bs);
    if (elements(bs) != rows * d_out) fail("X and Base have different leading dimensions");
    std::shared_ptr<const SpectralLayout> L = layout_;
    if (!L) L = layout(Tables{ctx.GetInput(2), ctx.GetInput(3), dense_ ? Ort::ConstValue{nullptr} : ctx.GetInput(4)}, d_out);
    if (L->d_out != d_out)
      fail("Base has " + std::to_string(d_out) + " outputs, the tables " + std::to_string(L->d_out));
    Ort::UnownedValue y = ctx.GetOutput(0, bs);
    const float* xp = x.GetTensorData<float>();
    const float* bp = base.GetTensorData<float>();
    float* yp = y.GetTensorMutableData<float>();
    qwha::ParallelFor par = [&ctx](size_t total, const std::function<void(size_t)>& fn) {
      if (total == 0) return;
      if (total == 1) return fn(0);
      struct Job {
        const std::function<void(size_t)>* fn;
        std::atomic<bool> failed{false};
      } job{&fn};
      ctx.ParallelFor(
          [](void* data, size_t i) {  // runs on onnxruntime's threads: nothing may throw out of it
            auto* j = static_cast<Job*>(data);
            try {
              (*j->fn)(i);
            } catch (...) {
              j->failed = true;
            }
          },
          total, 0, &job);
      if (job.failed) fail("out of memory in a parallel task");
    };
    fn_(*L, xp, bp, yp, rows, par);
  }

  // d_out: -1 at kernel creation (then FT's columns, or SpectralAdd's rows_shape attribute), else Base's last dim
  std::shared_ptr<const SpectralLayout> layout(const Tables& t, int64_t d_out) {
    const std::vector<int64_t> hs = t.hk.GetTensorTypeAndShapeInfo().GetShape();
    if (hs.size() != 2 || hs[0] != k_ || hs[1] != k_) fail("HK must have shape [K, K] with K=" + std::to_string(k_));
    const float* hk = t.hk.GetTensorData<float>();
    for (int64_t i = 0; i < k_ * k_; ++i)
      if (hk[i] != 1.0f && hk[i] != -1.0f) fail("HK must hold +1/-1 entries (a Hadamard matrix)");
    const std::vector<int64_t> as = t.a.GetTensorTypeAndShapeInfo().GetShape();
    if (dense_) {
      if (as.size() != 2 || as[0] != n_) fail("FT must have shape [n, d_out] with n=" + std::to_string(n_));
      const int64_t dd = as[1];
      const float* ft = t.a.GetTensorData<float>();
      Key key{ft, hk, elements(as), n_, k_, dd, sample_hash(ft, sizeof(float) * elements(as))};
      return cached_layout(key, [&] {
        std::vector<Entry> e;
        for (int64_t c = 0; c < n_; ++c)
          for (int64_t r = 0; r < dd; ++r)
            if (ft[c * dd + r] != 0.0f) e.push_back({static_cast<int32_t>(r), static_cast<int32_t>(c), ft[c * dd + r]});
        return build_layout(n_, k_, dd, hk, e);
      });
    }
    if (d_out < 0) d_out = d_out_attr_;
    const int64_t size = elements(as);
    if (elements(t.b.GetTensorTypeAndShapeInfo().GetShape()) != size) fail("values and flat differ in size");
    const float* val = t.a.GetTensorData<float>();
    const int32_t* flat = t.b.GetTensorData<int32_t>();
    if (d_out < 1) fail("cannot tell d_out (no rows_shape attribute and no Base)");
    Key key{val, flat, size, n_, k_, d_out, sample_hash(val, sizeof(float) * size) ^ sample_hash(flat, 4 * size)};
    return cached_layout(key, [&] {
      std::vector<Entry> e;
      e.reserve(size);
      const int64_t limit = n_ * d_out;
      for (int64_t s = 0; s < size; ++s) {
        if (val[s] == 0.0f) continue;  // padding (and exact zeros, which add nothing)
        if (flat[s] < 0 || flat[s] >= limit) fail("flat index out of range for n x d_out");
        e.push_back({static_cast<int32_t>(flat[s] % d_out), static_cast<int32_t>(flat[s] / d_out), val[s]});
      }
      return build_layout(n_, k_, d_out, hk, e);
    });
  }

  bool dense_;
  SpectralFn fn_;
  int64_t n_ = 0, k_ = 1, d_out_attr_ = -1;
  bool constant_ = false;
  std::shared_ptr<const SpectralLayout> layout_;
};

template <bool Dense>
struct SpectralOp : Ort::CustomOpBase<SpectralOp<Dense>, SpectralKernel, true> {
  SpectralOp() {  // Y may reuse Base's buffer (one read and one write of it instead of a read and a new output)
    OrtCustomOp::GetMayInplace = [](int** input_index, int** output_index) -> size_t {
      *input_index = new int[1]{1};
      *output_index = new int[1]{0};
      return 1;
    };
    OrtCustomOp::ReleaseMayInplace = [](int* input_index, int* output_index) {
      delete[] input_index;
      delete[] output_index;
    };
  }
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new SpectralKernel(info, Dense);
      return nullptr;
    } catch (const std::exception& e) {
      return to_status(api, e);
    }
  }
  const char* GetName() const { return Dense ? "SpectralAddDense" : "SpectralAdd"; }
  size_t GetInputTypeCount() const { return Dense ? 4 : 7; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i <= 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (i == 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// entry points

QWHA_EXPORT int64_t QwhaOpsKernelCount() { return g_kernels.load(); }
QWHA_EXPORT int64_t QwhaOpsBaselineKernelCount() { return g_baseline_kernels.load(); }
QWHA_EXPORT int64_t QwhaOpsLayoutCount() { return qwha::live_layouts(); }
QWHA_EXPORT int64_t QwhaOpsLayoutBytes() { return qwha::live_layout_bytes(); }
QWHA_EXPORT const char* QwhaOpsIsa() { return chosen_isa(); }
QWHA_EXPORT const char* QwhaOpsSourceHash() { return kSourceTag; }
QWHA_EXPORT int QwhaOpsApiVersion() { return ORT_API_VERSION; }

QWHA_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // an onnxruntime older than the headers this library was built with
    const OrtApi* v1 = api_base->GetApi(1);
    std::string msg = std::string("qwha ops: this onnxruntime (") + api_base->GetVersionString() +
                      ") does not provide C API version " + std::to_string(ORT_API_VERSION) +
                      " that the library was built for";
    return v1 ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  static SpectralOp<false> sparse_op;
  static SpectralOp<true> dense_op;
  static Ort::CustomOpDomain* domain = [] {
    auto* d = new Ort::CustomOpDomain("qwha");
    d->Add(&sparse_op);
    d->Add(&dense_op);
    return d;
  }();
  try {
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
