// Hopper prefill: paged attention with warpgroup matrix multiplies (wgmma, sm_90a).
//
// A block of two consumer warpgroups owns 128 query rows of one (sequence, KV head) (the row
// mapping, key segments, page resolution, faults, masks and telemetry are attention_device.cuh's,
// shared with the mma.sync kernel). Warpgroup w holds rows 64 w .. 64 w + 63; its four warps
// hold 16 rows each in the accumulator layout of m16n8, so the online softmax is the shared one.
//
// Per key tile j (128 keys), each warpgroup issues S_j = Q K_j^T (Q and K from shared memory)
// and then O += P_{j-1} V_{j-1} (P from registers, V from shared memory, read transposed), and
// runs the softmax of S_j while the second product is still in flight: the tensor cores and the
// exponentials overlap; the two warpgroups take turns issuing (ping-pong), so one's softmax runs
// beside the other's multiplies. A third warpgroup copies the tiles with cp.async into three K
// and three V buffers, handed over through "full" and "empty" barriers, and gives most of its
// registers to the other two.
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
  static constexpr int kConsumerThreads = kRows / 64 * 128;  // a warpgroup per 64 rows
  static constexpr int kThreads = kConsumerThreads + 128;    // and the producer warpgroup
  // Registers per thread after the split. The block starts with 168 per thread (the most that
  // 384 threads may have), and the split must fit in that pool: setmaxnreg.inc waits until the
  // registers it asks for are free, so asking for more than the producer gave up never returns.
  static constexpr int kLaunchRegisters = 168;
  static constexpr int kConsumerRegisters = D == 64 ? 192 : 216;
  static constexpr int kProducerRegisters = D == 64 ? 120 : 72;
  static_assert((kConsumerThreads / 128) * kConsumerRegisters + kProducerRegisters <=
                    (kThreads / 128) * kLaunchRegisters,
                "the register split must fit in the block's allocation");
  static constexpr int kChunks = D / 8;
  static constexpr int kLoaders = 128;  // the producer warpgroup
  static constexpr int kBuffers = 3;  // of K, and of V
  static constexpr int kQueryBytes = kRows * D * 2;
  static constexpr int kTileBytes = KT * D * 2;
  static constexpr int kBarrierBytes = 4 * kBuffers * 8;
  // 1024 bytes of slack to align the tiles for the 128-byte swizzle; the barriers and the
  // read masks of the buffered tiles.
  static constexpr int kSmemBytes =
      1024 + kQueryBytes + 2 * kBuffers * kTileBytes + kBarrierBytes + kBuffers * 4;
  static_assert(D == 64 || D == 128, "the accumulators of larger heads do not fit in registers");
  static constexpr int kRowBytes = 128;  // within a 64-column block
  static constexpr bool kUnpredicatedCopies = true;
  static constexpr bool kZeroFillBeforeWindow = false;  // see copy_tile_part
  static constexpr bool kHoistAddressTerms = false;  // see BlockScope
  static constexpr bool kClaimsTail = false;          // see Params::tile_claims
  static constexpr bool kFastDivisions = false;       // see quotient()
  __device__ static uint32_t tile_offset(int row, int chunk) {
    return sw128_offset<KT>(row, chunk);
  }
};

// Shared-memory addresses of the K and V buffers (after the queries) and of their barriers:
// "full" (the tile's copies landed) and "empty" (no multiply reads the buffer any more). Tile
// t uses buffer t % kBuffers for the (t / kBuffers)-th time, so its phase parity is
// (t / kBuffers) & 1.
template <typename Cfg>
struct Barriers {
  uint32_t base;  // K buffers, then V buffers, then the barriers
  __device__ uint32_t k_buffer(int t) const { return base + (t % Cfg::kBuffers) * Cfg::kTileBytes; }
  __device__ uint32_t v_buffer(int t) const {
    return base + (Cfg::kBuffers + t % Cfg::kBuffers) * Cfg::kTileBytes;
  }
  __device__ uint32_t bars() const { return base + 2 * Cfg::kBuffers * Cfg::kTileBytes; }
  __device__ uint32_t k_full(int t) const { return bars() + 8 * (t % Cfg::kBuffers); }
  __device__ uint32_t v_full(int t) const {
    return bars() + 8 * (Cfg::kBuffers + t % Cfg::kBuffers);
  }
  __device__ uint32_t k_empty(int t) const {
    return bars() + 8 * (2 * Cfg::kBuffers + t % Cfg::kBuffers);
  }
  __device__ uint32_t v_empty(int t) const {
    return bars() + 8 * (3 * Cfg::kBuffers + t % Cfg::kBuffers);
  }
  __device__ static uint32_t parity(int t) {
    return static_cast<uint32_t>((t / Cfg::kBuffers) & 1);
  }
};

// The producer warpgroup: copies the queries and every K and V tile with cp.async (every warp
// resolves each tile's pages; the first records its faults); each thread's copies arrive on the
// tile's "full" barrier when they land. It waits on a buffer's "empty" barrier before refilling
// it.
template <typename T, typename Cfg>
__device__ inline void produce_tiles(const Params& p, const BlockScope& s, int count, uint32_t sq,
                                     const Barriers<Cfg>& b, uint32_t* masks) {
  constexpr int C = Cfg::kChunks, kRows = Cfg::kRows;
  const int loader = threadIdx.x - Cfg::kConsumerThreads;
  const bool first_warp = loader < 32;
  const T* query = static_cast<const T*>(p.pr.query);
  for (int idx = loader; idx < kRows * C; idx += Cfg::kLoaders) {
    const int r = idx / C, c = idx % C;
    const T* row = query_row_address<Cfg, T>(p, s, r);
    cp_async_16(sq + sw128_offset<kRows>(r, c), row ? row + c * 8 : query, row != nullptr);
  }
  int32_t pte = count > 0 ? read_tile_pte<Cfg>(p, s, 0) : kPteUnmapped;
  for (int t = 0; t < count; ++t) {
    if (t >= Cfg::kBuffers) mbarrier_wait(b.k_empty(t), b.parity(t) ^ 1u);
    const TilePages<T> pages = resolve_tile<T, Cfg>(p, s, t, first_warp, pte);
    if (t + 1 < count) pte = read_tile_pte<Cfg>(p, s, t + 1);
    copy_tile_part<T, Cfg>(p, s, t, pages, 0, b.k_buffer(t), loader);
    cp_async_arrive_noinc(b.k_full(t));  // the queries ride with K_0
    if (loader == 0) {
      masks[t % Cfg::kBuffers] = pages.read_mask;
      mbarrier_arrive(b.k_full(t));  // releases the mask
    }
    if (t >= Cfg::kBuffers) mbarrier_wait(b.v_empty(t), b.parity(t) ^ 1u);
    copy_tile_part<T, Cfg>(p, s, t, pages, 1, b.v_buffer(t), loader);
    cp_async_arrive_noinc(b.v_full(t));
  }
  cp_async_wait<0>();
}

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    paged_attention_wgmma_kernel(const __grid_constant__ Params p) {
#if PKV_WGMMA
  constexpr int D = Cfg::D, KT = Cfg::KT, NT = KT / 8;
  constexpr int kRows = Cfg::kRows, kConsumers = Cfg::kConsumerThreads;
  extern __shared__ unsigned char smem[];
  // The swizzle is applied to address bits, so every tile starts 1024-byte aligned.
  const uint32_t sq = (smem_u32(smem) + 1023u) & ~1023u;
  const Barriers<Cfg> b{sq + Cfg::kQueryBytes};
  uint32_t* masks = reinterpret_cast<uint32_t*>(smem + (b.bars() - smem_u32(smem)) +
                                                Cfg::kBarrierBytes);
  wait_for_prior_grid();
  BlockScope s;
  if (!make_scope<Cfg>(p, s, static_cast<int>(blockIdx.x))) return;
  const int count = s.n1 + s.n2;
  if (threadIdx.x < Cfg::kBuffers) {
    // Every producer thread's copies, and (K) the first thread's mask.
    mbarrier_init(b.k_full(threadIdx.x), Cfg::kLoaders + 1);
    mbarrier_init(b.v_full(threadIdx.x), Cfg::kLoaders);
    mbarrier_init(b.k_empty(threadIdx.x), kConsumers / 32);
    mbarrier_init(b.v_empty(threadIdx.x), kConsumers / 32);
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp >= kConsumers / 32) {  // the producer warpgroup
    release_registers<Cfg::kProducerRegisters>();
    produce_tiles<T, Cfg>(p, s, count, sq, b, masks);
    allow_dependent_grid();
    return;
  }
  claim_registers<Cfg::kConsumerRegisters>();

  const int wg = warp >> 2;
  const int g = lane >> 2;
  int pos[1][2];
  bool newest[1][2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = s.row_base + warp * 16 + g + 8 * h;
    const bool live = r < s.total_rows;
    const int token = quotient<Cfg>(p.group_div, r);
    pos[0][h] = live ? s.kv_len - s.q_len + token : -1;
    newest[0][h] = live && token == s.q_len - 1;
  }

  WarpState<Cfg> st;
#pragma unroll
  for (int dj = 0; dj < D / 8; ++dj)
#pragma unroll
    for (int e = 0; e < 4; ++e) st.o[0][dj][e] = 0.f;
  st.m[0][0] = st.m[0][1] = -INFINITY;
  st.l[0][0] = st.l[0][1] = 0.f;
  float(&o_acc)[D / 2] = reinterpret_cast<float(&)[D / 2]>(st.o[0]);

  // Each warp arrives once its warpgroup's multiplies no longer read the buffer.
  auto release = [&](uint32_t empty) {
    __syncwarp();
    if (lane == 0) mbarrier_arrive(empty);
  };

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
  if (wg == 1 && count > 0) named_barrier_arrive(1, kConsumers);

  float sc[1][NT][4];
  float(&s_acc)[NT * 4] = reinterpret_cast<float(&)[NT * 4]>(sc[0]);
  uint32_t pa[KT / 16][4];  // P of the previous tile, as A fragments
  // Iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} (j > 0); the last P V follows the
  // loop. (The multiplies stay unconditional inside the loop, so the compiler keeps them
  // asynchronous.)
  for (int j = 0; j < count; ++j) {
    named_barrier_sync(1 + wg, kConsumers);
    mbarrier_wait(b.k_full(j), b.parity(j));
    if (j > 0) mbarrier_wait(b.v_full(j - 1), b.parity(j - 1));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wgmma_ss<KT, T>(s_acc, q_desc(kk), k_desc(b.k_buffer(j), kk), kk > 0 ? 1 : 0);
    }
    wgmma_commit();
    if (j > 0) {
#pragma unroll
      for (int kk = 0; kk < KT / 16; ++kk) {
        wgmma_rs_tb<D, T>(o_acc, pa[kk], v_desc(b.v_buffer(j - 1), kk), 1);
      }
    }
    wgmma_commit();
    named_barrier_arrive(1 + (wg ^ 1), kConsumers);

    const uint32_t read_mask = masks[j % Cfg::kBuffers];
    wgmma_wait<1>();  // S_j is done; P_{j-1} V_{j-1} may still run
    pin_registers(s_acc);
    release(b.k_empty(j));
    float alphas[1][2];
    softmax_tile<Cfg>(p, s, tile_start<KT>(s, j), read_mask, pos, newest, warp, sc, st, alphas);
    wgmma_wait<0>();
    pin_registers(o_acc);
    if (j > 0) release(b.v_empty(j - 1));
    rescale_output<Cfg>(st, alphas);
#pragma unroll
    for (int kk = 0; kk < KT / 16; ++kk) {
      pa[kk][0] = pack2<T>(sc[0][2 * kk][0], sc[0][2 * kk][1]);
      pa[kk][1] = pack2<T>(sc[0][2 * kk][2], sc[0][2 * kk][3]);
      pa[kk][2] = pack2<T>(sc[0][2 * kk + 1][0], sc[0][2 * kk + 1][1]);
      pa[kk][3] = pack2<T>(sc[0][2 * kk + 1][2], sc[0][2 * kk + 1][3]);
    }
  }
  if (count > 0) {
    named_barrier_sync(1 + wg, kConsumers);
    mbarrier_wait(b.v_full(count - 1), b.parity(count - 1));
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KT / 16; ++kk) {
      wgmma_rs_tb<D, T>(o_acc, pa[kk], v_desc(b.v_buffer(count - 1), kk), 1);
    }
    wgmma_commit();
    if (wg == 0) named_barrier_arrive(2, kConsumers);
    wgmma_wait<0>();
    pin_registers(o_acc);
  }
  allow_dependent_grid();  // the split merge may launch; it waits for this grid to finish

  finish_state<Cfg>(p, st);
  store_rows<T, Cfg>(p, s, st, pos, warp);
#else
  __trap();  // never launched: the host checks the architecture first
#endif
}

// Resident blocks per multiprocessor, or 0 when the kernel cannot run here (a CUDA error, or
// a build whose register count differs from the one the register split assumes).
template <typename T, int D>
int configure() {
  static int cache[kMaxDevices] = {};
  using Cfg = WgmmaConfig<D>;
  static const bool registers_as_assumed = [] {
    cudaFuncAttributes attributes{};
    const cudaError_t e = cudaFuncGetAttributes(&attributes, paged_attention_wgmma_kernel<T, Cfg>);
    return e == cudaSuccess && attributes.numRegs == Cfg::kLaunchRegisters;
  }();
  if (!registers_as_assumed) return 0;
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
  return device_is_sm90() && wgmma_prefill_blocks_per_sm(pr) > 0;
#else
  (void)pr;
  return false;
#endif
}

int wgmma_prefill_blocks_per_sm(const AttentionProblem& pr) {
  if (pr.geometry.head_dim == 64) {
    return pr.bf16 ? configure<__nv_bfloat16, 64>() : configure<__half, 64>();
  }
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
