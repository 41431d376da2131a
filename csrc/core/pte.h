// Page-table entry encoding, shared by CPU and CUDA code (torch-free).
//
// A PTE is one int32: the tier in the top two bits, an index in the other thirty.
//   tier 0: GPU frame   (index = frame in the GPU pool)
//   tier 1: host slot   (index = slot in the pinned host pool)
//   tier 2: disk slot   (index = slot in the disk store)
//   tier 3: unmapped    (index ignored)
// All ones (-1 as int32) is tier 3, so a page table filled with -1 is fully unmapped.
#pragma once

#include <cstdint>

#include "core/portability.h"

namespace paged_kv {

enum class Tier : uint32_t { kGpu = 0, kHost = 1, kDisk = 2, kUnmapped = 3 };

constexpr int kPteTierShift = 30;
constexpr uint32_t kPteIndexMask = (1u << kPteTierShift) - 1u;
constexpr int32_t kPteUnmapped = -1;
// The largest index a PTE can hold (about one billion frames or slots).
constexpr int64_t kPteMaxIndex = static_cast<int64_t>(kPteIndexMask);

PKV_HOST_DEVICE inline Tier pte_tier(int32_t pte) {
  return static_cast<Tier>(static_cast<uint32_t>(pte) >> kPteTierShift);
}

PKV_HOST_DEVICE inline int64_t pte_index(int32_t pte) {
  return static_cast<int64_t>(static_cast<uint32_t>(pte) & kPteIndexMask);
}

PKV_HOST_DEVICE inline int32_t make_pte(Tier tier, int64_t index) {
  return static_cast<int32_t>((static_cast<uint32_t>(tier) << kPteTierShift) |
                              (static_cast<uint32_t>(index) & kPteIndexMask));
}

inline const char* tier_name(Tier tier) {
  switch (tier) {
    case Tier::kGpu: return "GPU frame";
    case Tier::kHost: return "host slot";
    case Tier::kDisk: return "disk slot";
    default: return "unmapped";
  }
}

}  // namespace paged_kv
