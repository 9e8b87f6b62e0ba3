// Schemas of the feature-level ops (REFERENCE.md section 3): segmented class means,
// attention maps, DC gradient-matching distance. A TORCH_LIBRARY_FRAGMENT beside the main
// TORCH_LIBRARY block of registration.cpp; kernels in csrc/cpu/<op>_kernel.cpp and
// csrc/cuda/<op>_kernel.cu, fake kernels and autograd in pydistill_ext/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pydistill_ext, m) {
  // Per-class mean of the rows of features [N, D] grouped by labels [N] (int64 in
  // [0, num_classes)). Returns (mean [num_classes, D] in features' dtype, counts
  // [num_classes] int64). A class with no rows has mean 0. Deterministic on every backend.
  m.def("class_mean_forward(Tensor features, Tensor labels, int num_classes) -> (Tensor, Tensor)");

  // a[n, s] = sum_c |features[n, c, s]|^p over features [N, C, H, W] (s = h * W + w), then
  // out[n] = a[n] / max(||a[n]||_2, eps) (F.normalize). Returns (out [N, H*W] in features'
  // dtype, a [N, H*W] in the compute dtype (float32; float64 for float64)).
  m.def("attention_map_forward(Tensor features, float p, float eps) -> (Tensor, Tensor)");
  // Gradient of sum(grad_out * out) w.r.t. features, given the forward's a.
  m.def("attention_map_backward(Tensor grad_out, Tensor features, Tensor a, float p, "
        "float eps) -> Tensor");

  // DC's layer-wise gradient-matching distance between two lists of tensors of pairwise
  // equal shapes (metric 'ours' | 'mse' | 'cos'). Returns (distance [] in the inputs' dtype,
  // row_stats [R, 3] in the compute dtype: per packed row (dot, |a|^2, |b|^2) for ours and
  // cos, (sum (a-b)^2, 0, 0) for mse).
  m.def("gradient_match_forward(Tensor[] grads_a, Tensor[] grads_b, str metric) "
        "-> (Tensor, Tensor)");
  // Gradients of grad * distance w.r.t. both lists (empty lists where not asked).
  m.def("gradient_match_backward(Tensor grad, Tensor[] grads_a, Tensor[] grads_b, "
        "Tensor row_stats, str metric, bool need_a, bool need_b) -> (Tensor[], Tensor[])");

  // Fused DSA transform (pydistill_ext/augment/dsa.py, math in pydistill/dsa_taps.h) of x
  // [N, C, H, W]: colour, crop, cutout, flip, scale, rotate in that order, each present or not,
  // one pass per output pixel. params [N, 14] float64 per-sample values, flags the ops present
  // (1 crop, 2 cutout, 4 flip, 8 scale, 16 rotate, 32 contrast). Returns y in x's dtype.
  m.def("dsa_apply_forward(Tensor x, Tensor params, int flags, bool align_corners) -> Tensor");
  // Gradient w.r.t. x of sum(grad_out * y) (the op is affine in x: x itself is not needed).
  m.def("dsa_apply_backward(Tensor grad_out, Tensor params, int flags, bool align_corners) "
        "-> Tensor");
}
