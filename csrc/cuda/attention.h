// Launcher of the paged attention kernel (torch-free: raw pointers, sizes, an opaque stream).
//
// One kernel serves decode and prefill: a thread block takes a tile of query rows (query tokens
// times the query heads of one KV-head group, so each K/V byte is read once per group) and a
// split of the sequence's keys, streams K/V tiles through shared memory with cp.async and runs
// both matrix products on tensor cores (mma.sync m16n8k16). Decode blocks give each warp its
// own tiles and pipeline; prefill blocks share every tile among their warps. Splits of one
// sequence are merged by log-sum-exp in a second kernel.
#pragma once

#include <cstdint>

#include "core/op_error.h"
#include "core/page_geometry.h"
#include "core/page_lookup.h"

namespace paged_kv::cuda {

struct AttentionProblem {
  const void* query;  // [total_queries, num_q_heads, head_dim], head_dim contiguous
  int64_t query_token_stride;  // in elements
  int64_t query_head_stride;
  const void* pool;  // [F, L, 2, H, P, D]
  PageGeometry geometry;
  const void* host_pool;  // device-visible pointer to pinned [S, L, 2, H, P, D]
  bool has_host_pool;     // tier-1 pages are read (even from a pool of 0 slots: all bad)
  int64_t host_slots;
  PageTableView table;
  const int32_t* sequences;     // [batch]
  const int32_t* query_starts;  // [batch + 1]
  const int32_t* kv_lens;       // [batch]
  int64_t batch;
  int64_t total_queries;
  int64_t num_q_heads;
  int64_t group;  // query heads per KV head
  int64_t layer;
  int64_t max_query_len;
  float scale;
  int64_t window;  // 0: none
  int64_t sinks;
  int32_t* fault_queue;  // [capacity, 2] or null
  int32_t* fault_count;  // [1] or null
  int64_t fault_capacity;
  bool telemetry;
  bool bf16;  // else float16
};

// How a problem is cut into blocks; the caller sizes its workspaces from it.
struct AttentionPlan {
  int64_t query_tiles;   // query-row tiles per (sequence, KV head)
  int64_t num_splits;    // key splits per sequence; > 1 needs the partial workspaces
  int64_t chunk_tokens;  // telemetry granularity: min(page_size, key tile)
  int64_t max_chunks;    // telemetry chunks per sequence
  bool wide_decode;      // decode with the 8-warp block (see attention.cu, uses_wide_decode)
  bool keys_as_m;        // decode blocks of at most 8 rows, keys on the MMA's M side
  // Decode without a window: the counters (zero before the launch, zero after it) from which
  // warps claim the tail of each sequence's key tiles.
  int64_t claim_counters;
  // Block columns: one per (sequence, KV head, query tile).
  int64_t columns;
  // Blocks along the grid's x: one per column, or fewer for a decode grid of more columns than
  // fit on the GPU at once (each block then attends several columns in turn).
  int64_t grid_columns;
};

AttentionPlan plan_attention(const AttentionProblem& problem, int num_sms);

// Workspaces (device memory):
//   partial_out  float32 [num_splits, total_queries, num_q_heads, head_dim]  (num_splits > 1)
//   partial_lse  float32 [num_splits, total_queries, num_q_heads]            (num_splits > 1)
//   chunk_lse    float32 [batch, num_q_heads, max_chunks] filled with -inf   (telemetry)
//   tile_claims  int32 [claim_counters], zero; the launch leaves it zero      (claim_counters > 0)
// Outputs: out [total_queries, num_q_heads, head_dim] (query dtype), lse float32 [total_queries,
// num_q_heads]. telemetry float32 [max_sequences, max_pages] is added to when not null.
// Returns the cudaError_t of the launches as an int.
int launch_attention(const AttentionProblem& problem, const AttentionPlan& plan, void* out,
                     float* lse, float* partial_out, float* partial_lse, float* chunk_lse,
                     int* tile_claims, float* telemetry, OpError* error, void* stream);

}  // namespace paged_kv::cuda
