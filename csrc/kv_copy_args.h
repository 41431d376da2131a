// Argument checks shared by the CPU and CUDA registrations of append_kv and gather_kv. Every
// failure names the op, the argument, what was expected and what came.
#pragma once

#include <torch/library.h>

#include <string>

#include "core/page_geometry.h"
#include "core/page_lookup.h"
#include "core/pte.h"
#include "tensor_checks.h"

namespace paged_kv {

inline bool is_kv_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat;
}

// Checks the pool and returns its geometry.
inline PageGeometry check_pool(const char* op, const at::Tensor& pool) {
  check_defined(op, "pool", pool);
  TORCH_CHECK(pool.dim() == 6, op, ": pool must be [num_frames, num_layers, 2, num_kv_heads, ",
              "page_size, head_dim], got ", pool.dim(), " dimensions ", pool.sizes());
  TORCH_CHECK(pool.size(2) == 2, op, ": pool dimension 2 must be 2 (K and V), got ",
              pool.size(2));
  TORCH_CHECK(is_kv_dtype(pool.scalar_type()), op,
              ": pool must be float16, bfloat16 or float32, got ", pool.scalar_type());
  TORCH_CHECK(pool.is_contiguous(), op, ": pool must be contiguous");
  TORCH_CHECK(is_supported_page_size(pool.size(4)), op,
              ": page size (pool dimension 4) must be 16, 32, 64, 128 or 256, got ",
              pool.size(4));
  TORCH_CHECK(pool.size(0) <= kPteMaxIndex, op, ": pool has ", pool.size(0),
              " frames, more than a PTE can index (", kPteMaxIndex, ")");
  PageGeometry g;
  g.num_frames = pool.size(0);
  g.num_layers = pool.size(1);
  g.num_kv_heads = pool.size(3);
  g.page_size = pool.size(4);
  g.head_dim = pool.size(5);
  TORCH_CHECK(g.num_layers > 0 && g.num_kv_heads > 0 && g.head_dim > 0, op,
              ": pool must have at least one layer, KV head and head_dim element, got ",
              pool.sizes());
  return g;
}

inline PageTableView check_page_table(const char* op, const at::Tensor& page_table,
                                      const at::Tensor& pool) {
  check_defined(op, "page_table", page_table);
  TORCH_CHECK(page_table.scalar_type() == at::kInt, op, ": page_table must be int32, got ",
              page_table.scalar_type());
  TORCH_CHECK(page_table.dim() == 2, op,
              ": page_table must be [max_sequences, max_pages], got ", page_table.dim(),
              " dimensions");
  TORCH_CHECK(page_table.device() == pool.device(), op,
              ": page_table must be on the pool's device ", pool.device(), ", got ",
              page_table.device());
  TORCH_CHECK(page_table.size(1) <= 1 || page_table.stride(1) == 1, op,
              ": page_table rows must be contiguous (stride 1 along max_pages)");
  TORCH_CHECK(page_table.size(0) < (int64_t{1} << 31) && page_table.size(1) < (int64_t{1} << 31),
              op, ": page_table is too large: ", page_table.sizes());
  return PageTableView{page_table.data_ptr<int32_t>(), page_table.size(0), page_table.size(1),
                       page_table.size(0) > 0 ? page_table.stride(0) : 0};
}

// An int32 index vector on the pool's device of `length` entries, one per `each` (any length
// when `length` is negative).
inline void check_index_vector(const char* op, const char* name, const at::Tensor& t,
                               int64_t length, const char* each, const at::Tensor& pool) {
  check_defined(op, name, t);
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be one-dimensional, got ", t.dim(),
              " dimensions");
  TORCH_CHECK(length < 0 || t.size(0) == length, op, ": ", name, " must have ", length,
              " entries (one per ", each, "), got ", t.size(0));
  TORCH_CHECK(t.device() == pool.device(), op, ": ", name, " must be on the pool's device ",
              pool.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// K or V rows [num_tokens, num_kv_heads, head_dim] matching the pool.
inline void check_token_rows(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& pool, const PageGeometry& g) {
  check_defined(op, name, t);
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be [num_tokens, num_kv_heads, head_dim], got ",
              t.dim(), " dimensions ", t.sizes());
  TORCH_CHECK(t.size(1) == g.num_kv_heads && t.size(2) == g.head_dim, op, ": ", name,
              " must be [num_tokens, ", g.num_kv_heads, ", ", g.head_dim,
              "] to match the pool, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == pool.scalar_type(), op, ": ", name, " must have the pool's dtype ",
              pool.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == pool.device(), op, ": ", name, " must be on the pool's device ",
              pool.device(), ", got ", t.device());
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == 1, op, ": ", name,
              " must be contiguous along head_dim (stride 1), got strides ", t.strides());
}

inline void check_layer(const char* op, int64_t layer, const PageGeometry& g) {
  TORCH_CHECK(layer >= 0 && layer < g.num_layers, op, ": layer must be in [0, ", g.num_layers,
              "), got ", layer);
}

// All checks of append_kv; returns what the kernels need.
struct AppendKvArgs {
  PageGeometry geometry;
  PageTableView table;
  int64_t num_tokens;
};

inline AppendKvArgs check_append_kv_args(const at::Tensor& key, const at::Tensor& value,
                                         const at::Tensor& pool, const at::Tensor& page_table,
                                         const at::Tensor& sequences, const at::Tensor& positions,
                                         int64_t layer) {
  constexpr const char* op = "paged_kv.append_kv";
  const PageGeometry g = check_pool(op, pool);
  const PageTableView table = check_page_table(op, page_table, pool);
  check_token_rows(op, "key", key, pool, g);
  check_token_rows(op, "value", value, pool, g);
  TORCH_CHECK(key.size(0) == value.size(0), op, ": key has ", key.size(0),
              " tokens but value has ", value.size(0));
  check_index_vector(op, "sequences", sequences, key.size(0), "token", pool);
  check_index_vector(op, "positions", positions, key.size(0), "token", pool);
  check_layer(op, layer, g);
  return {g, table, key.size(0)};
}

// All checks of gather_kv; returns what the kernels need.
struct GatherKvArgs {
  PageGeometry geometry;
  PageTableView table;
  int64_t num_pages;
};

inline GatherKvArgs check_gather_kv_args(const at::Tensor& pool, const at::Tensor& page_table,
                                         int64_t sequence, const at::Tensor& pages,
                                         int64_t layer) {
  constexpr const char* op = "paged_kv.gather_kv";
  const PageGeometry g = check_pool(op, pool);
  const PageTableView table = check_page_table(op, page_table, pool);
  check_index_vector(op, "pages", pages, -1, "page", pool);
  check_layer(op, layer, g);
  TORCH_CHECK(sequence >= 0 && sequence < table.max_sequences, op, ": sequence must be in [0, ",
              table.max_sequences, "), got ", sequence);
  return {g, table, pages.size(0)};
}

}  // namespace paged_kv
