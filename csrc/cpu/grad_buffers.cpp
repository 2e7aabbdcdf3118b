// Gradient buffers of the CPU losses: a small cache of recently freed ones.
//
// Why: the fused losses write their [N, C] gradients in the forward pass into a
// fresh buffer, which the caller frees after backward. A fresh large allocation
// is a fresh mapping, and on Linux the first touch of each of its pages traps
// into the kernel to zero it; for a [4096, 32000] float32 gradient that costs
// more than the loss math itself (measured: about 350 ms of a 590 ms step on the
// 2-core dev machine). Reusing the buffer freed by the previous training step
// avoids it, as torch's CUDA caching allocator does for GPU memory.
//
// Policy: buffers of at least kMinBytes only, exact-size reuse, at most
// kMaxCached buffers kept (the oldest is released first), and
// fastkd::empty_grad_cache() releases them all.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

#include "grad_buffers.h"

namespace fastkd {
namespace {

constexpr size_t kMinBytes = size_t(4) << 20;
constexpr size_t kMaxCached = 2;  // one student and one teacher gradient

// Fault in a fresh buffer's pages with one call per 8 MiB piece, in parallel,
// instead of one trap per 4 KiB page while the kernel writes (Linux 5.14+).
void prefault(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  const int64_t page = 4096, piece = int64_t(8) << 20;
  const int64_t begin = (reinterpret_cast<int64_t>(data) + page - 1) & ~(page - 1);
  const int64_t end = (reinterpret_cast<int64_t>(data) + int64_t(bytes)) & ~(page - 1);
  if (end <= begin) return;
  at::parallel_for(0, (end - begin + piece - 1) / piece, 1, [&](int64_t first, int64_t last) {
    const int64_t lo = begin + first * piece, hi = std::min(end, begin + last * piece);
    madvise(reinterpret_cast<void*>(lo), size_t(hi - lo), MADV_POPULATE_WRITE);
  });
#endif
}

class GradBufferCache {
 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->first == bytes) {
          void* data = it->second;
          free_.erase(it);
          return data;
        }
      }
    }
    // 64-byte aligned like torch's own CPU allocations (aligned_alloc needs a multiple of it)
    void* data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    TORCH_CHECK(data != nullptr, "fastkd: could not allocate a ", bytes, "-byte gradient");
    prefault(data, bytes);
    return data;
  }

  void give_back(void* data, size_t bytes) {
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.emplace_back(bytes, data);
      if (free_.size() > kMaxCached) {
        evicted = free_.front().second;
        free_.pop_front();
      }
    }
    if (evicted) std::free(evicted);
  }

  void clear() {
    std::deque<std::pair<size_t, void*>> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released.swap(free_);
    }
    for (auto& block : released) std::free(block.second);
  }

 private:
  std::mutex mutex_;
  std::deque<std::pair<size_t, void*>> free_;
};

// Never destroyed: tensors holding its buffers may be freed during interpreter exit.
GradBufferCache& cache() {
  static GradBufferCache* instance = new GradBufferCache();
  return *instance;
}

void empty_grad_cache() { cache().clear(); }

// An uninitialised contiguous CPU buffer, from the cache when it is large enough.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  for (const int64_t d : sizes) TORCH_CHECK_VALUE(d >= 0, "fastkd: a gradient buffer size must be >= 0, got ", sizes);
  // checked: a product past the address space raises instead of wrapping to a small allocation
  const size_t bytes = at::detail::computeStorageNbytesContiguous(sizes, options.dtype().itemsize());
  if (bytes < kMinBytes) return at::empty(sizes, options);
  void* data = cache().take(bytes);
  return at::from_blob(data, sizes, [bytes](void* p) { cache().give_back(p, bytes); }, options);
}

// fastkd::grad_buffer: the same buffers for gradients formed in Python (fastkd/distributed.py's stored
// gradients on CPU tensors, written by the shard kernels).
at::Tensor grad_buffer(at::IntArrayRef sizes, at::ScalarType dtype) {
  return cached_empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

}  // namespace

at::Tensor grad_like(const at::Tensor& x, bool wanted) {
  if (!wanted) return at::empty({0}, x.options());
  return cached_empty(x.sizes(), x.options().memory_format(c10::nullopt));
}

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("empty_grad_cache() -> ()", &empty_grad_cache);
  m.def("grad_buffer(int[] size, ScalarType dtype) -> Tensor", &grad_buffer);
}

}  // namespace fastkd
