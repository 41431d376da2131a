#include "engine/index_allocator.h"

#include <algorithm>
#include <cstddef>
#include <sstream>
#include <utility>

#include "engine/pager_errors.h"

namespace paged_kv::engine {

IndexAllocator::IndexAllocator(std::string name, int64_t capacity)
    : name_(std::move(name)),
      owner_(static_cast<size_t>(capacity), kNoOwner),
      free_at_(static_cast<size_t>(capacity)) {
  // Indices fit in int32 (the PTE holds 30 bits); the pager checks capacities against that.
  free_.reserve(static_cast<size_t>(capacity));
  for (int64_t i = capacity - 1; i >= 0; --i) {  // a stack: index 0 on top
    free_at_[i] = static_cast<int32_t>(free_.size());
    free_.push_back(static_cast<int32_t>(i));
  }
}

void IndexAllocator::fail(const std::string& what) const {
  throw PagerInternalError("paged_kv pager: internal error in the " + name_ + " pool: " + what);
}

void IndexAllocator::check_range(int64_t index, const char* what) const {
  if (index < 0 || index >= capacity()) {
    std::ostringstream m;
    m << what << " " << name_ << " " << index << " is outside [0, " << capacity() << ")";
    fail(m.str());
  }
}

int64_t IndexAllocator::allocate(int64_t owner) {
  if (free_.empty()) fail("allocate from an empty pool");
  const int64_t index = free_.back();
  allocate_at(index, owner);
  return index;
}

std::vector<int64_t> IndexAllocator::allocate_ascending(const std::vector<int64_t>& owners) {
  if (static_cast<int64_t>(owners.size()) > num_free()) fail("allocate more indices than are free");
  std::vector<int64_t> indices(free_.end() - static_cast<std::ptrdiff_t>(owners.size()), free_.end());
  std::sort(indices.begin(), indices.end());
  for (size_t i = 0; i < owners.size(); ++i) allocate_at(indices[i], owners[i]);
  return indices;
}

void IndexAllocator::allocate_at(int64_t index, int64_t owner) {
  check_range(index, "allocate");
  if (owner == kNoOwner) fail("allocate to no owner");
  if (owner_[index] != kNoOwner) {
    std::ostringstream m;
    m << "allocate " << name_ << " " << index << ", which is already owned (owner key "
      << owner_[index] << ", new owner key " << owner << ")";
    fail(m.str());
  }
  // Swap the index with the top of the stack, then pop it.
  const int32_t at = free_at_[index];
  const int32_t top = free_.back();
  free_[at] = top;
  free_at_[top] = at;
  free_.pop_back();
  free_at_[index] = -1;
  owner_[index] = owner;
  if (group_of_ && owner >= 0) ++group_count_[group_of_(owner)];
}

void IndexAllocator::release(int64_t index, int64_t owner) {
  check_range(index, "release");
  if (owner_[index] == kNoOwner) {
    std::ostringstream m;
    m << "release " << name_ << " " << index << ", which is already free";
    fail(m.str());
  }
  if (owner_[index] != owner) {
    std::ostringstream m;
    m << "release " << name_ << " " << index << " for owner key " << owner
      << ", but its owner key is " << owner_[index];
    fail(m.str());
  }
  if (group_of_ && owner >= 0) {
    const auto it = group_count_.find(group_of_(owner));
    if (--it->second == 0) group_count_.erase(it);
  }
  owner_[index] = kNoOwner;
  free_at_[index] = static_cast<int32_t>(free_.size());
  free_.push_back(static_cast<int32_t>(index));
}

void IndexAllocator::transfer(int64_t index, int64_t from, int64_t to) {
  check_range(index, "transfer");
  if (owner_[index] != from || from < 0 || to < 0) {
    std::ostringstream m;
    m << "transfer " << name_ << " " << index << " from owner key " << from << " to " << to
      << ", but its owner key is " << owner_[index];
    fail(m.str());
  }
  if (group_of_ && group_of_(from) != group_of_(to)) fail("transfer between groups");
  owner_[index] = to;
}

void IndexAllocator::set_group_of(std::function<int32_t(int64_t)> group_of) {
  if (num_owned() != 0) fail("grouping set while indices are owned");
  group_of_ = std::move(group_of);
  group_count_.clear();
}

int64_t IndexAllocator::group_count(int32_t group) const {
  const auto it = group_count_.find(group);
  return it == group_count_.end() ? 0 : it->second;
}

std::string IndexAllocator::check() const {
  std::ostringstream m;
  int64_t owned = 0;
  for (int64_t i = 0; i < capacity(); ++i) {
    const bool listed = free_at_[i] >= 0;
    if (listed && (free_at_[i] >= num_free() || free_[free_at_[i]] != i)) {
      m << name_ << " " << i << " has a bad free-list position " << free_at_[i] << "; ";
    }
    if (listed == (owner_[i] != kNoOwner)) {
      m << name_ << " " << i << (listed ? " is on the free list but owned" : " is neither free nor owned")
        << "; ";
    }
    if (owner_[i] != kNoOwner) ++owned;
  }
  if (group_of_) {
    std::unordered_map<int32_t, int64_t> counted;
    for (int64_t i = 0; i < capacity(); ++i) {
      if (owner_[i] >= 0) ++counted[group_of_(owner_[i])];
    }
    if (counted != group_count_) m << name_ << " pool: the per-tenant counts disagree with the owners; ";
  }
  if (owned + num_free() != capacity()) {
    m << name_ << " pool: " << owned << " owned plus " << num_free() << " free is not its capacity "
      << capacity() << "; ";
  }
  return m.str();
}

int64_t IndexAllocator::bytes() const {
  return static_cast<int64_t>(owner_.capacity() * sizeof(int64_t) +
                              free_.capacity() * sizeof(int32_t) +
                              free_at_.capacity() * sizeof(int32_t));
}

}  // namespace paged_kv::engine
