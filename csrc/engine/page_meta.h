// What the pager knows about one page of one sequence (torch-free).
//
// A page's contents live in at most one GPU frame, one host slot and one disk slot at a time.
// Its PTE names the highest tier holding a valid copy: the GPU frame when it has one, else the
// host slot, else the disk slot. Sealed pages never change, so a lower copy stays valid when the
// page moves up, and evicting the page later needs no second write-back.
#pragma once

#include <cstdint>

#include "core/pte.h"

namespace paged_kv::engine {

// A page of a sequence: its page-table row and its logical page (column).
struct PageId {
  int32_t row = 0;
  int32_t page = 0;

  bool operator==(const PageId& other) const { return row == other.row && page == other.page; }
  bool operator<(const PageId& other) const {
    return row != other.row ? row < other.row : page < other.page;
  }
};

// Owner keys of frames and slots, as stored by IndexAllocator: a page packs into a non-negative
// int64; the pager's own transient use of a host slot (a bounce buffer) is kBounceOwner.
constexpr int64_t kNoOwner = -1;
constexpr int64_t kBounceOwner = -2;

inline int64_t owner_key(PageId id) {
  return (static_cast<int64_t>(id.row) << 32) | static_cast<int64_t>(static_cast<uint32_t>(id.page));
}

inline PageId page_of_owner(int64_t key) {
  return PageId{static_cast<int32_t>(key >> 32), static_cast<int32_t>(key & 0xffffffffLL)};
}

// Flags of PageMeta::flags.
constexpr uint8_t kPageSealed = 1;     // full and immutable; an open page is the tail being written
constexpr uint8_t kPageHostValid = 2;  // host_slot holds a valid copy
constexpr uint8_t kPageDiskValid = 4;  // disk_slot holds a valid copy
constexpr uint8_t kPageShared = 8;     // a fork's view of another sequence's sealed page: no copies
                                       // of its own; the pager maps it to that page

// Per-page metadata, 32 bytes. Frames and slots fit in 30 bits (the PTE's index field), so
// int32 holds them; -1 means none.
struct PageMeta {
  int64_t last_use = 0;     // tick of the last touch
  int32_t frame = -1;       // GPU frame, or -1
  int32_t host_slot = -1;   // host slot, or -1
  int32_t disk_slot = -1;   // disk slot, or -1
  int32_t tenant = 0;       // owner tenant (the sequence's)
  uint32_t generation = 0;  // new for every page created; goes into the disk slot's tag
  uint16_t pins = 0;        // a pinned page never leaves its current tier
  uint8_t tier = static_cast<uint8_t>(Tier::kUnmapped);  // the tier its PTE names
  uint8_t flags = 0;

  bool sealed() const { return (flags & kPageSealed) != 0; }
  bool host_valid() const { return (flags & kPageHostValid) != 0; }
  bool disk_valid() const { return (flags & kPageDiskValid) != 0; }
  bool shared_view() const { return (flags & kPageShared) != 0; }
  Tier current_tier() const { return static_cast<Tier>(tier); }
  void set_flag(uint8_t flag, bool on) {
    flags = on ? static_cast<uint8_t>(flags | flag) : static_cast<uint8_t>(flags & ~flag);
  }

  // The tier the copies imply: the highest one holding a valid copy.
  Tier resident_tier() const {
    if (frame >= 0) return Tier::kGpu;
    if (host_valid()) return Tier::kHost;
    if (disk_valid()) return Tier::kDisk;
    return Tier::kUnmapped;
  }

  // The PTE the page table must hold for this page.
  int32_t pte() const {
    switch (current_tier()) {
      case Tier::kGpu: return make_pte(Tier::kGpu, frame);
      case Tier::kHost: return make_pte(Tier::kHost, host_slot);
      case Tier::kDisk: return make_pte(Tier::kDisk, disk_slot);
      default: return kPteUnmapped;
    }
  }
};

static_assert(sizeof(PageMeta) == 32, "PageMeta is meant to stay 32 bytes");

}  // namespace paged_kv::engine
