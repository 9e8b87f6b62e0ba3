// Schemas of the trajectory-matching ops (REFERENCE.md section 5; issue 6, "The unrolled inner
// loop"). A TORCH_LIBRARY_FRAGMENT beside registration.cpp; kernels in
// csrc/cpu/traj_kernels.cpp and csrc/cuda/traj_kernels.cu, fake kernels and autograd in
// pydistill_ext/ops/trajectory_ops.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pydistill_ext, m) {
  // MTT's loss over flat parameter vectors theta, target (theta*), start (theta_0), [P] or
  // [K, P]: returns (loss, den) with num = ||theta - target||^2, den = ||start - target||^2,
  // loss = num / den, 0-dim or [K], in the inputs' dtype (float32 accumulates in float32 within
  // fixed blocks and folds the block partials in float64). One read of each input.
  // Deterministic: the summation order depends on the shape only.
  m.def("param_distance_forward(Tensor theta, Tensor target, Tensor start) -> (Tensor, Tensor)");
  // The gradients as one elementwise pass: with d = theta - target, e = start - target and
  // per-problem coefficients a, b (0-dim or [K]):
  //   grad_theta = a d,  grad_start = b e,  grad_target = -a d - b e.
  // Outputs not asked for (need_* false) are returned as empty [0] tensors and not computed.
  m.def("param_distance_backward(Tensor coef_theta, Tensor coef_start, Tensor theta, "
        "Tensor target, Tensor start, bool need_theta, bool need_target, bool need_start) "
        "-> (Tensor, Tensor, Tensor)");
  // One SGD step that also keeps the running gradient sum, in one pass over the vectors:
  // (theta - lr * grad, grad_sum + grad). lr is a 0-dim tensor (learnable). New outputs; the
  // inputs are not modified.
  m.def("sgd_step_accumulate(Tensor theta, Tensor grad, Tensor lr, Tensor grad_sum) "
        "-> (Tensor, Tensor)");
}
