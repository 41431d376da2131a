// Injected I/O faults, so tests can prove that every failure of the disk tier ends in a clear
// error and never in wrong data (torch-free).
//
// A fault is armed to fire on the Nth matching operation from now (1: the next one) and fires
// once. Each page read or write is one operation, and so is opening the slot file (to arm that,
// pass the injector in DiskStoreOptions); the store asks `next` once per operation and applies
// the fault it gets at the point where the real failure would happen.
#pragma once

#include <array>
#include <cstdint>
#include <mutex>
#include <string>

namespace paged_kv::store {

enum class FaultKind : int {
  kNone = 0,
  kWriteEio,      // the write fails with EIO before any byte reaches the file
  kWriteEnospc,   // the write fails with ENOSPC before any byte reaches the file
  kShortWrite,    // part of the slot is written, then the file accepts no more bytes
  kWriteEintr,    // the first write call is interrupted (EINTR); the store retries and succeeds
  kReadEio,       // the read fails with EIO
  kReadPartial,   // the first read call returns part of the slot; the store reads the rest
  kAllocFail,     // the aligned buffer the operation needs cannot be allocated
  kDirectIoRefused,  // opening the slot file with O_DIRECT fails with EINVAL, as on a file
                     // system without O_DIRECT; the store falls back to buffered I/O
  kCount
};

// Which operations a fault kind matches: page writes, page reads, opening the slot file.
enum class IoOp { kWrite, kRead, kOpen };

class FaultInjector {
 public:
  // Arms `kind` to fire on the `nth` (>= 1) matching operation from now. Re-arming a kind
  // replaces its countdown. Throws std::invalid_argument for kNone or nth < 1.
  void arm(FaultKind kind, int64_t nth);
  // Disarms every kind.
  void clear();
  // Called once per page operation: counts it against every armed kind that matches `op` and
  // returns the kind that fires now (kNone if none). When two fire together, the first in
  // FaultKind order fires and the other waits for the next operation.
  FaultKind next(IoOp op);
  // How many times `kind` has fired since construction.
  int64_t fired(FaultKind kind) const;

  // "write_eio", "write_enospc", "short_write", "write_eintr", "read_eio", "read_partial",
  // "alloc_fail", "direct_io_refused"; parse() throws std::invalid_argument, listing these,
  // for any other name.
  static const char* name(FaultKind kind);
  static FaultKind parse(const std::string& name);
  static std::string all_names();  // comma-separated

 private:
  static bool matches(FaultKind kind, IoOp op);

  mutable std::mutex mutex_;
  std::array<int64_t, static_cast<int>(FaultKind::kCount)> countdown_{};  // 0: disarmed
  std::array<int64_t, static_cast<int>(FaultKind::kCount)> fired_{};
};

}  // namespace paged_kv::store
