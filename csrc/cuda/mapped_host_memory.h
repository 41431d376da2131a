// Pinned host memory as the GPU addresses it (torch glue, host side). A CUDA tensor over the
// host tier's pinned pages lets code that may only take device tensors, such as a step that
// torch.compile captures into CUDA graphs, read host slots in place (zero-copy).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace paged_kv::cuda {

// A CUDA tensor on `device` with `host`'s shape and strides, over the same pinned pages (no
// copy); it keeps `host`'s storage alive. `host` must be a pinned CPU tensor.
at::Tensor mapped_host_view(const at::Tensor& host, int64_t device);

// Whether `ptr` lies in page-locked host memory that the GPU can address.
bool is_mapped_host_memory(const void* ptr);

}  // namespace paged_kv::cuda
