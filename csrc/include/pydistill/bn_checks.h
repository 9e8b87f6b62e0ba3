// Argument checks and shared helpers of bn_moments (REFERENCE.md section 4), used by the CPU
// and CUDA backends. Every message names the argument; every check runs before any kernel work.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/accumulate.h>

#include <vector>

#include "pydistill/checks.h"

namespace pydistill {

// Shape of a bn_moments problem. x is [N, C, *]; S = prod(x.shape[2:]) (1 for [N, C]).
// groups G: C (per channel) or N * C (per sample and channel); count M of each reduction:
// N * S (per channel) or S (per sample).
struct BnMomentsShape {
  int64_t N, C, S, G, M;
};

inline BnMomentsShape check_bn_moments_args(const at::Tensor& x, bool per_sample, bool unbiased) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 2, "pydistill_ext: x must be [N, C, *] with at least 2 dims, got shape ",
              x.sizes());
  BnMomentsShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.S = c10::multiply_integers(x.sizes().slice(2));
  s.G = per_sample ? s.N * s.C : s.C;
  s.M = per_sample ? s.S : s.N * s.S;
  if (!per_sample) {
    TORCH_CHECK(s.M > 0, "pydistill_ext: x has an empty reduction: N * prod(x.shape[2:]) = 0 "
                "elements per channel for shape ", x.sizes());
  } else {
    TORCH_CHECK(s.M > 0, "pydistill_ext: x has an empty reduction: prod(x.shape[2:]) = 0 "
                "elements per (sample, channel) for shape ", x.sizes());
  }
  TORCH_CHECK(!unbiased || s.M > 1, "pydistill_ext: unbiased=True needs at least 2 elements per ",
              per_sample ? "(sample, channel)" : "channel", ", got ", s.M, " for x of shape ",
              x.sizes());
  return s;
}

inline std::vector<int64_t> bn_moments_out_shape(const BnMomentsShape& s, bool per_sample) {
  return per_sample ? std::vector<int64_t>{s.N, s.C} : std::vector<int64_t>{s.C};
}

// Everything bn_moments_backward receives: grad_mean, grad_var and the forward's mean all of
// the output shape ([C] or [N, C]) in the compute dtype of x (float64 for float64, else float32).
inline BnMomentsShape check_bn_moments_backward_args(const at::Tensor& grad_mean,
                                                     const at::Tensor& grad_var,
                                                     const at::Tensor& x, const at::Tensor& mean,
                                                     bool per_sample, bool unbiased) {
  const BnMomentsShape s = check_bn_moments_args(x, per_sample, unbiased);
  const auto want = bn_moments_out_shape(s, per_sample);
  const auto op_dtype = at::toOpMathType(x.scalar_type());
  const at::Tensor* ts[3] = {&grad_mean, &grad_var, &mean};
  const char* names[3] = {"grad_mean", "grad_var", "mean"};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(ts[i]->sizes() == at::IntArrayRef(want), "pydistill_ext: ", names[i],
                " must have shape ", at::IntArrayRef(want), ", got ", ts[i]->sizes());
    TORCH_CHECK(ts[i]->scalar_type() == op_dtype, "pydistill_ext: ", names[i], " must be ",
                op_dtype, " (the compute dtype of x), got ", ts[i]->scalar_type());
    check_same_device(x, "x", *ts[i], names[i]);
  }
  return s;
}

// frozen_bn_moments_forward: x as bn_moments; scale, shift [C] in the compute dtype.
inline BnMomentsShape check_frozen_bn_moments_args(const at::Tensor& x, const at::Tensor& scale,
                                                   const at::Tensor& shift, bool per_sample,
                                                   bool unbiased) {
  const BnMomentsShape s = check_bn_moments_args(x, per_sample, unbiased);
  const auto op_dtype = at::toOpMathType(x.scalar_type());
  const at::Tensor* ts[2] = {&scale, &shift};
  const char* names[2] = {"scale", "shift"};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(ts[i]->dim() == 1 && ts[i]->size(0) == s.C, "pydistill_ext: ", names[i],
                " must be [C] = [", s.C, "], got ", ts[i]->sizes());
    TORCH_CHECK(ts[i]->scalar_type() == op_dtype, "pydistill_ext: ", names[i], " must be ",
                op_dtype, " (the compute dtype of x), got ", ts[i]->scalar_type());
    check_same_device(x, "x", *ts[i], names[i]);
  }
  return s;
}

// frozen_bn_moments_backward's extra arguments: grad_y like x, scale [C] (compute dtype).
inline void check_frozen_bn_moments_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                                  const at::Tensor& scale) {
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "pydistill_ext: grad_y must have x's shape ", x.sizes(), " and dtype ",
              x.scalar_type(), ", got ", grad_y.sizes(), " ", grad_y.scalar_type());
  check_same_device(x, "x", grad_y, "grad_y");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == x.size(1) &&
                  scale.scalar_type() == at::toOpMathType(x.scalar_type()),
              "pydistill_ext: scale must be [C] = [", x.size(1), "] in ",
              at::toOpMathType(x.scalar_type()), ", got ", scale.sizes(), " ", scale.scalar_type());
  check_same_device(x, "x", scale, "scale");
}

// Closed-form backward coefficients (REFERENCE.md 4.2): dL/dx = a_g + b_g * x with
//   b_g = 2 * grad_var_g / M',  M' = M - 1 (unbiased) or M (biased),
//   a_g = grad_mean_g / M - b_g * mean_g.
// Returns (a, b), flat [G] contiguous tensors in the compute dtype (on x's device).
inline std::pair<at::Tensor, at::Tensor> bn_moments_coefficients(const at::Tensor& grad_mean,
                                                                 const at::Tensor& grad_var,
                                                                 const at::Tensor& mean,
                                                                 const BnMomentsShape& s,
                                                                 bool unbiased) {
  const double M = static_cast<double>(s.M);
  const double Mp = unbiased ? M - 1.0 : M;
  at::Tensor b = (grad_var.reshape({-1}) * (2.0 / Mp)).contiguous();
  at::Tensor a = (grad_mean.reshape({-1}) * (1.0 / M) - b * mean.reshape({-1})).contiguous();
  return {a, b};
}

// How a kernel walks x: as NCHW runs (x contiguous: channel c of sample n is S contiguous
// elements) or as rows of C channels (x.movedim(1, -1) contiguous: channels_last, and any
// [N, C] / S = 1 input). A tensor that is both (C = 1) is walked as runs.
inline bool bn_is_rows_layout(const at::Tensor& t, int64_t S) {
  return t.movedim(1, -1).is_contiguous() && (S == 1 || !t.is_contiguous());
}

}  // namespace pydistill
