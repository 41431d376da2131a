#include "cuda/op_error_buffer.h"

#include <c10/util/Exception.h>

#include <cstring>
#include <mutex>
#include <vector>

namespace paged_kv::cuda {
namespace {

// Per thread, like torch's grad mode: a serving loop that defers its checks does not change
// what ops of other threads do.
thread_local bool t_sync_checks = true;

struct DeviceRecords {
  std::mutex mutex;
  std::vector<OpError*> host;  // indexed by device; nullptr until first use
};

DeviceRecords& records() {
  static DeviceRecords r;  // never freed: kernels may still hold the pointer at exit
  return r;
}

#define PKV_CUDA_CHECK(call) check_cuda((call), #call)

OpError* host_record(int device) {
  auto& r = records();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (static_cast<int>(r.host.size()) <= device) r.host.resize(device + 1, nullptr);
  if (r.host[device] == nullptr) {
    int previous = 0;
    PKV_CUDA_CHECK(cudaGetDevice(&previous));
    PKV_CUDA_CHECK(cudaSetDevice(device));
    void* p = nullptr;
    PKV_CUDA_CHECK(cudaHostAlloc(&p, sizeof(OpError), cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(p, 0, sizeof(OpError));
    PKV_CUDA_CHECK(cudaSetDevice(previous));
    r.host[device] = static_cast<OpError*>(p);
  }
  return r.host[device];
}

// Raises the pending error (and clears it). Callers make sure the kernels that could write it
// have finished, or accept that a later call reports it.
void raise_pending(int device) {
  volatile OpError* record = host_record(device);
  if (record->code == 0) return;
  OpError copy;
  int32_t* words = reinterpret_cast<int32_t*>(&copy);
  for (int i = 0; i < kOpErrorWords; ++i) words[i] = reinterpret_cast<volatile int32_t*>(record)[i];
  for (int i = 0; i < kOpErrorWords; ++i) reinterpret_cast<volatile int32_t*>(record)[i] = 0;
  TORCH_CHECK(false, describe_op_error(copy));
}

}  // namespace

OpError* op_error_record(int device) {
  raise_pending(device);
  void* device_ptr = nullptr;
  PKV_CUDA_CHECK(cudaHostGetDevicePointer(&device_ptr, host_record(device), 0));
  return static_cast<OpError*>(device_ptr);
}

void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "paged_kv: ", what, " failed: ", cudaGetErrorString(status));
}

void check_launch_status(int launch_status) {
  check_cuda(static_cast<cudaError_t>(launch_status), "kernel launch");
}

void check_launch(int launch_status, int device, cudaStream_t stream) {
  check_launch_status(launch_status);
  if (!t_sync_checks) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  PKV_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  PKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  raise_pending(device);
}

void check_errors(int device) {
  int previous = 0;
  PKV_CUDA_CHECK(cudaGetDevice(&previous));
  PKV_CUDA_CHECK(cudaSetDevice(device));
  const cudaError_t status = cudaDeviceSynchronize();
  PKV_CUDA_CHECK(cudaSetDevice(previous));
  TORCH_CHECK(status == cudaSuccess, "paged_kv: device ", device,
              " reported an error: ", cudaGetErrorString(status));
  raise_pending(device);
}

void set_sync_checks(bool enabled) { t_sync_checks = enabled; }
bool sync_checks() { return t_sync_checks; }

}  // namespace paged_kv::cuda
