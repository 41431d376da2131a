// POSIX file helpers: errno text, the owned descriptor, and the full read and write loops.
#include "store/direct_file.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "store/disk_store.h"

namespace paged_kv::store {

namespace {

const char* errno_name(int err) {
  switch (err) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EEXIST: return "EEXIST";
    case ENOTDIR: return "ENOTDIR";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case ENFILE: return "ENFILE";
    case EMFILE: return "EMFILE";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case EROFS: return "EROFS";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EOVERFLOW: return "EOVERFLOW";
    case EDQUOT: return "EDQUOT";
    default: return nullptr;
  }
}

// strerror_r returns char* (GNU) or int (XSI) depending on the C library; accept either.
[[maybe_unused]] const char* strerror_result(int status, const char* buffer) {
  return status == 0 ? buffer : "unknown error";
}
[[maybe_unused]] const char* strerror_result(const char* text, const char*) { return text; }

constexpr size_t kDirectAlignment = 4096;

size_t total_bytes(const iovec* iov, int iovcnt) {
  size_t total = 0;
  for (int i = 0; i < iovcnt; ++i) total += iov[i].iov_len;
  return total;
}

// Copies the buffers still to move after `done` bytes, at most `limit` bytes of them.
std::vector<iovec> remaining(const iovec* iov, int iovcnt, size_t done, size_t limit) {
  std::vector<iovec> rest;
  for (int i = 0; i < iovcnt && limit > 0; ++i) {
    size_t len = iov[i].iov_len;
    if (done >= len) {
      done -= len;
      continue;
    }
    iovec part;
    part.iov_base = static_cast<char*>(iov[i].iov_base) + done;
    part.iov_len = std::min(len - done, limit);
    done = 0;
    limit -= part.iov_len;
    rest.push_back(part);
  }
  return rest;
}

// Half of `total`, rounded down to the O_DIRECT alignment (0 when total is one block or less).
size_t aligned_half(size_t total) { return (total / 2) / kDirectAlignment * kDirectAlignment; }

std::string injected_suffix(FaultKind fault) {
  return std::string(" [injected fault: ") + FaultInjector::name(fault) + "]";
}

// The loop behind read_full and write_full.
void transfer_full(bool writing, int fd, const iovec* iov, int iovcnt, int64_t offset,
                   FaultKind fault) {
  const char* call = writing ? "pwritev" : "preadv";
  const size_t total = total_bytes(iov, iovcnt);
  size_t done = 0;
  int calls = 0;
  while (done < total) {
    const bool first = calls++ == 0;
    size_t limit = total - done;
    ssize_t moved;
    int err = 0;
    if (first && (fault == FaultKind::kWriteEio || fault == FaultKind::kReadEio)) {
      moved = -1;
      err = EIO;
    } else if (first && fault == FaultKind::kWriteEnospc) {
      moved = -1;
      err = ENOSPC;
    } else if (first && fault == FaultKind::kWriteEintr) {
      moved = -1;
      err = EINTR;
    } else if (!first && fault == FaultKind::kShortWrite) {
      moved = 0;  // the file takes no more bytes after the first, partial call
    } else {
      if (first && (fault == FaultKind::kShortWrite || fault == FaultKind::kReadPartial)) {
        const size_t half = aligned_half(total);
        if (half > 0 || fault == FaultKind::kShortWrite) limit = half;
      }
      if (limit == 0) {
        moved = 0;
      } else {
        const std::vector<iovec> rest = remaining(iov, iovcnt, done, limit);
        const off_t at = static_cast<off_t>(offset + static_cast<int64_t>(done));
        moved = writing ? ::pwritev(fd, rest.data(), static_cast<int>(rest.size()), at)
                        : ::preadv(fd, rest.data(), static_cast<int>(rest.size()), at);
        if (moved < 0) err = errno;
      }
    }
    if (moved < 0) {
      if (err == EINTR) continue;
      throw StoreError(std::string(call) + " of " + std::to_string(total) + " bytes at offset " +
                       std::to_string(offset) + " failed after " + std::to_string(done) +
                       " bytes: " + errno_text(err) +
                       (fault != FaultKind::kNone ? injected_suffix(fault) : std::string()));
    }
    if (moved == 0) {
      throw StoreError(
          std::string(call) + " of " + std::to_string(total) + " bytes at offset " +
          std::to_string(offset) + " stopped after " + std::to_string(done) + " bytes: " +
          (writing ? "short write, the file accepted no more bytes"
                   : "unexpected end of file") +
          (fault != FaultKind::kNone ? injected_suffix(fault) : std::string()));
    }
    done += static_cast<size_t>(moved);
  }
}

}  // namespace

std::string errno_text(int err) {
  char buffer[256] = {0};
  const char* text = strerror_result(::strerror_r(err, buffer, sizeof buffer), buffer);
  const char* name = errno_name(err);
  return std::string(text) + " (" + (name ? name : "errno " + std::to_string(err)) + ")";
}

FileDescriptor& FileDescriptor::operator=(FileDescriptor&& other) noexcept {
  if (this != &other) reset(other.release());
  return *this;
}

void FileDescriptor::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

void write_full(int fd, const iovec* iov, int iovcnt, int64_t offset, FaultKind fault) {
  transfer_full(true, fd, iov, iovcnt, offset, fault);
}

void read_full(int fd, const iovec* iov, int iovcnt, int64_t offset, FaultKind fault) {
  transfer_full(false, fd, iov, iovcnt, offset, fault);
}

}  // namespace paged_kv::store
