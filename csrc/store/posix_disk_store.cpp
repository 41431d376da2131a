// The disk store over POSIX I/O.
//
// A write sends the header and the payload in one pwritev: straight from the caller's memory
// when it is aligned for O_DIRECT (or I/O is buffered), else through a pooled aligned bounce
// buffer. A read mirrors it, and verifies the header and the payload checksum before it
// reports success; through a bounce buffer, the caller's memory is touched only once the page
// has passed every check, and read straight into the caller's memory, a page that fails a
// check is zeroed there.
//
// The store also remembers, per slot, whether it holds a page (one byte each): a slot never
// written, or whose last write failed, reads as that error without touching the disk, and the
// message of the failed write is kept to explain it.
#include "store/posix_disk_store.h"

#include <atomic>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "store/aligned_buffer.h"
#include "store/checksum.h"
#include "store/direct_file.h"
#include "store/io_pool.h"
#include "store/slot_file.h"
#include "store/slot_format.h"

namespace paged_kv::store {

namespace {

constexpr int kMaxIoThreads = 256;

enum SlotState : uint8_t {
  kEmpty = 0,    // never written
  kValid = 1,    // holds the page of its last successful write
  kFailed = 2,   // its last write failed
  kWriting = 3,  // a write is in progress
};

class PosixDiskStore final : public DiskStore {
 public:
  PosixDiskStore(const DiskStoreOptions& options, int64_t slot_bytes)
      : num_slots_(options.num_slots),
        page_bytes_(options.page_bytes),
        slot_bytes_(slot_bytes),
        faults_(options.faults ? options.faults : std::make_shared<FaultInjector>()),
        file_(options.folder, options.num_slots * slot_bytes,
              std::to_string(options.num_slots) + " slots of " + std::to_string(slot_bytes) +
                  " bytes: a " + std::to_string(kSlotHeaderBytes) + "-byte header and " +
                  std::to_string(options.page_bytes) + " bytes of page, aligned",
              options.try_direct_io, faults_.get()),
        state_(new std::atomic<uint8_t>[static_cast<size_t>(options.num_slots)]()),
        slot_buffers_(static_cast<size_t>(slot_bytes), static_cast<size_t>(options.io_threads) + 1),
        header_buffers_(kSlotHeaderBytes, 2 * static_cast<size_t>(options.io_threads) + 2),
        io_pool_(options.io_threads) {
    for (int64_t s = 0; s < num_slots_; ++s) state_[s].store(kEmpty, std::memory_order_relaxed);
  }

  int64_t num_slots() const override { return num_slots_; }
  int64_t page_bytes() const override { return page_bytes_; }
  int64_t slot_bytes() const override { return slot_bytes_; }
  const std::string& path() const override { return file_.path(); }
  bool direct_io() const override { return file_.direct_io(); }
  const std::string& direct_io_reason() const override { return file_.direct_io_reason(); }
  int io_threads() const override { return io_pool_.threads(); }
  FaultInjector* fault_injector() override { return faults_.get(); }
  int file_descriptor() const override { return file_.fd(); }
  bool slot_in_use(int64_t slot) const override {
    return slot < 0 || slot >= num_slots_ || state_[slot].load() != kEmpty;
  }
  uint64_t read_header(int64_t slot, const SlotTag& expected) override;

  void write_page(int64_t slot, const SlotTag& tag, const void* src) override;
  void read_page(int64_t slot, const SlotTag& expected, void* dst) override;
  std::vector<SlotFailure> write_pages(const std::vector<PageWrite>& pages) override;
  std::vector<SlotFailure> read_pages(const std::vector<PageRead>& pages) override;

 private:
  template <typename Request, typename One>
  std::vector<SlotFailure> run_batch(const std::vector<Request>& requests, const One& one);
  void check_slot(int64_t slot, const char* call, const void* pointer,
                  const char* pointer_name) const;
  int64_t offset_of(int64_t slot) const { return slot * slot_bytes_; }
  // Whether a transfer from or to `memory` must go through an aligned bounce buffer.
  bool needs_bounce(const void* memory) const {
    return file_.direct_io() && (!is_io_aligned(memory) || page_bytes_ % kIoAlignment != 0);
  }
  void transfer_write(int64_t slot, const SlotTag& tag, const void* src, FaultKind fault);
  void transfer_read(int64_t slot, const SlotTag& expected, void* dst, FaultKind fault);
  // Raises StoreError unless `header` and `payload` are the page `expected` names, intact.
  void verify(const unsigned char* header, const SlotTag& expected, const void* payload) const;
  // Records a failed write of `slot` (`cause`: why) and makes a best effort to clear its
  // header on disk.
  void mark_failed(int64_t slot, const std::string& cause);
  // Raises StoreError (prefixed with `what`) unless `slot` holds the page of a finished write.
  void check_readable(int64_t slot, const std::string& what);
  std::string slot_name(int64_t slot) const {
    return "slot " + std::to_string(slot) + " of " + file_.path();
  }

  const int64_t num_slots_;
  const int64_t page_bytes_;
  const int64_t slot_bytes_;
  std::shared_ptr<FaultInjector> faults_;
  SlotFile file_;
  std::unique_ptr<std::atomic<uint8_t>[]> state_;  // a SlotState per slot
  std::mutex failures_mutex_;
  std::unordered_map<int64_t, std::string> failures_;  // why each kFailed slot failed
  BufferPool slot_buffers_;    // bounce buffers, slot_bytes_ each
  BufferPool header_buffers_;  // headers for transfers straight from or to the caller
  IoPool io_pool_;             // last: its threads stop before the rest goes
};

void PosixDiskStore::check_slot(int64_t slot, const char* call, const void* pointer,
                                const char* pointer_name) const {
  if (slot < 0 || slot >= num_slots_) {
    throw StoreError(std::string("DiskStore::") + call + ": slot " + std::to_string(slot) +
                     " is outside [0, " + std::to_string(num_slots_) + ") of " + file_.path());
  }
  if (pointer == nullptr) {
    throw StoreError(std::string("DiskStore::") + call + ": " + pointer_name + " is null");
  }
}

void PosixDiskStore::write_page(int64_t slot, const SlotTag& tag, const void* src) {
  check_slot(slot, "write_page", src, "src");
  const FaultKind fault = faults_->next(IoOp::kWrite);
  const uint8_t before = state_[slot].exchange(kWriting);
  try {
    transfer_write(slot, tag, src, fault);
  } catch (const std::exception& e) {
    mark_failed(slot, e.what());
    throw StoreError("write of " + slot_name(slot) + " (" + describe_tag(tag) + ") failed: " +
                     e.what() + "; the slot now holds no valid page");
  }
  if (before == kFailed) {
    std::lock_guard<std::mutex> lock(failures_mutex_);
    failures_.erase(slot);
  }
  state_[slot].store(kValid);
}

void PosixDiskStore::transfer_write(int64_t slot, const SlotTag& tag, const void* src,
                                    FaultKind fault) {
  const auto payload = static_cast<size_t>(page_bytes_);
  if (needs_bounce(src)) {
    BufferPool::Lease buffer = slot_buffers_.acquire(fault == FaultKind::kAllocFail);
    unsigned char* page = buffer.data() + kSlotHeaderBytes;
    std::memcpy(page, src, payload);
    std::memset(page + payload, 0, static_cast<size_t>(slot_bytes_) - kSlotHeaderBytes - payload);
    encode_slot_header(buffer.data(), tag, payload, checksum64(page, payload));
    iovec iov;
    iov.iov_base = buffer.data();
    iov.iov_len = static_cast<size_t>(slot_bytes_);
    write_full(file_.fd(), &iov, 1, offset_of(slot), fault);
    return;
  }
  BufferPool::Lease header = header_buffers_.acquire(fault == FaultKind::kAllocFail);
  encode_slot_header(header.data(), tag, payload, checksum64(src, payload));
  iovec iov[2];
  iov[0].iov_base = header.data();
  iov[0].iov_len = kSlotHeaderBytes;
  iov[1].iov_base = const_cast<void*>(src);
  iov[1].iov_len = payload;
  write_full(file_.fd(), iov, 2, offset_of(slot), fault);
}

void PosixDiskStore::mark_failed(int64_t slot, const std::string& cause) {
  {
    std::lock_guard<std::mutex> lock(failures_mutex_);
    failures_[slot] = cause;
  }
  state_[slot].store(kFailed);
  // The slot is unreadable through this store already; clearing the header on disk as well
  // means no later reader of the file can take the torn slot for a page. Failure is harmless.
  try {
    BufferPool::Lease zeros = header_buffers_.acquire();
    std::memset(zeros.data(), 0, kSlotHeaderBytes);
    iovec iov;
    iov.iov_base = zeros.data();
    iov.iov_len = kSlotHeaderBytes;
    write_full(file_.fd(), &iov, 1, offset_of(slot));
  } catch (const std::exception&) {
  }
}

void PosixDiskStore::read_page(int64_t slot, const SlotTag& expected, void* dst) {
  check_slot(slot, "read_page", dst, "dst");
  const std::string what = "read of " + slot_name(slot) + " (expecting " + describe_tag(expected) +
                           ") failed: ";
  check_readable(slot, what);
  const FaultKind fault = faults_->next(IoOp::kRead);
  try {
    transfer_read(slot, expected, dst, fault);
  } catch (const std::exception& e) {
    throw StoreError(what + e.what());
  }
}

uint64_t PosixDiskStore::read_header(int64_t slot, const SlotTag& expected) {
  if (slot < 0 || slot >= num_slots_) {
    throw StoreError("DiskStore::read_header: slot " + std::to_string(slot) + " is outside [0, " +
                     std::to_string(num_slots_) + ") of " + file_.path());
  }
  const std::string what = "read of " + slot_name(slot) + " (expecting " + describe_tag(expected) +
                           ") failed: ";
  check_readable(slot, what);
  const FaultKind fault = faults_->next(IoOp::kRead);
  try {
    BufferPool::Lease header = header_buffers_.acquire(fault == FaultKind::kAllocFail);
    iovec iov;
    iov.iov_base = header.data();
    iov.iov_len = kSlotHeaderBytes;
    read_full(file_.fd(), &iov, 1, offset_of(slot), fault);
    uint64_t stored = 0;
    const std::string wrong =
        check_slot_header(header.data(), expected, static_cast<uint64_t>(page_bytes_), &stored);
    if (!wrong.empty()) throw StoreError(wrong);
    return stored;
  } catch (const std::exception& e) {
    throw StoreError(what + e.what());
  }
}

void PosixDiskStore::check_readable(int64_t slot, const std::string& what) {
  switch (state_[slot].load()) {
    case kEmpty:
      throw StoreError(what + "the slot was never written");
    case kFailed: {
      std::lock_guard<std::mutex> lock(failures_mutex_);
      auto failure = failures_.find(slot);
      throw StoreError(what + "the slot holds no valid page: its last write failed (" +
                       (failure != failures_.end() ? failure->second : "cause unknown") + ")");
    }
    case kWriting:
      throw StoreError(what + "the slot is being written");
    default:
      break;
  }
}

void PosixDiskStore::transfer_read(int64_t slot, const SlotTag& expected, void* dst,
                                   FaultKind fault) {
  const auto payload = static_cast<size_t>(page_bytes_);
  if (needs_bounce(dst)) {
    BufferPool::Lease buffer = slot_buffers_.acquire(fault == FaultKind::kAllocFail);
    iovec iov;
    iov.iov_base = buffer.data();
    iov.iov_len = static_cast<size_t>(slot_bytes_);
    read_full(file_.fd(), &iov, 1, offset_of(slot), fault);
    verify(buffer.data(), expected, buffer.data() + kSlotHeaderBytes);
    std::memcpy(dst, buffer.data() + kSlotHeaderBytes, payload);
    return;
  }
  BufferPool::Lease header = header_buffers_.acquire(fault == FaultKind::kAllocFail);
  iovec iov[2];
  iov[0].iov_base = header.data();
  iov[0].iov_len = kSlotHeaderBytes;
  iov[1].iov_base = dst;
  iov[1].iov_len = payload;
  try {
    read_full(file_.fd(), iov, 2, offset_of(slot), fault);
    verify(header.data(), expected, dst);
  } catch (...) {
    std::memset(dst, 0, payload);  // never leave a wrong or torn page where the caller looks
    throw;
  }
}

void PosixDiskStore::verify(const unsigned char* header, const SlotTag& expected,
                            const void* payload) const {
  uint64_t stored = 0;
  const std::string wrong =
      check_slot_header(header, expected, static_cast<uint64_t>(page_bytes_), &stored);
  if (!wrong.empty()) throw StoreError(wrong);
  const uint64_t computed = checksum64(payload, static_cast<size_t>(page_bytes_));
  if (computed != stored) {
    throw StoreError("payload checksum mismatch (stored " + std::to_string(stored) +
                     ", computed " + std::to_string(computed) +
                     "): the page's bytes on disk are corrupt");
  }
}

// Runs `one(i)` for every request on the I/O threads; a request that throws becomes a failure
// naming its index and slot, and the others go on.
template <typename Request, typename One>
std::vector<SlotFailure> PosixDiskStore::run_batch(const std::vector<Request>& requests,
                                                   const One& one) {
  check_batch(requests);
  std::vector<std::string> errors(requests.size());
  std::vector<char> failed(requests.size(), 0);
  io_pool_.run(requests.size(), [&](size_t i) {
    try {
      one(requests[i]);
    } catch (const std::exception& e) {
      errors[i] = e.what();
      failed[i] = 1;
    } catch (...) {
      errors[i] = "unknown error";
      failed[i] = 1;
    }
  });
  std::vector<SlotFailure> failures;
  for (size_t i = 0; i < requests.size(); ++i) {
    if (failed[i]) failures.push_back(SlotFailure{i, requests[i].slot, std::move(errors[i])});
  }
  return failures;
}

std::vector<SlotFailure> PosixDiskStore::write_pages(const std::vector<PageWrite>& pages) {
  return run_batch(pages, [this](const PageWrite& w) { write_page(w.slot, w.tag, w.src); });
}

std::vector<SlotFailure> PosixDiskStore::read_pages(const std::vector<PageRead>& pages) {
  return run_batch(pages, [this](const PageRead& r) { read_page(r.slot, r.expected, r.dst); });
}

}  // namespace

std::unique_ptr<DiskStore> create_posix_disk_store(const DiskStoreOptions& options) {
  const std::string where = "DiskStore::create: ";
  if (options.folder.empty()) throw StoreError(where + "folder is empty");
  if (options.num_slots < 1) {
    throw StoreError(where + "num_slots must be >= 1, got " + std::to_string(options.num_slots));
  }
  if (options.page_bytes < 1) {
    throw StoreError(where + "page_bytes must be >= 1, got " + std::to_string(options.page_bytes));
  }
  if (options.io_threads < 1 || options.io_threads > kMaxIoThreads) {
    throw StoreError(where + "io_threads must be in [1, " + std::to_string(kMaxIoThreads) +
                     "], got " + std::to_string(options.io_threads));
  }
  constexpr int64_t kLargest = INT64_MAX;
  if (options.page_bytes > kLargest - 2 * static_cast<int64_t>(kSlotHeaderBytes)) {
    throw StoreError(where + "page_bytes " + std::to_string(options.page_bytes) + " is too large");
  }
  const int64_t slot_bytes = slot_bytes_for(options.page_bytes);
  if (options.num_slots > kLargest / slot_bytes) {
    throw StoreError(where + std::to_string(options.num_slots) + " slots of " +
                     std::to_string(slot_bytes) + " bytes overflow a 64-bit file size");
  }
  return std::make_unique<PosixDiskStore>(options, slot_bytes);
}

}  // namespace paged_kv::store
