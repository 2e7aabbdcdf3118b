// akl_fwd on CUDA: the adaptive KL (docs/design.md, "akl_fwd"; row math in csrc/akl_math.h and, for the
// per-class terms, csrc/divergence_math.h's kind 2), a warp or a block per row (rows.cuh), dense teachers.
//
// One row of V classes:
//   sweep 1: online log-sum-exps (raw-unit maxima) of the student at 1/T, of the student at T = 1 (with a
//            target: the cross-entropy) and of the teacher at its own 1/T_t (teacher_temperature; T by default);
//   sweeps 2-5: the head's threshold by radix selection over the order-preserving 32-bit keys of the teacher's
//            logits (akl_key), 8 bits per sweep from the top: a 256-bin histogram of teacher MASS in shared
//            memory (per row) over the next digit of the keys that match the prefix chosen so far, walked from
//            the top bin with the mass above it; the first bin that takes that mass past mu is the prefix's next
//            digit (classes with p < (1 - mu) / 2V, below the boundary by a bound, are left out). After four digits the prefix is the key of the tail's most probable tie group: the head is
//            every key above it, plus the maxima. (A sweep whose bins never pass mu, rounding, ends the search:
//            its whole prefix is head.) These sweeps read the teacher alone;
//   sweep 6: KL(p || q), KL(q || p) and the gaps |p - q| of head and tail;
//   sweep 7: the gradients of kind 2 at (h, l), sum G and sum H in closed form (akl_row).
// Every thread of a launch meets the same reductions and barriers (rows.cuh). Launched on the caller's stream;
// no host read.
#include "../akl_math.h"
#include "common.cuh"
#include "rows.cuh"

namespace fastkd {
namespace {

constexpr int kRadixBins = 256;

// The three running log-sum-exps of a row: student at 1/T, student at T = 1, teacher at 1/T_t.
struct AklLse {
  DivLse s, s1, t;
};

__device__ __forceinline__ AklLse akl_lse_empty() { return {div_lse_empty(), div_lse_empty(), div_lse_empty()}; }

__device__ __forceinline__ DivLse shfl_lse(const DivLse& v, int offset) {
  return {fastkd::shfl_xor(v.m, offset), fastkd::shfl_xor(v.z, offset)};
}
// Found by argument-dependent lookup from RowTeam::reduce.
__device__ __forceinline__ AklLse shfl_xor(const AklLse& v, int offset) {
  return {shfl_lse(v.s, offset), shfl_lse(v.s1, offset), shfl_lse(v.t, offset)};
}

struct Sum4 {
  float kl_pq, kl_qp, g_head, g_tail;
};
__device__ __forceinline__ Sum4 shfl_xor(const Sum4& v, int offset) {
  return {fastkd::shfl_xor(v.kl_pq, offset), fastkd::shfl_xor(v.kl_qp, offset), fastkd::shfl_xor(v.g_head, offset),
          fastkd::shfl_xor(v.g_tail, offset)};
}

template <bool kWarp>
__device__ __forceinline__ void team_sync() {
  if constexpr (kWarp) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// f(c, y) for every column c of the split, y = t[c] as float (the teacher alone; packs of W as the row's split).
template <int W, typename T, typename F>
__device__ __forceinline__ void sweep_teacher(const RowSplit<W>& sp, const T* t, F&& f) {
  for (int64_t c = sp.lane; c < sp.head; c += sp.lanes) f(c, to_float(t[c]));
  const int64_t step = static_cast<int64_t>(sp.lanes) * W;
  for (int64_t c = sp.head + static_cast<int64_t>(sp.lane) * W; c < sp.body_end; c += step) {
    const Pack<T, W> v = *reinterpret_cast<const Pack<T, W>*>(t + c);
#pragma unroll
    for (int k = 0; k < W; ++k) f(c + k, to_float(v.v[k]));
  }
  for (int64_t c = sp.body_end + sp.lane; c < sp.n; c += sp.lanes) f(c, to_float(t[c]));
}

template <bool kWarp, typename S, typename T>
__global__ void __launch_bounds__(kRowBlockBound<kWarp>, kRowMinBlocks<kWarp>)
    akl_kernel(const DivergenceArgs args, bool packs) {
  constexpr int W = kPackWidth<S, T>;
  __shared__ AklLse lse_scratch[32];
  __shared__ Sum4 sum_scratch[32];
  __shared__ float hist_all[(kWarp ? kWarpRowsPerBlock : 1) * kRadixBins];
  const RowTeam<kWarp> team;
  float* hist = hist_all + (kWarp ? (threadIdx.x >> 5) * kRadixBins : 0);
  const bool live = team.row < args.rows;
  const float w = live ? args.row_weight[team.row] : 0.0f;
  const bool counted = w != 0.0f;
  const int64_t g = counted && args.target ? args.target[team.row] : -1;  // a skipped row's target is not read
  const bool ok = counted && (!args.target || (g >= 0 && g < args.cols));
  const int64_t V = args.cols, offset = team.row * V;  // 64-bit: rows * V may pass 2^31
  const S* s = static_cast<const S*>(args.student) + offset;
  const T* t = static_cast<const T*>(args.teacher) + offset;
  S* gs = args.grad_student ? static_cast<S*>(args.grad_student) + offset : nullptr;
  T* gt = args.grad_teacher ? static_cast<T*>(args.grad_teacher) + offset : nullptr;
  const RowSplit<W> sp = split_row<W>(offset, ok ? V : 0, packs, team.lane, team.lanes);
  const float inv_t = 1.0f / args.temperature, mu = args.a;
  // the teacher's own 1/T_t wherever its logits are scaled (0: the temperature's; then every step as before)
  const float inv_tt = args.teacher_temperature > 0.0f ? 1.0f / args.teacher_temperature : inv_t;
  const bool ce = args.target != nullptr;

  // sweep 1: the row statistics
  AklLse st = akl_lse_empty();
  sweep_row(sp, s, t, [&](int64_t, float x, float y) {
    div_lse_push(st.s, x, inv_t);
    div_lse_push(st.t, y, inv_tt);
    if (ce) div_lse_push(st.s1, x, 1.0f);
  });
  st = team.reduce(st, akl_lse_empty(),
                   [inv_t, inv_tt](AklLse u, const AklLse& v) {
                     div_lse_merge(u.s, v.s, inv_t);
                     div_lse_merge(u.s1, v.s1, 1.0f);
                     div_lse_merge(u.t, v.t, inv_tt);
                     return u;
                   },
                   lse_scratch);
  const float ls = div_lse_log(st.s), lt = div_lse_log(st.t), l1 = div_lse_log(st.s1);

  // sweeps 2-5: the radix selection of the head's threshold (x_star: the smallest head key; 0 = every class)
  uint64_t x_star = 0;
  bool searching = mu < 1.0f;  // the same in every lane of the team (from shared sums and uniform values)
  uint32_t prefix = 0;
  double above = 0.0;  // the teacher mass of the keys above the prefix
  // The tail's most probable class has p >= (1 - mu) / V (the classes at or below it hold 1 - mu or more, at most V
  // of them), so a class below half that is below the boundary key: leaving it out of the histograms changes no bin
  // the walk reads before it stops (the boundary bin keeps every key at or above the boundary's). Most of a real LM
  // teacher's row, and fewer shared-memory atomics on the few bins the top digits use.
  const float p_min = 0.5f * (1.0f - mu) / static_cast<float>(V);
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    const uint32_t fixed = pass == 0 ? 0u : (0xFFFFFFFFu << (shift + 8));  // the bits the prefix has decided
    for (int b = team.lane; b < kRadixBins; b += team.lanes) hist[b] = 0.0f;
    team_sync<kWarp>();
    if (searching) {
      sweep_teacher(sp, t, [&](int64_t, float y) {
        const uint32_t key = akl_key(y);
        if ((key & fixed) == prefix) {
          const float p = div_exp(div_log_prob(y, st.t.m, inv_tt, lt));
          if (p >= p_min) atomicAdd(&hist[(key >> shift) & 0xFFu], p);
        }
      });
    }
    team_sync<kWarp>();
    if (searching) {
      int bin = kRadixBins - 1;
      for (; bin >= 0; --bin) {
        const double m = hist[bin];
        if (above + m > mu) break;
        above += m;
      }
      if (bin < 0) {  // nothing passes mu (rounding): every key with this prefix is head
        x_star = prefix;
        searching = false;
      } else {
        prefix |= static_cast<uint32_t>(bin) << shift;
        if (pass == 3) x_star = static_cast<uint64_t>(prefix) + 1;  // the tail starts at the prefix's key
      }
    }
    team_sync<kWarp>();  // the bins are read above before the next pass clears them
  }

  // sweep 6: the two KLs and the gaps by side
  Sum4 sums = {0.0f, 0.0f, 0.0f, 0.0f};
  sweep_row(sp, s, t, [&](int64_t, float x, float y) {
    const float lq = div_log_prob(x, st.s.m, inv_t, ls), lp = div_log_prob(y, st.t.m, inv_tt, lt);
    const float q = div_exp(lq), p = div_exp(lp), delta = lp - lq;
    sums.kl_pq += where_positive(p, p * delta);
    sums.kl_qp += where_positive(q, -q * delta);
    const float gap = fabsf(p - q);
    const bool head = akl_key(y) >= x_star || y == st.t.m;
    (head ? sums.g_head : sums.g_tail) += gap;
  });
  sums = team.reduce(sums, Sum4{0.0f, 0.0f, 0.0f, 0.0f},
                     [](const Sum4& u, const Sum4& v) {
                       return Sum4{u.kl_pq + v.kl_pq, u.kl_qp + v.kl_qp, u.g_head + v.g_head, u.g_tail + v.g_tail};
                     },
                     sum_scratch);
  const DivGateRow ar = akl_row(sums.g_head, sums.g_tail, sums.kl_pq, sums.kl_qp);

  // sweep 7: the gradients (skipped rows: 0; a bad target: NaN)
  if (!ok) fill_row_grads(split_row<W>(offset, live ? V : 0, packs, team.lane, team.lanes), gs, gt,
                          counted ? NAN : 0.0f);
  if (gs || gt) {
    // the chain factors of the logits: 1/T for the student, 1/T_t for the teacher
    const float coef = w * args.soft_scale * inv_t, coef_t = w * args.soft_scale * inv_tt;
    const float cew = w * args.ce_weight;
    const bool with_ce = ce && args.ce_weight != 0.0f;
    sweep_row_grads(sp, s, t, gs, gt, [&](int64_t c, float x, float y) {
      const float lq = div_log_prob(x, st.s.m, inv_t, ls), lp = div_log_prob(y, st.t.m, inv_tt, lt);
      const float q = div_exp(lq), p = div_exp(lp);
      const DivTerms e = div_terms_any(ar.d, p, q, lp, lq);
      float g_s = coef * (e.g - q * ar.sum_g);
      if (with_ce) g_s += cew * (div_exp(div_log_prob(x, st.s1.m, 1.0f, l1)) - (c == g ? 1.0f : 0.0f));
      return GradPair{g_s, coef_t * (e.h - p * ar.sum_h)};
    });
  }
  if (live && team.lane == 0) {
    float loss = 0.0f, soft_w = 0.0f, hard_w = 0.0f;
    if (counted && !ok) {
      loss = soft_w = hard_w = NAN;
    } else if (counted) {
      const float hard = ce ? div_ce_hard(st.s1, to_float(s[g])) : 0.0f;
      soft_w = w * (args.soft_scale * ar.soft);
      hard_w = w * hard;
      loss = args.ce_weight != 0.0f ? soft_w + args.ce_weight * hard_w : soft_w;
    }
    args.loss_rows[team.row] = loss;
    args.soft_rows[team.row] = soft_w;
    args.hard_rows[team.row] = hard_w;
  }
}

}  // namespace

cudaError_t akl_fwd_cuda(const DivergenceArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  const RowPlan plan = plan_rows(args.rows, args.cols);
  FASTKD_DISPATCH_ONE(args.s_dtype, S, FASTKD_DISPATCH_ONE(args.t_dtype, T, {
    const bool packs = rows_vectorizable<S, T>(args.student, args.teacher, args.grad_student, args.grad_teacher);
    with_row_team(plan, [&](auto warp) {
      akl_kernel<decltype(warp)::value, S, T><<<plan.blocks, plan.threads, 0, stream>>>(args, packs);
    });
  }))
  return cudaGetLastError();
}

}  // namespace fastkd
