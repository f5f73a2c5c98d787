// Fused masked AdamW step on CUDA (ChildTuning-F/-D, sparse masks): one multi-tensor launch
// per up to kMaxTensors tensors / kMaxBlocks chunks, like torch's multi_tensor_apply and apex's
// multi_tensor_adam; the schema is in csrc/masked_adamw.cpp, the op and its checks in
// csrc/cuda_ops.cpp (why: csrc/cuda_launch.h).
//
// Math: regdrop_fast/reference/masked_adamw.py, per element in csrc/masked_adamw.h (fp32 for
// fp32/bf16/fp16 parameters, fp32 moments). Memory per element: read p, g, m, v, write p, m, v
// (28 B for fp32 params, 20 B for bf16/fp16 params + grads); the F mask is generated in
// registers (one Philox block per 4 elements, 0 B), the D mask reads 1/8 B.
// Launch: grid = chunks of kChunk elements (block b -> (tensor, chunk) from the metadata in
// the kernel arguments), kThreads threads, each thread 4 consecutive elements per iteration
// with 16 B (fp32) / 8 B (bf16, fp16) vector loads when the chunk is aligned.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_launch.h"
#include "masked_adamw.h"

namespace regdrop {
namespace {

constexpr int kMaxTensors = 24;  // keeps the metadata under the 4 KB kernel-argument limit
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;
constexpr int kIlp = 4;

struct TensorListMeta {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  float* m[kMaxTensors];
  float* v[kMaxTensors];
  const int32_t* words[kMaxTensors];
  int64_t numel[kMaxTensors];
  uint64_t offset[kMaxTensors];  // global flat index of local element 0
  float step_size[kMaxTensors];
  float bc2_sqrt[kMaxTensors];
  uint32_t step[kMaxTensors];
  const float* step_count[kMaxTensors];  // capturable: read the step here, else nullptr
  uint32_t stream[kMaxTensors];
  int8_t kind[kMaxTensors];
  uint8_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};

using GroupScalars = cuda::AdamwGroup;

template <typename T>
struct alignas(sizeof(T) * kIlp) Pack {
  T v[kIlp];
};

template <typename T>
__device__ __forceinline__ bool aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack<T>) == 0;
}

template <typename T, bool kPaper, int kAction>
__global__ void __launch_bounds__(kThreads) masked_adamw_kernel(TensorListMeta meta,
                                                                GroupScalars gs) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(meta.numel[t], begin + kChunk);
  T* p = static_cast<T*>(meta.p[t]);
  const T* g = static_cast<const T*>(meta.g[t]);
  float* m = meta.m[t];
  float* v = meta.v[t];
  const int32_t* words = meta.words[t];
  const int kind = meta.kind[t];
  const uint64_t offset = meta.offset[t];
  uint32_t step = meta.step[t];
  const uint32_t stream = meta.stream[t];
  AdamScalars s{gs.beta1, gs.beta2, gs.one_minus_beta1, gs.one_minus_beta2, gs.eps,
                gs.lr_wd, gs.decay, meta.step_size[t], meta.bc2_sqrt[t]};
  if (meta.step_count[t] != nullptr) {  // capturable: no host value of the step or lr
    const double count = static_cast<double>(*meta.step_count[t]);
    const double lr = gs.lr_double ? *static_cast<const double*>(gs.lr)
                                   : static_cast<double>(*static_cast<const float*>(gs.lr));
    const double bc1 = 1.0 - pow(gs.beta1_d, count);
    const double bc2 = 1.0 - pow(gs.beta2_d, count);
    step = static_cast<uint32_t>(count);
    s.step_size = static_cast<float>(kPaper ? lr * sqrt(bc2) / bc1 : lr / bc1);
    s.bc2_sqrt = static_cast<float>(kPaper ? 1.0 : sqrt(bc2));
    s.lr_wd = static_cast<float>(lr * gs.weight_decay);
    s.decay = static_cast<float>(1.0 - lr * gs.weight_decay);
  }
  const bool vec = aligned<T>(p + begin) && aligned<T>(g + begin) && aligned<float>(m + begin) &&
                   aligned<float>(v + begin);
  for (int64_t i0 = begin + static_cast<int64_t>(threadIdx.x) * kIlp; i0 < end;
       i0 += static_cast<int64_t>(blockDim.x) * kIlp) {
    const bool full = vec && i0 + kIlp <= end;
    float pf[kIlp], gf[kIlp], mf[kIlp], vf[kIlp], factor[kIlp];
    if (full) {
      const Pack<T> pp = *reinterpret_cast<const Pack<T>*>(p + i0);
      const Pack<T> gp = *reinterpret_cast<const Pack<T>*>(g + i0);
      const Pack<float> mp = *reinterpret_cast<const Pack<float>*>(m + i0);
      const Pack<float> vp = *reinterpret_cast<const Pack<float>*>(v + i0);
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        pf[j] = static_cast<float>(pp.v[j]);
        gf[j] = static_cast<float>(gp.v[j]);
        mf[j] = mp.v[j];
        vf[j] = vp.v[j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        const bool in = i0 + j < end;
        pf[j] = in ? static_cast<float>(p[i0 + j]) : 0.0f;
        gf[j] = in ? static_cast<float>(g[i0 + j]) : 0.0f;
        mf[j] = in ? m[i0 + j] : 0.0f;
        vf[j] = in ? v[i0 + j] : 0.0f;
      }
    }
    const uint64_t first = offset + static_cast<uint64_t>(i0);
    if (kind == kMaskPhilox) {
      uint32_t w[kIlp];
      if ((first & 3) == 0) {  // the 4 elements share one Philox block
        const PhiloxOut out = philox_block(gs.seed, first, step, stream);
#pragma unroll
        for (int j = 0; j < kIlp; ++j) w[j] = out.w[j];
      } else {
#pragma unroll
        for (int j = 0; j < kIlp; ++j) w[j] = philox_word(gs.seed, first + j, step, stream);
      }
#pragma unroll
      for (int j = 0; j < kIlp; ++j) factor[j] = w[j] < gs.threshold ? gs.inv_p : 0.0f;
    } else if (kind == kMaskBits) {
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        factor[j] = (i0 + j < end && mask_bit(words, first + j)) ? 1.0f : 0.0f;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kIlp; ++j) factor[j] = 1.0f;
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      pf[j] = adamw_element<kPaper, kAction>(pf[j], gf[j], mf[j], vf[j], factor[j],
                                             factor[j] != 0.0f, s);
    }
    if (full) {
      Pack<T> pp;
      Pack<float> mp, vp;
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        pp.v[j] = static_cast<T>(pf[j]);
        mp.v[j] = mf[j];
        vp.v[j] = vf[j];
      }
      *reinterpret_cast<Pack<T>*>(p + i0) = pp;
      *reinterpret_cast<Pack<float>*>(m + i0) = mp;
      *reinterpret_cast<Pack<float>*>(v + i0) = vp;
    } else {
#pragma unroll
      for (int j = 0; j < kIlp; ++j) {
        if (i0 + j < end) {
          p[i0 + j] = static_cast<T>(pf[j]);
          m[i0 + j] = mf[j];
          v[i0 + j] = vf[j];
        }
      }
    }
  }
}

template <typename T, bool kPaper, int kAction>
cudaError_t launch(const TensorListMeta& meta, const GroupScalars& gs, int n_blocks,
                   cudaStream_t stream) {
  masked_adamw_kernel<T, kPaper, kAction><<<n_blocks, kThreads, 0, stream>>>(meta, gs);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_any(bool paper, int action, const TensorListMeta& meta,
                       const GroupScalars& gs, int n_blocks, cudaStream_t stream) {
  if (paper) {
    if (action == kDropGrad) return launch<T, true, kDropGrad>(meta, gs, n_blocks, stream);
    if (action == kDropUpdate) return launch<T, true, kDropUpdate>(meta, gs, n_blocks, stream);
    return launch<T, true, kPrune>(meta, gs, n_blocks, stream);
  }
  if (action == kDropGrad) return launch<T, false, kDropGrad>(meta, gs, n_blocks, stream);
  if (action == kDropUpdate) return launch<T, false, kDropUpdate>(meta, gs, n_blocks, stream);
  return launch<T, false, kPrune>(meta, gs, n_blocks, stream);
}

}  // namespace

namespace cuda {

cudaError_t launch_masked_adamw(const AdamwTensor* tensors, size_t n, const AdamwGroup& gs,
                                ParamDtype dtype, bool paper, int action,
                                cudaStream_t stream) noexcept {
  size_t last = n;
  for (size_t i = 0; i < n; ++i) {
    if (tensors[i].numel > 0) last = i;
  }
  TensorListMeta meta;
  int slot = 0;
  int n_blocks = 0;
  for (size_t i = 0; i < n; ++i) {
    const AdamwTensor& t = tensors[i];
    const int64_t numel = t.numel;
    if (numel == 0) continue;
    meta.p[slot] = t.p;
    meta.g[slot] = t.g;
    meta.m[slot] = t.m;
    meta.v[slot] = t.v;
    meta.words[slot] = t.words;
    meta.numel[slot] = numel;
    meta.offset[slot] = t.offset;
    meta.step_size[slot] = t.step_size;
    meta.bc2_sqrt[slot] = t.bc2_sqrt;
    meta.step[slot] = t.step;
    meta.step_count[slot] = t.step_count;
    meta.stream[slot] = t.stream;
    meta.kind[slot] = static_cast<int8_t>(t.kind);
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<uint8_t>(slot);
      meta.block_to_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = last_chunk && slot + 1 == kMaxTensors;
      if (tensors_full || n_blocks == kMaxBlocks || (last_chunk && i == last)) {
        cudaError_t err;
        switch (dtype) {
          case ParamDtype::kFloat32:
            err = launch_any<float>(paper, action, meta, gs, n_blocks, stream);
            break;
          case ParamDtype::kBFloat16:
            err = launch_any<c10::BFloat16>(paper, action, meta, gs, n_blocks, stream);
            break;
          default:
            err = launch_any<c10::Half>(paper, action, meta, gs, n_blocks, stream);
        }
        if (err != cudaSuccess) return err;
        n_blocks = 0;
        if (last_chunk) {
          slot = -1;  // the next tensor starts a fresh list
        } else {      // the rest of this tensor's chunks continue in slot 0
          meta.p[0] = meta.p[slot];
          meta.g[0] = meta.g[slot];
          meta.m[0] = meta.m[slot];
          meta.v[0] = meta.v[slot];
          meta.words[0] = meta.words[slot];
          meta.numel[0] = meta.numel[slot];
          meta.offset[0] = meta.offset[slot];
          meta.step_size[0] = meta.step_size[slot];
          meta.bc2_sqrt[0] = meta.bc2_sqrt[slot];
          meta.step[0] = meta.step[slot];
          meta.step_count[0] = meta.step_count[slot];
          meta.stream[0] = meta.stream[slot];
          meta.kind[0] = meta.kind[slot];
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
