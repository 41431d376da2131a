// Load-only kernels for bench/load_floor.py (compiled there with NVRTC): they read a decode
// case's K and V through its page table exactly as the attention kernel's decode blocks do,
// and do nothing else (no tile math, no merge, no residency checks, no per-sequence lookups).
// Their time is the floor that the access pattern itself sets.
//
// Pool layout as paged_kv.new_pool with one layer: frame f holds K then V, each [H][P][D] bf16.
// `frames` is the page table's row-major [batch][pages] (tier 0 PTEs are frame indices). Grid:
// batch * H * splits blocks; block (sequence b, KV head h, split s) reads 16-token tiles of its
// split's range. The result word keeps the compiler from dropping the loads; it is never set.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ inline u32 smem_u32(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}
__device__ inline void cp_async_16(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ inline void commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ inline void wait_groups() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

constexpr int kTile = 16;  // tokens per tile, as the decode kernel's

struct Case {
  const u16* pool;
  const int* frames;
  long long frame_elems;  // elements per frame
  int heads, page_size, head_dim, tokens, pages, splits;
};

// Address of K (part 0) or V (part 1) of token t of block column (b, h).
__device__ inline const u16* row_address(const Case& c, int b, int h, int t, int part) {
  const int page = t / c.page_size;
  const long long frame = c.frames[static_cast<long long>(b) * c.pages + page];
  return c.pool + frame * c.frame_elems +
         (static_cast<long long>(part * c.heads + h) * c.page_size + t % c.page_size) * c.head_dim;
}

// Streams `count` tiles of `tile_tokens` tokens of column (b, h), K then V, through a
// STAGES-deep ring at `ring`: tile i starts at token first_token(i) (within one page); the
// `loaders` threads (this one is `loader`) issue its 16-byte copies and `sync()` orders them.
// Returns a word of what was read.
template <int STAGES, typename FirstToken, typename Sync>
__device__ u32 stream_tiles(const Case& c, int b, int h, int count, int tile_tokens,
                            unsigned char* ring, int loader, int loaders, FirstToken first_token,
                            Sync sync) {
  const int tile_bytes = tile_tokens * c.head_dim * 2;
  auto issue = [&](int i) {
    if (i < count) {
      unsigned char* dst = ring + (i % STAGES) * 2 * tile_bytes;
      for (int part = 0; part < 2; ++part) {
        const u16* src = row_address(c, b, h, first_token(i), part);
        for (int x = loader; x < tile_bytes / 16; x += loaders) {
          cp_async_16(smem_u32(dst + part * tile_bytes + x * 16), src + x * 8);
        }
      }
    }
    commit();
  };
  u32 acc = 0;
  for (int i = 0; i < STAGES - 1; ++i) issue(i);
  for (int i = 0; i < count; ++i) {
    issue(i + STAGES - 1);
    wait_groups<STAGES - 1>();
    sync();
    const unsigned char* tile = ring + (i % STAGES) * 2 * tile_bytes;
    acc ^= reinterpret_cast<const u32*>(tile)[loader] ^
           reinterpret_cast<const u32*>(tile + tile_bytes)[loader];
    sync();
  }
  return acc;
}

// Block (b, h, split) of the grid and its split's tiles [lo, hi) of `tile_tokens` tokens: a
// block per (sequence, KV head, split), or without `head_blocks` a block per (sequence, split)
// (h = 0).
struct BlockRange {
  int b, h, lo, hi;
};
__device__ inline BlockRange block_range(const Case& c, int tile_tokens, bool head_blocks = true) {
  const int col = blockIdx.x / c.splits, split = blockIdx.x % c.splits;
  const int heads = head_blocks ? c.heads : 1;
  const long long tiles = c.tokens / tile_tokens;
  return {col / heads, col % heads, static_cast<int>(tiles * split / c.splits),
          static_cast<int>(tiles * (split + 1) / c.splits)};
}

// How many of `n` tiles a loader visits that takes tiles first, first + stride, ...
__device__ inline int turns(int n, int first, int stride) {
  return n > first ? (n - first + stride - 1) / stride : 0;
}

// Each warp of the block streams 16-token tiles lo + first, lo + first + stride, ... (those
// below lo + n) of column (b, h) through a STAGES-deep ring of its own in `smem`.
template <int STAGES>
__device__ void warp_pipeline(const Case& c, int b, int h, int lo, int n, int first, int stride,
                              unsigned char* smem, u32* result) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int count = turns(n, first, stride);
  unsigned char* ring = smem + warp * STAGES * 2 * (kTile * c.head_dim * 2);
  const u32 acc = stream_tiles<STAGES>(
      c, b, h, count, kTile, ring, lane, 32,
      [&](int i) { return (lo + first + i * stride) * kTile; }, [] { __syncwarp(); });
  if (acc == 0x9e3779b9u) result[0] = acc;
}

// The decode kernel's pattern: each of WARPS warps runs its own STAGES-deep pipeline of tiles
// warp, warp + WARPS, ... of the block's split.
template <int WARPS, int STAGES>
__global__ void __launch_bounds__(WARPS * 32)
    per_warp(const u16* pool, const int* frames, long long frame_elems, int heads, int page_size,
             int head_dim, int tokens, int pages, int splits, u32* result) {
  const Case c{pool, frames, frame_elems, heads, page_size, head_dim, tokens, pages, splits};
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5;
  const BlockRange r = block_range(c, kTile);
  warp_pipeline<STAGES>(c, r.b, r.h, r.lo, r.hi - r.lo, warp, WARPS, smem, result);
}

// A block-wide pattern for comparison: 128 threads load each TOKENS-token tile together into a
// STAGES-deep pipeline (the shape of a flash-attention block that shares its K and V tiles).
// Pages must hold a whole number of tiles (the driver checks).
template <int TOKENS, int STAGES>
__global__ void __launch_bounds__(128)
    block_tiles(const u16* pool, const int* frames, long long frame_elems, int heads, int page_size,
                int head_dim, int tokens, int pages, int splits, u32* result) {
  const Case c{pool, frames, frame_elems, heads, page_size, head_dim, tokens, pages, splits};
  extern __shared__ __align__(128) unsigned char smem[];
  const BlockRange r = block_range(c, TOKENS);
  const u32 acc = stream_tiles<STAGES>(
      c, r.b, r.h, r.hi - r.lo, TOKENS, smem, threadIdx.x, 128,
      [&](int i) { return (r.lo + i) * TOKENS; }, [] { __syncthreads(); });
  if (acc == 0x9e3779b9u) result[0] = acc;
}

// GROUP KV heads of a page read by one block: warp w reads head g * GROUP + w % GROUP of the
// split's tiles lo + w / GROUP, lo + w / GROUP + WARPS / GROUP, ..., so a block's warps read
// those heads of the same pages at about the same time (one frame's runs together instead of
// one run per block). Grid: batch * (heads / GROUP) * splits blocks, block (sequence b, head
// group g, split); WARPS must be a multiple of GROUP and GROUP divide heads (the driver checks).
template <int WARPS, int STAGES, int GROUP>
__global__ void __launch_bounds__(WARPS * 32)
    head_warps(const u16* pool, const int* frames, long long frame_elems, int heads, int page_size,
               int head_dim, int tokens, int pages, int splits, u32* result) {
  const Case c{pool, frames, frame_elems, heads, page_size, head_dim, tokens, pages, splits};
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5;
  const int phases = WARPS / GROUP, phase = warp / GROUP;
  const BlockRange r = block_range(c, kTile, false);  // r.b: sequence * groups + group
  const int groups = heads / GROUP;
  const int h = (r.b % groups) * GROUP + warp % GROUP;
  warp_pipeline<STAGES>(c, r.b / groups, h, r.lo, r.hi - r.lo, phase, phases, smem, result);
}

// The merge that a split decode grid needs, in two forms. Either way each column's splits store
// partial states for the ROWS query heads of their KV head (ROWS x kStateDim floats and ROWS
// LSEs, as the decode kernel stores one), split s's after split s - 1's, the column (b, h) at
// rows [(b * heads + h) * ROWS, + ROWS) of each. Then either the last block of each (sequence,
// head group) to finish merges them in the kernel (merge_in_block), or merge_states_kernel runs
// after the grid, as the decode kernel's merge kernel does. The states' values are arbitrary
// finite numbers; only their traffic and order matter.
constexpr int kStateDim = 128;     // head_dim 128, as the cases: a float4 of each row a lane
constexpr int kMergeMaxSplits = 8;  // the splits merge_in_block holds in one round trip

template <int ROWS>
__device__ inline void store_state(float* partial_out, float* partial_lse, long long column_rows,
                                   int split, long long row0, u32 acc) {
  const int lane = threadIdx.x & 31;
  const float value = static_cast<float>(acc & 0xffu) * (1.0f / 256.0f);
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
    float4* dst = reinterpret_cast<float4*>(partial_out + (split * column_rows + row0 + q) * kStateDim) + lane;
    *dst = make_float4(value, value, value, value);
  }
  if (lane < ROWS) partial_lse[split * column_rows + row0 + lane] = value;
}

__device__ inline void store_bf16x4(u16* dst, float4 v) {
  dst[0] = static_cast<u16>(__float_as_uint(v.x) >> 16);
  dst[1] = static_cast<u16>(__float_as_uint(v.y) >> 16);
  dst[2] = static_cast<u16>(__float_as_uint(v.z) >> 16);
  dst[3] = static_cast<u16>(__float_as_uint(v.w) >> 16);
}

// This warp merges the `splits` (at most kMergeMaxSplits) states of rows [row0, + ROWS) in one
// round trip: every split's LSEs (a lane per (row, split)) and this lane's columns of every
// split's outputs are loaded at once.
template <int ROWS>
__device__ void merge_in_block(const float* partial_out, const float* partial_lse,
                               long long column_rows, int splits, long long row0, u16* out) {
  static_assert(ROWS * kMergeMaxSplits == 32, "a lane per (row, split)");
  const int lane = threadIdx.x & 31;
  const int lane_row = lane / kMergeMaxSplits, lane_split = lane % kMergeMaxSplits;
  const float lse = lane_split < splits
                        ? __ldcg(partial_lse + lane_split * column_rows + row0 + lane_row)
                        : -__int_as_float(0x7f800000);
  float4 v[ROWS][kMergeMaxSplits];
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
#pragma unroll
    for (int s = 0; s < kMergeMaxSplits; ++s) {
      if (s < splits) {
        v[q][s] = __ldcg(reinterpret_cast<const float4*>(partial_out + (s * column_rows + row0 + q) * kStateDim) + lane);
      }
    }
  }
  // The LSEs of a row sit in kMergeMaxSplits neighbouring lanes.
  float m = lse;
#pragma unroll
  for (int off = kMergeMaxSplits / 2; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  const float e = lane_split < splits ? __expf(lse - m) : 0.f;
  float total = e;
#pragma unroll
  for (int off = kMergeMaxSplits / 2; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
  const float weight = e / total;
#pragma unroll
  for (int q = 0; q < ROWS; ++q) {
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int s = 0; s < kMergeMaxSplits; ++s) {
      const float w = __shfl_sync(0xffffffffu, weight, q * kMergeMaxSplits + s);
      if (s < splits) {
        sum.x += w * v[q][s].x;
        sum.y += w * v[q][s].y;
        sum.z += w * v[q][s].z;
        sum.w += w * v[q][s].w;
      }
    }
    store_bf16x4(out + (row0 + q) * kStateDim + lane * 4, sum);
  }
}

// head_warps with one warp a head (WARPS == GROUP), each warp storing its head's state; with
// IN_KERNEL the last block of each (sequence, head group) to finish, found by a counter, merges
// the splits (merge_in_block: no kernel launch after the grid, no wait on blocks of other
// columns; at most kMergeMaxSplits splits). `counters` (batch * heads / GROUP, zeroed) are left
// at zero by the block that merges. Without IN_KERNEL, merge_states_kernel follows.
template <int WARPS, int STAGES, int GROUP, int ROWS, bool IN_KERNEL>
__global__ void __launch_bounds__(WARPS * 32)
    head_warps_merged(const u16* pool, const int* frames, long long frame_elems, int heads,
                      int page_size, int head_dim, int tokens, int pages, int splits,
                      float* partial_out, float* partial_lse, int* counters, u16* out, u32* result) {
  static_assert(WARPS == GROUP, "one warp a KV head");
  const Case c{pool, frames, frame_elems, heads, page_size, head_dim, tokens, pages, splits};
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int ticket;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const BlockRange r = block_range(c, kTile, false);  // r.b: sequence * groups + group
  const int groups = heads / GROUP, split = blockIdx.x % splits;
  const int b = r.b / groups, h = (r.b % groups) * GROUP + warp;
  unsigned char* ring = smem + warp * STAGES * 2 * (kTile * c.head_dim * 2);
  const u32 acc = stream_tiles<STAGES>(
      c, b, h, r.hi - r.lo, kTile, ring, lane, 32, [&](int i) { return (r.lo + i) * kTile; },
      [] { __syncwarp(); });
  const long long column_rows = static_cast<long long>(gridDim.x / splits) * GROUP * ROWS;
  const long long row0 = (static_cast<long long>(b) * heads + h) * ROWS;
  store_state<ROWS>(partial_out, partial_lse, column_rows, split, row0, acc);
  if (acc == 0x9e3779b9u) result[0] = acc;
  if (!IN_KERNEL) return;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) ticket = atomicAdd(counters + r.b, 1);
  __syncthreads();
  if (ticket != splits - 1) return;
  if (threadIdx.x == 0) counters[r.b] = 0;
  __threadfence();
  merge_in_block<ROWS>(partial_out, partial_lse, column_rows, splits, row0, out);
}

// per_warp, then one state a block (its split of its column), stored by its first warp (the
// decode kernel merges its warps' states in shared memory first, which is not modelled), for
// merge_states_kernel to merge.
template <int WARPS, int STAGES, int ROWS>
__global__ void __launch_bounds__(WARPS * 32)
    per_warp_stored(const u16* pool, const int* frames, long long frame_elems, int heads,
                    int page_size, int head_dim, int tokens, int pages, int splits,
                    float* partial_out, float* partial_lse, u32* result) {
  const Case c{pool, frames, frame_elems, heads, page_size, head_dim, tokens, pages, splits};
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const BlockRange r = block_range(c, kTile);
  unsigned char* ring = smem + warp * STAGES * 2 * (kTile * c.head_dim * 2);
  const u32 acc = stream_tiles<STAGES>(
      c, r.b, r.h, turns(r.hi - r.lo, warp, WARPS), kTile, ring, lane, 32,
      [&](int i) { return (r.lo + warp + i * WARPS) * kTile; }, [] { __syncwarp(); });
  __syncthreads();
  if (warp == 0) {
    const long long column_rows = static_cast<long long>(gridDim.x / splits) * ROWS;
    store_state<ROWS>(partial_out, partial_lse, column_rows, blockIdx.x % splits,
                      static_cast<long long>(blockIdx.x / splits) * ROWS, acc);
  }
  if (acc == 0x9e3779b9u) result[0] = acc;
}

// The merge kernel of a split grid, in one round trip: a block of kMergeWarps warps per row;
// lane s of each warp loads the LSEs of splits s, s + 32, ..., and warp w this lane's columns of
// splits w, w + kMergeWarps, ..., all at once (up to PER_WARP splits a warp, so that the
// registers, and with them the blocks a multiprocessor holds, follow the splits); weights and
// sums follow from registers, and the warps' sums meet in shared memory. Cheaper than the decode
// kernel's merge, which loads 8 splits a warp ahead and the rest one by one, where a row has
// many splits; it is the cheapest merge kernel known, so the rows it ends are floors.
constexpr int kMergeWarps = 8;

template <int PER_WARP>
__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_states_kernel(const float* partial_out, const float* partial_lse, int splits,
                        long long rows, u16* out) {
  constexpr int kLse = (PER_WARP * kMergeWarps + 31) / 32, kPerWarp = PER_WARP;
  static_assert(32 % kMergeWarps == 0, "split w + kMergeWarps j sits in lse[j * kMergeWarps / 32]");
  __shared__ float4 sums[kMergeWarps][32];
  const long long row = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const float neg_inf = -__int_as_float(0x7f800000);
  float lse[kLse];
#pragma unroll
  for (int j = 0; j < kLse; ++j) {
    const int s = lane + 32 * j;
    lse[j] = s < splits ? __ldcg(partial_lse + s * rows + row) : neg_inf;
  }
  float4 v[kPerWarp];
#pragma unroll
  for (int j = 0; j < kPerWarp; ++j) {
    const int s = warp + kMergeWarps * j;
    if (s < splits) v[j] = __ldcg(reinterpret_cast<const float4*>(partial_out + (s * rows + row) * kStateDim) + lane);
  }
  float m = neg_inf;
#pragma unroll
  for (int j = 0; j < kLse; ++j) m = fmaxf(m, lse[j]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  float total = 0.f;
#pragma unroll
  for (int j = 0; j < kLse; ++j) total += __expf(lse[j] - m);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
  const float merged = m + __logf(total);
  float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int j = 0; j < kPerWarp; ++j) {
    const int s = warp + kMergeWarps * j;  // the same in every lane
    if (s < splits) {
      const float w = __expf(__shfl_sync(0xffffffffu, lse[j * kMergeWarps / 32], s % 32) - merged);
      sum.x += w * v[j].x;
      sum.y += w * v[j].y;
      sum.z += w * v[j].z;
      sum.w += w * v[j].w;
    }
  }
  sums[warp][lane] = sum;
  __syncthreads();
  if (warp == 0) {
    for (int w = 1; w < kMergeWarps; ++w) {
      sum.x += sums[w][lane].x;
      sum.y += sums[w][lane].y;
      sum.z += sums[w][lane].z;
      sum.w += sums[w][lane].w;
    }
    store_bf16x4(out + row * kStateDim + lane * 4, sum);
  }
}

// atomicAdd(address, 1) whose result is only waited for where it is used (as the decode
// kernel's atomic_increment): an increment with wrap-around below the largest limit.
__device__ inline int atomic_increment(int* address) {
  unsigned old;
  asm volatile("atom.global.inc.u32 %0, [%1], 0x7fffffff;\n" : "=r"(old) : "l"(address) : "memory");
  return static_cast<int>(old);
}

constexpr int kUnitTiles = 2;  // tiles per claim, as the decode kernel's unsplit columns

// As stream_tiles for one warp, for tiles not known in advance: `next()` hands out the next
// tile as {column, first token} (column -1 once there is none, after which it is not called).
template <int STAGES, typename Next>
__device__ u32 stream_handed_tiles(const Case& c, unsigned char* ring, Next next) {
  const int lane = threadIdx.x & 31;
  const int tile_bytes = kTile * c.head_dim * 2;
  int issued = 0;
  bool ended = false;
  auto issue = [&]() {
    if (!ended) {
      const int2 tile = next();
      if (tile.x < 0) {
        ended = true;
      } else {
        unsigned char* dst = ring + (issued % STAGES) * 2 * tile_bytes;
        for (int part = 0; part < 2; ++part) {
          const u16* src = row_address(c, tile.x / c.heads, tile.x % c.heads, tile.y, part);
          for (int x = lane; x < tile_bytes / 16; x += 32) {
            cp_async_16(smem_u32(dst + part * tile_bytes + x * 16), src + x * 8);
          }
        }
        ++issued;
      }
    }
    commit();
  };
  u32 acc = 0;
  for (int i = 0; i < STAGES - 1; ++i) issue();
  for (int i = 0; i < issued; ++i) {  // each turn may hand out one tile more
    issue();
    wait_groups<STAGES - 1>();
    __syncwarp();
    const unsigned char* tile = ring + (i % STAGES) * 2 * tile_bytes;
    acc ^= reinterpret_cast<const u32*>(tile)[lane] ^
           reinterpret_cast<const u32*>(tile + tile_bytes)[lane];
    __syncwarp();
  }
  return acc;
}

// per_warp with a claimed tail: the last tail_share / 64 of each column's tiles are claimed,
// kUnitTiles at a time, once a warp's static tiles (warp, warp + WARPS, ... of its split of the
// rest) are done; each claim is issued a unit ahead of its use. Without POOLED a column's tail
// is claimed by the warps of its own blocks from its own counter (counters[column]), as the
// decode kernel does (which takes claims only where each warp has 32 tiles or more; here every
// column claims); with POOLED every column's tail is one pool (counters[0]) that any warp
// of the grid claims from, so the multiprocessors that stream fastest read more of it: the
// floor of keys handed across columns. Every warp ends with one claim past the pool; the claim
// that returns the last such value sets its counter back to zero for the next launch.
template <int WARPS, int STAGES, bool POOLED>
__global__ void __launch_bounds__(WARPS * 32)
    per_warp_claims(const u16* pool, const int* frames, long long frame_elems, int heads,
                    int page_size, int head_dim, int tokens, int pages, int splits, int tail_share,
                    int* counters, u32* result) {
  const Case c{pool, frames, frame_elems, heads, page_size, head_dim, tokens, pages, splits};
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int column = blockIdx.x / splits, split = blockIdx.x % splits;
  const int columns = gridDim.x / splits;
  const int tiles = tokens / kTile;
  const int pool_n = static_cast<int>(static_cast<long long>(tiles) * tail_share / 64);
  const int pool_lo = tiles - pool_n;
  const int lo = static_cast<int>(static_cast<long long>(pool_lo) * split / splits);
  const int hi = static_cast<int>(static_cast<long long>(pool_lo) * (split + 1) / splits);
  const int count = turns(hi - lo, warp, WARPS);
  const int column_units = (pool_n + kUnitTiles - 1) / kUnitTiles;
  int* const counter = POOLED ? counters : counters + column;
  const int units = POOLED ? column_units * columns : column_units;
  const int claimers = (POOLED ? static_cast<int>(gridDim.x) : splits) * WARPS;
  int claimed = 0;  // lane 0: the claim in flight
  int x = 0, unit_column = 0, unit_next = 0, unit_left = 0;
  auto claim = [&]() {
    if (lane == 0) claimed = atomic_increment(counter);
  };
  if (count <= kUnitTiles) claim();
  auto next = [&]() -> int2 {
    if (x < count) {
      if (x == count - 1 - kUnitTiles) claim();
      return make_int2(column, (lo + warp + (x++) * WARPS) * kTile);
    }
    if (unit_left == 0) {
      const int u = __shfl_sync(0xffffffffu, claimed, 0);
      if (u >= units) {
        if (lane == 0 && u == units + claimers - 1) atomicExch(counter, 0);
        return make_int2(-1, 0);
      }
      unit_column = POOLED ? u % columns : column;
      unit_next = pool_lo + (POOLED ? u / columns : u) * kUnitTiles;
      unit_left = min(kUnitTiles, tiles - unit_next);
      claim();
    }
    --unit_left;
    return make_int2(unit_column, (unit_next++) * kTile);
  };
  unsigned char* ring = smem + warp * STAGES * 2 * (kTile * c.head_dim * 2);
  const u32 acc = stream_handed_tiles<STAGES>(c, ring, next);
  if (acc == 0x9e3779b9u) result[0] = acc;
}
