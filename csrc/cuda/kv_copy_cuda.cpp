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
  constexpr const char* op = "paged_kv.append_kv";
  const PageGeometry g = check_pool(op, pool);
  const PageTableView table = check_page_table(op, page_table, pool);
  check_token_rows(op, "key", key, pool, g);
  check_token_rows(op, "value", value, pool, g);
  TORCH_CHECK(key.size(0) == value.size(0), op, ": key has ", key.size(0),
              " tokens but value has ", value.size(0));
  const int64_t num_tokens = key.size(0);
  check_index_vector(op, "sequences", sequences, num_tokens, pool);
  check_index_vector(op, "positions", positions, num_tokens, pool);
  check_layer(op, layer, g);

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
  constexpr const char* op = "paged_kv.gather_kv";
  const PageGeometry g = check_pool(op, pool);
  const PageTableView table = check_page_table(op, page_table, pool);
  check_index_vector(op, "pages", pages, -1, pool);
  check_layer(op, layer, g);
  TORCH_CHECK(sequence >= 0 && sequence < table.max_sequences, op, ": sequence must be in [0, ",
              table.max_sequences, "), got ", sequence);

  const c10::cuda::CUDAGuard guard(pool.device());
  const int64_t num_pages = pages.size(0);
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
