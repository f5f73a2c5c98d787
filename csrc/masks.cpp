// Bit-packed masks (format: csrc/bitpack.h): schemas, argument checks and CPU kernels of
//   pack_mask(bool [rows, n]) -> int32 [rows, ceil(n/32)]   1 B read + 1/8 B written per element
//   unpack_mask(int32 [rows, W], n) -> bool [rows, n]        1/8 B read + 1 B written per element
//   mask_popcount(int32 words, any shape) -> int64 0-d       4 B read per word
// csrc/masks_cuda.cu adds the CUDA kernels. The CPU loops run over flat word indices so one
// long row splits over torch's OpenMP threads as well as many short rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <functional>

#include "bitpack.h"

namespace regdrop {

// The checks below are shared with the CUDA kernels (csrc/masks_cuda.cu).
void check_pack_mask_args(const at::Tensor& mask) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "pack_mask: mask must be a bool tensor, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 2, "pack_mask: mask must be 2-d [rows, n], got shape ",
                    mask.sizes());
}

void check_unpack_mask_args(const at::Tensor& words, int64_t n) {
  TORCH_CHECK_TYPE(words.scalar_type() == at::kInt,
                   "unpack_mask: words must be an int32 tensor, got ", words.scalar_type());
  TORCH_CHECK_VALUE(words.dim() == 2,
                    "unpack_mask: words must be 2-d [rows, ceil(n/32)], got shape ", words.sizes());
  TORCH_CHECK_VALUE(n >= 0, "unpack_mask: n must be >= 0, got ", n);
  TORCH_CHECK_VALUE(words.size(1) == num_words(n), "unpack_mask: words must have ", num_words(n),
                    " columns for n = ", n, ", got shape ", words.sizes());
}

void check_mask_popcount_args(const at::Tensor& words) {
  TORCH_CHECK_TYPE(words.scalar_type() == at::kInt,
                   "mask_popcount: words must be an int32 tensor, got ", words.scalar_type());
}

namespace {

// Words per parallel task: about 32 KiB of bools per task for pack/unpack.
constexpr int64_t kGrainWords = 1024;

at::Tensor pack_mask_cpu(const at::Tensor& mask) {
  check_pack_mask_args(mask);
  const at::Tensor bits = mask.contiguous();
  const int64_t rows = bits.size(0);
  const int64_t n = bits.size(1);
  const int64_t width = num_words(n);
  at::Tensor words = at::empty({rows, width}, bits.options().dtype(at::kInt));
  const bool* in = bits.const_data_ptr<bool>();
  int32_t* out = words.mutable_data_ptr<int32_t>();
  at::parallel_for(0, rows * width, kGrainWords, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / width;
      out[i] = static_cast<int32_t>(pack_row_word(in + row * n, n, i - row * width));
    }
  });
  return words;
}

at::Tensor unpack_mask_cpu(const at::Tensor& words, int64_t n) {
  check_unpack_mask_args(words, n);
  const at::Tensor packed = words.contiguous();
  const int64_t rows = packed.size(0);
  const int64_t width = packed.size(1);
  at::Tensor mask = at::empty({rows, n}, packed.options().dtype(at::kBool));
  const int32_t* in = packed.const_data_ptr<int32_t>();
  bool* out = mask.mutable_data_ptr<bool>();
  at::parallel_for(0, rows * width, kGrainWords, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / width;
      const int64_t start = (i - row * width) * kBitsPerWord;
      const int64_t left = n - start;
      unpack_word(static_cast<uint32_t>(in[i]), out + row * n + start,
                  left < kBitsPerWord ? static_cast<int>(left) : kBitsPerWord);
    }
  });
  return mask;
}

at::Tensor mask_popcount_cpu(const at::Tensor& words) {
  check_mask_popcount_args(words);
  const at::Tensor packed = words.contiguous();
  const int32_t* in = packed.const_data_ptr<int32_t>();
  const int64_t total = at::parallel_reduce(
      0, packed.numel(), 16 * kGrainWords, int64_t{0},
      [&](int64_t begin, int64_t end, int64_t acc) {
        return acc + popcount_words(in + begin, end - begin);
      },
      std::plus<int64_t>());
  at::Tensor out = at::empty({}, packed.options().dtype(at::kLong));
  *out.mutable_data_ptr<int64_t>() = total;
  return out;
}

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_FRAGMENT(regdrop_fast, m) {
  m.set_python_module("regdrop_fast._fake_ops");
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("unpack_mask(Tensor words, int n) -> Tensor");
  m.def("mask_popcount(Tensor words) -> Tensor");
}

TORCH_LIBRARY_IMPL(regdrop_fast, CPU, m) {
  m.impl("pack_mask", &regdrop::pack_mask_cpu);
  m.impl("unpack_mask", &regdrop::unpack_mask_cpu);
  m.impl("mask_popcount", &regdrop::mask_popcount_cpu);
}
