// Fused masked AdamW step on CUDA (ChildTuning-F/-D, sparse masks): a functor run by the
// generic multi-tensor launcher (csrc/multi_tensor_apply.h), like apex's multi_tensor_adam;
// the schema is in csrc/masked_adamw.cpp, the op and its checks in csrc/cuda_ops.cpp (why:
// csrc/cuda_launch.h).
//
// Math: regdrop_fast/reference/masked_adamw.py, per element in csrc/masked_adamw.h (fp32 for
// fp32/bf16/fp16 parameters, fp32 moments). Memory per element: read p, g, m, v, write p, m, v
// (28 B for fp32 params, 20 B for bf16/fp16 params + grads); the F mask is generated in
// registers (one Philox block per 4 elements, 0 B), the D mask reads 1/8 B.
// Launch: grid = chunks of kChunk elements (block b -> (tensor, chunk) from the launcher's
// metadata in the kernel arguments), kThreads threads, each thread 4 consecutive elements per
// iteration with 16 B (fp32) / 8 B (bf16, fp16) vector loads when the chunk is aligned.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_launch.h"
#include "masked_adamw.h"
#include "multi_tensor_apply.h"

namespace regdrop {
namespace {

constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;
constexpr int kIlp = 4;

using GroupScalars = cuda::AdamwGroup;

template <typename T>
struct alignas(sizeof(T) * kIlp) Pack {
  T v[kIlp];
};

template <typename T>
__device__ __forceinline__ bool aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack<T>) == 0;
}

// Elements begin .. end - 1 of the tensor in slot t of the launch metadata.
template <typename T, bool kPaper, int kAction>
struct MaskedAdamwFunctor {
  template <typename Meta>
  __device__ __forceinline__ void operator()(const Meta& meta, int t, int64_t begin, int64_t end,
                                             const GroupScalars& gs) const;
};

template <typename T, bool kPaper, int kAction>
template <typename Meta>
__device__ __forceinline__ void MaskedAdamwFunctor<T, kPaper, kAction>::operator()(
    const Meta& meta, int t, int64_t begin, int64_t end, const GroupScalars& gs) const {
  T* p = static_cast<T*>(meta.ptr[0][t]);
  const T* g = static_cast<const T*>(meta.ptr[1][t]);
  float* m = static_cast<float*>(meta.ptr[2][t]);
  float* v = static_cast<float*>(meta.ptr[3][t]);
  const cuda::AdamwTensorArgs& a = meta.extra[t];
  const int32_t* words = a.words;
  const int kind = a.kind;
  const uint64_t offset = a.offset;  // global flat index of local element 0
  uint32_t step = a.step;
  const uint32_t stream = a.stream;
  AdamScalars s{gs.beta1, gs.beta2, gs.one_minus_beta1, gs.one_minus_beta2, gs.eps,
                gs.lr_wd, gs.decay, a.step_size, a.bc2_sqrt};
  if (a.step_count != nullptr) {  // capturable: no host value of the step or lr
    const double count = static_cast<double>(*a.step_count);
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
cudaError_t launch(const cuda::AdamwTensor* tensors, size_t n, const GroupScalars& gs,
                   cudaStream_t stream) {
  return cuda::multi_tensor_apply<kThreads, kChunk>(tensors, n,
                                                    MaskedAdamwFunctor<T, kPaper, kAction>{}, gs,
                                                    stream);
}

template <typename T>
cudaError_t launch_any(bool paper, int action, const cuda::AdamwTensor* tensors, size_t n,
                       const GroupScalars& gs, cudaStream_t stream) {
  if (paper) {
    if (action == kDropGrad) return launch<T, true, kDropGrad>(tensors, n, gs, stream);
    if (action == kDropUpdate) return launch<T, true, kDropUpdate>(tensors, n, gs, stream);
    return launch<T, true, kPrune>(tensors, n, gs, stream);
  }
  if (action == kDropGrad) return launch<T, false, kDropGrad>(tensors, n, gs, stream);
  if (action == kDropUpdate) return launch<T, false, kDropUpdate>(tensors, n, gs, stream);
  return launch<T, false, kPrune>(tensors, n, gs, stream);
}

}  // namespace

namespace cuda {

cudaError_t launch_masked_adamw(const AdamwTensor* tensors, size_t n, const AdamwGroup& gs,
                                ParamDtype dtype, bool paper, int action,
                                cudaStream_t stream) noexcept {
  switch (dtype) {
    case ParamDtype::kFloat32:
      return launch_any<float>(paper, action, tensors, n, gs, stream);
    case ParamDtype::kBFloat16:
      return launch_any<c10::BFloat16>(paper, action, tensors, n, gs, stream);
    default:
      return launch_any<c10::Half>(paper, action, tensors, n, gs, stream);
  }
}

}  // namespace cuda
}  // namespace regdrop
