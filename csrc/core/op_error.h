// Errors that kernels detect in their inputs (torch-free).
//
// A kernel never dereferences a bad page-table entry or index. It skips the work item and
// records the first error it meets in an OpError; the host turns that into a clear message.
// CPU kernels fill the same record, so CPU and CUDA report identical messages.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>

#include "core/pte.h"

namespace paged_kv {

enum class OpErrorCode : int32_t {
  kNone = 0,
  kSequenceOutOfRange = 1,  // sequence index outside the page table's rows
  kPositionOutOfRange = 2,  // token position negative or past the page table's columns
  kPageOutOfRange = 3,      // logical page index negative or past the page table's columns
  kPageNotReadable = 4,     // PTE names a tier this op cannot reach (host, disk, unmapped)
  kFrameOutOfRange = 5,     // tier-0 PTE names a frame outside the pool
  kSlotOutOfRange = 6,      // tier-1 PTE names a slot outside the host pool
  kQueryLengthOutOfRange = 7,  // a sequence's query count is negative, above max_query_len or
                               // above its KV length
  kKvLengthOutOfRange = 8,  // a sequence's KV length is past the page table's columns
  kQueryStartsInvalid = 9,  // query_starts does not start at 0 or end at the query count
};

// Which op recorded an error.
enum class OpId : int32_t { kAppendKv = 1, kGatherKv = 2, kAttention = 3 };

inline const char* op_name(int32_t op) {
  switch (static_cast<OpId>(op)) {
    case OpId::kAppendKv: return "paged_kv.append_kv";
    case OpId::kGatherKv: return "paged_kv.gather_kv";
    case OpId::kAttention: return "paged_kv.attention";
    default: return "paged_kv";
  }
}

inline const char* op_item_name(int32_t op) {
  switch (static_cast<OpId>(op)) {
    case OpId::kGatherKv: return "requested page";
    case OpId::kAttention: return "batch entry";
    default: return "token";
  }
}

// A self-contained record (int32 words only), so CUDA code can fill it with plain stores after
// winning an atomicCAS on `code`, and the host can describe it long after the launch.
struct OpError {
  int32_t code;           // OpErrorCode; only the first error recorded is kept
  int32_t op;             // OpId
  int32_t item;           // which input item (token or requested page) failed
  int32_t sequence;       // page-table row
  int32_t value;          // the position or logical page that failed
  int32_t pte;            // the PTE read, or -1 when none was read (kQueryLengthOutOfRange:
                          // the sequence's KV length; kQueryStartsInvalid: the query count)
  int32_t num_frames;     // the geometry the op ran with, for the message (kSlotOutOfRange:
                          // the host pool's slots)
  int32_t max_sequences;
  int32_t max_pages;
  int32_t page_size;
};
constexpr int kOpErrorWords = sizeof(OpError) / sizeof(int32_t);

// "page 3 of sequence 1", or for a token "position 800 of sequence 1 (page 3)".
inline std::string page_words(const OpError& e) {
  std::ostringstream m;
  if (static_cast<OpId>(e.op) == OpId::kAppendKv) {
    m << "position " << e.value << " of sequence " << e.sequence << " (page "
      << (e.page_size > 0 ? e.value / e.page_size : 0) << ")";
  } else {
    m << "page " << e.value << " of sequence " << e.sequence;
  }
  return m.str();
}

inline std::string describe_op_error(const OpError& e) {
  std::ostringstream m;
  m << op_name(e.op) << ": " << op_item_name(e.op) << " " << e.item << ": ";
  switch (static_cast<OpErrorCode>(e.code)) {
    case OpErrorCode::kNone:
      m << "no error";
      break;
    case OpErrorCode::kSequenceOutOfRange:
      m << "sequence index " << e.sequence << " is outside the page table's " << e.max_sequences
        << " rows";
      break;
    case OpErrorCode::kPositionOutOfRange:
      m << "position " << e.value << " of sequence " << e.sequence << " is outside [0, "
        << static_cast<int64_t>(e.max_pages) * e.page_size << ") (the page table has "
        << e.max_pages << " pages of " << e.page_size << " tokens per sequence)";
      break;
    case OpErrorCode::kPageOutOfRange:
      m << "logical page " << e.value << " of sequence " << e.sequence
        << " is outside the page table's " << e.max_pages << " columns";
      break;
    case OpErrorCode::kPageNotReadable: {
      Tier tier = pte_tier(e.pte);
      m << page_words(e) << " has PTE " << e.pte << " (" << tier_name(tier);
      if (tier != Tier::kUnmapped) m << " " << pte_index(e.pte);
      if (static_cast<OpId>(e.op) == OpId::kAttention) {
        m << "), which this call cannot read and no fault queue was given to record it in";
      } else {
        m << "), which this op cannot read: it reads tier-0 GPU frames only";
      }
      break;
    }
    case OpErrorCode::kFrameOutOfRange:
      m << page_words(e) << " maps to GPU frame " << pte_index(e.pte) << ", outside the pool's "
        << e.num_frames << " frames";
      break;
    case OpErrorCode::kSlotOutOfRange:
      m << page_words(e) << " maps to host slot " << pte_index(e.pte)
        << ", outside the host pool's " << e.num_frames << " slots";
      break;
    case OpErrorCode::kQueryLengthOutOfRange:
      m << "sequence " << e.sequence << " has " << e.value
        << " queries, which must be in [0, min(max_query_len, KV length)] (KV length "
        << e.pte << ")";
      break;
    case OpErrorCode::kKvLengthOutOfRange:
      m << "KV length " << e.value << " of sequence " << e.sequence << " is outside [0, "
        << static_cast<int64_t>(e.max_pages) * e.page_size << "] (the page table has "
        << e.max_pages << " pages of " << e.page_size << " tokens per sequence)";
      break;
    case OpErrorCode::kQueryStartsInvalid:
      if (e.item == 0) {
        m << "query_starts[0] must be 0, got " << e.value;
      } else {
        m << "query_starts[" << e.item << "] (the last entry) must equal the number of queries "
          << e.pte << ", got " << e.value;
      }
      break;
    default:
      m << "unknown error code " << e.code;
  }
  return m.str();
}

}  // namespace paged_kv
