// The interface through which the pager moves page bytes between tiers (torch-free).
//
// Every call carries a batch of moves so an implementation can coalesce and overlap them; the
// pager never calls once per page. Contract:
//   - The moves of one call are independent: no two write the same frame or slot, and none
//     writes what another reads.
//   - Calls take effect in the order they are issued: a move never overtakes an earlier one
//     that reads or writes the same frame or slot. (The pager reuses a freed frame or slot in
//     the next call without waiting.)
//   - flush() returns once every issued move is complete, or, for moves whose bytes only the
//     device reads next (into GPU frames), ordered before any work the caller queues next on
//     the device; the pager calls it before it returns to its caller, so the bytes a PTE names
//     are in place for whoever reads through the published PTE.
// A move whose source cannot be read (a disk slot that fails its checks) raises; the pager then
// leaves the page where it was.
#pragma once

#include <cstdint>
#include <vector>

#include "store/disk_store.h"

namespace paged_kv::engine {

// A page between a GPU frame and a host slot (either direction).
struct FrameSlotMove {
  int64_t frame = 0;
  int64_t slot = 0;
};

// A page between a host slot and a disk slot (either direction), with the tag that the disk slot
// stores (write) or must present (read).
struct SlotDiskMove {
  int64_t slot = 0;
  int64_t disk_slot = 0;
  store::SlotTag tag;
};

// A page from a disk slot into a GPU frame. `bounce_slot` is a host slot the pager lends for
// the call when the mover asks for one (needs_bounce_slots()), else -1; its contents afterwards
// are undefined.
struct DiskFrameMove {
  int64_t disk_slot = 0;
  int64_t frame = 0;
  int64_t bounce_slot = 0;
  store::SlotTag tag;
};

// A GPU frame copied into another.
struct FramePair {
  int64_t from = 0;
  int64_t to = 0;
};

class Mover {
 public:
  virtual ~Mover() = default;

  virtual void gpu_to_host(const std::vector<FrameSlotMove>& moves) = 0;
  virtual void host_to_gpu(const std::vector<FrameSlotMove>& moves) = 0;
  virtual void host_to_disk(const std::vector<SlotDiskMove>& moves) = 0;
  virtual void disk_to_host(const std::vector<SlotDiskMove>& moves) = 0;
  // Default: disk_to_host into each move's bounce slot, then host_to_gpu from it.
  virtual void disk_to_gpu(const std::vector<DiskFrameMove>& moves);
  // Whether disk_to_gpu needs the pager to lend host slots (true for the default). A mover with
  // its own path (its own staging buffer, or GPUDirect Storage) overrides both.
  virtual bool needs_bounce_slots() const { return true; }
  // Sets every byte of the frames to zero (ordered like a move that writes them).
  virtual void zero_frames(const std::vector<int64_t>& frames) = 0;
  // Copies whole frames to other frames (a fork's open pages), ordered after the work already
  // queued on the device that writes the sources.
  virtual void gpu_to_gpu(const std::vector<FramePair>& copies) = 0;
  virtual void flush() = 0;
};

}  // namespace paged_kv::engine
