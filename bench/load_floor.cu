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
