// Paged attention on tensor cores, with the residency check and fault queue inside the kernel.
// See attention.h for the shape of the work; the notes here explain the less obvious parts.
//
// Rows. A block owns R query rows of one (sequence, KV head): row r is query token
// (row_base + r) / group and query head kv_head * group + (row_base + r) % group, so all query
// heads of a group share every K/V tile.
//
// Keys. The keys a block visits are the tiles (KT tokens, aligned) of at most two segments: the
// sink tokens and the window [lo, hi) of its rows, intersected with its split. Tiles never
// overlap, so every key, fault and telemetry chunk is seen once. Per-element masks apply the
// exact causal, window and sink rules.
//
// Pages. A tile's pages are resolved once per tile (one lane per page): tier 0 reads the GPU
// pool, tier 1 the pinned host pool when given (zero-copy, through UVA), anything else is a
// fault: skipped, and appended to the fault queue by exactly one block (KV head 0, the first
// query tile that needs the page, the tile holding the first visited token of the page).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/attention.h"
#include "cuda/device_error.cuh"

namespace paged_kv::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Tensor-core and async-copy primitives.

template <typename T>
__device__ inline uint32_t pack2(float a, float b);
template <>
__device__ inline uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ inline uint32_t pack2<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// c += a * b for one m16n8k16 tile, float32 accumulation.
template <typename T>
__device__ inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ inline void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ inline void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte asynchronous copy to shared memory; with `valid` false it writes zeros and reads
// nothing (the source address is not dereferenced).
__device__ inline void cp_async_16(uint32_t smem_addr, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(src),
               "r"(src_bytes));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Programmatic dependent launch (Hopper): a kernel launched with it may start while the kernel
// before it in the stream finishes; it waits here before touching memory that kernel wrote.
__device__ inline void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ inline void allow_dependent_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][D] tile. XOR-swizzling the chunk
// by the row keeps ldmatrix (8 rows, same column) free of bank conflicts.
template <int D>
__device__ inline uint32_t swizzle(int row, int chunk) {
  return static_cast<uint32_t>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
}

// 2^x with the hardware approximation (2 ulp); exp2f(-inf) = 0 as needed for masked keys.
__device__ inline float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ inline float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ inline float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---------------------------------------------------------------------------------------------
// Kernel configuration.

struct Params {
  AttentionProblem pr;
  int page_shift;  // log2(page_size): pages are powers of two, so no divisions in the loop
  int64_t query_tiles;
  int64_t num_splits;
  int64_t chunk_tokens;
  int64_t max_chunks;
  void* out;
  float* lse;
  float* partial_out;
  float* partial_lse;
  float* chunk_lse;
  OpError* error;
};

// D: head_dim. WM x WN warps: WM split the rows, WN split the key tiles (each with its own
// pipeline). MW: 16-row MMA tiles per warp. KT: tokens per key tile. STAGES: pipeline depth.
template <int D_, int WM_, int WN_, int MW_, int KT_, int STAGES_>
struct Config {
  static constexpr int D = D_, WM = WM_, WN = WN_, MW = MW_, KT = KT_, STAGES = STAGES_;
  static constexpr int kRows = WM * MW * 16;
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  // Threads that load one key tile: a warp when warps own tiles, else the block.
  static constexpr int kLoaders = WN > 1 ? 32 : kThreads;
  static constexpr bool kQueryInRegisters = WN > 1;
  static constexpr int kQueryBytes = kQueryInRegisters ? 0 : kRows * D * 2;
  static constexpr int kTileBytes = KT * D * 2;
  static constexpr int kStageBytes = 2 * WN * kTileBytes;  // K and V of WN tiles
  static constexpr int kPipelineBytes = STAGES * kStageBytes;
  static constexpr int kMergeBytes = WN > 1 ? WN * kRows * (D + 2) * 4 : 0;
  static constexpr int kMainBytes = kPipelineBytes > kMergeBytes ? kPipelineBytes : kMergeBytes;
  static constexpr int kPageMaskOffset = kQueryBytes + kMainBytes;
  static constexpr int kSmemBytes = kPageMaskOffset + STAGES * WN * 4;
  static_assert((2 * KT * kChunks) % kLoaders == 0, "loads must split evenly over loaders");
  static_assert(KT % 16 == 0 && D % 16 == 0 && D >= 64, "tile shapes");
};

template <int D>
using DecodeConfig = Config<D, 1, 4, 1, (D == 64 ? 32 : 16), (D == 256 ? 2 : 3)>;
template <int D>
using PrefillConfig = Config<D, 4, 1, (D == 256 ? 1 : 2), (D == 256 ? 32 : 64), 2>;

// Everything a block knows about its sequence, rows and keys.
struct BlockScope {
  int b, kv_head, query_tile, split;
  int64_t row;  // page-table row
  int q_start, q_len, kv_len, total_rows, row_base;
  int first_pos, last_pos;  // positions of the block's first and last query rows
  int lo;                   // first key of the window of the first row (0 without a window)
  // Visited key tiles: n1 from seg1 = [s1_lo, ...), then n2 from seg2 = [s2_lo, ...).
  int s1_lo, n1, s2_lo, n2;
  int seg1_hi;  // end of the whole sink segment (before the split), 0 when there is none
};

__device__ inline int ceil_to(int x, int a) { return (x + a - 1) / a * a; }
__device__ inline int floor_to(int x, int a) { return x / a * a; }

template <int KT>
__device__ inline int tile_start(const BlockScope& s, int k) {
  return k < s.n1 ? s.s1_lo + k * KT : s.s2_lo + (k - s.n1) * KT;
}

// Whether any row of the block sees a key of page `page` (tokens [p0, p0 + P)).
__device__ inline bool page_needed(const Params& p, const BlockScope& s, int page) {
  const int P = static_cast<int>(p.pr.geometry.page_size);
  const int p0 = page * P;
  if (p0 >= s.kv_len || p0 > s.last_pos) return false;
  if (p.pr.window == 0) return true;
  return p0 + P - 1 >= s.lo || p0 < p.pr.sinks;
}

// Resolves one page of the block's sequence to its K rows (its V rows follow H * P * D elements
// later), or null when the page is not read in this call. Records faults and bad PTEs. `k` is
// the visited tile in which the caller met the page.
template <typename T, typename Cfg>
__device__ const T* resolve_page(const Params& p, const BlockScope& s, int page, int k,
                                 bool may_record, int32_t pte) {
  const AttentionProblem& pr = p.pr;
  if (!page_needed(p, s, page)) return nullptr;
  const Tier tier = pte_tier(pte);
  const int64_t index = pte_index(pte);
  const PageGeometry& g = pr.geometry;
  if (tier == Tier::kGpu) {
    if (index < g.num_frames) {
      return static_cast<const T*>(pr.pool) + g.row_offset(index, pr.layer, 0, s.kv_head, 0);
    }
    record_op_error(p.error, OpErrorCode::kFrameOutOfRange, OpId::kAttention, s.b, s.row, page,
                    pte, g, pr.table);
    return nullptr;
  }
  if (tier == Tier::kHost && pr.has_host_pool) {
    if (index < pr.host_slots) {
      return static_cast<const T*>(pr.host_pool) + g.row_offset(index, pr.layer, 0, s.kv_head, 0);
    }
    PageGeometry host = g;
    host.num_frames = pr.host_slots;
    record_op_error(p.error, OpErrorCode::kSlotOutOfRange, OpId::kAttention, s.b, s.row, page,
                    pte, host, pr.table);
    return nullptr;
  }
  if (pr.fault_queue == nullptr) {
    record_op_error(p.error, OpErrorCode::kPageNotReadable, OpId::kAttention, s.b, s.row, page,
                    pte, g, pr.table);
    return nullptr;
  }
  // A fault, recorded by exactly one block and tile: KV head 0; the first query tile that needs
  // the page (tiles needing it are contiguous, the first being the one holding the first query
  // whose position reaches the page); the visited tile holding the page's first visited token;
  // and, for a page shared by the sink and window segments, the sink segment.
  if (!may_record || s.kv_head != 0) return nullptr;
  const int P = static_cast<int>(g.page_size);
  const int p0 = page * P;
  const int history = s.kv_len - s.q_len;  // position of query token 0
  const int first_token = p0 > history ? p0 - history : 0;
  const int64_t first_tile = static_cast<int64_t>(first_token) * pr.group / Cfg::kRows;
  if (first_tile != s.query_tile) return nullptr;
  const bool in_seg1 = k < s.n1;
  if (!in_seg1 && p0 < s.seg1_hi) return nullptr;
  const int seg_lo = in_seg1 ? s.s1_lo : s.s2_lo;
  const int first_visited = p0 > seg_lo ? p0 : seg_lo;
  const int t0 = tile_start<Cfg::KT>(s, k);
  if (first_visited < t0 || first_visited >= t0 + Cfg::KT) return nullptr;
  const int slot = atomicAdd(pr.fault_count, 1);
  if (slot >= 0 && slot < pr.fault_capacity) {
    pr.fault_queue[2 * static_cast<int64_t>(slot)] = static_cast<int32_t>(s.row);
    pr.fault_queue[2 * static_cast<int64_t>(slot) + 1] = page;
  }
  return nullptr;
}

// Reads, ahead of its use, the PTE of this lane's page of visited tile `k` (lane j holds page j
// of the tile), so the page-table latency hides behind the previous tile's math.
template <typename Cfg>
__device__ inline int32_t read_tile_pte(const Params& p, const BlockScope& s, int k) {
  const int lane = threadIdx.x & 31;
  const int P = static_cast<int>(p.pr.geometry.page_size);
  const int pages = Cfg::KT > P ? Cfg::KT / P : 1;
  const int page = (tile_start<Cfg::KT>(s, k) >> p.page_shift) + lane;
  if (lane >= pages || !page_needed(p, s, page)) return kPteUnmapped;
  return p.pr.table.ptes[s.row * p.pr.table.row_stride + page];
}

// Issues the cp.async copies of K and V of visited tile `k` into `sk`/`sv` ([KT][D] swizzled),
// by `Cfg::kLoaders` threads (`loader` is this thread's index among them; lanes of one warp
// always load together). Rows of unread pages and rows past the sequence are zero-filled.
// `pte` is read_tile_pte's value for this tile. Returns the bitmask of the tile's pages that
// were read (bit j: page j of the tile).
template <typename T, typename Cfg>
__device__ uint32_t load_tile(const Params& p, const BlockScope& s, int k, T* sk, T* sv,
                              int loader, bool may_record, int32_t pte) {
  constexpr int KT = Cfg::KT, D = Cfg::D, C = Cfg::kChunks, L = Cfg::kLoaders;
  static_assert(L % C == 0 && (KT * C) % L == 0, "each loader keeps one chunk column");
  constexpr int kPerPart = KT * C / L;  // copies per loader for K (and again for V)
  constexpr int kRowStep = L / C;
  const int lane = threadIdx.x & 31;
  const int P = static_cast<int>(p.pr.geometry.page_size);
  const int t0 = tile_start<KT>(s, k);
  const int first_page = t0 >> p.page_shift;
  const int pages = KT > P ? KT / P : 1;
  const T* base = nullptr;
  if (lane < pages) base = resolve_page<T, Cfg>(p, s, first_page + lane, k, may_record, pte);
  const uint32_t read_mask = __ballot_sync(0xffffffffu, base != nullptr) & ((1u << pages) - 1u);
  const int64_t v_offset = p.pr.geometry.num_kv_heads * P * D;
  const uint32_t k_smem = smem_u32(sk), v_smem = smem_u32(sv);
  const int c = loader % C;
  const int r0 = loader / C;
  const int rows_left = s.kv_len - t0;  // rows at or past this are beyond the sequence
  if (KT <= P) {
    // The tile lies in one page: one base for every row, fixed offsets per loader.
    const uint64_t page_base = __shfl_sync(0xffffffffu, reinterpret_cast<uint64_t>(base), 0);
    const T* tile_k = reinterpret_cast<const T*>(page_base) + static_cast<int64_t>(t0 & (P - 1)) * D + c * 8;
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      const T* src_base = tile_k + (part ? v_offset : 0);
      const uint32_t dst_base = part ? v_smem : k_smem;
#pragma unroll
      for (int i = 0; i < kPerPart; ++i) {
        const int r = r0 + i * kRowStep;
        const bool valid = page_base != 0 && r < rows_left;
        cp_async_16(dst_base + swizzle<D>(r, c), valid ? src_base + r * D : p.pr.pool, valid);
      }
    }
  } else {
    // Several pages per tile: each row takes its page's base from the lane that resolved it.
#pragma unroll
    for (int part = 0; part < 2; ++part) {
      const uint32_t dst_base = part ? v_smem : k_smem;
#pragma unroll
      for (int i = 0; i < kPerPart; ++i) {
        const int r = r0 + i * kRowStep;
        const uint64_t page_base =
            __shfl_sync(0xffffffffu, reinterpret_cast<uint64_t>(base), r >> p.page_shift);
        const bool valid = page_base != 0 && r < rows_left;
        const T* src = reinterpret_cast<const T*>(page_base) + (part ? v_offset : 0) +
                       static_cast<int64_t>(r & (P - 1)) * D + c * 8;
        cp_async_16(dst_base + swizzle<D>(r, c), valid ? src : p.pr.pool, valid);
      }
    }
  }
  return read_mask;
}

// Online-softmax state of one warp: MW 16-row tiles, each thread holding rows g and g + 8.
template <typename Cfg>
struct WarpState {
  float o[Cfg::MW][Cfg::D / 8][4];
  float m[Cfg::MW][2];  // running max of the raw scores q.k (log2 domain after the loop)
  float l[Cfg::MW][2];  // this thread's part of the running sum
};

// One key tile: S = Q K^T, mask, online softmax, O += P V. `q_regs` holds the query fragments
// when Cfg::kQueryInRegisters, else `sq` the query tile. `pos[mi][h]` is the position of row
// g (h = 0) or g + 8 (h = 1) of MMA tile mi, -1 for rows past the block's queries.
template <typename T, typename Cfg>
__device__ void attend_tile(const Params& p, const BlockScope& s, int k, const T* sq,
                            const uint32_t (&q_regs)[Cfg::kQueryInRegisters ? Cfg::D / 16 : 1][4],
                            const T* sk, const T* sv, uint32_t read_mask, const int (&pos)[Cfg::MW][2],
                            const bool (&newest)[Cfg::MW][2], int warp_m, WarpState<Cfg>& st) {
  constexpr int KT = Cfg::KT, D = Cfg::D, MW = Cfg::MW, NT = KT / 8;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const float scale_log2 = p.pr.scale * kLog2e;
  const int P = static_cast<int>(p.pr.geometry.page_size);
  const int t0 = tile_start<KT>(s, k);
  const int pages = KT > P ? KT / P : 1;
  const int window = static_cast<int>(p.pr.window), sinks = static_cast<int>(p.pr.sinks);

  // Whether every key of the tile is visible to every row (then no mask is needed).
  const bool full = t0 + KT <= s.kv_len && read_mask == (1u << pages) - 1u &&
                    t0 + KT - 1 <= s.first_pos &&
                    (window == 0 || t0 > s.last_pos - window || t0 + KT <= sinks);

  float sc[MW][NT][4];
#pragma unroll
  for (int mi = 0; mi < MW; ++mi)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[mi][j][e] = 0.f;

  // S = Q K^T over (kk, nn) steps. ldmatrix stays in program order (volatile asm), so each
  // step's fragments are loaded one step ahead: their latency hides behind the MMAs.
  const uint32_t k_smem = smem_u32(sk), q_smem = smem_u32(sq);
  constexpr int kNN = KT / 16, kSteps = (D / 16) * kNN;
  uint32_t qa[2][MW][4], kb[2][4];
  auto load_q = [&](int kk, int buf) {
#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
      if constexpr (Cfg::kQueryInRegisters) {
#pragma unroll
        for (int e = 0; e < 4; ++e) qa[buf][mi][e] = q_regs[kk][e];
      } else {
        const int row = (warp_m * MW + mi) * 16 + (lane & 15);
        ldmatrix_x4(qa[buf][mi], q_smem + swizzle<D>(row, kk * 2 + (lane >> 4)));
      }
    }
  };
  auto load_k = [&](int step) {
    const int kk = step / kNN, nn = step % kNN;
    const int row = nn * 16 + ((lane >> 4) << 3) + (lane & 7);
    ldmatrix_x4(kb[step & 1], k_smem + swizzle<D>(row, kk * 2 + ((lane >> 3) & 1)));
  };
  load_q(0, 0);
  load_k(0);
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int kk = step / kNN, nn = step % kNN;
    if (step + 1 < kSteps) {
      load_k(step + 1);
      if ((step + 1) % kNN == 0) load_q(kk + 1, (kk + 1) & 1);
    }
#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
      mma_16816<T>(sc[mi][2 * nn], qa[kk & 1][mi], kb[step & 1][0], kb[step & 1][1]);
      mma_16816<T>(sc[mi][2 * nn + 1], qa[kk & 1][mi], kb[step & 1][2], kb[step & 1][3]);
    }
  }

  // Mask, and update the running max and sum. The max is taken over raw scores (the scale is
  // positive), and p = 2^(s c - m c) with c = scale * log2(e) is one FFMA and one MUFU.
  float alphas[MW][2];
#pragma unroll
  for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int x = pos[mi][h];
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = sc[mi][j][2 * h + e];
          if (!full) {
            const int key = t0 + j * 8 + 2 * t + e;
            const int jp = KT > P ? (key - t0) >> p.page_shift : 0;
            const bool visible = x >= 0 && key <= x && key < s.kv_len &&
                                 ((read_mask >> jp) & 1u) &&
                                 (window == 0 || key > x - window || key < sinks);
            if (!visible) v = -INFINITY;
          }
          sc[mi][j][2 * h + e] = v;
          tile_max = fmaxf(tile_max, v);
        }
      }
      tile_max = quad_max(tile_max);
      const float m_new = fmaxf(st.m[mi][h], tile_max);
      // All masked so far: subtract 0, keeping every p at 0 and alpha at 1.
      const float ref = m_new == -INFINITY ? 0.f : m_new * scale_log2;
      const float alpha = fast_exp2(st.m[mi][h] * scale_log2 - ref);
      st.m[mi][h] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = fast_exp2(fmaf(sc[mi][j][2 * h + e], scale_log2, -ref));
          sc[mi][j][2 * h + e] = pv;
          sum += pv;
        }
      }
      st.l[mi][h] = st.l[mi][h] * alpha + sum;
      alphas[mi][h] = alpha;
      // Telemetry: log-sum-exp of each chunk's scores for the newest query's rows.
      if (p.pr.telemetry) {
        const int ct = static_cast<int>(p.chunk_tokens);
        for (int c = 0; c < KT / ct; ++c) {
          float csum = 0.f;
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            if (j * 8 >= c * ct && j * 8 < (c + 1) * ct) {
              csum += sc[mi][j][2 * h] + sc[mi][j][2 * h + 1];
            }
          }
          csum = quad_sum(csum);
          if (t == 0 && newest[mi][h] && t0 / ct + c < p.max_chunks) {
            const int row = (warp_m * MW + mi) * 16 + g + 8 * h;
            const int head = s.kv_head * static_cast<int>(p.pr.group) +
                             (s.row_base + row) % static_cast<int>(p.pr.group);
            float* dst = p.chunk_lse +
                         (static_cast<int64_t>(s.b) * p.pr.num_q_heads + head) * p.max_chunks +
                         t0 / ct + c;
            *dst = csum > 0.f ? (log2f(csum) + ref) * kLn2 : -INFINITY;
          }
        }
      }
    }
  }

  // Rescale the outputs, unless no running max of the warp moved (the common case once the
  // large scores are found).
  bool moved = false;
#pragma unroll
  for (int mi = 0; mi < MW; ++mi) moved |= alphas[mi][0] != 1.f || alphas[mi][1] != 1.f;
  if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
    for (int mi = 0; mi < MW; ++mi)
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj)
#pragma unroll
        for (int e = 0; e < 4; ++e) st.o[mi][dj][e] *= alphas[mi][e >> 1];
  }

  // O += P V, P taken from the score registers (the C layout of two n8 tiles is the A layout).
  const uint32_t v_smem = smem_u32(sv);
  uint32_t pa[MW][4];
  uint32_t vb[2][4];
  auto load_v = [&](int kk, int dd, int buf) {
    const int row = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
    ldmatrix_x4_trans(vb[buf], v_smem + swizzle<D>(row, dd * 2 + (lane >> 4)));
  };
  load_v(0, 0, 0);
#pragma unroll
  for (int kk = 0; kk < KT / 16; ++kk) {
#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
      pa[mi][0] = pack2<T>(sc[mi][2 * kk][0], sc[mi][2 * kk][1]);
      pa[mi][1] = pack2<T>(sc[mi][2 * kk][2], sc[mi][2 * kk][3]);
      pa[mi][2] = pack2<T>(sc[mi][2 * kk + 1][0], sc[mi][2 * kk + 1][1]);
      pa[mi][3] = pack2<T>(sc[mi][2 * kk + 1][2], sc[mi][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      const int step = kk * (D / 16) + dd;
      if (dd + 1 < D / 16) {
        load_v(kk, dd + 1, (step + 1) & 1);
      } else if (kk + 1 < KT / 16) {
        load_v(kk + 1, 0, (step + 1) & 1);
      }
#pragma unroll
      for (int mi = 0; mi < MW; ++mi) {
        mma_16816<T>(st.o[mi][2 * dd], pa[mi], vb[step & 1][0], vb[step & 1][1]);
        mma_16816<T>(st.o[mi][2 * dd + 1], pa[mi], vb[step & 1][2], vb[step & 1][3]);
      }
    }
  }
}

// Writes one finished row: the final output (one split) or the split's partial state.
template <typename T, typename Cfg>
__device__ inline void store_pair(const Params& p, const BlockScope& s, int row, int d, float o0,
                                  float o1) {
  const int group = static_cast<int>(p.pr.group);
  const int64_t query = s.q_start + (s.row_base + row) / group;
  const int64_t head = static_cast<int64_t>(s.kv_head) * group + (s.row_base + row) % group;
  const int64_t at = (query * p.pr.num_q_heads + head) * Cfg::D + d;
  if (p.num_splits == 1) {
    *reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + at) = pack2<T>(o0, o1);
  } else {
    const int64_t split_stride = p.pr.total_queries * p.pr.num_q_heads * Cfg::D;
    *reinterpret_cast<float2*>(p.partial_out + s.split * split_stride + at) = make_float2(o0, o1);
  }
}

template <typename Cfg>
__device__ inline void store_lse(const Params& p, const BlockScope& s, int row, float lse) {
  const int group = static_cast<int>(p.pr.group);
  const int64_t query = s.q_start + (s.row_base + row) / group;
  const int64_t head = static_cast<int64_t>(s.kv_head) * group + (s.row_base + row) % group;
  const int64_t at = query * p.pr.num_q_heads + head;
  if (p.num_splits == 1) {
    p.lse[at] = lse;
  } else {
    p.partial_lse[s.split * p.pr.total_queries * p.pr.num_q_heads + at] = lse;
  }
}

// Checks the batch entry's values and fills the block's scope; false when the block has no work
// (or the entry is bad, which is recorded).
template <typename Cfg>
__device__ bool make_scope(const Params& p, BlockScope& s) {
  const AttentionProblem& pr = p.pr;
  int64_t bx = blockIdx.x;
  s.b = static_cast<int>(bx % pr.batch);
  bx /= pr.batch;
  s.kv_head = static_cast<int>(bx % pr.geometry.num_kv_heads);
  // Heaviest (latest) query tiles first: under causal masking they have the most keys.
  s.query_tile = static_cast<int>(p.query_tiles - 1 - bx / pr.geometry.num_kv_heads);
  s.split = blockIdx.y;
  s.row = pr.sequences[s.b];
  const int q0 = pr.query_starts[s.b], q1 = pr.query_starts[s.b + 1];
  s.kv_len = pr.kv_lens[s.b];
  s.q_start = q0;
  s.q_len = q1 - q0;
  const PageGeometry& g = pr.geometry;
  const bool reporter = threadIdx.x == 0 && s.kv_head == 0 && s.query_tile == 0 && s.split == 0;
  if (s.row < 0 || s.row >= pr.table.max_sequences) {
    if (reporter) {
      record_op_error(p.error, OpErrorCode::kSequenceOutOfRange, OpId::kAttention, s.b, s.row, 0,
                      -1, g, pr.table);
    }
    return false;
  }
  if (s.kv_len < 0 || s.kv_len > pr.table.max_pages * g.page_size) {
    if (reporter) {
      record_op_error(p.error, OpErrorCode::kKvLengthOutOfRange, OpId::kAttention, s.b, s.row,
                      s.kv_len, -1, g, pr.table);
    }
    return false;
  }
  if (reporter && s.b == 0 && q0 != 0) {
    record_op_error(p.error, OpErrorCode::kQueryStartsInvalid, OpId::kAttention, 0, s.row, q0,
                    static_cast<int32_t>(pr.total_queries), g, pr.table);
  }
  if (reporter && s.b == pr.batch - 1 && q1 != pr.total_queries) {
    record_op_error(p.error, OpErrorCode::kQueryStartsInvalid, OpId::kAttention, pr.batch, s.row,
                    q1, static_cast<int32_t>(pr.total_queries), g, pr.table);
  }
  if (q0 < 0 || q1 < q0 || q1 > pr.total_queries || s.q_len > pr.max_query_len ||
      s.q_len > s.kv_len) {
    if (reporter) {
      record_op_error(p.error, OpErrorCode::kQueryLengthOutOfRange, OpId::kAttention, s.b, s.row,
                      s.q_len, s.kv_len, g, pr.table);
    }
    return false;
  }
  const int group = static_cast<int>(pr.group);
  s.total_rows = s.q_len * group;
  s.row_base = s.query_tile * Cfg::kRows;
  if (s.row_base >= s.total_rows) return false;
  const int history = s.kv_len - s.q_len;
  s.first_pos = history + s.row_base / group;
  s.last_pos = history + (min(s.row_base + Cfg::kRows, s.total_rows) - 1) / group;

  constexpr int KT = Cfg::KT;
  const int window = static_cast<int>(pr.window);
  s.lo = window > 0 ? max(0, s.first_pos - window + 1) : 0;
  const int hi = ceil_to(s.last_pos + 1, KT);
  int seg2_lo = floor_to(s.lo, KT);
  const int sink_end = min(static_cast<int>(pr.sinks), s.lo);
  int seg1_hi = sink_end > 0 ? ceil_to(sink_end, KT) : 0;
  if (seg1_hi >= seg2_lo) {  // the segments touch: visit [0, hi) as one
    seg1_hi = 0;
    seg2_lo = 0;
  }
  s.seg1_hi = seg1_hi;
  // This block's split: aligned to whole pages and tiles, so pages never straddle splits.
  const int align = max(static_cast<int>(g.page_size), KT);
  const int per_split =
      ceil_to((s.kv_len + static_cast<int>(p.num_splits) - 1) / static_cast<int>(p.num_splits),
              align);
  const int sp_lo = s.split * per_split, sp_hi = sp_lo + per_split;
  s.s1_lo = sp_lo;
  s.n1 = max(0, min(seg1_hi, sp_hi) - sp_lo) / KT;
  s.s2_lo = max(seg2_lo, sp_lo);
  s.n2 = max(0, min(hi, sp_hi) - s.s2_lo) / KT;
  return true;
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    paged_attention_kernel(const __grid_constant__ Params p) {
  constexpr int D = Cfg::D, MW = Cfg::MW, KT = Cfg::KT, STAGES = Cfg::STAGES, WN = Cfg::WN;
  constexpr int C = Cfg::kChunks;
  extern __shared__ __align__(128) unsigned char smem[];
  wait_for_prior_grid();
  BlockScope s;
  if (!make_scope<Cfg>(p, s)) return;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_m = warp % Cfg::WM, warp_n = warp / Cfg::WM;
  const int g = lane >> 2, t = lane & 3;
  const int group = static_cast<int>(p.pr.group);
  T* sq = reinterpret_cast<T*>(smem);
  T* pipeline = reinterpret_cast<T*>(smem + Cfg::kQueryBytes);
  uint32_t* page_masks = reinterpret_cast<uint32_t*>(smem + Cfg::kPageMaskOffset);
  auto k_tile = [&](int stage, int slot) {
    return pipeline + (static_cast<int64_t>(stage) * 2 * WN + slot) * KT * D;
  };
  auto v_tile = [&](int stage, int slot) {
    return pipeline + (static_cast<int64_t>(stage) * 2 * WN + WN + slot) * KT * D;
  };

  // Row positions (-1 past the block's queries) and which rows are the newest query's.
  int pos[MW][2];
  bool newest[MW][2];
#pragma unroll
  for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = s.row_base + (warp_m * MW + mi) * 16 + g + 8 * h;
      const bool live = r < s.total_rows;
      pos[mi][h] = live ? s.kv_len - s.q_len + r / group : -1;
      newest[mi][h] = live && r / group == s.q_len - 1;
    }
  }

  // Queries: straight into fragments (decode) or into shared memory (prefill).
  const T* query = static_cast<const T*>(p.pr.query);
  auto query_row = [&](int r) -> const T* {
    const int rr = s.row_base + r;
    if (rr >= s.total_rows) return nullptr;
    return query + static_cast<int64_t>(s.q_start + rr / group) * p.pr.query_token_stride +
           static_cast<int64_t>(s.kv_head * group + rr % group) * p.pr.query_head_stride;
  };
  uint32_t q_regs[Cfg::kQueryInRegisters ? D / 16 : 1][4];
  if constexpr (Cfg::kQueryInRegisters) {
    static_assert(MW == 1, "query fragments in registers assume one MMA tile per warp");
    const T* r0 = query_row(g);
    const T* r1 = query_row(g + 8);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int c0 = kk * 16 + 2 * t, c1 = c0 + 8;
      q_regs[kk][0] = r0 ? *reinterpret_cast<const uint32_t*>(r0 + c0) : 0u;
      q_regs[kk][1] = r1 ? *reinterpret_cast<const uint32_t*>(r1 + c0) : 0u;
      q_regs[kk][2] = r0 ? *reinterpret_cast<const uint32_t*>(r0 + c1) : 0u;
      q_regs[kk][3] = r1 ? *reinterpret_cast<const uint32_t*>(r1 + c1) : 0u;
    }
  } else {
    for (int idx = threadIdx.x; idx < Cfg::kRows * C; idx += Cfg::kThreads) {
      const int r = idx / C, c = idx % C;
      const T* src = query_row(r);
      cp_async_16(smem_u32(sq) + swizzle<D>(r, c), src ? src + c * 8 : query, src != nullptr);
    }
  }

  WarpState<Cfg> st;
#pragma unroll
  for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
    for (int dj = 0; dj < D / 8; ++dj)
#pragma unroll
      for (int e = 0; e < 4; ++e) st.o[mi][dj][e] = 0.f;
    st.m[mi][0] = st.m[mi][1] = -INFINITY;
    st.l[mi][0] = st.l[mi][1] = 0.f;
  }

  // The tiles this thread's loader group visits: k = first, first + WN, ...
  const int num_tiles = s.n1 + s.n2;
  const int first = WN > 1 ? warp_n : 0;
  const int count = num_tiles > first ? (num_tiles - first + WN - 1) / WN : 0;
  const int slot = WN > 1 ? warp_n : 0;
  const int loader = WN > 1 ? lane : static_cast<int>(threadIdx.x);
  // In a shared-tile block every warp resolves the pages, but only warp 0 records faults.
  const bool may_record = WN > 1 || warp == 0;
  auto sync_loaders = [&]() {
    if constexpr (WN > 1) {
      __syncwarp();
    } else {
      __syncthreads();
    }
  };

#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < count) {
      const int k = first + i * WN;
      const uint32_t mask = load_tile<T, Cfg>(p, s, k, k_tile(i, slot), v_tile(i, slot), loader,
                                              may_record, read_tile_pte<Cfg>(p, s, k));
      if (loader == 0) page_masks[i * WN + slot] = mask;
    }
    cp_async_commit();
  }
  int32_t pte_ahead =
      STAGES - 1 < count ? read_tile_pte<Cfg>(p, s, first + (STAGES - 1) * WN) : kPteUnmapped;
  for (int it = 0; it < count; ++it) {
    cp_async_wait<STAGES - 2>();
    sync_loaders();
    const int next = it + STAGES - 1;
    if (next < count) {
      const int stage = next % STAGES;
      const uint32_t mask = load_tile<T, Cfg>(p, s, first + next * WN, k_tile(stage, slot),
                                              v_tile(stage, slot), loader, may_record, pte_ahead);
      if (loader == 0) page_masks[stage * WN + slot] = mask;
      if (next + 1 < count) pte_ahead = read_tile_pte<Cfg>(p, s, first + (next + 1) * WN);
    }
    cp_async_commit();
    const int stage = it % STAGES;
    attend_tile<T, Cfg>(p, s, first + it * WN, sq, q_regs, k_tile(stage, slot), v_tile(stage, slot),
                        page_masks[stage * WN + slot], pos, newest, warp_m, st);
  }
  cp_async_wait<0>();
  allow_dependent_grid();  // the split merge may launch; it waits for this grid to finish

  const float scale_log2 = p.pr.scale * kLog2e;
#pragma unroll
  for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      st.l[mi][h] = quad_sum(st.l[mi][h]);
      st.m[mi][h] = st.m[mi][h] == -INFINITY ? -INFINITY : st.m[mi][h] * scale_log2;
    }
  }

  if constexpr (WN == 1) {
#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = (warp_m * MW + mi) * 16 + g + 8 * h;
        if (pos[mi][h] < 0) continue;
        const float l = st.l[mi][h];
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int dj = 0; dj < D / 8; ++dj) {
          store_pair<T, Cfg>(p, s, row, dj * 8 + 2 * t, st.o[mi][dj][2 * h] * inv,
                             st.o[mi][dj][2 * h + 1] * inv);
        }
        if (t == 0) store_lse<Cfg>(p, s, row, l > 0.f ? (st.m[mi][h] + log2f(l)) * kLn2 : -INFINITY);
      }
    }
  } else {
    // Merge the WN warps' states of the same rows through shared memory (the pipeline's space).
    __syncthreads();
    float* merge_o = reinterpret_cast<float*>(pipeline);  // [WN][rows][D]
    float* merge_m = merge_o + WN * Cfg::kRows * D;       // [WN][rows]
    float* merge_l = merge_m + WN * Cfg::kRows;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = g + 8 * h;  // MW == 1, WM == 1
      float* o_row = merge_o + (warp_n * Cfg::kRows + row) * D;
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj) {
        *reinterpret_cast<float2*>(o_row + dj * 8 + 2 * t) =
            make_float2(st.o[0][dj][2 * h], st.o[0][dj][2 * h + 1]);
      }
      if (t == 0) {
        merge_m[warp_n * Cfg::kRows + row] = st.m[0][h];
        merge_l[warp_n * Cfg::kRows + row] = st.l[0][h];
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < Cfg::kRows * D / 2; idx += Cfg::kThreads) {
      const int row = idx / (D / 2), d = (idx % (D / 2)) * 2;
      if (s.row_base + row >= s.total_rows) continue;
      float m_all = -INFINITY;
#pragma unroll
      for (int w = 0; w < WN; ++w) m_all = fmaxf(m_all, merge_m[w * Cfg::kRows + row]);
      const float ref = m_all == -INFINITY ? 0.f : m_all;
      float l_all = 0.f, o0 = 0.f, o1 = 0.f;
#pragma unroll
      for (int w = 0; w < WN; ++w) {
        const float f = exp2f(merge_m[w * Cfg::kRows + row] - ref);
        l_all += merge_l[w * Cfg::kRows + row] * f;
        const float2 o = *reinterpret_cast<const float2*>(merge_o + (w * Cfg::kRows + row) * D + d);
        o0 += o.x * f;
        o1 += o.y * f;
      }
      const float inv = l_all > 0.f ? 1.f / l_all : 0.f;
      store_pair<T, Cfg>(p, s, row, d, o0 * inv, o1 * inv);
      if (d == 0) store_lse<Cfg>(p, s, row, l_all > 0.f ? (m_all + log2f(l_all)) * kLn2 : -INFINITY);
    }
  }
}

// Merges the splits' partial states of each (query, head) into the output: one block of
// kCombineWarps warps per row. Every warp computes the merged LSE (lanes over splits), then warp
// w sums the weighted outputs of splits w, w + kCombineWarps, ... with several loads in flight
// (each lane owns D / 32 columns), and the warps' sums meet in shared memory.
constexpr int kCombineWarps = 4;

template <typename T, int D>
__global__ void __launch_bounds__(kCombineWarps * 32)
    combine_splits_kernel(const float* __restrict__ partial_out,
                          const float* __restrict__ partial_lse, int64_t num_splits, int64_t rows,
                          T* __restrict__ out, float* __restrict__ lse) {
  constexpr int kPerLane = D / 32;
  __shared__ float sums[kCombineWarps][D];
  wait_for_prior_grid();
  const int64_t row = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float m = -INFINITY;
  for (int64_t sp = lane; sp < num_splits; sp += 32) m = fmaxf(m, partial_lse[sp * rows + row]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  float sum = 0.f;
  if (m != -INFINITY) {
    for (int64_t sp = lane; sp < num_splits; sp += 32) sum += __expf(partial_lse[sp * rows + row] - m);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float total = m == -INFINITY ? -INFINITY : m + __logf(sum);

  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
  if (total != -INFINITY) {
#pragma unroll 4
    for (int64_t sp = warp; sp < num_splits; sp += kCombineWarps) {
      const float l = partial_lse[sp * rows + row];
      if (l == -INFINITY) continue;  // an empty split's output is never read
      const float w = __expf(l - total);
      const float* src = partial_out + (sp * rows + row) * D + lane * kPerLane;
#pragma unroll
      for (int i = 0; i < kPerLane; i += 2) {
        const float2 v = *reinterpret_cast<const float2*>(src + i);
        acc[i] += w * v.x;
        acc[i + 1] += w * v.y;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sums[warp][lane * kPerLane + i] = acc[i];
  __syncthreads();
  for (int d = threadIdx.x * 2; d < D; d += kCombineWarps * 64) {
    float o0 = 0.f, o1 = 0.f;
#pragma unroll
    for (int w = 0; w < kCombineWarps; ++w) {
      o0 += sums[w][d];
      o1 += sums[w][d + 1];
    }
    *reinterpret_cast<uint32_t*>(out + row * D + d) = pack2<T>(o0, o1);
  }
  if (threadIdx.x == 0) lse[row] = total;
}

// Adds, per batch entry and page, the softmax mass of the newest query summed over heads.
__global__ void telemetry_kernel(Params p, float* __restrict__ telemetry) {
  const AttentionProblem& pr = p.pr;
  const int64_t max_pages = pr.table.max_pages;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= pr.batch * max_pages) return;
  const int b = static_cast<int>(idx / max_pages);
  const int page = static_cast<int>(idx % max_pages);
  const int64_t row = pr.sequences[b];
  const int q0 = pr.query_starts[b], q1 = pr.query_starts[b + 1];
  const int kv_len = pr.kv_lens[b];
  const int P = static_cast<int>(pr.geometry.page_size);
  // Bad entries were recorded by the attention kernel; here they are only skipped.
  if (row < 0 || row >= pr.table.max_sequences || q1 <= q0 || q0 < 0 ||
      q1 > pr.total_queries || kv_len < 0 || kv_len > max_pages * P ||
      q1 - q0 > pr.max_query_len || q1 - q0 > kv_len) {
    return;
  }
  if (static_cast<int64_t>(page) * P >= kv_len) return;
  const int64_t newest = q1 - 1;
  const int per_page = static_cast<int>(P / p.chunk_tokens);
  float mass = 0.f;
  for (int64_t h = 0; h < pr.num_q_heads; ++h) {
    const float total = p.lse[newest * pr.num_q_heads + h];
    if (total == -INFINITY) continue;
    const float* chunks = p.chunk_lse + (b * pr.num_q_heads + h) * p.max_chunks +
                          static_cast<int64_t>(page) * per_page;
    for (int c = 0; c < per_page; ++c) mass += __expf(chunks[c] - total);
  }
  if (mass > 0.f) atomicAdd(telemetry + row * max_pages + page, mass);
}

// Launches `kernel` with programmatic stream serialization: its blocks may be scheduled while
// the previous kernel in the stream drains (each kernel waits in wait_for_prior_grid()).
template <typename... KernelArgs, typename... Args>
cudaError_t launch_dependent(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// Allows the kernel its shared memory (once per device and instantiation) and returns how many
// of its blocks fit on one multiprocessor, or 0 on a CUDA error.
template <typename T, typename Cfg>
int configure_kernel() {
  static int blocks_per_sm[256] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (device < 256 && blocks_per_sm[device] > 0) return blocks_per_sm[device];
  if (cudaFuncSetAttribute(paged_attention_kernel<T, Cfg>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                           Cfg::kSmemBytes) != cudaSuccess) {
    return 0;
  }
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, paged_attention_kernel<T, Cfg>,
                                                    Cfg::kThreads, Cfg::kSmemBytes) !=
      cudaSuccess) {
    return 0;
  }
  if (device < 256) blocks_per_sm[device] = blocks;
  return blocks;
}

template <typename T, typename Cfg>
int launch_config(const Params& params, const AttentionPlan& plan, cudaStream_t stream) {
  if (configure_kernel<T, Cfg>() == 0) {
    const cudaError_t e = cudaGetLastError();
    return static_cast<int>(e == cudaSuccess ? cudaErrorInvalidConfiguration : e);
  }
  const AttentionProblem& pr = params.pr;
  const dim3 grid(static_cast<unsigned>(pr.batch * pr.geometry.num_kv_heads * plan.query_tiles),
                  static_cast<unsigned>(plan.num_splits));
  cudaError_t e = launch_dependent(paged_attention_kernel<T, Cfg>, grid, dim3(Cfg::kThreads),
                                   Cfg::kSmemBytes, stream, params);
  if (e != cudaSuccess) return static_cast<int>(e);
  const int64_t rows = pr.total_queries * pr.num_q_heads;
  if (plan.num_splits > 1 && rows > 0) {
    e = launch_dependent(combine_splits_kernel<T, Cfg::D>, dim3(static_cast<unsigned>(rows)),
                         dim3(kCombineWarps * 32), 0, stream,
                         static_cast<const float*>(params.partial_out),
                         static_cast<const float*>(params.partial_lse), plan.num_splits, rows,
                         static_cast<T*>(params.out), params.lse);
  }
  return static_cast<int>(e);
}

template <int D>
bool is_decode(const AttentionProblem& pr) {
  return pr.max_query_len * pr.group <= DecodeConfig<D>::kRows;
}

template <typename T, int D>
int launch_typed(const Params& params, const AttentionPlan& plan, cudaStream_t stream) {
  if (is_decode<D>(params.pr)) return launch_config<T, DecodeConfig<D>>(params, plan, stream);
  return launch_config<T, PrefillConfig<D>>(params, plan, stream);
}

template <typename Cfg>
void plan_with(const AttentionProblem& pr, int num_sms, AttentionPlan& plan) {
  plan.query_tiles = (pr.max_query_len * pr.group + Cfg::kRows - 1) / Cfg::kRows;
  plan.chunk_tokens = std::min<int64_t>(pr.geometry.page_size, Cfg::KT);
  const int64_t max_tokens = pr.table.max_pages * pr.geometry.page_size;
  plan.max_chunks = max_tokens / plan.chunk_tokens;
  // Split the keys when the blocks alone would not fill one wave of the GPU (flash decoding):
  // one full wave of long splits keeps the per-block start-up cost small. The sequence length
  // is only known on the device, so the split count is sized by the page table's capacity; a
  // split past a shorter sequence's end is an empty state.
  const int64_t blocks = pr.batch * pr.geometry.num_kv_heads * plan.query_tiles;
  const int per_sm = std::max(1, configure_kernel<__nv_bfloat16, Cfg>());
  const int64_t wave = static_cast<int64_t>(num_sms) * per_sm;
  const int64_t align = std::max<int64_t>(pr.geometry.page_size, Cfg::KT);
  const int64_t min_split_tokens = std::max<int64_t>(align, 512);
  const int64_t max_splits = std::max<int64_t>(1, max_tokens / min_split_tokens);
  const int64_t splits = blocks >= wave ? 1 : wave / std::max<int64_t>(blocks, 1);
  plan.num_splits = std::max<int64_t>(1, std::min<int64_t>({splits, max_splits, 65535}));
}

template <int D>
void plan_for(const AttentionProblem& pr, int num_sms, AttentionPlan& plan) {
  if (is_decode<D>(pr)) {
    plan_with<DecodeConfig<D>>(pr, num_sms, plan);
  } else {
    plan_with<PrefillConfig<D>>(pr, num_sms, plan);
  }
}

}  // namespace

AttentionPlan plan_attention(const AttentionProblem& pr, int num_sms) {
  AttentionPlan plan{};
  switch (pr.geometry.head_dim) {
    case 64: plan_for<64>(pr, num_sms, plan); break;
    case 128: plan_for<128>(pr, num_sms, plan); break;
    default: plan_for<256>(pr, num_sms, plan); break;
  }
  return plan;
}

int launch_attention(const AttentionProblem& pr, const AttentionPlan& plan, void* out, float* lse,
                     float* partial_out, float* partial_lse, float* chunk_lse, float* telemetry,
                     OpError* error, void* stream_handle) {
  if (pr.batch == 0 || pr.total_queries == 0) return static_cast<int>(cudaSuccess);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  int page_shift = 0;
  while ((int64_t{1} << page_shift) < pr.geometry.page_size) ++page_shift;
  Params params{pr,  page_shift,  plan.query_tiles, plan.num_splits, plan.chunk_tokens,
                plan.max_chunks, out, lse, partial_out, partial_lse, chunk_lse, error};
  int status = static_cast<int>(cudaErrorInvalidValue);
  switch (pr.geometry.head_dim) {
    case 64:
      status = pr.bf16 ? launch_typed<__nv_bfloat16, 64>(params, plan, stream)
                       : launch_typed<__half, 64>(params, plan, stream);
      break;
    case 128:
      status = pr.bf16 ? launch_typed<__nv_bfloat16, 128>(params, plan, stream)
                       : launch_typed<__half, 128>(params, plan, stream);
      break;
    case 256:
      status = pr.bf16 ? launch_typed<__nv_bfloat16, 256>(params, plan, stream)
                       : launch_typed<__half, 256>(params, plan, stream);
      break;
    default: break;
  }
  if (status != static_cast<int>(cudaSuccess) || !pr.telemetry) return status;
  const int64_t items = pr.batch * pr.table.max_pages;
  if (items > 0) {
    const int threads = 256;
    telemetry_kernel<<<static_cast<unsigned>((items + threads - 1) / threads), threads, 0,
                       stream>>>(params, telemetry);
    status = static_cast<int>(cudaGetLastError());
  }
  return status;
}

}  // namespace paged_kv::cuda
