// Schemas of the BatchNorm-statistic op (REFERENCE.md section 4): fused per-channel (or per
// sample and channel) mean and variance with a closed-form backward. A TORCH_LIBRARY_FRAGMENT
// beside registration.cpp; kernels in csrc/cpu/bn_moments_kernel.cpp and
// csrc/cuda/bn_moments_kernel.cu, fake kernels and autograd in pydistill_ext/ops/bn_moments.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pydistill_ext, m) {
  // x [N, C, *]: mean and variance over every dim except 1 (-> [C], [C]), or with
  // per_sample over the trailing dims only (-> [N, C]). Variance biased (divide by the count
  // M) or unbiased (M - 1). Returns (mean, var) in the compute dtype: float64 for float64
  // inputs, float32 for float32 / float16 / bfloat16. Deterministic on every backend.
  m.def("bn_moments_forward(Tensor x, bool per_sample, bool unbiased) -> (Tensor, Tensor)");
  // Gradient w.r.t. x of sum(grad_mean * mean + grad_var * var) given the forward's mean:
  // a_g + b_g * x (REFERENCE.md 4.2), in x's dtype and (dense) memory format.
  m.def("bn_moments_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor mean, "
        "bool per_sample, bool unbiased) -> Tensor");

  // Frozen (eval-mode) BatchNorm and the moments of its input in one read of x:
  // y = scale[c] * x + shift[c] (scale = weight / sqrt(running_var + eps), shift = bias -
  // running_mean * scale, [C] in the compute dtype), and (mean, var) as bn_moments_forward.
  // CPU only.
  m.def("frozen_bn_moments_forward(Tensor x, Tensor scale, Tensor shift, bool per_sample, "
        "bool unbiased) -> (Tensor, Tensor, Tensor)");
  // Gradient w.r.t. x: scale[c] * grad_y + a_g + b_g * x (one read of x and grad_y, one write).
  m.def("frozen_bn_moments_backward(Tensor grad_y, Tensor grad_mean, Tensor grad_var, Tensor x, "
        "Tensor mean, Tensor scale, bool per_sample, bool unbiased) -> Tensor");
}
