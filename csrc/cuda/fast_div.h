// Division of 32-bit unsigned integers by a divisor fixed for a whole launch,
// without a divide instruction per element (a GPU has none: a 32-bit divide is a
// sequence of some twenty instructions, a 64-bit one several times that):
//   q = floor(n / d) = (mulhi(n, m) + n) >> s,   s = ceil(log2 d),
//   m = floor(2^32 (2^s - d) / d) + 1            (computed once, on the host)
// i.e. n * (2^32 + m) / 2^(32 + s) with 2^32 + m = floor(2^(32+s) / d) + 1, which is
// exact for every n < 2^32 because (2^32 + m) d - 2^(32+s) lies in (0, d] and d <= 2^s
// (the round-up method of Granlund and Montgomery, 1994). The sum is kept in 64 bits.
// Host and device; tests/test_cuda_build.py checks it against `/` on the CPU.
#pragma once
#include <stdint.h>

#include "../kd_math.h"  // FASTKD_HD

namespace fastkd {

struct FastDiv32 {
  uint32_t d, m, s;
};

// d >= 1.
inline FastDiv32 fast_div32(uint32_t d) {
  uint32_t s = 0;
  while ((uint64_t{1} << s) < d) ++s;
  const uint64_t m = (((uint64_t{1} << s) - d) << 32) / d + 1;
  return {d, static_cast<uint32_t>(m), s};
}

FASTKD_HD uint32_t fast_div(uint32_t n, const FastDiv32& f) {
  const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * f.m) >> 32);  // mul.hi.u32 on a GPU
  return static_cast<uint32_t>((static_cast<uint64_t>(hi) + n) >> f.s);
}

}  // namespace fastkd
