// merge_states: merges partial attention states by log-sum-exp (core/lse_merge.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "core/lse_merge.h"
#include "cuda/merge_states.h"

namespace paged_kv::cuda {
namespace {

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline float from_float<float>(float x) { return x; }
template <> __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

constexpr int kThreads = 128;

// One block per (query, head) row (grid-stride); threads walk head_dim. Every thread folds the
// row's few LSEs itself, which is cheaper than sharing them through shared memory.
template <typename T>
__global__ void merge_states_kernel(const T* __restrict__ outputs, const float* __restrict__ lses,
                                    int64_t num_states, int64_t rows, int64_t head_dim,
                                    T* __restrict__ out, float* __restrict__ lse_out) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    LseMerge merge;
    for (int64_t s = 0; s < num_states; ++s) merge.add(lses[s * rows + row]);
    if (threadIdx.x == 0) lse_out[row] = merge.lse();
    for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
      float acc = 0.f;
      for (int64_t s = 0; s < num_states; ++s) {
        const float w = merge.weight(lses[s * rows + row]);
        if (w != 0.f) acc += w * to_float(outputs[(s * rows + row) * head_dim + d]);
      }
      out[row * head_dim + d] = from_float<T>(acc);
    }
  }
}

template <typename T>
int launch_typed(const void* outputs, const float* lses, int64_t num_states, int64_t rows,
                 int64_t head_dim, void* out, float* lse_out, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(rows < (1 << 20) ? rows : (1 << 20));
  merge_states_kernel<T><<<blocks, kThreads, 0, stream>>>(
      static_cast<const T*>(outputs), lses, num_states, rows, head_dim, static_cast<T*>(out),
      lse_out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_merge_states(const void* outputs, const float* lses, int64_t num_states, int64_t rows,
                        int64_t head_dim, FloatType type, void* out, float* lse_out,
                        void* stream) {
  if (rows == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  switch (type) {
    case FloatType::kFloat16:
      return launch_typed<__half>(outputs, lses, num_states, rows, head_dim, out, lse_out, s);
    case FloatType::kBFloat16:
      return launch_typed<__nv_bfloat16>(outputs, lses, num_states, rows, head_dim, out, lse_out, s);
    default:
      return launch_typed<float>(outputs, lses, num_states, rows, head_dim, out, lse_out, s);
  }
}

}  // namespace paged_kv::cuda
