// Device-side recording of the first bad input an op meets (see core/op_error.h).
#pragma once

#include "core/op_error.h"
#include "core/page_geometry.h"
#include "core/page_lookup.h"

namespace paged_kv::cuda {

__device__ inline void record_op_error(OpError* error, OpErrorCode code, OpId op, int64_t item,
                                       int64_t sequence, int64_t value, int32_t pte,
                                       const PageGeometry& geometry, const PageTableView& table) {
  // The first thread to claim `code` fills the rest; later errors are dropped (one is enough to
  // fail the op, and the host reports it).
  if (atomicCAS(&error->code, 0, static_cast<int32_t>(code)) != 0) return;
  error->op = static_cast<int32_t>(op);
  error->item = static_cast<int32_t>(item);
  error->sequence = static_cast<int32_t>(sequence);
  error->value = static_cast<int32_t>(value);
  error->pte = pte;
  error->num_frames = static_cast<int32_t>(geometry.num_frames);
  error->max_sequences = static_cast<int32_t>(table.max_sequences);
  error->max_pages = static_cast<int32_t>(table.max_pages);
  error->page_size = static_cast<int32_t>(geometry.page_size);
  __threadfence_system();
}

}  // namespace paged_kv::cuda
