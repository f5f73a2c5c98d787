// Fused masked AdamW step on CPU (ChildTuning-F/-D, sparse masks): the op schema and its CPU
// kernel.
//
// Math: regdrop_fast/reference/masked_adamw.py (shared per-element code in masked_adamw.h).
// Memory per element (fp32 params): read p, g, m, v and write p, m, v = 28 B, the floor of any
// AdamW step; the F mask costs 0 B (Philox words generated in registers, one 10-round block
// per 4 elements), the D mask 1/8 B (a bit per element). Parallelism: every tensor of the list
// is cut into 32768-element chunks and one OpenMP loop runs all chunks of all tensors.
// Paths, picked per call (the build has no -march; REGDROP_FAST_CPU_ISA caps the choice):
// fp32 with AVX-512 runs one pass over groups of 32 elements whose keep decisions are one 32-bit
// word (the D word, or 8 Philox counters in one register); other dtypes and CPUs run blocks of
// 256 elements (keep factors into a stack array, then a loop the compiler vectorizes), compiled
// for AVX2+FMA (Philox words from AVX2 intrinsics) and for the baseline (a generic Philox loop).
// Each x86 path is kept for its measured gain (one thread, 110M parameters, against torch's fused
// AdamW): benchmarks/results/cpu-amd-epyc-2vcpu-2026-11-29-masked-adamw-isa.md.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "bitpack.h"
#include "masked_adamw.h"

namespace regdrop {
namespace {

#define REGDROP_INLINE inline __attribute__((always_inline))

constexpr int64_t kChunk = 32768;  // elements per parallel work item (a multiple of kBlock)
constexpr int kBlock = 256;        // elements whose keep factors are computed at once

struct Seg {
  int tensor;
  int64_t begin;
  int64_t end;
};

struct TensorArgs {
  void* p;
  const void* g;
  float* m;
  float* v;
  const int32_t* words;
  int kind;
  uint64_t offset;  // global flat index of local element 0 (Philox index and mask bit)
  uint32_t step;
  uint32_t stream;
  AdamScalars s;
};

struct GroupArgs {
  uint64_t seed;
  uint64_t threshold;
  float inv_p;
};

// Instruction-set levels of the paths; REGDROP_FAST_CPU_ISA caps the level so that tests can
// run every path on one machine. kIsaAvx512 is the fp32 one-pass kernel; other dtypes run the
// AVX2 block path there.
constexpr int kIsaDefault = 0;
constexpr int kIsaAvx2 = 1;
constexpr int kIsaAvx512 = 2;

// ---- Portable path (any dtype, any x86 level or other CPUs) --------------------------------
// Per block of kBlock elements: keep factors into a stack array, then the branch-free update
// loop, which the compiler vectorizes for the instruction set of the function it is inlined
// into (the baseline and AVX2 entry points below).

// Counters touched by one block (kBlock / 4 plus one for an unaligned start).
constexpr int kMaxCounters = kBlock / 4 + 1;
// The AVX2 words below come 16 counters at a time: room for the last, partly used, 16.
constexpr int kAvx2Counters = 16;
constexpr int kWordsCapacity =
    4 * ((kMaxCounters + kAvx2Counters - 1) / kAvx2Counters) * kAvx2Counters;

// Philox words of counters c_first .. c_first + n_counters - 1, interleaved: words[4*l + q] is
// output word q of counter c_first + l, i.e. the word of global index 4*(c_first + l) + q. The
// same arithmetic as philox4x32_10 in philox.h, one loop over counters with the rounds unrolled
// inside so that it vectorizes across counters.
REGDROP_INLINE void philox_words_generic(uint32_t* words, uint64_t c_first, int n_counters,
                                         uint64_t seed, uint32_t step, uint32_t stream) {
  const uint32_t seed_lo = static_cast<uint32_t>(seed);
  const uint32_t seed_hi = static_cast<uint32_t>(seed >> 32);
  const uint32_t first_lo = static_cast<uint32_t>(c_first);
  const uint32_t first_hi = static_cast<uint32_t>(c_first >> 32);
  for (int l = 0; l < n_counters; ++l) {
    // the 64-bit counter c_first + l in 32-bit halves: 32-bit lanes vectorize twice as wide
    uint32_t c0 = first_lo + static_cast<uint32_t>(l);
    uint32_t c1 = first_hi + (c0 < first_lo ? 1u : 0u);
    uint32_t c2 = step;
    uint32_t c3 = stream;
    uint32_t k0 = seed_lo;
    uint32_t k1 = seed_hi;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
      const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
      const uint32_t next0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
      const uint32_t next2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(prod_b);
      c3 = static_cast<uint32_t>(prod_a);
      c0 = next0;
      c2 = next2;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    words[4 * l + 0] = c0;
    words[4 * l + 1] = c1;
    words[4 * l + 2] = c2;
    words[4 * l + 3] = c3;
  }
}

#if defined(__x86_64__)
// The low halves of the four 64-bit lanes of v, in lane order.
__attribute__((target("avx2"))) REGDROP_INLINE __m128 low_halves(__m256i v) {
  const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  return _mm_castsi128_ps(_mm256_castsi256_si128(_mm256_permutevar8x32_epi32(v, even)));
}

// The same words (same layout) with AVX2: 16 counters at a time, four chains of 4 counters, one
// per 64-bit lane of a ymm register. _mm256_mul_epu32 multiplies the low halves of the lanes into
// full 64-bit products; the high halves of c0..c3 carry junk that no multiply reads, and the
// output takes the low halves only. Writes 4 * 16 * ceil(n_counters / 16) words (the caller's
// buffer holds kWordsCapacity). Kept because the compiler's vectorization of the generic loop
// (64-bit products of 32-bit lanes) is about half as fast at the same AVX2 level (see the
// results file named at the top). Not inlined (one call per block of kBlock elements): GCC
// will not force-inline an AVX2 function into the ISA-neutral helpers in between.
__attribute__((target("avx2"), noinline)) void philox_words_avx2(
    uint32_t* words, uint64_t c_first, int n_counters, uint64_t seed, uint32_t step,
    uint32_t stream) {
  constexpr int kChains = kAvx2Counters / 4;
  const __m256i round_a = _mm256_set1_epi64x(kPhiloxRoundA);
  const __m256i round_b = _mm256_set1_epi64x(kPhiloxRoundB);
  // round 0: c2 = step for every counter, so B * step is a constant
  const uint64_t prod_b0 = static_cast<uint64_t>(kPhiloxRoundB) * step;
  const __m256i hi_b0 = _mm256_set1_epi64x(static_cast<int64_t>(prod_b0 >> 32));
  const __m256i lo_b0 = _mm256_set1_epi64x(static_cast<int64_t>(prod_b0 & 0xFFFFFFFFu));
  const __m256i stream_v = _mm256_set1_epi64x(static_cast<int64_t>(stream));
  for (int base = 0; base < n_counters; base += kAvx2Counters) {
    __m256i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 4
    for (int k = 0; k < kChains; ++k) {
      const __m256i counter = _mm256_add_epi64(
          _mm256_set1_epi64x(static_cast<int64_t>(c_first + base + 4 * k)),
          _mm256_setr_epi64x(0, 1, 2, 3));
      const __m256i prod_a = _mm256_mul_epu32(counter, round_a);
      c0[k] = _mm256_xor_si256(_mm256_xor_si256(hi_b0, _mm256_srli_epi64(counter, 32)),
                               _mm256_set1_epi32(static_cast<int>(k0)));
      c2[k] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_a, 32), stream_v),
                               _mm256_set1_epi32(static_cast<int>(k1)));
      c1[k] = lo_b0;
      c3[k] = prod_a;
    }
#pragma GCC unroll 9
    for (int round = 1; round < 10; ++round) {
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
      const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
      for (int k = 0; k < kChains; ++k) {
        const __m256i prod_a = _mm256_mul_epu32(c0[k], round_a);
        const __m256i prod_b = _mm256_mul_epu32(c2[k], round_b);
        c0[k] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_b, 32), c1[k]), key0);
        c2[k] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(prod_a, 32), c3[k]), key1);
        c1[k] = prod_b;
        c3[k] = prod_a;
      }
    }
#pragma GCC unroll 4
    for (int k = 0; k < kChains; ++k) {
      // rows q = 0..3: word q of counters l = 0..3; transposed to counter-major order
      __m128 r0 = low_halves(c0[k]);
      __m128 r1 = low_halves(c1[k]);
      __m128 r2 = low_halves(c2[k]);
      __m128 r3 = low_halves(c3[k]);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      float* out = reinterpret_cast<float*>(words + 4 * (base + 4 * k));
      _mm_storeu_ps(out, r0);
      _mm_storeu_ps(out + 4, r1);
      _mm_storeu_ps(out + 8, r2);
      _mm_storeu_ps(out + 12, r3);
    }
  }
}
#endif

// Keep factors of global indices [first, first + n): one Philox block per 4 indices.
template <int kIsa>
REGDROP_INLINE void philox_factors(float* factor, uint64_t first, int n, uint64_t seed,
                                   uint32_t step, uint32_t stream, uint64_t threshold,
                                   float scale) {
  // threshold is at most 2^32 (keep everything): compare in 32 bits
  if (threshold > 0xFFFFFFFFull) {
    for (int j = 0; j < n; ++j) factor[j] = scale;
    return;
  }
  alignas(64) uint32_t words[kWordsCapacity];
  const uint64_t c_first = first >> 2;
  const int n_counters = static_cast<int>(((first + n - 1) >> 2) - c_first + 1);
#if defined(__x86_64__)
  if constexpr (kIsa >= kIsaAvx2) {
    philox_words_avx2(words, c_first, n_counters, seed, step, stream);
  } else {
    philox_words_generic(words, c_first, n_counters, seed, step, stream);
  }
#else
  philox_words_generic(words, c_first, n_counters, seed, step, stream);
#endif
  const uint32_t thr = static_cast<uint32_t>(threshold);
  const int skip = static_cast<int>(first & 3);
  for (int j = 0; j < n; ++j) factor[j] = words[skip + j] < thr ? scale : 0.0f;
}

// Keep factors from the bit mask: whole words when the block starts on a word boundary (the
// usual case: offsets and block starts are multiples of 32), bit by bit otherwise.
REGDROP_INLINE void bit_factors(float* factor, const int32_t* words, uint64_t first, int n) {
  if ((first & 31) == 0 && (n & 31) == 0) {
    const int32_t* w = words + (first >> 5);
    for (int k = 0; k < n / 32; ++k) {
      const uint32_t word = static_cast<uint32_t>(w[k]);
      for (int bit = 0; bit < 32; ++bit) factor[32 * k + bit] = static_cast<float>((word >> bit) & 1u);
    }
    return;
  }
  for (int j = 0; j < n; ++j) factor[j] = mask_bit(words, first + j) ? 1.0f : 0.0f;
}

// sq = sqrt(x) for n <= kBlock values; SSE intrinsics because a plain sqrtf loop is not
// vectorized without -fno-math-errno (the shared build flags do not have it).
REGDROP_INLINE void sqrt_block(const float* x, float* sq, int n) {
  int j = 0;
#if defined(__x86_64__)
  for (; j + 4 <= n; j += 4) _mm_store_ps(sq + j, _mm_sqrt_ps(_mm_load_ps(x + j)));
#endif
  for (; j < n; ++j) sq[j] = std::sqrt(x[j]);
}

template <typename T>
REGDROP_INLINE float load_f(const T* x, int64_t i) {
  return static_cast<float>(x[i]);
}

template <typename T>
REGDROP_INLINE void store_f(T* x, int64_t i, float value) {
  x[i] = static_cast<T>(value);
}

template <typename T, int kIsa, bool kPaper, int kAction>
REGDROP_INLINE void run_segment(const TensorArgs& t, const GroupArgs& grp, int64_t begin, int64_t end) {
  T* p = static_cast<T*>(t.p);
  const T* g = static_cast<const T*>(t.g);
  float* m = t.m;
  float* v = t.v;
  const AdamScalars s = t.s;
  alignas(64) float factor[kBlock];
  alignas(64) float m1[kBlock];
  alignas(64) float v1[kBlock];
  alignas(64) float sq[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, end - b));
    const uint64_t first = t.offset + static_cast<uint64_t>(b);
    if (t.kind == kMaskPhilox) {
      philox_factors<kIsa>(factor, first, n, grp.seed, t.step, t.stream, grp.threshold, grp.inv_p);
    } else if (t.kind == kMaskBits) {
      bit_factors(factor, t.words, first, n);
    } else {
      for (int j = 0; j < n; ++j) factor[j] = 1.0f;
    }
    T* pb = p + b;
    const T* gb = g + b;
    float* mb = m + b;
    float* vb = v + b;
    for (int j = 0; j < n; ++j) {
      adam_moments<kAction>(load_f(gb, j), mb[j], vb[j], factor[j], s, m1[j], v1[j]);
    }
    sqrt_block(v1, sq, n);
    for (int j = 0; j < n; ++j) {
      const bool keep = factor[j] != 0.0f;
      store_f(pb, j, adam_param<kPaper, kAction>(load_f(pb, j), m1[j], sq[j], factor[j], keep, s));
      if (kAction == kPrune) {
        mb[j] = keep ? m1[j] : mb[j];
        vb[j] = keep ? v1[j] : vb[j];
      } else {
        mb[j] = m1[j];
        vb[j] = v1[j];
      }
    }
  }
}

// One work item: picks the (semantics, action) instantiation; everything it calls is
// force-inlined so the vectorized loops get the caller's instruction set.
template <typename T, int kIsa>
REGDROP_INLINE void run_segment_any(int paper, int action, const TensorArgs& t,
                                    const GroupArgs& grp, int64_t begin, int64_t end) {
  if (paper) {
    if (action == kDropGrad) run_segment<T, kIsa, true, kDropGrad>(t, grp, begin, end);
    else if (action == kDropUpdate) run_segment<T, kIsa, true, kDropUpdate>(t, grp, begin, end);
    else run_segment<T, kIsa, true, kPrune>(t, grp, begin, end);
  } else {
    if (action == kDropGrad) run_segment<T, kIsa, false, kDropGrad>(t, grp, begin, end);
    else if (action == kDropUpdate) run_segment<T, kIsa, false, kDropUpdate>(t, grp, begin, end);
    else run_segment<T, kIsa, false, kPrune>(t, grp, begin, end);
  }
}

// The build has no -march: one entry point per (dtype, level), picked at run time.
#define REGDROP_SEGMENT_FNS(T, suffix)                                                        \
  void segment_##suffix##_default(int paper, int action, const TensorArgs& t,                 \
                                  const GroupArgs& grp, int64_t begin, int64_t end) {         \
    run_segment_any<T, kIsaDefault>(paper, action, t, grp, begin, end);                       \
  }                                                                                           \
  REGDROP_X86_TARGET("avx2,fma")                                                              \
  void segment_##suffix##_avx2(int paper, int action, const TensorArgs& t,                    \
                               const GroupArgs& grp, int64_t begin, int64_t end) {            \
    run_segment_any<T, kIsaAvx2>(paper, action, t, grp, begin, end);                          \
  }

#if defined(__x86_64__)
#define REGDROP_X86_TARGET(isa) __attribute__((target(isa)))
#else
#define REGDROP_X86_TARGET(isa)
#endif

REGDROP_SEGMENT_FNS(float, f32)
REGDROP_SEGMENT_FNS(c10::BFloat16, bf16)
REGDROP_SEGMENT_FNS(c10::Half, f16)

#if defined(__x86_64__)
// ---- fp32 with AVX-512: one pass, keep decisions generated in registers -------------------
// Elements go in groups of 32 that start at global indices 32k (a group's keep decisions are
// one 32-bit word: a D mask word, or the Philox words of 8 counters); the first group of a
// segment may start inside such a word and the last may end early (lane masks).
#define REGDROP_AVX512 __attribute__((target("avx512f,bmi2")))

// Per-step Philox constants: everything but the counter is fixed within a tensor.
struct PhiloxConsts {
  uint32_t keys[20];  // (k0, k1) of each round
  __m512i hi_b0;      // round 0: c2 = step for every counter, so B * step is a constant
  __m512i lo_b0;
  __m512i stream;
  __m512i thr;
};

REGDROP_AVX512 inline void philox_consts(PhiloxConsts& pc, uint64_t seed, uint32_t step,
                                         uint32_t stream, uint64_t threshold) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    pc.keys[2 * round] = k0;
    pc.keys[2 * round + 1] = k1;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * step;
  pc.hi_b0 = _mm512_set1_epi64(static_cast<int64_t>(prod_b >> 32));
  pc.lo_b0 = _mm512_set1_epi64(static_cast<int64_t>(prod_b & 0xFFFFFFFFu));
  pc.stream = _mm512_set1_epi64(static_cast<int64_t>(stream));
  pc.thr = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(threshold)));
}

// Keep words of kGroups consecutive 32-element groups ("a batch"): word k holds the keep bits of
// global indices 4*c_first + 32k .. + 31 (bit j = index 4*c_first + 32k + j). Each group is
// Philox of 8 counters, one per 64-bit lane. _mm512_mul_epu32 multiplies the low halves of the
// lanes into full 64-bit products, so a round is two multiplies, two shifts and two three-way
// xors; the high halves of c0..c3 carry junk that no multiply or compare reads.
// Why batches, and why rounds one at a time (on an EPYC Zen 4; numbers in the results file named
// at the top): one group is a chain of 10 dependent rounds whose ~60 vector ops fill the
// scheduler, so four independent chains side by side keep the vector pipes busy; and the Adam
// math is bound by the divide/sqrt unit, so a batch computed in one piece and then the Adam of
// its elements would run one after the other. The segment loop therefore runs one round of the
// next batch after each 16 elements of Adam (software pipelining). Force-inlined: called
// through memory, the batch's 16 registers would be stored and reloaded every round.
constexpr int kGroups = 4;
constexpr int kRounds = 10;

struct PhiloxBatch {
  __m512i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  int next_round;  // rounds 0 .. next_round - 1 are done
};

// Round 0 of the batch whose first counter is c_first.
REGDROP_AVX512 REGDROP_INLINE void philox_batch_start(PhiloxBatch& b, uint64_t c_first,
                                                      const PhiloxConsts& pc) {
  const __m512i round_a = _mm512_set1_epi64(kPhiloxRoundA);
#pragma GCC unroll 4
  for (int k = 0; k < kGroups; ++k) {
    const __m512i counter =
        _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(c_first + 8 * k)),
                         _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
    const __m512i prod_a = _mm512_mul_epu32(counter, round_a);
    b.c0[k] = _mm512_ternarylogic_epi32(pc.hi_b0, _mm512_srli_epi64(counter, 32),
                                        _mm512_set1_epi32(static_cast<int>(pc.keys[0])), 0x96);
    b.c2[k] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(prod_a, 32), pc.stream,
                                        _mm512_set1_epi32(static_cast<int>(pc.keys[1])), 0x96);
    b.c1[k] = pc.lo_b0;
    b.c3[k] = prod_a;
  }
  b.next_round = 1;
}

// The next round of the batch, if any is left.
REGDROP_AVX512 REGDROP_INLINE void philox_batch_round(PhiloxBatch& b, const PhiloxConsts& pc) {
  if (b.next_round >= kRounds) return;
  const int round = b.next_round++;
  const __m512i round_a = _mm512_set1_epi64(kPhiloxRoundA);
  const __m512i round_b = _mm512_set1_epi64(kPhiloxRoundB);
  const __m512i key0 = _mm512_set1_epi32(static_cast<int>(pc.keys[2 * round]));
  const __m512i key1 = _mm512_set1_epi32(static_cast<int>(pc.keys[2 * round + 1]));
#pragma GCC unroll 4
  for (int k = 0; k < kGroups; ++k) {
    const __m512i prod_a = _mm512_mul_epu32(b.c0[k], round_a);
    const __m512i prod_b = _mm512_mul_epu32(b.c2[k], round_b);
    b.c0[k] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(prod_b, 32), b.c1[k], key0, 0x96);
    b.c2[k] = _mm512_ternarylogic_epi32(_mm512_srli_epi64(prod_a, 32), b.c3[k], key1, 0x96);
    b.c1[k] = prod_b;
    b.c3[k] = prod_a;
  }
}

// Runs the rounds left, then the batch's kGroups keep words.
REGDROP_AVX512 REGDROP_INLINE void philox_batch_finish(PhiloxBatch& b, uint32_t* words,
                                                       const PhiloxConsts& pc) {
  while (b.next_round < kRounds) philox_batch_round(b, pc);
#pragma GCC unroll 4
  for (int k = 0; k < kGroups; ++k) {
    // word q of counter l is the low half of lane l of c_q: bit 2l of its compare mask
    const uint32_t k0 = _mm512_mask_cmplt_epu32_mask(0x5555, b.c0[k], pc.thr);
    const uint32_t k1 = _mm512_mask_cmplt_epu32_mask(0x5555, b.c1[k], pc.thr);
    const uint32_t k2 = _mm512_mask_cmplt_epu32_mask(0x5555, b.c2[k], pc.thr);
    const uint32_t k3 = _mm512_mask_cmplt_epu32_mask(0x5555, b.c3[k], pc.thr);
    // bit 2l+q of (k0 | k1 << 1) goes to bit 4l+q: the (2l+q)-th set bit of 0x33333333
    words[k] = _pdep_u32(k0 | (k1 << 1), 0x33333333u) | _pdep_u32(k2 | (k3 << 1), 0xCCCCCCCCu);
  }
}

struct AdamVec {
  __m512 beta1, beta2, omb1, omb2, eps, lr_wd, decay, step_size, bc2_sqrt, scale;
};

// 16 elements at i (lanes: which exist); keep: lane mask of kept elements.
template <bool kPaper, int kAction, int kKind, bool kFull>
REGDROP_AVX512 inline void adam16(float* p, const float* g, float* m, float* v, int64_t i,
                                  __mmask16 lanes, __mmask16 keep, const AdamVec& c) {
  const __m512 factor = _mm512_maskz_mov_ps(keep, c.scale);
  const __m512 p0 = kFull ? _mm512_loadu_ps(p + i) : _mm512_maskz_loadu_ps(lanes, p + i);
  __m512 gv = kFull ? _mm512_loadu_ps(g + i) : _mm512_maskz_loadu_ps(lanes, g + i);
  const __m512 m0 = kFull ? _mm512_loadu_ps(m + i) : _mm512_maskz_loadu_ps(lanes, m + i);
  const __m512 v0 = kFull ? _mm512_loadu_ps(v + i) : _mm512_maskz_loadu_ps(lanes, v + i);
  if (kAction == kDropGrad && kKind != kMaskNone) gv = _mm512_mul_ps(gv, factor);
  __m512 m1 = _mm512_add_ps(_mm512_mul_ps(c.beta1, m0), _mm512_mul_ps(c.omb1, gv));
  __m512 v1 = _mm512_add_ps(_mm512_mul_ps(c.beta2, v0), _mm512_mul_ps(_mm512_mul_ps(c.omb2, gv), gv));
  const __m512 sq = _mm512_sqrt_ps(v1);
  __m512 p1;
  if (kPaper) {
    p1 = _mm512_sub_ps(p0, _mm512_mul_ps(c.step_size, _mm512_div_ps(m1, _mm512_add_ps(sq, c.eps))));
    p1 = _mm512_sub_ps(p1, _mm512_mul_ps(c.lr_wd, p1));
  } else {
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(sq, c.bc2_sqrt), c.eps);
    p1 = _mm512_sub_ps(_mm512_mul_ps(p0, c.decay), _mm512_mul_ps(c.step_size, _mm512_div_ps(m1, denom)));
  }
  if (kAction == kDropUpdate && kKind != kMaskNone) {
    p1 = _mm512_add_ps(p0, _mm512_mul_ps(factor, _mm512_sub_ps(p1, p0)));
  } else if (kAction == kPrune) {
    p1 = _mm512_maskz_mov_ps(keep, p1);
    m1 = _mm512_mask_blend_ps(keep, m0, m1);
    v1 = _mm512_mask_blend_ps(keep, v0, v1);
  }
  if (kFull) {
    _mm512_storeu_ps(p + i, p1);
    _mm512_storeu_ps(m + i, m1);
    _mm512_storeu_ps(v + i, v1);
  } else {
    _mm512_mask_storeu_ps(p + i, lanes, p1);
    _mm512_mask_storeu_ps(m + i, lanes, m1);
    _mm512_mask_storeu_ps(v + i, lanes, v1);
  }
}

template <bool kPaper, int kAction, int kKind>
REGDROP_AVX512 void segment_f32_fused_impl(const TensorArgs& t, const GroupArgs& grp,
                                          int64_t begin, int64_t end) {
  float* p = static_cast<float*>(t.p);
  const float* g = static_cast<const float*>(t.g);
  const AdamVec c{_mm512_set1_ps(t.s.beta1),     _mm512_set1_ps(t.s.beta2),
                  _mm512_set1_ps(t.s.one_minus_beta1), _mm512_set1_ps(t.s.one_minus_beta2),
                  _mm512_set1_ps(t.s.eps),       _mm512_set1_ps(t.s.lr_wd),
                  _mm512_set1_ps(t.s.decay),     _mm512_set1_ps(t.s.step_size),
                  _mm512_set1_ps(t.s.bc2_sqrt),
                  _mm512_set1_ps(kKind == kMaskPhilox ? grp.inv_p : 1.0f)};
  const bool keep_all = kKind == kMaskNone || (kKind == kMaskPhilox && grp.threshold > 0xFFFFFFFFull);
  PhiloxConsts pc;
  if (kKind == kMaskPhilox) philox_consts(pc, grp.seed, t.step, t.stream, grp.threshold);
  // Philox: words[k] is the keep word of group words_first + k (a group = 32 global indices);
  // `ahead` is the batch after it, advanced one round per 16 elements of Adam.
  uint32_t words[kGroups];
  uint64_t words_first = 0;
  bool have_words = false;
  PhiloxBatch ahead;
  ahead.next_round = kRounds;  // nothing to advance until a batch starts (never, if keep_all)
  int64_t i = begin;
  while (i < end) {
    const uint64_t global = t.offset + static_cast<uint64_t>(i);
    const int shift = static_cast<int>(global & 31);
    const uint64_t group = global - shift;  // first global index of the 32-bit keep word
    uint32_t bits = 0xFFFFFFFFu;
    if (!keep_all && kKind == kMaskBits) bits = static_cast<uint32_t>(t.words[group >> 5]);
    if (!keep_all && kKind == kMaskPhilox) {
      const uint64_t word_index = group >> 5;  // groups only move forward within a segment
      if (!have_words || word_index >= words_first + kGroups) {
        const bool pipelined = have_words && word_index == words_first + kGroups;
        if (!pipelined) philox_batch_start(ahead, group >> 2, pc);  // first batch of the segment
        philox_batch_finish(ahead, words, pc);
        words_first = word_index;
        have_words = true;
        philox_batch_start(ahead, (group >> 2) + 8 * kGroups, pc);
      }
      bits = words[word_index - words_first];
    }
    bits >>= shift;
    const int64_t n = std::min<int64_t>(32 - shift, end - i);
    if (n == 32) {
      adam16<kPaper, kAction, kKind, true>(p, g, t.m, t.v, i, 0xFFFF, bits & 0xFFFF, c);
      if (kKind == kMaskPhilox) philox_batch_round(ahead, pc);
      adam16<kPaper, kAction, kKind, true>(p, g, t.m, t.v, i + 16, 0xFFFF, bits >> 16, c);
      if (kKind == kMaskPhilox) philox_batch_round(ahead, pc);
    } else {
      const uint32_t lanes = (n == 32 ? 0u : (1u << n)) - 1u;
      adam16<kPaper, kAction, kKind, false>(p, g, t.m, t.v, i, lanes & 0xFFFF, bits & 0xFFFF, c);
      if (kKind == kMaskPhilox) philox_batch_round(ahead, pc);
      if (n > 16) {
        adam16<kPaper, kAction, kKind, false>(p, g, t.m, t.v, i + 16, lanes >> 16, bits >> 16, c);
        if (kKind == kMaskPhilox) philox_batch_round(ahead, pc);
      }
    }
    i += n;
  }
}

template <bool kPaper, int kAction>
void segment_f32_fused_kind(const TensorArgs& t, const GroupArgs& grp, int64_t begin, int64_t end) {
  if (t.kind == kMaskPhilox) segment_f32_fused_impl<kPaper, kAction, kMaskPhilox>(t, grp, begin, end);
  else if (t.kind == kMaskBits) segment_f32_fused_impl<kPaper, kAction, kMaskBits>(t, grp, begin, end);
  else segment_f32_fused_impl<kPaper, kAction, kMaskNone>(t, grp, begin, end);
}

void segment_f32_fused(int paper, int action, const TensorArgs& t, const GroupArgs& grp,
                       int64_t begin, int64_t end) {
  if (paper) {
    if (action == kDropGrad) segment_f32_fused_kind<true, kDropGrad>(t, grp, begin, end);
    else if (action == kDropUpdate) segment_f32_fused_kind<true, kDropUpdate>(t, grp, begin, end);
    else segment_f32_fused_kind<true, kPrune>(t, grp, begin, end);
  } else {
    if (action == kDropGrad) segment_f32_fused_kind<false, kDropGrad>(t, grp, begin, end);
    else if (action == kDropUpdate) segment_f32_fused_kind<false, kDropUpdate>(t, grp, begin, end);
    else segment_f32_fused_kind<false, kPrune>(t, grp, begin, end);
  }
}
#endif

using SegmentFn = void (*)(int, int, const TensorArgs&, const GroupArgs&, int64_t, int64_t);

void run_all(SegmentFn fn, int paper, int action, const std::vector<TensorArgs>& tensors,
             const std::vector<Seg>& segs, const GroupArgs& grp) {
  const int64_t n_segs = static_cast<int64_t>(segs.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t k = 0; k < n_segs; ++k) {
    const Seg& seg = segs[k];
    fn(paper, action, tensors[seg.tensor], grp, seg.begin, seg.end);
  }
}

// The best level this CPU runs, capped by REGDROP_FAST_CPU_ISA=avx512|avx2|default (read on
// every call, so tests can switch paths).
int isa_level() {
  int level = kIsaDefault;
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = kIsaAvx2;
  // the one-pass kernel's instruction sets (REGDROP_AVX512)
  if (level == kIsaAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("bmi2")) {
    level = kIsaAvx512;
  }
#endif
  const char* cap = std::getenv("REGDROP_FAST_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return level;
  const std::string name(cap);
  int cap_level = -1;
  if (name == "avx512") cap_level = kIsaAvx512;
  if (name == "avx2") cap_level = kIsaAvx2;
  if (name == "default") cap_level = kIsaDefault;
  TORCH_CHECK(cap_level >= 0, "REGDROP_FAST_CPU_ISA must be avx512, avx2 or default, got '",
              name, "'");
  return std::min(level, cap_level);
}

}  // namespace

// Every argument the CPU and CUDA kernels index with or convert, checked before any memory is
// touched (shared with csrc/masked_adamw_cuda.cu and the meta kernel). `device_type` is the
// device the dispatcher chose; every tensor must be on the device of params[0].
void check_masked_adamw_args(at::TensorList params, at::TensorList grads,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                             at::TensorList masks, at::IntArrayRef mask_kinds,
                             at::IntArrayRef steps, at::IntArrayRef index_offsets,
                             at::IntArrayRef streams, at::ArrayRef<double> step_sizes,
                             at::ArrayRef<double> bc2_sqrts, int64_t seed_lo, int64_t seed_hi,
                             double reserve_p, int64_t action, c10::DeviceType device_type) {
  const size_t n = params.size();
  const auto check_len = [n](const char* name, size_t size) {
    TORCH_CHECK_VALUE(size == n, "masked_adamw_: ", name, " must have ", n,
                      " entries (one per param), got ", size);
  };
  check_len("grads", grads.size());
  check_len("exp_avgs", exp_avgs.size());
  check_len("exp_avg_sqs", exp_avg_sqs.size());
  check_len("masks", masks.size());
  check_len("mask_kinds", mask_kinds.size());
  check_len("steps", steps.size());
  check_len("index_offsets", index_offsets.size());
  check_len("streams", streams.size());
  check_len("step_sizes", step_sizes.size());
  check_len("bc2_sqrts", bc2_sqrts.size());
  TORCH_CHECK_VALUE(action >= kDropGrad && action <= kPrune,
                    "masked_adamw_: action must be 0..2, got ", action);
  const auto check_u32 = [](const char* name, int64_t value) {
    TORCH_CHECK_VALUE(value >= 0 && value <= INT64_C(0xFFFFFFFF), "masked_adamw_: ", name,
                      " must be in [0, 2^32), got ", value);
  };
  check_u32("seed_lo", seed_lo);
  check_u32("seed_hi", seed_hi);
  // 1/reserve_p and floor(reserve_p * 2^32) are computed from it
  TORCH_CHECK_VALUE(reserve_p > 0.0 && reserve_p <= 1.0,
                    "masked_adamw_: reserve_p must be in (0, 1], got ", reserve_p);
  if (n == 0) return;
  const c10::Device device = params[0].device();
  TORCH_CHECK_VALUE(device.type() == device_type, "masked_adamw_: params[0] must be on a ",
                    device_type, " device, got ", device);
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "masked_adamw_: params must be float32, bfloat16 or float16, got ", dtype);
  const auto check_tensor = [&](const char* name, size_t i, const at::Tensor& t,
                                at::ScalarType want, int64_t numel) {
    TORCH_CHECK_VALUE(t.defined(), "masked_adamw_: ", name, "[", i, "] is undefined");
    TORCH_CHECK_TYPE(t.scalar_type() == want, "masked_adamw_: ", name, "[", i,
                     "] must have dtype ", want, ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == device, "masked_adamw_: ", name, "[", i, "] must be on ",
                      device, " (the device of params[0]), got ", t.device());
    TORCH_CHECK_VALUE(t.is_contiguous(), "masked_adamw_: ", name, "[", i,
                      "] must be contiguous");
    TORCH_CHECK_VALUE(numel < 0 || t.numel() == numel, "masked_adamw_: ", name, "[", i,
                      "] must have ", numel, " elements (the param's numel), got ", t.numel());
  };
  for (size_t i = 0; i < n; ++i) {
    check_tensor("params", i, params[i], dtype, -1);
    const int64_t numel = params[i].numel();
    check_tensor("grads", i, grads[i], dtype, numel);
    check_tensor("exp_avgs", i, exp_avgs[i], at::kFloat, numel);
    check_tensor("exp_avg_sqs", i, exp_avg_sqs[i], at::kFloat, numel);
    const int64_t kind = mask_kinds[i];
    TORCH_CHECK_VALUE(kind >= kMaskNone && kind <= kMaskBits, "masked_adamw_: mask_kinds[", i,
                      "] must be 0 (none), 1 (philox) or 2 (bits), got ", kind);
    TORCH_CHECK_VALUE(steps[i] >= 0 && steps[i] <= INT64_C(0xFFFFFFFF), "masked_adamw_: steps[",
                      i, "] must be in [0, 2^32), got ", steps[i]);
    TORCH_CHECK_VALUE(streams[i] >= 0 && streams[i] <= INT64_C(0xFFFFFFFF),
                      "masked_adamw_: streams[", i, "] must be in [0, 2^32), got ", streams[i]);
    const int64_t offset = index_offsets[i];
    // offset + numel is the first index past the tensor: it must not overflow int64
    TORCH_CHECK_VALUE(offset >= 0 && offset <= INT64_MAX - numel, "masked_adamw_: index_offsets[",
                      i, "] must be in [0, 2^63 - numel] (numel ", numel, "), got ", offset);
    if (kind == kMaskBits) {
      check_tensor("masks", i, masks[i], at::kInt, -1);
      const int64_t end = offset + numel;  // <= INT64_MAX: num_words(end) could overflow
      const int64_t words_needed = end / kBitsPerWord + (end % kBitsPerWord != 0 ? 1 : 0);
      TORCH_CHECK_VALUE(masks[i].numel() >= words_needed, "masked_adamw_: masks[", i,
                        "] must hold bits index_offsets[i] .. index_offsets[i] + numel, i.e. >= ",
                        words_needed, " int32 words, got ", masks[i].numel());
    }
  }
}

// The capturable form's arguments (steps: one-element float32 step counts, lr: a one-element
// float32/float64 tensor, all on the device of params[0]) plus everything the plain form checks.
void check_masked_adamw_capturable_args(at::TensorList params, at::TensorList grads,
                                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                        at::TensorList masks, at::IntArrayRef mask_kinds,
                                        at::TensorList steps, at::IntArrayRef index_offsets,
                                        at::IntArrayRef streams, const at::Tensor& lr,
                                        int64_t seed_lo, int64_t seed_hi, double reserve_p,
                                        int64_t action, c10::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(steps.size() == n, "masked_adamw_capturable_: steps must have ", n,
                    " entries (one per param), got ", steps.size());
  // the step counts are tensors here: placeholders for the plain form's host scalars
  const std::vector<int64_t> no_steps(n, 0);
  const std::vector<double> ones(n, 1.0);
  check_masked_adamw_args(params, grads, exp_avgs, exp_avg_sqs, masks, mask_kinds, no_steps,
                          index_offsets, streams, ones, ones, seed_lo, seed_hi, reserve_p,
                          action, device_type);
  TORCH_CHECK_VALUE(lr.defined() && lr.numel() == 1, "masked_adamw_capturable_: lr must be a "
                    "one-element tensor");
  TORCH_CHECK_TYPE(lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble,
                   "masked_adamw_capturable_: lr must be float32 or float64, got ",
                   lr.scalar_type());
  if (n == 0) return;
  const c10::Device device = params[0].device();
  TORCH_CHECK_VALUE(lr.device() == device, "masked_adamw_capturable_: lr must be on ", device,
                    " (the device of params[0]), got ", lr.device());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = steps[i];
    TORCH_CHECK_VALUE(t.defined() && t.numel() == 1, "masked_adamw_capturable_: steps[", i,
                      "] must be a one-element tensor");
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "masked_adamw_capturable_: steps[", i,
                     "] must be float32 (as torch.optim.AdamW keeps it), got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == device, "masked_adamw_capturable_: steps[", i,
                      "] must be on ", device, " (the device of params[0]), got ", t.device());
  }
}

namespace {

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList masks,
                      at::IntArrayRef mask_kinds, at::IntArrayRef steps,
                      at::IntArrayRef index_offsets, at::IntArrayRef streams,
                      at::ArrayRef<double> step_sizes, at::ArrayRef<double> bc2_sqrts,
                      double beta1, double beta2, double eps, double lr_wd, int64_t seed_lo,
                      int64_t seed_hi, double reserve_p, int64_t action, bool paper) {
  check_masked_adamw_args(params, grads, exp_avgs, exp_avg_sqs, masks, mask_kinds, steps,
                          index_offsets, streams, step_sizes, bc2_sqrts, seed_lo, seed_hi,
                          reserve_p, action, c10::DeviceType::CPU);
  const size_t n = params.size();
  if (n == 0) return;
  const at::ScalarType dtype = params[0].scalar_type();
  std::vector<TensorArgs> tensors(n);
  std::vector<Seg> segs;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const int kind = static_cast<int>(mask_kinds[i]);
    TensorArgs& t = tensors[i];
    t.p = p.data_ptr();
    t.g = grads[i].data_ptr();
    t.m = exp_avgs[i].data_ptr<float>();
    t.v = exp_avg_sqs[i].data_ptr<float>();
    t.words = kind == kMaskBits ? masks[i].data_ptr<int32_t>() : nullptr;
    t.kind = kind;
    t.offset = static_cast<uint64_t>(index_offsets[i]);
    t.step = static_cast<uint32_t>(steps[i]);
    t.stream = static_cast<uint32_t>(streams[i]);
    t.s = AdamScalars{static_cast<float>(beta1),        static_cast<float>(beta2),
                      static_cast<float>(1.0 - beta1),  static_cast<float>(1.0 - beta2),
                      static_cast<float>(eps),          static_cast<float>(lr_wd),
                      static_cast<float>(1.0 - lr_wd),  static_cast<float>(step_sizes[i]),
                      static_cast<float>(bc2_sqrts[i])};
    for (int64_t b = 0; b < p.numel(); b += kChunk) {
      segs.push_back(Seg{static_cast<int>(i), b, std::min<int64_t>(b + kChunk, p.numel())});
    }
  }
  const GroupArgs grp{(static_cast<uint64_t>(seed_hi) << 32) | static_cast<uint32_t>(seed_lo),
                      keep_threshold(reserve_p), static_cast<float>(1.0 / reserve_p)};
  const int paper_i = paper ? 1 : 0;
  const int action_i = static_cast<int>(action);
  const int isa = isa_level();
  SegmentFn fn = nullptr;
  switch (dtype) {
    case at::kFloat:
      fn = isa >= kIsaAvx2 ? &segment_f32_avx2 : &segment_f32_default;
#if defined(__x86_64__)
      if (isa == kIsaAvx512) fn = &segment_f32_fused;
#endif
      break;
    case at::kBFloat16:
      fn = isa >= kIsaAvx2 ? &segment_bf16_avx2 : &segment_bf16_default;
      break;
    case at::kHalf:
      fn = isa >= kIsaAvx2 ? &segment_f16_avx2 : &segment_f16_default;
      break;
    default:
      TORCH_CHECK(false, "masked_adamw_: params must be float32, bfloat16 or float16, got ",
                  dtype);
  }
  run_all(fn, paper_i, action_i, tensors, segs, grp);
}

// On CPU the step counts and lr are read on the host (no device to synchronize with), then the
// plain kernel runs with the bias corrections of regdrop_fast.reference.masked_adamw.step_scalars
// (the same libm pow, so the same scalars as the host-step path).
void masked_adamw_capturable_cpu(at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                 at::TensorList masks, at::IntArrayRef mask_kinds,
                                 at::TensorList steps, at::IntArrayRef index_offsets,
                                 at::IntArrayRef streams, const at::Tensor& lr, double beta1,
                                 double beta2, double eps, double weight_decay, int64_t seed_lo,
                                 int64_t seed_hi, double reserve_p, int64_t action, bool paper) {
  check_masked_adamw_capturable_args(params, grads, exp_avgs, exp_avg_sqs, masks, mask_kinds,
                                     steps, index_offsets, streams, lr, seed_lo, seed_hi,
                                     reserve_p, action, c10::DeviceType::CPU);
  const size_t n = params.size();
  const double lr_value = lr.item<double>();
  std::vector<int64_t> counts(n);
  std::vector<double> step_sizes(n), bc2_sqrts(n);
  for (size_t i = 0; i < n; ++i) {
    const double t = steps[i].item<double>();
    TORCH_CHECK_VALUE(t >= 0.0 && t <= 4294967295.0 && t == std::floor(t),
                      "masked_adamw_capturable_: steps[", i,
                      "] must hold an integer in [0, 2^32), got ", t);
    counts[i] = static_cast<int64_t>(t);
    const double bc1 = 1.0 - std::pow(beta1, t);
    const double bc2 = 1.0 - std::pow(beta2, t);
    step_sizes[i] = paper ? lr_value * std::sqrt(bc2) / bc1 : lr_value / bc1;
    bc2_sqrts[i] = paper ? 1.0 : std::sqrt(bc2);
  }
  masked_adamw_cpu(params, grads, exp_avgs, exp_avg_sqs, masks, mask_kinds, counts,
                   index_offsets, streams, step_sizes, bc2_sqrts, beta1, beta2, eps,
                   lr_value * weight_decay, seed_lo, seed_hi, reserve_p, action, paper);
}

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_FRAGMENT(regdrop_fast, m) {
  m.set_python_module("regdrop_fast._fake_ops");
  m.def(
      "masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor[] masks, int[] mask_kinds, int[] steps, "
      "int[] index_offsets, int[] streams, float[] step_sizes, float[] bc2_sqrts, float beta1, "
      "float beta2, float eps, float lr_wd, int seed_lo, int seed_hi, float reserve_p, "
      "int action, bool paper) -> ()");
  // torch.optim.AdamW's capturable=True: step counts and lr in tensors, read on the device
  m.def(
      "masked_adamw_capturable_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor[] masks, int[] mask_kinds, Tensor[] steps, "
      "int[] index_offsets, int[] streams, Tensor lr, float beta1, float beta2, float eps, "
      "float weight_decay, int seed_lo, int seed_hi, float reserve_p, int action, "
      "bool paper) -> ()");
}

TORCH_LIBRARY_IMPL(regdrop_fast, CPU, m) {
  m.impl("masked_adamw_", &regdrop::masked_adamw_cpu);
  m.impl("masked_adamw_capturable_", &regdrop::masked_adamw_capturable_cpu);
}
