// MGD's two element-wise kernels on the CPU (mask definition in csrc/mgd_math.h):
//   mgd_mask(x, seed, ratio, spatial) = x * M, M regenerated from the seed (never stored);
//   mgd_sq_err(pred, teacher, scale)  = scale * sum((pred - teacher)^2), with both gradients
//     2 scale (pred - teacher) and its negative written in the same pass.
// The squared-error sum is taken over fixed blocks of kSumBlock elements (float32
// within a block, float64 across blocks, in block order), so the result does not
// depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../mgd_math.h"
#include "loss_common.h"

namespace fastkd {
namespace {

constexpr int64_t kSumBlock = 16384;

// out[j] = x[j] * keep for one plane of hw elements whose mask indices start at
// `first` (step 1 for the spatial mask) or are all `first` (channel mask).
template <typename scalar_t>
void mask_plane(const scalar_t* x, scalar_t* out, int64_t hw, uint32_t key, uint32_t threshold, uint64_t first,
                bool spatial) {
  using acc_t = at::opmath_type<scalar_t>;  // x * 1 and x * 0 exactly as the reference's x * M
  if (!spatial) {
    const acc_t keep = mgd_hash(key, first) >= threshold ? acc_t(1) : acc_t(0);
    for (int64_t j = 0; j < hw; ++j) out[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) * keep);
    return;
  }
  for (int64_t j = 0; j < hw; ++j) {
    const acc_t keep = mgd_hash(key, first + j) >= threshold ? acc_t(1) : acc_t(0);
    out[j] = static_cast<scalar_t>(static_cast<acc_t>(x[j]) * keep);
  }
}

at::Tensor mgd_mask_cpu(const at::Tensor& x, int64_t seed, double mask_ratio, bool spatial) {
  TORCH_CHECK(x.device().is_cpu(), "fastkd: mgd_mask input must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "fastkd: mgd_mask input must be a contiguous NCHW tensor, got ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastkd: mgd_mask input must be floating, got ", x.scalar_type());
  at::Tensor out = at::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const uint32_t key = mgd_seed_key(seed), threshold = mgd_threshold(mask_ratio);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastkd_mgd_mask", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(hw, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const uint64_t first = spatial ? static_cast<uint64_t>(plane / C) * hw : static_cast<uint64_t>(plane);
        mask_plane(src + plane * hw, dst + plane * hw, hw, key, threshold, first, spatial);
      }
    });
  });
  return out;
}

// Sum of (p - t)^2 over one block; writes 2 scale (p - t) and its negative where asked.
FASTKD_CPU_CLONES
float sq_err_block(const float* p, const float* t, int64_t n, float two_scale, float* gp, float* gt) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float d = p[j] - t[j];
    sum += d * d;
  }
  if (gp) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gp[j] = two_scale * (p[j] - t[j]);
  }
  if (gt) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) gt[j] = two_scale * (t[j] - p[j]);
  }
  return sum;
}

void check_flat(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && at::isFloatingType(x.scalar_type()), "fastkd: mgd_sq_err ",
              name, " must be a contiguous floating CPU tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mgd_sq_err_cpu(const at::Tensor& pred, const at::Tensor& teacher,
                                                              double scale, bool grad_pred, bool grad_teacher) {
  check_flat(pred, "pred");
  check_flat(teacher, "teacher");
  TORCH_CHECK(pred.sizes() == teacher.sizes(), "fastkd: mgd_sq_err pred and teacher shapes differ: ", pred.sizes(),
              " and ", teacher.sizes());
  at::Tensor gp = grad_like(pred, grad_pred), gt = grad_like(teacher, grad_teacher);
  const int64_t numel = pred.numel(), blocks = (numel + kSumBlock - 1) / kSumBlock;
  std::vector<float> partial(blocks, 0.0f);
  const float two_scale = static_cast<float>(2.0 * scale);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pbuf, tbuf, gpbuf, gtbuf;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * kSumBlock, n = std::min(kSumBlock, numel - start);
      partial[b] = sq_err_block(input_span(pred, start, n, pbuf), input_span(teacher, start, n, tbuf), n, two_scale,
                                output_span(gp, start, n, gpbuf), output_span(gt, start, n, gtbuf));
      output_span_done(gp, start, n, gpbuf);
      output_span_done(gt, start, n, gtbuf);
    }
  });
  double sum = 0.0;
  for (int64_t b = 0; b < blocks; ++b) sum += partial[b];
  return {at::scalar_tensor(static_cast<float>(scale * sum), pred.options().dtype(at::kFloat)), gp, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("mgd_mask", &mgd_mask_cpu);
  m.impl("mgd_sq_err", &mgd_sq_err_cpu);
}

}  // namespace fastkd
