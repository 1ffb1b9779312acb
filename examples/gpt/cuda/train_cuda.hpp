#pragma once
// The GPT trainer on a CUDA device: the same loop as gpt::train (gpt.hpp), every rank an
// in-process rank on device 0 with the CUDA backend, the ops of cuda_ops.hpp (cuBLAS products in
// bf16 with fp32 accumulation) on Engine::compute_stream(), activations in device memory.
// With a 16-bit compute dtype each acquired block is widened to an fp32 device workspace and its
// fp32 gradients added back by the backend's cast and accumulate kernels, as on the CPU.
// Errors: Error(unsupported) without a CUDA device, before any rank starts; otherwise as
// gpt::train.
#include "gpt.hpp"

namespace gpt {

TrainResult train_cuda(const TrainOptions& options, const std::function<void(const StepRecord&)>& on_step = {});

// Best GFLOP/s of an m x n x k product through CudaOps::matmul_forward (bf16 tensor cores, fp32
// accumulation) on device 0 over `reps` runs: the peak GPU MFU is measured against.
double measure_cublas_gflops(int m, int n, int k, int reps);

}  // namespace gpt
