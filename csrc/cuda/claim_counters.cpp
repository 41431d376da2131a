#include "cuda/claim_counters.h"

#include "cuda/op_error_buffer.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace paged_kv::cuda {
namespace {

struct Buffer {
  int* counters = nullptr;
  int64_t size = 0;
};

// Keyed by (device, stream, capture id); eager work has capture id 0.
using Key = std::tuple<int, cudaStream_t, unsigned long long>;

// A capture's buffer, handed back when its graph and every executable made from it are gone.
struct Returned {
  Key key;
  Buffer buffer;
};

struct Registry {
  std::mutex mutex;
  std::map<Key, Buffer> buffers;                // eager streams and captures in progress
  std::vector<std::pair<int, Buffer>> pooled;   // (device, buffer) of destroyed graphs
  int64_t allocated = 0;
  // Filled by the user objects' destructors, which run on a CUDA thread and may make no CUDA
  // call; its own lock, never held across one, so a destructor never waits on a CUDA call.
  std::mutex returned_mutex;
  std::vector<Returned> returned;
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: buffers outlive static destruction
  return *r;
}

constexpr int64_t kMinCounters = 64 * 1024;  // 256 KB: batch 256 times 256 KV heads

// The user object's destructor: CUDA calls it once the graph that owns the reference and every
// executable instantiated from it are destroyed and their launches have completed.
void return_buffer(void* p) {
  Returned* item = static_cast<Returned*>(p);
  Registry& r = registry();
  {
    std::lock_guard<std::mutex> lock(r.returned_mutex);
    r.returned.push_back(*item);
  }
  delete item;
}

// Moves returned buffers into the pool (the caller holds r.mutex). A capture that outgrew its
// buffer holds several; the key is dropped with the one it still names.
void take_back_returned(Registry& r) {
  std::vector<Returned> returned;
  {
    std::lock_guard<std::mutex> lock(r.returned_mutex);
    returned.swap(r.returned);
  }
  for (const Returned& item : returned) {
    auto it = r.buffers.find(item.key);
    if (it != r.buffers.end() && it->second.counters == item.buffer.counters) r.buffers.erase(it);
    r.pooled.emplace_back(std::get<0>(item.key), item.buffer);
  }
}

// A buffer of at least `size` counters on `device`: the smallest pooled one that fits, else a
// new one.
Buffer acquire(Registry& r, int device, int64_t size) {
  auto best = r.pooled.end();
  for (auto it = r.pooled.begin(); it != r.pooled.end(); ++it) {
    if (it->first == device && it->second.size >= size &&
        (best == r.pooled.end() || it->second.size < best->second.size)) {
      best = it;
    }
  }
  if (best != r.pooled.end()) {
    const Buffer b = best->second;
    r.pooled.erase(best);
    return b;
  }
  void* p = nullptr;
  check_cuda(cudaMalloc(&p, size * sizeof(int)), "cudaMalloc of the claim counters");
  ++r.allocated;
  return Buffer{static_cast<int*>(p), size};
}

// Makes the captured graph own a reference to `buffer`, whose destructor hands it back. On
// failure the buffer goes back to the pool (directly, or through the destructor once the
// reference is released).
void attach_to_graph(Registry& r, cudaGraph_t graph, const Key& key, const Buffer& buffer) {
  Returned* item = new Returned{key, buffer};
  cudaUserObject_t object = nullptr;
  const cudaError_t created =
      cudaUserObjectCreate(&object, item, return_buffer, 1, cudaUserObjectNoDestructorSync);
  if (created != cudaSuccess) {
    delete item;
    r.pooled.emplace_back(std::get<0>(key), buffer);
    check_cuda(created, "cudaUserObjectCreate for the claim counters");
  }
  // Moves the reference created above to the graph.
  const cudaError_t retained = cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove);
  if (retained != cudaSuccess) {
    cudaUserObjectRelease(object, 1);
    check_cuda(retained, "cudaGraphRetainUserObject for the claim counters");
  }
}

}  // namespace

int* claim_counters(int device, cudaStream_t stream, int64_t count) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  unsigned long long capture_id = 0;
  cudaGraph_t graph = nullptr;
  check_cuda(cudaStreamGetCaptureInfo(stream, &capture, &capture_id, &graph),
             "cudaStreamGetCaptureInfo");
  TORCH_CHECK(capture != cudaStreamCaptureStatusInvalidated,
              "paged_kv: the stream's CUDA graph capture was invalidated");
  const bool capturing = capture == cudaStreamCaptureStatusActive;
  if (!capturing) capture_id = 0;

  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  take_back_returned(r);
  const Key key{device, stream, capture_id};
  Buffer& b = r.buffers[key];
  if (b.size >= count) return b.counters;
  Buffer fresh;
  {
    // Allocating during a capture is safe here: the buffer is not part of the graph's work,
    // it only has to outlive every replay. Relaxed mode lets cudaMalloc run meanwhile.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    check_cuda(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
    try {
      fresh = acquire(r, device, std::max(count, kMinCounters));
      if (capturing) attach_to_graph(r, graph, key, fresh);
    } catch (...) {
      cudaThreadExchangeStreamCaptureMode(&mode);
      throw;
    }
    check_cuda(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
  }
  // In stream order (during a capture: a memset node of the graph, run on every replay). An
  // eager stream's outgrown buffer is kept: a kernel still queued may hold it.
  check_cuda(cudaMemsetAsync(fresh.counters, 0, fresh.size * sizeof(int), stream),
             "cudaMemsetAsync of the claim counters");
  b = fresh;
  return b.counters;
}

ClaimCounterStats claim_counter_stats() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  take_back_returned(r);
  return ClaimCounterStats{r.allocated, static_cast<int64_t>(r.pooled.size())};
}

}  // namespace paged_kv::cuda
