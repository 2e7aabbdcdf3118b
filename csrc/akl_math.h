// Row math of fastkd::akl_fwd, the adaptive KL (Wu et al., COLING 2025; docs/design.md, "akl_fwd"), shared by
// the CPU kernel (csrc/cpu/akl.cpp) and the CUDA kernel (csrc/cuda/akl.cu). The per-class math is that of
// divergence_fwd's kind 2 (the two-sided KL, csrc/divergence_math.h) at the row's weights (h, l):
//   p = softmax(t / T), q = softmax(s / T); M(v) = sum of p_j over t_j >= v (ties counted together);
//   head = {c : M(t_c) <= mu} plus the classes at max t; g_head / g_tail = sum |p - q| over head / tail;
//   h = g_head / max(g_head + g_tail, 1e-8), l = g_tail / max(...)     (the official clamp)
//   soft = h KL(p || q) + l KL(q || p),  h and l constants in both gradients:
//   dsoft/dx_c = G_c - q_c sum G,  G_c = l q_c (lq_c - lp_c) - h p_c,  sum G = l KL(q || p) - h
//   dsoft/dy_c = H_c - p_c sum H,  H_c = h p_c (lp_c - lq_c) - l q_c,  sum H = h KL(p || q) - l
// (x = s / T, y = t / T; kind 2's G and H, which drop the multiples of q and p that the - q sum G removes).
// A weight of 0 drops its KL (never 0 * inf: mu = 1 gives l = 0 and a teacher with p = 0 < q is then fine).
#pragma once
#include <stdint.h>

#include "divergence_math.h"  // DivGateRow, div_params, kDivJeffreys, FASTKD_HD

namespace fastkd {

// The op's `kind` (fastkd.core.divergence.KIND_CODES["akl"]): checked, never dispatched on.
constexpr int64_t kAklKind = 8;

// An order-preserving 32-bit key of a float: x < y <=> key(x) < key(y) for non-NaN x, y, and -0.0 and 0.0 share
// a key (x + 0.0f turns -0.0 into 0.0), so equal logits are equal keys. -inf has the smallest key of a number.
FASTKD_HD uint32_t akl_key(float x) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = x + 0.0f;
  return (v.u & 0x80000000u) ? ~v.u : (v.u | 0x80000000u);
}

// (h, l) from the gaps; a NaN gap sum stays NaN (a plain max would drop it for 1e-8).
FASTKD_HD void akl_weights(double g_head, double g_tail, float& h, float& l) {
  const double sum = g_head + g_tail;
  const double total = sum > 1e-8 ? sum : (sum != sum ? sum : 1e-8);
  h = static_cast<float>(g_head / total);
  l = static_cast<float>(g_tail / total);
}

// What the gradient pass needs of an AKL row (as the entropy-gated KL's div_gate_row): kind 2's parameters at
// (a, b) = (h, l), the soft loss and sum G, sum H in closed form from the two KLs.
FASTKD_HD DivGateRow akl_row(double g_head, double g_tail, float kl_pq, float kl_qp) {
  float h, l;
  akl_weights(g_head, g_tail, h, l);
  DivGateRow r;
  r.d = div_params(kDivJeffreys, h, l, 0.0f, 0.0f);
  const float fwd = h != 0.0f ? h * kl_pq : 0.0f, rev = l != 0.0f ? l * kl_qp : 0.0f;
  r.soft = fwd + rev;
  r.sum_g = rev - h;
  r.sum_h = fwd - l;
  return r;
}

}  // namespace fastkd
