// The DiskStore interface's shared parts: choosing the backend, batch checks, the one-by-one
// batched calls, and failure reports.
#include "store/disk_store.h"

#include <unordered_map>

#include "store/posix_disk_store.h"
#include "store/slot_format.h"

namespace paged_kv::store {

namespace {

template <typename Request, typename Pointer>
void check_requests(const DiskStore& store, const std::vector<Request>& pages,
                    Pointer (*pointer_of)(const Request&), const char* call, const char* pointer,
                    bool unique_slots) {
  std::unordered_map<int64_t, size_t> first_request;
  for (size_t i = 0; i < pages.size(); ++i) {
    const int64_t slot = pages[i].slot;
    const std::string where =
        std::string("DiskStore::") + call + ": request " + std::to_string(i) + " ";
    if (slot < 0 || slot >= store.num_slots()) {
      throw StoreError(where + "names slot " + std::to_string(slot) + ", outside [0, " +
                       std::to_string(store.num_slots()) + ") of " + store.path());
    }
    if (pointer_of(pages[i]) == nullptr) {
      throw StoreError(where + "(slot " + std::to_string(slot) + ") has a null " + pointer);
    }
    if (unique_slots) {
      auto inserted = first_request.emplace(slot, i);
      if (!inserted.second) {
        throw StoreError(where + "writes slot " + std::to_string(slot) + ", as request " +
                         std::to_string(inserted.first->second) +
                         " does: a batch may write a slot only once");
      }
    }
  }
}

const void* source_of(const PageWrite& page) { return page.src; }
void* destination_of(const PageRead& page) { return page.dst; }

}  // namespace

std::unique_ptr<DiskStore> DiskStore::create(const DiskStoreOptions& options) {
  return create_posix_disk_store(options);
}

int64_t DiskStore::payload_offset(int64_t slot) const {
  return slot * slot_bytes() + static_cast<int64_t>(kSlotHeaderBytes);
}

uint64_t DiskStore::read_header(int64_t slot, const SlotTag& expected) {
  (void)slot;
  (void)expected;
  throw StoreError("DiskStore::read_header: this disk store cannot read a header on its own");
}

void DiskStore::check_batch(const std::vector<PageWrite>& pages) {
  check_requests(*this, pages, &source_of, "write_pages", "src", true);
}

void DiskStore::check_batch(const std::vector<PageRead>& pages) {
  check_requests(*this, pages, &destination_of, "read_pages", "dst", false);
}

std::vector<SlotFailure> DiskStore::write_pages(const std::vector<PageWrite>& pages) {
  check_batch(pages);
  return attempt_each(pages, [this](const PageWrite& p) { write_page(p.slot, p.tag, p.src); });
}

std::vector<SlotFailure> DiskStore::read_pages(const std::vector<PageRead>& pages) {
  check_batch(pages);
  return attempt_each(pages, [this](const PageRead& p) { read_page(p.slot, p.expected, p.dst); });
}

std::string describe_failures(const std::vector<SlotFailure>& failures, size_t requests,
                              const char* what) {
  std::string text = std::to_string(failures.size()) + " of " + std::to_string(requests) + " " +
                     what + " failed";
  for (size_t i = 0; i < failures.size(); ++i) {
    text += i == 0 ? ": " : "; ";
    text += "request " + std::to_string(failures[i].index) + " (slot " +
            std::to_string(failures[i].slot) + "): " + failures[i].message;
  }
  return text;
}

}  // namespace paged_kv::store
