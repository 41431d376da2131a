// Paged attention on tensor cores (mma.sync m16n8k16), with the residency check and fault
// queue inside the kernel: decode everywhere, prefill where the Hopper kernel
// (attention_wgmma.cu) does not apply. The shared device code and its notes are in
// attention_device.cuh.
#include "cuda/attention_device.cuh"
#include "cuda/attention_keys_as_m.cuh"

#include <algorithm>
#include <type_traits>

#include "cuda/attention_wgmma.h"

namespace paged_kv::cuda {
namespace {

using namespace detail;

// ---------------------------------------------------------------------------------------------
// Kernel configuration.

// D: head_dim. WM x WN warps: WM split the rows, WN split the key tiles (each with its own
// pipeline). MW: 16-row MMA tiles per warp. KT: tokens per key tile. STAGES: pipeline depth.
// KEYS_AS_M: decode blocks of 8 rows whose tile math puts the keys on the MMA's M side
// (attention_keys_as_m.cuh). SEVERAL_COLUMNS: each block attends columns blockIdx.x,
// blockIdx.x + gridDim.x, ... (see plan_grid_columns).
template <int D_, int WM_, int WN_, int MW_, int KT_, int STAGES_, bool KEYS_AS_M = false,
          bool SEVERAL_COLUMNS = false>
struct Config {
  static constexpr int D = D_, WM = WM_, WN = WN_, MW = MW_, KT = KT_, STAGES = STAGES_;
  static constexpr bool kKeysAsM = KEYS_AS_M;
  static_assert(!KEYS_AS_M || (WM == 1 && MW == 1 && WN > 1), "keys as M: decode blocks only");
  static constexpr bool kSeveralColumns = SEVERAL_COLUMNS;
  static_assert(!SEVERAL_COLUMNS || WN > 1, "several columns: decode blocks only");
  static constexpr int kRows = KEYS_AS_M ? 8 : WM * MW * 16;
  static constexpr int kThreads = WM * WN * 32;
  // Blocks of 384 threads or more must keep to the registers of one block per multiprocessor
  // (170 a thread at 384); 0 leaves the choice to the compiler.
  static constexpr int kMinBlocks = kThreads >= 384 ? 1 : 0;
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
  // Decode (WN > 1) prefetches page-table entries: a ring of STAGES entries per warp, each with
  // room for a tile's pages (pages hold at least 16 tokens).
  static constexpr int kMaxTilePages = WN > 1 ? KT / 16 : 0;
  static constexpr int kPteRingOffset = kPageMaskOffset + STAGES * WN * 4;
  static constexpr int kSmemBytes = kPteRingOffset + STAGES * WN * kMaxTilePages * 4;
  static_assert((2 * KT * kChunks) % kLoaders == 0, "loads must split evenly over loaders");
  static_assert(KT % 16 == 0 && D % 16 == 0 && D >= 64, "tile shapes");
  // Whole tiles copied without per-row predicates (copy_tile_part). Decode only: the mma.sync
  // prefill block runs at the register limit, and the second copy path made it spill.
  static constexpr bool kUnpredicatedCopies = WN > 1;
  // Rows before the window that no query row sees are zero-filled (copy_tile_part). Decode only:
  // exact for a block of one query token, where a prefill block's rows see different keys.
  static constexpr bool kZeroFillBeforeWindow = WN > 1;
  static constexpr bool kHoistAddressTerms = WN > 1 && D <= 128;  // see BlockScope
  static constexpr bool kFastDivisions = WN > 1;                  // see quotient()
  // Decode blocks (warps with their own pipelines) may claim the tail (Params::tile_claims).
  static constexpr bool kClaimsTail = WN > 1;
  // Tiles are [rows][D], each row's 16-byte chunks XOR-swizzled by the row so that ldmatrix
  // (8 rows, same column) is free of bank conflicts.
  static constexpr int kRowBytes = D * 2;
  __device__ static uint32_t tile_offset(int row, int chunk) {
    return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
  }
};

template <int D>
using DecodeConfig = Config<D, 1, 4, 1, (D == 64 ? 32 : 16), (D == 256 ? 2 : 3)>;
// The wide decode block: one block per multiprocessor, fewer key splits than the 4-warp block
// (splits planned for two per multiprocessor), so each split's state covers more keys and the
// merge reads fewer partial states. Measured on an H200 (bf16, 8 KV heads, head_dim 128) with 8
// warps of 3 stages against two 4-warp blocks: 3% faster at 32K tokens and 1% at 128K, but 1.3
// to 1.6% slower at 1M, where the 4-warp grid's 264 blocks keep all 132 multiprocessors busy and
// the 8-warp grid's 128 blocks leave 4 idle. The 8-warp stages of head_dim 256 do not fit in
// shared memory; 64 was not measured.
template <int D>
using WideDecodeConfig = Config<D, 1, 8, 1, (D == 64 ? 32 : 16), (D == 256 ? 2 : 3)>;
constexpr int64_t kWideDecodeMaxTokens = 128 * 1024;
// The same blocks for at most 8 rows (one query token and a group of at most 8), with the keys
// on the MMA's M side. At head_dim 128 and 256 they run 2 stages, and the wide block (head_dim
// 128) 12 warps: with one tile in flight per warp instead of two, and more warps per
// multiprocessor where that frees shared memory, the decode loop ends sooner. Same-machine A/B
// on an H200 (bf16, 8 KV heads, pages of 256 / 16), time over SDPA's against 4-warp and 8-warp
// blocks of 3 stages: 32K 1.077 to 1.043 / 1.089 to 1.055, 128K 1.003 to 0.986 / 1.007 to
// 0.984, batch 32 at 8K 1.015 to 1.005 / 1.027 to 1.008. A wide block of 14 warps (capped at 128
// registers, spilling) was slower at 32K (1.090), 5 or 6 warps per 2-stage block no better at
// batch 32. Again with the claimed tail: 6-warp blocks, two per multiprocessor, planned where one
// wave of them holds the grid (168 registers, as here), built and timed between two builds of
// these (H200, five interleaved rounds each): batch 32 1.003 / 1.009 against 1.001 and 1.002 /
// 1.003 and 1.005, 1M 0.979 / 0.986 against 0.977 and 0.978 / 0.985; not kept.
template <int D>
using DecodeKeysAsMConfig = Config<D, 1, 4, 1, (D == 64 ? 32 : 16), (D == 64 ? 3 : 2), true>;
template <int D>
using WideDecodeKeysAsMConfig = Config<D, 1, 12, 1, (D == 64 ? 32 : 16), 2, true>;
// DecodeKeysAsMConfig for grids of more columns than fit at once (plan_grid_columns). A kernel
// of its own, so that the one-column kernels keep their code (with the column loop in them the
// 4-warp and 12-warp blocks took 3 registers fewer and 32K decode was 0.4 to 0.7% slower).
template <int D>
using DecodeColumnsConfig = Config<D, 1, 4, 1, (D == 64 ? 32 : 16), (D == 64 ? 3 : 2), true, true>;

template <int D>
using PrefillConfig = Config<D, 4, 1, (D == 256 ? 1 : 2), (D == 256 ? 32 : 64), 2>;

// Shared-memory offsets of this lane's ldmatrix fragments within a K or V tile, for chunk
// columns 2j + bit (j < 4) of row block 0. Column 2j + 8m of any row lies 128 m bytes further
// (the swizzle XORs only the low three chunk bits with the row) and row block n 16 n rows
// further, so every fragment of a tile is one of these plus a constant. Decode computes them
// once per block; recomputing the swizzle took three instructions per ldmatrix.
struct FragmentOffsets {
  uint32_t k[4], v[4];
};

template <typename Cfg>
__device__ inline FragmentOffsets fragment_offsets() {
  const int lane = threadIdx.x & 31;
  FragmentOffsets f;
  const int k_row = ((lane >> 4) << 3) + (lane & 7), k_bit = (lane >> 3) & 1;
  const int v_row = (lane & 7) + (((lane >> 3) & 1) << 3), v_bit = lane >> 4;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f.k[j] = Cfg::tile_offset(k_row, 2 * j + k_bit);
    f.v[j] = Cfg::tile_offset(v_row, 2 * j + v_bit);
  }
  return f;
}

// One key tile: S = Q K^T, mask, online softmax, O += P V. `q_regs` holds the query fragments
// when Cfg::kQueryInRegisters, else `sq` the query tile. `pos[mi][h]` is the position of row
// g (h = 0) or g + 8 (h = 1) of MMA tile mi, -1 for rows past the block's queries.
template <typename T, typename Cfg>
__device__ void attend_tile(const Params& p, const BlockScope& s, int k, const T* sq,
                            const uint32_t (&q_regs)[Cfg::kQueryInRegisters ? Cfg::D / 16 : 1][4],
                            const T* sk, const T* sv, uint32_t read_mask, const int (&pos)[Cfg::MW][2],
                            const bool (&newest)[Cfg::MW][2], int warp_m, const FragmentOffsets& frag,
                            WarpState<Cfg>& st) {
  constexpr int KT = Cfg::KT, D = Cfg::D, MW = Cfg::MW, NT = KT / 8;
  const int lane = threadIdx.x & 31;
  const int t0 = tile_start<KT>(s, k);

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
        ldmatrix_x4(qa[buf][mi], q_smem + Cfg::tile_offset(row, kk * 2 + (lane >> 4)));
      }
    }
  };
  auto load_k = [&](int step) {
    const int kk = step / kNN, nn = step % kNN;
    if constexpr (Cfg::kQueryInRegisters) {
      ldmatrix_x4(kb[step & 1], k_smem + frag.k[kk & 3] + (kk >> 2) * 128 + nn * 16 * Cfg::kRowBytes);
    } else {
      const int row = nn * 16 + ((lane >> 4) << 3) + (lane & 7);
      ldmatrix_x4(kb[step & 1], k_smem + Cfg::tile_offset(row, kk * 2 + ((lane >> 3) & 1)));
    }
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

  float alphas[MW][2];
  softmax_tile<Cfg>(p, s, t0, read_mask, pos, newest, warp_m, sc, st, alphas);
  rescale_output<Cfg>(st, alphas);

  // O += P V, P taken from the score registers (the C layout of two n8 tiles is the A layout).
  const uint32_t v_smem = smem_u32(sv);
  uint32_t pa[MW][4];
  uint32_t vb[2][4];
  auto load_v = [&](int kk, int dd, int buf) {
    if constexpr (Cfg::kQueryInRegisters) {
      ldmatrix_x4_trans(vb[buf], v_smem + frag.v[dd & 3] + (dd >> 2) * 128 + kk * 16 * Cfg::kRowBytes);
    } else {
      const int row = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
      ldmatrix_x4_trans(vb[buf], v_smem + Cfg::tile_offset(row, dd * 2 + (lane >> 4)));
    }
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


// One block column: a (sequence, KV head, query tile) and the block's split of its keys.
template <typename T, typename Cfg>
__device__ __forceinline__ void attend_column(const Params& p, int column, unsigned char* smem) {
  constexpr int D = Cfg::D, MW = Cfg::MW, KT = Cfg::KT, STAGES = Cfg::STAGES, WN = Cfg::WN;
  constexpr int C = Cfg::kChunks;
  BlockScope s;
  if (!make_scope<Cfg>(p, s, column)) return;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_m = warp % Cfg::WM, warp_n = warp / Cfg::WM;
  const int g = lane >> 2, t = lane & 3;
  T* sq = reinterpret_cast<T*>(smem);
  T* pipeline = reinterpret_cast<T*>(smem + Cfg::kQueryBytes);
  uint32_t* page_masks = reinterpret_cast<uint32_t*>(smem + Cfg::kPageMaskOffset);
  int32_t* pte_ring = reinterpret_cast<int32_t*>(smem + Cfg::kPteRingOffset);
  auto k_tile = [&](int stage, int slot) {
    return pipeline + (static_cast<int64_t>(stage) * 2 * WN + slot) * KT * D;
  };
  auto v_tile = [&](int stage, int slot) {
    return pipeline + (static_cast<int64_t>(stage) * 2 * WN + WN + slot) * KT * D;
  };

  // The tiles this thread's loader group visits: k = k0 + first, k0 + first + WN, ... (its
  // static share), then in a decode block with a claimed tail, tiles claimed one at a time.
  const int num_tiles = s.n1 + s.n2;
  const int first = WN > 1 ? warp_n : 0;
  const int count = num_tiles > first ? (num_tiles - first + WN - 1) / WN : 0;
  // Decode tiles within one page (the usual case) take the lean path (load_page_tile). Tiles of
  // at most the smallest page size always lie within one page.
  const bool one_page = Cfg::KT <= kPageSizes[0] || Cfg::KT <= p.pr.geometry.page_size;
  // Decode: the PTEs of the first static tiles are read before anything else, so that their
  // round trip, which the first tiles' copies wait for, overlaps the set-up below (the queries'
  // loads, the claims) instead of following it.
  int32_t first_ptes[STAGES - 1];
  if constexpr (WN > 1) {
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      first_ptes[i] = i >= count  ? kPteUnmapped
                      : one_page ? read_page_pte<Cfg>(p, s, s.k0 + first + i * WN)
                                 : read_tile_pte<Cfg>(p, s, s.k0 + first + i * WN);
    }
  }

  // Row positions (-1 past the block's queries) and which rows are the newest query's: rows g
  // and g + 8 of each MMA tile, or with the keys as M, rows 2t and 2t + 1.
  int pos[MW][2];
  bool newest[MW][2];
#pragma unroll
  for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = s.row_base + (Cfg::kKeysAsM ? 2 * t + h : (warp_m * MW + mi) * 16 + g + 8 * h);
      const bool live = r < s.total_rows;
      const int token = quotient<Cfg>(p.group_div, r);
      pos[mi][h] = live ? s.kv_len - s.q_len + token : -1;
      newest[mi][h] = live && token == s.q_len - 1;
    }
  }

  // Queries: straight into fragments (decode) or into shared memory (prefill).
  const T* query = static_cast<const T*>(p.pr.query);
  auto query_row = [&](int r) { return query_row_address<Cfg, T>(p, s, r); };
  uint32_t q_regs[Cfg::kQueryInRegisters && !Cfg::kKeysAsM ? D / 16 : 1][4];
  uint32_t q_cols[Cfg::kKeysAsM ? D / 16 : 1][2];  // row g's query as Q^T's B fragments
  if constexpr (Cfg::kKeysAsM) {
    const T* r0 = query_row(g);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int c0 = kk * 16 + 2 * t, c1 = c0 + 8;
      q_cols[kk][0] = r0 ? *reinterpret_cast<const uint32_t*>(r0 + c0) : 0u;
      q_cols[kk][1] = r0 ? *reinterpret_cast<const uint32_t*>(r0 + c1) : 0u;
    }
  } else if constexpr (Cfg::kQueryInRegisters) {
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
      cp_async_16(smem_u32(sq) + Cfg::tile_offset(r, c), src ? src + c * 8 : query, src != nullptr);
    }
  }

  std::conditional_t<Cfg::kKeysAsM, ColumnState<Cfg>, WarpState<Cfg>> st;
  if constexpr (Cfg::kKeysAsM) {
    init_state(st);
  } else {
#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
      for (int dj = 0; dj < D / 8; ++dj)
#pragma unroll
        for (int e = 0; e < 4; ++e) st.o[mi][dj][e] = 0.f;
      st.m[mi][0] = st.m[mi][1] = -INFINITY;
      st.l[mi][0] = st.l[mi][1] = 0.f;
    }
  }

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

  // The claimed tail (decode, see BlockScope::pool_lo): after its static tiles each warp claims
  // pool tiles from the (sequence, KV head)'s counter until the pool is spent, so every
  // multiprocessor finishes at about the same time. A claim is one unit: claim_tiles tiles,
  // except the pool's last `claimers` tiles (one per claiming warp), claimed one at a time so
  // that the warps end evenly. Under full HBM load an atomic takes about as long as a tile, so
  // each claim is issued a unit ahead of its use. Every warp ends with one claim past the pool;
  // the claim that returns the last of those values is the last use of the counter in this
  // grid, so its warp sets the counter back to zero for the next launch. Units are 2 tiles where
  // only one block's warps share a counter (no splits), 4 where the warps of every split do,
  // whose atomics on the one address queue behind each other. H200, time over SDPA's, units of
  // 2 against 4, two machines: batch 32 0.9962 against 0.9988 and 0.9944 against 0.9977 (pages
  // of 16 1.0017 against 1.0049 and 1.0043 against 1.0025, fastest calls 243.4 and 243.2 us
  // against 243.6 and 243.7); with splits, 1M 1.0048 against 0.9965, 128K 0.9883 against 0.9837.
  // Units of 1 were no better (batch 32 0.9980).
  const int claim_tiles = p.num_splits == 1 ? 2 : 4;
  const bool claims_tail = Cfg::kClaimsTail && p.tile_claims != nullptr && s.pool_n > 0;
  int* const counter = claims_tail ? p.tile_claims + column : nullptr;
  const int claimers = static_cast<int>(p.num_splits) * WN;
  const int wide_units = max(0, s.pool_n - claimers) / claim_tiles;
  const int units = wide_units + (s.pool_n - wide_units * claim_tiles);
  int claimed = 0;                // lane 0: the value of the claim in flight
  int batch = 0, batch_left = 0;  // the claimed tiles not yet visited
  auto claim = [&]() {
    if (lane == 0) claimed = atomic_increment(counter);
  };
  if (claims_tail && count <= claim_tiles) claim();
  // Tile k of visited index x, -1 past the last (called for x = 0, 1, 2, ... in order, and
  // never again after a -1).
  auto tile_k = [&](int x) -> int {
    if (x < count) {
      if (claims_tail && x == count - 1 - claim_tiles) claim();
      return s.k0 + first + x * WN;
    }
    if (!claims_tail) return -1;
    if (batch_left == 0) {
      const int u = __shfl_sync(0xffffffffu, claimed, 0);
      if (u >= units) {
        if (lane == 0 && u == units + claimers - 1) atomicExch(counter, 0);
        return -1;
      }
      const bool wide = u < wide_units;
      batch = wide ? u * claim_tiles : u + wide_units * (claim_tiles - 1);
      batch_left = wide ? claim_tiles : 1;
      claim();
    }
    --batch_left;
    return s.pool_lo + batch++;
  };

  FragmentOffsets frag{};
  if constexpr (Cfg::kKeysAsM) {
    keys_as_m_offsets<Cfg>(frag.k, frag.v);
  } else if constexpr (Cfg::kQueryInRegisters) {
    frag = fragment_offsets<Cfg>();
  }
  auto attend = [&](int k, int stage) {
    if constexpr (Cfg::kKeysAsM) {
      attend_tile_keys_as_m<T, Cfg>(p, s, k, q_cols, k_tile(stage, slot), v_tile(stage, slot),
                                    page_masks[stage * WN + slot], pos[0], newest[0], frag.k,
                                    frag.v, st);
    } else {
      attend_tile<T, Cfg>(p, s, k, sq, q_regs, k_tile(stage, slot), v_tile(stage, slot),
                          page_masks[stage * WN + slot], pos, newest, warp_m, frag, st);
    }
  };
  // Tile it sits in pipeline stage it % STAGES (and, in decode, PTE ring entry it % STAGES);
  // the indices rotate instead of being divided out each tile.
  int stage = 0, next_stage = STAGES - 1;
  if constexpr (WN > 1) {
    // Decode (warps own tiles, little math per tile): visited tile i of this warp has its PTEs
    // copied into ring entry i % STAGES with the cp.async group of tile i - (STAGES - 1), so
    // they have arrived when the wait before its own load returns. Reading the page table a
    // whole pipeline ahead keeps its latency off the warp's critical path. Tiles are known
    // kAhead visits ahead: ks[j] is the tile of visit it + j (-1 past the last).
    constexpr int kAhead = 2 * (STAGES - 1);
    int ks[kAhead];
#pragma unroll
    for (int j = 0; j < kAhead; ++j) ks[j] = j == 0 || ks[j - 1] >= 0 ? tile_k(j) : -1;
    auto pte_entry = [&](int entry) {
      return pte_ring + (entry * WN + slot) * Cfg::kMaxTilePages;
    };
    auto load = [&](int tile, int at, int32_t pte) {
      const uint32_t mask =
          one_page ? load_page_tile<T, Cfg>(p, s, tile, k_tile(at, slot), v_tile(at, slot), loader,
                                            may_record, pte)
                   : load_tile<T, Cfg>(p, s, tile, k_tile(at, slot), v_tile(at, slot), loader,
                                       may_record, pte);
      if (loader == 0) page_masks[at * WN + slot] = mask;
    };
    auto prefetch_pte = [&](int tile, int entry) {
      if (one_page) {
        prefetch_page_pte<Cfg>(p, s, tile, pte_entry(entry));
      } else {
        prefetch_tile_pte<Cfg>(p, s, tile, pte_entry(entry));
      }
    };
    // A first tile that is claimed, not static (a warp without static tiles), has its PTE read
    // once its claim returns.
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      if (i >= count && ks[i] >= 0) {
        first_ptes[i] =
            one_page ? read_page_pte<Cfg>(p, s, ks[i]) : read_tile_pte<Cfg>(p, s, ks[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      if (ks[i] >= 0) load(ks[i], i, first_ptes[i]);
      if (ks[i + STAGES - 1] >= 0) prefetch_pte(ks[i + STAGES - 1], (i + STAGES - 1) % STAGES);
      cp_async_commit();
    }
    const int tile_pages = one_page ? 1 : Cfg::KT / static_cast<int>(p.pr.geometry.page_size);
    for (int it = 0; ks[0] >= 0; ++it) {
      cp_async_wait<STAGES - 2>();
      sync_loaders();
      const int k = ks[0];
      if (ks[STAGES - 1] >= 0) {
        // One page: every lane reads the entry lane 0 copied (the wait and sync above order it).
        const int32_t pte = one_page              ? pte_entry(next_stage)[0]
                            : lane < tile_pages ? pte_entry(next_stage)[lane]
                                                : kPteUnmapped;
        load(ks[STAGES - 1], next_stage, pte);
      }
      // The tile kAhead visits on; its PTEs go into the entry the tile before `next` has
      // finished with.
      const int ahead = ks[kAhead - 1] >= 0 ? tile_k(it + kAhead) : -1;
#pragma unroll
      for (int j = 0; j + 1 < kAhead; ++j) ks[j] = ks[j + 1];
      ks[kAhead - 1] = ahead;
      if (ahead >= 0) prefetch_pte(ahead, next_stage == 0 ? STAGES - 1 : next_stage - 1);
      cp_async_commit();
      attend(k, stage);
      stage = stage + 1 == STAGES ? 0 : stage + 1;
      next_stage = next_stage + 1 == STAGES ? 0 : next_stage + 1;
    }
  } else {
    // Prefill (a block shares each tile, much math per tile): each warp reads the next tile's
    // PTE one tile ahead, which keeps registers free. The first tiles' PTEs are read together.
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      first_ptes[i] = i < count ? read_tile_pte<Cfg>(p, s, i) : kPteUnmapped;
    }
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      if (i < count) {
        const uint32_t mask = load_tile<T, Cfg>(p, s, i, k_tile(i, slot), v_tile(i, slot), loader,
                                                may_record, first_ptes[i]);
        if (loader == 0) page_masks[i * WN + slot] = mask;
      }
      cp_async_commit();
    }
    int32_t pte_ahead = STAGES - 1 < count ? read_tile_pte<Cfg>(p, s, STAGES - 1) : kPteUnmapped;
    for (int it = 0; it < count; ++it) {
      cp_async_wait<STAGES - 2>();
      sync_loaders();
      const int next = it + STAGES - 1;
      if (next < count) {
        const uint32_t mask = load_tile<T, Cfg>(p, s, next, k_tile(next_stage, slot),
                                                v_tile(next_stage, slot), loader, may_record,
                                                pte_ahead);
        if (loader == 0) page_masks[next_stage * WN + slot] = mask;
        if (next + 1 < count) pte_ahead = read_tile_pte<Cfg>(p, s, next + 1);
      }
      cp_async_commit();
      attend(it, stage);
      stage = stage + 1 == STAGES ? 0 : stage + 1;
      next_stage = next_stage + 1 == STAGES ? 0 : next_stage + 1;
    }
  }
  cp_async_wait<0>();
  allow_dependent_grid();  // the split merge may launch; it waits for this grid to finish

  finish_state<Cfg>(p, st);

  if constexpr (WN == 1) {
    store_rows<T, Cfg>(p, s, st, pos, warp_m);
  } else {
    // Merge the WN warps' states of the same rows through shared memory (the pipeline's space).
    __syncthreads();
    float* merge_o = reinterpret_cast<float*>(pipeline);  // [WN][rows][D]
    float* merge_m = merge_o + WN * Cfg::kRows * D;       // [WN][rows]
    float* merge_l = merge_m + WN * Cfg::kRows;
    if constexpr (Cfg::kKeysAsM) {
      write_merge_rows<Cfg>(s, st, merge_o + warp_n * Cfg::kRows * D, merge_m + warp_n * Cfg::kRows,
                            merge_l + warp_n * Cfg::kRows);
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = g + 8 * h;  // MW == 1, WM == 1
        if (s.row_base + row >= s.total_rows) continue;  // no query: never read below
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
      // 0 when no warp saw a key; NaN (carried by l) when one saw a NaN score.
      const float inv = l_all != 0.f ? 1.f / l_all : 0.f;
      store_pair<T, Cfg>(p, s, row, d, o0 * inv, o1 * inv);
      if (d == 0) store_lse<Cfg>(p, s, row, l_all != 0.f ? (m_all + log2f(l_all)) * kLn2 : -INFINITY);
    }
  }
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    paged_attention_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  wait_for_prior_grid();
  if constexpr (Cfg::kSeveralColumns) {
    // The barrier keeps the next column's set-up off shared memory that slower warps of this
    // one still read.
    for (int column = blockIdx.x; column < p.columns; column += gridDim.x) {
      if (column != static_cast<int>(blockIdx.x)) __syncthreads();
      attend_column<T, Cfg>(p, column, smem);
    }
  } else {
    attend_column<T, Cfg>(p, static_cast<int>(blockIdx.x), smem);
  }
}

// Merges the splits' partial states of each (query, head) into the output: one block of
// kCombineWarps warps per row. Warp w sums the weighted outputs of splits w, w + kCombineWarps,
// ... (each lane owns D / 32 columns). The outputs of its first kCombineAhead splits are loaded
// together with the LSEs, before the weights are known, so a short merge is one memory round
// trip. Every warp computes the merged LSE (lanes over splits); the warps' sums meet in shared
// memory.
constexpr int kCombineWarps = 4;
constexpr int kCombineAhead = 8;

// fmaxf passes over NaN, but a split's NaN LSE (a NaN score) must reach the merged one.
__device__ __forceinline__ float max_keeping_nan(float a, float b) {
  return (a != a || b != b) ? NAN : fmaxf(a, b);
}

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
  float ahead[kCombineAhead][kPerLane];
#pragma unroll
  for (int j = 0; j < kCombineAhead; ++j) {
    const int64_t sp = warp + j * kCombineWarps;
    if (sp >= num_splits) break;
    const float* src = partial_out + (sp * rows + row) * D + lane * kPerLane;
#pragma unroll
    for (int i = 0; i < kPerLane; i += 2) {
      const float2 v = *reinterpret_cast<const float2*>(src + i);
      ahead[j][i] = v.x;
      ahead[j][i + 1] = v.y;
    }
  }
  const float lane_lse = lane < num_splits ? partial_lse[lane * rows + row] : -INFINITY;
  float m = lane_lse;
  for (int64_t sp = lane + 32; sp < num_splits; sp += 32) m = max_keeping_nan(m, partial_lse[sp * rows + row]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = max_keeping_nan(m, __shfl_xor_sync(0xffffffffu, m, off));
  float sum = 0.f;
  if (m != -INFINITY) {
    sum = __expf(lane_lse - m);
    for (int64_t sp = lane + 32; sp < num_splits; sp += 32) sum += __expf(partial_lse[sp * rows + row] - m);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float total = m == -INFINITY ? -INFINITY : m + __logf(sum);

  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
  if (total != -INFINITY) {
    // An empty split (LSE -inf) never wrote its output: what was loaded ahead for it is skipped,
    // never multiplied by a zero weight.
#pragma unroll
    for (int j = 0; j < kCombineAhead; ++j) {
      const int64_t sp = warp + j * kCombineWarps;
      if (sp >= num_splits) break;
      const float l = sp < 32 ? __shfl_sync(0xffffffffu, lane_lse, static_cast<int>(sp))
                              : partial_lse[sp * rows + row];
      if (l == -INFINITY) continue;
      const float w = __expf(l - total);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] += w * ahead[j][i];
    }
#pragma unroll 4
    for (int64_t sp = warp + kCombineAhead * kCombineWarps; sp < num_splits; sp += kCombineWarps) {
      const float l = partial_lse[sp * rows + row];
      if (l == -INFINITY) continue;
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
    if (!(total > -INFINITY)) continue;  // no key seen, or a NaN softmax: no mass to count
    const float* chunks = p.chunk_lse + (b * pr.num_q_heads + h) * p.max_chunks +
                          static_cast<int64_t>(page) * per_page;
    for (int c = 0; c < per_page; ++c) mass += __expf(chunks[c] - total);
  }
  if (mass > 0.f) atomicAdd(telemetry + row * max_pages + page, mass);
}

template <typename T, typename Cfg>
int configure_kernel() {
  static int cache[kMaxDevices] = {};
  return blocks_per_sm(paged_attention_kernel<T, Cfg>, Cfg::kThreads, Cfg::kSmemBytes, cache);
}

template <typename T, typename Cfg>
int launch_main(const Params& params, dim3 grid, cudaStream_t stream) {
  if (configure_kernel<T, Cfg>() == 0) return launch_config_error();
  return static_cast<int>(launch_dependent(paged_attention_kernel<T, Cfg>, grid,
                                           dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, params));
}

template <int D>
bool is_decode(const AttentionProblem& pr) {
  return pr.max_query_len * pr.group <= DecodeConfig<D>::kRows;
}

// Sequences are known on the device only, so the choice goes by the page table's capacity.
// Only where the (sequence, KV head) columns alone leave multiprocessors idle: a grid of more
// columns runs 4-warp blocks, two or three per multiprocessor (batch 32 at 8K tokens on an
// H200, 3-stage blocks: 246.1 against 247.5 us for the 8-warp block, 244.7 against 248.0 with
// the claimed tail).
template <int D>
bool uses_wide_decode(const AttentionProblem& pr, int num_sms) {
  return D == 128 && is_decode<D>(pr) &&
         pr.table.max_pages * pr.geometry.page_size <= kWideDecodeMaxTokens &&
         pr.batch * pr.geometry.num_kv_heads < num_sms;
}

template <typename T, int D>
int launch_typed(const Params& params, const AttentionPlan& plan, cudaStream_t stream) {
  const AttentionProblem& pr = params.pr;
  const dim3 grid(static_cast<unsigned>(plan.grid_columns), static_cast<unsigned>(plan.num_splits));
  int status;
  if (plan.wide_decode) {
    if constexpr (D == 128) {
      status = plan.keys_as_m ? launch_main<T, WideDecodeKeysAsMConfig<D>>(params, grid, stream)
                              : launch_main<T, WideDecodeConfig<D>>(params, grid, stream);
    } else {
      status = static_cast<int>(cudaErrorInvalidValue);
    }
  } else if (is_decode<D>(pr)) {
    if (plan.keys_as_m && plan.grid_columns < params.columns) {
      status = launch_main<T, DecodeColumnsConfig<D>>(params, grid, stream);
    } else {
      status = plan.keys_as_m ? launch_main<T, DecodeKeysAsMConfig<D>>(params, grid, stream)
                              : launch_main<T, DecodeConfig<D>>(params, grid, stream);
    }
  } else if (wgmma_prefill_applies(pr)) {
    status = launch_wgmma_prefill(params, grid, stream);
  } else {
    status = launch_main<T, PrefillConfig<D>>(params, grid, stream);
  }
  if (status != static_cast<int>(cudaSuccess)) return status;
  const int64_t rows = pr.total_queries * pr.num_q_heads;
  if (plan.num_splits == 1 || rows == 0) return status;
  return static_cast<int>(launch_dependent(
      combine_splits_kernel<T, D>, dim3(static_cast<unsigned>(rows)), dim3(kCombineWarps * 32), 0,
      stream, static_cast<const float*>(params.partial_out),
      static_cast<const float*>(params.partial_lse), plan.num_splits, rows,
      static_cast<T*>(params.out), params.lse));
}

// Query tiles, telemetry chunks and key splits for a kernel of `rows` query rows per block,
// `key_tile` keys per tile and `per_sm` resident blocks per multiprocessor.
void plan_with(const AttentionProblem& pr, int num_sms, int rows, int key_tile, int per_sm,
               AttentionPlan& plan) {
  plan.query_tiles = (pr.max_query_len * pr.group + rows - 1) / rows;
  plan.columns = pr.batch * pr.geometry.num_kv_heads * plan.query_tiles;
  plan.grid_columns = plan.columns;
  plan.chunk_tokens = std::min<int64_t>(pr.geometry.page_size, key_tile);
  const int64_t max_tokens = pr.table.max_pages * pr.geometry.page_size;
  plan.max_chunks = max_tokens / plan.chunk_tokens;
  // Split the keys when the blocks alone would not fill one wave of the GPU (flash decoding):
  // one full wave of long splits keeps the per-block start-up cost small. The sequence length
  // is only known on the device, so the split count is sized by the page table's capacity; a
  // split past a shorter sequence's end is an empty state.
  const int64_t wave = static_cast<int64_t>(num_sms) * std::max(1, per_sm);
  const int64_t align = std::max<int64_t>(pr.geometry.page_size, key_tile);
  const int64_t min_split_tokens = std::max<int64_t>(align, 512);
  const int64_t max_splits = std::max<int64_t>(1, max_tokens / min_split_tokens);
  const int64_t splits = plan.columns >= wave ? 1 : wave / std::max<int64_t>(plan.columns, 1);
  plan.num_splits = std::max<int64_t>(1, std::min<int64_t>({splits, max_splits, 65535}));
}

// Decode splits are sized for at most two blocks per multiprocessor: the 2-stage 4-warp block
// fits three, but 49 splits at 1M tokens were slower than 33 (H200, time over SDPA's: 0.9997 to
// 0.9969 with pages of 256, 1.0085 to 1.0044 with pages of 16).
constexpr int kDecodeBlocksPerSmPlanned = 2;

template <typename Cfg>
void plan_with(const AttentionProblem& pr, int num_sms, AttentionPlan& plan) {
  const int resident = configure_kernel<__nv_bfloat16, Cfg>();
  plan_with(pr, num_sms, Cfg::kRows, Cfg::KT,
            Cfg::WN > 1 ? std::min(resident, kDecodeBlocksPerSmPlanned) : resident, plan);
}

// A decode grid of more columns than fit on the GPU at once runs in waves, the last one partial:
// batch 64 at 4K tokens (512 columns of 8 KV heads where 396 4-warp blocks fit on an H200) took
// 1.05 to 1.11 times SDPA's time on four machines. Instead each block attends
// ceil(columns / resident) columns in turn, in one wave. Same-machine A/B (H200, pages of 16 /
// 256, time over SDPA's): batch 64 at 4K 1.068 / 1.053 to 1.019 / 1.005, batch 96 at 4K 1.013 /
// 1.004 to 1.011 / 0.999, batch 192 at 2K 1.018 / 1.002 to 1.016 / 1.003, batch 128 at 2K 1.022
// / 1.007 to 1.029 / 1.014 (on another machine, with two blocks per multiprocessor, 1.090 /
// 1.089 to 1.054 / 1.035). A block's columns each start with dependent round trips, so past
// kMaxColumnsPerBlock the waves are kept (batch 256 at 1K: 6 columns a block took 1.036 / 1.023
// against 1.016 / 1.010).
constexpr int64_t kMaxColumnsPerBlock = 4;

template <typename Cfg>
void plan_grid_columns(const AttentionProblem& pr, int num_sms, AttentionPlan& plan) {
  static_assert(Cfg::kSeveralColumns, "a block of one column cannot take several");
  const int64_t resident = static_cast<int64_t>(num_sms) * configure_kernel<__nv_bfloat16, Cfg>();
  if (plan.num_splits > 1 || resident <= 0 || plan.columns <= resident) return;
  const int64_t per_block = (plan.columns + resident - 1) / resident;
  if (per_block > kMaxColumnsPerBlock) return;
  plan.grid_columns = (plan.columns + per_block - 1) / per_block;
}

template <int D>
void plan_for(const AttentionProblem& pr, int num_sms, AttentionPlan& plan) {
  plan.wide_decode = uses_wide_decode<D>(pr, num_sms);
  plan.keys_as_m = is_decode<D>(pr) && pr.max_query_len * pr.group <= 8;
  if (plan.wide_decode) {
    if constexpr (D == 128) {
      if (plan.keys_as_m) {
        plan_with<WideDecodeKeysAsMConfig<D>>(pr, num_sms, plan);
      } else {
        plan_with<WideDecodeConfig<D>>(pr, num_sms, plan);
      }
    }
  } else if (is_decode<D>(pr)) {
    if (plan.keys_as_m) {
      plan_with<DecodeKeysAsMConfig<D>>(pr, num_sms, plan);
      plan_grid_columns<DecodeColumnsConfig<D>>(pr, num_sms, plan);
    } else {
      plan_with<DecodeConfig<D>>(pr, num_sms, plan);
    }
  } else if (wgmma_prefill_applies(pr)) {
    plan_with(pr, num_sms, kWgmmaRows, kWgmmaKeyTile, wgmma_prefill_blocks_per_sm(pr), plan);
  } else {
    plan_with<PrefillConfig<D>>(pr, num_sms, plan);
  }
  // The claimed tail needs the decode blocks' own pipelines and a window-free key range. Without
  // splits the warps of each block share their column's tail (batch 32 at 8K tokens on an H200:
  // 246.1 to 244.7 us).
  if (is_decode<D>(pr) && pr.window == 0) {
    plan.claim_counters = plan.columns;
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
                     float* partial_out, float* partial_lse, float* chunk_lse, int* tile_claims,
                     float* telemetry, OpError* error, void* stream_handle) {
  if (pr.batch == 0 || pr.total_queries == 0) return static_cast<int>(cudaSuccess);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  int page_shift = 0;
  while ((int64_t{1} << page_shift) < pr.geometry.page_size) ++page_shift;
  Params params{pr,  page_shift,  plan.query_tiles, plan.num_splits, plan.chunk_tokens,
                plan.max_chunks, out, lse, partial_out, partial_lse, chunk_lse, error,
                plan.claim_counters > 0 ? tile_claims : nullptr};
  params.batch_div = FastDivisor(pr.batch);
  params.kv_heads_div = FastDivisor(pr.geometry.num_kv_heads);
  params.group_div = FastDivisor(pr.group);
  params.splits_div = FastDivisor(plan.num_splits);
  params.columns = static_cast<int>(plan.columns);
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
