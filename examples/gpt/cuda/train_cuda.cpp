#include "cuda/train_cuda.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "cuda/cuda_ops.hpp"
#include "shardopt/cuda.hpp"

namespace gpt {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw shardopt::Error(shardopt::ErrorCode::io_error, std::string("gpt cuda: ") + what + ": " + cudaGetErrorString(e));
}

class CudaEnv final : public RankEnv {
 public:
  explicit CudaEnv(int device) : device_(device) {}
  ~CudaEnv() override {
    for (void* p : buffers_) cudaFree(p);
  }
  std::unique_ptr<shardopt::Backend> backend() override {
    auto b = shardopt::make_cuda_backend(device_);
    device_ = shardopt::cuda_device_of(*b);
    return b;
  }
  void bind(shardopt::Engine& engine) override {
    check(cudaSetDevice(device_), "cudaSetDevice");
    stream_ = shardopt::cuda_stream_handle(engine.compute_stream());
    ops_ = std::make_unique<CudaOps>(stream_, GemmMode::bf16);
  }
  const Ops<float>& ops() const override { return *ops_; }
  float* floats(std::size_t n) override { return static_cast<float*>(alloc(n * sizeof(float))); }
  std::int32_t* ints(std::size_t n) override { return static_cast<std::int32_t*>(alloc(n * sizeof(std::int32_t))); }
  void upload(std::int32_t* dst, const std::int32_t* src, std::size_t n) override {
    check(cudaMemcpyAsync(dst, src, n * sizeof(std::int32_t), cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream_)),
          "token upload");
    // The host buffer is refilled for the next micro-step: wait until the copy has read it.
    check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)), "token upload");
  }
  bool host_memory() const override { return false; }

 private:
  void* alloc(std::size_t bytes) {
    void* p = nullptr;
    check(cudaMalloc(&p, std::max<std::size_t>(bytes, 1)), "cudaMalloc (trainer activations)");
    buffers_.push_back(p);
    return p;
  }
  int device_ = 0;
  void* stream_ = nullptr;
  std::unique_ptr<CudaOps> ops_;
  std::vector<void*> buffers_;
};

}  // namespace

TrainResult train_cuda(const TrainOptions& o, const std::function<void(const StepRecord&)>& on_step) {
  if (!shardopt::cuda_device_available())
    throw shardopt::Error(shardopt::ErrorCode::unsupported, "gpt: no CUDA device (or a build without the CUDA backend)");
  // One process per rank under a launcher: its local rank picks the GPU. In-process ranks share
  // device 0 (the in-process communicator's backend_kernels transport).
  const int device = o.bootstrap ? o.local_rank % std::max(1, shardopt::cuda_device_count()) : 0;
  return train_with(o, on_step, [device](int, std::shared_ptr<shardopt::ThreadPool>) -> std::unique_ptr<RankEnv> {
    return std::make_unique<CudaEnv>(device);
  });
}

double measure_cublas_gflops(int m, int n, int k, int reps) {
  const CudaOps ops(nullptr, GemmMode::bf16);
  float *a = nullptr, *b = nullptr, *c = nullptr;
  check(cudaMalloc(&a, sizeof(float) * std::size_t(m) * k), "cudaMalloc");
  check(cudaMalloc(&b, sizeof(float) * std::size_t(k) * n), "cudaMalloc");
  check(cudaMalloc(&c, sizeof(float) * std::size_t(m) * n), "cudaMalloc");
  double best = 0;
  try {
    check(cudaMemset(a, 0, sizeof(float) * std::size_t(m) * k), "cudaMemset");
    check(cudaMemset(b, 0, sizeof(float) * std::size_t(k) * n), "cudaMemset");
    ops.matmul_forward(c, a, b, nullptr, m, k, n, WeightLayout::in_out);  // warm-up
    check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      ops.matmul_forward(c, a, b, nullptr, m, k, n, WeightLayout::in_out);
      check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, 2.0 * m * n * k / s / 1e9);
    }
  } catch (...) {
    cudaFree(a), cudaFree(b), cudaFree(c);
    throw;
  }
  cudaFree(a), cudaFree(b), cudaFree(c);
  return best;
}

}  // namespace gpt
