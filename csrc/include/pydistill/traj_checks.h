// Argument checks and shape helpers of the trajectory-matching ops (REFERENCE.md section 5):
// param_distance (MTT's normalised parameter-distance loss) and sgd_step_accumulate (the
// student's SGD step that also keeps TESLA's running gradient sum). Used by the CPU and CUDA
// backends; every message names the argument and every check runs before any kernel work.
#pragma once

#include <ATen/ATen.h>

#include "pydistill/checks.h"

namespace pydistill {

// Flat parameter vectors are float32 or float64 (the dtype the student is trained in).
inline void check_param_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "pydistill_ext: ", name, " must be float32 or float64, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& ref, const char* rn, const at::Tensor& t,
                       const char* tn) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "pydistill_ext: ", tn, " must have ", rn, "'s shape ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "pydistill_ext: ", tn, " must have ", rn,
              "'s dtype ", ref.scalar_type(), ", got ", t.scalar_type());
  check_same_device(ref, rn, t, tn);
}

// param_distance: theta, target, start all [P] (one problem) or [K, P] (K problems), P >= 1.
struct ParamDistShape {
  int64_t K, P;
  bool batched;
};

inline ParamDistShape check_param_distance_args(const at::Tensor& theta, const at::Tensor& target,
                                                const at::Tensor& start) {
  check_param_dtype(theta, "theta");
  TORCH_CHECK(theta.dim() == 1 || theta.dim() == 2, "pydistill_ext: theta must be a flat "
              "vector [P] or a batch [K, P], got shape ", theta.sizes());
  check_like(theta, "theta", target, "target");
  check_like(theta, "theta", start, "start");
  ParamDistShape s;
  s.batched = theta.dim() == 2;
  s.K = s.batched ? theta.size(0) : 1;
  s.P = theta.size(-1);
  TORCH_CHECK(s.P > 0, "pydistill_ext: theta has no parameters (P = 0)");
  return s;
}

// param_distance_backward's coefficients a, b: [K] (batched) or 0-dim, in theta's dtype.
inline ParamDistShape check_param_distance_backward_args(const at::Tensor& a, const at::Tensor& b,
                                                         const at::Tensor& theta,
                                                         const at::Tensor& target,
                                                         const at::Tensor& start) {
  const ParamDistShape s = check_param_distance_args(theta, target, start);
  const at::Tensor* ts[2] = {&a, &b};
  const char* names[2] = {"coef_theta", "coef_start"};
  for (int i = 0; i < 2; ++i) {
    const bool ok = s.batched ? (ts[i]->dim() == 1 && ts[i]->size(0) == s.K) : ts[i]->dim() == 0;
    TORCH_CHECK(ok, "pydistill_ext: ", names[i], " must be ", s.batched ? "[K]" : "0-dim",
                " like the loss, got shape ", ts[i]->sizes());
    TORCH_CHECK(ts[i]->scalar_type() == theta.scalar_type(), "pydistill_ext: ", names[i],
                " must have theta's dtype ", theta.scalar_type(), ", got ", ts[i]->scalar_type());
    check_same_device(theta, "theta", *ts[i], names[i]);
  }
  return s;
}

inline std::vector<int64_t> param_distance_out_shape(const ParamDistShape& s) {
  return s.batched ? std::vector<int64_t>{s.K} : std::vector<int64_t>{};
}

// sgd_step_accumulate: theta, grad, grad_sum of one shape and dtype (float32 / float64) on one
// device; lr a 0-dim tensor of the same dtype and device (a tensor so that it can be learnable;
// read by the kernel in place: no host sync on CUDA).
inline void check_sgd_step_args(const at::Tensor& theta, const at::Tensor& grad,
                                const at::Tensor& lr, const at::Tensor& grad_sum) {
  check_param_dtype(theta, "theta");
  check_like(theta, "theta", grad, "grad");
  check_like(theta, "theta", grad_sum, "grad_sum");
  TORCH_CHECK(lr.dim() == 0, "pydistill_ext: lr must be a 0-dim tensor, got shape ", lr.sizes());
  TORCH_CHECK(lr.scalar_type() == theta.scalar_type(), "pydistill_ext: lr must have theta's "
              "dtype ", theta.scalar_type(), ", got ", lr.scalar_type());
  check_same_device(theta, "theta", lr, "lr");
}

}  // namespace pydistill
