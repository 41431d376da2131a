// The check every op runs first on each tensor argument: a tensor was given. None for a tensor
// of the schema arrives as an undefined tensor, whose sizes and dtype would make the op's other
// checks name the wrong fault.
#pragma once

#include <torch/library.h>

namespace paged_kv {

inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
}

}  // namespace paged_kv
