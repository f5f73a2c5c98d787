// A generic multi-tensor launcher for elementwise ops over lists of tensors, in the style of
// apex's multi_tensor_apply and torch's ATen/native/cuda/MultiTensorApply.cuh. The tensors'
// pointers, sizes and per-tensor op arguments travel in a fixed-size kernel-argument struct (no
// device copy of the list, so the launches can be captured in a CUDA graph); a struct holds up to
// kMaxBlocks chunks of up to kMaxTensors tensors, and a full struct is launched at once, one
// thread block per chunk of kChunk elements. The op is a functor called by every thread of a
// block with its tensor's slot in the struct and the chunk's element range.
//
// CUDA code: included by csrc/*_cuda.cu only (a .h so that the packaging globs ship it); the
// entry type is in csrc/cuda_launch.h so that the host code that fills it (csrc/cuda_ops.cpp)
// needs no CUDA compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda_launch.h"

namespace regdrop {
namespace cuda {

// Kernel arguments are limited to 4 KB on every CUDA version and GPU (32 KB needs CUDA 12.1, a
// recent driver and Volta or later: not worth a second set of kernels here).
constexpr size_t kKernelArgBytes = 4096;
constexpr int kMaxBlocks = 320;

template <int kDepth, typename Extra, int kMaxTensors>
struct TensorListMeta {
  void* ptr[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  Extra extra[kMaxTensors];
  uint8_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};

// The most tensors whose metadata fits in the kernel arguments beside the op's Args and an
// empty functor (64 B of slack for their alignment padding).
template <int kDepth, typename Extra, typename Args>
constexpr int max_tensors() {
  constexpr size_t fixed = kMaxBlocks * (sizeof(uint8_t) + sizeof(int32_t)) + sizeof(Args) + 64;
  constexpr size_t per_tensor = kDepth * sizeof(void*) + sizeof(int64_t) + sizeof(Extra);
  return static_cast<int>((kKernelArgBytes - fixed) / per_tensor);
}

template <int kThreads, int64_t kChunk, typename Meta, typename Functor, typename Args>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const Meta meta, const Functor functor, const Args args) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t end = begin + kChunk < meta.numel[t] ? begin + kChunk : meta.numel[t];
  functor(meta, t, begin, end, args);
}

// Runs functor(meta, slot, begin, end, args) over every chunk of the n tensors (empty ones are
// skipped), kThreads threads per chunk, on `stream`; returns the first failed launch's status.
template <int kThreads, int64_t kChunk, int kDepth, typename Extra, typename Functor,
          typename Args>
cudaError_t multi_tensor_apply(const TensorEntry<kDepth, Extra>* tensors, size_t n,
                               const Functor& functor, const Args& args,
                               cudaStream_t stream) noexcept {
  constexpr int kMaxTensors = max_tensors<kDepth, Extra, Args>();
  using Meta = TensorListMeta<kDepth, Extra, kMaxTensors>;
  static_assert(kMaxTensors >= 1 && kMaxTensors <= 256, "block_to_tensor holds a uint8 slot");
  static_assert(sizeof(Meta) + sizeof(Functor) + sizeof(Args) <= kKernelArgBytes,
                "the launch metadata exceeds the kernel-argument limit");
  size_t last = n;  // the last non-empty tensor: its last chunk closes the final launch
  for (size_t i = 0; i < n; ++i) {
    if (tensors[i].numel > 0) last = i;
  }
  Meta meta;
  const auto put = [&meta](int slot, const TensorEntry<kDepth, Extra>& t) {
    for (int d = 0; d < kDepth; ++d) meta.ptr[d][slot] = t.ptr[d];
    meta.numel[slot] = t.numel;
    meta.extra[slot] = t.extra;
  };
  int slot = 0;
  int blocks = 0;
  for (size_t i = 0; i < n; ++i) {
    const TensorEntry<kDepth, Extra>& t = tensors[i];
    if (t.numel == 0) continue;
    put(slot, t);
    const int64_t chunks = (t.numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<uint8_t>(slot);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = last_chunk && slot + 1 == kMaxTensors;
      if (tensors_full || blocks == kMaxBlocks || (last_chunk && i == last)) {
        multi_tensor_kernel<kThreads, kChunk><<<blocks, kThreads, 0, stream>>>(meta, functor,
                                                                               args);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        blocks = 0;
        if (last_chunk) {
          slot = -1;  // the next tensor starts a fresh struct
        } else {      // the rest of this tensor's chunks continue from slot 0
          put(0, t);
          slot = 0;
        }
      }
    }
    ++slot;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace regdrop
