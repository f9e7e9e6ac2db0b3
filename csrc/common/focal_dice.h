// Per-pixel terms of the sigmoid focal loss (alpha 0.25, gamma 2) and of the dice loss, with
// their derivatives (host + device), in T = float32 (float64 for float64 logits, as the
// reference).
//
//   p = sigmoid(x), ce = max(x, 0) - x t + log1p(exp(-|x|))   (BCE with logits)
//   p_t = p t + (1 - p)(1 - t), alpha_t = a t + (1 - a)(1 - t)
//   focal = alpha_t ce (1 - p_t)^2
//   d focal / dx = alpha_t [(p - t)(1 - p_t)^2 - 2 ce (1 - p_t)(2t - 1) p (1 - p)]
//   dice = 1 - (2 I + 1) / (Sp + St + 1), I = sum p t, Sp = sum p, St = sum t
//   d dice / dx_i = -(2 t_i (Sp + St + 1) - (2 I + 1)) / (Sp + St + 1)^2 * p_i (1 - p_i)
// Loss = focal_weight * mean_b(mean_i focal) + dice_weight * mean_b(dice_b).
#pragma once

#include <cmath>

#include "common/box_math.h"

namespace oneref {

// Overloads for float and double of the few math functions used (host and device).
ONEREF_HOST_DEVICE float math_exp(float x) { return expf(x); }
ONEREF_HOST_DEVICE double math_exp(double x) { return exp(x); }
ONEREF_HOST_DEVICE float math_log1p(float x) { return log1pf(x); }
ONEREF_HOST_DEVICE double math_log1p(double x) { return log1p(x); }
ONEREF_HOST_DEVICE float math_abs(float x) { return fabsf(x); }
ONEREF_HOST_DEVICE double math_abs(double x) { return fabs(x); }

template <typename T>
struct FocalTerm {
  T prob;   // sigmoid(x)
  T focal;  // focal loss of the pixel
};

template <typename T>
ONEREF_HOST_DEVICE T stable_sigmoid(T x) {
  if (x >= T(0)) {
    return T(1) / (T(1) + math_exp(-x));
  }
  const T e = math_exp(x);
  return e / (T(1) + e);
}

template <typename T>
ONEREF_HOST_DEVICE T bce_with_logits(T x, T t) {
  return (x > T(0) ? x : T(0)) - x * t + math_log1p(math_exp(-math_abs(x)));
}

template <typename T>
ONEREF_HOST_DEVICE T focal_alpha_t(T t) {
  const T alpha = T(0.25);
  return alpha * t + (T(1) - alpha) * (T(1) - t);
}

template <typename T>
ONEREF_HOST_DEVICE FocalTerm<T> focal_term(T x, T t) {
  const T p = stable_sigmoid(x);
  const T one_minus = T(1) - (p * t + (T(1) - p) * (T(1) - t));
  return FocalTerm<T>{p, focal_alpha_t(t) * bce_with_logits(x, t) * one_minus * one_minus};
}

template <typename T>
ONEREF_HOST_DEVICE T focal_grad(T x, T t) {
  const T p = stable_sigmoid(x);
  const T one_minus = T(1) - (p * t + (T(1) - p) * (T(1) - t));
  return focal_alpha_t(t) * ((p - t) * one_minus * one_minus -
                             T(2) * bce_with_logits(x, t) * one_minus * (T(2) * t - T(1)) * p *
                                 (T(1) - p));
}

// Dice of one sample from its sums, and the derivative of the dice w.r.t. one logit.
template <typename T>
ONEREF_HOST_DEVICE T dice_from_sums(T inter, T sum_p, T sum_t) {
  return T(1) - (T(2) * inter + T(1)) / (sum_p + sum_t + T(1));
}

template <typename T>
ONEREF_HOST_DEVICE T dice_grad(T p, T t, T inter, T sum_p, T sum_t) {
  const T den = sum_p + sum_t + T(1);
  return -(T(2) * t * den - (T(2) * inter + T(1))) / (den * den) * p * (T(1) - p);
}

}  // namespace oneref
