// CUDA benches: every effattn CUDA operator this build has, in float, half and bf16, against
// the materialized "standard self-attention" on cuBLAS (the papers' reference column).
// Same flags, names and counters as attention_cpu_bench (see harness.hpp); run with --help.
//
// Memory per sequence = bytes of q, k, v, out of one sequence + the method's parameters + the
// high-water mark of the device's default stream-ordered memory pool (cudaMemPoolAttrUsedMemHigh)
// during a call on that one sequence without a caller workspace. The library allocates its
// scratch there (cudaMallocAsync); the baseline allocates its H·N² scores there too.
// Times are CUDA-event times of the whole batch (manual time).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <memory>
#include <vector>

#include "harness.hpp"

#if __has_include(<effattn/cuda.cuh>)
#include <effattn/cuda.cuh>
#define EFFATTN_BENCH_HAVE_CUDA_API 1
#else
#define EFFATTN_BENCH_HAVE_CUDA_API 0
#endif
#if __has_include(<effattn/favor_projection.hpp>)
#include <effattn/favor_projection.hpp>
#endif
#include <effattn/core.hpp>

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) throw std::runtime_error(std::string(what) + ": cuBLAS status " + std::to_string(s));
}

template <class T>
struct TypeInfo;
template <>
struct TypeInfo<float> {
  static constexpr cudaDataType_t cublas = CUDA_R_32F;
};
template <>
struct TypeInfo<__half> {
  static constexpr cudaDataType_t cublas = CUDA_R_16F;
};
template <>
struct TypeInfo<__nv_bfloat16> {
  static constexpr cudaDataType_t cublas = CUDA_R_16BF;
};

/// Device memory from cudaMalloc (outside the pool, so that the pool's high-water mark is the
/// operator's scratch alone).
template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t n) {
    if (n) check(cudaMalloc(&ptr, n * sizeof(T)), "cudaMalloc");
  }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

template <class T>
std::shared_ptr<DeviceBuffer<T>> random_device(size_t n, uint64_t seed) {
  std::vector<T> host(n);
  bench::fill_normal(n, seed, [&](size_t i, float x) { host[i] = static_cast<T>(x); });
  auto d = std::make_shared<DeviceBuffer<T>>(n);
  check(cudaMemcpy(d->ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
  return d;
}

template <class T>
using View = effattn::Tensor<T>;

/// A method bound to its parameters, as in the CPU bench.
template <class T>
struct Runner {
  std::function<void(View<const T>, View<const T>, View<const T>, View<T>, cudaStream_t, void*, size_t)> run;
  std::function<size_t(View<const T>, View<const T>, View<const T>)> workspace;
  size_t parameter_bytes = 0;
  std::shared_ptr<void> storage;
};

// ---- The reference column: standard self-attention on cuBLAS, N×N scores in memory ----

/// Row softmax in place over rows of length n (one block per row; float arithmetic).
template <class T>
__global__ void softmax_rows(T* s, int64_t n) {
  T* row = s + blockIdx.x * n;
  __shared__ float shared[32];
  const auto reduce = [&](float x, bool is_max) {
    for (int o = 16; o > 0; o /= 2) {
      const float y = __shfl_xor_sync(0xffffffffu, x, o);
      x = is_max ? fmaxf(x, y) : x + y;
    }
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = x;
    __syncthreads();
    x = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : (is_max ? -INFINITY : 0.f);
    for (int o = 16; o > 0; o /= 2) {
      const float y = __shfl_xor_sync(0xffffffffu, x, o);
      x = is_max ? fmaxf(x, y) : x + y;
    }
    __syncthreads();
    return x;
  };
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, static_cast<float>(row[j]));
  m = reduce(m, true);
  float sum = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) sum += __expf(static_cast<float>(row[j]) - m);
  const float inv = 1.f / reduce(sum, false);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) row[j] = static_cast<T>(__expf(static_cast<float>(row[j]) - m) * inv);
}

template <class T>
size_t standard_scores_bytes(View<const T> q, View<const T> k) {
  return static_cast<size_t>(q.shape[1] * q.shape[2] * k.shape[2]) * sizeof(T);
}

/// Per sequence: S = s·Q·Kᵀ for all heads (strided-batched GEMM), row softmax, out = S·V.
/// Row-major [N, D] is column-major [D, N], so S (row-major Nq×Nk) is computed as its
/// column-major transpose K·Qᵀ. Contiguous [B, H, N, D] views only; bench code.
template <class T>
void standard_attention(cublasHandle_t handle, View<const T> q, View<const T> k, View<const T> v, View<T> out,
                        cudaStream_t stream, void* ws, size_t ws_size) {
  const int64_t B = q.shape[0], H = q.shape[1], Nq = q.shape[2], Nk = k.shape[2], D = q.shape[3], Dv = v.shape[3];
  const size_t need = standard_scores_bytes(q, k);
  T* scores = static_cast<T*>(ws);
  if (ws == nullptr || ws_size < need) check(cudaMallocAsync(reinterpret_cast<void**>(&scores), need, stream), "cudaMallocAsync");
  check(cublasSetStream(handle, stream), "cublasSetStream");
  const float scale = 1.f / std::sqrt(static_cast<float>(D)), one = 1.f, zero = 0.f;
  const cudaDataType_t t = TypeInfo<T>::cublas;
  for (int64_t b = 0; b < B; ++b) {
    check(cublasGemmStridedBatchedEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, Nk, Nq, D, &scale, &k(b, 0, 0, 0), t, D, Nk * D,
                                     &q(b, 0, 0, 0), t, D, Nq * D, &zero, scores, t, Nk, Nq * Nk, H,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmStridedBatchedEx(Q Kᵀ)");
    softmax_rows<T><<<static_cast<unsigned>(H * Nq), 256, 0, stream>>>(scores, Nk);
    check(cudaGetLastError(), "softmax_rows");
    check(cublasGemmStridedBatchedEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, Dv, Nq, Nk, &one, &v(b, 0, 0, 0), t, Dv,
                                     Nk * Dv, scores, t, Nk, Nq * Nk, &zero, &out(b, 0, 0, 0), t, Dv, Nq * Dv, H,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmStridedBatchedEx(S V)");
  }
  if (scores != ws) check(cudaFreeAsync(scores, stream), "cudaFreeAsync");
}

cublasHandle_t cublas() {
  static cublasHandle_t handle = [] {
    cublasHandle_t h;
    check(cublasCreate(&h), "cublasCreate");
    return h;
  }();
  return handle;
}

template <class T>
Runner<T> standard() {
  Runner<T> r;
  r.run = [](View<const T> q, View<const T> k, View<const T> v, View<T> out, cudaStream_t s, void* ws, size_t n) {
    standard_attention<T>(cublas(), q, k, v, out, s, ws, n);
  };
  r.workspace = [](View<const T> q, View<const T> k, View<const T>) { return standard_scores_bytes(q, k); };
  return r;
}

#if EFFATTN_BENCH_HAVE_CUDA_API
/// Any effattn method through the public API.
template <class T, class Method>
Runner<T> library(Method m, std::shared_ptr<void> storage = nullptr, size_t parameter_bytes = 0) {
  Runner<T> r;
  r.run = [m](View<const T> q, View<const T> k, View<const T> v, View<T> out, cudaStream_t s, void* ws, size_t n) {
    effattn::Exec<effattn::Cuda> exec;
    exec.stream = s;
    exec.workspace = ws;
    exec.workspace_size = n;
    effattn::attention<effattn::Cuda>(m, q, k, v, out, {}, exec);
  };
  r.workspace = [m](View<const T> q, View<const T> k, View<const T> v) {
    return effattn::workspace_bytes<effattn::Cuda>(m, q, k, v);
  };
  r.storage = std::move(storage);
  r.parameter_bytes = parameter_bytes;
  return r;
}
#endif

// ---- One policy per (operator, CUDA, T): the operators this build has ----

template <class T>
Runner<T> make_runner(const bench::MethodSpec& m, int64_t H, int64_t D) {
  using bench::Family;
  (void)H;
  (void)D;
  switch (m.family) {
    case Family::standard:
      return standard<T>();
#if EFFATTN_BENCH_HAVE_CUDA_API && EFFATTN_BENCH_CUDA_SOFTMAX
    case Family::softmax:
      return library<T>(effattn::Softmax{0, m.causal});
#endif
#if EFFATTN_BENCH_HAVE_CUDA_API && EFFATTN_BENCH_CUDA_NYSTROM
    case Family::nystrom:
      return library<T>(effattn::Nystrom{m.size});
#endif
#if EFFATTN_BENCH_HAVE_CUDA_API && EFFATTN_BENCH_CUDA_PROXY
    case Family::proxy: {
      auto tokens = random_device<T>(2 * H * m.size * D, 7);
      effattn::Proxy<T> p;
      p.proxy_q = effattn::bhsd<const T>(tokens->ptr, 1, H, m.size, D);
      p.proxy_k = effattn::bhsd<const T>(tokens->ptr + H * m.size * D, 1, H, m.size, D);
      return library<T>(p, tokens, 2 * H * m.size * D * sizeof(T));
    }
#endif
#if EFFATTN_BENCH_HAVE_CUDA_API && EFFATTN_BENCH_CUDA_FAVOR && EFFATTN_BENCH_FAVOR_PROJECTION
    case Family::favor: {
      const std::vector<float> host = effattn::favor_projection(11, static_cast<int>(H), m.size, static_cast<int>(D));
      auto projection = std::make_shared<DeviceBuffer<float>>(host.size());
      check(cudaMemcpy(projection->ptr, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
      effattn::Favor f;
      f.projection = effattn::bhsd<const float>(projection->ptr, 1, H, m.size, D);
      f.causal = m.causal;
      return library<T>(f, projection, host.size() * sizeof(float));
    }
#endif
    default:
      return {};
  }
}

/// The default pool's high-water mark restarts from what it holds now.
size_t pool_reset(cudaMemPool_t pool) {
  size_t used = 0;
  check(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &used), "cudaMemPoolGetAttribute");
  uint64_t zero = 0;
  check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero), "cudaMemPoolSetAttribute");
  return used;
}
size_t pool_high(cudaMemPool_t pool) {
  uint64_t high = 0;
  check(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high), "cudaMemPoolGetAttribute");
  return static_cast<size_t>(high);
}

template <class T>
std::function<void(benchmark::State&)> make_body(const bench::Case& c, const bench::Options& o) {
  if (c.backward) return {};  // no CUDA backward yet
  const int64_t H = c.shape.heads, D = c.shape.dim, N = c.seq, B = c.batch;
  Runner<T> r = make_runner<T>(c.method, H, D);
  if (!r.run) return {};
  const double scores_mb = H * static_cast<double>(N) * N * sizeof(T) / (1 << 20);
  const bool too_big = c.method.family == bench::Family::standard && scores_mb > o.max_scores_mb;
  return [c, r, B, H, N, D, too_big, scores_mb](benchmark::State& st) {
    try {
      if (too_big) {
        const std::string why = "standard attention's scores need " +
                                std::to_string(static_cast<int64_t>(scores_mb)) + " MB (over --max-scores-mb)";
        bench::skip_case(st, why);
        for (auto _ : st) {
        }
        return;
      }
      const size_t n = static_cast<size_t>(B * H * N * D);
      auto q = random_device<T>(n, 1), k = random_device<T>(n, 2), v = random_device<T>(n, 3);
      DeviceBuffer<T> out(n);
      const auto in = [&](const DeviceBuffer<T>& x, int64_t b) { return effattn::bhsd<const T>(x.ptr, b, H, N, D); };
      cudaStream_t stream;
      check(cudaStreamCreate(&stream), "cudaStreamCreate");
      int device = 0;
      check(cudaGetDevice(&device), "cudaGetDevice");
      cudaMemPool_t pool;
      check(cudaDeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool");

      // Memory of one sequence: the pool's high-water mark while the operator runs on it.
      const size_t before = pool_reset(pool);
      r.run(in(*q, 1), in(*k, 1), in(*v, 1), effattn::bhsd(out.ptr, 1, H, N, D), stream, nullptr, 0);
      check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      const size_t high = pool_high(pool), scratch = high > before ? high - before : 0;
      const size_t ws_one = r.workspace(in(*q, 1), in(*k, 1), in(*v, 1));

      // Timed: the whole batch with a caller workspace, by CUDA events.
      const size_t ws_size = r.workspace(in(*q, B), in(*k, B), in(*v, B));
      DeviceBuffer<unsigned char> ws(ws_size);
      cudaEvent_t start, stop;
      check(cudaEventCreate(&start), "cudaEventCreate");
      check(cudaEventCreate(&stop), "cudaEventCreate");
      const auto out_view = effattn::bhsd(out.ptr, B, H, N, D);
      r.run(in(*q, B), in(*k, B), in(*v, B), out_view, stream, ws.ptr, ws_size);  // warm-up
      for (auto _ : st) {
        check(cudaEventRecord(start, stream), "cudaEventRecord");
        r.run(in(*q, B), in(*k, B), in(*v, B), out_view, stream, ws.ptr, ws_size);
        check(cudaEventRecord(stop, stream), "cudaEventRecord");
        check(cudaEventSynchronize(stop), "cudaEventSynchronize");
        float ms = 0;
        check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
        st.SetIterationTime(ms * 1e-3);
      }
      cudaEventDestroy(start);
      cudaEventDestroy(stop);
      cudaStreamDestroy(stream);
      bench::set_counters(st, c, bench::io_bytes_per_sequence(c, sizeof(T)) + r.parameter_bytes + scratch,
                          static_cast<double>(ws_one));
    } catch (const std::exception& e) {
      bench::fail_case(st, e.what());
    }
  };
}

/// The baseline must compute attention: compared with effattn's softmax on an odd size, within a
/// sanity bound of the type (a wrong baseline is off by O(1)). Returns true when it is.
template <class T>
bool check_baseline(const char* type, double bound) {
#if EFFATTN_BENCH_HAVE_CUDA_API && EFFATTN_BENCH_CUDA_SOFTMAX
  const int64_t B = 2, H = 3, N = 333, D = 64;
  const size_t n = static_cast<size_t>(B * H * N * D);
  auto q = random_device<T>(n, 1), k = random_device<T>(n, 2), v = random_device<T>(n, 3);
  DeviceBuffer<T> a(n), b(n);
  const auto in = [&](const DeviceBuffer<T>& x) { return effattn::bhsd<const T>(x.ptr, B, H, N, D); };
  standard<T>().run(in(*q), in(*k), in(*v), effattn::bhsd(a.ptr, B, H, N, D), nullptr, nullptr, 0);
  library<T>(effattn::Softmax{}).run(in(*q), in(*k), in(*v), effattn::bhsd(b.ptr, B, H, N, D), nullptr, nullptr, 0);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  std::vector<T> ha(n), hb(n);
  check(cudaMemcpy(ha.data(), a.ptr, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy");
  check(cudaMemcpy(hb.data(), b.ptr, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy");
  double diff = 0, ref = 0;
  for (size_t i = 0; i < n; ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(static_cast<float>(ha[i])) - static_cast<float>(hb[i])));
    ref = std::max(ref, std::abs(static_cast<double>(static_cast<float>(hb[i]))));
  }
  const bool ok = diff <= bound * ref;
  std::printf("standard baseline (cuBLAS) vs effattn softmax (%s): max|diff|/max|ref| = %.3g (bound %.0e): %s\n",
              type, diff / ref, bound, ok ? "ok" : "FAILED");
  return ok;
#else
  std::printf("standard baseline check (%s): effattn's CUDA softmax is not in this build\n", type);
  (void)bound;
  return true;
#endif
}

}  // namespace

int run_bench(int argc, char** argv) {
  bench::Options o = bench::Options::parse(argc, argv);
  if (o.types.empty()) o.types = {"float"};
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "attention_cuda_bench: no CUDA device (%s); nothing to run\n",
                 e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return 3;
  }
  if (o.check) {
    const bool f = check_baseline<float>("float", 1e-3), h = check_baseline<__half>("half", 2e-2),
               b = check_baseline<__nv_bfloat16>("bf16", 5e-2);
    return f && h && b ? 0 : 1;
  }
  if (o.device.empty()) {
    cudaDeviceProp prop;
    check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    o.device = prop.name;
  }
  std::vector<bench::Case> cases;
  for (const auto& type : o.types) {
    if (type != "float" && type != "half" && type != "bf16") {
      std::fprintf(stderr, "the CUDA bench runs float, half or bf16, not '%s'\n", type.c_str());
      return 2;
    }
    auto more = bench::all_cases(o, "cuda", type);
    cases.insert(cases.end(), more.begin(), more.end());
  }
  return bench::run_main(
      o, cases,
      [&](const bench::Case& c) -> std::function<void(benchmark::State&)> {
        if (c.type == "half") return make_body<__half>(c, o);
        if (c.type == "bf16") return make_body<__nv_bfloat16>(c, o);
        return make_body<float>(c, o);
      },
      benchmark::kMillisecond, true);
}

int main(int argc, char** argv) { return bench::main_reporting_errors(run_bench, argc, argv); }
