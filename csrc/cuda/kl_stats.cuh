// Per-thread online KDStats (csrc/kd_math.h) for the row kernels of KD, ATS and
// DKD: one exp per element and net in the common case, and the warp shuffle that
// lets a row team (rows.cuh) merge them.
#pragma once
#include "../kd_math.h"
#include "common.cuh"
#include "rows.cuh"

namespace fastkd {

// Found by argument-dependent lookup from block_reduce.
__device__ __forceinline__ KDStats shfl_xor(const KDStats& v, int offset) {
  return {shfl_xor(v.ms, offset), shfl_xor(v.zs, offset), shfl_xor(v.mt, offset), shfl_xor(v.zt, offset),
          shfl_xor(v.cross, offset)};
}

// Fold the column (a, b) into the running statistics. A -inf logit adds nothing
// (and never computes -inf - -inf); a NaN poisons the sums.
__device__ __forceinline__ void kd_stats_push(KDStats& st, float a, float b) {
  if (a > st.ms) {
    st.zs = st.zs * rescale(st.ms, a) + 1.0f;
    st.ms = a;
  } else if (st.ms != -INFINITY || a != a) {
    st.zs += __expf(a - st.ms);
  }
  if (b > st.mt) {
    const float f = rescale(st.mt, b);
    st.zt = st.zt * f + 1.0f;
    st.cross = st.cross * f + (b - a);
    st.mt = b;
  } else if (st.mt != -INFINITY || b != b) {
    const float et = __expf(b - st.mt);
    st.zt += et;
    st.cross += kd_cross_term(et, a, b);
  }
}

// The row's statistics, merged over its team (`scratch`: one KDStats per warp, shared).
template <bool kWarp>
__device__ __forceinline__ KDStats kd_stats_team(const RowTeam<kWarp>& team, const KDStats& st, KDStats* scratch) {
  return team.reduce(st, kd_stats_empty(), [](const KDStats& x, const KDStats& y) { return kd_stats_merge(x, y); },
                     scratch);
}

}  // namespace fastkd
