// Bit-packed masks, the C++/CUDA side of the mask format (../shared/DESIGN.md, "Mask formats"):
// a row of n bools packs into ceil(n/32) int32 words; bit j of word w is element 32*w + j
// (little-endian), 1 = keep, and bits past n are 0. Header-only, no torch dependency, so the
// CPU kernels, the CUDA kernels and the plain-C++ ctest share it.
//
// Packing reads 8 bools at a time as one uint64 and gathers their low bits with a multiply;
// unpacking spreads a byte of bits into 8 bool bytes with a multiply and a mask. Both rely on
// bool storage being one byte holding exactly 0 or 1 and on a little-endian host.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "csrc/bitpack.h assumes a little-endian target"
#endif
static_assert(sizeof(bool) == 1, "bool must be one byte for the byte-parallel bit tricks");

#if !defined(REGDROP_HD)
#if defined(__CUDACC__)
#define REGDROP_HD __host__ __device__ __forceinline__
#else
#define REGDROP_HD inline
#endif
#endif

namespace regdrop {

constexpr int kBitsPerWord = 32;

REGDROP_HD constexpr int64_t num_words(int64_t n) { return (n + kBitsPerWord - 1) / kBitsPerWord; }

REGDROP_HD int popcount32(uint32_t word) {
#if defined(__CUDA_ARCH__)
  return __popc(word);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_popcount(word);
#else
  word = word - ((word >> 1) & 0x55555555u);
  word = (word & 0x33333333u) + ((word >> 2) & 0x33333333u);
  return static_cast<int>((((word + (word >> 4)) & 0x0F0F0F0Fu) * 0x01010101u) >> 24);
#endif
}

// Eight bools (bytes 0/1) -> one byte, bool k at bit k. The multiplier puts byte i's bit at
// bit 56 + i; every other partial product lands at a distinct lower bit, so nothing carries.
REGDROP_HD uint32_t gather8(const bool* bits) {
  uint64_t bytes;
  memcpy(&bytes, bits, 8);
  return static_cast<uint32_t>((bytes * 0x0102040810204080ull) >> 56);
}

// One byte of bits -> eight bool bytes, bit k to byte k: replicate the byte into all eight
// lanes, keep bit k in lane k, then turn each nonzero lane into 1 (+0x7F never carries out of
// a lane holding at most 0x80).
REGDROP_HD void spread8(uint32_t byte, bool* out) {
  uint64_t lanes = (static_cast<uint64_t>(byte & 0xFFu) * 0x0101010101010101ull) &
                   0x8040201008040201ull;
  lanes = ((lanes + 0x7F7F7F7F7F7F7F7Full) >> 7) & 0x0101010101010101ull;
  memcpy(out, &lanes, 8);
}

// Word holding bits[0 .. count), count in [0, 32]; bits past count are 0.
REGDROP_HD uint32_t pack_word(const bool* bits, int count) {
  if (count == kBitsPerWord) {
    return gather8(bits) | (gather8(bits + 8) << 8) | (gather8(bits + 16) << 16) |
           (gather8(bits + 24) << 24);
  }
  uint32_t word = 0;
  for (int j = 0; j < count; ++j) {
    word |= static_cast<uint32_t>(bits[j]) << j;
  }
  return word;
}

// Elements [0, count) of one word into out[0 .. count), count in [0, 32].
REGDROP_HD void unpack_word(uint32_t word, bool* out, int count) {
  if (count == kBitsPerWord) {
    for (int b = 0; b < 4; ++b) {
      spread8(word >> (8 * b), out + 8 * b);
    }
    return;
  }
  for (int j = 0; j < count; ++j) {
    out[j] = (word >> j) & 1u;
  }
}

// Word w of a row of n bools.
REGDROP_HD uint32_t pack_row_word(const bool* row, int64_t n, int64_t w) {
  const int64_t start = w * kBitsPerWord;
  const int64_t left = n - start;
  return pack_word(row + start, left < kBitsPerWord ? static_cast<int>(left) : kBitsPerWord);
}

// One row: n bools -> num_words(n) words (int32 storage, uint32 bit pattern).
REGDROP_HD void pack_row(const bool* row, int64_t n, int32_t* words) {
  const int64_t count = num_words(n);
  for (int64_t w = 0; w < count; ++w) {
    words[w] = static_cast<int32_t>(pack_row_word(row, n, w));
  }
}

// One row: num_words(n) words -> n bools (bits past n are ignored).
REGDROP_HD void unpack_row(const int32_t* words, int64_t n, bool* row) {
  const int64_t count = num_words(n);
  for (int64_t w = 0; w < count; ++w) {
    const int64_t start = w * kBitsPerWord;
    const int64_t left = n - start;
    unpack_word(static_cast<uint32_t>(words[w]), row + start,
                left < kBitsPerWord ? static_cast<int>(left) : kBitsPerWord);
  }
}

// Set bits in words[0 .. count).
REGDROP_HD int64_t popcount_words(const int32_t* words, int64_t count) {
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    total += popcount32(static_cast<uint32_t>(words[i]));
  }
  return total;
}

}  // namespace regdrop
