// The launchers of the CUDA kernels (csrc/*_cuda.cu), called only by csrc/cuda_ops.cpp.
//
// Why the split: the ops' dispatcher entry points, their argument checks and every C++
// exception live in host code compiled by the host compiler (cuda_ops.cpp); the nvcc-compiled
// files hold kernels and these launchers, which take raw pointers and sizes already checked,
// return the launch status instead of throwing, and instantiate no dispatcher template. No
// exception is thrown from, or unwinds through, a frame compiled by nvcc, and torch's boxing
// wrappers exist only in host-compiler instantiations (the first H200 run crashed with SIGSEGV
// where a rejected argument of a CUDA op should have raised; see cuda_ops.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace regdrop {
namespace cuda {

cudaError_t launch_pack_mask(const bool* mask, int32_t* words, int64_t rows, int64_t n,
                             cudaStream_t stream) noexcept;
cudaError_t launch_unpack_mask(const int32_t* words, bool* mask, int64_t rows, int64_t n,
                               int64_t width, cudaStream_t stream) noexcept;
// total: one zero-initialized int64 on the device
cudaError_t launch_mask_popcount(const int32_t* words, int64_t count, int64_t* total,
                                 cudaStream_t stream) noexcept;

cudaError_t launch_philox_words(const int64_t* index, int64_t* out, int64_t n, uint64_t seed,
                                uint32_t step, uint32_t stream_id, cudaStream_t stream) noexcept;
cudaError_t launch_philox_keep(bool* out, int64_t n, int64_t offset, uint64_t seed,
                               uint32_t step, uint32_t stream_id, uint64_t limit,
                               cudaStream_t stream) noexcept;

// One tensor of a multi-tensor launch (csrc/multi_tensor_apply.h): kDepth pointers to numel
// elements each and the op's per-tensor arguments; a tensor with numel 0 is skipped.
template <int kDepth, typename Extra>
struct TensorEntry {
  void* ptr[kDepth];
  int64_t numel;
  Extra extra;
};

// The per-tensor arguments of a masked AdamW step (words covers bits offset .. offset + numel
// when kind is kMaskBits). With step_count (capturable), the kernel reads the step there and
// computes step_size and bc2_sqrt itself.
struct AdamwTensorArgs {
  const int32_t* words;
  uint64_t offset;
  const float* step_count;  // capturable: the tensor's float32 step count, else nullptr
  float step_size;
  float bc2_sqrt;
  uint32_t step;
  uint32_t stream;
  int kind;
};

// ptr: param, grad, exp_avg (float), exp_avg_sq (float)
using AdamwTensor = TensorEntry<4, AdamwTensorArgs>;

struct AdamwGroup {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, lr_wd, decay, inv_p;
  uint64_t seed;
  uint64_t threshold;
  // capturable (tensors with a step_count): lr read on the device, scalars in double
  const void* lr;
  bool lr_double;  // lr is float64, else float32
  double beta1_d, beta2_d, weight_decay;
};

enum class ParamDtype { kFloat32, kBFloat16, kFloat16 };

cudaError_t launch_masked_adamw(const AdamwTensor* tensors, size_t n, const AdamwGroup& group,
                                ParamDtype dtype, bool paper, int action,
                                cudaStream_t stream) noexcept;

}  // namespace cuda
}  // namespace regdrop
