// Philox kernels on CUDA (the word of csrc/philox.h); their ops, checks and outputs are in
// csrc/cuda_ops.cpp (why: csrc/cuda_launch.h).
//   philox_words: one thread per index (grid-stride); reads 8 B and writes 8 B per element;
//                 10 Philox rounds per element make it ALU-bound on small grids.
//   philox_keep_: one thread per Philox block of 4 elements; 1 B written per element.
// Launch: 256 threads, cdiv(work, 256) blocks capped at 65536 (the loop covers the rest).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_launch.h"
#include "philox.h"

namespace regdrop {

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

}  // namespace

namespace cuda {

cudaError_t launch_philox_words(const int64_t* index, int64_t* out, int64_t n, uint64_t seed,
                                uint32_t step, uint32_t stream_id, cudaStream_t stream) noexcept {
  if (n == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks));
  philox_words_kernel<<<blocks, kThreads, 0, stream>>>(index, out, n, seed, step, stream_id);
  return cudaGetLastError();
}

cudaError_t launch_philox_keep(bool* out, int64_t n, int64_t offset, uint64_t seed,
                               uint32_t step, uint32_t stream_id, uint64_t limit,
                               cudaStream_t stream) noexcept {
  if (n == 0) return cudaSuccess;
  const int64_t n_blocks = ((offset + n + 3) >> 2) - (offset >> 2);
  const auto blocks =
      static_cast<unsigned>(std::min((n_blocks + kThreads - 1) / kThreads, kMaxBlocks));
  philox_keep_kernel<<<blocks, kThreads, 0, stream>>>(out, n, offset, seed, step, stream_id,
                                                      limit);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace regdrop
