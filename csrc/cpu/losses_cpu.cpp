// CPU kernels of the loss ops: vts_loss and box_mask_loss, forward and backward.
// Per-element math in acc_t (float32, float64 for float64 inputs, as the reference); sums
// accumulated in float64.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "common/box_math.h"
#include "common/focal_dice.h"
#include "common/validate.h"
#include "ops.h"

namespace oneref {
namespace {

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T>
T sign(T v) {
  return v > T(0) ? T(1) : (v < T(0) ? T(-1) : T(0));
}

// Calls fn(row_index, target[4]) for every (sample, cell) row; boxes (B, 4) of type acc_t.
template <typename acc_t, typename Fn>
void for_each_vts_row(const at::Tensor& boxes, int grid, Fn fn) {
  const acc_t* box = boxes.data_ptr<acc_t>();
  const int cells = grid * grid;
  for (int64_t b = 0; b < boxes.size(0); ++b) {
    const acc_t* bx = box + 4 * b;
    const VtsBox<acc_t> vb = vts_box<acc_t>(bx[0], bx[1], bx[2], bx[3], grid);
    for (int i = 0; i < cells; ++i) {
      const acc_t target[4] = {vb.dx(i % grid), vb.dy(i / grid), vb.inv_w, vb.inv_h};
      fn(b * cells + i, target);
    }
  }
}

struct SampleSums {
  double focal = 0.0, inter = 0.0, sum_p = 0.0, sum_t = 0.0;
};

template <typename scalar_t>
SampleSums box_mask_sums(const scalar_t* x, const GridEdges& edges, int grid) {
  using acc_t = acc_of<scalar_t>;
  SampleSums s;
  for (int i = 0; i < grid * grid; ++i) {
    const acc_t t = edges.contains(i % grid, i / grid) ? acc_t(1) : acc_t(0);
    const FocalTerm<acc_t> f = focal_term(static_cast<acc_t>(x[i]), t);
    s.focal += f.focal;
    s.inter += f.prob * t;
    s.sum_p += f.prob;
    s.sum_t += t;
  }
  return s;
}

GridEdges edges_of(const float* box, int grid) {
  return box_grid_edges(box[0], box[1], box[2], box[3], grid);
}

}  // namespace

at::Tensor vts_loss_cpu(const at::Tensor& pred, const at::Tensor& boxes, int64_t grid) {
  validate_vts_loss(pred, boxes, grid);
  const auto acc = vts_acc_type(pred, boxes);
  // float64 boxes with a low-precision pred: pred is upcast (the reference's promotion).
  const auto p = acc == at::kDouble ? pred.to(at::kDouble) : pred;
  const auto box = boxes.to(acc);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "vts_loss_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* x = p.data_ptr<scalar_t>();
    for_each_vts_row<acc_t>(box, static_cast<int>(grid), [&](int64_t r, const acc_t* t) {
      for (int k = 0; k < 4; ++k) {
        total += std::fabs(static_cast<acc_t>(x[4 * r + k]) - t[k]);
      }
    });
  });
  const double rows = static_cast<double>(pred.size(0) * pred.size(1));
  return at::full({}, total / rows, pred.options().dtype(acc));
}

at::Tensor vts_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred,
                                 const at::Tensor& boxes, int64_t grid) {
  validate_vts_loss(pred, boxes, grid);
  const auto acc = vts_acc_type(pred, boxes);
  validate_scalar_grad("oneref::vts_loss_backward", grad, pred.device(), acc);
  const auto p = acc == at::kDouble ? pred.to(at::kDouble) : pred;
  const auto box = boxes.to(acc);
  auto out = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(),
                                  "vts_loss_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    // d mean / d row = g / (B L), then d |p - t| / d p = sign(p - t) (0 at 0, as torch.abs).
    const acc_t scale = grad.reshape({}).item<acc_t>() / static_cast<acc_t>(p.size(0) * p.size(1));
    const scalar_t* x = p.data_ptr<scalar_t>();
    scalar_t* g = out.data_ptr<scalar_t>();
    for_each_vts_row<acc_t>(box, static_cast<int>(grid), [&](int64_t r, const acc_t* t) {
      for (int k = 0; k < 4; ++k) {
        g[4 * r + k] = static_cast<scalar_t>(sign(static_cast<acc_t>(x[4 * r + k]) - t[k]) * scale);
      }
    });
  });
  return out.to(pred.scalar_type());
}

at::Tensor box_mask_loss_cpu(const at::Tensor& logits, const at::Tensor& boxes,
                             double focal_weight, double dice_weight) {
  validate_box_mask_loss(logits, boxes);
  const auto box = boxes.to(at::kFloat);  // rasterised in float32 (reference.box_to_grid_mask)
  const int64_t batch = logits.size(0);
  const int grid = static_cast<int>(logits.size(1));
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "box_mask_loss_cpu", [&] {
    for (int64_t b = 0; b < batch; ++b) {
      const SampleSums s = box_mask_sums(logits.data_ptr<scalar_t>() + b * grid * grid,
                                         edges_of(box.data_ptr<float>() + 4 * b, grid), grid);
      const double dice = 1.0 - (2.0 * s.inter + 1.0) / (s.sum_p + s.sum_t + 1.0);
      total += focal_weight * s.focal / (grid * grid) + dice_weight * dice;
    }
  });
  return at::full({}, total / batch, logits.options().dtype(acc_type(logits)));
}

at::Tensor box_mask_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                      const at::Tensor& boxes, double focal_weight,
                                      double dice_weight) {
  validate_box_mask_loss(logits, boxes);
  validate_scalar_grad("oneref::box_mask_loss_backward", grad, logits.device(),
                       acc_type(logits));
  const auto box = boxes.to(at::kFloat);
  const int64_t batch = logits.size(0);
  const int grid = static_cast<int>(logits.size(1));
  const int cells = grid * grid;
  auto out = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "box_mask_loss_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const acc_t g = grad.reshape({}).item<acc_t>();
    const acc_t focal_scale =
        static_cast<acc_t>(focal_weight) * g / static_cast<acc_t>(batch * cells);
    const acc_t dice_scale = static_cast<acc_t>(dice_weight) * g / static_cast<acc_t>(batch);
    for (int64_t b = 0; b < batch; ++b) {
      const GridEdges edges = edges_of(box.data_ptr<float>() + 4 * b, grid);
      const scalar_t* x = logits.data_ptr<scalar_t>() + b * cells;
      scalar_t* dx = out.data_ptr<scalar_t>() + b * cells;
      const SampleSums s = box_mask_sums(x, edges, grid);
      const auto inter = static_cast<acc_t>(s.inter), sum_p = static_cast<acc_t>(s.sum_p);
      const auto sum_t = static_cast<acc_t>(s.sum_t);
      for (int i = 0; i < cells; ++i) {
        const acc_t t = edges.contains(i % grid, i / grid) ? acc_t(1) : acc_t(0);
        const acc_t xi = static_cast<acc_t>(x[i]);
        const acc_t d_dice = dice_grad(stable_sigmoid(xi), t, inter, sum_p, sum_t);
        dx[i] = static_cast<scalar_t>(focal_scale * focal_grad(xi, t) + dice_scale * d_dice);
      }
    }
  });
  return out;
}

}  // namespace oneref
