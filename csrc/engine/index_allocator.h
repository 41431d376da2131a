// A pool of indices [0, capacity) with a free list and the owner of every index (torch-free).
//
// Frames, host slots, disk slots and page-table rows are each handed out by one. Allocation and
// release are O(1). Taking an index that is owned, or releasing one that is free or owned by
// someone else, is a PagerInternalError: the pager checks its arguments before it gets here, so
// such a call means its bookkeeping is wrong.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/page_meta.h"

namespace paged_kv::engine {

class IndexAllocator {
 public:
  // `name` names the pool in error messages ("GPU frame", "host slot", ...).
  IndexAllocator(std::string name, int64_t capacity);

  int64_t capacity() const { return static_cast<int64_t>(owner_.size()); }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_owned() const { return capacity() - num_free(); }
  const std::string& name() const { return name_; }

  bool is_free(int64_t index) const { return owner_[index] == kNoOwner; }
  // The owner key of `index` (kNoOwner when free).
  int64_t owner(int64_t index) const { return owner_[index]; }

  // Hands out a free index to `owner` (a key >= 0 or kBounceOwner); the lowest indices go first
  // on a fresh pool, then the most recently released one.
  int64_t allocate(int64_t owner);
  // Hands out one free index per owner, the same indices `allocate` would give, but ascending in
  // the owners' order: pages listed in order then get runs of adjacent indices.
  std::vector<int64_t> allocate_ascending(const std::vector<int64_t>& owners);
  // Hands out this particular index, which must be free.
  void allocate_at(int64_t index, int64_t owner);
  // Returns `index`, which `owner` must own.
  void release(int64_t index, int64_t owner);
  // Gives `index`, owned by `from`, to `to` (which must be in the same group).
  void transfer(int64_t index, int64_t from, int64_t to);

  // Counts owned indices by group (the pager's groups are tenants): `group_of` maps an owner key
  // >= 0 to its group, and must give the same group from allocation to release. Set it while
  // nothing is owned.
  void set_group_of(std::function<int32_t(int64_t)> group_of);
  // Indices owned by owners of `group` (0 without grouping).
  int64_t group_count(int32_t group) const;

  // Empty when consistent, else what is wrong: the free list against the owners, and the group
  // counts against the owners.
  std::string check() const;
  int64_t bytes() const;

 private:
  void check_range(int64_t index, const char* what) const;
  [[noreturn]] void fail(const std::string& what) const;

  std::string name_;
  std::vector<int64_t> owner_;    // per index: owner key or kNoOwner
  std::vector<int32_t> free_;     // stack of free indices
  std::vector<int32_t> free_at_;  // per index: its position in free_, or -1 when owned
  std::function<int32_t(int64_t)> group_of_;
  std::unordered_map<int32_t, int64_t> group_count_;
};

}  // namespace paged_kv::engine
