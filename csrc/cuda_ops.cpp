// The CUDA implementations of every op (schemas: masks.cpp, philox_words.cpp, masked_adamw.cpp),
// compiled by the host compiler: argument checks (shared with the CPU kernels), device guard,
// output allocation and the launch-status check happen here; the kernels and their launchers
// are in csrc/*_cuda.cu behind csrc/cuda_launch.h.
//
// The first H200 run crashed with SIGSEGV when a check of a CUDA op rejected an argument (the
// same check raised on CPU). Those checks threw from inside the nvcc-compiled op functions, so
// the c10::Error unwound through frames compiled by cudafe++/nvcc, and those files also held
// nvcc-built instantiations of torch's boxing templates, which the linker may pick over the
// host compiler's for the CPU kernels of the same signature. Here neither can happen: nothing
// compiled by nvcc throws or takes part in dispatch.
#ifdef REGDROP_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "bitpack.h"
#include "cuda_launch.h"
#include "masked_adamw.h"

namespace regdrop {

// Defined beside the CPU kernels: one set of checks for every device.
void check_pack_mask_args(const at::Tensor& mask);
void check_unpack_mask_args(const at::Tensor& words, int64_t n);
void check_mask_popcount_args(const at::Tensor& words);
void check_philox_words_args(const at::Tensor& index, int64_t seed_lo, int64_t seed_hi,
                             int64_t step, int64_t stream);
void check_philox_keep_args(const at::Tensor& out, int64_t offset, int64_t seed_lo,
                            int64_t seed_hi, int64_t step, int64_t stream, int64_t threshold);
void check_masked_adamw_args(at::TensorList params, at::TensorList grads,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             at::TensorList masks, at::IntArrayRef mask_kinds,
                             at::IntArrayRef steps, at::IntArrayRef index_offsets,
                             at::IntArrayRef streams, at::ArrayRef<double> step_sizes,
                             at::ArrayRef<double> bc2_sqrts, int64_t seed_lo, int64_t seed_hi,
                             double reserve_p, int64_t action, c10::DeviceType device_type);
void check_masked_adamw_capturable_args(at::TensorList params, at::TensorList grads,
                                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                        at::TensorList masks, at::IntArrayRef mask_kinds,
                                        at::TensorList steps, at::IntArrayRef index_offsets,
                                        at::IntArrayRef streams, const at::Tensor& lr,
                                        int64_t seed_lo, int64_t seed_hi, double reserve_p,
                                        int64_t action, c10::DeviceType device_type);

namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

cuda::ParamDtype param_dtype_of(const at::Tensor& t) {
  const at::ScalarType dtype = t.scalar_type();
  return dtype == at::kFloat      ? cuda::ParamDtype::kFloat32
         : dtype == at::kBFloat16 ? cuda::ParamDtype::kBFloat16
                                  : cuda::ParamDtype::kFloat16;
}

uint64_t join_seed(int64_t seed_lo, int64_t seed_hi) {
  return (static_cast<uint64_t>(seed_hi) << 32) | static_cast<uint64_t>(seed_lo);
}

at::Tensor pack_mask_cuda(const at::Tensor& mask) {
  check_pack_mask_args(mask);
  const c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor bits = mask.contiguous();
  const int64_t rows = bits.size(0);
  const int64_t n = bits.size(1);
  at::Tensor words = at::empty({rows, num_words(n)}, bits.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::launch_pack_mask(bits.const_data_ptr<bool>(),
                                        words.mutable_data_ptr<int32_t>(), rows, n,
                                        current_stream(bits)));
  return words;
}

at::Tensor unpack_mask_cuda(const at::Tensor& words, int64_t n) {
  check_unpack_mask_args(words, n);
  const c10::cuda::CUDAGuard guard(words.device());
  const at::Tensor packed = words.contiguous();
  const int64_t rows = packed.size(0);
  at::Tensor mask = at::empty({rows, n}, packed.options().dtype(at::kBool));
  C10_CUDA_CHECK(cuda::launch_unpack_mask(packed.const_data_ptr<int32_t>(),
                                          mask.mutable_data_ptr<bool>(), rows, n,
                                          packed.size(1), current_stream(packed)));
  return mask;
}

at::Tensor mask_popcount_cuda(const at::Tensor& words) {
  check_mask_popcount_args(words);
  const c10::cuda::CUDAGuard guard(words.device());
  const at::Tensor packed = words.contiguous();
  at::Tensor total = at::zeros({}, packed.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::launch_mask_popcount(packed.const_data_ptr<int32_t>(), packed.numel(),
                                            total.mutable_data_ptr<int64_t>(),
                                            current_stream(packed)));
  return total;
}

at::Tensor philox_words_cuda(const at::Tensor& index, int64_t seed_lo, int64_t seed_hi,
                             int64_t step, int64_t stream) {
  check_philox_words_args(index, seed_lo, seed_hi, step, stream);
  const c10::cuda::CUDAGuard guard(index.device());
  const at::Tensor idx = index.contiguous();
  at::Tensor out = at::empty(idx.sizes(), idx.options());
  C10_CUDA_CHECK(cuda::launch_philox_words(
      idx.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), idx.numel(),
      join_seed(seed_lo, seed_hi), static_cast<uint32_t>(step), static_cast<uint32_t>(stream),
      current_stream(idx)));
  return out;
}

void philox_keep_cuda(const at::Tensor& out, int64_t offset, int64_t seed_lo, int64_t seed_hi,
                             int64_t step, int64_t stream, int64_t threshold) {
  check_philox_keep_args(out, offset, seed_lo, seed_hi, step, stream, threshold);
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(cuda::launch_philox_keep(
      out.mutable_data_ptr<bool>(), out.numel(), offset, join_seed(seed_lo, seed_hi),
      static_cast<uint32_t>(step), static_cast<uint32_t>(stream),
      static_cast<uint64_t>(threshold), current_stream(out)));
}

// One launch-table entry per parameter (pointers, sizes, mask); each form fills in how its
// step scalars arrive: from the host, or through a device step count.
std::vector<cuda::AdamwTensor> adamw_tensors(at::TensorList params, at::TensorList grads,
                                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                             at::TensorList masks, at::IntArrayRef mask_kinds,
                                             at::IntArrayRef index_offsets,
                                             at::IntArrayRef streams) {
  std::vector<cuda::AdamwTensor> tensors(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const bool bits = mask_kinds[i] == kMaskBits;
    cuda::AdamwTensor& t = tensors[i];
    t.ptr[0] = params[i].data_ptr();
    t.ptr[1] = grads[i].data_ptr();  // read only
    t.ptr[2] = exp_avgs[i].data_ptr();
    t.ptr[3] = exp_avg_sqs[i].data_ptr();
    t.numel = params[i].numel();
    t.extra = cuda::AdamwTensorArgs{bits ? masks[i].data_ptr<int32_t>() : nullptr,
                                    static_cast<uint64_t>(index_offsets[i]),
                                    nullptr,
                                    0.0f,
                                    1.0f,
                                    0,
                                    static_cast<uint32_t>(streams[i]),
                                    static_cast<int>(mask_kinds[i])};
  }
  return tensors;
}

// The group scalars of a launch. The plain form folds lr into lr_wd on the host; the
// capturable form passes lr_wd = 0 and the lr tensor, which the kernel reads on the device.
cuda::AdamwGroup adamw_group(double beta1, double beta2, double eps, double lr_wd,
                             double reserve_p, int64_t seed_lo, int64_t seed_hi, const void* lr,
                             bool lr_double, double weight_decay) {
  return cuda::AdamwGroup{static_cast<float>(beta1),       static_cast<float>(beta2),
                          static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2),
                          static_cast<float>(eps),         static_cast<float>(lr_wd),
                          static_cast<float>(1.0 - lr_wd), static_cast<float>(1.0 / reserve_p),
                          join_seed(seed_lo, seed_hi),     keep_threshold(reserve_p),
                          lr,                              lr_double,
                          beta1,                           beta2,
                          weight_decay};
}

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList masks,
                       at::IntArrayRef mask_kinds, at::IntArrayRef steps,
                       at::IntArrayRef index_offsets, at::IntArrayRef streams,
                       at::ArrayRef<double> step_sizes, at::ArrayRef<double> bc2_sqrts,
                       double beta1, double beta2, double eps, double lr_wd, int64_t seed_lo,
                       int64_t seed_hi, double reserve_p, int64_t action, bool paper) {
  check_masked_adamw_args(params, grads, exp_avgs, exp_avg_sqs, masks, mask_kinds, steps,
                          index_offsets, streams, step_sizes, bc2_sqrts, seed_lo, seed_hi,
                          reserve_p, action, c10::DeviceType::CUDA);
  const size_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<cuda::AdamwTensor> tensors =
      adamw_tensors(params, grads, exp_avgs, exp_avg_sqs, masks, mask_kinds, index_offsets,
                    streams);
  for (size_t i = 0; i < n; ++i) {
    tensors[i].extra.step_size = static_cast<float>(step_sizes[i]);
    tensors[i].extra.bc2_sqrt = static_cast<float>(bc2_sqrts[i]);
    tensors[i].extra.step = static_cast<uint32_t>(steps[i]);
  }
  const cuda::AdamwGroup group = adamw_group(beta1, beta2, eps, lr_wd, reserve_p, seed_lo,
                                             seed_hi, nullptr, false, 0.0);
  C10_CUDA_CHECK(cuda::launch_masked_adamw(tensors.data(), n, group, param_dtype_of(params[0]),
                                           paper, static_cast<int>(action),
                                           current_stream(params[0])));
}

// torch.optim.AdamW's capturable=True: the kernel reads each tensor's step count and the lr
// from device memory and computes the bias corrections itself, so the launch reads no host
// value and can be captured in a CUDA graph.
void masked_adamw_capturable_cuda(at::TensorList params, at::TensorList grads,
                                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                  at::TensorList masks, at::IntArrayRef mask_kinds,
                                  at::TensorList steps, at::IntArrayRef index_offsets,
                                  at::IntArrayRef streams, const at::Tensor& lr, double beta1,
                                  double beta2, double eps, double weight_decay, int64_t seed_lo,
                                  int64_t seed_hi, double reserve_p, int64_t action, bool paper) {
  check_masked_adamw_capturable_args(params, grads, exp_avgs, exp_avg_sqs, masks, mask_kinds,
                                     steps, index_offsets, streams, lr, seed_lo, seed_hi,
                                     reserve_p, action, c10::DeviceType::CUDA);
  const size_t n = params.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<cuda::AdamwTensor> tensors =
      adamw_tensors(params, grads, exp_avgs, exp_avg_sqs, masks, mask_kinds, index_offsets,
                    streams);
  for (size_t i = 0; i < n; ++i) tensors[i].extra.step_count = steps[i].const_data_ptr<float>();
  const cuda::AdamwGroup group =
      adamw_group(beta1, beta2, eps, 0.0, reserve_p, seed_lo, seed_hi, lr.const_data_ptr(),
                  lr.scalar_type() == at::kDouble, weight_decay);
  C10_CUDA_CHECK(cuda::launch_masked_adamw(tensors.data(), n, group, param_dtype_of(params[0]),
                                           paper, static_cast<int>(action),
                                           current_stream(params[0])));
}

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_IMPL(regdrop_fast, CUDA, m) {
  m.impl("pack_mask", &regdrop::pack_mask_cuda);
  m.impl("unpack_mask", &regdrop::unpack_mask_cuda);
  m.impl("mask_popcount", &regdrop::mask_popcount_cuda);
  m.impl("philox_words", &regdrop::philox_words_cuda);
  m.impl("philox_keep_", &regdrop::philox_keep_cuda);
  m.impl("masked_adamw_", &regdrop::masked_adamw_cuda);
  m.impl("masked_adamw_capturable_", &regdrop::masked_adamw_capturable_cuda);
}

#endif  // REGDROP_WITH_CUDA
