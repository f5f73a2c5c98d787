// Which AVX-512 instructions of the CPU masked AdamW step compete for the same execution pipes.
// Each case runs 8 independent dependency chains of one instruction (or of two, side by side)
// and prints cycles per loop iteration. When two instructions together take as long as the
// sum of each alone, they share pipes; when together take as long as the slower one alone,
// they run side by side. The README's "F mode on one core" paragraph quotes this on the CI VM
// (AMD EPYC, Zen 4): vpmuludq and vmulps share pipes, vpsrlq and vaddps share pipes, the
// divider (vdivps, vsqrtps) runs beside all of them.
//
//   g++ -O2 -std=c++17 benchmarks/cpu/vector_pipes.cpp -o /tmp/vector_pipes && /tmp/vector_pipes 3.65
//
// The argument is the core clock in GHz (cycles = seconds * GHz); needs an AVX-512 CPU.
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#define AVX512 __attribute__((target("avx512f")))

namespace {

enum Op { kMulU32, kShift, kTernlog, kMulPs, kAddPs, kDivPs, kSqrtPs, kNone };

template <int kOp>
AVX512 inline __attribute__((always_inline)) __m512i apply(__m512i t, __m512i x, __m512i y) {
  if (kOp == kMulU32) return _mm512_mul_epu32(t, x);
  if (kOp == kShift) return _mm512_srli_epi64(t, 1);
  if (kOp == kTernlog) return _mm512_ternarylogic_epi32(t, x, y, 0x96);
  const __m512 f = _mm512_castsi512_ps(t), fx = _mm512_castsi512_ps(x);
  if (kOp == kMulPs) return _mm512_castps_si512(_mm512_mul_ps(f, fx));
  if (kOp == kAddPs) return _mm512_castps_si512(_mm512_add_ps(f, _mm512_castsi512_ps(y)));
  if (kOp == kDivPs) return _mm512_castps_si512(_mm512_div_ps(fx, f));
  if (kOp == kSqrtPs) return _mm512_castps_si512(_mm512_sqrt_ps(f));
  return t;
}

// Named variables, not arrays: an array of chains would live on the stack and measure
// store-to-load forwarding instead of the pipes.
template <int kA, int kB>
AVX512 __attribute__((noinline)) void run(const char* name, long n, double ghz) {
  // 1.5f: multiplying by 1.5 or adding 0 keeps the floats normal (no denormal slow path)
  __m512i a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7;
  a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = _mm512_castps_si512(_mm512_set1_ps(1.5f));
  b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = a0;
  __m512i x = _mm512_castps_si512(_mm512_set1_ps(1.0f));
  __m512i y = _mm512_castps_si512(_mm512_set1_ps(0.0f));
  asm volatile("" : "+v"(x), "+v"(y));
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
#define REGDROP_STEP(k)              \
  a##k = apply<kA>(a##k, x, y);      \
  if (kB != kNone) b##k = apply<kB>(b##k, x, y);
    REGDROP_STEP(0) REGDROP_STEP(1) REGDROP_STEP(2) REGDROP_STEP(3)
    REGDROP_STEP(4) REGDROP_STEP(5) REGDROP_STEP(6) REGDROP_STEP(7)
#undef REGDROP_STEP
    asm volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6),
                 "+v"(a7));
    if (kB != kNone) {
      asm volatile("" : "+v"(b0), "+v"(b1), "+v"(b2), "+v"(b3), "+v"(b4), "+v"(b5), "+v"(b6),
                   "+v"(b7));
    }
  }
  const double s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%-18s %6.2f cycles per iteration (8 of each)\n", name, s / n * ghz * 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  const double ghz = argc > 1 ? std::atof(argv[1]) : 3.65;
  const long n = 20000000;
  run<kMulU32, kNone>("vpmuludq", n, ghz);
  run<kShift, kNone>("vpsrlq", n, ghz);
  run<kTernlog, kNone>("vpternlogd", n, ghz);
  run<kMulPs, kNone>("vmulps", n, ghz);
  run<kAddPs, kNone>("vaddps", n, ghz);
  run<kDivPs, kNone>("vdivps", n / 4, ghz);
  run<kSqrtPs, kNone>("vsqrtps", n / 4, ghz);
  run<kMulU32, kShift>("vpmuludq+vpsrlq", n, ghz);
  run<kMulU32, kMulPs>("vpmuludq+vmulps", n, ghz);
  run<kMulU32, kAddPs>("vpmuludq+vaddps", n, ghz);
  run<kShift, kMulPs>("vpsrlq+vmulps", n, ghz);
  run<kShift, kAddPs>("vpsrlq+vaddps", n, ghz);
  run<kTernlog, kMulPs>("vpternlogd+vmulps", n, ghz);
  run<kMulU32, kDivPs>("vpmuludq+vdivps", n / 4, ghz);
  run<kMulPs, kDivPs>("vmulps+vdivps", n / 4, ghz);
  run<kShift, kSqrtPs>("vpsrlq+vsqrtps", n / 4, ghz);
  return 0;
}
