// Hopper warpgroup matrix multiply (wgmma) primitives: shared-memory descriptors for the
// 128-byte swizzled layout, the fences, and m64nNk16 multiplies with float32 accumulators.
//
// Shared-memory layout of an operand tile with `ROWS` rows of D 16-bit elements: D / 64 blocks
// of ROWS x 128 bytes, each row's eight 16-byte chunks XOR-swizzled by (row % 8); every block
// starts 1024-byte aligned. The same bytes serve as a K-major operand (Q, K: rows are M or N,
// the 128 bytes run along the reduction) and as an MN-major one (V: rows are the reduction,
// the 128 bytes run along N), which the instruction reads transposed.
//
// wgmma exists only on sm_90a; elsewhere these functions trap, and the host never launches a
// kernel that uses them (see PKV_HAS_SM90A).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PKV_WGMMA 1
#else
#define PKV_WGMMA 0
#endif

namespace paged_kv::cuda {

// Byte offset of 16-byte chunk `chunk` (of D / 8) of row `row` in the layout above.
template <int ROWS>
__device__ inline uint32_t sw128_offset(int row, int chunk) {
  return static_cast<uint32_t>((chunk >> 3) * (ROWS * 128) + row * 128 +
                               (((chunk & 7) ^ (row & 7)) << 4));
}

// Matrix descriptor: start address, leading and stride byte offsets (16-byte units), 128-byte
// swizzle. For the K-major operands the stride offset (1024: eight 128-byte rows) steps between
// groups of eight rows and the leading offset is unused; stepping 16 elements along the
// reduction adds 32 bytes to the start address inside the swizzle atom. For the MN-major V the
// leading offset steps between 64-column blocks and the stride offset between groups of eight
// reduction rows.
__device__ inline uint64_t wgmma_desc(uint32_t smem_addr, uint32_t leading_bytes,
                                      uint32_t stride_bytes) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32) | (uint64_t{1} << 62);
}

// Orders this thread's register writes before the next wgmma reads them.
__device__ inline void wgmma_fence() {
#if PKV_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ inline void wgmma_commit() {
#if PKV_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ inline void wgmma_wait() {
#if PKV_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Makes this thread's generic-proxy writes to shared memory (stores, cp.async) visible to the
// async proxy that wgmma reads through; a barrier must follow before another thread's wgmma.
__device__ inline void fence_async_shared() {
#if PKV_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accumulator reads or writes across an asynchronous multiply.
template <int N>
__device__ inline void pin_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Moves registers between warpgroups (all four warps of a warpgroup execute it): a warpgroup
// that needs few gives them up, one that needs many takes them.
template <int N>
__device__ inline void release_registers() {
#if PKV_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ inline void claim_registers() {
#if PKV_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// Shared-memory barriers (mbarrier) of one block, and named barriers between warpgroups.
__device__ inline void mbarrier_init(uint32_t bar, int count) {
#if PKV_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
__device__ inline void mbarrier_arrive(uint32_t bar) {
#if PKV_WGMMA
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
               : "memory");
#endif
}
// Arrives on the barrier once all of this thread's earlier cp.async copies have landed (the
// arrival is counted in the barrier's expected count).
__device__ inline void cp_async_arrive_noinc(uint32_t bar) {
#if PKV_WGMMA
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
#endif
}
// Waits until the phase of parity `parity` of the barrier has completed.
__device__ inline void mbarrier_wait(uint32_t bar, uint32_t parity) {
#if PKV_WGMMA
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
#endif
}
// bar.sync / bar.arrive on named barrier `id` (1..15; 0 is __syncthreads) for `threads` threads.
__device__ inline void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ inline void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// d (+)= A B, A and B both from shared memory, both K-major. `accumulate` 0 overwrites d.
template <int N, typename T>
__device__ inline void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate);
// d (+)= A B, A from registers (the m16n8k16 A fragment of this warp's 16 rows), B from shared
// memory, MN-major (read transposed).
template <int N, typename T>
__device__ inline void wgmma_rs_tb(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b,
                                   int accumulate);

// The specialisations differ only in the element type the instruction names, so each shape is
// written once and stamped out for bf16 and f16 (inline asm needs the type as a literal).
#if PKV_WGMMA
#define PKV_WGMMA_ONLY(...) __VA_ARGS__
#else
#define PKV_WGMMA_ONLY(...) __trap();
#endif

#define PKV_DEFINE_WGMMA_SS_64(T, PTX_T) \
template <> \
__device__ inline void wgmma_ss<64, T>(float (&d)[32], uint64_t a, uint64_t b, int accumulate) { \
  PKV_WGMMA_ONLY( \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_T "." PTX_T " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "l"(a), "l"(b), "r"(accumulate)); \
  ) \
}
PKV_DEFINE_WGMMA_SS_64(__nv_bfloat16, "bf16")
PKV_DEFINE_WGMMA_SS_64(__half, "f16")
#undef PKV_DEFINE_WGMMA_SS_64

#define PKV_DEFINE_WGMMA_RS_TB_64(T, PTX_T) \
template <> \
__device__ inline void wgmma_rs_tb<64, T>(float (&d)[32], const uint32_t (&a)[4], uint64_t b, int accumulate) { \
  PKV_WGMMA_ONLY( \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_T "." PTX_T " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate)); \
  ) \
}
PKV_DEFINE_WGMMA_RS_TB_64(__nv_bfloat16, "bf16")
PKV_DEFINE_WGMMA_RS_TB_64(__half, "f16")
#undef PKV_DEFINE_WGMMA_RS_TB_64

#define PKV_DEFINE_WGMMA_SS_128(T, PTX_T) \
template <> \
__device__ inline void wgmma_ss<128, T>(float (&d)[64], uint64_t a, uint64_t b, int accumulate) { \
  PKV_WGMMA_ONLY( \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_T "." PTX_T " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "l"(a), "l"(b), "r"(accumulate)); \
  ) \
}
PKV_DEFINE_WGMMA_SS_128(__nv_bfloat16, "bf16")
PKV_DEFINE_WGMMA_SS_128(__half, "f16")
#undef PKV_DEFINE_WGMMA_SS_128

#define PKV_DEFINE_WGMMA_RS_TB_128(T, PTX_T) \
template <> \
__device__ inline void wgmma_rs_tb<128, T>(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int accumulate) { \
  PKV_WGMMA_ONLY( \
  asm volatile( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_T "." PTX_T " {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate)); \
  ) \
}
PKV_DEFINE_WGMMA_RS_TB_128(__nv_bfloat16, "bf16")
PKV_DEFINE_WGMMA_RS_TB_128(__half, "f16")
#undef PKV_DEFINE_WGMMA_RS_TB_128

#undef PKV_WGMMA_ONLY

}  // namespace paged_kv::cuda
