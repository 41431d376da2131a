// Page-table lookups with every check a kernel needs before it touches a frame (torch-free).
#pragma once

#include <cstdint>

#include "core/op_error.h"
#include "core/portability.h"
#include "core/pte.h"

namespace paged_kv {

// A read-only view of the page table int32 [max_sequences, max_pages] with a row stride in
// elements (so a slice of a larger table works too).
struct PageTableView {
  const int32_t* ptes;
  int64_t max_sequences;
  int64_t max_pages;
  int64_t row_stride;
};

// Resolves (sequence, logical page) to a tier-0 frame. On success returns kNone and sets
// `*frame`; otherwise returns the error and sets `*pte_out` to the PTE read (or -1 when none
// was read). Never reads outside the table; never returns a frame outside [0, num_frames).
PKV_HOST_DEVICE inline OpErrorCode lookup_gpu_frame(const PageTableView& table, int64_t sequence,
                                                   int64_t page, int64_t num_frames,
                                                   int64_t* frame, int32_t* pte_out) {
  *pte_out = -1;
  if (sequence < 0 || sequence >= table.max_sequences) return OpErrorCode::kSequenceOutOfRange;
  if (page < 0 || page >= table.max_pages) return OpErrorCode::kPageOutOfRange;
  const int32_t pte = table.ptes[sequence * table.row_stride + page];
  *pte_out = pte;
  if (pte_tier(pte) != Tier::kGpu) return OpErrorCode::kPageNotReadable;
  const int64_t index = pte_index(pte);
  if (index >= num_frames) return OpErrorCode::kFrameOutOfRange;
  *frame = index;
  return OpErrorCode::kNone;
}

// For a token position: the page is position / page_size. A negative position or one past the
// table's columns is kPositionOutOfRange.
PKV_HOST_DEVICE inline OpErrorCode lookup_token_frame(const PageTableView& table,
                                                     int64_t sequence, int64_t position,
                                                     int64_t page_size, int64_t num_frames,
                                                     int64_t* frame, int32_t* pte_out) {
  *pte_out = -1;
  if (sequence < 0 || sequence >= table.max_sequences) return OpErrorCode::kSequenceOutOfRange;
  if (position < 0 || position >= table.max_pages * page_size) {
    return OpErrorCode::kPositionOutOfRange;
  }
  return lookup_gpu_frame(table, sequence, position / page_size, num_frames, frame, pte_out);
}

}  // namespace paged_kv
