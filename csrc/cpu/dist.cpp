// DIST on the CPU (math and gradient in csrc/dist_math.h). The intra-class term
// needs each class's statistics over the whole batch before any gradient can be
// written, so the logits are read in three passes:
//   1. per row (parallel over rows): the softmax normalisers lse(s/tau), lse(t/tau);
//   2. per tile of kRowSlice rows x kClassBlock classes (parallel over tiles): float64
//      sums of y_s, y_t, y_s^2, y_t^2, y_s y_t for each class of the tile, written to
//      its own slot of a [slices, 5, C] buffer; the slices are then added in slice
//      order. A fixed tiling (it depends on N and C only, not on the thread count)
//      with one writer per slot: no races, the same bits on every run;
//   3. per row (parallel over rows), two sweeps of the row: the first computes
//      y_s, y_t into per-thread row buffers and the row's correlation sums and
//      dot products <y, G> (only those of the nets whose gradient is wanted, so
//      that only the class arrays they need are read); the second (only when a
//      gradient is wanted) writes the gradients from the buffers, both nets in one loop.
// Temporaries: [N] and [C] statistics, the [ceil(N / kRowSlice), 5, C] float64 partial
// sums (about 2% of the bytes of a float32 [N, C]), and two float32 rows per thread.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../dist_math.h"
#include "loss_common.h"

namespace fastkd {
namespace {

// Pass-2 tiles: rows are read in stretches of 4096 classes (16 KiB of float32, several
// pages, which the prefetchers stream twice as fast as 2 KiB stretches); the tile's 5
// float64 sums (160 KiB) stay in L2.
constexpr int64_t kClassBlock = 4096;
constexpr int64_t kRowSlice = 2048;   // partial sums: ceil(N / 2048) slices of [5, C] float64

// lse of a row (online over chunks: chunk max, then the sum relative to it).
FASTKD_INLINE float row_lse(const float* x, int64_t C, float inv_tau) {
  float m = -INFINITY, z = 0.0f;
  for (int64_t c0 = 0; c0 < C; c0 += kStatsChunk) {
    const int64_t n = std::min(kStatsChunk, C - c0);
    const float* xc = x + c0;
    float cm = -INFINITY;
#pragma omp simd reduction(max : cm)
    for (int64_t j = 0; j < n; ++j) cm = xc[j] * inv_tau > cm ? xc[j] * inv_tau : cm;
    const float base = cm == -INFINITY ? 0.0f : cm;
    float cz = 0.0f;
#pragma omp simd reduction(+ : cz)
    for (int64_t j = 0; j < n; ++j) cz += vexp(xc[j] * inv_tau - base);
    const float nm = max_ignoring_nan(m, cm);
    z = z * rescale(m, nm) + cz * rescale(cm, nm);
    m = nm;
  }
  return m + logf(z);
}

FASTKD_CPU_CLONES
void dist_lse_row(const float* s, const float* t, int64_t C, float inv_tau, float* lse_s, float* lse_t) {
  *lse_s = row_lse(s, C, inv_tau);
  *lse_t = row_lse(t, C, inv_tau);
}

// Adds the five class sums of one row stretch of n classes to acc[0..4][n].
FASTKD_CPU_CLONES
void dist_class_sums(const float* s, const float* t, int64_t n, float inv_tau, float lse_s, float lse_t, double* acc,
                     int64_t stride) {
  double *sx = acc, *sy = acc + stride, *sxx = acc + 2 * stride, *syy = acc + 3 * stride, *sxy = acc + 4 * stride;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const double x = vexp(s[j] * inv_tau - lse_s), y = vexp(t[j] * inv_tau - lse_t);
    sx[j] += x;
    sy[j] += y;
    sxx[j] += x * x;
    syy[j] += y * y;
    sxy[j] += x * y;
  }
}

// Per-class arrays of pass 3 (structure of arrays so that the row loops vectorise).
struct ClassArrays {
  const float *ms, *mt, *u, *vs, *vt;
};

// Sums of one row in sweep 1 of pass 3: the centred P, V_s, V_t of its correlation,
// and the pieces of <y, G> (dist_math.h): A_st, A_ss, A_ts, A_tt and the class parts
// J_s = sum y_s G_s^class, J_t = sum y_t G_t^class.
struct RowSums {
  float p, vs, vt, a_st, a_ss, a_ts, a_tt, js, jt;
};

// Sweep 1: the row's sums and, when a gradient is wanted, y into ys / yt. Only the
// pieces of the nets whose gradient is wanted are summed, so the per-class arrays
// are read only as needed: none for the loss alone, four of the five for one net
// (the class sweeps are bound by these reads: 4 bytes each per element, as many as
// the logits themselves).
template <bool kGradS, bool kGradT>
FASTKD_INLINE RowSums dist_row_sweep_impl(const float* s, const float* t, int64_t C, float inv_tau, float lse_s,
                                          float lse_t, ClassArrays k, float* ys, float* yt) {
  const float inv_c = 1.0f / static_cast<float>(C);
  float p = 0.0f, vs = 0.0f, vt = 0.0f, a_st = 0.0f, a_ss = 0.0f, a_ts = 0.0f, a_tt = 0.0f, js = 0.0f, jt = 0.0f;
#pragma omp simd reduction(+ : p, vs, vt, a_st, a_ss, a_ts, a_tt, js, jt)
  for (int64_t j = 0; j < C; ++j) {
    const float x = vexp(s[j] * inv_tau - lse_s), y = vexp(t[j] * inv_tau - lse_t);
    const float xc = x - inv_c, yc = y - inv_c;
    p += xc * yc;
    vs += xc * xc;
    vt += yc * yc;
    if (kGradS || kGradT) ys[j] = x, yt[j] = y;
    if (kGradS) {
      a_st += x * yc;
      a_ss += x * xc;
      js += x * dist_term(k.u[j], k.vs[j], x, y, k.ms[j], k.mt[j]);
    }
    if (kGradT) {
      a_ts += y * xc;
      a_tt += y * yc;
      jt += y * dist_term(k.u[j], k.vt[j], y, x, k.mt[j], k.ms[j]);
    }
  }
  return {p, vs, vt, a_st, a_ss, a_ts, a_tt, js, jt};
}

FASTKD_CPU_CLONES
RowSums dist_row_sweep(const float* s, const float* t, int64_t C, float inv_tau, float lse_s, float lse_t,
                       ClassArrays k, float* ys, float* yt, bool grad_s, bool grad_t) {
  if (grad_s && grad_t) return dist_row_sweep_impl<true, true>(s, t, C, inv_tau, lse_s, lse_t, k, ys, yt);
  if (grad_s) return dist_row_sweep_impl<true, false>(s, t, C, inv_tau, lse_s, lse_t, k, ys, yt);
  if (grad_t) return dist_row_sweep_impl<false, true>(s, t, C, inv_tau, lse_s, lse_t, k, ys, yt);
  return dist_row_sweep_impl<false, false>(s, t, C, inv_tau, lse_s, lse_t, k, ys, yt);
}

// Sweep 2: dL/dx = (1/tau) y (G - <y, G>) for the nets whose gradient row is non-null,
// in one loop for both nets (each class array read once per element, not twice).
template <bool kGradS, bool kGradT>
FASTKD_INLINE void dist_grad_sweep_impl(const float* ys, const float* yt, int64_t C, float inv_tau,
                                        const DistCoef& row, float dot_s, float dot_t, ClassArrays k, float* gs,
                                        float* gt) {
  const float inv_c = 1.0f / static_cast<float>(C);
#pragma omp simd
  for (int64_t j = 0; j < C; ++j) {
    const float x = ys[j], y = yt[j];
    if (kGradS) {
      const float g = dist_term(row.u, row.vs, x, y, inv_c, inv_c) + dist_term(k.u[j], k.vs[j], x, y, k.ms[j], k.mt[j]);
      gs[j] = inv_tau * x * (g - dot_s);
    }
    if (kGradT) {
      const float g = dist_term(row.u, row.vt, y, x, inv_c, inv_c) + dist_term(k.u[j], k.vt[j], y, x, k.mt[j], k.ms[j]);
      gt[j] = inv_tau * y * (g - dot_t);
    }
  }
}

FASTKD_CPU_CLONES
void dist_grad_sweep(const float* ys, const float* yt, int64_t C, float inv_tau, const DistCoef& row, float dot_s,
                     float dot_t, ClassArrays k, float* gs, float* gt) {
  if (gs && gt) dist_grad_sweep_impl<true, true>(ys, yt, C, inv_tau, row, dot_s, dot_t, k, gs, gt);
  else if (gs) dist_grad_sweep_impl<true, false>(ys, yt, C, inv_tau, row, dot_s, dot_t, k, gs, gt);
  else if (gt) dist_grad_sweep_impl<false, true>(ys, yt, C, inv_tau, row, dot_s, dot_t, k, gs, gt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                            double beta, double gamma, double temperature,
                                                            bool grad_student, bool grad_teacher) {
  check_logit_pair(student, teacher);
  const int64_t N = student.size(0), C = student.size(1);
  at::Tensor gs = grad_like(student, grad_student), gt = grad_like(teacher, grad_teacher);
  if (N == 0 || C == 0) {  // no rows: loss 0 (the reference's convention), zero gradients
    if (grad_student) gs.zero_();
    if (grad_teacher) gt.zero_();
    return {at::zeros({}, student.options().dtype(at::kFloat)), gs, gt};
  }
  const float inv_tau = static_cast<float>(1.0 / temperature);
  const double tau2 = temperature * temperature;

  // pass 1: row normalisers
  std::vector<float> lse_s(N), lse_t(N);
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf, tbuf;
    for (int64_t i = begin; i < end; ++i) {
      dist_lse_row(input_row(student, i, sbuf), input_row(teacher, i, tbuf), C, inv_tau, &lse_s[i], &lse_t[i]);
    }
  });

  // pass 2: class sums per tile, then the slices added in order
  const int64_t slices = (N + kRowSlice - 1) / kRowSlice, blocks = (C + kClassBlock - 1) / kClassBlock;
  std::vector<double> partial(static_cast<size_t>(slices) * 5 * C, 0.0);
  at::parallel_for(0, slices * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf, tbuf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t slice = task / blocks, c0 = (task % blocks) * kClassBlock;
      const int64_t n = std::min(kClassBlock, C - c0);
      double* acc = partial.data() + slice * 5 * C + c0;
      for (int64_t i = slice * kRowSlice; i < std::min(N, (slice + 1) * kRowSlice); ++i) {
        dist_class_sums(input_span(student, i * C + c0, n, sbuf), input_span(teacher, i * C + c0, n, tbuf), n,
                        inv_tau, lse_s[i], lse_t[i], acc, C);
      }
    }
  });
  std::vector<float> cls(static_cast<size_t>(5) * C);
  const ClassArrays k{cls.data(), cls.data() + C, cls.data() + 2 * C, cls.data() + 3 * C, cls.data() + 4 * C};
  double rho_classes = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    double sum[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t slice = 0; slice < slices; ++slice) {
      for (int q = 0; q < 5; ++q) sum[q] += partial[(slice * 5 + q) * C + c];
    }
    float ms, mt;
    const DistCoef coef = dist_class(sum[0], sum[1], sum[2], sum[3], sum[4], static_cast<double>(N), tau2 * gamma / C,
                                     ms, mt);
    cls[c] = ms, cls[C + c] = mt, cls[2 * C + c] = coef.u, cls[3 * C + c] = coef.vs, cls[4 * C + c] = coef.vt;
    rho_classes += coef.rho;
  }

  // pass 3: row correlations and the gradients
  std::vector<float> rho_rows(N);
  const double scale_row = tau2 * beta / N;
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf, tbuf, ys(C), yt(C), gsbuf, gtbuf;
    for (int64_t i = begin; i < end; ++i) {
      const RowSums sums = dist_row_sweep(input_row(student, i, sbuf), input_row(teacher, i, tbuf), C, inv_tau,
                                          lse_s[i], lse_t[i], k, ys.data(), yt.data(), grad_student, grad_teacher);
      const DistCoef row = dist_row(sums.p, sums.vs, sums.vt, scale_row);
      rho_rows[i] = row.rho;
      if (grad_student || grad_teacher) {
        const float dot_s = row.u * sums.a_st + row.vs * sums.a_ss + sums.js;
        const float dot_t = row.u * sums.a_ts + row.vt * sums.a_tt + sums.jt;
        float* gs_row = output_row(gs, i, gsbuf);
        float* gt_row = output_row(gt, i, gtbuf);
        dist_grad_sweep(ys.data(), yt.data(), C, inv_tau, row, dot_s, dot_t, k, gs_row, gt_row);
        output_row_done(gs, i, gsbuf);
        output_row_done(gt, i, gtbuf);
      }
    }
  });
  double rho_sum_rows = 0.0;
  for (int64_t i = 0; i < N; ++i) rho_sum_rows += rho_rows[i];
  const double loss = tau2 * (beta * (1.0 - rho_sum_rows / N) + gamma * (1.0 - rho_classes / C));
  return {at::scalar_tensor(static_cast<float>(loss), student.options().dtype(at::kFloat)), gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("dist_fwd", &dist_fwd_cpu); }

}  // namespace fastkd
