// Checks and dtype tags shared by the torch-facing CUDA op files.
#pragma once
#include <ATen/ATen.h>

#include "launch.h"

namespace fastkd {

inline DType dtype_tag(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "fastkd: unsupported dtype ", x.scalar_type());
  }
}

inline void check_rows_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "fastkd: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "fastkd: ", name, " must be 2-D [N, C], got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(), "fastkd: ", name, " must be contiguous");
  dtype_tag(x);
}

inline void check_vector_cuda(const at::Tensor& v, int64_t n, const char* name, const at::Tensor& like) {
  TORCH_CHECK(v.device() == like.device() && v.dim() == 1 && v.size(0) == n && v.scalar_type() == at::kFloat &&
                  v.is_contiguous(),
              "fastkd: ", name, " must be a contiguous float32 vector of ", n, " rows on ", like.device());
}

}  // namespace fastkd
