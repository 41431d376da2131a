// CPU kernels of append_kv and gather_kv: the reference semantics for the CUDA twins.
//
// Inputs are validated in full before anything is written, so a bad token leaves the pool
// untouched.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include <cstring>

#include "core/op_error.h"
#include "cpu/raise_op_error.h"
#include "kv_copy_args.h"

namespace paged_kv {
namespace {

void append_kv_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& pool,
                   const at::Tensor& page_table, const at::Tensor& sequences,
                   const at::Tensor& positions, int64_t layer) {
  // Plain references, not structured bindings: C++17 lambdas cannot capture those.
  const AppendKvArgs args =
      check_append_kv_args(key, value, pool, page_table, sequences, positions, layer);
  const PageGeometry& g = args.geometry;
  const PageTableView& table = args.table;
  const int64_t num_tokens = args.num_tokens;

  const int32_t* seq = sequences.data_ptr<int32_t>();
  const int32_t* pos = positions.data_ptr<int32_t>();
  std::vector<int64_t> frames(num_tokens);
  for (int64_t t = 0; t < num_tokens; ++t) {
    int32_t pte = -1;
    const OpErrorCode code =
        lookup_token_frame(table, seq[t], pos[t], g.page_size, g.num_frames, &frames[t], &pte);
    if (code != OpErrorCode::kNone) {
      raise_op_error(code, OpId::kAppendKv, t, seq[t], pos[t], pte, g, table);
    }
  }

  const int64_t elem = pool.element_size();
  const int64_t row_bytes = g.head_dim * elem;
  char* pool_bytes = static_cast<char*>(pool.data_ptr());
  const at::Tensor* sources[2] = {&key, &value};
  at::parallel_for(0, num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int kv = 0; kv < 2; ++kv) {
        const at::Tensor& src = *sources[kv];
        const char* src_bytes = static_cast<const char*>(src.data_ptr());
        for (int64_t h = 0; h < g.num_kv_heads; ++h) {
          std::memcpy(pool_bytes + g.row_offset(frames[t], layer, kv, h, pos[t] % g.page_size) * elem,
                      src_bytes + (t * src.stride(0) + h * src.stride(1)) * elem, row_bytes);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gather_kv_cpu(const at::Tensor& pool,
                                                 const at::Tensor& page_table, int64_t sequence,
                                                 const at::Tensor& pages, int64_t layer) {
  const GatherKvArgs args = check_gather_kv_args(pool, page_table, sequence, pages, layer);
  const PageGeometry& g = args.geometry;
  const PageTableView& table = args.table;
  const int64_t num_pages = args.num_pages;

  const int32_t* page = pages.data_ptr<int32_t>();
  std::vector<int64_t> frames(num_pages);
  for (int64_t i = 0; i < num_pages; ++i) {
    int32_t pte = -1;
    const OpErrorCode code =
        lookup_gpu_frame(table, sequence, page[i], g.num_frames, &frames[i], &pte);
    if (code != OpErrorCode::kNone) {
      raise_op_error(code, OpId::kGatherKv, i, sequence, page[i], pte, g, table);
    }
  }

  auto key_out = at::empty({num_pages * g.page_size, g.num_kv_heads, g.head_dim}, pool.options());
  auto value_out = at::empty_like(key_out);
  const int64_t elem = pool.element_size();
  const int64_t row_bytes = g.head_dim * elem;
  const char* pool_bytes = static_cast<const char*>(pool.data_ptr());
  char* outs[2] = {static_cast<char*>(key_out.data_ptr()),
                   static_cast<char*>(value_out.data_ptr())};
  at::parallel_for(0, num_pages, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int kv = 0; kv < 2; ++kv) {
        for (int64_t tok = 0; tok < g.page_size; ++tok) {
          for (int64_t h = 0; h < g.num_kv_heads; ++h) {
            std::memcpy(outs[kv] + ((i * g.page_size + tok) * g.num_kv_heads + h) * row_bytes,
                        pool_bytes + g.row_offset(frames[i], layer, kv, h, tok) * elem,
                        row_bytes);
          }
        }
      }
    }
  });
  return {key_out, value_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(paged_kv, CPU, m) {
  m.impl("append_kv", &append_kv_cpu);
  m.impl("gather_kv", &gather_kv_cpu);
}

}  // namespace paged_kv
