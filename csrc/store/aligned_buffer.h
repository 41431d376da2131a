// Host buffers aligned for O_DIRECT, and a thread-safe pool that reuses them (torch-free).
//
// A slot-sized bounce buffer is as large as a page (32 MiB for Llama-3-8B at 256 tokens);
// allocating and first-touching one per transfer would cost more than the copy through it, so
// the store keeps a few in a pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

namespace paged_kv::store {

constexpr size_t kIoAlignment = 4096;  // O_DIRECT buffers, lengths and offsets

inline bool is_io_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kIoAlignment == 0;
}

// `bytes` of host memory aligned to kIoAlignment. Move-only; frees on destruction.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  // Raises StoreError naming the size and the errno text when the allocation fails.
  explicit AlignedBuffer(size_t bytes);
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer();

  unsigned char* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  unsigned char* data_ = nullptr;
  size_t size_ = 0;
};

// Hands out buffers of one size, keeping at most `max_kept` released ones for reuse.
class BufferPool {
 public:
  // A buffer on loan; it goes back to the pool when the lease ends.
  class Lease {
   public:
    Lease(BufferPool* pool, AlignedBuffer buffer) : pool_(pool), buffer_(std::move(buffer)) {}
    Lease(Lease&& other) noexcept = default;
    Lease& operator=(Lease&&) = delete;
    ~Lease() {
      if (pool_ != nullptr && buffer_.data() != nullptr) pool_->give_back(std::move(buffer_));
    }
    unsigned char* data() const { return buffer_.data(); }
    size_t size() const { return buffer_.size(); }

   private:
    BufferPool* pool_;
    AlignedBuffer buffer_;
  };

  BufferPool(size_t buffer_bytes, size_t max_kept)
      : buffer_bytes_(buffer_bytes), max_kept_(max_kept) {}

  // A buffer of buffer_bytes(): a kept one if any, else a new allocation. With
  // `inject_failure` (tests) it raises the StoreError an allocation failure would, naming the
  // injected fault. Contents are whatever the last user left.
  Lease acquire(bool inject_failure = false);
  size_t buffer_bytes() const { return buffer_bytes_; }

 private:
  void give_back(AlignedBuffer buffer);

  const size_t buffer_bytes_;
  const size_t max_kept_;
  std::mutex mutex_;
  std::vector<AlignedBuffer> free_;
};

}  // namespace paged_kv::store
