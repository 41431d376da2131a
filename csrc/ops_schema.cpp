// Every schema of the paged_kv ops, in one place. Kernels register per backend beside their
// code (cpu/, cuda/); fake kernels live in paged_kv/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(paged_kv, m) {
  // Writes K and V of a batch of tokens into `layer` of their pages, in place.
  //   key, value: [num_tokens, num_kv_heads, head_dim] (head_dim contiguous)
  //   pool:       [num_frames, num_layers, 2, num_kv_heads, page_size, head_dim]
  //   page_table: int32 [max_sequences, max_pages]
  //   sequences:  int32 [num_tokens], page-table row of each token
  //   positions:  int32 [num_tokens], position of each token in its sequence
  m.def(
      "append_kv(Tensor key, Tensor value, Tensor(a!) pool, Tensor page_table, "
      "Tensor sequences, Tensor positions, int layer) -> ()");
  // Reads whole logical pages of one sequence out of `layer` into contiguous K and V.
  //   pages: int32 [num_pages] logical page indices (any subset, any order)
  //   returns key, value: [num_pages * page_size, num_kv_heads, head_dim]
  m.def(
      "gather_kv(Tensor pool, Tensor page_table, int sequence, Tensor pages, int layer) "
      "-> (Tensor, Tensor)");
  // Merges S partial attention states over disjoint key sets into the exact state over their
  // union, by log-sum-exp.
  //   outputs: [S, N, H, D] float16, bfloat16 or float32 (N queries, H heads)
  //   lses:    float32 [S, N, H], natural-log log-sum-exp of each partial (-inf: no keys)
  //   returns output [N, H, D] (outputs' dtype) and lse float32 [N, H]
  m.def("merge_states(Tensor outputs, Tensor lses) -> (Tensor, Tensor)");
  // Attention of a batch of query chunks (decode: one query each; prefill/extend: several)
  // over each sequence's K/V read through the page table. See paged_kv/ops.py for the contract.
  //   query:        [total_queries, num_q_heads, head_dim], the pool's dtype
  //   sequences:    int32 [B] page-table rows; query_starts int32 [B + 1]; kv_lens int32 [B]
  //   host_pool:    pinned [num_slots, ...pool dims...], read zero-copy for tier-1 pages
  //   fault_queue:  int32 [capacity, 2] (row, page) of pages not read; fault_count int32 [1]
  //   telemetry:    float32 [max_sequences, max_pages], += softmax mass per page
  //   returns output [total_queries, num_q_heads, head_dim] and lse float32 [total_queries,
  //   num_q_heads]
  m.def(
      "attention(Tensor query, Tensor pool, Tensor page_table, Tensor sequences, "
      "Tensor query_starts, Tensor kv_lens, int layer, int max_query_len, float? scale=None, "
      "int window=0, int sinks=0, Tensor? host_pool=None, Tensor(a!)? fault_queue=None, "
      "Tensor(b!)? fault_count=None, Tensor(c!)? telemetry=None) -> (Tensor, Tensor)");
}
