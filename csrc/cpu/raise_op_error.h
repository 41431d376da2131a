// Turns a bad input found by a CPU kernel into the same message the CUDA twin reports
// (core/op_error.h), raised as a c10::Error.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

#include "core/op_error.h"
#include "core/page_geometry.h"
#include "core/page_lookup.h"

namespace paged_kv {

// `g.num_frames` fills the record's num_frames word; for kSlotOutOfRange pass a geometry whose
// num_frames is the host pool's slot count (the word the message reads).
[[noreturn]] inline void raise_op_error(OpErrorCode code, OpId op, int64_t item, int64_t sequence,
                                        int64_t value, int32_t pte, const PageGeometry& g,
                                        const PageTableView& table) {
  OpError e{static_cast<int32_t>(code), static_cast<int32_t>(op),
            static_cast<int32_t>(item),   static_cast<int32_t>(sequence),
            static_cast<int32_t>(value),  pte,
            static_cast<int32_t>(g.num_frames), static_cast<int32_t>(table.max_sequences),
            static_cast<int32_t>(table.max_pages), static_cast<int32_t>(g.page_size)};
  TORCH_CHECK(false, describe_op_error(e));
}

}  // namespace paged_kv
