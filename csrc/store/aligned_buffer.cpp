// Aligned host buffers and their pool.
#include "store/aligned_buffer.h"

#include <stdlib.h>

#include <string>
#include <utility>

#include "store/direct_file.h"
#include "store/disk_store.h"

namespace paged_kv::store {

namespace {

std::string allocation_failure(size_t bytes, const std::string& cause) {
  return "could not allocate a " + std::to_string(bytes) + "-byte I/O buffer aligned to " +
         std::to_string(kIoAlignment) + " bytes: " + cause;
}

}  // namespace

AlignedBuffer::AlignedBuffer(size_t bytes) {
  if (bytes == 0) return;
  void* p = nullptr;
  const int status = ::posix_memalign(&p, kIoAlignment, bytes);
  if (status != 0) throw StoreError(allocation_failure(bytes, errno_text(status)));
  data_ = static_cast<unsigned char*>(p);
  size_ = bytes;
}

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    ::free(data_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

AlignedBuffer::~AlignedBuffer() { ::free(data_); }

BufferPool::Lease BufferPool::acquire(bool inject_failure) {
  if (inject_failure) {
    throw StoreError(allocation_failure(buffer_bytes_, "injected fault (alloc_fail)"));
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!free_.empty()) {
      AlignedBuffer buffer = std::move(free_.back());
      free_.pop_back();
      return Lease(this, std::move(buffer));
    }
  }
  return Lease(this, AlignedBuffer(buffer_bytes_));
}

void BufferPool::give_back(AlignedBuffer buffer) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (free_.size() < max_kept_) free_.push_back(std::move(buffer));
}

}  // namespace paged_kv::store
