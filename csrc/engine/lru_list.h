// A least-recently-used order over the nodes [0, capacity) of one tier (torch-free).
//
// Nodes are frames or slots, so the list needs no allocation: two int32 links and a flag per
// node. The pager keeps in it only the nodes it may evict (never those of pinned or open pages),
// so the victim is the front, and touch, remove and victim are O(1). Each node also says whether
// evicting it needs a write (a dirty node: its page has no copy in a lower tier); the list counts
// them, so the pager knows in O(1) how much room a tier can make.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace paged_kv::engine {

class LruList {
 public:
  explicit LruList(int64_t capacity);

  int64_t capacity() const { return static_cast<int64_t>(prev_.size()); }
  int64_t size() const { return size_; }
  int64_t num_dirty() const { return num_dirty_; }
  bool contains(int64_t node) const { return prev_[node] != kOut; }
  bool is_dirty(int64_t node) const { return dirty_[node] != 0; }
  // The least recently used node, or -1 when the list is empty.
  int64_t front() const { return head_; }
  // The node used after `node` (in the list), or -1 after the last.
  int64_t next(int64_t node) const { return next_[node]; }
  // Inserts `node` (not in the list) as the most recently used.
  void push_back(int64_t node, bool dirty);
  void set_dirty(int64_t node, bool dirty);
  // Removes `node` (in the list).
  void remove(int64_t node);
  // Moves `node` (in the list) to the most recently used end.
  void touch(int64_t node);
  // The nodes from least to most recently used.
  std::vector<int64_t> order() const;

  // Empty when the links are consistent, else what is wrong.
  std::string check(const std::string& name) const;
  int64_t bytes() const;

 private:
  static constexpr int32_t kNone = -1;  // end of the list
  static constexpr int32_t kOut = -2;   // the node is not in the list

  std::vector<int32_t> prev_;
  std::vector<int32_t> next_;
  std::vector<uint8_t> dirty_;
  int32_t head_ = kNone;
  int32_t tail_ = kNone;
  int64_t size_ = 0;
  int64_t num_dirty_ = 0;
};

}  // namespace paged_kv::engine
