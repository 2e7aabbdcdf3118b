// How the row kernels (KD, ATS, DKD, DIST's row passes) cover a row of C classes.
//
// Team: narrow rows (C <= kWarpRowCols) get one warp each, kWarpRowsPerBlock rows
// per block, and reduce with warp shuffles only (no shared memory, no
// __syncthreads); wider rows get a whole block, sized so that each thread walks
// about kColsPerThread columns per sweep (64 to 512 threads), and reduce with
// block_reduce. At C = 100 a block of 512 threads left 400 of them idle and paid
// two block reductions per row; a warp does the row in one or two steps.
//
// Access: each thread reads 16 bytes (kPackBytes) of the wider of the two input
// dtypes per step, W = 16 / sizeof(wider) columns, when every pointer the kernel
// touches is aligned to its W-column pack (checked per launch on the host:
// rows_vectorizable). A row then splits into a scalar head up to its first
// W-aligned column (row starts move by C, which need not be a multiple of W),
// whole packs, and a scalar tail; otherwise the whole row is the scalar head.
//
// Every thread of a launch executes the same sequence of reductions: a team whose
// row is skipped (ignored, bad target, or past the last row) sweeps an empty range
// and still joins them. On a GPU only the warp's own lanes take part in a warp
// reduction, but the CPU check (HIP-CPU, which runs a shuffle as a block barrier)
// needs all warps of a block to meet the same barriers, and it costs a skipped row
// a few shuffles.
#pragma once
#include <type_traits>

#include "common.cuh"

namespace fastkd {

constexpr int64_t kWarpRowCols = 1024;
constexpr int kWarpRowsPerBlock = 8;
constexpr int64_t kColsPerThread = 32;
constexpr int kMaxRowThreads = 512;

// The __launch_bounds__ of a row kernel: its block size (exactly, for the warp team)
// and, for the warp team, at least two blocks per SM: that allows 128 registers.
// Without it ptxas capped the warp kernels at 64 registers and spilled 20 bytes
// (16-bit inputs: eight columns per pack, unrolled); at about 90 registers two
// 256-thread blocks (16 warps, each with two packs per tensor in flight) fit an SM.
template <bool kWarp>
constexpr int kRowBlockBound = kWarp ? 32 * kWarpRowsPerBlock : kMaxRowThreads;
template <bool kWarp>
constexpr int kRowMinBlocks = kWarp ? 2 : 1;
constexpr int kPackBytes = 16;

// Launch shape of a row kernel (host side).
struct RowPlan {
  bool warp;        // a warp per row (else a block per row)
  unsigned blocks;  // grid size
  unsigned threads; // block size
};

inline RowPlan plan_rows(int64_t rows, int64_t cols) {
  if (cols <= kWarpRowCols) {
    return {true, static_cast<unsigned>((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock),
            static_cast<unsigned>(32 * kWarpRowsPerBlock)};
  }
  unsigned threads = 64;
  while (threads < kMaxRowThreads && threads * kColsPerThread < cols) threads *= 2;
  return {false, static_cast<unsigned>(rows), threads};
}

// Calls launch(std::true_type{}) for a warp-per-row plan, launch(std::false_type{})
// for a block-per-row one: the team is a template argument of the kernel.
template <typename Launch>
void with_row_team(const RowPlan& plan, Launch&& launch) {
  if (plan.warp) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

// Columns per 16-byte pack of the wider of two element types.
template <typename S, typename T>
constexpr int kPackWidth = kPackBytes / static_cast<int>(sizeof(S) > sizeof(T) ? sizeof(S) : sizeof(T));

// Whether `p` (null: not used) is aligned to a pack of W elements of `bytes` each.
inline bool pack_aligned(const void* p, int w, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % (static_cast<uintptr_t>(w) * bytes) == 0;
}

// Whether a row kernel may use pack access on these pointers (host side).
template <typename S, typename T>
bool rows_vectorizable(const void* s, const void* t, const void* gs, const void* gt) {
  constexpr int w = kPackWidth<S, T>;
  return pack_aligned(s, w, sizeof(S)) && pack_aligned(t, w, sizeof(T)) && pack_aligned(gs, w, sizeof(S)) &&
         pack_aligned(gt, w, sizeof(T));
}

// Host side of a KD / ATS / DKD launch over [rows, cols] logits: the team (plan_rows), the C++
// types behind the two dtypes, and whether packs may be used, then
// launch(warp, s, t, gs, gt, packs, plan) with typed pointers, from which the kernel's element
// types are deduced. Returns the launch status.
template <typename Launch>
cudaError_t launch_rows(DType s_dtype, const void* student, DType t_dtype, const void* teacher, void* grad_student,
                        void* grad_teacher, int64_t rows, int64_t cols, Launch&& launch) {
  if (rows == 0) return cudaSuccess;
  const RowPlan plan = plan_rows(rows, cols);
  FASTKD_DISPATCH_ONE(s_dtype, S, FASTKD_DISPATCH_ONE(t_dtype, T, {
    const bool packs = rows_vectorizable<S, T>(student, teacher, grad_student, grad_teacher);
    with_row_team(plan, [&](auto warp) {
      launch(warp, static_cast<const S*>(student), static_cast<const T*>(teacher), static_cast<S*>(grad_student),
             static_cast<T*>(grad_teacher), packs, plan);
    });
  }))
  return cudaGetLastError();
}

template <typename X, int W>
struct alignas(sizeof(X) * W) Pack {
  X v[W];
};

// The threads of one row: a warp (kWarp) or the whole block.
template <bool kWarp>
struct RowTeam {
  int64_t row;
  int lane, lanes;

  __device__ __forceinline__ RowTeam()
      : row(kWarp ? static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5)
                  : static_cast<int64_t>(blockIdx.x)),
        lane(kWarp ? static_cast<int>(threadIdx.x & 31) : static_cast<int>(threadIdx.x)),
        lanes(kWarp ? 32 : static_cast<int>(blockDim.x)) {}

  // Every lane of the team gets merge() over the team; `scratch` (one V per warp,
  // shared) is used by the block team only.
  template <typename V, typename Merge>
  __device__ __forceinline__ V reduce(V v, V identity, Merge merge, V* scratch) const {
    if constexpr (kWarp) {
      for (int offset = 16; offset > 0; offset >>= 1) v = merge(v, shfl_xor(v, offset));
      return v;
    } else {
      return block_reduce(v, identity, merge, scratch);
    }
  }
};

// One row's columns [0, n) for this thread: the strided scalar head [0, head), packs of W
// from `head` to `body_end` (lane-strided), the strided scalar tail [body_end, n).
template <int W>
struct RowSplit {
  int64_t n, head, body_end;
  int lane, lanes;
};

// `start` is the row's first element index in the [N, C] buffers (row * C): the head
// runs to the first multiple of W. Without pack access every column is in the head.
template <int W>
__device__ __forceinline__ RowSplit<W> split_row(int64_t start, int64_t n, bool packs, int lane, int lanes) {
  if (!packs) return {n, n, n, lane, lanes};
  const int64_t head = min(static_cast<int64_t>((W - (start & (W - 1))) & (W - 1)), n);  // W: a power of two
  return {n, head, head + ((n - head) / W) * W, lane, lanes};
}

// f(c, x, y) for every column c of the split, x = s[c], y = t[c] as float.
template <int W, typename S, typename T, typename F>
__device__ __forceinline__ void sweep_row(const RowSplit<W>& sp, const S* s, const T* t, F&& f) {
  for (int64_t c = sp.lane; c < sp.head; c += sp.lanes) f(c, to_float(s[c]), to_float(t[c]));
  const int64_t step = static_cast<int64_t>(sp.lanes) * W;
  for (int64_t c = sp.head + static_cast<int64_t>(sp.lane) * W; c < sp.body_end; c += step) {
    const Pack<S, W> a = *reinterpret_cast<const Pack<S, W>*>(s + c);
    const Pack<T, W> b = *reinterpret_cast<const Pack<T, W>*>(t + c);
#pragma unroll
    for (int k = 0; k < W; ++k) f(c + k, to_float(a.v[k]), to_float(b.v[k]));
  }
  for (int64_t c = sp.body_end + sp.lane; c < sp.n; c += sp.lanes) f(c, to_float(s[c]), to_float(t[c]));
}

// Gradient pair of one column.
struct GradPair {
  float gs, gt;
};

// gs[c], gt[c] = f(c, x, y) for every column of the split (each store only where its pointer is non-null).
template <int W, typename S, typename T, typename F>
__device__ __forceinline__ void sweep_row_grads(const RowSplit<W>& sp, const S* s, const T* t, S* gs, T* gt, F&& f) {
  auto one = [&](int64_t c) {
    const GradPair g = f(c, to_float(s[c]), to_float(t[c]));
    if (gs) gs[c] = from_float<S>(g.gs);
    if (gt) gt[c] = from_float<T>(g.gt);
  };
  for (int64_t c = sp.lane; c < sp.head; c += sp.lanes) one(c);
  const int64_t step = static_cast<int64_t>(sp.lanes) * W;
  for (int64_t c = sp.head + static_cast<int64_t>(sp.lane) * W; c < sp.body_end; c += step) {
    const Pack<S, W> a = *reinterpret_cast<const Pack<S, W>*>(s + c);
    const Pack<T, W> b = *reinterpret_cast<const Pack<T, W>*>(t + c);
    Pack<S, W> ga;
    Pack<T, W> gb;
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const GradPair g = f(c + k, to_float(a.v[k]), to_float(b.v[k]));
      ga.v[k] = from_float<S>(g.gs);
      gb.v[k] = from_float<T>(g.gt);
    }
    if (gs) *reinterpret_cast<Pack<S, W>*>(gs + c) = ga;
    if (gt) *reinterpret_cast<Pack<T, W>*>(gt + c) = gb;
  }
  for (int64_t c = sp.body_end + sp.lane; c < sp.n; c += sp.lanes) one(c);
}

// gs[c] = gt[c] = value for every column of the split (skipped rows: 0, or NaN for a bad target).
template <int W, typename S, typename T>
__device__ __forceinline__ void fill_row_grads(const RowSplit<W>& sp, S* gs, T* gt, float value) {
  if (!gs && !gt) return;
  Pack<S, W> ga;
  Pack<T, W> gb;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    ga.v[k] = from_float<S>(value);
    gb.v[k] = from_float<T>(value);
  }
  for (int64_t c = sp.lane; c < sp.head; c += sp.lanes) {
    if (gs) gs[c] = ga.v[0];
    if (gt) gt[c] = gb.v[0];
  }
  const int64_t step = static_cast<int64_t>(sp.lanes) * W;
  for (int64_t c = sp.head + static_cast<int64_t>(sp.lane) * W; c < sp.body_end; c += step) {
    if (gs) *reinterpret_cast<Pack<S, W>*>(gs + c) = ga;
    if (gt) *reinterpret_cast<Pack<T, W>*>(gt + c) = gb;
  }
  for (int64_t c = sp.body_end + sp.lane; c < sp.n; c += sp.lanes) {
    if (gs) gs[c] = ga.v[0];
    if (gt) gt[c] = gb.v[0];
  }
}

// One row of the [rows, cols] inputs and of the gradients asked for (null: not wanted).
template <typename S, typename T>
struct RowPtrs {
  const S* s;
  const T* t;
  S* gs;
  T* gt;
};

template <typename S, typename T>
__device__ __forceinline__ RowPtrs<S, T> row_ptrs(int64_t offset, const S* student, const T* teacher,
                                                  S* grad_student, T* grad_teacher) {
  return {student + offset, teacher + offset, grad_student ? grad_student + offset : nullptr,
          grad_teacher ? grad_teacher + offset : nullptr};
}

// A target-indexed row (ATS, DKD): weight and target, and whether it is counted. A row
// past the end or with weight 0 is skipped with fill 0 and its target is never read; a
// counted row whose target is outside [0, cols) is skipped with fill NaN (loss and gradients).
struct TargetRow {
  float w;
  int64_t g;
  bool counted;
  float fill;
};

__device__ __forceinline__ TargetRow target_row(const float* row_weight, const int64_t* target, int64_t row,
                                                int64_t rows, int64_t cols) {
  const float w = row < rows ? row_weight[row] : 0.0f;
  if (w == 0.0f) return {0.0f, -1, false, 0.0f};
  const int64_t g = target[row];
  const bool ok = g >= 0 && g < cols;
  return {w, g, ok, ok ? 0.0f : NAN};
}

// What an ATS or DKD thread starts from: its TargetRow, the row's pointers, and its splits
// of the whole row (`all`: a skipped row's fill) and of the columns it sweeps (`work`:
// all of a counted row, none of a skipped one).
template <int W, typename S, typename T>
struct TargetRowView : RowPtrs<S, T>, TargetRow {
  RowSplit<W> all, work;
};

template <int W, bool kWarp, typename S, typename T>
__device__ __forceinline__ TargetRowView<W, S, T> target_row_view(const RowTeam<kWarp>& team, const S* student,
                                                                  const T* teacher, const int64_t* target,
                                                                  const float* row_weight, int64_t rows, int64_t cols,
                                                                  bool packs, S* grad_student, T* grad_teacher) {
  const TargetRow tr = target_row(row_weight, target, team.row, rows, cols);
  const int64_t offset = team.row * cols;  // 64-bit: rows * cols may pass 2^31
  return {row_ptrs(offset, student, teacher, grad_student, grad_teacher), tr,
          split_row<W>(offset, team.row < rows ? cols : 0, packs, team.lane, team.lanes),
          split_row<W>(offset, tr.counted ? cols : 0, packs, team.lane, team.lanes)};
}

}  // namespace fastkd
