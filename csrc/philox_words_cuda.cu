// philox_words on CUDA: one thread per index (grid-stride), the word of csrc/philox.h. Reads 8 B
// and writes 8 B per element; 10 Philox rounds per element make it ALU-bound on small grids.
// Launch: 256 threads, cdiv(n, 256) blocks capped at 65536 (the loop covers the rest).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "philox.h"

namespace regdrop {

// Defined in csrc/philox_words.cpp: one set of argument checks for both devices.
void check_philox_words_args(const at::Tensor& index, int64_t seed_lo, int64_t seed_hi,
                             int64_t step, int64_t stream);
void check_philox_keep_args(const at::Tensor& out, int64_t offset, int64_t seed_lo,
                            int64_t seed_hi, int64_t step, int64_t stream, int64_t threshold);

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

__global__ void philox_words_kernel(const int64_t* __restrict__ index, int64_t* __restrict__ out,
                                    int64_t n, uint64_t seed, uint32_t step, uint32_t stream) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = philox_word(seed, static_cast<uint64_t>(index[i]), step, stream);
  }
}

at::Tensor philox_words_cuda(const at::Tensor& index, int64_t seed_lo, int64_t seed_hi,
                             int64_t step, int64_t stream) {
  check_philox_words_args(index, seed_lo, seed_hi, step, stream);
  const c10::cuda::CUDAGuard guard(index.device());
  const at::Tensor idx = index.contiguous();
  at::Tensor out = at::empty(idx.sizes(), idx.options());
  const int64_t n = idx.numel();
  if (n == 0) {
    return out;
  }
  const uint64_t seed = (static_cast<uint64_t>(seed_hi) << 32) | static_cast<uint64_t>(seed_lo);
  const auto blocks = static_cast<unsigned>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
  philox_words_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      idx.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), n, seed,
      static_cast<uint32_t>(step), static_cast<uint32_t>(stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// One thread per Philox block of 4 elements: 1 B written per element.
__global__ void philox_keep_kernel(bool* __restrict__ out, int64_t n, int64_t offset,
                                   uint64_t seed, uint32_t step, uint32_t stream, uint64_t limit) {
  const int64_t first_block = offset >> 2;
  const int64_t n_blocks = ((offset + n + 3) >> 2) - first_block;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < n_blocks;
       b += stride) {
    const int64_t block = first_block + b;
    const PhiloxOut words = philox_block(seed, static_cast<uint64_t>(block) << 2, step, stream);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = (block << 2) + lane - offset;
      if (i >= 0 && i < n) {
        out[i] = words.w[lane] < limit;
      }
    }
  }
}

at::Tensor& philox_keep_cuda(at::Tensor& out, int64_t offset, int64_t seed_lo, int64_t seed_hi,
                             int64_t step, int64_t stream, int64_t threshold) {
  check_philox_keep_args(out, offset, seed_lo, seed_hi, step, stream, threshold);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.numel();
  if (n == 0) {
    return out;
  }
  const uint64_t seed = (static_cast<uint64_t>(seed_hi) << 32) | static_cast<uint64_t>(seed_lo);
  const int64_t n_blocks = ((offset + n + 3) >> 2) - (offset >> 2);
  const auto blocks =
      static_cast<unsigned>(std::min((n_blocks + kThreads - 1) / kThreads, kMaxBlocks));
  philox_keep_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.mutable_data_ptr<bool>(), n, offset, seed, static_cast<uint32_t>(step),
      static_cast<uint32_t>(stream), static_cast<uint64_t>(threshold));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_IMPL(regdrop_fast, CUDA, m) {
  m.impl("philox_words", &regdrop::philox_words_cuda);
  m.impl("philox_keep_", &regdrop::philox_keep_cuda);
}
