// Box geometry on the patch grid, shared by the CPU and CUDA kernels (host + device).
//
// Each function reproduces one helper of oneref/ops/reference.py operation by operation, in
// the same precision, so that the discrete results (which cells are inside a box) are
// identical on every backend. Compile without FMA contraction (-ffp-contract=off,
// nvcc --fmad=false): a fused multiply-add would round differently from the reference.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ONEREF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ONEREF_HOST_DEVICE inline
#endif

namespace oneref {

// Half-open rectangle of grid cells [x1, x2) x [y1, y2).
struct CellRect {
  int x1, y1, x2, y2;
  ONEREF_HOST_DEVICE bool contains(int col, int row) const {
    return col >= x1 && col < x2 && row >= y1 && row < y2;
  }
  ONEREF_HOST_DEVICE int area() const { return (x2 - x1) * (y2 - y1); }
};

ONEREF_HOST_DEVICE int clamp_cell(int64_t v, int grid) {
  return static_cast<int>(v < 0 ? 0 : (v > grid ? grid : v));
}

// reference.grown_box_region: corners (cx -+ w / 2) * G in float64, truncated toward zero,
// grown by one cell per side, clipped to [0, G].
ONEREF_HOST_DEVICE CellRect grown_box_region(double cx, double cy, double w, double h,
                                             int grid) {
  const double g = static_cast<double>(grid);
  const double x1 = (cx - w / 2.0) * g, y1 = (cy - h / 2.0) * g;
  const double x2 = (cx + w / 2.0) * g, y2 = (cy + h / 2.0) * g;
  return CellRect{clamp_cell(static_cast<int64_t>(trunc(x1)) - 1, grid),
                  clamp_cell(static_cast<int64_t>(trunc(y1)) - 1, grid),
                  clamp_cell(static_cast<int64_t>(trunc(x2)) + 1, grid),
                  clamp_cell(static_cast<int64_t>(trunc(y2)) + 1, grid)};
}

// floor(count * (1 - ratio)) in float64: how many cells a masking ratio keeps.
ONEREF_HOST_DEVICE int64_t keep_count(int64_t count, double ratio) {
  return static_cast<int64_t>(floor(static_cast<double>(count) * (1.0 - ratio)));
}

// reference.box_to_grid_mask, in float32: the box edges scaled to the grid.
struct GridEdges {
  float x1, x2, y1, y2;
  // Cell (row, col) is inside when x1 <= col < x2 and y1 <= row < y2.
  ONEREF_HOST_DEVICE bool contains(int col, int row) const {
    const float c = static_cast<float>(col), r = static_cast<float>(row);
    return c >= x1 && c < x2 && r >= y1 && r < y2;
  }
};

ONEREF_HOST_DEVICE GridEdges box_grid_edges(float cx, float cy, float w, float h, int grid) {
  const float g = static_cast<float>(grid);
  return GridEdges{(cx - 0.5f * w) * g, (cx + 0.5f * w) * g, (cy - 0.5f * h) * g,
                   (cy + 0.5f * h) * g};
}

// reference.vts_targets for one box, in acc_t (float32; float64 when the inputs are float64):
// (cx, cy, 1 / w, 1 / h) in patch units, w and h clamped to >= 1. The per-cell targets are
// (col - cx) / G and (row - cy) / G.
template <typename acc_t>
struct VtsBox {
  acc_t cx, cy, inv_w, inv_h, grid;
  ONEREF_HOST_DEVICE acc_t dx(int col) const { return (static_cast<acc_t>(col) - cx) / grid; }
  ONEREF_HOST_DEVICE acc_t dy(int row) const { return (static_cast<acc_t>(row) - cy) / grid; }
};

template <typename acc_t>
ONEREF_HOST_DEVICE VtsBox<acc_t> vts_box(acc_t cx, acc_t cy, acc_t w, acc_t h, int grid) {
  const acc_t g = static_cast<acc_t>(grid), one = static_cast<acc_t>(1);
  const acc_t wg = w * g, hg = h * g;
  return VtsBox<acc_t>{cx * g, cy * g, one / (wg < one ? one : wg), one / (hg < one ? one : hg),
                       g};
}

}  // namespace oneref
