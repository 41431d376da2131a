#include "cuda/claim_counters.h"

#include "cuda/op_error_buffer.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

namespace paged_kv::cuda {
namespace {

// Buffers are never freed: a kernel queued earlier may still use one. Each stream or capture
// holds one buffer, replaced (and the old one kept) only when a launch needs more counters.
struct Buffer {
  int* counters = nullptr;
  int64_t size = 0;
};

// Keyed by (device, stream, capture id); eager work has capture id 0.
using Key = std::tuple<int, cudaStream_t, unsigned long long>;

struct Registry {
  std::mutex mutex;
  std::map<Key, Buffer> buffers;
};

Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: buffers outlive static destruction
  return *r;
}

constexpr int64_t kMinCounters = 64 * 1024;  // 256 KB: batch 256 times 256 KV heads

}  // namespace

int* claim_counters(int device, cudaStream_t stream, int64_t count) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  unsigned long long capture_id = 0;
  check_cuda(cudaStreamGetCaptureInfo(stream, &capture, &capture_id), "cudaStreamGetCaptureInfo");
  TORCH_CHECK(capture != cudaStreamCaptureStatusInvalidated,
              "paged_kv: the stream's CUDA graph capture was invalidated");
  if (capture != cudaStreamCaptureStatusActive) capture_id = 0;

  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  Buffer& b = r.buffers[Key{device, stream, capture_id}];
  if (b.size >= count) return b.counters;
  const int64_t size = std::max(count, kMinCounters);
  void* p = nullptr;
  {
    // Allocating during a capture is safe here: the buffer is not part of the graph's work,
    // it only has to outlive every replay. Relaxed mode lets cudaMalloc run meanwhile.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    check_cuda(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
    const cudaError_t status = cudaMalloc(&p, size * sizeof(int));
    check_cuda(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
    check_cuda(status, "cudaMalloc of the claim counters");
  }
  // In stream order (during a capture: a memset node of the graph, run on every replay).
  check_cuda(cudaMemsetAsync(p, 0, size * sizeof(int), stream), "cudaMemsetAsync of the claim counters");
  b.counters = static_cast<int*>(p);
  b.size = size;
  return b.counters;
}

}  // namespace paged_kv::cuda
