// The MGD keep mask, shared by the CPU (csrc/cpu/mgd.cpp) and CUDA (csrc/cuda/mgd.cu)
// kernels; bit for bit the definition in fastkd/_mask.py:
//   h(x) = lowbias32 mixer (xor-shift / multiply, mod 2^32)
//   u(i) = h(lo32(i) ^ h(hi32(i) ^ h(lo32(seed))))
//   keep(i) = u(i) >= threshold,   threshold = min(floor(mask_ratio * 2^32), 2^32 - 1)
// with i = n*C + c for the channel mask (N, C, 1, 1) and n*H*W + h*W + w for the
// spatial mask (N, 1, H, W) of a contiguous NCHW tensor.
#pragma once
#include <stdint.h>

#include "kd_math.h"

namespace fastkd {

FASTKD_HD uint32_t mgd_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// The seed enters through h(lo32(seed)), computed once per call.
FASTKD_HD uint32_t mgd_seed_key(int64_t seed) { return mgd_mix(static_cast<uint32_t>(static_cast<uint64_t>(seed))); }

FASTKD_HD uint32_t mgd_hash(uint32_t key, uint64_t index) {
  return mgd_mix(static_cast<uint32_t>(index) ^ mgd_mix(static_cast<uint32_t>(index >> 32) ^ key));
}

// Computed in double like the Python int(mask_ratio * 2^32) (mask_ratio in [0, 1)).
inline uint32_t mgd_threshold(double mask_ratio) {
  const double scaled = mask_ratio * 4294967296.0;
  if (!(scaled > 0.0)) return 0u;
  return scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(static_cast<uint64_t>(scaled));
}

// Index into the mask of element e of a contiguous NCHW tensor (hw = H*W, chw = C*H*W).
FASTKD_HD uint64_t mgd_mask_index(uint64_t e, uint64_t hw, uint64_t chw, bool spatial) {
  return spatial ? (e / chw) * hw + e % hw : e / hw;
}

}  // namespace fastkd
