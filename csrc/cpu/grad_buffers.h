// Gradient buffers for the CPU kernels (see grad_buffers.cpp: reused, not fresh).
#pragma once
#include <ATen/ATen.h>

namespace fastkd {

// An uninitialised contiguous buffer shaped like `x` for a gradient the kernel
// writes in full, or an empty tensor when the gradient is not wanted.
at::Tensor grad_like(const at::Tensor& x, bool wanted);

}  // namespace fastkd
