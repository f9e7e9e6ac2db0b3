// CPU kernels of the masking ops: referring_mask, masked_gather / masked_scatter and
// apply_mask_token. Plain loops: these exist to check the CUDA kernels' contract in CI
// and to run the cuda backend on CPU tensors, not for speed.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/box_math.h"
#include "common/validate.h"
#include "ops.h"

namespace oneref {
namespace {

// rank[i] = position of cells[i] when the cells are sorted by value (ties by index).
template <typename acc_t>
void rank_cells(const acc_t* values, const std::vector<int>& cells, std::vector<int>& rank) {
  std::vector<int> order(cells.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return values[cells[a]] < values[cells[b]]; });
  for (size_t k = 0; k < order.size(); ++k) {
    rank[order[k]] = static_cast<int>(k);
  }
}

template <typename scalar_t>
void referring_mask_kernel(const at::Tensor& boxes, const at::Tensor& noise, int grid,
                           double outside_ratio, double inside_ratio, bool* out) {
  // Noise is compared in fp64 for fp64 input, else in fp32 (exact for fp16 / bf16).
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t batch = boxes.size(0);
  const int cells = grid * grid;
  const auto box = boxes.to(at::kDouble);
  const double* box_ptr = box.data_ptr<double>();
  const scalar_t* noise_ptr = noise.data_ptr<scalar_t>();
  const int64_t keep_outside = keep_count(cells, outside_ratio);

  std::vector<acc_t> values(2 * cells);
  std::vector<int> all(cells), inside, rank(cells), inside_rank;
  std::iota(all.begin(), all.end(), 0);
  for (int64_t b = 0; b < batch; ++b) {
    for (int i = 0; i < 2 * cells; ++i) {
      values[i] = static_cast<acc_t>(noise_ptr[b * 2 * cells + i]);
    }
    const double* bx = box_ptr + 4 * b;
    const CellRect region = grown_box_region(bx[0], bx[1], bx[2], bx[3], grid);
    const int64_t keep_inside = keep_count(region.area(), inside_ratio);

    rank_cells(values.data(), all, rank);
    inside.clear();
    for (int i = 0; i < cells; ++i) {
      if (region.contains(i % grid, i / grid)) {
        inside.push_back(i);
      }
    }
    inside_rank.assign(inside.size(), 0);
    rank_cells(values.data() + cells, inside, inside_rank);

    bool* row = out + b * cells;
    for (int i = 0; i < cells; ++i) {
      row[i] = rank[i] >= keep_outside;
    }
    for (size_t k = 0; k < inside.size(); ++k) {
      row[inside[k]] = inside_rank[k] >= keep_inside;
    }
  }
}

}  // namespace

at::Tensor referring_mask_cpu(const at::Tensor& boxes, const at::Tensor& noise, int64_t grid,
                              double outside_ratio, double inside_ratio) {
  validate_referring_mask(boxes, noise, grid, outside_ratio, inside_ratio);
  auto out = at::empty({boxes.size(0), grid * grid}, boxes.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(),
                                  "referring_mask_cpu", [&] {
    referring_mask_kernel<scalar_t>(boxes, noise, static_cast<int>(grid), outside_ratio,
                                    inside_ratio, out.data_ptr<bool>());
  });
  return out;
}

at::Tensor masked_gather_cpu(const at::Tensor& x, const at::Tensor& mask, int64_t num_rows) {
  validate_masked_gather(x, mask, num_rows);
  const bool* m = mask.data_ptr<bool>();
  const int64_t total = mask.numel();
  const int64_t count = std::count(m, m + total, true);
  TORCH_CHECK(count == num_rows, "oneref::masked_gather: num_rows is ", num_rows,
              " but mask has ", count, " True entries");
  auto out = at::empty({num_rows, x.size(2)}, x.options());
  const size_t row_bytes = static_cast<size_t>(x.size(2)) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t r = 0; r < total; ++r) {
    if (m[r]) {
      std::memcpy(dst, src + r * row_bytes, row_bytes);
      dst += row_bytes;
    }
  }
  return out;
}

at::Tensor masked_scatter_cpu(const at::Tensor& rows, const at::Tensor& mask) {
  validate_masked_scatter(rows, mask);
  const bool* m = mask.data_ptr<bool>();
  const int64_t total = mask.numel();
  const int64_t count = std::count(m, m + total, true);
  TORCH_CHECK(count == rows.size(0), "oneref::masked_scatter: rows has ", rows.size(0),
              " rows but mask has ", count, " True entries");
  auto out = at::zeros({mask.size(0), mask.size(1), rows.size(1)}, rows.options());
  const size_t row_bytes = static_cast<size_t>(rows.size(1)) * rows.element_size();
  const char* src = static_cast<const char*>(rows.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t r = 0; r < total; ++r) {
    if (m[r]) {
      std::memcpy(dst + r * row_bytes, src, row_bytes);
      src += row_bytes;
    }
  }
  return out;
}

at::Tensor apply_mask_token_cpu(const at::Tensor& x, const at::Tensor& mask,
                                const at::Tensor& token) {
  validate_apply_mask_token(x, mask, token);
  auto out = at::empty_like(x);
  const bool* m = mask.data_ptr<bool>();
  const size_t row_bytes = static_cast<size_t>(x.size(2)) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  const char* tok = static_cast<const char*>(token.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t r = 0; r < mask.numel(); ++r) {
    std::memcpy(dst + r * row_bytes, m[r] ? tok : src + r * row_bytes, row_bytes);
  }
  return out;
}

}  // namespace oneref
