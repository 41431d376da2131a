// The disk store over POSIX I/O: O_DIRECT preadv/pwritev of whole slots, buffered I/O where
// the file system refuses O_DIRECT (torch-free).
#pragma once

#include <memory>

#include "store/disk_store.h"

namespace paged_kv::store {

// Validates `options` and builds the store; raises StoreError as DiskStore::create documents.
std::unique_ptr<DiskStore> create_posix_disk_store(const DiskStoreOptions& options);

}  // namespace paged_kv::store
