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

// The decode kernel's pattern: each of WARPS warps runs its own STAGES-deep pipeline of tiles
// warp, warp + WARPS, ... of the block's split.
template <int WARPS, int STAGES>
__global__ void __launch_bounds__(WARPS * 32)
    per_warp(const u16* pool, const int* frames, long long frame_elems, int heads, int page_size,
             int head_dim, int tokens, int pages, int splits, u32* result) {
  const Case c{pool, frames, frame_elems, heads, page_size, head_dim, tokens, pages, splits};
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int col = blockIdx.x / c.splits, split = blockIdx.x % c.splits;
  const int b = col / c.heads, h = col % c.heads;
  const int tiles = c.tokens / kTile;
  const int lo = static_cast<int>(static_cast<long long>(tiles) * split / c.splits);
  const int hi = static_cast<int>(static_cast<long long>(tiles) * (split + 1) / c.splits);
  const int count = hi - lo > warp ? (hi - lo - warp + WARPS - 1) / WARPS : 0;
  const int tile_bytes = kTile * c.head_dim * 2;
  unsigned char* mine = smem + warp * STAGES * 2 * tile_bytes;
  auto issue = [&](int i) {
    if (i < count) {
      const int t = (lo + warp + i * WARPS) * kTile;
      unsigned char* dst = mine + (i % STAGES) * 2 * tile_bytes;
      for (int part = 0; part < 2; ++part) {
        const u16* src = row_address(c, b, h, t, part);
        for (int x = lane; x < tile_bytes / 16; x += 32) {
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
    __syncwarp();
    const unsigned char* tile = mine + (i % STAGES) * 2 * tile_bytes;
    acc ^= reinterpret_cast<const u32*>(tile)[lane] ^
           reinterpret_cast<const u32*>(tile + tile_bytes)[lane];
    __syncwarp();
  }
  if (acc == 0x9e3779b9u) result[0] = acc;
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
  const int col = blockIdx.x / c.splits, split = blockIdx.x % c.splits;
  const int b = col / c.heads, h = col % c.heads;
  const int tiles = c.tokens / TOKENS;
  const int lo = static_cast<int>(static_cast<long long>(tiles) * split / c.splits);
  const int hi = static_cast<int>(static_cast<long long>(tiles) * (split + 1) / c.splits);
  const int count = hi - lo;
  const int tile_bytes = TOKENS * c.head_dim * 2;
  auto issue = [&](int i) {
    if (i < count) {
      unsigned char* dst = smem + (i % STAGES) * 2 * tile_bytes;
      for (int part = 0; part < 2; ++part) {
        const u16* src = row_address(c, b, h, (lo + i) * TOKENS, part);  // one page per tile
        for (int x = threadIdx.x; x < tile_bytes / 16; x += 128) {
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
    __syncthreads();
    const unsigned char* tile = smem + (i % STAGES) * 2 * tile_bytes;
    acc ^= reinterpret_cast<const u32*>(tile)[threadIdx.x] ^
           reinterpret_cast<const u32*>(tile + tile_bytes)[threadIdx.x];
    __syncthreads();
  }
  if (acc == 0x9e3779b9u) result[0] = acc;
}
