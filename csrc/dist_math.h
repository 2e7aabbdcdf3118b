// Math of DIST (Pearson relations of the softmaxes), shared by the CPU
// (csrc/cpu/dist.cpp) and CUDA (csrc/cuda/dist.cu) kernels.
//
// On the whole batch [N, C], with y_s = softmax(s / tau), y_t = softmax(t / tau) per row:
//   rho(x, y) = <xc, yc> / (|xc| |yc| + 1e-8),   xc = x - mean(x), yc = y - mean(y)
//   loss = tau^2 beta (1 - (1/N) sum_i rho_i) + tau^2 gamma (1 - (1/C) sum_c rho_c)
//   rho_i: row i of y_s against row i of y_t (a softmax row has mean exactly 1/C);
//   rho_c: column c of y_s against column c of y_t (means m_s[c], m_t[c] over the batch).
//
// Gradient of rho w.r.t. x (the centring projects out the mean, and xc, yc already
// sum to 0): with nx = |xc|, ny = |yc|, D = nx ny + 1e-8,
//   d rho / d x_k = yc_k / D - rho (ny / (nx D)) xc_k        (0 coefficient where nx == 0,
//   d rho / d y_k = xc_k / D - rho (nx / (ny D)) yc_k         as torch's norm backward)
// so with sr = tau^2 beta / N and sc = tau^2 gamma / C the loss gradient w.r.t. y_s[i, c] is
//   G_s = ru_i (y_t - 1/C) + rvs_i (y_s - 1/C) + cu_c (y_t - m_t[c]) + cvs_c (y_s - m_s[c])
//   ru = -sr / D_i, rvs = sr rho_i n_t,i / (n_s,i D_i), cu = -sc / D_c, cvs = sc rho_c n_t,c / (n_s,c D_c)
// (G_t swaps s and t), and through the softmax dL/ds[i, c] = (1/tau) y_s (G_s - <y_s, G_s>_i),
//   <y_s, G_s> = ru A_st + rvs A_ss + sum_c y_s (cu_c (y_t - m_t) + cvs_c (y_s - m_s)),
//   A_st = sum_c y_s (y_t - 1/C),  A_ss = sum_c y_s (y_s - 1/C)
// accumulated from exactly the terms used per element, so each gradient row sums to 0 up
// to rounding. (Mathematically A_st = P_i and A_ss = V_s,i, the centred sums below, but
// only up to (sum y - 1) / C ~ 1e-7 / C, which |ru|, up to ~1e3 when a row's centred
// norms are small, would turn into a visible error.)
//
// Class statistics are accumulated as float64 sums over the batch (S_x, S_y, S_xx, S_yy,
// S_xy of y_s = x, y_t = y); the centred moments S_xy - S_x S_y / N etc. are then exact to
// ~1e-16 relative to S_xx, far below the float32 rounding of the inputs.
#pragma once
#include "kd_math.h"

namespace fastkd {

constexpr double kDistEps = 1e-8;

// Correlation of two centred vectors and the coefficients of its gradient:
// d rho / d x = inv_d * yc - kx * xc,   d rho / d y = inv_d * xc - ky * yc.
struct DistPearson {
  double rho, inv_d, kx, ky;
};

FASTKD_HD DistPearson dist_pearson(double cov, double vx, double vy) {
  vx = vx < 0.0 ? 0.0 : vx;  // rounding of the uncentred sums can dip below 0; NaN stays NaN
  vy = vy < 0.0 ? 0.0 : vy;
  const double nx = sqrt(vx), ny = sqrt(vy), d = nx * ny + kDistEps;
  DistPearson p;
  p.rho = cov / d;
  p.inv_d = 1.0 / d;
  p.kx = nx > 0.0 ? p.rho * ny / (nx * d) : 0.0;
  p.ky = ny > 0.0 ? p.rho * nx / (ny * d) : 0.0;
  return p;
}

// Gradient coefficients of one row (scale sr = tau^2 beta / N) or one class (sc = tau^2 gamma / C).
struct DistCoef {
  float u, vs, vt;  // G_s += u (y_t - m_t) + vs (y_s - m_s);  G_t += u (y_s - m_s) + vt (y_t - m_t)
  float rho;
};

FASTKD_HD DistCoef dist_coef(const DistPearson& p, double scale) {
  return {static_cast<float>(-scale * p.inv_d), static_cast<float>(scale * p.kx), static_cast<float>(scale * p.ky),
          static_cast<float>(p.rho)};
}

// One row from its centred sums P = <y_s - 1/C, y_t - 1/C>, V_s = |y_s - 1/C|^2, V_t.
FASTKD_HD DistCoef dist_row(float p, float vs, float vt, double scale_row) {
  return dist_coef(dist_pearson(p, vs, vt), scale_row);
}

// One class from its float64 batch sums; also returns its means.
FASTKD_HD DistCoef dist_class(double sx, double sy, double sxx, double syy, double sxy, double n, double scale_class,
                              float& mean_s, float& mean_t) {
  const double mx = sx / n, my = sy / n;
  mean_s = static_cast<float>(mx);
  mean_t = static_cast<float>(my);
  return dist_coef(dist_pearson(sxy - sx * my, sxx - sx * mx, syy - sy * my), scale_class);
}

// One term of a gradient w.r.t. y ("self" is the net being differentiated):
// u (y_other - m_other) + v (y_self - m_self).
FASTKD_HD float dist_term(float u, float v, float y_self, float y_other, float m_self, float m_other) {
  return u * (y_other - m_other) + v * (y_self - m_self);
}

}  // namespace fastkd
