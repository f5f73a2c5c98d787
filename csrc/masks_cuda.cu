// Bit-packed masks on CUDA (format: csrc/bitpack.h; checks and CPU kernels: csrc/masks.cpp).
//   pack_mask:     one warp per output word (grid-stride over rows*W words); lane j reads element
//                  32w+j and __ballot_sync assembles the word. 1 B read + 1/8 B written/element.
//   unpack_mask:   one thread per element (grid-stride over rows*n); 1 B written/element, the
//                  words are re-read from cache by the 32 threads sharing one.
//   mask_popcount: grid-stride __popc per thread, warp shuffle sum, one 64-bit atomicAdd per warp.
// Launch: 256 threads, cdiv(work, 256) blocks capped at 65536.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "bitpack.h"

namespace regdrop {

// Defined in csrc/masks.cpp: one set of argument checks for both devices.
void check_pack_mask_args(const at::Tensor& mask);
void check_unpack_mask_args(const at::Tensor& words, int64_t n);
void check_mask_popcount_args(const at::Tensor& words);

namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int64_t kMaxBlocks = 65536;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

unsigned blocks_for(int64_t threads_needed) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min((threads_needed + kThreads - 1) / kThreads, kMaxBlocks)));
}

__global__ void pack_mask_kernel(const bool* __restrict__ mask, int32_t* __restrict__ words,
                                 int64_t n, int64_t width, int64_t total_words) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  // The loop bound is the same for all lanes of a warp, so the ballot sees the full warp.
  for (int64_t w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
       w < total_words; w += warps) {
    const int64_t row = w / width;
    const int64_t col = (w - row * width) * kWarpSize + lane;
    const bool bit = col < n && mask[row * n + col];
    const unsigned word = __ballot_sync(kFullWarp, bit);
    if (lane == 0) {
      words[w] = static_cast<int32_t>(word);
    }
  }
}

__global__ void unpack_mask_kernel(const int32_t* __restrict__ words, bool* __restrict__ mask,
                                   int64_t n, int64_t width, int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t row = i / n;
    const int64_t col = i - row * n;
    const auto word = static_cast<uint32_t>(words[row * width + col / kWarpSize]);
    mask[i] = (word >> (col % kWarpSize)) & 1u;
  }
}

__global__ void mask_popcount_kernel(const int32_t* __restrict__ words, int64_t count,
                                     unsigned long long* __restrict__ total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned long long local = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    local += popcount32(static_cast<uint32_t>(words[i]));
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    local += __shfl_down_sync(kFullWarp, local, offset);
  }
  if (threadIdx.x % kWarpSize == 0 && local != 0) {
    atomicAdd(total, local);
  }
}

at::Tensor pack_mask_cuda(const at::Tensor& mask) {
  check_pack_mask_args(mask);
  const c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor bits = mask.contiguous();
  const int64_t rows = bits.size(0);
  const int64_t n = bits.size(1);
  const int64_t width = num_words(n);
  at::Tensor words = at::empty({rows, width}, bits.options().dtype(at::kInt));
  const int64_t total_words = rows * width;
  if (total_words == 0) {
    return words;
  }
  pack_mask_kernel<<<blocks_for(total_words * kWarpSize), kThreads, 0,
                     c10::cuda::getCurrentCUDAStream()>>>(
      bits.const_data_ptr<bool>(), words.mutable_data_ptr<int32_t>(), n, width, total_words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return words;
}

at::Tensor unpack_mask_cuda(const at::Tensor& words, int64_t n) {
  check_unpack_mask_args(words, n);
  const c10::cuda::CUDAGuard guard(words.device());
  const at::Tensor packed = words.contiguous();
  const int64_t rows = packed.size(0);
  at::Tensor mask = at::empty({rows, n}, packed.options().dtype(at::kBool));
  const int64_t total = rows * n;
  if (total == 0) {
    return mask;
  }
  unpack_mask_kernel<<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      packed.const_data_ptr<int32_t>(), mask.mutable_data_ptr<bool>(), n, packed.size(1), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

at::Tensor mask_popcount_cuda(const at::Tensor& words) {
  check_mask_popcount_args(words);
  const c10::cuda::CUDAGuard guard(words.device());
  const at::Tensor packed = words.contiguous();
  at::Tensor total = at::zeros({}, packed.options().dtype(at::kLong));
  const int64_t count = packed.numel();
  if (count == 0) {
    return total;
  }
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "atomicAdd target width");
  mask_popcount_kernel<<<blocks_for(count), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      packed.const_data_ptr<int32_t>(), count,
      reinterpret_cast<unsigned long long*>(total.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return total;
}

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_IMPL(regdrop_fast, CUDA, m) {
  m.impl("pack_mask", &regdrop::pack_mask_cuda);
  m.impl("unpack_mask", &regdrop::unpack_mask_cuda);
  m.impl("mask_popcount", &regdrop::mask_popcount_cuda);
}
