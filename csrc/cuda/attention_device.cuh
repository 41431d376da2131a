// Device code shared by the paged attention kernels (attention.cu: mma.sync, every GPU;
// attention_wgmma.cu: Hopper prefill): the block's scope over its sequence, rows and keys, page
// resolution with the fault queue, K/V tile copies, the online softmax of one key tile, and the
// output stores. A kernel configuration `Cfg` names D (head_dim), KT (keys per tile), kRows
// (query rows per block), MW (16-row MMA tiles per warp), kChunks (D / 8), kLoaders (threads
// that copy one tile), tile_offset(row, chunk) (its shared-memory layout), kUnpredicatedCopies
// (whole tiles copied without per-row predicates), kZeroFillBeforeWindow (see copy_tile_part) and
// kHoistAddressTerms (see BlockScope).
//
// Rows. A block owns kRows query rows of one (sequence, KV head): row r is query token
// (row_base + r) / group and query head kv_head * group + (row_base + r) % group, so all query
// heads of a group share every K/V tile. Warp w holds rows (w * MW + mi) * 16 + g (+ 8), g =
// lane / 4, in the m16n8 accumulator layout.
//
// Keys. The keys a block visits are the tiles (KT tokens, aligned) of at most two segments: the
// sink tokens and the window [lo, hi) of its rows, intersected with its split. Tiles never
// overlap, so every key, fault and telemetry chunk is seen once. Per-element masks apply the
// exact causal, window and sink rules. A long decode sequence without a window instead splits
// [0, pool_lo) statically and leaves its last tiles to be claimed one unit at a time by the
// warps of all its splits (Params::tile_claims); each tile is still visited once.
//
// Pages. A tile's pages are resolved once per tile (one lane per page): tier 0 reads the GPU
// pool, tier 1 the pinned host pool when given (zero-copy, through UVA), anything else is a
// fault: skipped, and appended to the fault queue by exactly one block (KV head 0, the first
// query tile that needs the page, the tile holding the first visited token of the page).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda/attention.h"
#include "cuda/device_error.cuh"
#include "cuda/fast_divisor.h"

namespace paged_kv::cuda::detail {

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
// The two element types differ only in the type the instruction names (a literal in the asm).
#define PKV_DEFINE_MMA_16816(T, PTX_T)                                                              \
  template <>                                                                                     \
  __device__ inline void mma_16816<T>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,         \
                                      uint32_t b1) {                                              \
    asm("mma.sync.aligned.m16n8k16.row.col.f32." PTX_T "." PTX_T ".f32 {%0,%1,%2,%3}, "           \
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                                \
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                          \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                          \
  }
PKV_DEFINE_MMA_16816(__nv_bfloat16, "bf16")
PKV_DEFINE_MMA_16816(__half, "f16")
#undef PKV_DEFINE_MMA_16816

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
// The same copy, always 16 bytes.
__device__ inline void cp_async_16(uint32_t smem_addr, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(src));
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

// atomicAdd(address, 1) for counters below 2^31 - 1, without waiting for the result. ptxas
// turns an atomic add of one lane into a warp-aggregated one whose result it shuffles to the
// lane right after the atomic, so the warp would wait out the atomic's whole round trip there
// (the claimed tail issues each claim a unit ahead of its use). An increment with wrap-around
// (atom.inc: old >= limit ? 0 : old + 1) below the largest limit, which ptxas would turn into
// an add again, is issued as written.
__device__ inline int atomic_increment(int* address) {
  unsigned old;
  asm volatile("atom.global.inc.u32 %0, [%1], 0x7fffffff;\n"
               : "=r"(old)
               : "l"(address)
               : "memory");
  return static_cast<int>(old);
}

__device__ inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
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
  // Decode without a window: one zeroed counter per (sequence, KV head) block column, from
  // which warps claim the tail of the keys (null: every tile is statically assigned).
  int* tile_claims;
  // The divisors of a block's start (see fast_divisor.h): batch, KV heads, group, splits.
  FastDivisor batch_div, kv_heads_div, group_div, splits_div;
  // Block columns: batch * num_kv_heads * query_tiles. A decode grid of fewer blocks than
  // columns has each block attend columns blockIdx.x, blockIdx.x + gridDim.x, ...
  int columns;
};

// The claimed tail: the last kTailShare / 64 of a sequence's key tiles are claimed by the warps
// of all its splits as they finish their static shares, so that the multiprocessors finish
// together instead of waiting for the slowest. Measured on an H200 (bf16, 8 KV heads, head_dim
// 128; static vs claimed): 1M tokens 969 to 955 us, 128K 139.6 to 138.9 us. A share of 4 gained
// less at 1M, 12 the same; at 32K tokens (16 tiles per warp) claims cost 0.9 to 1.6 us, so
// sequences with fewer than kMinClaimedTilesPerWarp tiles per warp take no claims. A share of 16,
// built and timed between two builds of 8 (H200, three interleaved rounds, time over SDPA's,
// pages of 256 / 16): 1M 1.009 / 1.014 against 1.003 / 1.010 and 1.011, batch 32 at 8K
// 1.004 / 1.007 against 1.003 and 1.002 / 1.007; not kept. Between two builds of 8 on another
// H200 (three rounds; 8: 1M 0.998 / 1.006 and 1.007, batch 32 0.998 and 0.996 / 1.006 and
// 1.007): no claims, 1M 1.007 / 1.013 and batch 32 1.003 / 1.015; a share of 4, 1M 0.997 /
// 1.004 and batch 32 0.997 / 1.006 (32K and 128K within the 0.4% that the two builds of 8
// differ by): too little to change.
constexpr int kTailShare = 8;
constexpr int kMinClaimedTilesPerWarp = 32;

// Everything a block knows about its sequence, rows and keys.
struct BlockScope {
  int b, kv_head, query_tile, split;
  int64_t row;  // page-table row
  int q_start, q_len, kv_len, total_rows, row_base;
  int first_pos, last_pos;  // positions of the block's first and last query rows
  int lo;                   // first key of the window of the first row (0 without a window)
  // Visited key tiles: n1 from seg1 = [s1_lo, ...), then n2 from seg2 = [s2_lo, ...); tile k
  // of a warp's static share is k0 + first + i * WN.
  int s1_lo, n1, s2_lo, n2, k0;
  // With claimed tails: tiles pool_lo .. pool_lo + pool_n - 1 (from token 0) are claimed by
  // the warps of every split once their static tiles are done.
  int pool_lo, pool_n;
  int seg1_hi;  // end of the whole sink segment (before the split), 0 when there is none
  // Per-tile address terms, computed once where Cfg::kHoistAddressTerms (decode, which has
  // registers to spare; the mma.sync prefill block spilled them): the page-table row, the
  // element offset of this layer's and KV head's K rows within a frame (or host slot), and a
  // frame's size in elements.
  const int32_t* pte_row;
  int64_t head_offset, frame_elems;
};

__device__ inline int ceil_to(int x, int a) { return (x + a - 1) / a * a; }
__device__ inline int floor_to(int x, int a) { return x / a * a; }
// x rounded up to a multiple of 2^shift.
__device__ inline int ceil_to_pow2(int x, int shift) {
  return ((x + (1 << shift) - 1) >> shift) << shift;
}
// n / d.divisor for 0 <= n < 2^31: by the precomputed multiplier where Cfg::kFastDivisions (the
// decode blocks, whose start waits on these divisions), else by the division sequence (the
// mma.sync prefill block runs at the register limit, and the multiplier forms made it spill).
template <typename Cfg>
__device__ inline int quotient(const FastDivisor& d, int n) {
  if constexpr (Cfg::kFastDivisions) {
    return d.quotient(n);
  } else {
    return n / static_cast<int>(d.divisor);
  }
}
// The query head of the block's row `row`: its group's KV head and its place in the group.
template <typename Cfg>
__device__ inline int query_head(const Params& p, const BlockScope& s, int row) {
  const int r = s.row_base + row;
  return s.kv_head * static_cast<int>(p.pr.group) +
         p.group_div.remainder(r, quotient<Cfg>(p.group_div, r));
}
// The query row `row` of the block (its token and its query head from the GQA group), or nullptr
// past the block's rows.
template <typename Cfg, typename T>
__device__ inline const T* query_row_address(const Params& p, const BlockScope& s, int row) {
  const int r = s.row_base + row;
  if (r >= s.total_rows) return nullptr;
  const int token = quotient<Cfg>(p.group_div, r);
  return static_cast<const T*>(p.pr.query) +
         static_cast<int64_t>(s.q_start + token) * p.pr.query_token_stride +
         static_cast<int64_t>(s.kv_head * static_cast<int>(p.pr.group) +
                              p.group_div.remainder(r, token)) *
             p.pr.query_head_stride;
}
// log2 of a power of two known at compile time.
__host__ __device__ constexpr int log2_of(int x) { return x <= 1 ? 0 : 1 + log2_of(x / 2); }

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

// The element offset of the block's K rows in frame (or host slot) `index`, and the block's
// page-table row: from the block's precomputed terms, or from the parameters.
template <typename Cfg>
__device__ inline int64_t frame_offset(const Params& p, const BlockScope& s, int64_t index) {
  if constexpr (Cfg::kHoistAddressTerms) return s.head_offset + index * s.frame_elems;
  return p.pr.geometry.row_offset(index, p.pr.layer, 0, s.kv_head, 0);
}
template <typename Cfg>
__device__ inline const int32_t* pte_row(const Params& p, const BlockScope& s) {
  if constexpr (Cfg::kHoistAddressTerms) return s.pte_row;
  return p.pr.table.ptes + s.row * p.pr.table.row_stride;
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
    if (index < g.num_frames) return static_cast<const T*>(pr.pool) + frame_offset<Cfg>(p, s, index);
    record_op_error(p.error, OpErrorCode::kFrameOutOfRange, OpId::kAttention, s.b, s.row, page,
                    pte, g, pr.table);
    return nullptr;
  }
  if (tier == Tier::kHost && pr.has_host_pool) {
    if (index < pr.host_slots) {
      return static_cast<const T*>(pr.host_pool) + frame_offset<Cfg>(p, s, index);
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
  return pte_row<Cfg>(p, s)[page];
}

// Copies, asynchronously into `dst` (this warp's ring entry for visited tile `k`), the PTEs
// read_tile_pte would return: lane j < the tile's page count issues one 4-byte cp.async, which
// completes with the cp.async group it is committed in. A page not read gets kPteUnmapped,
// stored directly. Reading the page table a whole pipeline ahead keeps its latency, which under
// full HBM load is as long as a tile's, off each warp's critical path.
template <typename Cfg>
__device__ inline void prefetch_tile_pte(const Params& p, const BlockScope& s, int k, int32_t* dst) {
  const int lane = threadIdx.x & 31;
  const int P = static_cast<int>(p.pr.geometry.page_size);
  const int pages = Cfg::KT > P ? Cfg::KT / P : 1;
  if (lane >= pages) return;
  const int page = (tile_start<Cfg::KT>(s, k) >> p.page_shift) + lane;
  if (!page_needed(p, s, page)) {
    dst[lane] = kPteUnmapped;
    return;
  }
  const int32_t* src = pte_row<Cfg>(p, s) + page;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst + lane)), "l"(src));
}

// The pages of visited tile `k`, resolved by lanes 0 .. pages - 1 of every calling warp: `base`
// is this lane's page's K rows (null when the page is not read), bit j of `read_mask` tells
// page j of the tile was read. Faults are recorded here, so a tile is resolved once.
template <typename T>
struct TilePages {
  const T* base;
  uint32_t read_mask;
};

template <typename T, typename Cfg>
__device__ inline TilePages<T> resolve_tile(const Params& p, const BlockScope& s, int k,
                                            bool may_record, int32_t pte) {
  const int lane = threadIdx.x & 31;
  const int P = static_cast<int>(p.pr.geometry.page_size);
  const int pages = Cfg::KT > P ? Cfg::KT / P : 1;
  const int first_page = tile_start<Cfg::KT>(s, k) >> p.page_shift;
  const T* base = nullptr;
  if (lane < pages) base = resolve_page<T, Cfg>(p, s, first_page + lane, k, may_record, pte);
  const uint32_t read_mask = __ballot_sync(0xffffffffu, base != nullptr) & ((1u << pages) - 1u);
  return {base, read_mask};
}

// Copies a whole tile part with no per-row predicate (every row is read, the common case): each
// copy's source and destination are this loader's first ones plus constants. The loader owns
// chunk column `c` from row r0 on; row r = r0 + i * kRowStep with r0 < kRowStep, a power of two,
// so r & 7 = (r0 & 7) ^ ((i * kRowStep) & 7): in either tile layout (a row-XOR swizzle of 16-byte
// chunks) the copy lands at tile_offset(r0, c ^ ((i * kRowStep) & 7)) + i * kRowStep * kRowBytes.
// (Computing each address in full took about 15 instructions per copy, half of a decode tile's.)
template <typename T, typename Cfg>
__device__ inline void copy_whole_tile(const T* src, uint32_t dst, int r0, int c) {
  constexpr int L = Cfg::kLoaders, C = Cfg::kChunks;
  constexpr int kPerPart = Cfg::KT * C / L, kRowStep = L / C;
  static_assert((kRowStep & (kRowStep - 1)) == 0, "loader rows step by a power of two");
#pragma unroll
  for (int i = 0; i < kPerPart; ++i) {
    cp_async_16(dst + Cfg::tile_offset(r0, c ^ ((i * kRowStep) & 7)) +
                    static_cast<uint32_t>(i * kRowStep * Cfg::kRowBytes),
                src + i * kRowStep * Cfg::D);
  }
}

// The mask of bits [0, n) (n may lie outside [0, 32]).
__device__ inline uint32_t low_bits(int n) {
  return n <= 0 ? 0u : n >= 32 ? 0xffffffffu : (1u << n) - 1u;
}
// Whether no row of tile t0 lies before the window (or Cfg reads those rows anyway).
template <typename Cfg>
__device__ inline bool tile_in_window(const BlockScope& s, int t0) {
  if constexpr (Cfg::kZeroFillBeforeWindow) return t0 >= s.lo;
  return true;
}

// Issues the cp.async copies of K (part 0) or V (part 1) of visited tile `k` into shared memory
// at `dst` (rows laid out by Cfg::tile_offset), by `Cfg::kLoaders` threads (`loader` is this
// thread's index among them; lanes of one warp always load together). Rows of unread pages and
// rows past the sequence are zero-filled. Where Cfg::kZeroFillBeforeWindow (decode), so are the
// rows before the window of the block's first row that are not sinks: no row of the block sees
// them, and a NaN or inf value there would otherwise reach every row through P V (a zero weight
// times NaN is NaN). A decode block of one query token then keeps such a value from its
// outputs exactly. Other blocks (prefill, and decode blocks of several tokens, whose rows see
// different keys) read rows that some of their rows do not see, and there such a value still
// reaches those rows.
template <typename T, typename Cfg>
__device__ inline void copy_tile_part(const Params& p, const BlockScope& s, int k,
                                      const TilePages<T>& pages, int part, uint32_t dst,
                                      int loader) {
  constexpr int KT = Cfg::KT, D = Cfg::D, C = Cfg::kChunks, L = Cfg::kLoaders;
  static_assert(L % C == 0 && (KT * C) % L == 0, "each loader keeps one chunk column");
  constexpr int kPerPart = KT * C / L;  // copies per loader
  constexpr int kRowStep = L / C;
  const int P = static_cast<int>(p.pr.geometry.page_size);
  const int t0 = tile_start<KT>(s, k);
  const int64_t part_offset = part ? p.pr.geometry.num_kv_heads * P * D : 0;
  const int c = loader % C;
  const int r0 = loader / C;
  const int rows_left = s.kv_len - t0;  // rows at or past this are beyond the sequence
  // Decode: the rows read as a mask (one register in the loops below): those inside the
  // sequence, less the rows before the window that are not sinks.
  uint32_t rows_read = 0;
  if constexpr (Cfg::kZeroFillBeforeWindow) {
    static_assert(KT <= 32, "a row mask of 32 bits");
    rows_read = low_bits(rows_left) &
                ~(low_bits(s.lo - t0) & ~low_bits(static_cast<int>(p.pr.sinks) - t0));
  }
  auto row_read = [&](int r) {
    if constexpr (Cfg::kZeroFillBeforeWindow) return ((rows_read >> r) & 1u) != 0;
    return r < rows_left;
  };
  if (KT <= P) {
    // The tile lies in one page: one base for every row, fixed offsets per loader.
    const uint64_t page_base = __shfl_sync(0xffffffffu, reinterpret_cast<uint64_t>(pages.base), 0);
    const T* src_base = reinterpret_cast<const T*>(page_base) + part_offset +
                        static_cast<int64_t>(t0 & (P - 1)) * D + c * 8;
    if (Cfg::kUnpredicatedCopies && page_base != 0 && rows_left >= KT &&
        tile_in_window<Cfg>(s, t0)) {
      copy_whole_tile<T, Cfg>(src_base + r0 * D, dst, r0, c);
      return;
    }
    // Decode blocks come here only for a tile that ends the sequence, holds rows before the
    // window or is not read: rolled, the loop kept their registers as they were without the mask.
    constexpr int kUnroll = Cfg::kZeroFillBeforeWindow ? 1 : 8;
#pragma unroll kUnroll
    for (int i = 0; i < kPerPart; ++i) {
      const int r = r0 + i * kRowStep;
      const bool valid = page_base != 0 && row_read(r);
      cp_async_16(dst + Cfg::tile_offset(r, c), valid ? src_base + r * D : p.pr.pool, valid);
    }
  } else {
    // Several pages per tile: each row takes its page's base from the lane that resolved it.
#pragma unroll 8
    for (int i = 0; i < kPerPart; ++i) {
      const int r = r0 + i * kRowStep;
      const uint64_t page_base =
          __shfl_sync(0xffffffffu, reinterpret_cast<uint64_t>(pages.base), r >> p.page_shift);
      const bool valid = page_base != 0 && row_read(r);
      const T* src = reinterpret_cast<const T*>(page_base) + part_offset +
                     static_cast<int64_t>(r & (P - 1)) * D + c * 8;
      cp_async_16(dst + Cfg::tile_offset(r, c), valid ? src : p.pr.pool, valid);
    }
  }
}

// Issues the copies of the whole of tile t0, within the one page (of P tokens) whose K rows
// start at `page` (its V rows follow H * P * D elements later), into `sk` and `sv`: the common
// decode tile, for which K and V share the address terms.
template <typename T, typename Cfg>
__device__ inline void copy_page_tile(const Params& p, const T* page, int P, int t0, int loader,
                                      T* sk, T* sv) {
  const int c = loader % Cfg::kChunks, r0 = loader / Cfg::kChunks;
  const T* src = page + static_cast<int64_t>((t0 & (P - 1)) + r0) * Cfg::D + c * 8;
  copy_whole_tile<T, Cfg>(src, smem_u32(sk), r0, c);
  copy_whole_tile<T, Cfg>(src + p.pr.geometry.num_kv_heads * P * Cfg::D, smem_u32(sv), r0, c);
}

// Resolves visited tile `k` and issues the copies of its K and V into `sk` and `sv`; returns the
// mask of the tile's pages that were read. `pte` is read_tile_pte's value for this tile.
template <typename T, typename Cfg>
__device__ inline uint32_t load_tile(const Params& p, const BlockScope& s, int k, T* sk, T* sv,
                                     int loader, bool may_record, int32_t pte) {
  const TilePages<T> pages = resolve_tile<T, Cfg>(p, s, k, may_record, pte);
  if constexpr (Cfg::kUnpredicatedCopies) {
    // The common decode tile: one page, every row read.
    const int P = static_cast<int>(p.pr.geometry.page_size);
    const int t0 = tile_start<Cfg::KT>(s, k);
    if (Cfg::KT <= P && s.kv_len - t0 >= Cfg::KT && tile_in_window<Cfg>(s, t0)) {
      const uint64_t page_base =
          __shfl_sync(0xffffffffu, reinterpret_cast<uint64_t>(pages.base), 0);
      if (page_base != 0) {
        copy_page_tile<T, Cfg>(p, reinterpret_cast<const T*>(page_base), P, t0, loader, sk, sv);
        return pages.read_mask;
      }
    }
  }
  copy_tile_part<T, Cfg>(p, s, k, pages, 0, smem_u32(sk), loader);
  copy_tile_part<T, Cfg>(p, s, k, pages, 1, smem_u32(sv), loader);
  return pages.read_mask;
}

// Decode tiles within one page (KT <= page size). Every visited tile's page is needed then (its
// first key is at or before the block's last query, and a window or sink segment that reaches
// the tile reaches its page), so the PTE is read with no checks, by every lane alike, and the
// common tile (a GPU frame, every row inside the sequence) is resolved without a vote or a
// shuffle. Anything else goes through load_tile, which records faults and bad PTEs.
template <typename Cfg>
__device__ inline int32_t read_page_pte(const Params& p, const BlockScope& s, int k) {
  return pte_row<Cfg>(p, s)[tile_start<Cfg::KT>(s, k) >> p.page_shift];
}

// As prefetch_tile_pte, for a tile within one page: lane 0 copies its one PTE to dst[0].
template <typename Cfg>
__device__ inline void prefetch_page_pte(const Params& p, const BlockScope& s, int k, int32_t* dst) {
  if ((threadIdx.x & 31) != 0) return;
  const int32_t* src = pte_row<Cfg>(p, s) + (tile_start<Cfg::KT>(s, k) >> p.page_shift);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src));
}

// load_tile for a tile within one page; `pte` (the page's PTE) is the same in every lane.
template <typename T, typename Cfg>
__device__ inline uint32_t load_page_tile(const Params& p, const BlockScope& s, int k, T* sk, T* sv,
                                          int loader, bool may_record, int32_t pte) {
  static_assert(Cfg::kUnpredicatedCopies, "decode blocks only");
  const int t0 = tile_start<Cfg::KT>(s, k);
  // Tier 0 is a non-negative PTE whose value is the frame.
  if (pte >= 0 && pte < p.pr.geometry.num_frames && s.kv_len - t0 >= Cfg::KT &&
      tile_in_window<Cfg>(s, t0)) {
    const int P = static_cast<int>(p.pr.geometry.page_size);
    const T* page = static_cast<const T*>(p.pr.pool) + frame_offset<Cfg>(p, s, pte);
    copy_page_tile<T, Cfg>(p, page, P, t0, loader, sk, sv);
    return 1u;
  }
  return load_tile<T, Cfg>(p, s, k, sk, sv, loader, may_record, pte);
}

// Online-softmax state of one warp: MW 16-row tiles, each thread holding rows g and g + 8.
template <typename Cfg>
struct WarpState {
  float o[Cfg::MW][Cfg::D / 8][4];
  float m[Cfg::MW][2];  // running max of the raw scores q.k (log2 domain after the loop)
  float l[Cfg::MW][2];  // this thread's part of the running sum
};

// Masks one key tile's scores (tile start t0, pages read per `read_mask`) for this warp's rows,
// folds them into the running max and sum, and leaves p = 2^(s c - m c) in `sc`; `alphas` get
// the factors the outputs must be scaled by before this tile's P V is added. Also writes the
// telemetry chunk LSEs of the newest query's rows. `pos[mi][h]` is the position of row g
// (h = 0) or g + 8 (h = 1) of MMA tile mi, -1 for rows past the block's queries.
template <typename Cfg>
__device__ inline void softmax_tile(const Params& p, const BlockScope& s, int t0,
                                    uint32_t read_mask, const int (&pos)[Cfg::MW][2],
                                    const bool (&newest)[Cfg::MW][2], int warp_m,
                                    float (&sc)[Cfg::MW][Cfg::KT / 8][4], WarpState<Cfg>& st,
                                    float (&alphas)[Cfg::MW][2]) {
  constexpr int KT = Cfg::KT, MW = Cfg::MW, NT = KT / 8;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const float scale_log2 = p.pr.scale * kLog2e;
  const int pages = KT >> p.page_shift > 0 ? KT >> p.page_shift : 1;
  const int window = static_cast<int>(p.pr.window), sinks = static_cast<int>(p.pr.sinks);

  // Each pass below is one straight run of independent instructions over the whole tile (no
  // branch per element), which the scheduler interleaves; the mask pass runs only for tiles
  // some key of which some row must not see.
  const bool full = t0 + KT <= s.kv_len && read_mask == (1u << pages) - 1u &&
                    t0 + KT - 1 <= s.first_pos &&
                    (window == 0 || t0 > s.last_pos - window || t0 + KT <= sinks);
  if (!full) {
    // Row r sees key k when lo_r <= k <= hi_r (or k is a sink) and k's page was read.
    const bool multi_page = KT > (1 << p.page_shift);
#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int x = pos[mi][h];
        const int hi = min(x, s.kv_len - 1) - t0;  // x < 0 (no query): hi < 0, nothing seen
        const int lo = window == 0 ? INT_MIN : x - window + 1 - t0;
        const int sink_end = sinks - t0;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int k = j * 8 + 2 * t + e;  // key - t0
            const uint32_t page_bit =
                multi_page ? (read_mask >> (k >> p.page_shift)) & 1u : read_mask & 1u;
            const bool visible = (k <= hi) & ((k >= lo) | (k < sink_end)) & (page_bit != 0);
            sc[mi][j][2 * h + e] = visible ? sc[mi][j][2 * h + e] : -INFINITY;
          }
        }
      }
    }
  }

  // Running max and sum. The max is taken over raw scores (the scale is positive), and
  // p = 2^(s c - m c) with c = scale * log2(e) is one FFMA and one MUFU.
  float refs[MW][2];
#pragma unroll
  for (int mi = 0; mi < MW; ++mi) {
    // Four independent chains (row half h, column parity e) keep the dependent latency short.
    float part_max[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) part_max[i] = fmaxf(part_max[i], sc[mi][j][i]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float tile_max = quad_max(fmaxf(part_max[2 * h], part_max[2 * h + 1]));
      const float m_new = fmaxf(st.m[mi][h], tile_max);
      // All masked so far: subtract 0, keeping every p at 0 and alpha at 1.
      refs[mi][h] = m_new == -INFINITY ? 0.f : m_new * scale_log2;
      // (m_old - m_new) * c is exactly 0 when the max did not move, so alpha is exactly 1 and
      // the output rescale is skipped; m_old * c - refs contracts to an FFMA whose rounding
      // residue made alpha differ from 1 on most tiles.
      alphas[mi][h] = m_new == -INFINITY ? 1.f : fast_exp2((st.m[mi][h] - m_new) * scale_log2);
      st.m[mi][h] = m_new;
    }
    float part_sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float pv = fast_exp2(fmaf(sc[mi][j][i], scale_log2, -refs[mi][i >> 1]));
        sc[mi][j][i] = pv;
        part_sum[i] += pv;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      st.l[mi][h] = st.l[mi][h] * alphas[mi][h] + (part_sum[2 * h] + part_sum[2 * h + 1]);
    }
  }

  // Telemetry: log-sum-exp of each chunk's scores for the newest query's rows.
  if (p.pr.telemetry) {
    const int ct = static_cast<int>(p.chunk_tokens);
#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
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
            const int head = query_head<Cfg>(p, s, (warp_m * MW + mi) * 16 + g + 8 * h);
            float* dst = p.chunk_lse +
                         (static_cast<int64_t>(s.b) * p.pr.num_q_heads + head) * p.max_chunks +
                         t0 / ct + c;
            *dst = csum > 0.f ? (log2f(csum) + refs[mi][h]) * kLn2 : -INFINITY;
          }
        }
      }
    }
  }
}

// Scales the outputs by softmax_tile's factors, unless no running max of the warp moved (the
// common case once the large scores are found).
template <typename Cfg>
__device__ inline void rescale_output(WarpState<Cfg>& st, const float (&alphas)[Cfg::MW][2]) {
  constexpr int MW = Cfg::MW, D = Cfg::D;
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

}

// The (query, head) index, query * num_q_heads + head, of the block's row `row`.
template <typename Cfg>
__device__ inline int64_t output_row(const Params& p, const BlockScope& s, int row) {
  const int r = s.row_base + row;
  const int q = quotient<Cfg>(p.group_div, r);
  const int64_t query = s.q_start + q;
  const int64_t head =
      static_cast<int64_t>(s.kv_head) * p.pr.group + p.group_div.remainder(r, q);
  return query * p.pr.num_q_heads + head;
}

// Writes one finished row: the final output (one split) or the split's partial state.
template <typename T, typename Cfg>
__device__ inline void store_pair(const Params& p, const BlockScope& s, int row, int d, float o0,
                                  float o1) {
  const int64_t at = output_row<Cfg>(p, s, row) * Cfg::D + d;
  if (p.num_splits == 1) {
    *reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + at) = pack2<T>(o0, o1);
  } else {
    const int64_t split_stride = p.pr.total_queries * p.pr.num_q_heads * Cfg::D;
    *reinterpret_cast<float2*>(p.partial_out + s.split * split_stride + at) = make_float2(o0, o1);
  }
}

template <typename Cfg>
__device__ inline void store_lse(const Params& p, const BlockScope& s, int row, float lse) {
  const int64_t at = output_row<Cfg>(p, s, row);
  if (p.num_splits == 1) {
    p.lse[at] = lse;
  } else {
    p.partial_lse[s.split * p.pr.total_queries * p.pr.num_q_heads + at] = lse;
  }
}

// Checks the batch entry's values and fills the block's scope; false when the block has no work
// (or the entry is bad, which is recorded).
template <typename Cfg>
__device__ bool make_scope(const Params& p, BlockScope& s, int column) {
  const AttentionProblem& pr = p.pr;
  // column = (tile_index * num_kv_heads + kv_head) * batch + b, below 2^31 (blockIdx.x where
  // the grid has a block per column). Heaviest (latest) query tiles first: under causal masking
  // they have the most keys.
  if constexpr (Cfg::kFastDivisions) {
    const int head_column = p.batch_div.quotient(column);
    s.b = p.batch_div.remainder(column, head_column);
    const int tile_index = p.kv_heads_div.quotient(head_column);
    s.kv_head = p.kv_heads_div.remainder(head_column, tile_index);
    s.query_tile = static_cast<int>(p.query_tiles - 1 - tile_index);
  } else {
    // The same in 64 bits from blockIdx.x (one column per block): the 32-bit form above made the
    // mma.sync prefill block spill.
    const int64_t head_column = blockIdx.x / pr.batch;
    s.b = static_cast<int>(blockIdx.x - head_column * pr.batch);
    s.kv_head = static_cast<int>(head_column % pr.geometry.num_kv_heads);
    s.query_tile = static_cast<int>(p.query_tiles - 1 - head_column / pr.geometry.num_kv_heads);
  }
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
  s.first_pos = history + quotient<Cfg>(p.group_div, s.row_base);
  s.last_pos =
      history + quotient<Cfg>(p.group_div, min(s.row_base + Cfg::kRows, s.total_rows) - 1);

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
  // align = max(page size, KT), both powers of two.
  constexpr int kTileShift = log2_of(KT);
  const int align_shift = max(p.page_shift, kTileShift);
  const int splits = static_cast<int>(p.num_splits);
  s.k0 = 0;
  s.pool_lo = 0;
  s.pool_n = 0;
  bool claims = false;
  if constexpr (Cfg::kClaimsTail) claims = p.tile_claims != nullptr;
  if (claims) {
    // No window (the launcher checks): the splits share tiles [0, pool_lo) statically and
    // claim [pool_lo, hi / KT). Tile k starts at token k * KT.
    const int tiles = hi / KT;
    const bool long_enough = tiles >= kMinClaimedTilesPerWarp * splits * Cfg::kThreads / 32;
    s.pool_n = long_enough ? static_cast<int>(static_cast<int64_t>(tiles) * kTailShare / 64) : 0;
    s.pool_lo = tiles - s.pool_n;
    const int static_hi = s.pool_lo * KT;
    const int share =
        ceil_to_pow2(quotient<Cfg>(p.splits_div, static_hi + splits - 1), align_shift);
    const int lo = static_cast<int>(min(static_cast<int64_t>(s.split) * share, int64_t{static_hi}));
    s.s1_lo = s.s2_lo = s.n1 = s.seg1_hi = 0;
    s.k0 = lo / KT;
    s.n2 = min(share, static_hi - lo) / KT;
  } else {
    const int per_split =
        ceil_to_pow2(quotient<Cfg>(p.splits_div, s.kv_len + splits - 1), align_shift);
    const int sp_lo = s.split * per_split, sp_hi = sp_lo + per_split;
    s.s1_lo = sp_lo;
    s.n1 = max(0, min(seg1_hi, sp_hi) - sp_lo) / KT;
    s.s2_lo = max(seg2_lo, sp_lo);
    s.n2 = max(0, min(hi, sp_hi) - s.s2_lo) / KT;
  }
  if constexpr (Cfg::kHoistAddressTerms) {
    s.pte_row = pr.table.ptes + s.row * pr.table.row_stride;
    s.head_offset = g.row_offset(0, pr.layer, 0, s.kv_head, 0);
    s.frame_elems = g.row_offset(1, 0, 0, 0, 0);
  }
  return true;
}

// After the last tile: the row sums are gathered from the quad and the running max is turned
// into the log2 domain of the scaled scores.
template <typename Cfg>
__device__ inline void finish_state(const Params& p, WarpState<Cfg>& st) {
  const float scale_log2 = p.pr.scale * kLog2e;
#pragma unroll
  for (int mi = 0; mi < Cfg::MW; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      st.l[mi][h] = quad_sum(st.l[mi][h]);
      st.m[mi][h] = st.m[mi][h] == -INFINITY ? -INFINITY : st.m[mi][h] * scale_log2;
    }
  }
}

// Writes this warp's finished rows (finish_state done): outputs divided by the row sums, and
// the LSE.
template <typename T, typename Cfg>
__device__ inline void store_rows(const Params& p, const BlockScope& s, const WarpState<Cfg>& st,
                                  const int (&pos)[Cfg::MW][2], int warp_m) {
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < Cfg::MW; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = (warp_m * Cfg::MW + mi) * 16 + g + 8 * h;
      if (pos[mi][h] < 0) continue;
      // l is 0 exactly when no key was visible, and NaN after a NaN score, which then reaches
      // the output and the LSE (the running max passes over NaN).
      const float l = st.l[mi][h];
      const float inv = l != 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int dj = 0; dj < Cfg::D / 8; ++dj) {
        store_pair<T, Cfg>(p, s, row, dj * 8 + 2 * t, st.o[mi][dj][2 * h] * inv,
                           st.o[mi][dj][2 * h + 1] * inv);
      }
      if (t == 0) store_lse<Cfg>(p, s, row, l != 0.f ? (st.m[mi][h] + log2f(l)) * kLn2 : -INFINITY);
    }
  }
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


// Allows `kernel` `smem` bytes of dynamic shared memory (once per device; `cache` keeps the
// answer) and returns how many of its blocks of `threads` threads fit on one multiprocessor, or
// 0 on a CUDA error.
constexpr int kMaxDevices = 256;
template <typename... KernelArgs>
int blocks_per_sm(void (*kernel)(KernelArgs...), int threads, int smem, int (&cache)[kMaxDevices]) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (device < kMaxDevices && cache[device] > 0) return cache[device];
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) !=
      cudaSuccess) {
    return 0;
  }
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) !=
      cudaSuccess) {
    return 0;
  }
  if (device < kMaxDevices) cache[device] = blocks;
  return blocks;
}

// The status to return when blocks_per_sm failed: the pending CUDA error, or a configuration
// error when there is none (no block fits).
inline int launch_config_error() {
  const cudaError_t e = cudaGetLastError();
  return static_cast<int>(e == cudaSuccess ? cudaErrorInvalidConfiguration : e);
}

}  // namespace paged_kv::cuda::detail
