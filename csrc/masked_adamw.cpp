// Fused masked AdamW step on CPU (ChildTuning-F/-D, sparse masks): the op schema and its CPU
// kernel.
//
// Math: regdrop_fast/reference/masked_adamw.py (shared per-element code in masked_adamw.h).
// Memory per element (fp32 params): read p, g, m, v and write p, m, v = 28 B, the floor of any
// AdamW step; the F mask costs 0 B (Philox words generated in registers, one 10-round block
// per 4 elements), the D mask 1/8 B (a bit per element). Parallelism: every tensor of the list
// is cut into 32768-element chunks and one OpenMP loop runs all chunks of all tensors. Inside a
// chunk, blocks of 256 elements first compute their keep factors (Philox or bits) into a small
// stack array, then run the branch-free update loop, which the compiler vectorizes; the hot
// function is cloned for AVX-512 and AVX2 and picked at load time (the build has no -march).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

constexpr int kLanes = 16;  // Philox counters per AVX-512 register
// Philox counters touched by one block, rounded up to whole registers
constexpr int kMaxCounters = ((kBlock / 4 + 1 + kLanes - 1) / kLanes) * kLanes;

// Philox words of counters c_first .. c_first + n_counters - 1, interleaved: words[4*l + q] is
// output word q of counter c_first + l, i.e. the word of global index 4*(c_first + l) + q. The
// same arithmetic as philox4x32_10 in philox.h (tested bit for bit against the reference).
using PhiloxWordsFn = void (*)(uint32_t* words, uint64_t c_first, int n_counters, uint64_t seed,
                               uint32_t step, uint32_t stream);

// Portable version: one loop over counters with the rounds unrolled inside, which the compiler
// vectorizes in each target clone.
__attribute__((target_clones("avx2", "default"))) void philox_words_generic(
    uint32_t* words, uint64_t c_first, int n_counters, uint64_t seed, uint32_t step,
    uint32_t stream) {
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
// (hi, lo) 32-bit halves of the 16 products c * k, from the even and odd 64-bit products.
__attribute__((target("avx512f"))) inline void mul_hi_lo_avx512(__m512i c, __m512i k,
                                                                __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(c, k);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), k);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Philox of kRegs * 16 consecutive counters from `base`, interleaved into `words`: several
// independent registers per round hide the multiply latency of the serial 10-round chain.
template <int kRegs>
__attribute__((target("avx512f"))) inline void philox_regs_avx512(
    uint32_t* words, uint32_t first_lo, uint32_t first_hi, int base, const uint32_t* keys,
    uint32_t step, uint32_t stream) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo = _mm512_set1_epi32(static_cast<int>(first_lo));
  const __m512i round_a = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundA));
  const __m512i round_b = _mm512_set1_epi32(static_cast<int>(kPhiloxRoundB));
  __m512i c0[kRegs], c1[kRegs], c2[kRegs], c3[kRegs];
#pragma GCC unroll 4
  for (int r = 0; r < kRegs; ++r) {
    c0[r] = _mm512_add_epi32(lo, _mm512_add_epi32(lane, _mm512_set1_epi32(base + 16 * r)));
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0[r], lo);
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(first_hi));
    c1[r] = _mm512_mask_add_epi32(hi, carry, hi, _mm512_set1_epi32(1));
    c2[r] = _mm512_set1_epi32(static_cast<int>(step));
    c3[r] = _mm512_set1_epi32(static_cast<int>(stream));
  }
  for (int round = 0; round < 10; ++round) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int>(keys[2 * round]));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int>(keys[2 * round + 1]));
#pragma GCC unroll 4
    for (int r = 0; r < kRegs; ++r) {
      __m512i hi_a, lo_a, hi_b, lo_b;
      mul_hi_lo_avx512(c0[r], round_a, hi_a, lo_a);
      mul_hi_lo_avx512(c2[r], round_b, hi_b, lo_b);
      c0[r] = _mm512_ternarylogic_epi32(hi_b, c1[r], k0, 0x96);  // three-way xor
      c2[r] = _mm512_ternarylogic_epi32(hi_a, c3[r], k1, 0x96);
      c1[r] = lo_b;
      c3[r] = lo_a;
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRegs; ++r) {
    // 4 x 16 transpose: output register q holds counters 4q .. 4q+3, four words each
    const __m512i a = _mm512_unpacklo_epi32(c0[r], c1[r]);
    const __m512i b = _mm512_unpackhi_epi32(c0[r], c1[r]);
    const __m512i c = _mm512_unpacklo_epi32(c2[r], c3[r]);
    const __m512i d = _mm512_unpackhi_epi32(c2[r], c3[r]);
    const __m512i e = _mm512_unpacklo_epi64(a, c);
    const __m512i f = _mm512_unpackhi_epi64(a, c);
    const __m512i g = _mm512_unpacklo_epi64(b, d);
    const __m512i h = _mm512_unpackhi_epi64(b, d);
    const __m512i t0 = _mm512_shuffle_i32x4(e, f, 0x44);
    const __m512i t1 = _mm512_shuffle_i32x4(g, h, 0x44);
    const __m512i t2 = _mm512_shuffle_i32x4(e, f, 0xEE);
    const __m512i t3 = _mm512_shuffle_i32x4(g, h, 0xEE);
    uint32_t* out = words + 4 * (base + 16 * r);
    _mm512_storeu_si512(out, _mm512_shuffle_i32x4(t0, t1, 0x88));
    _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));
    _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));
    _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));
  }
}

// AVX-512 version: n_counters is rounded up to a multiple of 16 (the caller's buffer has room).
__attribute__((target("avx512f"))) void philox_words_avx512(uint32_t* words, uint64_t c_first,
                                                            int n_counters, uint64_t seed,
                                                            uint32_t step, uint32_t stream) {
  uint32_t keys[20];
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    keys[2 * round] = k0;
    keys[2 * round + 1] = k1;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const uint32_t first_lo = static_cast<uint32_t>(c_first);
  const uint32_t first_hi = static_cast<uint32_t>(c_first >> 32);
  int base = 0;
  for (; base + 64 <= n_counters; base += 64) {
    philox_regs_avx512<4>(words, first_lo, first_hi, base, keys, step, stream);
  }
  for (; base < n_counters; base += 16) {
    philox_regs_avx512<1>(words, first_lo, first_hi, base, keys, step, stream);
  }
}
#endif

PhiloxWordsFn pick_philox_words() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f")) return &philox_words_avx512;
#endif
  return &philox_words_generic;
}

const PhiloxWordsFn philox_words_best = pick_philox_words();

// Keep factors of global indices [first, first + n): one Philox block per 4 indices.
REGDROP_INLINE void philox_factors(float* factor, uint64_t first, int n, uint64_t seed,
                                   uint32_t step, uint32_t stream, uint64_t threshold,
                                   float scale) {
  alignas(64) uint32_t words[4 * kMaxCounters];
  const uint64_t c_first = first >> 2;
  const int n_counters = static_cast<int>(((first + n - 1) >> 2) - c_first + 1);
  philox_words_best(words, c_first, n_counters, seed, step, stream);
  // threshold is at most 2^32 (keep everything): compare in 32 bits
  const bool keep_all = threshold > 0xFFFFFFFFull;
  const uint32_t thr = static_cast<uint32_t>(keep_all ? 0 : threshold);
  const int skip = static_cast<int>(first & 3);
  for (int j = 0; j < n; ++j) factor[j] = (keep_all || words[skip + j] < thr) ? scale : 0.0f;
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

template <typename T, bool kPaper, int kAction>
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
      philox_factors(factor, first, n, grp.seed, t.step, t.stream, grp.threshold, grp.inv_p);
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

// One work item: the dtype's clone picks the (semantics, action) instantiation; everything it
// calls is force-inlined so the vectorized loops get the clone's instruction set.
template <typename T>
REGDROP_INLINE void run_segment_any(int paper, int action, const TensorArgs& t,
                                    const GroupArgs& grp, int64_t begin, int64_t end) {
  if (paper) {
    if (action == kDropGrad) run_segment<T, true, kDropGrad>(t, grp, begin, end);
    else if (action == kDropUpdate) run_segment<T, true, kDropUpdate>(t, grp, begin, end);
    else run_segment<T, true, kPrune>(t, grp, begin, end);
  } else {
    if (action == kDropGrad) run_segment<T, false, kDropGrad>(t, grp, begin, end);
    else if (action == kDropUpdate) run_segment<T, false, kDropUpdate>(t, grp, begin, end);
    else run_segment<T, false, kPrune>(t, grp, begin, end);
  }
}

// The build has no -march: each dtype's segment function is cloned for AVX-512, AVX2+FMA and
// the baseline, and the loader picks the clone once.
#define REGDROP_CLONES \
  __attribute__((target_clones("avx512f", "avx2,fma", "default")))

REGDROP_CLONES void segment_f32(int paper, int action, const TensorArgs& t, const GroupArgs& grp,
                                int64_t begin, int64_t end) {
  run_segment_any<float>(paper, action, t, grp, begin, end);
}

REGDROP_CLONES void segment_bf16(int paper, int action, const TensorArgs& t,
                                 const GroupArgs& grp, int64_t begin, int64_t end) {
  run_segment_any<c10::BFloat16>(paper, action, t, grp, begin, end);
}

REGDROP_CLONES void segment_f16(int paper, int action, const TensorArgs& t, const GroupArgs& grp,
                                int64_t begin, int64_t end) {
  run_segment_any<c10::Half>(paper, action, t, grp, begin, end);
}

#if defined(__x86_64__)
// fp32 with AVX-512: the whole update in 16-lane intrinsics, keep decisions as 16-bit lane
// masks (a D mask's bits are the lane mask itself), tails by masked loads and stores.
template <bool kPaper, int kAction, int kKind>
__attribute__((target("avx512f"))) void segment_f32_avx512_impl(const TensorArgs& t,
                                                                 const GroupArgs& grp,
                                                                 int64_t begin, int64_t end) {
  float* p = static_cast<float*>(t.p);
  const float* g = static_cast<const float*>(t.g);
  float* m = t.m;
  float* v = t.v;
  const __m512 beta1 = _mm512_set1_ps(t.s.beta1);
  const __m512 beta2 = _mm512_set1_ps(t.s.beta2);
  const __m512 omb1 = _mm512_set1_ps(t.s.one_minus_beta1);
  const __m512 omb2 = _mm512_set1_ps(t.s.one_minus_beta2);
  const __m512 eps = _mm512_set1_ps(t.s.eps);
  const __m512 lr_wd = _mm512_set1_ps(t.s.lr_wd);
  const __m512 decay = _mm512_set1_ps(t.s.decay);
  const __m512 step_size = _mm512_set1_ps(t.s.step_size);
  const __m512 bc2_sqrt = _mm512_set1_ps(t.s.bc2_sqrt);
  const __m512 scale = _mm512_set1_ps(kKind == kMaskPhilox ? grp.inv_p : 1.0f);
  const bool keep_all = grp.threshold > 0xFFFFFFFFull;
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(
      keep_all ? 0 : grp.threshold)));
  alignas(64) uint32_t words[4 * kMaxCounters];
  alignas(64) float factor_slow[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, end - b));
    const uint64_t first = t.offset + static_cast<uint64_t>(b);
    const bool bits_fast = kKind == kMaskBits && (first & 15) == 0;
    if (kKind == kMaskPhilox) {
      const uint64_t c_first = first >> 2;
      philox_words_avx512(words, c_first,
                          static_cast<int>(((first + n - 1) >> 2) - c_first + 1), grp.seed,
                          t.step, t.stream);
    } else if (kKind == kMaskBits && !bits_fast) {
      for (int j = 0; j < n; ++j) factor_slow[j] = mask_bit(t.words, first + j) ? 1.0f : 0.0f;
    }
    const int skip = static_cast<int>(first & 3);
    for (int k = 0; k < n; k += 16) {
      const __mmask16 lanes = n - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - k)) - 1);
      __mmask16 keep = 0xFFFF;
      if (kKind == kMaskPhilox) {
        const __m512i w = _mm512_loadu_si512(words + skip + k);
        keep = keep_all ? 0xFFFF : _mm512_cmplt_epu32_mask(w, thr);
      } else if (kKind == kMaskBits) {
        if (bits_fast) {
          const uint64_t bit = first + k;
          keep = static_cast<__mmask16>(static_cast<uint32_t>(t.words[bit >> 5]) >> (bit & 31));
        } else {
          keep = _mm512_cmpneq_ps_mask(_mm512_loadu_ps(factor_slow + k), _mm512_setzero_ps());
        }
      }
      const __m512 factor = _mm512_maskz_mov_ps(keep, scale);
      const int64_t i = b + k;
      const __m512 p0 = _mm512_maskz_loadu_ps(lanes, p + i);
      __m512 gv = _mm512_maskz_loadu_ps(lanes, g + i);
      const __m512 m0 = _mm512_maskz_loadu_ps(lanes, m + i);
      const __m512 v0 = _mm512_maskz_loadu_ps(lanes, v + i);
      if (kAction == kDropGrad && kKind != kMaskNone) gv = _mm512_mul_ps(gv, factor);
      __m512 m1 = _mm512_add_ps(_mm512_mul_ps(beta1, m0), _mm512_mul_ps(omb1, gv));
      __m512 v1 = _mm512_add_ps(_mm512_mul_ps(beta2, v0),
                                _mm512_mul_ps(_mm512_mul_ps(omb2, gv), gv));
      const __m512 sq = _mm512_sqrt_ps(v1);
      __m512 p1;
      if (kPaper) {
        p1 = _mm512_sub_ps(p0, _mm512_mul_ps(step_size,
                                             _mm512_div_ps(m1, _mm512_add_ps(sq, eps))));
        p1 = _mm512_sub_ps(p1, _mm512_mul_ps(lr_wd, p1));
      } else {
        const __m512 denom = _mm512_add_ps(_mm512_div_ps(sq, bc2_sqrt), eps);
        p1 = _mm512_sub_ps(_mm512_mul_ps(p0, decay),
                           _mm512_mul_ps(step_size, _mm512_div_ps(m1, denom)));
      }
      if (kAction == kDropUpdate && kKind != kMaskNone) {
        p1 = _mm512_add_ps(p0, _mm512_mul_ps(factor, _mm512_sub_ps(p1, p0)));
      } else if (kAction == kPrune) {
        p1 = _mm512_maskz_mov_ps(keep, p1);
        m1 = _mm512_mask_blend_ps(keep, m0, m1);
        v1 = _mm512_mask_blend_ps(keep, v0, v1);
      }
      _mm512_mask_storeu_ps(p + i, lanes, p1);
      _mm512_mask_storeu_ps(m + i, lanes, m1);
      _mm512_mask_storeu_ps(v + i, lanes, v1);
    }
  }
}

template <bool kPaper, int kAction>
void segment_f32_avx512_kind(const TensorArgs& t, const GroupArgs& grp, int64_t begin,
                             int64_t end) {
  if (t.kind == kMaskPhilox) segment_f32_avx512_impl<kPaper, kAction, kMaskPhilox>(t, grp, begin, end);
  else if (t.kind == kMaskBits) segment_f32_avx512_impl<kPaper, kAction, kMaskBits>(t, grp, begin, end);
  else segment_f32_avx512_impl<kPaper, kAction, kMaskNone>(t, grp, begin, end);
}

void segment_f32_avx512(int paper, int action, const TensorArgs& t, const GroupArgs& grp,
                        int64_t begin, int64_t end) {
  if (paper) {
    if (action == kDropGrad) segment_f32_avx512_kind<true, kDropGrad>(t, grp, begin, end);
    else if (action == kDropUpdate) segment_f32_avx512_kind<true, kDropUpdate>(t, grp, begin, end);
    else segment_f32_avx512_kind<true, kPrune>(t, grp, begin, end);
  } else {
    if (action == kDropGrad) segment_f32_avx512_kind<false, kDropGrad>(t, grp, begin, end);
    else if (action == kDropUpdate) segment_f32_avx512_kind<false, kDropUpdate>(t, grp, begin, end);
    else segment_f32_avx512_kind<false, kPrune>(t, grp, begin, end);
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

void check_list(const char* name, const at::TensorList& list, size_t n) {
  TORCH_CHECK(list.size() == n, "masked_adamw_: ", name, " must have ", n,
              " tensors (one per param), got ", list.size());
}

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList masks,
                      at::IntArrayRef mask_kinds, at::IntArrayRef steps,
                      at::IntArrayRef index_offsets, at::IntArrayRef streams,
                      at::ArrayRef<double> step_sizes, at::ArrayRef<double> bc2_sqrts,
                      double beta1, double beta2, double eps, double lr_wd, int64_t seed_lo,
                      int64_t seed_hi, double reserve_p, int64_t action, bool paper) {
  const size_t n = params.size();
  check_list("grads", grads, n);
  check_list("exp_avgs", exp_avgs, n);
  check_list("exp_avg_sqs", exp_avg_sqs, n);
  check_list("masks", masks, n);
  TORCH_CHECK(mask_kinds.size() == n && steps.size() == n && index_offsets.size() == n &&
                  streams.size() == n && step_sizes.size() == n && bc2_sqrts.size() == n,
              "masked_adamw_: per-tensor int/float lists must have one entry per param (", n,
              ")");
  TORCH_CHECK(action >= kDropGrad && action <= kPrune, "masked_adamw_: action must be 0..2, got ",
              action);
  if (n == 0) return;
  const at::ScalarType dtype = params[0].scalar_type();
  std::vector<TensorArgs> tensors(n);
  std::vector<Seg> segs;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.scalar_type() == dtype,
                "masked_adamw_: params[", i, "] must be a contiguous CPU tensor of dtype ", dtype,
                ", got ", p.scalar_type(), " on ", p.device());
    TORCH_CHECK(grads[i].device().is_cpu() && grads[i].is_contiguous() &&
                    grads[i].scalar_type() == dtype && grads[i].numel() == p.numel(),
                "masked_adamw_: grads[", i, "] must be a contiguous CPU ", dtype,
                " tensor with the param's numel");
    for (const at::Tensor* st : {&exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(st->device().is_cpu() && st->is_contiguous() &&
                      st->scalar_type() == at::kFloat && st->numel() == p.numel(),
                  "masked_adamw_: exp_avgs/exp_avg_sqs[", i,
                  "] must be contiguous float32 CPU tensors with the param's numel");
    }
    const int kind = static_cast<int>(mask_kinds[i]);
    TORCH_CHECK(kind >= kMaskNone && kind <= kMaskBits, "masked_adamw_: mask_kinds[", i,
                "] must be 0..2, got ", kind);
    TensorArgs& t = tensors[i];
    t.p = p.data_ptr();
    t.g = grads[i].data_ptr();
    t.m = exp_avgs[i].data_ptr<float>();
    t.v = exp_avg_sqs[i].data_ptr<float>();
    t.words = nullptr;
    t.kind = kind;
    t.offset = static_cast<uint64_t>(index_offsets[i]);
    if (kind == kMaskBits) {
      const at::Tensor& w = masks[i];
      TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.scalar_type() == at::kInt &&
                      w.numel() * 32 >= static_cast<int64_t>(t.offset) + p.numel(),
                  "masked_adamw_: masks[", i, "] must be contiguous int32 CPU words covering ",
                  "bits offset .. offset + numel");
      t.words = w.data_ptr<int32_t>();
    }
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
  SegmentFn fn = nullptr;
  switch (dtype) {
    case at::kFloat:
      fn = &segment_f32;
#if defined(__x86_64__)
      if (__builtin_cpu_supports("avx512f")) fn = &segment_f32_avx512;
#endif
      break;
    case at::kBFloat16:
      fn = &segment_bf16;
      break;
    case at::kHalf:
      fn = &segment_f16;
      break;
    default:
      TORCH_CHECK(false, "masked_adamw_: params must be float32, bfloat16 or float16, got ",
                  dtype);
  }
  run_all(fn, paper_i, action_i, tensors, segs, grp);
}

}  // namespace
}  // namespace regdrop

TORCH_LIBRARY_FRAGMENT(regdrop_fast, m) {
  m.def(
      "masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor[] masks, int[] mask_kinds, int[] steps, "
      "int[] index_offsets, int[] streams, float[] step_sizes, float[] bc2_sqrts, float beta1, "
      "float beta2, float eps, float lr_wd, int seed_lo, int seed_hi, float reserve_p, "
      "int action, bool paper) -> ()");
}

TORCH_LIBRARY_IMPL(regdrop_fast, CPU, m) {
  m.impl("masked_adamw_", &regdrop::masked_adamw_cpu);
}
