// Division by a divisor fixed for a whole launch, as a multiply-high, an add and a shift.
//
// A kernel's start divides block indices and row numbers by the batch size, the number of KV
// heads, the GQA group and the split count. The hardware has no integer divide: each `/` or `%`
// by a runtime value is a sequence of about twenty dependent instructions, and on the start of
// a decode block those lie between the batch entry's arrival and the first page-table read.
// FastDivisor holds the divisor's magic number, computed once on the host (Granlund and
// Montgomery, "Division by invariant integers using multiplication", 1994):
//   shift = ceil(log2(d)),  magic = floor(2^32 * (2^shift - d) / d) + 1,
//   n / d = (umulhi(n, magic) + n) >> shift        for 0 <= n < 2^31.
// The sum stays below 2^32 because umulhi(n, magic) < n < 2^31.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define PKV_HOST_DEVICE __host__ __device__
#else
#define PKV_HOST_DEVICE
#endif

namespace paged_kv::cuda {

struct FastDivisor {
  uint32_t divisor = 1;
  uint32_t magic = 1;
  uint32_t shift = 0;

  FastDivisor() = default;
  // `d` must lie in [1, 2^31); the launcher's sizes (batch, heads, group, splits) do.
  explicit FastDivisor(int64_t d) : divisor(static_cast<uint32_t>(d)) {
    while ((uint64_t{1} << shift) < divisor) ++shift;
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - divisor)) /
                                  divisor) +
            1;
  }

  // n / divisor for 0 <= n < 2^31.
  PKV_HOST_DEVICE int quotient(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#ifdef __CUDA_ARCH__
    const uint32_t high = __umulhi(u, magic);
#else
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(u) * magic) >> 32);
#endif
    return static_cast<int>((high + u) >> shift);
  }
  // n % divisor, given q = quotient(n).
  PKV_HOST_DEVICE int remainder(int n, int q) const {
    return n - q * static_cast<int>(divisor);
  }
};

}  // namespace paged_kv::cuda

#undef PKV_HOST_DEVICE
