// fastkd::akl_fwd on the CPU: the adaptive KL (math in csrc/akl_math.h, contract in docs/design.md, "akl_fwd"),
// one dense row at a time, parallel over rows, vectorised over classes.
//
// The head is a threshold on the teacher's logits. Instead of the four 8-bit radix passes over the logits'
// keys (the CUDA kernel's), the CPU bins the teacher's log-probs below the maximum, u = (M_t - t) / T, into
// kBins equal bins over [0, u_cut): u is monotone in t (rounding is monotone), so each bin is an interval of
// logits and tied logits share a bin. u_cut is where p = (1 - mu) / (2 V): the tail's most probable class has
// p >= (1 - mu) / V (the classes at or below it hold at least 1 - mu, at most V of them), so the classes past
// u_cut are tail whatever their mass (most of a real LM teacher's row) and go to dump slots. One scalar scatter
// of the teacher mass into that histogram rides the terms pass; walking it from the top finds the boundary bin
// (the first whose mass takes the running mass past mu), and only that bin's classes are collected and sorted
// by logit, in the pass that sums the gaps |p - q| of the other bins by side. One scatter instead of four
// histogram passes over the row, the bins adapted to the row, and a boundary resolved on the exact logits:
// the CPU needs no selection pass of its own.
//
// Per row: (1) statistics in chunks of kStatsChunk columns: chunk maxima (raw units), the exps relative to them
// kept (the student's in the gradient row when it is float32); (2) per class KL(p || q), KL(q || p) and the
// total gap in double, the parts q (lq - lp), p (lp - lq) kept in the gradient rows, the bin of each class and
// the mass histogram; (3) the gaps of the bins above and below the boundary bin, its classes collected and
// sorted; (4) the gradients of kind 2 at (h, l) from the kept exps and parts (the logits are not read again,
// except for the cross-entropy at T != 1). mu = 1 makes every class head: (3) is skipped.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "loss_common.h"
#include "../akl_math.h"

namespace fastkd {
namespace {

constexpr int kBins = 2048;
// The classes that cannot reach the head (and -inf, NaN) go to kDumpSlots slots past the bins, by column (their
// mass is never read; one slot would make a run of them wait on one address).
constexpr int kDumpSlots = 64;
constexpr int kHist = kBins + kDumpSlots;

struct AklCall {
  double mu;  // (a float would make a mu within 6e-8 of 1 select nothing)
  // the teacher at its own temperature T_t: inv_tt = 1 / T_t, rho = T / T_t (exactly inv_t, 1 at T_t = T; see
  // TeacherScale); the head is selected on p = softmax(t / T_t)
  float T, inv_t, inv_tt, rho, soft_scale, ce_weight;
  int64_t V;
};

struct AklRowOut {
  float soft, hard;
};

// A class of the boundary bin: its logit, teacher mass and gap.
struct AklCandidate {
  float t, p, gap;
};

struct AklScratch {
  std::vector<float> s_conv, t_conv, gs_conv, gt_conv;  // dtype conversion of one row
  std::vector<float> kept_s, kept_t, g_row, chunk_max;
  std::vector<uint16_t> bins;
  std::vector<float> hist;  // two copies of kHist, alternate classes: neighbours in one bin do not wait on each other
  std::vector<AklCandidate> cand;
};

template <typename X>
X* sized(std::vector<X>& v, int64_t n) {
  v.resize(n);
  return v.data();
}

// The bin of logit t in column j: its teacher log-prob below the maximum's, u = (mt - t) / T_t in [0, u_cut), in
// kBins equal bins (0 at the maximum), monotone in t; from u_cut on (and -inf, NaN) a dump slot.
FASTKD_INLINE int bin_of(float t, int64_t j, float mt, float inv_tt, float u_cut, float scale) {
  const float u = (mt - t) * inv_tt;
  return u < u_cut ? std::min(static_cast<int>(u * scale), kBins - 1) : kBins + static_cast<int>(j & (kDumpSlots - 1));
}

FASTKD_INLINE float to_prob(float chunk_max, float row_max, float inv_t, float l) {
  return expf(raw_gap(chunk_max, row_max) * inv_t - l);  // 0 for an all -inf chunk
}

// (2) of one chunk: the two KLs and the total gap (double sums); with kG / kH the parts q (lq - lp) and
// p (lp - lq) of G and H, with kBin each class's bin. Templated: a loop-invariant branch per store kept GCC from
// vectorising the loop.
template <bool kG, bool kH, bool kBin>
FASTKD_INLINE void akl_terms_chunk(const float* s, const float* t, int64_t n, float ms, float mt, float inv_t,
                                   float inv_tt, float rho, float dl, float u_cut, float scale, float to_q,
                                   float to_p, const float* kept_s, const float* kept_t, float* g_row, float* kpq,
                                   uint16_t* bins, double& kl_pq, double& kl_qp, double& gap) {
  double a = 0.0, b = 0.0, d = 0.0;
#pragma omp simd reduction(+ : a, b, d)
  for (int64_t j = 0; j < n; ++j) {
    const float q = kept_s[j] * to_q, p = kept_t[j] * to_p;
    // lp - lq from the raw logits, each maximum first (as divergence_fwd; the teacher's in the student's units)
    const float delta = ((t[j] - mt) * rho - (s[j] - ms)) * inv_t + dl;
    const float fwd = where_positive(p, p * delta), rev = where_positive(q, -q * delta);
    a += fwd, b += rev, d += fabsf(p - q);
    if (kG) g_row[j] = rev;
    if (kH) kpq[j] = fwd;
    if (kBin) bins[j] = static_cast<uint16_t>(bin_of(t[j], j, mt, inv_tt, u_cut, scale));
  }
  kl_pq += a, kl_qp += b, gap += d;
}

// One counted row (g: its target, -1 without): the unweighted soft and hard losses; writes the weighted
// gradients (gs / gt may be null).
FASTKD_CPU_CLONES
AklRowOut akl_row_cpu(const AklCall& c, const float* s, const float* t, int64_t g, float w, float* gs, float* gt,
                      AklScratch& sc) {
  const int64_t V = c.V, nc = (V + kStatsChunk - 1) / kStatsChunk;
  const float inv_t = c.inv_t, inv_tt = c.inv_tt;
  float* kept_s = gs ? gs : sized(sc.kept_s, V);
  float* kept_t = sized(sc.kept_t, V);
  float* chunk_mx = sized(sc.chunk_max, 2 * nc);
  const bool ce1 = g >= 0 && c.T != 1.0f;  // the cross-entropy's sums at T = 1 need their own exps

  // (1) statistics
  DivLse st_s = div_lse_empty(), st_t = div_lse_empty(), st_1 = div_lse_empty();
  for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
    const int64_t n = std::min(kStatsChunk, V - c0);
    const ChunkMax m = chunk_max(s + c0, t + c0, n);
    const float bs = m.bs, bt = m.bt;
    float zs = 0.0f, zt = 0.0f, z1 = 0.0f;
    const float* sc0 = s + c0;
    const float* tc0 = t + c0;
    float* ks = kept_s + c0;
    float* kt = kept_t + c0;
#pragma omp simd reduction(+ : zs, zt)
    for (int64_t j = 0; j < n; ++j) {
      const float es = vexp((sc0[j] - bs) * inv_t), et = vexp((tc0[j] - bt) * inv_tt);  // raw differences first
      ks[j] = es, kt[j] = et;
      zs += es;
      zt += et;
    }
    if (ce1) {
#pragma omp simd reduction(+ : z1)
      for (int64_t j = 0; j < n; ++j) z1 += vexp(sc0[j] - bs);
      div_lse_merge(st_1, DivLse{m.ms, z1}, 1.0f);
    }
    chunk_mx[2 * k] = m.ms, chunk_mx[2 * k + 1] = m.mt;
    div_lse_merge(st_s, DivLse{m.ms, zs}, inv_t);
    div_lse_merge(st_t, DivLse{m.mt, zt}, inv_tt);
  }
  if (g >= 0 && !ce1) st_1 = st_s;  // T = 1: the same sums
  const float ms = st_s.m, ls = div_lse_log(st_s), mt = st_t.m, lt = div_lse_log(st_t), dl = ls - lt;
  const bool nan_row = ls != ls || lt != lt;  // the xlogy selects below could hide a NaN logit
  const bool select = c.mu < 1.0 && !nan_row;  // mu = 1: every class is head

  // (2) the two KLs and the total gap; the parts of G and H; the bins and the mass histogram
  float* g_row = gs ? sized(sc.g_row, V) : nullptr;
  float* kpq = gt;  // p (lp - lq) in the teacher's gradient row until (4)
  uint16_t* bins = select ? sized(sc.bins, V) : nullptr;
  float* hist = select ? sized(sc.hist, 2 * kHist) : nullptr;
  if (select) std::fill(hist, hist + 2 * kHist, 0.0f);
  // Only a class with p >= (1 - mu) / V can be the tail's most probable (the classes at or below it hold at
  // least 1 - mu, at most V of them), so the bins span the log-probs down to half that (rounding): u_cut above
  // log 2 (lt <= log V), the classes past it are tail whatever their mass (most of a real LM teacher's row).
  const float u_cut = static_cast<float>(log(2.0 * static_cast<double>(V) / (1.0 - c.mu))) - lt;
  const float scale = static_cast<float>(kBins) / u_cut;
  double kl_pq = 0.0, kl_qp = 0.0, gap_all = 0.0;
  for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
    const int64_t n = std::min(kStatsChunk, V - c0);
    const float to_q = to_prob(chunk_mx[2 * k], ms, inv_t, ls), to_p = to_prob(chunk_mx[2 * k + 1], mt, inv_tt, lt);
    const int form = (g_row ? 1 : 0) | (kpq ? 2 : 0) | (bins ? 4 : 0);
    float* gr = g_row ? g_row + c0 : nullptr;
    float* kh = kpq ? kpq + c0 : nullptr;
    uint16_t* bn = bins ? bins + c0 : nullptr;
#define FASTKD_AKL_TERMS(F)                                                                                   \
  akl_terms_chunk<(F & 1) != 0, (F & 2) != 0, (F & 4) != 0>(s + c0, t + c0, n, ms, mt, inv_t, inv_tt, c.rho, dl, \
                                                             u_cut, scale, to_q, to_p, kept_s + c0, kept_t + c0, gr, \
                                                             kh, bn, kl_pq, kl_qp, gap_all)
    switch (form) {
      case 0: FASTKD_AKL_TERMS(0); break;
      case 1: FASTKD_AKL_TERMS(1); break;
      case 2: FASTKD_AKL_TERMS(2); break;
      case 3: FASTKD_AKL_TERMS(3); break;
      case 4: FASTKD_AKL_TERMS(4); break;
      case 5: FASTKD_AKL_TERMS(5); break;
      case 6: FASTKD_AKL_TERMS(6); break;
      default: FASTKD_AKL_TERMS(7); break;
    }
#undef FASTKD_AKL_TERMS
    if (select) {
      const uint16_t* bc = bins + c0;
      const float* kt = kept_t + c0;
      float* h0 = hist;
      float* h1 = hist + kHist;
      int64_t j = 0;
      for (; j + 1 < n; j += 2) {
        h0[bc[j]] += kt[j] * to_p;
        h1[bc[j + 1]] += kt[j + 1] * to_p;
      }
      if (j < n) h0[bc[j]] += kt[j] * to_p;
    }
  }

  // the boundary bin: the first (from the top) whose mass takes the mass above it past mu
  double above = 0.0;
  int boundary = -1;
  if (select) {
    for (int bin = 0; bin < kBins; ++bin) {  // (the dump is tail: see u_cut)
      const double m = double(hist[bin]) + double(hist[kHist + bin]);
      if (above + m > c.mu) {
        boundary = bin;
        break;
      }
      above += m;
    }
  }

  // (3) the gaps by side; the boundary bin's classes resolved by their logits
  double g_head = gap_all, g_tail = 0.0;
  if (boundary >= 0) {
    g_head = 0.0;
    const uint16_t bb = static_cast<uint16_t>(boundary);
    sc.cand.clear();
    for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
      const int64_t n = std::min(kStatsChunk, V - c0);
      const float to_q = to_prob(chunk_mx[2 * k], ms, inv_t, ls), to_p = to_prob(chunk_mx[2 * k + 1], mt, inv_tt, lt);
      const float* ks = kept_s + c0;
      const float* kt = kept_t + c0;
      const uint16_t* bc = bins + c0;
      float hd = 0.0f, tl = 0.0f;  // positive terms, one chunk: float lanes, then double
      int in_bin = 0;
#pragma omp simd reduction(+ : hd, tl, in_bin)
      for (int64_t j = 0; j < n; ++j) {
        const float gap = fabsf(kt[j] * to_p - ks[j] * to_q);
        hd += bc[j] < bb ? gap : 0.0f;
        tl += bc[j] > bb ? gap : 0.0f;
        in_bin += bc[j] == bb ? 1 : 0;
      }
      g_head += hd, g_tail += tl;
      // collect them: blocks of 16 without one are skipped by a vectorised test
      for (int64_t j0 = 0; in_bin > 0 && j0 < n; j0 += 16) {
        const int64_t m = std::min<int64_t>(16, n - j0);
        int any = 0;
        for (int64_t j = 0; j < m; ++j) any |= bc[j0 + j] == bb;
        for (int64_t j = j0; any && j < j0 + m; ++j) {
          if (bc[j] != bb) continue;
          const float p = kt[j] * to_p;
          sc.cand.push_back({t[c0 + j], p, fabsf(p - ks[j] * to_q)});
          --in_bin;
        }
      }
    }
    std::sort(sc.cand.begin(), sc.cand.end(), [](const AklCandidate& x, const AklCandidate& y) { return x.t > y.t; });
    // walk the tie groups from the top: head while the mass at or above them stays <= mu (the maximum always)
    bool head = true;
    for (size_t i = 0; i < sc.cand.size();) {
      size_t e = i;
      double mass = 0.0, gap = 0.0;
      for (; e < sc.cand.size() && sc.cand[e].t == sc.cand[i].t; ++e) mass += sc.cand[e].p, gap += sc.cand[e].gap;
      head = head && ((boundary == 0 && i == 0) || above + mass <= c.mu);
      if (head) {
        above += mass, g_head += gap;
      } else {
        g_tail += gap;
      }
      i = e;
    }
  }
  const DivGateRow ar = akl_row(g_head, g_tail, static_cast<float>(kl_pq), static_cast<float>(kl_qp));

  // (4) gradients: kind 2 at (h, l) from the kept exps and parts
  if (gs || gt) {
    const float h = ar.d.a, l = ar.d.b, sum_g = ar.sum_g, sum_h = ar.sum_h;
    const float coef = w * c.soft_scale * inv_t, ce = (g >= 0 && c.ce_weight != 0.0f) ? w * c.ce_weight : 0.0f;
    const float coef_t = w * c.soft_scale * inv_tt;  // the teacher's chain factor is 1 / T_t
    const float m1 = st_1.m, l1 = g >= 0 ? div_lse_log(st_1) : 0.0f;
    for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
      const int64_t n = std::min(kStatsChunk, V - c0);
      const float to_q = to_prob(chunk_mx[2 * k], ms, inv_t, ls), to_p = to_prob(chunk_mx[2 * k + 1], mt, inv_tt, lt);
      const float* sc0 = s + c0;
      const float* kt = kept_t + c0;
      float* ks = kept_s + c0;  // == gs + c0 when gs: each class's kept exp is read before its gradient is written
      if (gt) {  // first: when gs is the kept row, the student loop below overwrites the kept exps
        float* out = gt + c0;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const float q = ks[j] * to_q, p = kt[j] * to_p;
          const float hh = (h != 0.0f ? h * out[j] : 0.0f) - l * q;
          out[j] = coef_t * (hh - p * sum_h);
        }
      }
      if (gs) {
        const float* gr = g_row + c0;
        float* out = gs + c0;
        if (ce != 0.0f && ce1) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const float q = ks[j] * to_q, p = kt[j] * to_p;
            const float gg = (l != 0.0f ? l * gr[j] : 0.0f) - h * p;
            out[j] = coef * (gg - q * sum_g) + ce * vexp(div_log_prob(sc0[j], m1, 1.0f, l1));
          }
        } else {
          const float ce_q = ce;  // T = 1: the cross-entropy's softmax is q (0 without one)
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const float q = ks[j] * to_q, p = kt[j] * to_p;
            const float gg = (l != 0.0f ? l * gr[j] : 0.0f) - h * p;
            out[j] = coef * (gg - q * sum_g) + ce_q * q;
          }
        }
      }
    }
  }
  AklRowOut out = {nan_row ? NAN : ar.soft, 0.0f};
  if (g >= 0) {
    out.hard = div_ce_hard(st_1, s[g]);
    if (gs && c.ce_weight != 0.0f) gs[g] -= w * c.ce_weight;
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> akl_fwd_cpu(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& topk_ids, const at::Tensor& target,
    const at::Tensor& row_weight, double temperature, int64_t kind, double a, double /*b*/, double /*w_p*/,
    double /*w_q*/, double soft_scale, double ce_weight, int64_t topk_mode, bool reduce, bool grad_student,
    bool grad_teacher, double teacher_temperature) {
  TORCH_CHECK_VALUE(kind == kAklKind, "fastkd: akl_fwd kind must be ", kAklKind, " (AKL), got ", kind);
  TORCH_CHECK_VALUE(a > 0.0 && a <= 1.0, "fastkd: akl_fwd a (mu) must be in (0, 1], got ", a);
  TORCH_CHECK_VALUE(topk_mode == 0 && topk_ids.numel() == 0,
                    "fastkd: akl_fwd takes a dense teacher (topk_mode 0, empty topk_ids), got topk_mode ", topk_mode);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature),
                    "fastkd: temperature must be a finite number > 0, got ", temperature);
  const TeacherScale ts = teacher_scale(temperature, teacher_temperature, "akl_fwd");
  TORCH_CHECK(student_in.device().is_cpu() && student_in.dim() == 2 && at::isFloatingType(student_in.scalar_type()),
              "fastkd: student must be a floating 2-D [N, V] CPU tensor, got ", student_in.scalar_type(), " ",
              student_in.sizes(), " on ", student_in.device());
  TORCH_CHECK(teacher_in.device().is_cpu() && teacher_in.dim() == 2 && at::isFloatingType(teacher_in.scalar_type()),
              "fastkd: teacher must be a floating 2-D CPU tensor, got ", teacher_in.scalar_type(), " ",
              teacher_in.sizes(), " on ", teacher_in.device());
  TORCH_CHECK(teacher_in.sizes() == student_in.sizes(), "fastkd: student and teacher shapes differ: ",
              student_in.sizes(), " and ", teacher_in.sizes());
  const int64_t N = student_in.size(0), V = student_in.size(1);
  // rows with unit column stride are read in place (row slices of a bigger tensor); other layouts are copied
  const at::Tensor student = student_in.stride(1) == 1 || V <= 1 ? student_in : student_in.contiguous();
  const at::Tensor teacher = teacher_in.stride(1) == 1 || V <= 1 ? teacher_in : teacher_in.contiguous();
  const bool has_target = target.numel() > 0;
  if (has_target) check_row_vector(target, N, at::kLong, "target");
  TORCH_CHECK_VALUE(has_target || ce_weight == 0.0 || N == 0,
                    "fastkd: ce_weight = ", ce_weight, " adds a cross-entropy term, which needs target");
  check_row_vector(row_weight, N, at::kFloat, "row_weight");

  AklCall c;
  c.mu = a;
  c.T = static_cast<float>(temperature), c.inv_t = 1.0f / c.T;
  c.inv_tt = ts.inv_tt, c.rho = ts.rho;
  c.soft_scale = static_cast<float>(soft_scale), c.ce_weight = static_cast<float>(ce_weight);
  c.V = V;

  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor gs = grad_like(student, grad_student), gt = grad_like(teacher_in, grad_teacher);
  at::Tensor loss_rows = at::zeros({N}, f32), soft_rows = at::zeros({N}, f32), hard_rows = at::zeros({N}, f32);
  if (N > 0 && V == 0) {
    if (gs.numel()) gs.zero_();
    if (gt.numel()) gt.zero_();
  } else if (N > 0) {
    const float* weight = row_weight.const_data_ptr<float>();
    const int64_t* tgt = has_target ? target.const_data_ptr<int64_t>() : nullptr;
    float* loss = loss_rows.mutable_data_ptr<float>();
    float* soft_out = soft_rows.mutable_data_ptr<float>();
    float* hard_out = hard_rows.mutable_data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      thread_local AklScratch sc;
      for (int64_t i = begin; i < end; ++i) {
        const float w = weight[i];
        float* gs_row = output_row(gs, i, sc.gs_conv);
        float* gt_row = output_row(gt, i, sc.gt_conv);
        if (w == 0.0f) {  // skipped: not read
          if (gs_row) std::fill(gs_row, gs_row + V, 0.0f);
          if (gt_row) std::fill(gt_row, gt_row + V, 0.0f);
        } else {
          int64_t g = -1;
          if (tgt) {
            g = tgt[i];
            TORCH_CHECK_VALUE(g >= 0 && g < V, "fastkd: target[", i, "] = ", g, " is outside [0, ", V, ")");
          }
          const float* s = input_span(student, i * student.stride(0), V, sc.s_conv);
          const float* t = input_span(teacher, i * teacher.stride(0), V, sc.t_conv);
          const AklRowOut r = akl_row_cpu(c, s, t, g, w, gs_row, gt_row, sc);
          soft_out[i] = w * c.soft_scale * r.soft;
          hard_out[i] = w * r.hard;
          loss[i] = soft_out[i] + (c.ce_weight != 0.0f ? c.ce_weight * hard_out[i] : 0.0f);
        }
        output_row_done(gs, i, sc.gs_conv);
        output_row_done(gt, i, sc.gt_conv);
      }
    });
  }
  if (reduce) return {loss_rows.sum(), soft_rows.sum(), hard_rows.sum(), gs, gt};
  return {loss_rows, soft_rows, hard_rows, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("akl_fwd", &akl_fwd_cpu); }

}  // namespace fastkd
