// The CUDA component's registrar (core/components.hpp): lets the in-process communicator in the
// core ask a CUDA backend for its device. The component's link interface names
// SHARDOPT_CUDA_COMPONENT_ANCHOR (--undefined), which keeps this object, and so its static
// initializer, in every program that links shardopt::cuda.
#include "core/components.hpp"
#include "shardopt/cuda.hpp"

namespace {
const shardopt::detail::CudaComponent kCuda{&shardopt::cuda_device_of};
const bool kRegistered = (shardopt::detail::register_component(&kCuda), true);
}  // namespace

extern "C" {
// Referenced only by the linker (see above); the value is never read.
extern const int SHARDOPT_CUDA_COMPONENT_ANCHOR;
const int SHARDOPT_CUDA_COMPONENT_ANCHOR = kRegistered ? 1 : 0;
}
