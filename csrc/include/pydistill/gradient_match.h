// Host-side plan and closing math of gradient_match_forward / gradient_match_backward, shared
// by the CPU and CUDA kernels (csrc/{cpu,cuda}/gradient_match_kernel.*).
//
// Packed rows. Every tensor pair (a_i, b_i) is cut into rows of width w_i; row j of tensor i
// covers the flat elements [j * w_i, min((j + 1) * w_i, numel_i)). All rows of all tensors
// are numbered consecutively (row_offset[i] .. row_offset[i + 1]) so one parallel loop / one
// launch covers the whole list.
//   metric 'ours' (DC distance_wb): w_i = numel_i / size(0) for tensors of >= 2 dims (the
//     [out, rest] reshape); tensors of < 2 dims get no rows: they contribute 0, as in DC.
//   'mse' / 'cos': every tensor contributes and the row cut is only a work split (fixed
//     chunks of kChunk elements).
// The kernels compute per row the statistics (dot, |a|^2, |b|^2) (ours, cos) or
// (sum (a - b)^2, 0, 0) (mse) into row_stats [R, 3] (compute dtype), and here:
//   ours: d = sum_r (1 - dot_r / (|a_r| |b_r| + 1e-6))
//   cos:  d = 1 - DOT / (|A| |B| + 1e-6), totals over all rows (one flat cosine)
//   mse:  d = sum_r sum (a - b)^2
// Backward (derived; REFERENCE.md 3): with D = |a||b| + 1e-6,
//   d(1 - <a,b>/D)/da = -b / D + <a,b> |b| / (|a| D^2) * a       (the second term 0 if |a| = 0,
//   d(1 - <a,b>/D)/db = -a / D + <a,b> |a| / (|b| D^2) * b        torch's norm subgradient)
//   d mse / da = 2 (a - b),  d mse / db = -2 (a - b)
// so every gradient row is g * (c_aa a + c_ab b) and g * (c_ba a + c_bb b): the coefficients
// [R, 4] come from row_stats here (per row for ours, one set for cos and mse) and the
// kernels apply them in one pass.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string_view>
#include <vector>

#include "pydistill/feature_checks.h"

namespace pydistill {

constexpr int64_t kMatchChunk = 4096;
constexpr double kMatchEps = 1e-6;  // DC's 0.000001

struct MatchPlan {
  MatchMetric metric;
  std::vector<int64_t> row_offset;  // [T + 1]
  std::vector<int64_t> width;       // [T]
  std::vector<int64_t> numel;       // [T]
  int64_t rows() const { return row_offset.back(); }
};

inline MatchPlan plan_gradient_match(at::TensorList a, at::TensorList b, std::string_view metric) {
  MatchPlan plan;
  plan.metric = parse_match_metric(metric);
  TORCH_CHECK(!a.empty(), "pydistill_ext: grads_a must hold at least one tensor");
  check_gradient_match_args(a, b);
  plan.row_offset.push_back(0);
  for (const auto& t : a) {
    const int64_t n = t.numel();
    int64_t rows = 0, w = 0;
    if (plan.metric == MatchMetric::Ours) {
      if (t.dim() >= 2) {
        rows = t.size(0);
        w = rows > 0 ? n / rows : 0;
      }
    } else {
      w = kMatchChunk;
      rows = (n + w - 1) / w;
    }
    plan.width.push_back(w);
    plan.numel.push_back(n);
    plan.row_offset.push_back(plan.row_offset.back() + rows);
  }
  return plan;
}

inline at::Tensor gradient_match_loss(const at::Tensor& stats, MatchMetric metric,
                                      at::ScalarType out_dtype) {
  at::Tensor loss;
  if (metric == MatchMetric::Mse) {
    loss = stats.select(1, 0).sum();
  } else if (metric == MatchMetric::Ours) {
    const auto na = stats.select(1, 1).sqrt(), nb = stats.select(1, 2).sqrt();
    loss = (1 - stats.select(1, 0) / (na * nb + kMatchEps)).sum();
  } else {
    const auto tot = stats.sum(0);
    loss = 1 - tot[0] / (tot[1].sqrt() * tot[2].sqrt() + kMatchEps);
  }
  return loss.to(out_dtype);
}

// [R, 4] = grad * (c_aa, c_ab, c_ba, c_bb) per row, in the compute dtype of stats.
inline at::Tensor gradient_match_coefficients(const at::Tensor& grad, const at::Tensor& stats,
                                              MatchMetric metric) {
  const int64_t R = stats.size(0);
  const auto g = grad.to(stats.scalar_type()).reshape({1});
  if (metric == MatchMetric::Mse)
    return (at::tensor({2.0, -2.0, -2.0, 2.0}, stats.options()) * g).expand({R, 4}).contiguous();
  at::Tensor dot, a2, b2;
  if (metric == MatchMetric::Ours) {
    dot = stats.select(1, 0), a2 = stats.select(1, 1), b2 = stats.select(1, 2);
  } else {
    const auto tot = stats.sum(0);
    dot = tot.slice(0, 0, 1), a2 = tot.slice(0, 1, 2), b2 = tot.slice(0, 2, 3);
  }
  const auto na = a2.sqrt(), nb = b2.sqrt();
  const auto D = na * nb + kMatchEps;
  const auto cross = -1 / D;
  const auto k = dot / (D * D);
  const auto zero = at::zeros({}, stats.options());
  const auto caa = at::where(na > 0, k * nb / na, zero);
  const auto cbb = at::where(nb > 0, k * na / nb, zero);
  return (at::stack({caa, cross, cross, cbb}, 1) * g).expand({R, 4}).contiguous();
}

// Scalar forms of the two functions above for a host-side loop over the rows (CPU kernels):
// same formulas, sums in row order.
template <typename T>
T gradient_match_loss_host(const T* st, int64_t R, MatchMetric metric) {
  T acc = 0, dot = 0, a2 = 0, b2 = 0;
  for (int64_t r = 0; r < R; ++r) {
    if (metric == MatchMetric::Mse) {
      acc += st[3 * r];
    } else if (metric == MatchMetric::Ours) {
      acc += T(1) - st[3 * r] / (std::sqrt(st[3 * r + 1]) * std::sqrt(st[3 * r + 2]) + T(kMatchEps));
    } else {
      dot += st[3 * r], a2 += st[3 * r + 1], b2 += st[3 * r + 2];
    }
  }
  if (metric == MatchMetric::Cos) acc = T(1) - dot / (std::sqrt(a2) * std::sqrt(b2) + T(kMatchEps));
  return acc;
}

// g * (c_aa, c_ab, c_ba, c_bb) of one row with statistics (dot, |a|^2, |b|^2).
template <typename T>
void gradient_match_row_coefficients(T dot, T a2, T b2, T g, MatchMetric metric, T* c) {
  if (metric == MatchMetric::Mse) {
    c[0] = 2 * g, c[1] = -2 * g, c[2] = -2 * g, c[3] = 2 * g;
    return;
  }
  const T na = std::sqrt(a2), nb = std::sqrt(b2);
  const T D = na * nb + T(kMatchEps);
  const T k = dot / (D * D);
  c[0] = na > 0 ? g * k * nb / na : T(0);
  c[1] = -g / D;
  c[2] = -g / D;
  c[3] = nb > 0 ? g * k * na / nb : T(0);
}

// The gradient buffers: zeros for tensors without rows (1-D under 'ours'), else uninitialised
// (every element is written by the kernel).
inline std::vector<at::Tensor> gradient_match_grad_buffers(at::TensorList ref, const MatchPlan& plan) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < ref.size(); ++i) {
    const bool covered = plan.row_offset[i + 1] > plan.row_offset[i] || ref[i].numel() == 0;
    out.push_back(covered ? at::empty(ref[i].sizes(), ref[i].options())
                          : at::zeros(ref[i].sizes(), ref[i].options()));
  }
  return out;
}

}  // namespace pydistill
