// The per-element masked AdamW update shared by csrc/masked_adamw.cpp (CPU) and
// csrc/masked_adamw_cuda.cu (CUDA); math in fp32, semantics documented in
// regdrop_fast/reference/masked_adamw.py (the reference these kernels are tested against).
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"

namespace regdrop {

// Where an element's keep bit comes from (per tensor).
constexpr int kMaskNone = 0;    // every element kept, scale 1
constexpr int kMaskPhilox = 1;  // ChildTuning-F: Philox word < floor(p * 2^32), scale 1/p
constexpr int kMaskBits = 2;    // ChildTuning-D / sparse: bit (offset + i) of flat int32 words

// What a dropped element loses (per group).
constexpr int kDropGrad = 0;    // g <- g * keep * scale before the moments (official order)
constexpr int kDropUpdate = 1;  // moments see g; the parameter change is multiplied by keep*scale
constexpr int kPrune = 2;       // dropped: parameter set to exactly 0, moments untouched

// Group and per-tensor scalars, already in fp32.
// 1-beta and 1-lr*wd are rounded from double on the host: 1.0f - 0.999f is 1.3e-5 off.
struct AdamScalars {
  float beta1;
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float lr_wd;      // lr * weight_decay
  float decay;      // 1 - lr * weight_decay
  float step_size;  // paper: lr*sqrt(bc2)/bc1; torch: lr/bc1
  float bc2_sqrt;   // torch only: sqrt(bc2)
};

// The update is split at the square root so the CPU kernel can take sqrt of a whole block
// with SIMD intrinsics: without -fno-math-errno (not in the shared build flags) the compiler
// will not vectorize a loop that calls sqrtf.

// New moments of one element. `factor` = keep * scale (0 for a dropped element).
template <int kAction>
REGDROP_HD void adam_moments(float g, float m, float v, float factor, const AdamScalars& s,
                             float& m1, float& v1) {
  if (kAction == kDropGrad) g *= factor;
  m1 = s.beta1 * m + s.one_minus_beta1 * g;
  v1 = s.beta2 * v + s.one_minus_beta2 * g * g;
}

// New parameter from the new moments (`sqrt_v1` = sqrt(v1)). For kPrune the caller keeps the
// old m and v of dropped elements. Branch-free for a fixed (kPaper, kAction).
template <bool kPaper, int kAction>
REGDROP_HD float adam_param(float p, float m1, float sqrt_v1, float factor, bool keep,
                            const AdamScalars& s) {
  float p1;
  if (kPaper) {
    p1 = p - s.step_size * (m1 / (sqrt_v1 + s.eps));
    p1 = p1 - s.lr_wd * p1;
  } else {
    p1 = p * s.decay - s.step_size * (m1 / (sqrt_v1 / s.bc2_sqrt + s.eps));
  }
  if (kAction == kPrune) return keep ? p1 : 0.0f;
  if (kAction == kDropUpdate) return p + factor * (p1 - p);
  return p1;
}

// The whole element update; m and v are updated in place, the new parameter returned.
template <bool kPaper, int kAction>
REGDROP_HD float adamw_element(float p, float g, float& m, float& v, float factor, bool keep,
                               const AdamScalars& s) {
  float m1, v1;
  adam_moments<kAction>(g, m, v, factor, s, m1, v1);
  const float p1 = adam_param<kPaper, kAction>(p, m1, sqrtf(v1), factor, keep, s);
  const bool write = kAction != kPrune || keep;
  m = write ? m1 : m;
  v = write ? v1 : v;
  return p1;
}

// Bit `bit` of flat int32 words (1 = keep).
REGDROP_HD bool mask_bit(const int32_t* words, uint64_t bit) {
  return (static_cast<uint32_t>(words[bit >> 5]) >> (bit & 31)) & 1u;
}

}  // namespace regdrop
