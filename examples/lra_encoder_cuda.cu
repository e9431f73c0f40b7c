// lra_encoder_cuda: the LRA encoder of lra_encoder.cpp on a CUDA GPU: cuBLAS for the dense layers,
// a few small kernels (embedding, LayerNorm, bias + GELU, mean pooling) and
// effattn::attention<Cuda> for the attention. Same model, options, weights file and table as the
// CPU program (see examples/lra_encoder.cpp and examples/lra/weights.hpp), so the two compare.
//
// Run (from the build directory, on a machine with a GPU):
//   ./examples/lra_encoder_cuda --attention proxy --lengths 1K,2K,4K,8K --batch 8
//   ./examples/lra_encoder_cuda --weights lra.bin    # a file written by either program
// Memory per sequence counts the same device buffers as the CPU program: activations of the
// forward pass plus the attention workspace (workspace_bytes<Cuda>), divided by the batch.
// Exit codes: 0 ok, 2 bad command line, 3 failed run, 77 no CUDA device (nothing was run).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <effattn/cuda.cuh>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "lra/main.hpp"
#include "lra/methods.hpp"

namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}
void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": cuBLAS status " + std::to_string(int(status)));
}

int blocks(int64_t n, int threads) { return int(std::min<int64_t>((n + threads - 1) / threads, 65535)); }

// x[t, i] = table[token t, i] + sinusoidal position of t within its sequence (as the CPU program).
__global__ void embed_kernel(const int32_t* tokens, const float* table, float* x, int64_t total, int64_t length,
                             int E) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = e / E;
    const int i = int(e % E);
    const double angle = double(t % length) * pow(10000.0, -double(i / 2 * 2) / double(E));
    x[e] = table[int64_t(tokens[t]) * E + i] + float(i % 2 == 0 ? sin(angle) : cos(angle));
  }
}

__device__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One warp per row of E values.
__global__ void layer_norm_kernel(const float* x, float* y, const float* gamma, const float* beta, int64_t rows,
                                  int E) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float* in = x + row * E;
  float sum = 0;
  for (int c = lane; c < E; c += 32) sum += in[c];
  const float mean = warp_sum(sum) / float(E);
  float sq = 0;
  for (int c = lane; c < E; c += 32) sq += (in[c] - mean) * (in[c] - mean);
  const float inv = rsqrtf(warp_sum(sq) / float(E) + 1e-5f);
  for (int c = lane; c < E; c += 32) y[row * E + c] = (in[c] - mean) * inv * gamma[c] + beta[c];
}

// y[r, c] += b[c], then GELU (exact, erf form) when asked.
__global__ void bias_kernel(float* y, const float* b, int64_t total, int cols, bool gelu) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const float z = y[e] + b[e % cols];
    y[e] = gelu ? 0.5f * z * (1.0f + erff(z * 0.70710678f)) : z;
  }
}

// pooled[b, c] = mean over the sequence of h[b, s, c]; one block per sequence.
__global__ void mean_pool_kernel(const float* h, float* pooled, int64_t length, int E) {
  const int64_t b = blockIdx.x;
  for (int c = threadIdx.x; c < E; c += blockDim.x) {
    float sum = 0;
    for (int64_t s = 0; s < length; ++s) sum += h[(b * length + s) * E + c];
    pooled[b * E + c] = sum / float(length);
  }
}

// A device allocation that grows on demand (the table runs increasing lengths) and frees itself.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(p_); }
  void reserve(size_t bytes) {
    if (bytes <= size_) return;
    check(cudaFree(p_), "cudaFree");
    p_ = nullptr;
    size_ = 0;
    check(cudaMalloc(&p_, bytes), "cudaMalloc");
    size_ = bytes;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  size_t size() const { return size_; }

 private:
  void* p_ = nullptr;
  size_t size_ = 0;
};

class CudaEncoder {
 public:
  CudaEncoder(const lra::Weights& w, lra::Attention a, int m) : c_(w.config), attention_(a), m_(m) {
    check(cudaStreamCreate(&stream_), "cudaStreamCreate");
    check(cublasCreate(&blas_), "cublasCreate");
    check(cublasSetStream(blas_, stream_), "cublasSetStream");
    for (const auto& [name, shape] : lra::expected_tensors(c_, a, m)) {  // upload what the model reads
      const lra::Param& p = w.get(name, shape);
      float*& d = params_[name];
      check(cudaMalloc(&d, p.data.size() * sizeof(float)), "cudaMalloc (weights)");
      check(cudaMemcpy(d, p.data.data(), p.data.size() * sizeof(float), cudaMemcpyHostToDevice), "upload weights");
    }
  }
  ~CudaEncoder() {
    for (auto& p : params_) cudaFree(p.second);
    cublasDestroy(blas_);
    cudaStreamDestroy(stream_);
  }
  CudaEncoder(const CudaEncoder&) = delete;
  CudaEncoder& operator=(const CudaEncoder&) = delete;

  int vocab() const { return c_.vocab; }
  int classes() const { return c_.classes; }

  void forward(const std::vector<int32_t>& tokens, int64_t batch, int64_t length, std::vector<float>& logits) {
    const int64_t T = batch * length, E = c_.embed, F = c_.hidden;
    acts_.reserve(sizeof(float) * size_t(lra::activation_floats(c_, batch, T)));
    tokens_.reserve(sizeof(int32_t) * size_t(T));
    float* x = acts_.as<float>();
    float* h = x + T * E;
    float* qkv = h + T * E;
    float* att = qkv + T * 3 * E;
    float* ffn = att + T * E;
    float* pooled = ffn + T * F;
    float* out = pooled + batch * E;

    check(cudaMemcpyAsync(tokens_.as<int32_t>(), tokens.data(), sizeof(int32_t) * size_t(T), cudaMemcpyHostToDevice,
                          stream_),
          "upload tokens");
    embed_kernel<<<blocks(T * E, 256), 256, 0, stream_>>>(tokens_.as<int32_t>(), param("embed.tokens"), x, T * E,
                                                          length, int(E));
    for (int l = 0; l < c_.layers; ++l) {
      const std::string p = "layer" + std::to_string(l) + ".";
      layer_norm(p + "ln1", x, h, T);
      dense(p + "attn.wqkv", p + "attn.bqkv", h, qkv, T, 3 * E, E, false, false);
      attend(l, qkv, att, batch, length);
      dense(p + "attn.wo", p + "attn.bo", att, x, T, E, E, true, false);
      layer_norm(p + "ln2", x, h, T);
      dense(p + "ffn.w1", p + "ffn.b1", h, ffn, T, F, E, false, true);
      dense(p + "ffn.w2", p + "ffn.b2", ffn, x, T, E, F, true, false);
    }
    layer_norm("final_ln", x, h, T);
    mean_pool_kernel<<<unsigned(batch), 128, 0, stream_>>>(h, pooled, length, int(E));
    dense("classifier.w", "classifier.b", pooled, out, batch, c_.classes, E, false, false);
    check(cudaGetLastError(), "kernel launch");
    logits.resize(size_t(batch) * c_.classes);
    check(cudaMemcpyAsync(logits.data(), out, logits.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_),
          "download logits");
    check(cudaStreamSynchronize(stream_), "forward pass");
  }

  /// Device activations of one sequence plus its share of the attention workspace, in bytes.
  size_t bytes_per_sequence(int64_t batch, int64_t length) const {
    return (sizeof(float) * size_t(lra::activation_floats(c_, batch, batch * length)) + workspace_needed_) /
           size_t(batch);
  }

 private:
  const float* param(const std::string& name) const { return params_.at(name); }

  void layer_norm(const std::string& name, const float* x, float* y, int64_t rows) {
    layer_norm_kernel<<<blocks(rows, 8), 256, 0, stream_>>>(x, y, param(name + ".gamma"), param(name + ".beta"), rows,
                                                            c_.embed);
  }

  // Row-major y [rows, out] (=|+=) x [rows, in] W [in, out] + b, optionally through GELU. cuBLAS is
  // column-major: there the same memory is y^T = W^T x^T.
  void dense(const std::string& w, const std::string& b, const float* x, float* y, int64_t rows, int64_t out,
             int64_t in, bool accumulate, bool gelu) {
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    check(cublasSgemm(blas_, CUBLAS_OP_N, CUBLAS_OP_N, int(out), int(rows), int(in), &one, param(w), int(out), x,
                      int(in), &beta, y, int(out)),
          "cublasSgemm");
    bias_kernel<<<blocks(rows * out, 256), 256, 0, stream_>>>(y, param(b), rows * out, int(out), gelu);
  }

  // att [B, N, H, Dh] = attention over the heads of qkv [B, N, 3, H, Dh]: strided views, no copies.
  void attend(int layer, const float* qkv, float* att, int64_t batch, int64_t length) {
    const int64_t H = c_.heads, Dh = c_.head_dim(), E = c_.embed, row = 3 * E;
    const auto part = [&](int64_t offset) {
      return effattn::Tensor<const float>(qkv + offset, {batch, H, length, Dh}, {length * row, Dh, row, 1});
    };
    const effattn::Tensor<const float> q = part(0), k = part(E), v = part(2 * E);
    const effattn::Tensor<float> out = effattn::bshd(att, batch, length, H, Dh);
    const auto tensor = [&](const std::string& name) { return param(name); };
    lra::with_method(attention_, m_, c_, layer, tensor, [&](const auto& method) {
      effattn::Exec<effattn::Cuda> exec;
      exec.stream = stream_;
      workspace_needed_ = effattn::workspace_bytes<effattn::Cuda>(method, q, k, v, exec);
      workspace_.reserve(workspace_needed_);  // cudaMalloc: 256-byte aligned, as effattn wants
      exec.workspace = workspace_.as<void>();
      exec.workspace_size = workspace_.size();
      effattn::attention<effattn::Cuda>(method, q, k, v, out, {}, exec);
    });
  }

  lra::Config c_;
  lra::Attention attention_;
  int m_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  std::map<std::string, float*> params_;
  DeviceBuffer acts_, tokens_, workspace_;
  size_t workspace_needed_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  const auto no_device = [] {
    int devices = 0;  // cudaGetDeviceCount leaves it unwritten when there is no driver
    const cudaError_t status = cudaGetDeviceCount(&devices);
    if (status == cudaSuccess && devices > 0) return 0;
    std::printf("lra_encoder_cuda: no CUDA device (%s); nothing to run\n",
                status != cudaSuccess ? cudaGetErrorString(status) : "0 devices");
    return lra::kExitNoDevice;
  };
  return lra::main_with(argc, argv, "lra_encoder_cuda", no_device,
                        [](const lra::Options& o, const lra::Weights& w, const std::string& setup) {
                          CudaEncoder model(w, o.attention, o.m);
                          cudaDeviceProp prop;
                          check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
                          std::printf("lra_encoder_cuda (%s): %s\n", prop.name, setup.c_str());
                          lra::run_lengths(o, model);
                        });
}
