// A branch-free float exp for the CPU loops, written so that GCC/Clang
// vectorise the loops that call it with whatever instruction set the calling
// function is compiled for (see FASTKD_CPU_CLONES below).
//
// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2];
// exp(r) by a degree-7 Taylor-like minimax polynomial (relative error < 2e-7).
#pragma once
#include <stdint.h>
#include <string.h>
#include <math.h>

#define FASTKD_INLINE inline __attribute__((always_inline))

// Every function defined after this point is compiled as with -fno-trapping-math.
// Under GCC's default -ftrapping-math a float comparison may trap, so GCC 12 will
// not turn `p > 0 ? v : 0` (or any select on a float comparison except min/max)
// into a vector blend: every loop holding one (the xlogy selects of kd_math.h,
// the NaN test of vexp) stayed scalar, 5x to 8x slower (KD rows: 32 -> 4 ns per
// element). We never read the floating-point exception flags, and the option
// changes no value (unlike -ffast-math). Include this header after the torch
// headers so that it applies to the kernels only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

// Runtime dispatch without -march=native: each hot row function is compiled
// for AVX-512, AVX2+FMA and the x86-64 baseline, and the loader picks the best
// one the running CPU supports (GCC/Clang ifunc). aarch64 has NEON as its baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTKD_NO_CLONES)
#define FASTKD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTKD_CPU_CLONES
#endif

namespace fastkd {

FASTKD_INLINE float vexp(float x) {
  const float lo = -87.3f, hi = 88.7f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // round to nearest without a library call: adding 1.5 * 2^23 rounds the fraction away
  const float shifter = 12582912.0f;
  float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;  // ln2 split in two for an exact product
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < lo ? 0.0f : y;
  y = x > hi ? INFINITY : y;
  return x != x ? x : y;  // NaN in, NaN out
}

}  // namespace fastkd
