// Per-row math of DKD (decoupled KD), shared by the CPU (csrc/cpu/dkd.cpp) and
// CUDA (csrc/cuda/dkd.cu) kernels.
//
// One row, target g, temperature T, a = s / T (student), b = t / T (teacher);
// ' means "over the non-target classes c != g", for either net x in {a, b}:
//   lse'(x)       = logsumexp(x_c, c != g),   lse(x) = logaddexp(lse'(x), x_g)
//   log p_g       = x_g - lse(x)
//   log (1 - p_g) = lse'(x) - lse(x)                (no 1 - p: exact when p_g -> 1)
//   log q_c       = x_c - lse'(x)                   (softmax over c != g)
//   TCKD = p_tg (log p_tg - log p_sg) + (1 - p_tg) (log(1 - p_tg) - log(1 - p_sg))
//   NCKD = sum' q_tc (log q_tc - log q_sc) = E_qt[b - a] - lse'(b) + lse'(a)
//   R    = alpha TCKD + beta NCKD,   loss = w T^2 R,   dL/ds = w T dR/da,   dL/dt = w T dR/db
//
// The statistics of the non-target classes (running max and sum for both nets,
// and sum e_t (b - a) for NCKD, i.e. a KDStats over c != g) and the target
// logits are kept apart and combined only here. Tracking the full lse and
// subtracting the target afterwards would compute 1 - p_g as a difference that
// cancels to 0 when p_g -> 1 (a logit gap of 100 at T = 1); lse' taken relative
// to the non-target maximum stays exact.
//
// Gradient (p = softmax over all classes, q_c = p_c / (1 - p_g) for c != g):
//   d log p_sg / d a_g = 1 - p_sg      d log p_sg / d a_c = -p_sc
//   d log(1-p_sg)/d a_g = -p_sg        d log(1-p_sg)/d a_c = q_sc - p_sc
//   so, with d = p_sg - p_tg:
//   dTCKD/da_g = -p_tg (1 - p_sg) + (1 - p_tg) p_sg = d
//   dTCKD/da_c = p_tg p_sc - (1 - p_tg)(q_sc - p_sc) = q_sc (p_tg - p_sg) = -d q_sc
//   dNCKD/da_g = 0,   dNCKD/da_c = q_sc m_t - q_tc           (KL of softmaxes over c != g)
// where m_t = sum' q_tc is 1, or 0 when the teacher has no mass outside g (all its other
// logits -inf): NCKD is then 0 for every student (its teacher distribution is empty).
// Teacher: TCKD depends on b only through p_tg, d TCKD / d p_tg = R_g - R_r with
// R_g = log p_tg - log p_sg, R_r = log(1-p_tg) - log(1-p_sg); d p_tg / d b_g = p_tg (1 - p_tg),
// d p_tg / d b_c = -p_tg p_tc = -p_tg (1 - p_tg) q_tc. With D = (R_g - R_r) p_tg (1 - p_tg):
//   dTCKD/db_g = D,   dTCKD/db_c = -D q_tc
//   dNCKD/db_g = 0,   dNCKD/db_c = q_tc (log q_tc - log q_sc - NCKD)
// Together:
//   dR/da_g = alpha d              dR/da_c = (beta m_t - alpha d) q_sc - beta q_tc
//   dR/db_g = alpha D              dR/db_c = q_tc (beta (log q_tc - log q_sc - NCKD) - alpha D)
// d is taken as (1 - p_tg) - (1 - p_sg) when p_sg + p_tg > 1, where p_sg - p_tg would
// cancel; p_tg (1 - p_tg) as exp(log p_tg + log(1 - p_tg)). Terms with zero teacher
// probability (p_tg, 1 - p_tg or q_tc equal to 0) contribute exactly 0; NaN propagates.
#pragma once
#include "kd_math.h"

namespace fastkd {

// log(exp(x) + exp(y)) without overflow; -inf when both are -inf; NaN in, NaN out.
FASTKD_HD float logaddexp(float x, float y) {
  if (x != x || y != y) return x + y;
  const float m = x > y ? x : y;
  if (m == -INFINITY) return -INFINITY;
  return m + log1pf(expf(-fabsf(x - y)));
}

struct DKDRow {
  float norm_s, norm_t;  // lse' of each net, or +inf when it is -inf (see dkd_finish)
  float tckd, nckd;
  float d;      // p_sg - p_tg
  float big_d;  // (R_g - R_r) p_tg (1 - p_tg)
  float m_t;    // teacher mass of the non-target distribution: 1, or 0 when it is empty
};

// Row quantities from the non-target statistics `other` and the target logits a_g, b_g.
FASTKD_HD DKDRow dkd_finish(const KDStats& other, float a_g, float b_g) {
  const float lse_os = other.ms + logf(other.zs);  // -inf when no class c != g has mass
  const float lse_ot = other.mt + logf(other.zt);
  const float lse_s = logaddexp(lse_os, a_g), lse_t = logaddexp(lse_ot, b_g);
  const float lp_sg = a_g - lse_s, lp_tg = b_g - lse_t;      // log p_g
  const float l1_sg = lse_os - lse_s, l1_tg = lse_ot - lse_t;  // log(1 - p_g)
  const float p_sg = expf(lp_sg), p_tg = expf(lp_tg);
  const float r1_s = expf(l1_sg), r1_t = expf(l1_tg);  // 1 - p_g
  DKDRow r;
  // (where_positive: a NaN teacher probability stays NaN, never a 0 term)
  r.tckd = where_positive(p_tg, p_tg * (lp_tg - lp_sg)) + where_positive(r1_t, r1_t * (l1_tg - l1_sg));
  // No teacher mass outside g (e.g. C == 1): the non-target distribution is empty, NCKD = 0.
  r.m_t = other.zt != 0.0f ? 1.0f : 0.0f;  // (a NaN sum counts as mass: NaN NCKD, not 0)
  r.nckd = other.zt != 0.0f ? other.cross / other.zt - lse_ot + lse_os : 0.0f;
  r.d = p_sg + p_tg > 1.0f ? r1_t - r1_s : p_sg - p_tg;
  const float pq_t = expf(lp_tg + l1_tg);
  r.big_d = where_positive(pq_t, ((lp_tg - lp_sg) - (l1_tg - l1_sg)) * pq_t);
  // q_c = exp(x_c - lse'): with lse' = -inf every x_c (c != g) is -inf too, and
  // -inf - -inf would give NaN; +inf gives exp(-inf) = 0, the right q.
  r.norm_s = lse_os == -INFINITY ? INFINITY : lse_os;
  r.norm_t = lse_ot == -INFINITY ? INFINITY : lse_ot;
  return r;
}

// Row loss before the weight and T^2.
FASTKD_HD float dkd_objective(const DKDRow& r, float alpha, float beta) { return alpha * r.tckd + beta * r.nckd; }

// dR/da_c and dR/db_c for a non-target class, given q_sc = exp(a - norm_s), q_tc = exp(b - norm_t).
FASTKD_HD float dkd_student_other(const DKDRow& r, float alpha, float beta, float q_s, float q_t) {
  return (beta * r.m_t - alpha * r.d) * q_s - beta * q_t;
}

FASTKD_HD float dkd_teacher_other(const DKDRow& r, float alpha, float beta, float q_t, float a, float b) {
  return where_positive(q_t, q_t * (beta * ((b - r.norm_t) - (a - r.norm_s) - r.nckd) - alpha * r.big_d));
}

// dR/da_g and dR/db_g.
FASTKD_HD float dkd_student_target(const DKDRow& r, float alpha) { return alpha * r.d; }
FASTKD_HD float dkd_teacher_target(const DKDRow& r, float alpha) { return alpha * r.big_d; }

}  // namespace fastkd
