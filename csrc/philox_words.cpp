// philox_words: the contract's uint32 Philox word (csrc/philox.h) for each int64 global element
// index, returned as int64. Schema, argument checks and the CPU kernel; csrc/philox_words.cu
// adds the CUDA kernel. Reads 8 B and writes 8 B per element; each element runs one Philox
// block (10 rounds), so the CPU loop is compute-bound and split over torch's OpenMP threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

#include "philox.h"

namespace regdrop {

// Shared with the CUDA kernel (csrc/philox_words.cu).
void check_philox_words_args(const at::Tensor& index, int64_t seed_lo, int64_t seed_hi,
                             int64_t step, int64_t stream) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong,
                   "philox_words: index must be an int64 tensor, got ", index.scalar_type());
  const auto check_u32 = [](const char* name, int64_t value) {
    TORCH_CHECK_VALUE(value >= 0 && value <= INT64_C(0xFFFFFFFF), "philox_words: ", name,
                      " must be in [0, 2^32), got ", value);
  };
  check_u32("seed_lo", seed_lo);
  check_u32("seed_hi", seed_hi);
  check_u32("step", step);
  check_u32("stream", stream);
}

namespace {

at::Tensor philox_words_cpu(const at::Tensor& index, int64_t seed_lo, int64_t seed_hi,
                            int64_t step, int64_t stream) {
  check_philox_words_args(index, seed_lo, seed_hi, step, stream);
  const at::Tensor idx = index.contiguous();
  at::Tensor out = at::empty(idx.sizes(), idx.options());
  const int64_t* in_ptr = idx.const_data_ptr<int64_t>();
  int64_t* out_ptr = out.mutable_data_ptr<int64_t>();
  const uint64_t seed = (static_cast<uint64_t>(seed_hi) << 32) | static_cast<uint64_t>(seed_lo);
  const auto step32 = static_cast<uint32_t>(step);
  const auto stream32 = static_cast<uint32_t>(stream);
  at::parallel_for(0, idx.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out_ptr[i] = philox_word(seed, static_cast<uint64_t>(in_ptr[i]), step32, stream32);
    }
  });
  return out;
}

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_FRAGMENT(regdrop_fast, m) {
  m.def("philox_words(Tensor index, int seed_lo, int seed_hi, int step, int stream) -> Tensor");
}

TORCH_LIBRARY_IMPL(regdrop_fast, CPU, m) {
  m.impl("philox_words", &regdrop::philox_words_cpu);
}
