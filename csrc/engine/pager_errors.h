// Errors the pager raises (torch-free).
//
//   std::invalid_argument   a bad argument: unknown row, page past a sequence's end, open page
//                           demoted, negative count (ValueError in Python)
//   PagerError              a request the tiers cannot satisfy: every frame pinned or open, or
//                           every tier full (paged_kv.PagerError, a RuntimeError, in Python)
//   PagerInternalError      the pager's own bookkeeping is inconsistent (a frame owned twice, a
//                           free index freed again); never expected, never silent
#pragma once

#include <stdexcept>
#include <string>

namespace paged_kv::engine {

class PagerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class PagerInternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

}  // namespace paged_kv::engine
