// Counters of the pager's work (torch-free).
#pragma once

#include <cstdint>

namespace paged_kv::engine {

// The directions pages move in.
enum class Direction : int { kGpuToHost = 0, kHostToGpu, kHostToDisk, kDiskToHost, kDiskToGpu };
constexpr int kNumDirections = 5;

inline const char* direction_name(Direction d) {
  switch (d) {
    case Direction::kGpuToHost: return "gpu_to_host";
    case Direction::kHostToGpu: return "host_to_gpu";
    case Direction::kHostToDisk: return "host_to_disk";
    case Direction::kDiskToHost: return "disk_to_host";
    default: return "disk_to_gpu";
  }
}

struct PagerStats {
  int64_t service_calls = 0;    // calls of Pager::service
  int64_t faults_serviced = 0;  // pages service() found off the GPU and brought in
  int64_t pages_moved[kNumDirections] = {};
  int64_t bytes_moved[kNumDirections] = {};
  // Pages that lost their place in a tier to make room: GPU frames taken back, host slots taken
  // back, disk slots taken back (only ever from pages with a copy higher up).
  int64_t evictions_gpu = 0;
  int64_t evictions_host = 0;
  int64_t evictions_disk = 0;
  // Evictions that wrote nothing because the page already had a valid lower copy.
  int64_t evictions_without_write = 0;
  int64_t write_throughs = 0;  // pages written to the host tier when sealed
  int64_t write_throughs_deferred = 0;  // sealed pages the host had no room for (written back later)
  int64_t frames_zeroed = 0;   // frames cleared before a page of another tenant was appended
  int64_t service_ns = 0;      // steady-clock time spent in service()
};

}  // namespace paged_kv::engine
