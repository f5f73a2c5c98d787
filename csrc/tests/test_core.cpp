// Plain-C++ tests of the torch-free core (run by ctest, see CMakeLists.txt): the Philox words of
// csrc/philox.h against known vectors, and bit pack/unpack/popcount of csrc/bitpack.h.
#include <cstdint>
#include <cstdio>
#include <array>
#include <vector>

#include "bitpack.h"
#include "philox.h"

namespace {

int g_failures = 0;

#define CHECK_EQ(actual, expected)                                                         \
  do {                                                                                     \
    const auto actual_ = (actual);                                                         \
    const auto expected_ = (expected);                                                     \
    if (!(actual_ == expected_)) {                                                         \
      ++g_failures;                                                                        \
      std::fprintf(stderr, "%s:%d: %s == 0x%llx, expected 0x%llx\n", __FILE__, __LINE__,   \
                   #actual, static_cast<unsigned long long>(actual_),                      \
                   static_cast<unsigned long long>(expected_));                            \
    }                                                                                      \
  } while (0)

// Random123's known-answer vectors for philox4x32-10: {counter[4], key[2], output[4]}.
void test_philox_random123_kat() {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    const regdrop::PhiloxOut out =
        regdrop::philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) {
      CHECK_EQ(out.w[i], k.out[i]);
    }
  }
}

// The contract's word (seed, global index, step, stream). Expected values were computed with
// the torch reference regdrop_fast.reference.philox.philox_words.
void test_philox_contract_vectors() {
  struct Vec {
    uint64_t seed, index;
    uint32_t step, stream, word;
  };
  const Vec vecs[] = {
      {0, 0, 0, 0, 0x6627e8d5},
      {0, 5, 0, 0, 0x5cb200db},
      {0, 7, 0, 0, 0x097eff67},
      {0x123456789abcdef0ull, 3, 7, 11, 0x93658ee3},
      {0x123456789abcdef0ull, 0xffffffffull, 7, 11, 0xa53d358d},
      {0x123456789abcdef0ull, 0x100000000ull, 7, 11, 0x069355d1},
      {0x123456789abcdef0ull, 0x100000005ull, 7, 11, 0x727af473},
      {0x123456789abcdef0ull, 0x10000000007ull, 7, 11, 0xcdbdaca5},
      {0x123456789abcdef0ull, 0x3fffffffffffffffull, 7, 11, 0xb9286c6e},
      {0xffffffffffffffffull, 1, 0xffffffffu, 0xffffffffu, 0x716983d6},
      {0xffffffffffffffffull, 0x200000002ull, 0xffffffffu, 0xffffffffu, 0x4165ee49},
      {0xffffffffffffffffull, 0x4000000000000001ull, 0xffffffffu, 0xffffffffu, 0xd9d701dc},
      {42, 10, 1, 0, 0x709af7c6},
      {42, 13, 1, 0, 0xae3a5abf},
      {0x100000000ull, 0, 0, 5, 0xfcb24b7d},
      {0x100000000ull, 3, 0, 5, 0x6b99a708},
  };
  for (const Vec& v : vecs) {
    CHECK_EQ(regdrop::philox_word(v.seed, v.index, v.step, v.stream), v.word);
  }
}

// Four consecutive indices i = 4c .. 4c+3 take the four words of counter c, in order.
void test_philox_block_lanes() {
  const uint64_t seed = 0xdeadbeefcafef00dull;
  for (uint64_t base : {uint64_t{0}, uint64_t{4} << 32, uint64_t{1} << 61}) {
    const regdrop::PhiloxOut block = regdrop::philox_block(seed, base, 3, 9);
    for (uint64_t lane = 0; lane < 4; ++lane) {
      CHECK_EQ(regdrop::philox_word(seed, base + lane, 3, 9), block.w[lane]);
    }
  }
}

void test_keep_threshold() {
  CHECK_EQ(regdrop::keep_threshold(0.0), uint64_t{0});
  CHECK_EQ(regdrop::keep_threshold(0.5), uint64_t{1} << 31);
  CHECK_EQ(regdrop::keep_threshold(1.0), uint64_t{1} << 32);
  CHECK_EQ(regdrop::keep_threshold(0.1), uint64_t{429496729});  // floor(0.1 * 2^32)
}

// Every byte through the 8-lane multiply tricks, against a bit loop.
void test_gather_spread_bytes() {
  for (uint32_t byte = 0; byte < 256; ++byte) {
    bool bits[8];
    for (int k = 0; k < 8; ++k) {
      bits[k] = (byte >> k) & 1u;
    }
    CHECK_EQ(regdrop::gather8(bits), byte);
    bool spread[8];
    regdrop::spread8(byte, spread);
    for (int k = 0; k < 8; ++k) {
      CHECK_EQ(spread[k], bits[k]);
    }
  }
}

constexpr size_t kMaxRow = 1024;  // capacity of the row buffers below (largest n + sentinel)

void test_pack_unpack_rows() {
  const int64_t sizes[] = {0, 1, 7, 8, 31, 32, 33, 63, 64, 65, 100, 1000, 1001};
  const uint32_t thresholds[] = {0u, 0x40000000u, 0x80000000u, 0xffffffffu};
  uint64_t seed = 1;
  for (int64_t n : sizes) {
    for (uint32_t threshold : thresholds) {
      // Deterministic pseudo-random bits of the given density: the Philox words themselves.
      std::array<bool, kMaxRow> bits{};
      int64_t ones = 0;
      for (int64_t i = 0; i < n; ++i) {
        bits[i] = regdrop::philox_word(seed, static_cast<uint64_t>(i), 0, 0) < threshold;
        ones += bits[i];
      }
      ++seed;
      const int64_t width = regdrop::num_words(n);
      CHECK_EQ(width, (n + 31) / 32);
      std::array<int32_t, kMaxRow / 32 + 1> words;
      words.fill(0x5a5a5a5a);
      regdrop::pack_row(bits.data(), n, words.data());
      CHECK_EQ(words[width], 0x5a5a5a5a);  // nothing written past the row
      for (int64_t i = 0; i < n; ++i) {
        const auto word = static_cast<uint32_t>(words[i / 32]);
        CHECK_EQ((word >> (i % 32)) & 1u, static_cast<uint32_t>(bits[i]));
      }
      if (n % 32 != 0) {  // bits past n in the last word are 0
        CHECK_EQ(static_cast<uint32_t>(words[width - 1]) >> (n % 32), 0u);
      }
      CHECK_EQ(regdrop::popcount_words(words.data(), width), ones);

      // Unpacking ignores set bits past n and writes exactly n elements.
      if (n % 32 != 0) {
        words[width - 1] |= static_cast<int32_t>(~0u << (n % 32));
      }
      std::array<bool, kMaxRow> back{};
      for (int64_t i = 0; i < n; ++i) {
        back[i] = !bits[i];
      }
      back[n] = true;
      regdrop::unpack_row(words.data(), n, back.data());
      for (int64_t i = 0; i < n; ++i) {
        CHECK_EQ(back[i], bits[i]);
      }
      CHECK_EQ(back[n], true);
    }
  }
}

void test_popcount() {
  const int32_t words[] = {0, -1, 1, static_cast<int32_t>(0x80000000u), 0x0f0f0f0f};
  CHECK_EQ(regdrop::popcount32(0u), 0);
  CHECK_EQ(regdrop::popcount32(0xffffffffu), 32);
  CHECK_EQ(regdrop::popcount32(0x80000001u), 2);
  CHECK_EQ(regdrop::popcount_words(words, 5), int64_t{0 + 32 + 1 + 1 + 16});
  CHECK_EQ(regdrop::popcount_words(words, 0), int64_t{0});
}

}  // namespace

int main() {
  test_philox_random123_kat();
  test_philox_contract_vectors();
  test_philox_block_lanes();
  test_keep_threshold();
  test_gather_spread_bytes();
  test_pack_unpack_rows();
  test_popcount();
  if (g_failures != 0) {
    std::fprintf(stderr, "test_core: %d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("test_core: all checks passed\n");
  return 0;
}
