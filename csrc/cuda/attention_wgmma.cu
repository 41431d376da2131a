// Hopper prefill: paged attention with warpgroup matrix multiplies (wgmma, sm_90a).
//
// A block of two warpgroups owns 128 query rows of one (sequence, KV head) (the row mapping,
// key segments, page resolution, faults, masks and telemetry are attention_device.cuh's, shared
// with the mma.sync kernel). Warpgroup w holds rows 64 w .. 64 w + 63; its four warps hold 16
// rows each in the accumulator layout of m16n8, so the online softmax is the shared one.
//
// Per key tile j (128 keys), each warpgroup issues S_j = Q K_j^T (Q and K from shared memory)
// and then O += P_{j-1} V_{j-1} (P from registers, V from shared memory, read transposed), and
// runs the softmax of S_j while the second product is still in flight: the tensor cores and the
// exponentials overlap. Every thread copies tiles with cp.async into three K and three V
// buffers, K two tiles ahead and V one (V_{j-1} is still read while V_{j+1} arrives).
#include "cuda/attention_wgmma.h"

#include <cstdlib>
#include <cstring>

#include "cuda/attention_device.cuh"
#include "cuda/wgmma.cuh"

namespace paged_kv::cuda {
namespace {

using namespace detail;

template <int D_>
struct WgmmaConfig {
  static constexpr int D = D_, KT = kWgmmaKeyTile, MW = 1;
  static constexpr int kRows = kWgmmaRows;
  static constexpr int kWarpgroups = kRows / 64;
  static constexpr int kThreads = kWarpgroups * 128;
  static constexpr int kChunks = D / 8;
  static constexpr int kLoaders = kThreads;
  static constexpr int kBuffers = 3;  // of K, and of V
  static constexpr int kQueryBytes = kRows * D * 2;
  static constexpr int kTileBytes = KT * D * 2;
  // 1024 bytes of slack to align the tiles for the 128-byte swizzle; four barriers per buffer.
  static constexpr int kSmemBytes = 1024 + kQueryBytes + 2 * kBuffers * kTileBytes + 4 * kBuffers * 8;
  static_assert(D == 64 || D == 128, "the accumulators of larger heads do not fit in registers");
  __device__ static uint32_t tile_offset(int row, int chunk) { return sw128_offset<KT>(row, chunk); }
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    paged_attention_wgmma_kernel(const __grid_constant__ Params p) {
#if PKV_WGMMA
  constexpr int D = Cfg::D, KT = Cfg::KT, NT = KT / 8, C = Cfg::kChunks;
  constexpr int kRows = Cfg::kRows;
  extern __shared__ unsigned char smem[];
  // The swizzle is applied to address bits, so every tile starts 1024-byte aligned.
  const uint32_t sq = (smem_u32(smem) + 1023u) & ~1023u;
  const uint32_t sk = sq + Cfg::kQueryBytes;                       // K buffer i: + i * kTileBytes
  const uint32_t sv = sk + Cfg::kBuffers * Cfg::kTileBytes;  // V buffer i: + i * kTileBytes
  wait_for_prior_grid();
  BlockScope s;
  if (!make_scope<Cfg>(p, s)) return;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wg = warp >> 2;
  const int g = lane >> 2;
  const int group = static_cast<int>(p.pr.group);

  int pos[1][2];
  bool newest[1][2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = s.row_base + warp * 16 + g + 8 * h;
    const bool live = r < s.total_rows;
    pos[0][h] = live ? s.kv_len - s.q_len + r / group : -1;
    newest[0][h] = live && r / group == s.q_len - 1;
  }

  // Queries into shared memory, in the same group as the first K tile.
  const T* query = static_cast<const T*>(p.pr.query);
  for (int idx = threadIdx.x; idx < kRows * C; idx += Cfg::kThreads) {
    const int r = idx / C, c = idx % C;
    const int rr = s.row_base + r;
    const T* src = rr < s.total_rows
                       ? query + static_cast<int64_t>(s.q_start + rr / group) * p.pr.query_token_stride +
                             static_cast<int64_t>(s.kv_head * group + rr % group) * p.pr.query_head_stride +
                             c * 8
                       : query;
    cp_async_16(sq + sw128_offset<kRows>(r, c), src, rr < s.total_rows);
  }

  WarpState<Cfg> st;
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj)
#pragma unroll
    for (int e = 0; e < 4; ++e) st.o[0][dj][e] = 0.f;
  st.m[0][0] = st.m[0][1] = -INFINITY;
  st.l[0][0] = st.l[0][1] = 0.f;
  float(&o_acc)[D / 2] = reinterpret_cast<float(&)[D / 2]>(st.o[0]);

  const int count = s.n1 + s.n2;
  const bool may_record = warp == 0;  // every warp resolves the pages; one records faults
  const int loader = threadIdx.x;
  auto k_buffer = [&](int t) { return sk + (t % Cfg::kBuffers) * Cfg::kTileBytes; };
  auto v_buffer = [&](int t) { return sv + (t % Cfg::kBuffers) * Cfg::kTileBytes; };

  // Barriers per buffer: "full" (the tile's copies landed; each warp arrives once its threads'
  // copies are complete and fenced) and "empty" (each warp arrives once its warpgroup's
  // multiplies no longer read the buffer). Tile t uses buffer t % 3 for the (t / 3)-th time,
  // so its phase parity is (t / 3) & 1.
  const uint32_t bars = sv + Cfg::kBuffers * Cfg::kTileBytes;
  auto k_full = [&](int t) { return bars + 8 * (t % Cfg::kBuffers); };
  auto v_full = [&](int t) { return bars + 8 * (Cfg::kBuffers + t % Cfg::kBuffers); };
  auto k_empty = [&](int t) { return bars + 8 * (2 * Cfg::kBuffers + t % Cfg::kBuffers); };
  auto v_empty = [&](int t) { return bars + 8 * (3 * Cfg::kBuffers + t % Cfg::kBuffers); };
  auto parity = [](int t) { return static_cast<uint32_t>((t / Cfg::kBuffers) & 1); };
  constexpr int kWarps = Cfg::kThreads / 32;
  if (threadIdx.x < 4 * Cfg::kBuffers) mbarrier_init(bars + 8 * threadIdx.x, kWarps);
  __syncthreads();
  // Every thread's copies of the oldest groups but `newest` are complete: fence them for the
  // multiplies (async proxy) and let one lane per warp arrive on each barrier in `full`.
  auto publish = [&](uint32_t full_a, bool a, uint32_t full_b, bool b) {
    fence_async_shared();
    __syncwarp();
    if (lane == 0) {
      if (a) mbarrier_arrive(full_a);
      if (b) mbarrier_arrive(full_b);
    }
  };
  auto release = [&](uint32_t empty) {
    __syncwarp();
    if (lane == 0) mbarrier_arrive(empty);
  };

  // K runs two tiles ahead and V one: the end of iteration j copies K_{j+2} and V_{j+1}, each
  // its own commit group, and publishes K_{j+1} and V_j (committed one iteration earlier).
  // Tile t's pages are resolved once, with its K, and kept for its V; masks[i] is the read
  // mask of tile j + i.
  uint32_t masks[3] = {0, 0, 0};
  TilePages<T> v_pages{nullptr, 0};  // the pages of tile j + 1
  TilePages<T> pages0{nullptr, 0};
  if (count > 0) {
    pages0 = resolve_tile<T, Cfg>(p, s, 0, may_record, read_tile_pte<Cfg>(p, s, 0));
    copy_tile_part<T, Cfg>(p, s, 0, pages0, 0, k_buffer(0), loader);
    masks[0] = pages0.read_mask;
  }
  cp_async_commit();  // Q and K_0
  if (count > 1) {
    v_pages = resolve_tile<T, Cfg>(p, s, 1, may_record, read_tile_pte<Cfg>(p, s, 1));
    copy_tile_part<T, Cfg>(p, s, 1, v_pages, 0, k_buffer(1), loader);
    masks[1] = v_pages.read_mask;
  }
  cp_async_commit();  // K_1
  if (count > 0) copy_tile_part<T, Cfg>(p, s, 0, pages0, 1, v_buffer(0), loader);
  cp_async_commit();  // V_0
  cp_async_wait<2>();
  publish(k_full(0), count > 0, 0, false);
  int32_t pte_ahead = count > 2 ? read_tile_pte<Cfg>(p, s, 2) : kPteUnmapped;

  // wgmma descriptors. Q and K are K-major (eight-row groups 1024 bytes apart; 16 elements
  // along the head dimension are 32 bytes inside the swizzle atom, the next 64 columns a block
  // of rows x 128 bytes further). V is MN-major: 16 keys are 16 rows (2048 bytes), its 64-column
  // blocks KT x 128 bytes apart.
  auto q_desc = [&](int kk) {
    return wgmma_desc(sq + (kk >> 2) * (kRows * 128) + wg * (64 * 128) + (kk & 3) * 32, 16, 1024);
  };
  auto k_desc = [&](uint32_t buffer, int kk) {
    return wgmma_desc(buffer + (kk >> 2) * (KT * 128) + (kk & 3) * 32, 16, 1024);
  };
  auto v_desc = [&](uint32_t buffer, int kk) {
    return wgmma_desc(buffer + kk * (16 * 128), KT * 128, 1024);
  };

  // Ping-pong: the warpgroups take turns issuing their multiplies (named barrier 1 + w gates
  // warpgroup w), so one warpgroup's softmax runs while the other's multiplies occupy the
  // tensor cores. Warpgroup 1 lets warpgroup 0 go first.
  if (wg == 1 && count > 0) named_barrier_arrive(1, Cfg::kThreads);

  float sc[1][NT][4];
  float(&s_acc)[NT * 4] = reinterpret_cast<float(&)[NT * 4]>(sc[0]);
  uint32_t pa[KT / 16][4];  // P of the previous tile, as A fragments
  // Iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} (j > 0); the last P V follows the
  // loop. (The multiplies stay unconditional inside the loop, so the compiler keeps them
  // asynchronous.)
  for (int j = 0; j < count; ++j) {
    named_barrier_sync(1 + wg, Cfg::kThreads);
    mbarrier_wait(k_full(j), parity(j));
    if (j > 0) mbarrier_wait(v_full(j - 1), parity(j - 1));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wgmma_ss<KT, T>(s_acc, q_desc(kk), k_desc(k_buffer(j), kk), kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    if (j > 0) {
#pragma unroll
      for (int kk = 0; kk < KT / 16; ++kk) {
        wgmma_rs_tb<D, T>(o_acc, pa[kk], v_desc(v_buffer(j - 1), kk), 1);
      }
    }
    wgmma_commit();
    named_barrier_arrive(1 + (wg ^ 1), Cfg::kThreads);

    wgmma_wait<1>();  // S_j is done; P_{j-1} V_{j-1} may still run
    pin_registers(s_acc);
    release(k_empty(j));
    float alphas[1][2];
    softmax_tile<Cfg>(p, s, tile_start<KT>(s, j), masks[0], pos, newest, warp, sc, st, alphas);
    wgmma_wait<0>();
    pin_registers(o_acc);
    if (j > 0) release(v_empty(j - 1));
    rescale_output<Cfg>(st, alphas);
#pragma unroll
    for (int kk = 0; kk < KT / 16; ++kk) {
      pa[kk][0] = pack2<T>(sc[0][2 * kk][0], sc[0][2 * kk][1]);
      pa[kk][1] = pack2<T>(sc[0][2 * kk][2], sc[0][2 * kk][3]);
      pa[kk][2] = pack2<T>(sc[0][2 * kk + 1][0], sc[0][2 * kk + 1][1]);
      pa[kk][3] = pack2<T>(sc[0][2 * kk + 1][2], sc[0][2 * kk + 1][3]);
    }

    // Copies: K_{j+2} into the buffer of K_{j-1}, V_{j+1} into that of V_{j-2}, once both
    // warpgroups released them.
    if (j + 2 < count) {
      if (j + 2 >= Cfg::kBuffers) mbarrier_wait(k_empty(j + 2), parity(j + 2) ^ 1u);
      const TilePages<T> pages = resolve_tile<T, Cfg>(p, s, j + 2, may_record, pte_ahead);
      copy_tile_part<T, Cfg>(p, s, j + 2, pages, 0, k_buffer(j + 2), loader);
      masks[2] = pages.read_mask;
      if (j + 3 < count) pte_ahead = read_tile_pte<Cfg>(p, s, j + 3);
      cp_async_commit();
      if (j + 1 >= Cfg::kBuffers) mbarrier_wait(v_empty(j + 1), parity(j + 1) ^ 1u);
      copy_tile_part<T, Cfg>(p, s, j + 1, v_pages, 1, v_buffer(j + 1), loader);
      v_pages = pages;
    } else {
      cp_async_commit();
      if (j + 1 < count) {
        if (j + 1 >= Cfg::kBuffers) mbarrier_wait(v_empty(j + 1), parity(j + 1) ^ 1u);
        copy_tile_part<T, Cfg>(p, s, j + 1, v_pages, 1, v_buffer(j + 1), loader);
      }
    }
    cp_async_commit();
    cp_async_wait<2>();
    publish(k_full(j + 1), j + 1 < count, v_full(j), true);
    masks[0] = masks[1];
    masks[1] = masks[2];
  }
  if (count > 0) {
    named_barrier_sync(1 + wg, Cfg::kThreads);
    mbarrier_wait(v_full(count - 1), parity(count - 1));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KT / 16; ++kk) {
      wgmma_rs_tb<D, T>(o_acc, pa[kk], v_desc(v_buffer(count - 1), kk), 1);
    }
    wgmma_commit();
    if (wg == 0) named_barrier_arrive(2, Cfg::kThreads);
    wgmma_wait<0>();
    pin_registers(o_acc);
  }
  cp_async_wait<0>();
  allow_dependent_grid();  // the split merge may launch; it waits for this grid to finish

  finish_state<Cfg>(p, st);
  store_rows<T, Cfg>(p, s, st, pos, warp);
#else
  __trap();  // never launched: the host checks the architecture first
#endif
}

template <typename T, int D>
int configure() {
  static int cache[kMaxDevices] = {};
  using Cfg = WgmmaConfig<D>;
  return blocks_per_sm(paged_attention_wgmma_kernel<T, Cfg>, Cfg::kThreads, Cfg::kSmemBytes, cache);
}

template <typename T, int D>
int launch(const Params& params, dim3 grid, cudaStream_t stream) {
  using Cfg = WgmmaConfig<D>;
  if (configure<T, D>() == 0) return launch_config_error();
  return static_cast<int>(launch_dependent(paged_attention_wgmma_kernel<T, Cfg>, grid,
                                           dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, params));
}

// Whether the current device is compute capability 9.0 (cached per device).
bool device_is_sm90() {
  static int known[kMaxDevices] = {};  // 0 unknown, 1 yes, 2 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device < kMaxDevices && known[device] != 0) return known[device] == 1;
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  const bool yes = major == 9 && minor == 0;
  if (device < kMaxDevices) known[device] = yes ? 1 : 2;
  return yes;
}

}  // namespace

bool wgmma_prefill_applies(const AttentionProblem& pr) {
#if defined(PKV_HAS_SM90A)
  const int64_t d = pr.geometry.head_dim;
  if (d != 64 && d != 128) return false;
  const char* choice = std::getenv("PAGED_KV_PREFILL_KERNEL");
  if (choice != nullptr && std::strcmp(choice, "mma") == 0) return false;
  return device_is_sm90();
#else
  (void)pr;
  return false;
#endif
}

int wgmma_prefill_blocks_per_sm(const AttentionProblem& pr) {
  if (pr.geometry.head_dim == 64) return pr.bf16 ? configure<__nv_bfloat16, 64>() : configure<__half, 64>();
  return pr.bf16 ? configure<__nv_bfloat16, 128>() : configure<__half, 128>();
}

int launch_wgmma_prefill(const Params& params, dim3 grid, cudaStream_t stream) {
  const AttentionProblem& pr = params.pr;
  if (pr.geometry.head_dim == 64) {
    return pr.bf16 ? launch<__nv_bfloat16, 64>(params, grid, stream)
                   : launch<__half, 64>(params, grid, stream);
  }
  return pr.bf16 ? launch<__nv_bfloat16, 128>(params, grid, stream)
                 : launch<__half, 128>(params, grid, stream);
}

}  // namespace paged_kv::cuda
