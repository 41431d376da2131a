// The disk tier: one preallocated file of page slots, read and written with O_DIRECT (torch-free).
//
// A slot is a 4 KiB header followed by the page payload, rounded up to the 4 KiB alignment that
// O_DIRECT needs. The header names the page the slot holds (tenant, session, logical page,
// generation) and carries a checksum of the payload and of itself, so a read verifies that the
// bytes are the page asked for and intact; a mismatch is an error, never data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "store/fault_injector.h"

namespace paged_kv::store {

// Who a slot's page belongs to; a read must present the same tag that the write stored.
struct SlotTag {
  int32_t tenant = 0;
  int64_t session = 0;
  int64_t logical_page = 0;
  uint64_t generation = 0;
};

// Every store failure: the message names the slot, the file and the cause (errno text).
class StoreError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct DiskStoreOptions {
  std::string folder;       // where the slot file is created (it is deleted on close)
  int64_t num_slots = 0;
  int64_t page_bytes = 0;   // payload bytes per slot
  int io_threads = 4;       // reads and writes in flight for the batched calls
  bool try_direct_io = true;  // false: buffered I/O from the start (direct_io_reason says so)
  // Tests: the injector whose armed faults the store's transfers obey. Null: the store makes
  // its own, disarmed (reachable through fault_injector()).
  std::shared_ptr<FaultInjector> faults;
};

// One request of a batched write: page_bytes() from `src` into `slot` under `tag`.
struct PageWrite {
  int64_t slot = 0;
  SlotTag tag;
  const void* src = nullptr;
};

// One request of a batched read: `slot` into `dst`, verified against `expected`.
struct PageRead {
  int64_t slot = 0;
  SlotTag expected;
  void* dst = nullptr;
};

// A request of a batch that failed: its position in the batch, its slot and the StoreError text.
struct SlotFailure {
  size_t index = 0;
  int64_t slot = 0;
  std::string message;
};

// Calls attempt(request) for every request of a batch, in order, and collects each one that
// throws as a SlotFailure (its index, its slot, the error text) instead of stopping at the first.
template <typename Request, typename Attempt>
std::vector<SlotFailure> attempt_each(const std::vector<Request>& requests, Attempt&& attempt) {
  std::vector<SlotFailure> failures;
  for (size_t i = 0; i < requests.size(); ++i) {
    try {
      attempt(requests[i]);
    } catch (const std::exception& e) {
      failures.push_back(SlotFailure{i, requests[i].slot, e.what()});
    }
  }
  return failures;
}

// "2 of 8 page writes failed: request 3 (slot 5): ...; request 6 (slot 9): ..." (`what` is
// "page writes" or "page reads").
std::string describe_failures(const std::vector<SlotFailure>& failures, size_t requests,
                              const char* what);

// Thread safety: calls on different slots may run concurrently from any threads, and so may
// reads of one slot; a write of a slot must not overlap any other call on that slot.
class DiskStore {
 public:
  // Creates and preallocates the slot file. Raises StoreError when the folder is unusable or the
  // disk lacks room. Where the file system refuses O_DIRECT, buffered I/O is used and
  // direct_io() is false, with the reason in direct_io_reason().
  static std::unique_ptr<DiskStore> create(const DiskStoreOptions& options);
  virtual ~DiskStore() = default;

  virtual int64_t num_slots() const = 0;
  virtual int64_t page_bytes() const = 0;
  virtual int64_t slot_bytes() const = 0;  // header + payload, aligned
  virtual const std::string& path() const = 0;
  virtual bool direct_io() const = 0;
  virtual const std::string& direct_io_reason() const = 0;

  // Writes page_bytes() from `src` (any host memory) into `slot` under `tag`. On failure the
  // slot holds no valid page (a later read of it is an error) and StoreError is raised.
  virtual void write_page(int64_t slot, const SlotTag& tag, const void* src) = 0;
  // Reads `slot` into `dst` (page_bytes()), verifying the header against `expected` and both
  // checksums. On any mismatch or I/O error raises StoreError; `dst` may then hold anything.
  virtual void read_page(int64_t slot, const SlotTag& expected, void* dst) = 0;

  // Batched calls: every request runs, up to io_threads() at once, and a failed request does
  // not stop the others. Returns the failures in request order (empty when all succeeded); a
  // failed write leaves its slot holding no valid page, as write_page does. A bad request (slot
  // out of range, null pointer, or, for writes, a slot named twice) raises StoreError before
  // any transfer starts. The defaults run the requests one by one.
  virtual std::vector<SlotFailure> write_pages(const std::vector<PageWrite>& pages);
  virtual std::vector<SlotFailure> read_pages(const std::vector<PageRead>& pages);
  virtual int io_threads() const { return 1; }

  // Reads that bypass the host (cuFile into GPU frames) go to the slot file themselves; these
  // give them what they need. file_descriptor(): the slot file's descriptor (opened with
  // O_DIRECT when direct_io()), -1 when the store has no file. payload_offset(slot): the file
  // offset of the slot's page bytes (after its header).
  virtual int file_descriptor() const { return -1; }
  virtual int64_t payload_offset(int64_t slot) const;
  // Checks that `slot` holds a page and reads and checks its header against `expected`, as
  // read_page does before it trusts the payload; counts as one read for the fault injector.
  // Returns the payload checksum the header stores (checksum64 of the page bytes); the caller
  // reads the payload and must compare its checksum with this before it uses the bytes.
  // Raises StoreError, worded as read_page's errors are, when the slot or header is wrong.
  virtual uint64_t read_header(int64_t slot, const SlotTag& expected);
  // Whether `slot` may hold a page someone wants (true unless it was never written). A check of
  // the I/O path writes its test pages only into slots for which this is false.
  virtual bool slot_in_use(int64_t slot) const { (void)slot; return true; }

  // The injector this store's transfers obey (tests arm faults on it); null when the store
  // cannot inject faults.
  virtual FaultInjector* fault_injector() { return nullptr; }

 protected:
  // Raises StoreError for the first bad request of a batch (see write_pages).
  void check_batch(const std::vector<PageWrite>& pages);
  void check_batch(const std::vector<PageRead>& pages);
};

}  // namespace paged_kv::store
