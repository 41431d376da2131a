// Pager::CallScope, used by the pager's public calls (internal to pager*.cpp).
#pragma once

#include <vector>

#include "engine/pager.h"

namespace paged_kv::engine {

// For the length of one public call: pins its pages, so that they never evict each other, and
// on the way out flushes the moves issued (also when the call raises, so no copy is left in
// flight behind the caller's back) and unpins them.
class Pager::CallScope {
 public:
  CallScope(Pager& pager, const std::vector<PageId>& pages) : pager_(pager), pages_(pages) {
    try {
      for (; pinned_ < pages_.size(); ++pinned_) pager_.add_pin(pages_[pinned_]);
    } catch (...) {
      unpin_all();
      throw;
    }
  }
  ~CallScope() {
    try {
      pager_.flush_moves();
    } catch (...) {
      // Only reached while another error propagates: the normal path flushes before this.
    }
    unpin_all();
  }
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

 private:
  void unpin_all() {
    while (pinned_ > 0) {
      const PageId id = pages_[--pinned_];
      PageMeta& m = pager_.meta(id);
      --m.pins;
      pager_.relink(id, m);
    }
  }

  Pager& pager_;
  const std::vector<PageId> pages_;  // a copy: callers may pass a temporary
  size_t pinned_ = 0;
};

}  // namespace paged_kv::engine
