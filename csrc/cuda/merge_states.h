// Launcher of the merge_states kernel (torch-free).
#pragma once

#include <cstdint>

namespace paged_kv::cuda {

enum class FloatType { kFloat16, kBFloat16, kFloat32 };

// outputs: [num_states, rows, head_dim] of `type`, contiguous; lses: float [num_states, rows];
// out: [rows, head_dim] of `type`; lse_out: float [rows]. Returns the launch's cudaError_t.
int launch_merge_states(const void* outputs, const float* lses, int64_t num_states, int64_t rows,
                        int64_t head_dim, FloatType type, void* out, float* lse_out,
                        void* stream);

}  // namespace paged_kv::cuda
