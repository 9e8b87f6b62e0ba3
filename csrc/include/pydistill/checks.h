// Argument checks shared by the backends. Every message names the argument and what was
// expected, and every check runs before any kernel work.
#pragma once

#include <ATen/ATen.h>
#include <cmath>
#include <optional>

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

}  // namespace pydistill
