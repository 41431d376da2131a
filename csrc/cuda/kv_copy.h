// Launchers of the K/V copy kernels (append into pages, gather out of pages). Torch-free: raw
// pointers, sizes in elements or bytes as named, the CUDA stream as an opaque handle.
#pragma once

#include <cstdint>

#include "core/op_error.h"
#include "core/page_geometry.h"
#include "core/page_lookup.h"

namespace paged_kv::cuda {

// Strided [num_tokens, num_kv_heads, head_dim] source rows (head_dim contiguous).
struct TokenRows {
  const void* data;
  int64_t token_stride;  // in elements
  int64_t head_stride;   // in elements
};

// Writes K and V of `num_tokens` tokens into `layer` of their pages.
//   key, value:  [num_tokens, num_kv_heads, head_dim], element size `elem_bytes`
//   pool:        [num_frames, num_layers, 2, num_kv_heads, page_size, head_dim]
//   sequences:   int32 [num_tokens], the page-table row of each token
//   positions:   int32 [num_tokens], the token's position in its sequence
//   error:       device-visible OpError, filled with the first bad input met
// Returns the cudaError_t of the launch as an int.
int launch_append_kv(TokenRows key, TokenRows value, void* pool, const PageGeometry& geometry,
                     int64_t elem_bytes, const PageTableView& table, const int32_t* sequences,
                     const int32_t* positions, int64_t num_tokens, int64_t layer,
                     OpError* error, void* stream);

// Reads whole pages of one sequence out of `layer` into contiguous K and V.
//   pages:        int32 [num_pages], logical pages of row `sequence`, any order, repeats allowed
//   key_out, value_out: [num_pages * page_size, num_kv_heads, head_dim], contiguous
// A page that cannot be read is recorded in `error` and its output rows are filled with
// all-ones bytes (NaN in every supported float type).
int launch_gather_kv(const void* pool, const PageGeometry& geometry, int64_t elem_bytes,
                     const PageTableView& table, int64_t sequence, const int32_t* pages,
                     int64_t num_pages, int64_t layer, void* key_out, void* value_out,
                     OpError* error, void* stream);

}  // namespace paged_kv::cuda
