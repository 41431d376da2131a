// Decode tile math with the keys on the M side of mma.sync m16n8k16: S^T = K Q^T and
// O^T += V^T P^T, for blocks of at most 8 query rows (one query token per sequence and a GQA
// group of at most 8). The rows then fill the n8 side, so a 16-key tile takes D / 16 MMAs per
// product where rows on the m16 side take D / 8 (and leave at least half of each MMA empty),
// and the output takes D / 4 floats per thread instead of D / 2. Decode tiles are short of
// instruction issue where few multiprocessors are still busy at the end of the loop (see
// bench/README.md), so every instruction saved there counts.
//
// Fragments, with g = lane / 4 and t = lane % 4: S^T's accumulator holds keys g and g + 8 of a
// 16-key MMA tile for query rows 2t and 2t + 1; O^T's holds columns 16 dd + g and 16 dd + g + 8
// for the same rows. Q^T's B fragment is row g's query. P^T's B fragment is S^T's accumulator
// (as 16-bit pairs) transposed 8x8 by movmatrix, once per 8 keys.
#pragma once

#include "cuda/attention_device.cuh"

namespace paged_kv::cuda::detail {

// Transposes the 8x8 16-bit matrix whose row g, columns 2t and 2t + 1 this lane holds.
__device__ inline uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Online-softmax state of one warp whose rows are the MMA's columns.
template <typename Cfg>
struct ColumnState {
  float o[Cfg::D / 16][4];  // O^T: element e is column 16 dd + g + 8 (e / 2) of row 2t + e % 2
  float m[2];               // softmax reference of rows 2t, 2t + 1 (raw; log2 domain at the end)
  float l[2];               // their sums: this lane's part during the loop, the whole at the end
};

// Shared-memory offsets of this lane's ldmatrix fragments, as in FragmentOffsets: K read as the
// A operand (16 keys by 16 columns), V transposed as the A operand (16 columns by 16 keys).
template <typename Cfg>
__device__ inline void keys_as_m_offsets(uint32_t (&k)[4], uint32_t (&v)[4]) {
  const int lane = threadIdx.x & 31;
  const int k_row = lane & 15, k_bit = lane >> 4;
  const int v_row = (lane & 7) + ((lane >> 4) << 3), v_bit = (lane >> 3) & 1;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    k[j] = Cfg::tile_offset(k_row, 2 * j + k_bit);
    v[j] = Cfg::tile_offset(v_row, 2 * j + v_bit);
  }
}

template <typename Cfg>
__device__ inline void init_state(ColumnState<Cfg>& st) {
#pragma unroll
  for (int dd = 0; dd < Cfg::D / 16; ++dd)
#pragma unroll
    for (int e = 0; e < 4; ++e) st.o[dd][e] = 0.f;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.f;
}

// How far (log2 of the scaled scores) a row's running max may rise above its reference before
// the reference moves up to it.
constexpr float kLazyRescaleLog2 = 8.f;

// Max and sum over the 8 lanes that share t (the keys g of one column pair).
__device__ inline float column_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
}
__device__ inline float column_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  return v + __shfl_xor_sync(0xffffffffu, v, 16);
}

// One key tile (KT keys from t0): scores, masks, online softmax, telemetry and P V, as
// attend_tile and softmax_tile do for rows on the m16 side. `qb[kk]` is row g's query
// fragment for columns 16 kk ..; `pos[e]` and `newest[e]` describe row 2t + e (pos -1: no query).
template <typename T, typename Cfg>
__device__ void attend_tile_keys_as_m(const Params& p, const BlockScope& s, int k,
                                      const uint32_t (&qb)[Cfg::D / 16][2], const T* sk,
                                      const T* sv, uint32_t read_mask, const int (&pos)[2],
                                      const bool (&newest)[2], const uint32_t (&k_ofs)[4],
                                      const uint32_t (&v_ofs)[4], ColumnState<Cfg>& st) {
  constexpr int KT = Cfg::KT, D = Cfg::D, KM = KT / 16, DS = D / 16;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int t0 = tile_start<KT>(s, k);
  const float scale_log2 = p.pr.scale * kLog2e;

  // S^T = K Q^T; each key tile's D / 16 steps in two accumulation chains (even and odd steps).
  float sc[KM][4];
  const uint32_t k_smem = smem_u32(sk);
#pragma unroll
  for (int km = 0; km < KM; ++km) {
    float even[4] = {0.f, 0.f, 0.f, 0.f}, odd[4] = {0.f, 0.f, 0.f, 0.f};
    uint32_t ka[2][4];
    const uint32_t base = k_smem + km * 16 * Cfg::kRowBytes;
    ldmatrix_x4(ka[0], base + k_ofs[0]);
#pragma unroll
    for (int kk = 0; kk < DS; ++kk) {
      if (kk + 1 < DS) {
        ldmatrix_x4(ka[(kk + 1) & 1], base + k_ofs[(kk + 1) & 3] + ((kk + 1) >> 2) * 128);
      }
      if (kk & 1) {
        mma_16816<T>(odd, ka[kk & 1], qb[kk][0], qb[kk][1]);
      } else {
        mma_16816<T>(even, ka[kk & 1], qb[kk][0], qb[kk][1]);
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) sc[km][e] = even[e] + odd[e];
  }

  // Masks, only for tiles some key of which some row must not see (as in softmax_tile).
  const int pages = KT >> p.page_shift > 0 ? KT >> p.page_shift : 1;
  const int window = static_cast<int>(p.pr.window), sinks = static_cast<int>(p.pr.sinks);
  const bool full = t0 + KT <= s.kv_len && read_mask == (1u << pages) - 1u &&
                    t0 + KT - 1 <= s.first_pos &&
                    (window == 0 || t0 > s.last_pos - window || t0 + KT <= sinks);
  if (!full) {
    const bool multi_page = KT > (1 << p.page_shift);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int x = pos[e];
      const int hi = min(x, s.kv_len - 1) - t0;  // x < 0 (no query): hi < 0, nothing seen
      const int lo = window == 0 ? INT_MIN : x - window + 1 - t0;
      const int sink_end = sinks - t0;
#pragma unroll
      for (int km = 0; km < KM; ++km) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int key = km * 16 + g + 8 * h;  // key - t0
          const uint32_t page_bit =
              multi_page ? (read_mask >> (key >> p.page_shift)) & 1u : read_mask & 1u;
          const bool visible = (key <= hi) & ((key >= lo) | (key < sink_end)) & (page_bit != 0);
          sc[km][2 * h + e] = visible ? sc[km][2 * h + e] : -INFINITY;
        }
      }
    }
  }

  // Running reference and sum per row (column of S^T); p = 2^(s c - m c) as in softmax_tile,
  // with m a reference at most kLazyRescaleLog2 below the row's running max. It moves only when
  // some lane of the warp sees a score above it by more than that, so most tiles skip the column
  // reductions, the factors and the rescale, which sat on each tile's dependency chain. p stays
  // at most 2^kLazyRescaleLog2, which 16-bit P and float sums carry with the same relative
  // precision.
  float lane_max[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    lane_max[e] = -INFINITY;
#pragma unroll
    for (int km = 0; km < KM; ++km) {
      lane_max[e] = fmaxf(lane_max[e], fmaxf(sc[km][e], sc[km][2 + e]));
    }
  }
  // -inf against -inf gives NaN, which compares false: nothing seen yet, nothing to move.
  const bool moves =
      __any_sync(0xffffffffu, (lane_max[0] - st.m[0]) * scale_log2 > kLazyRescaleLog2 ||
                                  (lane_max[1] - st.m[1]) * scale_log2 > kLazyRescaleLog2);
  float refs[2], alphas[2] = {1.f, 1.f};
  if (moves) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float m_new = fmaxf(st.m[e], column_max(lane_max[e]));
      // Exactly 1 when the reference holds, so the rescale below is skipped.
      alphas[e] = m_new == -INFINITY ? 1.f : fast_exp2((st.m[e] - m_new) * scale_log2);
      st.m[e] = m_new;
    }
  }
#pragma unroll
  for (int e = 0; e < 2; ++e) refs[e] = st.m[e] == -INFINITY ? 0.f : st.m[e] * scale_log2;
  float part_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int km = 0; km < KM; ++km) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float pv = fast_exp2(fmaf(sc[km][i], scale_log2, -refs[i & 1]));
      sc[km][i] = pv;
      part_sum[i & 1] += pv;
    }
  }
#pragma unroll
  for (int e = 0; e < 2; ++e) st.l[e] = st.l[e] * alphas[e] + part_sum[e];

  // Telemetry: log-sum-exp of each chunk's scores for the newest query's rows.
  if (p.pr.telemetry) {
    const int ct = static_cast<int>(p.chunk_tokens);  // 16 or 32 here: a chunk holds whole MMA tiles
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      for (int c = 0; c < KT / ct; ++c) {
        float csum = 0.f;
#pragma unroll
        for (int km = 0; km < KM; ++km) {
          if (km * 16 >= c * ct && km * 16 < (c + 1) * ct) csum += sc[km][e] + sc[km][2 + e];
        }
        csum = column_sum(csum);
        if (g == 0 && newest[e] && t0 / ct + c < p.max_chunks) {
          const int head = query_head<Cfg>(p, s, 2 * t + e);
          float* dst = p.chunk_lse +
                       (static_cast<int64_t>(s.b) * p.pr.num_q_heads + head) * p.max_chunks +
                       t0 / ct + c;
          *dst = csum > 0.f ? (log2f(csum) + refs[e]) * kLn2 : -INFINITY;
        }
      }
    }
  }

  if (moves && __any_sync(0xffffffffu, alphas[0] != 1.f || alphas[1] != 1.f)) {
#pragma unroll
    for (int dd = 0; dd < DS; ++dd)
#pragma unroll
      for (int e = 0; e < 4; ++e) st.o[dd][e] *= alphas[e & 1];
  }

  // O^T += V^T P^T: P^T's B fragment per 8 keys by one transpose.
  const uint32_t v_smem = smem_u32(sv);
#pragma unroll
  for (int km = 0; km < KM; ++km) {
    const uint32_t b0 = movmatrix_trans(pack2<T>(sc[km][0], sc[km][1]));
    const uint32_t b1 = movmatrix_trans(pack2<T>(sc[km][2], sc[km][3]));
    const uint32_t base = v_smem + km * 16 * Cfg::kRowBytes;
    uint32_t va[2][4];
    ldmatrix_x4_trans(va[0], base + v_ofs[0]);
#pragma unroll
    for (int dd = 0; dd < DS; ++dd) {
      if (dd + 1 < DS) {
        ldmatrix_x4_trans(va[(dd + 1) & 1], base + v_ofs[(dd + 1) & 3] + ((dd + 1) >> 2) * 128);
      }
      mma_16816<T>(st.o[dd], va[dd & 1], b0, b1);
    }
  }
}

// After the last tile: whole row sums, and the max in the log2 domain of the scaled scores.
template <typename Cfg>
__device__ inline void finish_state(const Params& p, ColumnState<Cfg>& st) {
  const float scale_log2 = p.pr.scale * kLog2e;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    st.l[e] = column_sum(st.l[e]);
    st.m[e] = st.m[e] == -INFINITY ? -INFINITY : st.m[e] * scale_log2;
  }
}

// Writes this warp's rows that hold queries into the block's merge space: `merge_o` [rows][D],
// `merge_m` and `merge_l` [rows] (this warp's slices).
template <typename Cfg>
__device__ inline void write_merge_rows(const BlockScope& s, const ColumnState<Cfg>& st,
                                        float* merge_o, float* merge_m, float* merge_l) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int row = 2 * t + e;
    if (s.row_base + row >= s.total_rows) continue;  // no query: never read
    float* o_row = merge_o + row * Cfg::D;
#pragma unroll
    for (int dd = 0; dd < Cfg::D / 16; ++dd) {
      o_row[dd * 16 + g] = st.o[dd][e];
      o_row[dd * 16 + g + 8] = st.o[dd][2 + e];
    }
    if (g == 0) {
      merge_m[row] = st.m[e];
      merge_l[row] = st.l[e];
    }
  }
}

}  // namespace paged_kv::cuda::detail
