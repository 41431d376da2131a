// Creating the disk tier's slot file: a unique file in the folder, preallocated in full, opened
// with O_DIRECT where the file system allows it (torch-free).
#pragma once

#include <cstdint>
#include <string>

#include "store/direct_file.h"
#include "store/fault_injector.h"

namespace paged_kv::store {

// The file that holds a store's slots; the file itself is deleted when this is destroyed.
class SlotFile {
 public:
  // Creates "<folder>/paged_kv_slots.XXXXXX" (mkstemp) and preallocates `total_bytes`
  // (posix_fallocate; `what` describes them, e.g. "64 slots of 135168 bytes"). With
  // `try_direct_io`, reopens it with O_DIRECT and checks that an aligned transfer works; where
  // the file system refuses (EINVAL), it keeps buffered I/O and says why in direct_io_reason().
  // Raises StoreError naming the folder, the bytes and the errno text when the folder is
  // unusable or lacks room; no file is left behind then. `faults` (tests) may refuse O_DIRECT.
  SlotFile(const std::string& folder, int64_t total_bytes, const std::string& what,
           bool try_direct_io, FaultInjector* faults);
  ~SlotFile();
  SlotFile(const SlotFile&) = delete;
  SlotFile& operator=(const SlotFile&) = delete;

  int fd() const { return fd_.get(); }
  const std::string& path() const { return path_; }
  bool direct_io() const { return direct_io_; }
  const std::string& direct_io_reason() const { return direct_io_reason_; }

 private:
  std::string path_;
  FileDescriptor fd_;
  bool direct_io_ = false;
  std::string direct_io_reason_;
};

// "1125899906842624 bytes (1.00 PiB)"
std::string describe_bytes(int64_t bytes);

}  // namespace paged_kv::store
