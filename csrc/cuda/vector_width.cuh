// Picks the widest copy unit (16, 8, 4 or 2 bytes) that every address and stride allows, so a
// row of head_dim elements moves in as few memory transactions as possible.
#pragma once

#include <cstdint>

namespace paged_kv::cuda {

inline int widest_copy_unit(std::initializer_list<int64_t> byte_quantities) {
  for (int width : {16, 8, 4, 2}) {
    bool ok = true;
    for (int64_t q : byte_quantities) ok = ok && (q % width == 0);
    if (ok) return width;
  }
  return 1;
}

template <int kWidth> struct CopyUnit;
template <> struct CopyUnit<16> { using type = uint4; };
template <> struct CopyUnit<8> { using type = uint2; };
template <> struct CopyUnit<4> { using type = uint32_t; };
template <> struct CopyUnit<2> { using type = uint16_t; };
template <> struct CopyUnit<1> { using type = uint8_t; };

}  // namespace paged_kv::cuda
