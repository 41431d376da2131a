// The Hopper prefill kernel (attention_wgmma.cu): the same work as the mma.sync kernel's
// prefill, with warpgroup matrix multiplies (wgmma) reading K and V straight from shared memory.
// It serves prefill of head_dim 64 and 128 on compute capability 9.0 when the library was built
// for sm_90a; PAGED_KV_PREFILL_KERNEL=mma in the environment turns it off (the portable kernel
// then runs, as on every other GPU).
#pragma once

#include <cuda_runtime.h>

#include "cuda/attention.h"

namespace paged_kv::cuda {
namespace detail {
struct Params;
}

// Query rows per block (two warpgroups of 64) and keys per tile.
inline constexpr int kWgmmaRows = 128;
inline constexpr int kWgmmaKeyTile = 128;

// Whether the Hopper kernel serves this (prefill) problem on the current device.
bool wgmma_prefill_applies(const AttentionProblem& problem);

// Resident blocks per multiprocessor of the kernel for this problem's types (0 on an error).
int wgmma_prefill_blocks_per_sm(const AttentionProblem& problem);

// Launches the kernel over `grid` (blocks of (sequence, KV head, query tile) by splits);
// returns the cudaError_t as an int.
int launch_wgmma_prefill(const detail::Params& params, dim3 grid, cudaStream_t stream);

}  // namespace paged_kv::cuda
