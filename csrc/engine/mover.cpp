#include "engine/mover.h"

namespace paged_kv::engine {

void Mover::disk_to_gpu(const std::vector<DiskFrameMove>& moves) {
  std::vector<SlotDiskMove> reads;
  std::vector<FrameSlotMove> loads;
  reads.reserve(moves.size());
  loads.reserve(moves.size());
  for (const DiskFrameMove& m : moves) {
    reads.push_back(SlotDiskMove{m.bounce_slot, m.disk_slot, m.tag});
    loads.push_back(FrameSlotMove{m.frame, m.bounce_slot});
  }
  disk_to_host(reads);
  host_to_gpu(loads);
}

}  // namespace paged_kv::engine
