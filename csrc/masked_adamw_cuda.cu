// Fused masked AdamW step on CUDA (ChildTuning-F/-D, sparse masks): one multi-tensor launch
// per up to kMaxTensors tensors / kMaxBlocks chunks, like torch's multi_tensor_apply and apex's
// multi_tensor_adam; the schema is registered in csrc/masked_adamw.cpp.
//
// Math: regdrop_fast/reference/masked_adamw.py, per element in csrc/masked_adamw.h (fp32 for
// fp32/bf16/fp16 parameters, fp32 moments). Memory per element: read p, g, m, v, write p, m, v
// (28 B for fp32 params, 20 B for bf16/fp16 params + grads); the F mask is generated in
// registers (one Philox block per 4 elements, 0 B), the D mask reads 1/8 B.
// Launch: grid = chunks of kChunk elements (block b -> (tensor, chunk) from the metadata in
// the kernel arguments), kThreads threads, each thread 4 consecutive elements per iteration
// with 16 B (fp32) / 8 B (bf16, fp16) vector loads when the chunk is aligned.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

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
  uint32_t stream[kMaxTensors];
  int8_t kind[kMaxTensors];
  uint8_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};

struct GroupScalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, lr_wd, decay, inv_p;
  uint64_t seed;
  uint64_t threshold;
};

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
  const uint32_t step = meta.step[t];
  const uint32_t stream = meta.stream[t];
  const AdamScalars s{gs.beta1, gs.beta2, gs.one_minus_beta1, gs.one_minus_beta2, gs.eps,
                      gs.lr_wd, gs.decay, meta.step_size[t], meta.bc2_sqrt[t]};
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
void launch(const TensorListMeta& meta, const GroupScalars& gs, int n_blocks,
            cudaStream_t stream) {
  masked_adamw_kernel<T, kPaper, kAction><<<n_blocks, kThreads, 0, stream>>>(meta, gs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_any(bool paper, int action, const TensorListMeta& meta, const GroupScalars& gs,
                int n_blocks, cudaStream_t stream) {
  if (paper) {
    if (action == kDropGrad) launch<T, true, kDropGrad>(meta, gs, n_blocks, stream);
    else if (action == kDropUpdate) launch<T, true, kDropUpdate>(meta, gs, n_blocks, stream);
    else launch<T, true, kPrune>(meta, gs, n_blocks, stream);
  } else {
    if (action == kDropGrad) launch<T, false, kDropGrad>(meta, gs, n_blocks, stream);
    else if (action == kDropUpdate) launch<T, false, kDropUpdate>(meta, gs, n_blocks, stream);
    else launch<T, false, kPrune>(meta, gs, n_blocks, stream);
  }
}

void check_cuda_tensor(const at::Tensor& t, const char* name, size_t i, c10::Device device) {
  TORCH_CHECK(t.is_cuda() && t.device() == device && t.is_contiguous(), "masked_adamw_: ",
              name, "[", i, "] must be a contiguous CUDA tensor on ", device, ", got ",
              t.device(), t.is_contiguous() ? "" : " (non-contiguous)");
}

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList masks,
                       at::IntArrayRef mask_kinds, at::IntArrayRef steps,
                       at::IntArrayRef index_offsets, at::IntArrayRef streams,
                       at::ArrayRef<double> step_sizes, at::ArrayRef<double> bc2_sqrts,
                       double beta1, double beta2, double eps, double lr_wd, int64_t seed_lo,
                       int64_t seed_hi, double reserve_p, int64_t action, bool paper) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  masks.size() == n && mask_kinds.size() == n && steps.size() == n &&
                  index_offsets.size() == n && streams.size() == n && step_sizes.size() == n &&
                  bc2_sqrts.size() == n,
              "masked_adamw_: every list must have one entry per param (", n, ")");
  TORCH_CHECK(action >= kDropGrad && action <= kPrune, "masked_adamw_: action must be 0..2");
  if (n == 0) return;
  const c10::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "masked_adamw_: params must be float32, bfloat16 or float16, got ", dtype);
  for (size_t i = 0; i < n; ++i) {
    check_cuda_tensor(params[i], "params", i, device);
    check_cuda_tensor(grads[i], "grads", i, device);
    check_cuda_tensor(exp_avgs[i], "exp_avgs", i, device);
    check_cuda_tensor(exp_avg_sqs[i], "exp_avg_sqs", i, device);
    TORCH_CHECK(params[i].scalar_type() == dtype && grads[i].scalar_type() == dtype,
                "masked_adamw_: params/grads[", i, "] must all have dtype ", dtype);
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat &&
                    exp_avg_sqs[i].scalar_type() == at::kFloat,
                "masked_adamw_: exp_avgs/exp_avg_sqs[", i, "] must be float32");
    const int64_t numel = params[i].numel();
    TORCH_CHECK(grads[i].numel() == numel && exp_avgs[i].numel() == numel &&
                    exp_avg_sqs[i].numel() == numel,
                "masked_adamw_: grads/exp_avgs/exp_avg_sqs[", i, "] must match the param's numel");
    TORCH_CHECK(mask_kinds[i] >= kMaskNone && mask_kinds[i] <= kMaskBits,
                "masked_adamw_: mask_kinds[", i, "] must be 0..2");
    if (mask_kinds[i] == kMaskBits) {
      check_cuda_tensor(masks[i], "masks", i, device);
      TORCH_CHECK(masks[i].scalar_type() == at::kInt &&
                      masks[i].numel() * 32 >= index_offsets[i] + numel,
                  "masked_adamw_: masks[", i, "] must be int32 words covering the param's bits");
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  GroupScalars gs{static_cast<float>(beta1),         static_cast<float>(beta2),
                  static_cast<float>(1.0 - beta1),   static_cast<float>(1.0 - beta2),
                  static_cast<float>(eps),           static_cast<float>(lr_wd),
                  static_cast<float>(1.0 - lr_wd),   static_cast<float>(1.0 / reserve_p),
                  (static_cast<uint64_t>(seed_hi) << 32) | static_cast<uint32_t>(seed_lo),
                  keep_threshold(reserve_p)};

  size_t last = n;
  for (size_t i = 0; i < n; ++i) {
    if (params[i].numel() > 0) last = i;
  }
  TensorListMeta meta;
  int slot = 0;
  int n_blocks = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    meta.p[slot] = params[i].data_ptr();
    meta.g[slot] = grads[i].data_ptr();
    meta.m[slot] = exp_avgs[i].data_ptr<float>();
    meta.v[slot] = exp_avg_sqs[i].data_ptr<float>();
    meta.words[slot] = mask_kinds[i] == kMaskBits ? masks[i].data_ptr<int32_t>() : nullptr;
    meta.numel[slot] = numel;
    meta.offset[slot] = static_cast<uint64_t>(index_offsets[i]);
    meta.step_size[slot] = static_cast<float>(step_sizes[i]);
    meta.bc2_sqrt[slot] = static_cast<float>(bc2_sqrts[i]);
    meta.step[slot] = static_cast<uint32_t>(steps[i]);
    meta.stream[slot] = static_cast<uint32_t>(streams[i]);
    meta.kind[slot] = static_cast<int8_t>(mask_kinds[i]);
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[n_blocks] = static_cast<uint8_t>(slot);
      meta.block_to_chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = last_chunk && slot + 1 == kMaxTensors;
      if (tensors_full || n_blocks == kMaxBlocks || (last_chunk && i == last)) {
        switch (dtype) {
          case at::kFloat:
            launch_any<float>(paper, static_cast<int>(action), meta, gs, n_blocks, stream);
            break;
          case at::kBFloat16:
            launch_any<c10::BFloat16>(paper, static_cast<int>(action), meta, gs, n_blocks,
                                      stream);
            break;
          default:
            launch_any<c10::Half>(paper, static_cast<int>(action), meta, gs, n_blocks, stream);
        }
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
          meta.stream[0] = meta.stream[slot];
          meta.kind[0] = meta.kind[slot];
          slot = 0;
        }
      }
    }
    ++slot;
  }
}

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_IMPL(regdrop_fast, CUDA, m) {
  m.impl("masked_adamw_", &regdrop::masked_adamw_cuda);
}
