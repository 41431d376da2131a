// CUDA registration of attention: argument checks, workspaces, then the launcher in
// attention.cu on the current stream. The op never synchronises: a bad value found on the
// device (row, length, PTE) is recorded and raised by the next paged_kv op or check_errors().
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "attention_args.h"
#include "cuda/attention.h"
#include "cuda/claim_counters.h"
#include "cuda/mapped_host_memory.h"
#include "cuda/op_error_buffer.h"

namespace paged_kv {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

std::tuple<at::Tensor, at::Tensor> attention_cuda(
    const at::Tensor& query_in, const at::Tensor& pool, const at::Tensor& page_table,
    const at::Tensor& sequences, const at::Tensor& query_starts, const at::Tensor& kv_lens,
    int64_t layer, int64_t max_query_len, std::optional<double> scale, int64_t window,
    int64_t sinks, const std::optional<at::Tensor>& host_pool,
    const std::optional<at::Tensor>& fault_queue, const std::optional<at::Tensor>& fault_count,
    const std::optional<at::Tensor>& telemetry) {
  constexpr const char* op = "paged_kv.attention";
  const AttentionArgs a =
      check_attention_args(query_in, pool, page_table, sequences, query_starts, kv_lens, layer,
                           max_query_len, scale, window, sinks, host_pool, fault_queue,
                           fault_count, telemetry);
  TORCH_CHECK(pool.scalar_type() == at::kHalf || pool.scalar_type() == at::kBFloat16, op,
              ": on CUDA the pool and query must be float16 or bfloat16, got ", pool.scalar_type(),
              " (float32 runs on the CPU kernel only)");
  TORCH_CHECK(aligned16(pool.data_ptr()), op, ": pool data must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(pool.device());

  // The kernel reads query rows in 16-byte pieces: copy a query whose rows are not aligned.
  at::Tensor query = query_in;
  if (!aligned16(query.data_ptr()) || query.stride(0) % 8 != 0 || query.stride(1) % 8 != 0) {
    query = query_in.contiguous();
    if (!aligned16(query.data_ptr())) query = query.clone();
  }

  cuda::AttentionProblem pr{};
  pr.query = query.data_ptr();
  pr.query_token_stride = query.stride(0);
  pr.query_head_stride = query.stride(1);
  pr.pool = pool.data_ptr();
  pr.geometry = a.geometry;
  pr.host_pool = nullptr;
  pr.has_host_pool = host_pool.has_value();
  pr.host_slots = a.host_slots;
  if (host_pool.has_value() && a.host_slots > 0) {
    void* device_ptr = host_pool->data_ptr();
    if (host_pool->is_cuda()) {  // a mapped view: its address is the GPU's already
      TORCH_CHECK(cuda::is_mapped_host_memory(device_ptr), op,
                  ": a host_pool on the GPU must be a mapped view of pinned host memory "
                  "(paged_kv.ops.mapped_host_view); this one is GPU memory");
    } else {
      const cudaError_t e = cudaHostGetDevicePointer(&device_ptr, host_pool->data_ptr(), 0);
      if (e != cudaSuccess) (void)cudaGetLastError();  // not sticky: later checks must not see it
      TORCH_CHECK(e == cudaSuccess, op, ": host_pool is not mapped for the GPU (",
                  cudaGetErrorString(e), "); allocate it with pin_memory()");
    }
    TORCH_CHECK(aligned16(device_ptr), op, ": host_pool data must be 16-byte aligned");
    pr.host_pool = device_ptr;
  }
  pr.table = a.table;
  pr.sequences = sequences.data_ptr<int32_t>();
  pr.query_starts = query_starts.data_ptr<int32_t>();
  pr.kv_lens = kv_lens.data_ptr<int32_t>();
  pr.batch = a.batch;
  pr.total_queries = a.total_queries;
  pr.num_q_heads = a.num_q_heads;
  pr.group = a.group;
  pr.layer = a.layer;
  pr.max_query_len = a.max_query_len;
  pr.scale = a.scale;
  pr.window = a.window;
  pr.sinks = a.sinks;
  pr.fault_queue = fault_queue.has_value() ? fault_queue->data_ptr<int32_t>() : nullptr;
  pr.fault_count = fault_count.has_value() ? fault_count->data_ptr<int32_t>() : nullptr;
  pr.fault_capacity = a.fault_capacity;
  pr.telemetry = a.telemetry;
  pr.bf16 = pool.scalar_type() == at::kBFloat16;
  TORCH_CHECK(a.table.max_pages * a.geometry.page_size < (int64_t{1} << 31), op,
              ": the page table spans more than 2^31 tokens per sequence");

  const int device = pool.get_device();
  const int num_sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  const cuda::AttentionPlan plan = cuda::plan_attention(pr, num_sms);

  auto out = at::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({a.total_queries, a.num_q_heads}, query.options().dtype(at::kFloat));
  at::Tensor partial_out, partial_lse, chunk_lse;
  const auto f32 = query.options().dtype(at::kFloat);
  if (plan.num_splits > 1) {
    partial_out = at::empty({plan.num_splits, a.total_queries, a.num_q_heads, a.geometry.head_dim}, f32);
    partial_lse = at::empty({plan.num_splits, a.total_queries, a.num_q_heads}, f32);
  }
  if (a.telemetry) {
    chunk_lse = at::full({a.batch, a.num_q_heads, plan.max_chunks}, -INFINITY, f32);
  }

  OpError* error = cuda::op_error_record(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  int* tile_claims = plan.claim_counters > 0
                         ? cuda::claim_counters(device, stream, plan.claim_counters)
                         : nullptr;
  const int status = cuda::launch_attention(
      pr, plan, out.data_ptr(), lse.data_ptr<float>(),
      partial_out.defined() ? partial_out.data_ptr<float>() : nullptr,
      partial_lse.defined() ? partial_lse.data_ptr<float>() : nullptr,
      chunk_lse.defined() ? chunk_lse.data_ptr<float>() : nullptr, tile_claims,
      telemetry.has_value() ? telemetry->data_ptr<float>() : nullptr, error, stream);
  cuda::check_launch_status(status);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(paged_kv, CUDA, m) { m.impl("attention", &attention_cuda); }

}  // namespace paged_kv
