// Zeroed int32 counters for kernels that hand out work at run time and leave their counters
// at zero when they finish (torch glue, host side).
//
// A counter may be used by one kernel at a time, so every stream gets its own buffer, created
// on the stream's first request, zeroed in stream order, and kept for the life of the process
// (a kernel still queued may hold it). A stream being captured into a CUDA graph gets a buffer
// of its own capture, zeroed by a memset node at the start of the captured work, so a graph
// replayed on any stream never shares counters with eager work. The graph owns that buffer (a
// CUDA user object): once the graph and its executables are destroyed and their launches done,
// the buffer goes to a pool that later streams and captures take from.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace paged_kv::cuda {

// At least `count` counters, zero when work queued on `stream` from now on reaches them.
int* claim_counters(int device, cudaStream_t stream, int64_t count);

// Buffers allocated so far (all devices) and those pooled, after taking back the buffers of
// destroyed graphs (for tests).
struct ClaimCounterStats {
  int64_t allocated, pooled;
};
ClaimCounterStats claim_counter_stats();

}  // namespace paged_kv::cuda
