// CPU kernel of merge_states: the reference semantics for the CUDA twin.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "core/lse_merge.h"
#include "merge_states_args.h"

namespace paged_kv {
namespace {

std::tuple<at::Tensor, at::Tensor> merge_states_cpu(const at::Tensor& outputs_in,
                                                    const at::Tensor& lses_in) {
  check_merge_states_args(outputs_in, lses_in);
  const at::Tensor outputs = outputs_in.contiguous();
  const at::Tensor lses = lses_in.contiguous();
  const int64_t states = outputs.size(0), rows = outputs.size(1) * outputs.size(2);
  const int64_t dim = outputs.size(3);
  auto out = at::empty({outputs.size(1), outputs.size(2), dim}, outputs.options());
  auto lse_out = at::empty({outputs.size(1), outputs.size(2)}, lses.options());
  const float* lse = lses.data_ptr<float>();
  float* lse_dst = lse_out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, outputs.scalar_type(), "merge_states_cpu", [&] {
    const scalar_t* src = outputs.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(dim);
      for (int64_t r = begin; r < end; ++r) {
        LseMerge merge;
        for (int64_t s = 0; s < states; ++s) merge.add(lse[s * rows + r]);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < states; ++s) {
          const float w = merge.weight(lse[s * rows + r]);
          if (w == 0.f) continue;  // an empty state's output may be anything, NaN included
          const scalar_t* o = src + (s * rows + r) * dim;
          for (int64_t d = 0; d < dim; ++d) acc[d] += w * static_cast<float>(o[d]);
        }
        for (int64_t d = 0; d < dim; ++d) dst[r * dim + d] = static_cast<scalar_t>(acc[d]);
        lse_dst[r] = merge.lse();
      }
    });
  });
  return {out, lse_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(paged_kv, CPU, m) { m.impl("merge_states", &merge_states_cpu); }

}  // namespace paged_kv
