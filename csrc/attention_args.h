// Argument checks of attention, shared by the CPU and CUDA registrations. Shapes, dtypes and
// devices are checked here on the host; per-sequence values (rows, lengths, PTEs) live in
// tensors and are checked by the kernels themselves (core/op_error.h).
#pragma once

#include <torch/library.h>

#include <cmath>
#include <optional>

#include "core/page_geometry.h"
#include "core/page_lookup.h"
#include "kv_copy_args.h"

namespace paged_kv {

inline bool is_attention_head_dim(int64_t d) { return d == 64 || d == 128 || d == 256; }

struct AttentionArgs {
  PageGeometry geometry;
  PageTableView table;
  int64_t batch;
  int64_t total_queries;
  int64_t num_q_heads;
  int64_t group;  // query heads per KV head
  int64_t layer;
  int64_t max_query_len;
  float scale;
  int64_t window;  // 0: none
  int64_t sinks;
  int64_t host_slots;  // 0 without a host pool
  int64_t fault_capacity;  // -1 without a fault queue
  bool telemetry;
};

inline AttentionArgs check_attention_args(
    const at::Tensor& query, const at::Tensor& pool, const at::Tensor& page_table,
    const at::Tensor& sequences, const at::Tensor& query_starts, const at::Tensor& kv_lens,
    int64_t layer, int64_t max_query_len, std::optional<double> scale, int64_t window,
    int64_t sinks, const std::optional<at::Tensor>& host_pool,
    const std::optional<at::Tensor>& fault_queue, const std::optional<at::Tensor>& fault_count,
    const std::optional<at::Tensor>& telemetry) {
  constexpr const char* op = "paged_kv.attention";
  AttentionArgs a;
  a.geometry = check_pool(op, pool);
  const PageGeometry& g = a.geometry;
  a.table = check_page_table(op, page_table, pool);
  check_layer(op, layer, g);
  a.layer = layer;
  TORCH_CHECK(is_attention_head_dim(g.head_dim), op, ": head_dim must be 64, 128 or 256, got ",
              g.head_dim);

  check_defined(op, "query", query);
  TORCH_CHECK(query.dim() == 3, op, ": query must be [total_queries, num_q_heads, head_dim], got ",
              query.dim(), " dimensions ", query.sizes());
  TORCH_CHECK(query.scalar_type() == pool.scalar_type(), op, ": query must have the pool's dtype ",
              pool.scalar_type(), ", got ", query.scalar_type());
  TORCH_CHECK(query.device() == pool.device(), op, ": query must be on the pool's device ",
              pool.device(), ", got ", query.device());
  TORCH_CHECK(query.size(2) == g.head_dim, op, ": query head_dim ", query.size(2),
              " does not match the pool's ", g.head_dim);
  TORCH_CHECK(query.size(2) <= 1 || query.stride(2) == 1, op,
              ": query must be contiguous along head_dim (stride 1), got strides ",
              query.strides());
  a.total_queries = query.size(0);
  a.num_q_heads = query.size(1);
  TORCH_CHECK(a.num_q_heads > 0 && a.num_q_heads % g.num_kv_heads == 0, op,
              ": query heads (", a.num_q_heads, ") must be a positive multiple of the pool's KV heads (",
              g.num_kv_heads, ")");
  a.group = a.num_q_heads / g.num_kv_heads;

  check_defined(op, "sequences", sequences);
  TORCH_CHECK(sequences.dim() == 1, op, ": sequences must be one-dimensional, got ",
              sequences.dim(), " dimensions");
  a.batch = sequences.size(0);
  check_index_vector(op, "sequences", sequences, a.batch, "batch entry", pool);
  check_defined(op, "query_starts", query_starts);
  TORCH_CHECK(query_starts.dim() == 1 && query_starts.size(0) == a.batch + 1, op,
              ": query_starts must be [batch + 1] = [", a.batch + 1, "], got ",
              query_starts.sizes());
  check_index_vector(op, "query_starts", query_starts, a.batch + 1, "batch entry, plus one", pool);
  check_index_vector(op, "kv_lens", kv_lens, a.batch, "batch entry", pool);
  TORCH_CHECK(a.total_queries < (int64_t{1} << 31), op, ": too many queries: ", a.total_queries);

  TORCH_CHECK(max_query_len >= 1, op, ": max_query_len must be at least 1, got ", max_query_len);
  a.max_query_len = max_query_len;
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(g.head_dim));
  a.scale = static_cast<float>(s);  // checked as the kernels use it: 1e39 is finite, not as a float
  TORCH_CHECK(std::isfinite(a.scale) && a.scale > 0, op, ": scale must be positive and finite, got ",
              s, std::isfinite(s) && s > 0 ? " (not as a float32)" : "");
  TORCH_CHECK(window >= 0, op, ": window must be 0 (none) or positive, got ", window);
  TORCH_CHECK(sinks >= 0, op, ": sinks must be 0 or positive, got ", sinks);
  TORCH_CHECK(sinks == 0 || window > 0, op,
              ": sinks only make sense with a sliding window (window > 0); got sinks=", sinks,
              " and no window");
  a.window = window;
  a.sinks = sinks;

  a.host_slots = 0;
  if (host_pool.has_value()) {
    const at::Tensor& h = *host_pool;
    // Pinned CPU slots, or (CUDA) their mapped view on the pool's GPU, which is what a CUDA graph
    // captured by torch.compile can take as an input; attention_cuda checks that a view's memory
    // is host memory.
    TORCH_CHECK(h.device().is_cpu() || (h.is_cuda() && h.device() == pool.device()), op,
                ": host_pool must be a pinned CPU tensor or its mapped view on the pool's device ",
                pool.device(), " (paged_kv.ops.mapped_host_view), got a tensor on ", h.device());
    TORCH_CHECK(h.scalar_type() == pool.scalar_type(), op, ": host_pool must have the pool's dtype ",
                pool.scalar_type(), ", got ", h.scalar_type());
    TORCH_CHECK(h.dim() == 6 && h.size(1) == g.num_layers && h.size(2) == 2 &&
                    h.size(3) == g.num_kv_heads && h.size(4) == g.page_size &&
                    h.size(5) == g.head_dim,
                op, ": host_pool must be [num_slots, ", g.num_layers, ", 2, ", g.num_kv_heads, ", ",
                g.page_size, ", ", g.head_dim, "] to match the pool, got ", h.sizes());
    TORCH_CHECK(h.is_contiguous(), op, ": host_pool must be contiguous");
    TORCH_CHECK(h.size(0) <= kPteMaxIndex, op, ": host_pool has more slots than a PTE can index");
    if (pool.is_cuda() && h.device().is_cpu() && h.numel() > 0) {  // an empty one is never pinned
      TORCH_CHECK(h.is_pinned(), op,
                  ": host_pool must be in pinned memory for the GPU to read it (pin_memory())");
    }
    a.host_slots = h.size(0);
  }

  TORCH_CHECK(fault_queue.has_value() == fault_count.has_value(), op,
              ": fault_queue and fault_count must be given together");
  a.fault_capacity = -1;
  if (fault_queue.has_value()) {
    const at::Tensor& q = *fault_queue;
    const at::Tensor& c = *fault_count;
    TORCH_CHECK(q.scalar_type() == at::kInt && q.dim() == 2 && q.size(1) == 2, op,
                ": fault_queue must be int32 [capacity, 2], got ", q.scalar_type(), " ", q.sizes());
    TORCH_CHECK(q.is_contiguous(), op, ": fault_queue must be contiguous");
    TORCH_CHECK(q.device() == pool.device(), op, ": fault_queue must be on the pool's device ",
                pool.device(), ", got ", q.device());
    TORCH_CHECK(c.scalar_type() == at::kInt && c.numel() == 1, op,
                ": fault_count must be int32 with one element, got ", c.scalar_type(), " ",
                c.sizes());
    TORCH_CHECK(c.device() == pool.device(), op, ": fault_count must be on the pool's device ",
                pool.device(), ", got ", c.device());
    a.fault_capacity = q.size(0);
  }

  a.telemetry = telemetry.has_value();
  if (telemetry.has_value()) {
    const at::Tensor& t = *telemetry;
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": telemetry must be float32, got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == a.table.max_sequences &&
                    t.size(1) == a.table.max_pages,
                op, ": telemetry must be [", a.table.max_sequences, ", ", a.table.max_pages,
                "] like the page table, got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": telemetry must be contiguous");
    TORCH_CHECK(t.device() == pool.device(), op, ": telemetry must be on the pool's device ",
                pool.device(), ", got ", t.device());
  }
  return a;
}

}  // namespace paged_kv
