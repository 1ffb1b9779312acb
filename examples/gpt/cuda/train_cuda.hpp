#pragma once
// The GPT trainer on a CUDA device: the same loop as gpt::train (gpt.hpp), every rank an
// in-process rank on device 0 with the CUDA backend, the ops of cuda_ops.hpp (cuBLAS products in
// bf16 with fp32 accumulation) on Engine::compute_stream(), activations in device memory.
// Compute dtype fp32 only for now (the 16-bit widening of gpt::train runs on the host).
// Errors: Error(unsupported) without a CUDA device or with a 16-bit compute dtype, before any
// rank starts; otherwise as gpt::train.
#include "gpt.hpp"

namespace gpt {

TrainResult train_cuda(const TrainOptions& options, const std::function<void(const StepRecord&)>& on_step = {});

// Best GFLOP/s of an m x n x k product through CudaOps::matmul_forward (bf16 tensor cores, fp32
// accumulation) on device 0 over `reps` runs: the peak GPU MFU is measured against.
double measure_cublas_gflops(int m, int n, int k, int reps);

}  // namespace gpt
