// gather_kv: reads whole pages of one sequence back into contiguous K and V.
#include <cuda_runtime.h>

#include <initializer_list>

#include "cuda/device_error.cuh"
#include "cuda/kv_copy.h"
#include "cuda/vector_width.cuh"

namespace paged_kv::cuda {
namespace {

constexpr int kThreads = 256;

// Grid: (requested page, K or V). The block copies num_kv_heads * page_size rows of head_dim
// elements from the frame into the output, whose rows are ordered [token][head].
template <typename Unit>
__global__ void gather_kv_kernel(const char* __restrict__ pool, PageGeometry geometry,
                                 int64_t elem_bytes, PageTableView table, int64_t sequence,
                                 const int32_t* __restrict__ pages, int64_t num_pages,
                                 int64_t layer, char* __restrict__ key_out,
                                 char* __restrict__ value_out, OpError* error) {
  const int kv = static_cast<int>(blockIdx.y);
  char* out = kv == 0 ? key_out : value_out;
  const int64_t units_per_row = geometry.head_dim * elem_bytes / static_cast<int64_t>(sizeof(Unit));
  const int64_t units_per_page = geometry.page_size * geometry.num_kv_heads * units_per_row;
  for (int64_t item = blockIdx.x; item < num_pages; item += gridDim.x) {
    const int64_t page = pages[item];
    int64_t frame = 0;
    int32_t pte = -1;
    const OpErrorCode code =
        lookup_gpu_frame(table, sequence, page, geometry.num_frames, &frame, &pte);
    Unit* dst = reinterpret_cast<Unit*>(out + item * units_per_page * sizeof(Unit));
    if (code != OpErrorCode::kNone) {
      if (threadIdx.x == 0 && kv == 0) {
        record_op_error(error, code, OpId::kGatherKv, item, sequence, page, pte, geometry, table);
      }
      Unit poison;
      memset(&poison, 0xff, sizeof(Unit));  // all-ones bytes: NaN in fp16, bf16 and fp32
      for (int64_t i = threadIdx.x; i < units_per_page; i += blockDim.x) dst[i] = poison;
      continue;
    }
    // i walks the output in order: token, head, unit.
    for (int64_t i = threadIdx.x; i < units_per_page; i += blockDim.x) {
      const int64_t unit = i % units_per_row;
      const int64_t head = (i / units_per_row) % geometry.num_kv_heads;
      const int64_t token = i / (units_per_row * geometry.num_kv_heads);
      const char* src = pool + geometry.row_offset(frame, layer, kv, head, token) * elem_bytes;
      dst[i] = reinterpret_cast<const Unit*>(src)[unit];
    }
  }
}

template <int kWidth>
int launch_gather_kv_with(dim3 grid, cudaStream_t stream, const void* pool,
                          const PageGeometry& geometry, int64_t elem_bytes,
                          const PageTableView& table, int64_t sequence, const int32_t* pages,
                          int64_t num_pages, int64_t layer, void* key_out, void* value_out,
                          OpError* error) {
  gather_kv_kernel<typename CopyUnit<kWidth>::type><<<grid, kThreads, 0, stream>>>(
      static_cast<const char*>(pool), geometry, elem_bytes, table, sequence, pages, num_pages,
      layer, static_cast<char*>(key_out), static_cast<char*>(value_out), error);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_gather_kv(const void* pool, const PageGeometry& geometry, int64_t elem_bytes,
                     const PageTableView& table, int64_t sequence, const int32_t* pages,
                     int64_t num_pages, int64_t layer, void* key_out, void* value_out,
                     OpError* error, void* stream) {
  if (num_pages == 0) return cudaSuccess;
  const int width = widest_copy_unit(
      {reinterpret_cast<int64_t>(pool), reinterpret_cast<int64_t>(key_out),
       reinterpret_cast<int64_t>(value_out), geometry.head_dim * elem_bytes});
  const dim3 grid(static_cast<unsigned>(num_pages < (1 << 20) ? num_pages : (1 << 20)), 2);
  auto s = static_cast<cudaStream_t>(stream);
#define PKV_GATHER_WITH(W)                                                                     \
  launch_gather_kv_with<W>(grid, s, pool, geometry, elem_bytes, table, sequence, pages, num_pages, \
                           layer, key_out, value_out, error)
  switch (width) {
    case 16: return PKV_GATHER_WITH(16);
    case 8: return PKV_GATHER_WITH(8);
    case 4: return PKV_GATHER_WITH(4);
    case 2: return PKV_GATHER_WITH(2);
    default: return PKV_GATHER_WITH(1);
  }
#undef PKV_GATHER_WITH
}

}  // namespace paged_kv::cuda
