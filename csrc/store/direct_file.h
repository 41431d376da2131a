// POSIX file helpers for the disk tier (torch-free): an owned file descriptor, errno text, and
// positional reads and writes that move every byte or raise StoreError.
//
// The read and write loops retry after EINTR and go on after short transfers (Linux moves at
// most 2 GiB - 4 KiB per call, and may stop early), so a caller never sees a partial transfer
// reported as success. They work for O_DIRECT descriptors too, as long as the caller's buffers,
// lengths and offsets are aligned; partial progress then also stays aligned.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "store/fault_injector.h"

namespace paged_kv::store {

// "Input/output error (EIO)": the system's text for `err` and its symbolic name.
std::string errno_text(int err);

// Owns one file descriptor and closes it when destroyed. Move-only.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(FileDescriptor&& other) noexcept : fd_(other.release()) {}
  FileDescriptor& operator=(FileDescriptor&& other) noexcept;
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// Writes all bytes of the `iovcnt` buffers at file `offset` (pwritev), or raises StoreError
// naming the call, the offset, the bytes moved and the errno text. `fault` (tests only) makes
// the transfer fail as that kind describes; kNone for real I/O.
void write_full(int fd, const iovec* iov, int iovcnt, int64_t offset,
                FaultKind fault = FaultKind::kNone);
// Reads all bytes of the `iovcnt` buffers from file `offset` (preadv); end of file before the
// last byte is an error too.
void read_full(int fd, const iovec* iov, int iovcnt, int64_t offset,
               FaultKind fault = FaultKind::kNone);

}  // namespace paged_kv::store
