// A fast 64-bit checksum of a byte range, for the disk tier's slot headers (torch-free).
//
// Not cryptographic: it detects accidental damage (flipped bits, torn or misplaced writes), not
// tampering. Four independent 64-bit lanes each take every fourth 8-byte word, so the lanes'
// multiply chains overlap in the CPU; then the words left over, the last 0 to 7 bytes and the
// length are folded in, and a final avalanche spreads every input bit over the whole result.
//
// Every step is a bijection of the running state for a fixed word and of the word for a fixed
// state, so changing any single 8-byte word (any run of flipped bits within one word) always
// changes the checksum of a range of the same length.
//
// Words are loaded in host byte order: a checksum is compared only on the machine that wrote it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace paged_kv::store {

namespace checksum_detail {

// Odd 64-bit constants with well-spread bits (the fractional parts of sqrt(2), sqrt(3),
// sqrt(5), sqrt(7) and e), so multiplication by any of them is a bijection.
constexpr uint64_t kMulA = 0x6a09e667f3bcc909ULL;
constexpr uint64_t kMulB = 0xbb67ae8584caa73bULL;
constexpr uint64_t kMulC = 0x3c6ef372fe94f82bULL;
constexpr uint64_t kMulD = 0xa54ff53a5f1d36f1ULL;
constexpr uint64_t kMulE = 0xb7e151628aed2a6bULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

inline uint64_t load_word(const unsigned char* p) {
  uint64_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// One lane step: the word (scrambled off the lane's dependency chain) enters by xor, then a
// rotate and an odd multiply mix it into all of the lane's bits.
inline uint64_t absorb(uint64_t lane, uint64_t word) {
  lane ^= word * kMulB;
  lane = rotl(lane, 29);
  return lane * kMulA;
}

// Spreads every bit of h over all 64 bits (xor-shift and odd multiply, both bijective).
inline uint64_t avalanche(uint64_t h) {
  h ^= h >> 31;
  h *= kMulC;
  h ^= h >> 29;
  h *= kMulD;
  h ^= h >> 32;
  return h;
}

}  // namespace checksum_detail

// The checksum of `bytes` bytes at `data` (any alignment; `data` may be null when bytes == 0).
inline uint64_t checksum64(const void* data, size_t bytes, uint64_t seed = 0) {
  using namespace checksum_detail;
  const auto* p = static_cast<const unsigned char*>(data);
  const unsigned char* const end = p + bytes;

  // Distinct starting states, so the lanes never mirror one another.
  uint64_t lane0 = seed ^ kMulA;
  uint64_t lane1 = seed + kMulB;
  uint64_t lane2 = rotl(seed, 17) ^ kMulC;
  uint64_t lane3 = seed - kMulD;

  // The main loop: 64 bytes per iteration, two words per lane, four independent chains.
  while (end - p >= 64) {
    lane0 = absorb(lane0, load_word(p + 0));
    lane1 = absorb(lane1, load_word(p + 8));
    lane2 = absorb(lane2, load_word(p + 16));
    lane3 = absorb(lane3, load_word(p + 24));
    lane0 = absorb(lane0, load_word(p + 32));
    lane1 = absorb(lane1, load_word(p + 40));
    lane2 = absorb(lane2, load_word(p + 48));
    lane3 = absorb(lane3, load_word(p + 56));
    p += 64;
  }

  // Fold the lanes in one after another (not summed: each fold stays a bijection of every
  // single lane, and the order tells the lanes apart).
  uint64_t h = lane0;
  h = absorb(h, lane1);
  h = absorb(h, lane2);
  h = absorb(h, lane3);

  // Whole words left over (0 to 7).
  while (end - p >= 8) {
    h = absorb(h, load_word(p));
    p += 8;
  }
  // The last 0 to 7 bytes, zero-extended; the length below tells "ab" from "ab\0".
  if (p < end) {
    uint64_t tail = 0;
    std::memcpy(&tail, p, static_cast<size_t>(end - p));
    h = absorb(h ^ kMulE, tail);
  }
  h ^= static_cast<uint64_t>(bytes) * kMulE;
  return avalanche(h);
}

}  // namespace paged_kv::store
