// CPU kernel of attention: the reference semantics for the CUDA twin.
//
// Two phases. The plan reads every per-sequence value and the PTE of every page that some query
// can see, and raises the first bad one, so a failed call writes nothing (no fault, no
// telemetry). The compute phase runs exact softmax attention in float32 over the readable pages,
// one task per (batch entry, KV head), so the K/V rows it converts serve every query head of the
// group.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "attention_args.h"
#include "core/op_error.h"
#include "core/pte.h"
#include "cpu/raise_op_error.h"

namespace paged_kv {
namespace {

// A page the compute phase reads: its rows live at base + row_offset(index, ...).
struct ReadablePage {
  int64_t page;      // logical page in the sequence
  const char* base;  // data of the pool (tier 0) or the host pool (tier 1)
  int64_t index;     // frame or slot
};

// One batch entry after validation. Keys that some query can see are those at positions
// [0, sink_end) and [window_begin, kv_len); the others are never read.
struct Entry {
  int64_t row;
  int64_t query_begin;
  int64_t num_queries;
  int64_t kv_len;
  int64_t sink_end;
  int64_t window_begin;
  int64_t pages_begin;  // its readable pages: plan.pages[pages_begin, pages_end)
  int64_t pages_end;

  bool seen_by_some_query(int64_t pos) const { return pos < sink_end || pos >= window_begin; }
};

struct Plan {
  std::vector<Entry> entries;
  std::vector<ReadablePage> pages;
  std::vector<std::pair<int32_t, int32_t>> faults;  // (row, page), each once, in batch order
};

// Query at `query_pos` sees the key at `key_pos` (causal, sliding window, sinks).
inline bool visible(int64_t key_pos, int64_t query_pos, int64_t window, int64_t sinks) {
  if (key_pos > query_pos) return false;
  return window == 0 || key_pos > query_pos - window || key_pos < sinks;
}

Plan plan_attention(const AttentionArgs& a, const at::Tensor& pool,
                    const std::optional<at::Tensor>& host_pool, const at::Tensor& sequences,
                    const at::Tensor& query_starts, const at::Tensor& kv_lens) {
  constexpr const char* op = "paged_kv.attention";
  const PageGeometry& g = a.geometry;
  const PageTableView& table = a.table;
  const int32_t* rows = sequences.data_ptr<int32_t>();
  const int32_t* starts = query_starts.data_ptr<int32_t>();
  const int32_t* lens = kv_lens.data_ptr<int32_t>();
  const int64_t max_kv_len = table.max_pages * g.page_size;

  TORCH_CHECK(starts[0] == 0, op, ": query_starts[0] must be 0, got ", starts[0]);
  TORCH_CHECK(starts[a.batch] == a.total_queries, op, ": query_starts[", a.batch,
              "] (the last entry) must equal the number of queries ", a.total_queries, ", got ",
              starts[a.batch]);

  Plan plan;
  plan.entries.resize(a.batch);
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t row = rows[b];
    const int64_t kv_len = lens[b];
    const int64_t num_queries = static_cast<int64_t>(starts[b + 1]) - starts[b];
    if (row < 0 || row >= table.max_sequences) {
      raise_op_error(OpErrorCode::kSequenceOutOfRange, OpId::kAttention, b, row, 0, -1, g, table);
    }
    if (kv_len < 0 || kv_len > max_kv_len) {
      raise_op_error(OpErrorCode::kKvLengthOutOfRange, OpId::kAttention, b, row, kv_len, -1, g,
                     table);
    }
    // A decreasing query_starts shows up here as a negative query count.
    if (num_queries < 0 || num_queries > std::min(a.max_query_len, kv_len)) {
      raise_op_error(OpErrorCode::kQueryLengthOutOfRange, OpId::kAttention, b, row, num_queries,
                     static_cast<int32_t>(kv_len), g, table);
    }
    Entry& e = plan.entries[b];
    e.row = row;
    e.query_begin = starts[b];
    e.num_queries = num_queries;
    e.kv_len = kv_len;
    if (num_queries == 0) {
      e.sink_end = 0;
      e.window_begin = kv_len;  // no query, no visible key
    } else if (a.window == 0) {
      e.sink_end = 0;
      e.window_begin = 0;
    } else {
      // The oldest query sits at kv_len - num_queries; the windows of consecutive queries
      // overlap, so their union is one range ending at kv_len.
      e.sink_end = std::min(a.sinks, kv_len);
      e.window_begin = std::max<int64_t>(0, kv_len - num_queries - a.window + 1);
    }
  }

  // Host-slot errors report the host pool's slot count in the record's num_frames word.
  PageGeometry host_geometry = g;
  host_geometry.num_frames = a.host_slots;
  const char* pool_base = static_cast<const char*>(pool.data_ptr());
  const bool has_host_pool = host_pool.has_value();  // even one of 0 slots (null data)
  const char* host_base =
      has_host_pool ? static_cast<const char*>(host_pool->data_ptr()) : nullptr;
  std::set<std::pair<int32_t, int32_t>> faulted;
  for (int64_t b = 0; b < a.batch; ++b) {
    Entry& e = plan.entries[b];
    e.pages_begin = static_cast<int64_t>(plan.pages.size());
    const int64_t num_pages = (e.kv_len + g.page_size - 1) / g.page_size;
    for (int64_t p = 0; p < num_pages; ++p) {
      const int64_t first = p * g.page_size;
      const int64_t last = std::min(first + g.page_size, e.kv_len) - 1;
      if (first >= e.sink_end && last < e.window_begin) continue;  // no query sees this page
      const int32_t pte = table.ptes[e.row * table.row_stride + p];
      const Tier tier = pte_tier(pte);
      const int64_t index = pte_index(pte);
      if (tier == Tier::kGpu) {
        if (index >= g.num_frames) {
          raise_op_error(OpErrorCode::kFrameOutOfRange, OpId::kAttention, b, e.row, p, pte, g,
                         table);
        }
        plan.pages.push_back({p, pool_base, index});
      } else if (tier == Tier::kHost && has_host_pool) {
        if (index >= a.host_slots) {
          raise_op_error(OpErrorCode::kSlotOutOfRange, OpId::kAttention, b, e.row, p, pte,
                         host_geometry, table);
        }
        plan.pages.push_back({p, host_base, index});
      } else if (a.fault_capacity < 0) {
        raise_op_error(OpErrorCode::kPageNotReadable, OpId::kAttention, b, e.row, p, pte, g,
                       table);
      } else {
        // Two entries of one row list a shared page once.
        const std::pair<int32_t, int32_t> key{static_cast<int32_t>(e.row),
                                              static_cast<int32_t>(p)};
        if (faulted.insert(key).second) plan.faults.push_back(key);
      }
    }
    e.pages_end = static_cast<int64_t>(plan.pages.size());
  }
  return plan;
}

// Appends the faults at index fault_count[0] onwards; entries past the capacity are dropped but
// still counted, so the caller sees the overflow.
void record_faults(const Plan& plan, at::Tensor& fault_queue, at::Tensor& fault_count) {
  int32_t* queue = fault_queue.data_ptr<int32_t>();
  int32_t* count = fault_count.data_ptr<int32_t>();
  const int64_t capacity = fault_queue.size(0);
  // A count below 0 would make the faults of this call vanish (their slots skipped) while read
  // back as fewer; the kernel's own counting starts at the caller's value.
  TORCH_CHECK(*count >= 0, "paged_kv.attention: fault_count is ", *count,
              ": it must start at 0 (ops.new_fault_queue) and only grows");
  for (const auto& fault : plan.faults) {
    const int64_t slot = *count;
    if (*count < std::numeric_limits<int32_t>::max()) ++*count;  // past it, still an overflow
    if (slot < capacity) {
      queue[2 * slot] = fault.first;
      queue[2 * slot + 1] = fault.second;
    }
  }
}

// Attention of one (entry, KV head): every query of the entry, every query head of the group.
// `mass` (one float per readable page of the entry) receives the softmax mass the newest query
// of each head of the group put on each page.
template <typename scalar_t>
void attend_entry_head(const AttentionArgs& a, const Entry& e, const ReadablePage* pages,
                       int64_t kv_head, const at::Tensor& query, scalar_t* out, float* lse,
                       float* mass) {
  const PageGeometry& g = a.geometry;
  const int64_t dim = g.head_dim;

  // K and V rows (as float) of every key some query can see, with its position and page.
  std::vector<int64_t> positions;
  std::vector<int64_t> page_of_key;
  std::vector<float> keys, values;
  const int64_t num_pages = e.pages_end - e.pages_begin;
  for (int64_t k = 0; k < num_pages; ++k) {
    const ReadablePage& page = pages[k];
    const scalar_t* base = reinterpret_cast<const scalar_t*>(page.base);
    for (int64_t t = 0; t < g.page_size; ++t) {
      const int64_t pos = page.page * g.page_size + t;
      if (pos >= e.kv_len) break;  // the tail past the sequence's end is never read
      if (!e.seen_by_some_query(pos)) continue;
      const scalar_t* key_row = base + g.row_offset(page.index, a.layer, 0, kv_head, t);
      const scalar_t* value_row = base + g.row_offset(page.index, a.layer, 1, kv_head, t);
      for (int64_t d = 0; d < dim; ++d) keys.push_back(static_cast<float>(key_row[d]));
      for (int64_t d = 0; d < dim; ++d) values.push_back(static_cast<float>(value_row[d]));
      positions.push_back(pos);
      page_of_key.push_back(k);
    }
  }
  const int64_t num_keys = static_cast<int64_t>(positions.size());

  const scalar_t* q_data = query.data_ptr<scalar_t>();
  const int64_t q_stride0 = query.stride(0), q_stride1 = query.stride(1);
  const int64_t num_q_heads = a.num_q_heads;
  std::vector<float> q_row(dim), acc(dim), weights(num_keys);
  for (int64_t j = 0; j < a.group; ++j) {
    const int64_t head = kv_head * a.group + j;
    for (int64_t i = 0; i < e.num_queries; ++i) {
      const int64_t n = e.query_begin + i;
      const int64_t query_pos = e.kv_len - e.num_queries + i;
      const scalar_t* q = q_data + n * q_stride0 + head * q_stride1;
      for (int64_t d = 0; d < dim; ++d) q_row[d] = static_cast<float>(q[d]);

      // Two passes: scores and their maximum, then the exponentials, their sum and the
      // weighted sum of values.
      float max_score = -std::numeric_limits<float>::infinity();
      bool nan_score = false;
      for (int64_t k = 0; k < num_keys; ++k) {
        if (!visible(positions[k], query_pos, a.window, a.sinks)) {
          weights[k] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const float* key = keys.data() + k * dim;
        float dot = 0.f;
        for (int64_t d = 0; d < dim; ++d) dot += q_row[d] * key[d];
        weights[k] = dot * a.scale;
        nan_score |= std::isnan(weights[k]);
        max_score = std::max(max_score, weights[k]);
      }
      scalar_t* o = out + (n * num_q_heads + head) * dim;
      if (nan_score) {
        // A NaN in the query or in a visible key: the softmax is NaN, and so are the output and
        // the LSE (std::max would have passed over it). No telemetry from this head.
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<scalar_t>(NAN);
        lse[n * num_q_heads + head] = NAN;
        continue;
      }
      if (max_score == -std::numeric_limits<float>::infinity()) {
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<scalar_t>(0.f);
        lse[n * num_q_heads + head] = -std::numeric_limits<float>::infinity();
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float sum = 0.f;
      for (int64_t k = 0; k < num_keys; ++k) {
        if (weights[k] == -std::numeric_limits<float>::infinity()) {
          weights[k] = 0.f;
          continue;
        }
        const float w = std::exp(weights[k] - max_score);
        weights[k] = w;
        sum += w;
        const float* value = values.data() + k * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += w * value[d];
      }
      const float inv_sum = 1.f / sum;
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv_sum);
      lse[n * num_q_heads + head] = max_score + std::log(sum);
      if (mass != nullptr && i == e.num_queries - 1) {
        for (int64_t k = 0; k < num_keys; ++k) mass[page_of_key[k]] += weights[k] * inv_sum;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(
    const at::Tensor& query, const at::Tensor& pool, const at::Tensor& page_table,
    const at::Tensor& sequences, const at::Tensor& query_starts, const at::Tensor& kv_lens,
    int64_t layer, int64_t max_query_len, std::optional<double> scale, int64_t window,
    int64_t sinks, const std::optional<at::Tensor>& host_pool,
    const std::optional<at::Tensor>& fault_queue, const std::optional<at::Tensor>& fault_count,
    const std::optional<at::Tensor>& telemetry) {
  // Plain references, not structured bindings: C++17 lambdas cannot capture those.
  const AttentionArgs args = check_attention_args(
      query, pool, page_table, sequences, query_starts, kv_lens, layer, max_query_len, scale,
      window, sinks, host_pool, fault_queue, fault_count, telemetry);
  const Plan plan = plan_attention(args, pool, host_pool, sequences, query_starts, kv_lens);

  if (fault_queue.has_value()) {
    at::Tensor queue = *fault_queue;
    at::Tensor count = *fault_count;
    record_faults(plan, queue, count);
  }

  const int64_t num_kv_heads = args.geometry.num_kv_heads;
  auto out = at::empty({args.total_queries, args.num_q_heads, args.geometry.head_dim},
                       query.options());
  auto lse = at::empty({args.total_queries, args.num_q_heads}, query.options().dtype(at::kFloat));
  // Telemetry is summed per (entry, KV head, page) first and added to the table serially after,
  // so entries that share a row never race on it.
  std::vector<float> mass;
  if (args.telemetry) mass.assign(plan.pages.size() * num_kv_heads, 0.f);
  float* lse_data = lse.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "attention_cpu", [&] {
    scalar_t* out_data = out.data_ptr<scalar_t>();
    at::parallel_for(0, args.batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const Entry& e = plan.entries[task / num_kv_heads];
        const int64_t kv_head = task % num_kv_heads;
        if (e.num_queries == 0) continue;
        float* entry_mass = nullptr;
        if (args.telemetry) {
          const int64_t num_pages = e.pages_end - e.pages_begin;
          entry_mass = mass.data() + e.pages_begin * num_kv_heads + kv_head * num_pages;
        }
        attend_entry_head<scalar_t>(args, e, plan.pages.data() + e.pages_begin, kv_head, query,
                                    out_data, lse_data, entry_mass);
      }
    });
  });

  if (args.telemetry) {
    float* table = telemetry->data_ptr<float>();
    const int64_t max_pages = args.table.max_pages;
    for (const Entry& e : plan.entries) {
      if (e.num_queries == 0) continue;
      const int64_t num_pages = e.pages_end - e.pages_begin;
      const float* entry_mass = mass.data() + e.pages_begin * num_kv_heads;
      for (int64_t k = 0; k < num_pages; ++k) {
        float total = 0.f;
        for (int64_t h = 0; h < num_kv_heads; ++h) total += entry_mass[h * num_pages + k];
        table[e.row * max_pages + plan.pages[e.pages_begin + k].page] += total;
      }
    }
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(paged_kv, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace paged_kv
