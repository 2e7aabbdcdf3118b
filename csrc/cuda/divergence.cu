// divergence_fwd on CUDA: the language-model divergences (docs/design.md, "The
// language-model divergences: one op, divergence_fwd"), a warp or a block per row
// (rows.cuh). The per-class and per-bucket math is csrc/divergence_math.h, shared
// with the CPU kernel.
//
// Dense teacher (divergence_dense_kernel), one row of V classes:
//   sweep 1: online log-sum-exps (maxima in raw units) of the student at 1/T, of the
//            student at T = 1 (only with a target: the cross-entropy) and of the teacher
//            at its own 1/T_t (teacher_temperature; T_t = T by default);
//   sweep 2: the row's soft loss, sum G and sum H;
//   sweep 3: the gradients. When the sums the wanted gradients need are known after
//            sweep 1, sweeps 2 and 3 are one (two reads of the row, as KD): forward KL
//            (sum G = -(a + b)) and reverse KL (sum H = -(a + b)), whose other sum is
//            the KL itself (reverse: sum G = b KL(q || p); forward: sum H = a KL(p || q)),
//            which sweep 1 then sums as KD's cross term (kd_raw_push, the weighting net
//            second: for KL(q || p) the nets swap places).
// Top-k teacher (divergence_topk_kernel), K log-probs and ids per row:
//   the ids are checked first (an id outside [-1, V) makes the row NaN and nothing of it
//   is read through that id); in the tail mode they are set in a shared-memory bitmap
//   of the row's V columns, so that sweep 1 sums the student tail over the non-member
//   columns themselves (with its own maximum), never as total - top-k. The K buckets
//   are then handled slot by slot (lane-strided); the student gradient sweep writes
//   the non-member value into every column and, after a team barrier, each slot
//   rewrites its member column.
// Every thread of a launch meets the same reductions and barriers (rows.cuh): what
// varies by row is only the length of the ranges it sweeps. Launched on the caller's stream.
#include "../divergence_math.h"
#include "common.cuh"
#include "cross_stats.cuh"
#include "rows.cuh"

namespace fastkd {

// Found by argument-dependent lookup from RowTeam::reduce, so in namespace fastkd (that of
// KDRawStats), not the anonymous one; static: kd.cu defines the same for its own kernel.
static __device__ __forceinline__ KDRawStats shfl_xor(const KDRawStats& v, int offset) {
  return {shfl_xor(v.ms, offset), shfl_xor(v.zs, offset), shfl_xor(v.mt, offset), shfl_xor(v.zt, offset),
          shfl_xor(v.cross, offset)};
}

namespace {

constexpr int64_t kPadId = -1;

// The three running log-sum-exps of a row: student at 1/T, student at T = 1 (for the
// cross-entropy), and `u`: the teacher (dense, at its own 1/T_t) or the student's non-member
// tail (top-k tail, at 1/T).
// The top-k renormalise mode keeps the student over its ids in `s`, the teacher in `s1`.
struct RowLse {
  DivLse s, s1, u;
};

__device__ __forceinline__ RowLse row_lse_empty() { return {div_lse_empty(), div_lse_empty(), div_lse_empty()}; }

// inv_u: the scale of `u` (the teacher's 1/T_t, or the student tail's 1/T).
__device__ __forceinline__ RowLse row_lse_merge(RowLse x, const RowLse& y, float inv_t, float inv_u) {
  div_lse_merge(x.s, y.s, inv_t);
  div_lse_merge(x.s1, y.s1, 1.0f);
  div_lse_merge(x.u, y.u, inv_u);
  return x;
}

struct Sum3 {
  float x, y, z;
};

// Found by argument-dependent lookup from RowTeam::reduce.
__device__ __forceinline__ DivLse shfl_lse(const DivLse& v, int offset) {
  return {fastkd::shfl_xor(v.m, offset), fastkd::shfl_xor(v.z, offset)};
}
__device__ __forceinline__ RowLse shfl_xor(const RowLse& v, int offset) {
  return {shfl_lse(v.s, offset), shfl_lse(v.s1, offset), shfl_lse(v.u, offset)};
}
__device__ __forceinline__ Sum3 shfl_xor(const Sum3& v, int offset) {
  return {fastkd::shfl_xor(v.x, offset), fastkd::shfl_xor(v.y, offset), fastkd::shfl_xor(v.z, offset)};
}

// The teacher tail's sum over the non-maximal log-probs and the ties with the maximum, in
// double as div_topk_teacher_lse (K float32 terms would carry K * 6e-8 of absolute error).
struct Sum2d {
  double x, y;
};
__device__ __forceinline__ Sum2d shfl_xor(const Sum2d& v, int offset) {
  return {fastkd::shfl_xor(v.x, offset), fastkd::shfl_xor(v.y, offset)};
}

struct AddSum3 {
  __device__ __forceinline__ Sum3 operator()(const Sum3& a, const Sum3& b) const {
    return {a.x + b.x, a.y + b.y, a.z + b.z};
  }
};

template <bool kWarp>
__device__ __forceinline__ Sum3 team_sum(const RowTeam<kWarp>& team, const Sum3& v, Sum3* scratch) {
  return team.reduce(v, Sum3{0.0f, 0.0f, 0.0f}, AddSum3{}, scratch);
}

template <bool kWarp>
__device__ __forceinline__ RowLse team_lse(const RowTeam<kWarp>& team, const RowLse& v, float inv_t, float inv_u,
                                           RowLse* scratch) {
  return team.reduce(v, row_lse_empty(),
                     [inv_t, inv_u](const RowLse& a, const RowLse& b) { return row_lse_merge(a, b, inv_t, inv_u); },
                     scratch);
}

// The maximum of two log-probs, NaN if either is (max_ignoring_nan keeps a NaN only when it comes second, so a
// NaN teacher log-prob was dropped or kept depending on the lane order of the reduction).
__device__ __forceinline__ float max_keep_nan(float x, float y) { return x != x || x > y ? x : y; }

// A barrier over the row's team that also orders its shared and global memory accesses
// (a warp shuffle does not).
template <bool kWarp>
__device__ __forceinline__ void team_sync() {
  if constexpr (kWarp) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// What a row is before any logit is read: its weight, whether it is counted (weight != 0,
// inside the launch), its target (read only for a counted row, -1 without targets) and
// whether that target is out of range (the row is then NaN).
struct RowHead {
  float w;
  int64_t g;
  bool live, counted, bad;
};

__device__ __forceinline__ RowHead row_head(const DivergenceArgs& a, int64_t row) {
  RowHead h{0.0f, -1, row < a.rows, false, false};
  if (!h.live) return h;
  h.w = a.row_weight[row];
  if (h.w == 0.0f) return h;
  h.counted = true;
  if (a.target) {
    h.g = a.target[row];
    h.bad = h.g < 0 || h.g >= a.cols;
  }
  return h;
}

// loss, soft and hard of a live row (docs/design.md): 0 when skipped, NaN when bad.
__device__ __forceinline__ void write_row(const DivergenceArgs& a, int64_t row, bool counted, bool ok, float soft,
                                          float hard, float w) {
  float loss = 0.0f, soft_w = 0.0f, hard_w = 0.0f;
  if (counted && !ok) {
    loss = soft_w = hard_w = NAN;
  } else if (counted) {
    soft_w = w * (a.soft_scale * soft);
    hard_w = w * hard;
    loss = a.ce_weight != 0.0f ? soft_w + a.ce_weight * hard_w : soft_w;
  }
  a.loss_rows[row] = loss;
  a.soft_rows[row] = soft_w;
  a.hard_rows[row] = hard_w;
}

// softmax(s)_c - [c == target] of the cross-entropy at T = 1, from the row's T = 1 statistics.
__device__ __forceinline__ float ce_grad(float x, const DivLse& st1, float l1, int64_t c, int64_t g) {
  return div_exp(div_log_prob(x, st1.m, 1.0f, l1)) - (c == g ? 1.0f : 0.0f);
}

// ---------------------------------------------------------------------------
// Dense teacher.

template <bool kWarp, typename S, typename T>
__global__ void __launch_bounds__(kRowBlockBound<kWarp>, kRowMinBlocks<kWarp>)
    divergence_dense_kernel(const DivergenceArgs args, bool packs) {
  constexpr int W = kPackWidth<S, T>;
  __shared__ RowLse lse_scratch[32];
  __shared__ Sum3 sum_scratch[32];
  __shared__ KDRawStats cross_scratch[32];
  const RowTeam<kWarp> team;
  const RowHead h = row_head(args, team.row);
  const bool ok = h.counted && !h.bad;
  const int64_t V = args.cols, offset = team.row * V;  // 64-bit: rows * V may pass 2^31
  const S* s = static_cast<const S*>(args.student) + offset;
  const T* t = static_cast<const T*>(args.teacher) + offset;
  S* gs = args.grad_student ? static_cast<S*>(args.grad_student) + offset : nullptr;
  T* gt = args.grad_teacher ? static_cast<T*>(args.grad_teacher) + offset : nullptr;
  const RowSplit<W> sp = split_row<W>(offset, ok ? V : 0, packs, team.lane, team.lanes);
  const float inv_t = 1.0f / args.temperature;
  // the teacher's own 1/T_t wherever its logits are scaled (0: the temperature's; then every step as before)
  const float inv_tt = args.teacher_temperature > 0.0f ? 1.0f / args.teacher_temperature : inv_t;
  const bool ce = args.target != nullptr;  // the T = 1 statistics are kept for the cross-entropy only
  const DivParams d = div_params(args.kind, args.a, args.b, args.w_p, args.w_q);

  // All of these are the same for every thread of the launch (reductions below depend on them).
  const bool soft_on = div_soft_on(d);  // a = b = 0 in the KL family: cross-entropy alone
  const bool want_s = args.grad_student != nullptr, want_t = args.grad_teacher != nullptr;
  // the KL that sweep 1 sums as a cross term: KL(q || p) = sum G / b (w_q == 0), KL(p || q) = sum H / a (w_p == 0)
  const bool cross_q = soft_on && want_s && d.kind == kDivKL && d.mix == kMixP;
  const bool cross_p = soft_on && want_t && d.kind == kDivKL && d.mix == kMixQ;
  const bool g_known = div_sum_g_known(d.kind, d.mix) || cross_q, h_known = div_sum_h_known(d.kind, d.mix) || cross_p;
  const bool fused = soft_on && (want_s || want_t) && (!want_s || g_known) && (!want_t || h_known);

  RowLse st = row_lse_empty();
  KDRawStats kx = kd_raw_empty();  // cross_q: the nets swapped (the student second)
  sweep_row(sp, s, t, [&](int64_t, float x, float y) {
    if (cross_q) {
      kd_raw_push2(kx, y, x, inv_tt, inv_t);
    } else if (cross_p) {
      kd_raw_push2(kx, x, y, inv_t, inv_tt);
    } else {
      div_lse_push(st.s, x, inv_t);
      div_lse_push(st.u, y, inv_tt);
    }
    if (ce) div_lse_push(st.s1, x, 1.0f);
  });
  st = team_lse(team, st, inv_t, inv_tt, lse_scratch);  // (with cross_q / cross_p: st.s1 only)
  float cross_kl = 0.0f;
  if (cross_q || cross_p) {
    // the first net's scale first: the teacher's (cross_q) or the student's (cross_p)
    const float inv_a = cross_q ? inv_tt : inv_t, inv_b = cross_q ? inv_t : inv_tt;
    kx = team.reduce(
        kx, kd_raw_empty(),
        [inv_a, inv_b](const KDRawStats& u, const KDRawStats& v) { return kd_raw_merge2(u, v, inv_a, inv_b); },
        cross_scratch);
    cross_kl = kd_raw_finish(kx).kl;
    st.s = cross_q ? DivLse{kx.mt, kx.zt} : DivLse{kx.ms, kx.zs};
    st.u = cross_q ? DivLse{kx.ms, kx.zs} : DivLse{kx.mt, kx.zt};
  }
  const float ls = div_lse_log(st.s), lt = div_lse_log(st.u), l1 = div_lse_log(st.s1);
  // p, q and the terms of one class
  DivParams dg = d;  // the gradient sweep's parameters (kind 7: kind 2 at (w, 1 - w), set by the gate below)
  auto terms = [&](const DivParams& dd, float x, float y, float& p, float& q) {
    const float lq = div_log_prob(x, st.s.m, inv_t, ls), lp = div_log_prob(y, st.u.m, inv_tt, lt);
    q = div_exp(lq);
    p = div_exp(lp);
    return div_terms_any(dd, p, q, lp, lq);
  };

  Sum3 sums = {0.0f, 0.0f, 0.0f};  // soft, sum G, sum H
  if (soft_on && !fused) {
    sweep_row(sp, s, t, [&](int64_t, float x, float y) {
      float p, q;
      const DivTerms e = terms(d, x, y, p, q);
      sums.x += e.soft;
      sums.y += e.g;
      sums.z += e.h;
    });
    sums = team_sum(team, sums, sum_scratch);
    if (d.kind == kDivEntropyGated) {  // the sums are KL(p || q), KL(q || p), H(p): gate the row
      const DivGateRow gr = div_gate_row(d, sums.x, sums.y, sums.z, V);
      dg = gr.d;
      sums = Sum3{gr.soft, gr.sum_g, gr.sum_h};
    }
    if (d.kind == kDivRenyi) {  // the sum is U: the row's S, the gradients as kind 5 at it
      const DivRenyiRow rr = div_renyi_row(d, sums.x, sums.y);  // U, S
      dg = rr.d;
      sums = Sum3{rr.soft, rr.sum_g, rr.sum_h};
    }
  }
  if (!ok) fill_row_grads(split_row<W>(offset, h.live ? V : 0, packs, team.lane, team.lanes), gs, gt,
                          h.counted ? NAN : 0.0f);
  if (want_s || want_t) {
    if (fused) {  // a coefficient of 0 drops its KL (never 0 * inf)
      sums.y = cross_q ? (d.b != 0.0f ? d.b * cross_kl : 0.0f) : (g_known ? div_known_sum(d) : 0.0f);
      sums.z = cross_p ? (d.a != 0.0f ? d.a * cross_kl : 0.0f) : (h_known ? div_known_sum(d) : 0.0f);
    }
    // the chain factors of the logits: 1/T for the student, 1/T_t for the teacher
    const float coef = h.w * args.soft_scale * inv_t, coef_t = h.w * args.soft_scale * inv_tt;
    const float cew = h.w * args.ce_weight;
    const bool with_ce = ce && args.ce_weight != 0.0f;
    float soft = 0.0f;
    sweep_row_grads(sp, s, t, gs, gt, [&](int64_t c, float x, float y) {
      float p, q;
      const DivTerms e = terms(dg, x, y, p, q);
      soft += e.soft;
      float g_s = coef * (e.g - q * sums.y);
      if (with_ce) g_s += cew * ce_grad(x, st.s1, l1, c, h.g);
      return GradPair{g_s, coef_t * (e.h - p * sums.z)};
    });
    if (fused) sums.x = team_sum(team, Sum3{soft, 0.0f, 0.0f}, sum_scratch).x;
  }
  if (h.live && team.lane == 0) {
    const float hard = ok && ce ? div_ce_hard(st.s1, to_float(s[h.g])) : 0.0f;
    write_row(args, team.row, h.counted, ok, sums.x, hard, h.w);
  }
}

// ---------------------------------------------------------------------------
// Top-k teacher: sweeps over the student row alone.

// f(c, x) for every column c of the split, x = s[c] as float.
template <int W, typename S, typename F>
__device__ __forceinline__ void sweep_one(const RowSplit<W>& sp, const S* s, F&& f) {
  for (int64_t c = sp.lane; c < sp.head; c += sp.lanes) f(c, to_float(s[c]));
  const int64_t step = static_cast<int64_t>(sp.lanes) * W;
  for (int64_t c = sp.head + static_cast<int64_t>(sp.lane) * W; c < sp.body_end; c += step) {
    const Pack<S, W> v = *reinterpret_cast<const Pack<S, W>*>(s + c);
#pragma unroll
    for (int k = 0; k < W; ++k) f(c + k, to_float(v.v[k]));
  }
  for (int64_t c = sp.body_end + sp.lane; c < sp.n; c += sp.lanes) f(c, to_float(s[c]));
}

// gs[c] = f(c, x) for every column of the split (f(c, x) = value when s is null: a fill).
template <int W, typename S, typename F>
__device__ __forceinline__ void sweep_one_grads(const RowSplit<W>& sp, const S* s, S* gs, F&& f) {
  auto x_at = [&](int64_t c) { return s ? to_float(s[c]) : 0.0f; };
  for (int64_t c = sp.lane; c < sp.head; c += sp.lanes) gs[c] = from_float<S>(f(c, x_at(c)));
  const int64_t step = static_cast<int64_t>(sp.lanes) * W;
  for (int64_t c = sp.head + static_cast<int64_t>(sp.lane) * W; c < sp.body_end; c += step) {
    Pack<S, W> v, g;
    if (s) v = *reinterpret_cast<const Pack<S, W>*>(s + c);
#pragma unroll
    for (int k = 0; k < W; ++k) g.v[k] = from_float<S>(f(c + k, s ? to_float(v.v[k]) : 0.0f));
    *reinterpret_cast<Pack<S, W>*>(gs + c) = g;
  }
  for (int64_t c = sp.body_end + sp.lane; c < sp.n; c += sp.lanes) gs[c] = from_float<S>(f(c, x_at(c)));
}

__device__ __forceinline__ bool is_member(const uint32_t* bits, int64_t c) { return (bits[c >> 5] >> (c & 31)) & 1u; }

template <bool kWarp, typename S, typename T>
__global__ void __launch_bounds__(kRowBlockBound<kWarp>, kRowMinBlocks<kWarp>)
    divergence_topk_kernel(const DivergenceArgs args, bool packs, bool sweep_v) {
  constexpr int W = kPackBytes / static_cast<int>(sizeof(S));
  // tail mode: one bit per column of each row of the block (divergence_tail_shared_bytes)
  extern __shared__ uint32_t div_member_bits[];
  __shared__ RowLse lse_scratch[32];
  __shared__ Sum3 sum_scratch[32];
  __shared__ Sum2d sum2d_scratch[32];
  const RowTeam<kWarp> team;
  const RowHead h = row_head(args, team.row);
  const int64_t V = args.cols, K = args.k;
  const bool tail = args.topk_mode == kTopkTail;
  const bool ce = args.target != nullptr;
  const float inv_t = 1.0f / args.temperature;
  const DivParams d = div_params(args.kind, args.a, args.b, args.w_p, args.w_q);
  const int64_t words = (V + 31) >> 5;
  uint32_t* bits = div_member_bits + (kWarp ? static_cast<int64_t>(threadIdx.x >> 5) * words : 0);
  const int64_t offset = team.row * V, k_offset = team.row * K;  // 64-bit
  const S* s = static_cast<const S*>(args.student) + offset;
  const int64_t* ids = args.topk_ids + k_offset;
  const T* lp_in = static_cast<const T*>(args.teacher) + k_offset;
  S* gs = args.grad_student ? static_cast<S*>(args.grad_student) + offset : nullptr;
  T* gt = args.grad_teacher ? static_cast<T*>(args.grad_teacher) + k_offset : nullptr;

  // 1. The ids of a counted row: any outside [-1, V) makes it NaN; count the real ones; set the bitmap.
  if (tail) {
    for (int64_t j = team.lane; j < words; j += team.lanes) bits[j] = 0u;
    team_sync<kWarp>();
  }
  Sum3 flags = {h.bad && team.lane == 0 ? 1.0f : 0.0f, 0.0f, 0.0f};  // bad, real ids
  for (int64_t j = team.lane; j < (h.counted ? K : 0); j += team.lanes) {
    const int64_t id = ids[j];
    if (id == kPadId) continue;
    if (id < 0 || id >= V) {
      flags.x = 1.0f;
    } else {
      flags.y += 1.0f;
      if (tail) atomicOr(&bits[id >> 5], 1u << (id & 31));
    }
  }
  flags = team_sum(team, flags, sum_scratch);
  if (tail) team_sync<kWarp>();  // the bitmap is complete before sweep 1 reads it
  const bool ok = h.counted && flags.x == 0.0f;
  const bool has_ids = flags.y > 0.0f;  // a row of padding only has loss 0 and no soft gradient
  const int64_t kk = ok ? K : 0;
  const RowSplit<W> sp = split_row<W>(offset, ok ? V : 0, packs, team.lane, team.lanes);

  // 2. Sweep 1 (tail mode, or a cross-entropy): full student (1/T), T = 1, non-member tail (1/T).
  RowLse st = row_lse_empty();
  if (sweep_v) {
    sweep_one(sp, s, [&](int64_t c, float x) {
      if (tail) {
        div_lse_push(st.s, x, inv_t);
        if (!is_member(bits, c)) div_lse_push(st.u, x, inv_t);
      }
      if (ce) div_lse_push(st.s1, x, 1.0f);
    });
    st = team_lse(team, st, inv_t, inv_t, lse_scratch);  // u: the student's tail
  }
  const float ls = div_lse_log(st.s), l1 = div_lse_log(st.s1), lu = div_lse_log(st.u);

  // 3. The bucket normalisers.
  //    tail: the teacher's lse over its ids, accurate near 0: the first maximum counts exactly 1
  //          and only the others are summed (div_topk_teacher_lse, here over the team: the ties
  //          with the maximum add exactly ties - 1).
  //    renormalise: the student over its ids (1/T) and the teacher over its ids (scale 1).
  double lse_p = -INFINITY;
  RowLse ren = row_lse_empty();  // renormalise: student in .s, teacher in .s1
  if (tail) {
    Sum3 mx = {-INFINITY, 0.0f, 0.0f};
    for (int64_t j = team.lane; j < kk; j += team.lanes) {
      if (ids[j] != kPadId) mx.x = max_keep_nan(mx.x, to_float(lp_in[j]));
    }
    mx = team.reduce(mx, Sum3{-INFINITY, 0.0f, 0.0f},
                     [](const Sum3& a, const Sum3& b) { return Sum3{max_keep_nan(a.x, b.x), 0.0f, 0.0f}; },
                     sum_scratch);
    Sum2d z = {0.0, 0.0};  // sum over the others, ties with the maximum
    for (int64_t j = team.lane; j < kk; j += team.lanes) {
      if (ids[j] == kPadId) continue;
      const float lp = to_float(lp_in[j]);
      if (lp == mx.x) {
        z.y += 1.0;
      } else {
        z.x += exp(static_cast<double>(lp) - mx.x);  // NaN stays NaN
      }
    }
    z = team.reduce(z, Sum2d{0.0, 0.0}, [](const Sum2d& a, const Sum2d& b) { return Sum2d{a.x + b.x, a.y + b.y}; },
                    sum2d_scratch);
    if (mx.x != -INFINITY) lse_p = mx.x + log1p(z.x + (z.y - 1.0));  // a NaN maximum stays NaN
  } else {
    for (int64_t j = team.lane; j < kk; j += team.lanes) {
      const int64_t id = ids[j];
      if (id == kPadId) continue;
      div_lse_push(ren.s, to_float(s[id]), inv_t);
      div_lse_push(ren.s1, to_float(lp_in[j]), 1.0f);
    }
    ren = team_lse(team, ren, inv_t, inv_t, lse_scratch);
  }
  const float lren_s = div_lse_log(ren.s), lren_p = div_lse_log(ren.s1);
  // log p, log q of slot j (a real id)
  auto bucket = [&](int64_t j, int64_t id, float& lp, float& lq) {
    const float x = to_float(s[id]), y = to_float(lp_in[j]);
    if (tail) {
      lq = div_log_prob(x, st.s.m, inv_t, ls);
      lp = y;
    } else {
      lq = div_log_prob(x, ren.s.m, inv_t, lren_s);
      lp = ren.s1.z != 0.0f ? div_log_prob(y, ren.s1.m, 1.0f, lren_p) : y;  // no teacher mass: stays -inf; NaN stays
    }
  };

  // 4. The buckets' loss, sum G, sum H; the tail bucket once per row (every lane alike).
  Sum3 sums = {0.0f, 0.0f, 0.0f};
  for (int64_t j = team.lane; j < kk; j += team.lanes) {
    const int64_t id = ids[j];
    if (id == kPadId) continue;
    float lp, lq;
    bucket(j, id, lp, lq);
    const DivTerms e = div_terms_any(d, div_exp(lp), div_exp(lq), lp, lq);
    sums.x += e.soft;
    sums.y += e.g;
    sums.z += e.h;
  }
  sums = team_sum(team, sums, sum_scratch);
  float lp_tail = 0.0f, lq_tail = 0.0f;
  DivTerms e_tail = {0.0f, 0.0f, 0.0f};
  if (tail && has_ids) {
    lp_tail = div_topk_teacher_tail(lse_p);
    lq_tail = div_topk_student_tail(st.s, st.u, inv_t);
    e_tail = div_terms_any(d, div_exp(lp_tail), div_exp(lq_tail), lp_tail, lq_tail);
    sums.x += e_tail.soft;
    sums.y += e_tail.g;
    sums.z += e_tail.h;
  }
  if (!has_ids) sums = Sum3{0.0f, 0.0f, 0.0f};
  DivParams dg = d;  // the gradients' parameters (kind 7: kind 2 at the row's (w, 1 - w))
  if (d.kind == kDivEntropyGated && has_ids) {  // the sums are KL(p || q), KL(q || p), H(p) over the buckets
    const DivGateRow gr = div_gate_row(d, sums.x, sums.y, sums.z, V);
    dg = gr.d;
    sums = Sum3{gr.soft, gr.sum_g, gr.sum_h};
    if (tail) e_tail = div_terms_any(dg, div_exp(lp_tail), div_exp(lq_tail), lp_tail, lq_tail);
  }
  if (d.kind == kDivRenyi && has_ids) {  // the sum is U over the buckets: the row's S, then kind 5 at it
    const DivRenyiRow rr = div_renyi_row(d, sums.x, sums.y);  // U, S
    dg = rr.d;
    sums = Sum3{rr.soft, rr.sum_g, rr.sum_h};
    if (tail) e_tail = div_terms_any(dg, div_exp(lp_tail), div_exp(lq_tail), lp_tail, lq_tail);
  }
  if (h.live && team.lane == 0) {
    const float hard = ok && ce ? div_ce_hard(st.s1, to_float(s[h.g])) : 0.0f;
    write_row(args, team.row, h.counted, ok, sums.x, hard, h.w);
  }

  // 5. Gradients. Rows that are skipped (0) or bad (NaN) are filled; the others sweep.
  if (!ok) {
    const float fill = h.counted ? NAN : 0.0f;
    if (gs) {
      sweep_one_grads(split_row<W>(offset, h.live ? V : 0, packs, team.lane, team.lanes), static_cast<const S*>(nullptr),
                      gs, [fill](int64_t, float) { return fill; });
    }
    if (gt) {
      for (int64_t j = team.lane; j < (h.live ? K : 0); j += team.lanes) gt[j] = from_float<T>(fill);
    }
  }
  const float soft_coef = has_ids ? h.w * args.soft_scale : 0.0f;  // teacher (log-prob space)
  const float coef = soft_coef * inv_t;                              // student (logit space)
  const float cew = h.w * args.ce_weight;
  const bool with_ce = ce && args.ce_weight != 0.0f;
  if (args.grad_student) {
    // every column: the non-member value (tail) or 0 (renormalise), plus the cross-entropy
    sweep_one_grads(sp, s, gs, [&](int64_t c, float x) {
      float g = 0.0f;
      if (tail) {
        // an empty tail (every non-member -inf) has no share: exp(-inf - -inf) would be NaN, times G_tail = 0
        const float share = is_member(bits, c) || st.u.z == 0.0f ? 0.0f : div_exp(div_log_prob(x, st.u.m, inv_t, lu));
        g = div_topk_nonmember_grad(coef, share, e_tail.g, div_exp(div_log_prob(x, st.s.m, inv_t, ls)), sums.y);
      }
      if (with_ce) g += cew * ce_grad(x, st.s1, l1, c, h.g);
      return g;
    });
    team_sync<kWarp>();  // the member columns written above (packs) are rewritten below
    for (int64_t j = team.lane; j < kk; j += team.lanes) {
      const int64_t id = ids[j];
      if (id == kPadId) continue;
      float lp, lq;
      bucket(j, id, lp, lq);
      const float q = div_exp(lq);
      float g = div_topk_member_grad(coef, div_terms_any(dg, div_exp(lp), q, lp, lq).g, q, sums.y);
      if (with_ce) g += cew * ce_grad(to_float(s[id]), st.s1, l1, id, h.g);
      gs[id] = from_float<S>(g);
    }
  }
  if (args.grad_teacher) {
    // tail: H_tail / p_tail, or (top-k mass clamped at 1) the a p_k the tail no longer absorbs (div_h_over_p)
    const float factor = tail ? div_h_over_p(dg, div_exp(lp_tail), div_exp(lq_tail), lp_tail, lq_tail) : sums.z;
    for (int64_t j = team.lane; j < kk; j += team.lanes) {
      const int64_t id = ids[j];
      float g = 0.0f;  // padding slots
      if (id != kPadId) {
        float lp, lq;
        bucket(j, id, lp, lq);
        const float p = div_exp(lp);
        g = div_topk_teacher_grad(soft_coef, div_terms_any(dg, p, div_exp(lq), lp, lq).h, p, factor);
      }
      gt[j] = from_float<T>(g);
    }
  }
}

// The bitmap rows of one block: kWarpRowsPerBlock for the warp team, else 1.
int64_t tail_bitmap_bytes(bool warp, int64_t cols) {
  return (warp ? kWarpRowsPerBlock : 1) * ((cols + 31) / 32) * static_cast<int64_t>(sizeof(uint32_t));
}

// Dynamic shared memory above which a kernel must opt in (the static scratch takes about 2 KiB of 48 KiB).
constexpr int64_t kSharedNoOptIn = 40 * 1024;

}  // namespace

int64_t divergence_tail_shared_bytes(int64_t rows, int64_t cols) {
  return tail_bitmap_bytes(plan_rows(rows, cols).warp, cols);
}

cudaError_t divergence_fwd_cuda(const DivergenceArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (args.topk_mode == kTopkNone) {
    const RowPlan plan = plan_rows(args.rows, args.cols);
    FASTKD_DISPATCH_ONE(args.s_dtype, S, FASTKD_DISPATCH_ONE(args.t_dtype, T, {
      const bool packs = rows_vectorizable<S, T>(args.student, args.teacher, args.grad_student, args.grad_teacher);
      with_row_team(plan, [&](auto warp) {
        divergence_dense_kernel<decltype(warp)::value, S, T><<<plan.blocks, plan.threads, 0, stream>>>(args, packs);
      });
    }))
    return cudaGetLastError();
  }
  const bool tail = args.topk_mode == kTopkTail;
  const bool sweep_v = tail || args.target != nullptr;  // statistics over the whole row
  // the team is sized by V when a sweep of the row is needed, else by K
  const RowPlan plan = plan_rows(args.rows, sweep_v || args.grad_student ? args.cols : args.k);
  const int64_t shared = tail ? tail_bitmap_bytes(plan.warp, args.cols) : 0;
  cudaError_t err = cudaSuccess;
  FASTKD_DISPATCH_ONE(args.s_dtype, S, FASTKD_DISPATCH_ONE(args.t_dtype, T, {
    constexpr int W = kPackBytes / static_cast<int>(sizeof(S));
    const bool packs = pack_aligned(args.student, W, sizeof(S)) && pack_aligned(args.grad_student, W, sizeof(S));
    with_row_team(plan, [&](auto warp) {
      constexpr bool kWarp = decltype(warp)::value;
      if (shared > kSharedNoOptIn) {
        err = cudaFuncSetAttribute(divergence_topk_kernel<kWarp, S, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(shared));
      }
      if (err == cudaSuccess) {
        divergence_topk_kernel<kWarp, S, T><<<plan.blocks, plan.threads, shared, stream>>>(args, packs, sweep_v);
      }
    });
  }))
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace fastkd
