// Row access for the CPU kernels: the math runs on float32 spans; float32
// tensors are used in place, other dtypes are converted through a per-thread
// buffer of one span (so no [N, C] float32 temporary is ever made).
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

// n elements of the contiguous tensor x from flat offset `offset` as float32
// (in place for float32, else converted into buf).
inline const float* input_span(const at::Tensor& x, int64_t offset, int64_t n, std::vector<float>& buf) {
  if (x.scalar_type() == at::kFloat) return x.const_data_ptr<float>() + offset;
  buf.resize(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastkd_input_span",
                                  [&] { convert_row(x.const_data_ptr<scalar_t>() + offset, buf.data(), n); });
  return buf.data();
}

// Where to write n float32 values of g from flat offset `offset`: in place for
// float32, else buf (then output_span_done converts it); null when g is empty.
inline float* output_span(const at::Tensor& g, int64_t offset, int64_t n, std::vector<float>& buf) {
  if (!g.defined() || g.numel() == 0) return nullptr;
  if (g.scalar_type() == at::kFloat) return g.mutable_data_ptr<float>() + offset;
  buf.resize(n);
  return buf.data();
}

inline void output_span_done(const at::Tensor& g, int64_t offset, int64_t n, const std::vector<float>& buf) {
  if (!g.defined() || g.numel() == 0 || g.scalar_type() == at::kFloat) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fastkd_output_span",
                                  [&] { convert_row_back(buf.data(), g.mutable_data_ptr<scalar_t>() + offset, n); });
}

// Row i of a contiguous [N, C] tensor: the spans above at offset i * C.
inline const float* input_row(const at::Tensor& x, int64_t i, std::vector<float>& buf) {
  return input_span(x, i * x.size(1), x.size(1), buf);
}
inline float* output_row(const at::Tensor& g, int64_t i, std::vector<float>& buf) {
  return output_span(g, g.numel() ? i * g.size(1) : 0, g.numel() ? g.size(1) : 0, buf);
}
inline void output_row_done(const at::Tensor& g, int64_t i, const std::vector<float>& buf) {
  if (g.numel()) output_span_done(g, i * g.size(1), g.size(1), buf);
}

}  // namespace fastkd
