// CUDA registration of merge_states: checks, then the launcher in merge_states.cu.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/merge_states.h"
#include "cuda/op_error_buffer.h"
#include "merge_states_args.h"

namespace paged_kv {
namespace {

cuda::FloatType float_type(at::ScalarType t) {
  if (t == at::kHalf) return cuda::FloatType::kFloat16;
  if (t == at::kBFloat16) return cuda::FloatType::kBFloat16;
  return cuda::FloatType::kFloat32;
}

std::tuple<at::Tensor, at::Tensor> merge_states_cuda(const at::Tensor& outputs_in,
                                                     const at::Tensor& lses_in) {
  check_merge_states_args(outputs_in, lses_in);
  const c10::cuda::CUDAGuard guard(outputs_in.device());
  const at::Tensor outputs = outputs_in.contiguous();
  const at::Tensor lses = lses_in.contiguous();
  auto out = at::empty({outputs.size(1), outputs.size(2), outputs.size(3)}, outputs.options());
  auto lse_out = at::empty({outputs.size(1), outputs.size(2)}, lses.options());
  const int device = outputs.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int status = cuda::launch_merge_states(
      outputs.data_ptr(), lses.data_ptr<float>(), outputs.size(0),
      outputs.size(1) * outputs.size(2), outputs.size(3), float_type(outputs.scalar_type()),
      out.data_ptr(), lse_out.data_ptr<float>(), stream);
  // No input can be bad on the device here, so no synchronising check: only the launch status.
  cuda::check_launch_status(status);
  return {out, lse_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(paged_kv, CUDA, m) { m.impl("merge_states", &merge_states_cuda); }

}  // namespace paged_kv
