#include "cuda/mapped_host_memory.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace paged_kv::cuda {

at::Tensor mapped_host_view(const at::Tensor& host, int64_t device) {
  constexpr const char* fn = "paged_kv.mapped_host_view";
  TORCH_CHECK(host.device().is_cpu(), fn, ": expects a CPU tensor in pinned memory, got one on ",
              host.device());
  const int64_t devices = at::cuda::device_count();
  TORCH_CHECK(device >= 0 && device < devices, fn, ": no CUDA device ", device, " (", devices,
              " visible)");
  const auto options = host.options().device(at::Device(at::kCUDA, static_cast<int8_t>(device)));
  if (host.numel() == 0) return at::empty(host.sizes(), options);  // nothing to map
  TORCH_CHECK(host.is_pinned(), fn,
              ": the tensor must be in pinned (page-locked) memory for the GPU to read it; "
              "allocate it with pin_memory=True");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* mapped = nullptr;
  const cudaError_t e = cudaHostGetDevicePointer(&mapped, host.data_ptr(), 0);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it so that later checks do not see it
    TORCH_CHECK(false, fn, ": the pinned memory is not mapped for CUDA device ", device, " (",
                cudaGetErrorString(e), ")");
  }
  // The view's deleter owns a reference to the host tensor, so the pages outlive the view.
  return at::from_blob(mapped, host.sizes(), host.strides(), [keep = host](void*) {}, options);
}

bool is_mapped_host_memory(const void* ptr) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, ptr) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attributes.type == cudaMemoryTypeHost;
}

}  // namespace paged_kv::cuda
