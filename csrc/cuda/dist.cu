// DIST on CUDA (math and gradient in csrc/dist_math.h). The intra-class term
// needs each class's statistics over the whole batch before any gradient can be
// written (a grid-wide dependency: kernel boundaries), so five kernels run on
// the caller's stream, reading the logits three times:
//   1. dist_lse_kernel, a warp or a block per row (rows.cuh): the normalisers lse(s/tau), lse(t/tau);
//   2. dist_class_kernel, tiles of classes x a fixed slice of rows: float64 sums of
//      y_s, y_t, y_s^2, y_t^2, y_s y_t per class, each tile's row lanes added in
//      a fixed order in shared memory and written to the tile's own slot of a
//      [slices, 5, C] buffer (no atomics);
//   3. dist_class_finish_kernel, one thread per class: the slices added in order,
//      then the class means and gradient coefficients and rho_c;
//   4. dist_row_kernel, a warp or a block per row: a sweep for the row's correlation
//      sums and dot products <y, G>, then (only when a gradient is wanted) a sweep that
//      writes the gradients. Each sweep reads only the class statistics of the gradients
//      asked for (u, m_s, m_t and v_s for the student, v_t for the teacher), and the
//      first sweep none at all when no gradient is wanted;
//   5. dist_loss_kernel, one block: the loss from rho_i and rho_c, summed in a fixed order.
// The slicing depends only on (rows, cols), so every run gives the same bits.
#include "../dist_math.h"
#include "common.cuh"
#include "rows.cuh"

namespace fastkd {

struct DistLse {
  float ms, zs, mt, zt;
};
__device__ __forceinline__ DistLse shfl_xor(const DistLse& v, int offset) {
  return {shfl_xor(v.ms, offset), shfl_xor(v.zs, offset), shfl_xor(v.mt, offset), shfl_xor(v.zt, offset)};
}

// A row's centred correlation sums and the pieces of <y, G> (dist_math.h).
struct DistRowSums {
  float p, vs, vt, a_st, a_ss, a_ts, a_tt, js, jt;
};
__device__ __forceinline__ DistRowSums shfl_xor(const DistRowSums& v, int offset) {
  return {shfl_xor(v.p, offset),    shfl_xor(v.vs, offset),   shfl_xor(v.vt, offset),
          shfl_xor(v.a_st, offset), shfl_xor(v.a_ss, offset), shfl_xor(v.a_ts, offset),
          shfl_xor(v.a_tt, offset), shfl_xor(v.js, offset),   shfl_xor(v.jt, offset)};
}

namespace {

constexpr int kTileThreads = 256;  // class tile: up to 256 classes x (256 / width) row lanes
constexpr int64_t kSliceBlocks = 2048;  // aim for about this many tiles in pass 2
constexpr int64_t kMinSliceRows = 64;

// Online (max, sum exp) of one value; -inf adds nothing, NaN poisons the sum.
__device__ __forceinline__ void lse_push(float& m, float& z, float x) {
  if (x > m) {
    z = z * rescale(m, x) + 1.0f;
    m = x;
  } else if (m != -INFINITY || x != x) {
    z += __expf(x - m);
  }
}

__device__ __forceinline__ DistLse lse_merge(const DistLse& x, const DistLse& y) {
  const float ms = max_ignoring_nan(x.ms, y.ms), mt = max_ignoring_nan(x.mt, y.mt);
  return {ms, x.zs * rescale(x.ms, ms) + y.zs * rescale(y.ms, ms), mt,
          x.zt * rescale(x.mt, mt) + y.zt * rescale(y.mt, mt)};
}

// lse[row] = lse(s/tau), lse[rows + row] = lse(t/tau)
template <bool kWarp, typename S, typename T>
__global__ void __launch_bounds__(kRowBlockBound<kWarp>, kRowMinBlocks<kWarp>)
    dist_lse_kernel(const S* __restrict__ student, const T* __restrict__ teacher, int64_t rows, int64_t cols,
                    bool packs, float inv_tau, float* __restrict__ lse) {
  constexpr int W = kPackWidth<S, T>;
  __shared__ DistLse scratch[32];
  const RowTeam<kWarp> team;
  const int64_t offset = team.row * cols;
  const RowSplit<W> sp = split_row<W>(offset, team.row < rows ? cols : 0, packs, team.lane, team.lanes);
  DistLse st = {-INFINITY, 0.0f, -INFINITY, 0.0f};
  sweep_row(sp, student + offset, teacher + offset, [&](int64_t, float sv, float tv) {
    lse_push(st.ms, st.zs, sv * inv_tau);
    lse_push(st.mt, st.zt, tv * inv_tau);
  });
  st = team.reduce(st, DistLse{-INFINITY, 0.0f, -INFINITY, 0.0f},
                   [](const DistLse& x, const DistLse& y) { return lse_merge(x, y); }, scratch);
  if (team.row < rows && team.lane == 0) {
    lse[team.row] = st.ms + logf(st.zs);
    lse[rows + team.row] = st.mt + logf(st.zt);
  }
}

// Classes per tile: the class count rounded up to a power of two in [32, 256].
int tile_width(int64_t cols) {
  int width = 32;
  while (width < kTileThreads && width < cols) width *= 2;
  return width;
}

// Block (x: class tile, y: row slice); thread = (class lane, row lane).
template <typename S, typename T>
__global__ void __launch_bounds__(kTileThreads)
    dist_class_kernel(const S* __restrict__ student, const T* __restrict__ teacher, const float* __restrict__ lse,
                      int64_t rows, int64_t cols, int64_t slice_rows, int width, float inv_tau,
                      double* __restrict__ partial) {
  __shared__ double sums[5][kTileThreads];
  const int tx = threadIdx.x % width, ty = threadIdx.x / width, lanes = blockDim.x / width;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * width + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * slice_rows;
  const int64_t r1 = min(rows, r0 + slice_rows);
  double acc[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  if (c < cols) {
    for (int64_t r = r0 + ty; r < r1; r += lanes) {
      const double x = __expf(to_float(student[r * cols + c]) * inv_tau - lse[r]);
      const double y = __expf(to_float(teacher[r * cols + c]) * inv_tau - lse[rows + r]);
      acc[0] += x;
      acc[1] += y;
      acc[2] += x * x;
      acc[3] += y * y;
      acc[4] += x * y;
    }
  }
  for (int q = 0; q < 5; ++q) sums[q][threadIdx.x] = acc[q];
  __syncthreads();
  if (ty == 0 && c < cols) {
    for (int q = 0; q < 5; ++q) {
      double total = 0.0;
      for (int lane = 0; lane < lanes; ++lane) total += sums[q][lane * width + tx];  // fixed order
      partial[(static_cast<int64_t>(blockIdx.y) * 5 + q) * cols + c] = total;
    }
  }
}

// cls = [ms, mt, u, vs, vt] x cols (float32), rho_c[cols].
__global__ void dist_class_finish_kernel(const double* __restrict__ partial, int64_t slices, int64_t rows,
                                         int64_t cols, double scale_class, float* __restrict__ cls,
                                         float* __restrict__ rho_c) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  double sum[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t slice = 0; slice < slices; ++slice) {
    for (int q = 0; q < 5; ++q) sum[q] += partial[(slice * 5 + q) * cols + c];
  }
  float ms, mt;
  const DistCoef k = dist_class(sum[0], sum[1], sum[2], sum[3], sum[4], static_cast<double>(rows), scale_class, ms, mt);
  cls[c] = ms;
  cls[cols + c] = mt;
  cls[2 * cols + c] = k.u;
  cls[3 * cols + c] = k.vs;
  cls[4 * cols + c] = k.vt;
  rho_c[c] = k.rho;
}

template <bool kWarp, typename S, typename T>
__global__ void __launch_bounds__(kRowBlockBound<kWarp>, kRowMinBlocks<kWarp>)
    dist_row_kernel(const S* __restrict__ student, const T* __restrict__ teacher, const float* __restrict__ lse,
                    const float* __restrict__ cls, int64_t rows, int64_t cols, bool packs, float inv_tau,
                    double scale_row, float* __restrict__ rho_r, S* __restrict__ grad_student,
                    T* __restrict__ grad_teacher) {
  constexpr int W = kPackWidth<S, T>;
  __shared__ DistRowSums scratch[32];
  const RowTeam<kWarp> team;
  const bool live = team.row < rows;
  const int64_t offset = team.row * cols;
  const RowSplit<W> sp = split_row<W>(offset, live ? cols : 0, packs, team.lane, team.lanes);
  const float lse_s = live ? lse[team.row] : 0.0f, lse_t = live ? lse[rows + team.row] : 0.0f;
  const float inv_c = 1.0f / static_cast<float>(cols);
  const float *ms = cls, *mt = cls + cols, *u = cls + 2 * cols, *vs = cls + 3 * cols, *vt = cls + 4 * cols;
  const bool want_s = grad_student != nullptr, want_t = grad_teacher != nullptr;
  DistRowSums acc = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  sweep_row(sp, student + offset, teacher + offset, [&](int64_t c, float sv, float tv) {
    const float x = __expf(sv * inv_tau - lse_s), y = __expf(tv * inv_tau - lse_t);
    const float xc = x - inv_c, yc = y - inv_c;
    acc.p += xc * yc;
    acc.vs += xc * xc;
    acc.vt += yc * yc;
    acc.a_st += x * yc;
    acc.a_ss += x * xc;
    acc.a_ts += y * xc;
    acc.a_tt += y * yc;
    if (want_s || want_t) {  // <y, G> only for the gradients asked for
      const float uc = u[c], m_s = ms[c], m_t = mt[c];
      if (want_s) acc.js += x * dist_term(uc, vs[c], x, y, m_s, m_t);
      if (want_t) acc.jt += y * dist_term(uc, vt[c], y, x, m_t, m_s);
    }
  });
  acc = team.reduce(acc, DistRowSums{0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f},
                    [](const DistRowSums& a, const DistRowSums& b) {
                      return DistRowSums{a.p + b.p,       a.vs + b.vs,     a.vt + b.vt,
                                         a.a_st + b.a_st, a.a_ss + b.a_ss, a.a_ts + b.a_ts,
                                         a.a_tt + b.a_tt, a.js + b.js,     a.jt + b.jt};
                    },
                    scratch);
  const DistCoef k = dist_row(acc.p, acc.vs, acc.vt, scale_row);
  if (live && team.lane == 0) rho_r[team.row] = k.rho;
  if (!want_s && !want_t) return;  // no reduction follows
  const float dot_s = k.u * acc.a_st + k.vs * acc.a_ss + acc.js, dot_t = k.u * acc.a_ts + k.vt * acc.a_tt + acc.jt;
  S* gs = want_s ? grad_student + offset : nullptr;
  T* gt = want_t ? grad_teacher + offset : nullptr;
  sweep_row_grads(sp, student + offset, teacher + offset, gs, gt, [&](int64_t c, float sv, float tv) {
    const float x = __expf(sv * inv_tau - lse_s), y = __expf(tv * inv_tau - lse_t);
    const float uc = u[c], m_s = ms[c], m_t = mt[c];
    GradPair g = {0.0f, 0.0f};
    if (want_s) {
      g.gs = inv_tau * x * (dist_term(k.u, k.vs, x, y, inv_c, inv_c) + dist_term(uc, vs[c], x, y, m_s, m_t) - dot_s);
    }
    if (want_t) {
      g.gt = inv_tau * y * (dist_term(k.u, k.vt, y, x, inv_c, inv_c) + dist_term(uc, vt[c], y, x, m_t, m_s) - dot_t);
    }
    return g;
  });
}

constexpr int kLossThreads = 1024;

__global__ void __launch_bounds__(kLossThreads)
    dist_loss_kernel(const float* __restrict__ rho_r, const float* __restrict__ rho_c, int64_t rows, int64_t cols,
                     double tau2, double beta, double gamma, float* __restrict__ loss) {
  __shared__ double scratch[32];
  const double sum_r = block_sum_fixed(rho_r, rows, scratch);
  const double sum_c = block_sum_fixed(rho_c, cols, scratch);
  if (threadIdx.x == 0) {
    loss[0] = static_cast<float>(tau2 * (beta * (1.0 - sum_r / rows) + gamma * (1.0 - sum_c / cols)));
  }
}

}  // namespace

int64_t dist_row_slices(int64_t rows, int64_t cols) {
  const int64_t tiles = (cols + tile_width(cols) - 1) / tile_width(cols);
  const int64_t want = (kSliceBlocks + tiles - 1) / tiles;
  const int64_t most = (rows + kMinSliceRows - 1) / kMinSliceRows;
  return want < most ? want : (most > 0 ? most : 1);
}

cudaError_t dist_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher, int64_t rows,
                          int64_t cols, float beta, float gamma, float temperature, float* work_f32, double* work_f64,
                          float* loss, void* grad_student, void* grad_teacher, cudaStream_t stream) {
  const float inv_tau = 1.0f / temperature;
  const double tau2 = static_cast<double>(temperature) * temperature;
  float* lse = work_f32;                 // [2 * rows]
  float* rho_r = work_f32 + 2 * rows;    // [rows]
  float* cls = work_f32 + 3 * rows;      // [5 * cols]
  float* rho_c = cls + 5 * cols;         // [cols]
  const int width = tile_width(cols);
  const int64_t slices = dist_row_slices(rows, cols), slice_rows = (rows + slices - 1) / slices;
  const dim3 tiles(static_cast<unsigned>((cols + width - 1) / width), static_cast<unsigned>(slices));
  FASTKD_DISPATCH_ONE(s_dtype, S, FASTKD_DISPATCH_ONE(t_dtype, T, {
    const S* s = static_cast<const S*>(student);
    const T* t = static_cast<const T*>(teacher);
    const RowPlan plan = plan_rows(rows, cols);
    const bool packs = rows_vectorizable<S, T>(s, t, grad_student, grad_teacher);
    with_row_team(plan, [&](auto warp) {
      dist_lse_kernel<decltype(warp)::value, S, T><<<plan.blocks, plan.threads, 0, stream>>>(s, t, rows, cols, packs,
                                                                                            inv_tau, lse);
    });
    dist_class_kernel<S, T><<<tiles, kTileThreads, 0, stream>>>(s, t, lse, rows, cols, slice_rows, width, inv_tau,
                                                                work_f64);
    dist_class_finish_kernel<<<(cols + 255) / 256, 256, 0, stream>>>(work_f64, slices, rows, cols,
                                                                     tau2 * gamma / cols, cls, rho_c);
    with_row_team(plan, [&](auto warp) {
      dist_row_kernel<decltype(warp)::value, S, T><<<plan.blocks, plan.threads, 0, stream>>>(
          s, t, lse, cls, rows, cols, packs, inv_tau, tau2 * beta / rows, rho_r, static_cast<S*>(grad_student),
          static_cast<T*>(grad_teacher));
    });
    dist_loss_kernel<<<1, kLossThreads, 0, stream>>>(rho_r, rho_c, rows, cols, tau2, beta, gamma, loss);
  }))
  return cudaGetLastError();
}

}  // namespace fastkd
