// Creating, preallocating and opening the slot file.
#include "store/slot_file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "store/aligned_buffer.h"
#include "store/disk_store.h"

namespace paged_kv::store {

namespace {

// Free bytes for an unprivileged writer in `folder`, or -1 when statvfs fails.
int64_t free_bytes(const std::string& folder) {
  struct statvfs fs;
  if (::statvfs(folder.c_str(), &fs) != 0) return -1;
  const unsigned long long bytes =
      static_cast<unsigned long long>(fs.f_bavail) * static_cast<unsigned long long>(fs.f_frsize);
  return bytes > static_cast<unsigned long long>(INT64_MAX) ? INT64_MAX
                                                            : static_cast<int64_t>(bytes);
}

std::string no_room(const std::string& folder, int64_t total_bytes, const std::string& what,
                    const std::string& cause) {
  const int64_t available = free_bytes(folder);
  return "not enough room for the disk store's slot file in " + folder + ": it needs " +
         describe_bytes(total_bytes) + " (" + what + "), " +
         (available >= 0 ? "the file system has " + describe_bytes(available) + " free"
                         : std::string("free space unknown")) +
         " (" + cause + ")";
}

// Whether an aligned write and read through `fd` work; "" if so, else the errno text. Other
// errors than EINVAL (the file system refusing O_DIRECT) raise StoreError.
std::string probe_direct_io(int fd, const std::string& path) {
  AlignedBuffer block(kIoAlignment);
  std::memset(block.data(), 0, kIoAlignment);
  iovec iov;
  iov.iov_base = block.data();
  iov.iov_len = kIoAlignment;
  for (int step = 0; step < 2; ++step) {
    const ssize_t moved = step == 0 ? ::pwritev(fd, &iov, 1, 0) : ::preadv(fd, &iov, 1, 0);
    if (moved == static_cast<ssize_t>(kIoAlignment)) continue;
    const int err = moved < 0 ? errno : EIO;
    const std::string call = step == 0 ? "pwritev" : "preadv";
    if (err == EINVAL) return "an O_DIRECT " + call + " was refused: " + errno_text(err);
    throw StoreError("checking O_DIRECT on " + path + ": " + call + " of " +
                     std::to_string(kIoAlignment) + " bytes " +
                     (moved < 0 ? "failed: " + errno_text(err)
                                : "moved " + std::to_string(moved) + " bytes"));
  }
  return std::string();
}

}  // namespace

std::string describe_bytes(int64_t bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 6) {
    value /= 1024.0;
    ++unit;
  }
  char human[32];
  std::snprintf(human, sizeof human, "%.2f %s", value, units[unit]);
  return std::to_string(bytes) + " bytes (" + human + ")";
}

SlotFile::SlotFile(const std::string& folder, int64_t total_bytes, const std::string& what,
                   bool try_direct_io, FaultInjector* faults) {
  struct stat info;
  if (::stat(folder.c_str(), &info) != 0) {
    throw StoreError("disk store folder " + folder + " is unusable: " + errno_text(errno));
  }
  if (!S_ISDIR(info.st_mode)) {
    throw StoreError("disk store folder " + folder + " is not a folder");
  }
  // Refuse early when the file system plainly lacks room: a doomed posix_fallocate would fill
  // the disk for everyone before it fails.
  const int64_t available = free_bytes(folder);
  if (available >= 0 && available < total_bytes) {
    throw StoreError(no_room(folder, total_bytes, what, errno_text(ENOSPC)));
  }

  std::string name = folder + (folder.back() == '/' ? "" : "/") + "paged_kv_slots.XXXXXX";
  std::vector<char> name_buffer(name.begin(), name.end());
  name_buffer.push_back('\0');
  FileDescriptor buffered(::mkostemp(name_buffer.data(), O_CLOEXEC));
  if (!buffered.valid()) {
    throw StoreError("could not create the disk store's slot file in " + folder + ": " +
                     errno_text(errno));
  }
  path_ = name_buffer.data();
  try {
    const int status = ::posix_fallocate(buffered.get(), 0, static_cast<off_t>(total_bytes));
    if (status == ENOSPC || status == EDQUOT || status == EFBIG) {
      throw StoreError(no_room(folder, total_bytes, what, errno_text(status)));
    }
    if (status != 0) {
      throw StoreError("could not preallocate " + describe_bytes(total_bytes) + " (" + what +
                       ") for the disk store's slot file " + path_ + ": " + errno_text(status));
    }
    if (!try_direct_io) {
      direct_io_reason_ = "O_DIRECT was not asked for (try_direct_io is false); buffered I/O";
      fd_ = std::move(buffered);
      return;
    }
    const bool refuse =
        faults != nullptr && faults->next(IoOp::kOpen) == FaultKind::kDirectIoRefused;
    FileDescriptor direct(refuse ? -1 : ::open(path_.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC));
    if (!direct.valid()) {
      const int err = refuse ? EINVAL : errno;
      if (err != EINVAL && err != EOPNOTSUPP) {
        throw StoreError("could not open the disk store's slot file " + path_ +
                         " with O_DIRECT: " + errno_text(err));
      }
      direct_io_reason_ = "the file system of " + folder + " refuses O_DIRECT (open: " +
                          errno_text(err) +
                          (refuse ? " [injected fault: direct_io_refused]" : "") +
                          "); buffered I/O";
      fd_ = std::move(buffered);
      return;
    }
    const std::string refused = probe_direct_io(direct.get(), path_);
    if (!refused.empty()) {
      direct_io_reason_ = "the file system of " + folder + " refuses O_DIRECT (" + refused +
                          "); buffered I/O";
      fd_ = std::move(buffered);
      return;
    }
    direct_io_ = true;
    fd_ = std::move(direct);
  } catch (...) {
    ::unlink(path_.c_str());
    throw;
  }
}

SlotFile::~SlotFile() {
  fd_.reset();
  ::unlink(path_.c_str());
}

}  // namespace paged_kv::store
