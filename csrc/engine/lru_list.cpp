#include "engine/lru_list.h"

#include <sstream>

#include "engine/pager_errors.h"

namespace paged_kv::engine {

LruList::LruList(int64_t capacity)
    : prev_(static_cast<size_t>(capacity), kOut),
      next_(static_cast<size_t>(capacity), kOut),
      dirty_(static_cast<size_t>(capacity), 0) {}

void LruList::set_dirty(int64_t node, bool dirty) {
  if (!contains(node)) throw PagerInternalError("paged_kv pager: internal error: LRU flag of an unlisted node");
  num_dirty_ += static_cast<int64_t>(dirty) - static_cast<int64_t>(dirty_[node]);
  dirty_[node] = dirty ? 1 : 0;
}

void LruList::push_back(int64_t node, bool dirty) {
  if (contains(node)) throw PagerInternalError("paged_kv pager: internal error: LRU insert of a listed node");
  const int32_t n = static_cast<int32_t>(node);
  prev_[n] = tail_;
  next_[n] = kNone;
  if (tail_ != kNone) {
    next_[tail_] = n;
  } else {
    head_ = n;
  }
  tail_ = n;
  ++size_;
  dirty_[n] = dirty ? 1 : 0;
  num_dirty_ += dirty ? 1 : 0;
}

void LruList::remove(int64_t node) {
  if (!contains(node)) throw PagerInternalError("paged_kv pager: internal error: LRU removal of an unlisted node");
  const int32_t p = prev_[node];
  const int32_t n = next_[node];
  if (p != kNone) {
    next_[p] = n;
  } else {
    head_ = n;
  }
  if (n != kNone) {
    prev_[n] = p;
  } else {
    tail_ = p;
  }
  prev_[node] = kOut;
  next_[node] = kOut;
  --size_;
  num_dirty_ -= dirty_[node];
  dirty_[node] = 0;
}

void LruList::touch(int64_t node) {
  if (tail_ == node) return;
  const bool dirty = is_dirty(node);
  remove(node);
  push_back(node, dirty);
}

std::vector<int64_t> LruList::order() const {
  std::vector<int64_t> nodes;
  nodes.reserve(static_cast<size_t>(size_));
  for (int32_t n = head_; n != kNone && static_cast<int64_t>(nodes.size()) <= size_; n = next_[n]) {
    nodes.push_back(n);
  }
  return nodes;
}

std::string LruList::check(const std::string& name) const {
  std::ostringstream m;
  int64_t walked = 0;
  int32_t previous = kNone;
  const int64_t capacity = static_cast<int64_t>(prev_.size());
  for (int32_t n = head_; n != kNone; n = next_[n]) {
    if (n < 0 || n >= capacity || walked > size_) {
      m << name << " LRU list is corrupt (bad link or a cycle); ";
      return m.str();
    }
    if (prev_[n] != previous) m << name << " LRU node " << n << " has a bad back link; ";
    previous = n;
    ++walked;
  }
  if (previous != tail_) m << name << " LRU tail is not the last node; ";
  if (walked != size_) m << name << " LRU holds " << walked << " nodes but counts " << size_ << "; ";
  int64_t listed = 0, dirty = 0;
  for (int64_t i = 0; i < capacity; ++i) {
    if (prev_[i] != kOut) ++listed;
    if (dirty_[i] && prev_[i] == kOut) m << name << " LRU node " << i << " is dirty but unlisted; ";
    dirty += dirty_[i];
    if ((prev_[i] == kOut) != (next_[i] == kOut)) m << name << " LRU node " << i << " is half linked; ";
  }
  if (listed != size_) m << name << " LRU marks " << listed << " nodes listed but counts " << size_ << "; ";
  if (dirty != num_dirty_) m << name << " LRU flags " << dirty << " dirty nodes but counts " << num_dirty_ << "; ";
  return m.str();
}

int64_t LruList::bytes() const {
  return static_cast<int64_t>((prev_.capacity() + next_.capacity()) * sizeof(int32_t) + dirty_.capacity());
}

}  // namespace paged_kv::engine
