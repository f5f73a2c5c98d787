// Bit-packed mask kernels on CUDA (format: csrc/bitpack.h); their ops, checks and outputs are
// in csrc/cuda_ops.cpp (why: csrc/cuda_launch.h).
//   pack_mask:     one warp per output word (grid-stride over rows*W words); lane j reads element
//                  32w+j and __ballot_sync assembles the word. 1 B read + 1/8 B written/element.
//   unpack_mask:   one thread per element (grid-stride over rows*n); 1 B written/element, the
//                  words are re-read from cache by the 32 threads sharing one.
//   mask_popcount: grid-stride __popc per thread, warp shuffle sum, one 64-bit atomicAdd per warp.
// Launch: 256 threads, cdiv(work, 256) blocks capped at 65536.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "bitpack.h"
#include "cuda_launch.h"

namespace regdrop {

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

}  // namespace

namespace cuda {

cudaError_t launch_pack_mask(const bool* mask, int32_t* words, int64_t rows, int64_t n,
                             cudaStream_t stream) noexcept {
  const int64_t width = num_words(n);
  const int64_t total_words = rows * width;
  if (total_words == 0) return cudaSuccess;
  pack_mask_kernel<<<blocks_for(total_words * kWarpSize), kThreads, 0, stream>>>(
      mask, words, n, width, total_words);
  return cudaGetLastError();
}

cudaError_t launch_unpack_mask(const int32_t* words, bool* mask, int64_t rows, int64_t n,
                               int64_t width, cudaStream_t stream) noexcept {
  const int64_t total = rows * n;
  if (total == 0) return cudaSuccess;
  unpack_mask_kernel<<<blocks_for(total), kThreads, 0, stream>>>(words, mask, n, width, total);
  return cudaGetLastError();
}

cudaError_t launch_mask_popcount(const int32_t* words, int64_t count, int64_t* total,
                                 cudaStream_t stream) noexcept {
  if (count == 0) return cudaSuccess;
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "atomicAdd target width");
  mask_popcount_kernel<<<blocks_for(count), kThreads, 0, stream>>>(
      words, count, reinterpret_cast<unsigned long long*>(total));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace regdrop
