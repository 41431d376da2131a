// Injected I/O faults for tests: arming, counting and naming them.
#include "store/fault_injector.h"

#include <stdexcept>

namespace paged_kv::store {

namespace {

constexpr int kNumKinds = static_cast<int>(FaultKind::kCount);

int index_of(FaultKind kind) { return static_cast<int>(kind); }

}  // namespace

bool FaultInjector::matches(FaultKind kind, IoOp op) {
  switch (kind) {
    case FaultKind::kWriteEio:
    case FaultKind::kWriteEnospc:
    case FaultKind::kShortWrite:
    case FaultKind::kWriteEintr:
      return op == IoOp::kWrite;
    case FaultKind::kReadEio:
    case FaultKind::kReadPartial:
      return op == IoOp::kRead;
    case FaultKind::kAllocFail:
      return op == IoOp::kWrite || op == IoOp::kRead;
    case FaultKind::kDirectIoRefused:
      return op == IoOp::kOpen;
    default:
      return false;
  }
}

void FaultInjector::arm(FaultKind kind, int64_t nth) {
  if (kind == FaultKind::kNone || index_of(kind) <= 0 || index_of(kind) >= kNumKinds) {
    throw std::invalid_argument("FaultInjector::arm: no such fault kind");
  }
  if (nth < 1) {
    throw std::invalid_argument("FaultInjector::arm: nth must be >= 1 (1 fires on the next "
                                "matching operation), got " + std::to_string(nth));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  countdown_[index_of(kind)] = nth;
}

void FaultInjector::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  countdown_.fill(0);
}

FaultKind FaultInjector::next(IoOp op) {
  std::lock_guard<std::mutex> lock(mutex_);
  FaultKind fires = FaultKind::kNone;
  for (int k = 1; k < kNumKinds; ++k) {
    const auto kind = static_cast<FaultKind>(k);
    if (countdown_[k] == 0 || !matches(kind, op)) continue;
    if (countdown_[k] > 1) {
      --countdown_[k];
    } else if (fires == FaultKind::kNone) {
      countdown_[k] = 0;
      ++fired_[k];
      fires = kind;
    }
    // else: it is due too, and stays at 1 so it fires on the next matching operation.
  }
  return fires;
}

int64_t FaultInjector::fired(FaultKind kind) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const int k = index_of(kind);
  return k > 0 && k < kNumKinds ? fired_[k] : 0;
}

const char* FaultInjector::name(FaultKind kind) {
  switch (kind) {
    case FaultKind::kNone: return "none";
    case FaultKind::kWriteEio: return "write_eio";
    case FaultKind::kWriteEnospc: return "write_enospc";
    case FaultKind::kShortWrite: return "short_write";
    case FaultKind::kWriteEintr: return "write_eintr";
    case FaultKind::kReadEio: return "read_eio";
    case FaultKind::kReadPartial: return "read_partial";
    case FaultKind::kAllocFail: return "alloc_fail";
    case FaultKind::kDirectIoRefused: return "direct_io_refused";
    default: return "unknown";
  }
}

std::string FaultInjector::all_names() {
  std::string names;
  for (int k = 1; k < kNumKinds; ++k) {
    if (!names.empty()) names += ", ";
    names += name(static_cast<FaultKind>(k));
  }
  return names;
}

FaultKind FaultInjector::parse(const std::string& text) {
  for (int k = 1; k < kNumKinds; ++k) {
    if (text == name(static_cast<FaultKind>(k))) return static_cast<FaultKind>(k);
  }
  throw std::invalid_argument("unknown fault kind '" + text + "'; expected one of: " +
                              all_names());
}

}  // namespace paged_kv::store
