// KD's raw-unit cross statistics (KDRawStats, csrc/kd_math.h) with each net at its own inverse temperature:
// a = (s - ms) * inv_a for the first net, b = (t - mt) * inv_b for the second, zs = sum exp(a),
// zt = sum exp(b), cross = sum exp(b) (b - a), so that kd_raw_finish gives KL(second || first) as before.
// divergence_fwd's fused KL sweep uses it when the teacher has its own temperature (teacher_temperature).
// With inv_a == inv_b every operation is kd_raw_push's / kd_raw_merge's (bit for bit: the default path
// must not move). Kept here, not in kd_math.h, which the CPU kernels share.
#pragma once
#include "../kd_math.h"

namespace fastkd {

// kd_raw_push with the first net (s) at inv_a and the second (t) at inv_b.
__device__ __forceinline__ void kd_raw_push2(KDRawStats& st, float s, float t, float inv_a, float inv_b) {
  if (s > st.ms) {
    // every earlier a drops by (s - ms) * inv_a, so every earlier b - a grows by it
    const float up = (s - st.ms) * inv_a;  // +inf on the first finite logit
    if (st.zt > 0.0f) st.cross += st.zt * up;
    st.zs = st.zs * (st.ms == -INFINITY ? 0.0f : kd_fast_exp(-up)) + 1.0f;
    st.ms = s;
  } else if (st.ms != -INFINITY || s != s) {
    st.zs += kd_fast_exp((s - st.ms) * inv_a);
  }
  const float a = kd_shift(s, st.ms, inv_a);
  if (t > st.mt) {
    // every earlier b drops by (t - mt) * inv_b
    const float up = (t - st.mt) * inv_b;
    const float f = st.mt == -INFINITY ? 0.0f : kd_fast_exp(-up);
    st.cross = (st.zt > 0.0f ? st.cross - st.zt * up : st.cross) * f;
    st.zt = st.zt * f + 1.0f;
    st.cross += -a;  // this column: e_t = 1, b = 0
    st.mt = t;
  } else if (st.mt != -INFINITY || t != t) {
    const float b = (t - st.mt) * inv_b, et = kd_fast_exp(b);
    st.zt += et;
    st.cross += kd_cross_term(et, a, b);
  }
}

// kd_raw_add at two scales: moving the maxima shifts every b - a by gap_t * inv_b - gap_s * inv_a.
__device__ __forceinline__ void kd_raw_add2(KDRawStats& acc, const KDRawStats& p, float inv_a, float inv_b) {
  const float gs = raw_gap(p.ms, acc.ms), gt = raw_gap(p.mt, acc.mt);
  const float fs = expf(gs * inv_a), ft = expf(gt * inv_b);
  acc.zs += p.zs * fs;
  acc.zt += p.zt * ft;
  // one scale: kd_raw_add's (gt - gs) * inv_t, so that the default path rounds as before
  const float shift = inv_a == inv_b ? (gt - gs) * inv_a : gt * inv_b - gs * inv_a;
  if (p.zt > 0.0f && ft > 0.0f) acc.cross += ft * (p.cross + p.zt * shift);
}

__device__ __forceinline__ KDRawStats kd_raw_merge2(const KDRawStats& x, const KDRawStats& y, float inv_a,
                                                    float inv_b) {
  KDRawStats r = {max_ignoring_nan(x.ms, y.ms), 0.0f, max_ignoring_nan(x.mt, y.mt), 0.0f, 0.0f};
  kd_raw_add2(r, x, inv_a, inv_b);
  kd_raw_add2(r, y, inv_a, inv_b);
  return r;
}

}  // namespace fastkd
