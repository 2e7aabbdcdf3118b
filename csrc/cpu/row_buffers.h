// Row access for the CPU kernels: the math runs on float32 rows; float32
// inputs are used in place, other dtypes are converted into a per-thread
// buffer of one row (so no [N, C] float32 temporary is ever made).
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace fastkd {

template <typename scalar_t>
void convert_row(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename scalar_t>
void convert_row_back(const float* src, scalar_t* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

// Pointer to row `i` of a contiguous [N, C] tensor as float32 (in place or converted into `buf`).
inline const float* input_row(const at::Tensor& x, int64_t i, std::vector<float>& buf) {
  const int64_t C = x.size(1);
  if (x.scalar_type() == at::kFloat) return x.const_data_ptr<float>() + i * C;
  buf.resize(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastkd_input_row",
                                  [&] { convert_row(x.const_data_ptr<scalar_t>() + i * C, buf.data(), C); });
  return buf.data();
}

// Where to write row `i` of a float32 gradient: in place for float32 outputs,
// else a buffer that `output_row_done` converts into the output.
inline float* output_row(const at::Tensor& g, int64_t i, std::vector<float>& buf) {
  if (!g.defined() || g.numel() == 0) return nullptr;
  const int64_t C = g.size(1);
  if (g.scalar_type() == at::kFloat) return g.mutable_data_ptr<float>() + i * C;
  buf.resize(C);
  return buf.data();
}

inline void output_row_done(const at::Tensor& g, int64_t i, const std::vector<float>& buf) {
  if (!g.defined() || g.numel() == 0 || g.scalar_type() == at::kFloat) return;
  const int64_t C = g.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fastkd_output_row",
                                  [&] { convert_row_back(buf.data(), g.mutable_data_ptr<scalar_t>() + i * C, C); });
}

}  // namespace fastkd
