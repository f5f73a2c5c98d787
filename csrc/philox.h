// Philox4x32-10 with Triton's constants: the C++/CUDA side of the RNG contract
// (../shared/DESIGN.md). Header-only, __host__ __device__, no torch dependency, so the same
// code runs in the CPU kernels, the CUDA kernels and the plain-C++ ctest.
//
// Element i of stream s at step t: counter = (i/4 low 32, i/4 high 32, t, s), key = (seed low,
// seed high); the element takes output word i % 4. Keep iff word < floor(p * 2^32).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define REGDROP_HD __host__ __device__ __forceinline__
#else
#define REGDROP_HD inline
#endif

namespace regdrop {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

struct PhiloxOut {
  uint32_t w[4];
};

REGDROP_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds on counter (c0..c3) with key (k0, k1).
REGDROP_HD PhiloxOut philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                   uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old_c0 = c0;
    const uint32_t old_c2 = c2;
    c0 = mulhi32(kPhiloxRoundB, old_c2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, old_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * old_c2;
    c3 = kPhiloxRoundA * old_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return PhiloxOut{{c0, c1, c2, c3}};
}

// All four words of the counter holding global element index `index` (index/4).
REGDROP_HD PhiloxOut philox_block(uint64_t seed, uint64_t index, uint32_t step, uint32_t stream) {
  const uint64_t counter = index >> 2;
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), step,
                       stream, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The contract's word for one global element index.
REGDROP_HD uint32_t philox_word(uint64_t seed, uint64_t index, uint32_t step, uint32_t stream) {
  return philox_block(seed, index, step, stream).w[index & 3];
}

// floor(prob * 2^32) as a 64-bit threshold: prob = 1 gives 2^32, which keeps every word.
inline uint64_t keep_threshold(double prob) {
  return static_cast<uint64_t>(prob * 4294967296.0);
}

}  // namespace regdrop
