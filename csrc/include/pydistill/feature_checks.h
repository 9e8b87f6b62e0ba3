// Argument checks of the feature-level ops (class_mean, attention_map, gradient_match),
// shared by the CPU and CUDA backends. Every message names the argument; every check runs
// before any kernel work.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <cmath>
#include <string_view>

#include "pydistill/checks.h"

namespace pydistill {

inline void check_class_mean_args(const at::Tensor& features, const at::Tensor& labels,
                                  int64_t num_classes) {
  check_floating(features, "features");
  TORCH_CHECK(features.dim() == 2, "pydistill_ext: features must be [N, D], got shape ",
              features.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "pydistill_ext: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0),
              "pydistill_ext: labels must be [N] with N = features.size(0) = ", features.size(0),
              ", got shape ", labels.sizes());
  check_same_device(features, "features", labels, "labels");
  TORCH_CHECK(num_classes >= 0, "pydistill_ext: num_classes must be >= 0, got ", num_classes);
}

inline void check_attention_map_args(const at::Tensor& features, double p, double eps) {
  check_floating(features, "features");
  TORCH_CHECK(features.dim() == 4, "pydistill_ext: features must be [N, C, H, W], got shape ",
              features.sizes());
  TORCH_CHECK(std::isfinite(p) && p > 0.0, "pydistill_ext: p must be finite and > 0, got ", p);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "pydistill_ext: eps must be finite and >= 0, got ",
              eps);
}

// The forward's a [N, H*W] (compute dtype) given to attention_map_backward.
inline void check_attention_map_saved(const at::Tensor& a, const at::Tensor& features, int64_t N,
                                      int64_t S) {
  TORCH_CHECK(a.dim() == 2 && a.size(0) == N && a.size(1) == S, "pydistill_ext: a must be [N, H*W] = [",
              N, ", ", S, "], got ", a.sizes());
  const auto op_dtype = at::toOpMathType(features.scalar_type());
  TORCH_CHECK(a.scalar_type() == op_dtype, "pydistill_ext: a must be ", op_dtype, " (the compute "
              "dtype of features), got ", a.scalar_type());
  check_same_device(features, "features", a, "a");
}

// Everything attention_map_backward receives: the forward's arguments, grad_out [N, H*W] and
// the saved a.
inline void check_attention_map_backward_args(const at::Tensor& grad_out, const at::Tensor& features,
                                              const at::Tensor& a, double p, double eps) {
  check_attention_map_args(features, p, eps);
  const int64_t N = features.size(0), S = features.size(2) * features.size(3);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == S,
              "pydistill_ext: grad_out must be [N, H*W] = [", N, ", ", S, "], got ", grad_out.sizes());
  check_attention_map_saved(a, features, N, S);
  check_same_device(features, "features", grad_out, "grad_out");
}

// grad (one value) and the forward's row_stats [rows, 3] (compute dtype) given to
// gradient_match_backward.
inline void check_gradient_match_backward_args(const at::Tensor& grad, const at::Tensor& ref,
                                               const at::Tensor& row_stats, int64_t rows) {
  TORCH_CHECK(grad.numel() == 1, "pydistill_ext: grad must hold one value, got ", grad.numel());
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == rows && row_stats.size(1) == 3,
              "pydistill_ext: row_stats must be [", rows, ", 3], got ", row_stats.sizes());
  TORCH_CHECK(row_stats.scalar_type() == at::toOpMathType(ref.scalar_type()),
              "pydistill_ext: row_stats must be ", at::toOpMathType(ref.scalar_type()), ", got ",
              row_stats.scalar_type());
  check_same_device(ref, "grads_a[0]", grad, "grad");
  check_same_device(ref, "grads_a[0]", row_stats, "row_stats");
}

enum class MatchMetric { Ours, Mse, Cos };

inline MatchMetric parse_match_metric(std::string_view metric) {
  if (metric == "ours") return MatchMetric::Ours;
  if (metric == "mse") return MatchMetric::Mse;
  if (metric == "cos") return MatchMetric::Cos;
  TORCH_CHECK(false, "pydistill_ext: metric must be 'ours', 'mse' or 'cos', got '", metric, "'");
}

// Pairwise equal shapes, one floating dtype and one device for all tensors of both lists.
inline void check_gradient_match_args(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(a.size() == b.size(), "pydistill_ext: grads_a and grads_b must have the same "
              "length, got ", a.size(), " and ", b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    check_floating(a[i], "grads_a[i]");
    TORCH_CHECK(a[i].sizes() == b[i].sizes(), "pydistill_ext: grads_b[", i, "] shape ",
                b[i].sizes(), " must equal grads_a[", i, "] shape ", a[i].sizes());
    TORCH_CHECK(a[i].scalar_type() == a[0].scalar_type() &&
                    b[i].scalar_type() == a[0].scalar_type(),
                "pydistill_ext: grads_a[", i, "] / grads_b[", i, "] dtype ", a[i].scalar_type(),
                " / ", b[i].scalar_type(), " must equal grads_a[0] dtype ", a[0].scalar_type());
    check_same_device(a[0], "grads_a[0]", a[i], "grads_a[i]");
    check_same_device(a[0], "grads_a[0]", b[i], "grads_b[i]");
  }
}

// dsa_apply_forward / dsa_apply_backward: x (or grad_out) [N, C, H, W] floating, params
// [N, 14] float64 on the same device (layout in pydistill/dsa_taps.h), flags in [0, 63].
inline void check_dsa_apply_args(const at::Tensor& x, const char* x_name, const at::Tensor& params,
                                 int64_t flags) {
  check_floating(x, x_name);
  TORCH_CHECK(x.dim() == 4, "pydistill_ext: ", x_name, " must be [N, C, H, W], got shape ",
              x.sizes());
  TORCH_CHECK(params.scalar_type() == at::kDouble, "pydistill_ext: params must be float64, got ",
              params.scalar_type());
  TORCH_CHECK(params.dim() == 2 && params.size(0) == x.size(0) && params.size(1) == 14,
              "pydistill_ext: params must be [N, 14] with N = ", x_name, ".size(0) = ", x.size(0),
              ", got shape ", params.sizes());
  check_same_device(x, x_name, params, "params");
  TORCH_CHECK(flags >= 0 && flags <= 63, "pydistill_ext: flags must be in [0, 63], got ", flags);
}

}  // namespace pydistill
