// CUDA registrations of append_kv and gather_kv: argument checks, then the raw-pointer
// launchers in append_kv.cu and gather_kv.cu on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/kv_copy.h"
#include "cuda/op_error_buffer.h"
#include "kv_copy_args.h"

namespace paged_kv {
namespace {

void append_kv_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& pool,
                    const at::Tensor& page_table, const at::Tensor& sequences,
                    const at::Tensor& positions, int64_t layer) {
  // Plain references, not structured bindings: C++17 lambdas cannot capture those.
  const AppendKvArgs args =
      check_append_kv_args(key, value, pool, page_table, sequences, positions, layer);
  const PageGeometry& g = args.geometry;
  const PageTableView& table = args.table;
  const int64_t num_tokens = args.num_tokens;

  const c10::cuda::CUDAGuard guard(pool.device());
  const int device = pool.get_device();
  OpError* error = cuda::op_error_record(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int status = cuda::launch_append_kv(
      cuda::TokenRows{key.data_ptr(), key.stride(0), key.stride(1)},
      cuda::TokenRows{value.data_ptr(), value.stride(0), value.stride(1)}, pool.data_ptr(), g,
      pool.element_size(), table, sequences.data_ptr<int32_t>(), positions.data_ptr<int32_t>(),
      num_tokens, layer, error, stream);
  cuda::check_launch(status, device, stream);
}

std::tuple<at::Tensor, at::Tensor> gather_kv_cuda(const at::Tensor& pool,
                                                  const at::Tensor& page_table, int64_t sequence,
                                                  const at::Tensor& pages, int64_t layer) {
  const GatherKvArgs args = check_gather_kv_args(pool, page_table, sequence, pages, layer);
  const PageGeometry& g = args.geometry;
  const PageTableView& table = args.table;
  const int64_t num_pages = args.num_pages;

  const c10::cuda::CUDAGuard guard(pool.device());
  auto key_out = at::empty({num_pages * g.page_size, g.num_kv_heads, g.head_dim}, pool.options());
  auto value_out = at::empty_like(key_out);
  const int device = pool.get_device();
  OpError* error = cuda::op_error_record(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int status = cuda::launch_gather_kv(pool.data_ptr(), g, pool.element_size(), table,
                                            sequence, pages.data_ptr<int32_t>(), num_pages, layer,
                                            key_out.data_ptr(), value_out.data_ptr(), error, stream);
  cuda::check_launch(status, device, stream);
  return {key_out, value_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(paged_kv, CUDA, m) {
  m.impl("append_kv", &append_kv_cuda);
  m.impl("gather_kv", &gather_kv_cuda);
}

}  // namespace paged_kv
