// Argument checks of merge_states, shared by the CPU and CUDA registrations.
#pragma once

#include <torch/library.h>

#include "tensor_checks.h"

namespace paged_kv {

inline void check_merge_states_args(const at::Tensor& outputs, const at::Tensor& lses) {
  constexpr const char* op = "paged_kv.merge_states";
  check_defined(op, "outputs", outputs);
  check_defined(op, "lses", lses);
  TORCH_CHECK(outputs.dim() == 4, op, ": outputs must be [num_states, num_queries, num_heads, ",
              "head_dim], got ", outputs.dim(), " dimensions ", outputs.sizes());
  TORCH_CHECK(outputs.size(0) >= 1, op, ": outputs must hold at least one state");
  TORCH_CHECK(outputs.scalar_type() == at::kHalf || outputs.scalar_type() == at::kBFloat16 ||
                  outputs.scalar_type() == at::kFloat,
              op, ": outputs must be float16, bfloat16 or float32, got ", outputs.scalar_type());
  TORCH_CHECK(lses.scalar_type() == at::kFloat, op, ": lses must be float32, got ",
              lses.scalar_type());
  TORCH_CHECK(lses.dim() == 3 && lses.size(0) == outputs.size(0) &&
                  lses.size(1) == outputs.size(1) && lses.size(2) == outputs.size(2),
              op, ": lses must be [", outputs.size(0), ", ", outputs.size(1), ", ", outputs.size(2),
              "] to match outputs, got ", lses.sizes());
  TORCH_CHECK(lses.device() == outputs.device(), op, ": lses must be on outputs' device ",
              outputs.device(), ", got ", lses.device());
}

}  // namespace paged_kv
