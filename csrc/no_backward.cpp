// Autograd kernels of the ops without a backward (attention, gather_kv), in torch's way for an
// op whose derivative is not implemented: the forward runs, and when an input the result
// depends on requires grad (grad mode on), the outputs get a node whose backward raises. torch's
// fallback for custom ops only warns there and drops the gradient, which would leave a
// training step silently wrong. Under torch.compile, AOTAutograd traces that backward when it
// compiles a graph whose inputs require grad, so the compile raises. append_kv has no output
// to carry such a node: it copies values (ops.append_kv warns when they require grad; a history
// on the persistent pool would keep every step's graph alive). merge_states has a backward
// (paged_kv/ops.py).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>

namespace paged_kv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// forward(ctx, op, run, inputs...): the outputs of `run` (computed below autograd), attached to
// a node over the inputs whose backward names `op` and raises. The inputs are single tensor
// arguments: apply() takes those (and optional ones) as the node's inputs, not a vector.
struct NoBackward : torch::autograd::Function<NoBackward> {
  static variable_list forward(AutogradContext* ctx, const std::string& op,
                               const std::function<variable_list()>& run, const at::Tensor&,
                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
    ctx->saved_data["op"] = op;
    return run();
  }

  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, "paged_kv.", ctx->saved_data["op"].toStringRef(),
                " has no backward: a gradient cannot flow through it. Run paged_kv ops "
                "under torch.no_grad() or torch.inference_mode(), or detach their inputs");
  }
};

bool needs_node(std::initializer_list<at::Tensor> inputs) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const at::Tensor& t : inputs) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

// The two outputs of `run()`, under a NoBackward node named `op` over the inputs a, b and c
// when one of them requires grad (grad mode on); else run() as it is.
template <typename Run>
std::tuple<at::Tensor, at::Tensor> outputs_without_backward(const char* op, const Run& run,
                                                            const at::Tensor& a,
                                                            const std::optional<at::Tensor>& b,
                                                            const std::optional<at::Tensor>& c) {
  if (!needs_node({a, b.value_or(at::Tensor()), c.value_or(at::Tensor())})) return run();
  const variable_list out = NoBackward::apply(
      std::string(op),
      std::function<variable_list()>([&]() {
        auto [x, y] = run();
        return variable_list{x, y};
      }),
      a, b, c);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> attention_autograd(
    c10::DispatchKeySet keys, const at::Tensor& query, const at::Tensor& pool,
    const at::Tensor& page_table, const at::Tensor& sequences, const at::Tensor& query_starts,
    const at::Tensor& kv_lens, int64_t layer, int64_t max_query_len, std::optional<double> scale,
    int64_t window, int64_t sinks, const std::optional<at::Tensor>& host_pool,
    const std::optional<at::Tensor>& fault_queue, const std::optional<at::Tensor>& fault_count,
    const std::optional<at::Tensor>& telemetry) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("paged_kv::attention", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, int64_t, int64_t, std::optional<double>,
              int64_t, int64_t, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&)>();
  auto run = [&]() {
    return op.redispatch(keys & c10::after_autograd_keyset, query, pool, page_table, sequences,
                         query_starts, kv_lens, layer, max_query_len, scale, window, sinks,
                         host_pool, fault_queue, fault_count, telemetry);
  };
  return outputs_without_backward("attention", run, query, pool, host_pool);
}

std::tuple<at::Tensor, at::Tensor> gather_kv_autograd(c10::DispatchKeySet keys,
                                                      const at::Tensor& pool,
                                                      const at::Tensor& page_table,
                                                      int64_t sequence, const at::Tensor& pages,
                                                      int64_t layer) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("paged_kv::gather_kv", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                    const at::Tensor&, int64_t)>();
  auto run = [&]() {
    return op.redispatch(keys & c10::after_autograd_keyset, pool, page_table, sequence, pages,
                         layer);
  };
  return outputs_without_backward("gather_kv", run, pool, std::nullopt, std::nullopt);
}

// append_kv returns nothing: the call passes on below autograd (ops.append_kv warns when its key
// or value requires grad: a C++ warning here would reach stderr, not Python's warnings).
void append_kv_autograd(c10::DispatchKeySet keys, const at::Tensor& key, const at::Tensor& value,
                        at::Tensor& pool, const at::Tensor& page_table,
                        const at::Tensor& sequences, const at::Tensor& positions,
                        int64_t layer) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("paged_kv::append_kv", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, at::Tensor&,
                                         const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t)>();
  op.redispatch(keys & c10::after_autograd_keyset, key, value, pool, page_table, sequences,
                positions, layer);
}

}  // namespace

TORCH_LIBRARY_IMPL(paged_kv, Autograd, m) {
  m.impl("attention", TORCH_FN(attention_autograd));
  m.impl("gather_kv", TORCH_FN(gather_kv_autograd));
  m.impl("append_kv", TORCH_FN(append_kv_autograd));
}

}  // namespace paged_kv
