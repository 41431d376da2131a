// append_kv: writes new K and V rows into their pages through the page table.
#include <cuda_runtime.h>

#include <initializer_list>

#include "cuda/device_error.cuh"
#include "cuda/kv_copy.h"
#include "cuda/vector_width.cuh"

namespace paged_kv::cuda {
namespace {

constexpr int kThreads = 128;

// One block per token (grid-stride over tokens). The block copies the token's 2 * num_kv_heads
// rows of head_dim elements, in units of sizeof(Unit) bytes.
template <typename Unit>
__global__ void append_kv_kernel(const char* __restrict__ key, int64_t key_token_stride,
                                 int64_t key_head_stride, const char* __restrict__ value,
                                 int64_t value_token_stride, int64_t value_head_stride,
                                 char* __restrict__ pool, PageGeometry geometry, int64_t elem_bytes,
                                 PageTableView table, const int32_t* __restrict__ sequences,
                                 const int32_t* __restrict__ positions, int64_t num_tokens,
                                 int64_t layer, OpError* error) {
  const int64_t units_per_row = geometry.head_dim * elem_bytes / static_cast<int64_t>(sizeof(Unit));
  const int64_t units_per_token = 2 * geometry.num_kv_heads * units_per_row;
  for (int64_t token = blockIdx.x; token < num_tokens; token += gridDim.x) {
    const int64_t sequence = sequences[token];
    const int64_t position = positions[token];
    int64_t frame = 0;
    int32_t pte = -1;
    const OpErrorCode code = lookup_token_frame(table, sequence, position, geometry.page_size,
                                                geometry.num_frames, &frame, &pte);
    if (code != OpErrorCode::kNone) {
      if (threadIdx.x == 0) {
        record_op_error(error, code, OpId::kAppendKv, token, sequence, position, pte, geometry,
                        table);
      }
      continue;
    }
    const int64_t row_in_page = position % geometry.page_size;
    for (int64_t i = threadIdx.x; i < units_per_token; i += blockDim.x) {
      const int kv = static_cast<int>(i / (geometry.num_kv_heads * units_per_row));
      const int64_t head = (i / units_per_row) % geometry.num_kv_heads;
      const int64_t unit = i % units_per_row;
      const char* src = kv == 0
          ? key + (token * key_token_stride + head * key_head_stride) * elem_bytes
          : value + (token * value_token_stride + head * value_head_stride) * elem_bytes;
      char* dst = pool + geometry.row_offset(frame, layer, kv, head, row_in_page) * elem_bytes;
      reinterpret_cast<Unit*>(dst)[unit] = reinterpret_cast<const Unit*>(src)[unit];
    }
  }
}

template <int kWidth>
int launch_append_kv_with(unsigned blocks, cudaStream_t stream, TokenRows key, TokenRows value,
                          void* pool, const PageGeometry& geometry, int64_t elem_bytes,
                          const PageTableView& table, const int32_t* sequences,
                          const int32_t* positions, int64_t num_tokens, int64_t layer,
                          OpError* error) {
  append_kv_kernel<typename CopyUnit<kWidth>::type><<<blocks, kThreads, 0, stream>>>(
      static_cast<const char*>(key.data), key.token_stride, key.head_stride,
      static_cast<const char*>(value.data), value.token_stride, value.head_stride,
      static_cast<char*>(pool), geometry, elem_bytes, table, sequences, positions, num_tokens,
      layer, error);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_append_kv(TokenRows key, TokenRows value, void* pool, const PageGeometry& geometry,
                     int64_t elem_bytes, const PageTableView& table, const int32_t* sequences,
                     const int32_t* positions, int64_t num_tokens, int64_t layer,
                     OpError* error, void* stream) {
  if (num_tokens == 0) return cudaSuccess;
  const int width = widest_copy_unit(
      {reinterpret_cast<int64_t>(key.data), reinterpret_cast<int64_t>(value.data),
       reinterpret_cast<int64_t>(pool), key.token_stride * elem_bytes,
       key.head_stride * elem_bytes, value.token_stride * elem_bytes,
       value.head_stride * elem_bytes, geometry.head_dim * elem_bytes});
  const unsigned blocks = static_cast<unsigned>(num_tokens < (1 << 20) ? num_tokens : (1 << 20));
  auto s = static_cast<cudaStream_t>(stream);
#define PKV_APPEND_WITH(W)                                                                    \
  launch_append_kv_with<W>(blocks, s, key, value, pool, geometry, elem_bytes, table, sequences, \
                           positions, num_tokens, layer, error)
  switch (width) {
    case 16: return PKV_APPEND_WITH(16);
    case 8: return PKV_APPEND_WITH(8);
    case 4: return PKV_APPEND_WITH(4);
    case 2: return PKV_APPEND_WITH(2);
    default: return PKV_APPEND_WITH(1);
  }
#undef PKV_APPEND_WITH
}

}  // namespace paged_kv::cuda
