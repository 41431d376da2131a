// Merging partial attention states by their log-sum-exp (torch-free, host and device).
//
// A partial state over a subset of keys is (o_i, lse_i): the softmax-weighted mean of the values
// in the subset and the log-sum-exp of its scores. Over the union,
//   lse = m + log(sum_i exp(lse_i - m)),  o = sum_i exp(lse_i - lse) * o_i,  m = max_i lse_i.
// A state with lse_i = -inf (no keys) has weight 0; if every state is empty, lse = -inf, o = 0.
// A NaN lse_i (a NaN score in that part) makes the merged lse and every weight NaN, as the
// softmax over the union would be.
#pragma once

#include <cmath>

#include "core/portability.h"

namespace paged_kv {

// Running merge: fold states in one at a time with add(); weight(i) is state i's share.
struct LseMerge {
  float max_lse = -INFINITY;
  float sum = 0.f;  // sum of exp(lse_i - max_lse)

  PKV_HOST_DEVICE inline void add(float lse) {
    if (lse == -INFINITY) return;
    if (lse != lse || max_lse != max_lse) {  // NaN, here or before: it stays
      max_lse = sum = NAN;
      return;
    }
    if (lse > max_lse) {
      sum = sum * expf(max_lse - lse) + 1.f;  // exp(-inf) == 0 on the first state
      max_lse = lse;
    } else {
      sum += expf(lse - max_lse);
    }
  }

  PKV_HOST_DEVICE inline float lse() const {
    return max_lse == -INFINITY ? -INFINITY : max_lse + logf(sum);
  }

  // Weight of a state with log-sum-exp `lse_i` in the merged output (call after every add()).
  PKV_HOST_DEVICE inline float weight(float lse_i) const {
    return (lse_i == -INFINITY || max_lse == -INFINITY) ? 0.f : expf(lse_i - max_lse) / sum;
  }
};

}  // namespace paged_kv
