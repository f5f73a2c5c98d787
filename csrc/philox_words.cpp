// philox_words: the contract's uint32 Philox word (csrc/philox.h) for each int64 global element
// index, returned as int64. Schema, argument checks and the CPU kernel; csrc/philox_words_cuda.cu
// adds the CUDA kernel. Reads 8 B and writes 8 B per element; each element runs one Philox
// block (10 rounds), so the CPU loop is compute-bound and split over torch's OpenMP threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

#include "philox.h"

namespace regdrop {

namespace {

void check_u32(const char* op, const char* name, int64_t value) {
  TORCH_CHECK_VALUE(value >= 0 && value <= INT64_C(0xFFFFFFFF), op, ": ", name,
                    " must be in [0, 2^32), got ", value);
}

void check_key(const char* op, int64_t seed_lo, int64_t seed_hi, int64_t step, int64_t stream) {
  check_u32(op, "seed_lo", seed_lo);
  check_u32(op, "seed_hi", seed_hi);
  check_u32(op, "step", step);
  check_u32(op, "stream", stream);
}

}  // namespace

// Shared with the CUDA kernel (csrc/philox_words_cuda.cu).
void check_philox_words_args(const at::Tensor& index, int64_t seed_lo, int64_t seed_hi,
                             int64_t step, int64_t stream) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong,
                   "philox_words: index must be an int64 tensor, got ", index.scalar_type());
  check_key("philox_words", seed_lo, seed_hi, step, stream);
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

// Shared with the CUDA kernel: out is a contiguous bool tensor, threshold in [0, 2^32], and
// the kernels' last Philox block, (offset + numel + 3) / 4, fits in int64.
void check_philox_keep_args(const at::Tensor& out, int64_t offset, int64_t seed_lo,
                            int64_t seed_hi, int64_t step, int64_t stream, int64_t threshold) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kBool,
                   "philox_keep_: out must be a bool tensor, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.is_contiguous(), "philox_keep_: out must be contiguous");
  TORCH_CHECK_VALUE(offset >= 0 && offset <= INT64_MAX - 3 - out.numel(),
                    "philox_keep_: offset must be in [0, 2^63 - 4 - out.numel()] (numel ",
                    out.numel(), "), got ", offset);
  TORCH_CHECK_VALUE(threshold >= 0 && threshold <= INT64_C(0x100000000),
                    "philox_keep_: threshold must be in [0, 2^32], got ", threshold);
  check_key("philox_keep_", seed_lo, seed_hi, step, stream);
}

namespace {

// Keep decisions of elements offset .. offset+numel-1 without an index or word tensor: 1 B
// written per element, one Philox block per 4 elements.
void philox_keep_cpu(const at::Tensor& out, int64_t offset, int64_t seed_lo, int64_t seed_hi,
                     int64_t step, int64_t stream, int64_t threshold) {
  check_philox_keep_args(out, offset, seed_lo, seed_hi, step, stream, threshold);
  bool* out_ptr = out.mutable_data_ptr<bool>();
  const int64_t n = out.numel();
  const uint64_t seed = (static_cast<uint64_t>(seed_hi) << 32) | static_cast<uint64_t>(seed_lo);
  const auto step32 = static_cast<uint32_t>(step);
  const auto stream32 = static_cast<uint32_t>(stream);
  const auto limit = static_cast<uint64_t>(threshold);
  const int64_t first_block = offset >> 2;
  const int64_t last_block = (offset + n + 3) >> 2;
  at::parallel_for(first_block, last_block, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const PhiloxOut words = philox_block(seed, static_cast<uint64_t>(block) << 2, step32,
                                           stream32);
      for (int lane = 0; lane < 4; ++lane) {
        const int64_t i = (block << 2) + lane - offset;
        if (i >= 0 && i < n) {
          out_ptr[i] = words.w[lane] < limit;
        }
      }
    }
  });
}

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_FRAGMENT(regdrop_fast, m) {
  m.set_python_module("regdrop_fast._fake_ops");
  m.def("philox_words(Tensor index, int seed_lo, int seed_hi, int step, int stream) -> Tensor");
  m.def(
      "philox_keep_(Tensor(a!) out, int offset, int seed_lo, int seed_hi, int step, int stream, "
      "int threshold) -> ()");
}

TORCH_LIBRARY_IMPL(regdrop_fast, CPU, m) {
  m.impl("philox_words", &regdrop::philox_words_cpu);
  m.impl("philox_keep_", &regdrop::philox_keep_cpu);
}
