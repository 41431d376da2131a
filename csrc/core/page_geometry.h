// Page geometry: where each K/V row of a page lives inside a frame or slot (torch-free).
//
// Every frame (GPU) and slot (host, disk) has the byte layout
//   [num_layers][2 (K, V)][num_kv_heads][page_size][head_dim]
// so one head's K of one layer of one page is contiguous. A pool of frames is one array
//   [num_frames][num_layers][2][num_kv_heads][page_size][head_dim].
// Offsets are computed in 64 bits: a pool larger than 4 GiB overflows 32-bit offsets.
#pragma once

#include <cstdint>

#include "core/portability.h"

namespace paged_kv {

// Page sizes (tokens per page) the project supports.
constexpr int kPageSizes[] = {16, 32, 64, 128, 256};

inline bool is_supported_page_size(int64_t page_size) {
  for (int s : kPageSizes) {
    if (s == page_size) return true;
  }
  return false;
}

enum class KvPart : int { kKey = 0, kValue = 1 };

struct PageGeometry {
  int64_t num_frames = 0;
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t page_size = 0;
  int64_t head_dim = 0;

  // Elements in one page (all layers, K and V, all heads).
  PKV_HOST_DEVICE inline int64_t page_elems() const {
    return num_layers * 2 * num_kv_heads * page_size * head_dim;
  }

  // Element offset of row `token` (0 <= token < page_size) of `head`'s K or V in `layer` of
  // frame `frame`; the row holds head_dim contiguous elements.
  PKV_HOST_DEVICE inline int64_t row_offset(int64_t frame, int64_t layer, int kv, int64_t head,
                                            int64_t token) const {
    return ((((frame * num_layers + layer) * 2 + kv) * num_kv_heads + head) * page_size + token) *
           head_dim;
  }
};

}  // namespace paged_kv
