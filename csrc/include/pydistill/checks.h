// Argument checks shared by the backends. Every message names the argument and what was
// expected, and every check runs before any kernel work.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <cmath>
#include <optional>
#include <string>
#include <string_view>

#include "pydistill/divergence.h"

namespace pydistill {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                   t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16),
              "pydistill_ext: ", name,
              " must be float64, float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_temperature(double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "pydistill_ext: temperature must be finite and > 0, got ", temperature);
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b,
                              const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "pydistill_ext: ", bn, " is on ", b.device(),
              " but ", an, " is on ", a.device(), "; both must be on the same device");
}

// valid: optional bool [rows] mask of rows that count.
inline void check_valid(const std::optional<at::Tensor>& valid, const at::Tensor& ref,
                        int64_t rows) {
  if (!valid.has_value()) return;
  const auto& v = *valid;
  TORCH_CHECK(v.scalar_type() == at::kBool, "pydistill_ext: valid must be a bool mask, got ",
              v.scalar_type());
  TORCH_CHECK(v.numel() == rows, "pydistill_ext: valid must have one entry per row (",
              rows, "), got ", v.numel());
  check_same_device(ref, "student_logits", v, "valid");
}

inline int64_t leading_rows(const at::Tensor& logits) {
  return c10::multiply_integers(logits.sizes().slice(0, logits.dim() - 1));
}

// Arguments of kd_loss_forward / kd_loss_backward (every backend); returns the plan.
inline DivergencePlan check_kd_dense_args(const at::Tensor& student, const at::Tensor& teacher,
                                          const std::optional<at::Tensor>& valid,
                                          std::string_view divergence, double beta,
                                          double temperature) {
  check_floating(student, "student_logits");
  check_floating(teacher, "teacher_logits");
  TORCH_CHECK(student.dim() >= 1, "pydistill_ext: student_logits must have a vocabulary dim");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "pydistill_ext: teacher_logits shape ",
              teacher.sizes(), " must equal student_logits shape ", student.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "pydistill_ext: teacher_logits dtype ",
              teacher.scalar_type(), " must equal student_logits dtype ", student.scalar_type());
  check_same_device(student, "student_logits", teacher, "teacher_logits");
  check_temperature(temperature);
  const DivergencePlan plan = plan_divergence(std::string(divergence), beta);
  check_valid(valid, student, leading_rows(student));
  return plan;
}

// Arguments of kd_loss_topk_forward / kd_loss_topk_backward (every backend) that need no
// look at the index values; returns the plan.
inline DivergencePlan check_kd_topk_args(const at::Tensor& student, const at::Tensor& indices,
                                         const at::Tensor& teacher_topk,
                                         const std::optional<at::Tensor>& valid,
                                         std::string_view divergence, double beta,
                                         double temperature) {
  check_floating(student, "student_logits");
  check_floating(teacher_topk, "teacher_logits_topk");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "pydistill_ext: teacher_indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(student.dim() >= 1, "pydistill_ext: student_logits must have a vocabulary dim");
  TORCH_CHECK(indices.sizes() == teacher_topk.sizes(), "pydistill_ext: teacher_indices shape ",
              indices.sizes(), " must equal teacher_logits_topk shape ", teacher_topk.sizes());
  TORCH_CHECK(indices.dim() == student.dim() &&
                  indices.sizes().slice(0, indices.dim() - 1) ==
                      student.sizes().slice(0, student.dim() - 1),
              "pydistill_ext: teacher_indices shape ", indices.sizes(),
              " must match student_logits ", student.sizes(), " in all but the last dim");
  check_same_device(student, "student_logits", indices, "teacher_indices");
  check_same_device(student, "student_logits", teacher_topk, "teacher_logits_topk");
  check_temperature(temperature);
  const DivergencePlan plan = plan_divergence(std::string(divergence), beta);
  TORCH_CHECK(!(plan.family == Family::KL && !plan.teacher_is_p),
              "pydistill_ext: divergence '", divergence,
              "' is infinite for a top-k teacher (zero mass off its K entries); use jsd, "
              "skew_reverse_kl, forward_kl or tvd");
  TORCH_CHECK(indices.size(-1) <= student.size(-1), "pydistill_ext: top-k size K=",
              indices.size(-1), " exceeds the vocabulary V=", student.size(-1));
  check_valid(valid, student, leading_rows(student));
  return plan;
}

}  // namespace pydistill
