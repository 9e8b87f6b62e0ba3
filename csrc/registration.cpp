// Every schema of the library, in one place. Backends add kernels with
// TORCH_LIBRARY_IMPL(pydistill_ext, <CPU|CUDA>, m) in csrc/cpu and csrc/cuda; the fake
// (meta) kernels and autograd formulas live in pydistill_ext/ops/<op>.py.
#include <torch/library.h>

#include <string>

namespace pydistill {

// The at::vec instruction set this library's CPU kernels were compiled for.
std::string cpu_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

TORCH_LIBRARY(pydistill_ext, m) {
  // Per-row KD divergence between softmax(student/T) and softmax(teacher/T).
  // Returns (row_loss [...], grad_student, grad_teacher, stats [..., 8]):
  //   row_loss in the compute dtype (float32; float64 for float64 input), 0 where valid is
  //   false; grad_* = d row_loss / d logits (logits' shape) when asked, else empty [0];
  //   stats = per-row (mx, my, logZp, logZq, L, s0, s1, s2) of the (P, Q) pair the divergence
  //   maps to (divergence.h): row maxima of the P / Q logits, log of the normalisers of
  //   exp((logit - max) / T), the row loss and the family's cross-column sums (kd_row_cpu.h),
  //   unused entries 0. Given to the backward, it lets it skip the max / normaliser passes.
  m.def(
      "kd_loss_forward(Tensor student, Tensor teacher, Tensor? valid, str divergence, "
      "float beta, float temperature, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of sum_r grad_rows[r] * row_loss[r] w.r.t. the logits. With stats (from the
  // forward on the same inputs) one pass per row; without, the rows are recomputed.
  m.def(
      "kd_loss_backward(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? valid, "
      "Tensor? stats, str divergence, float beta, float temperature, bool grad_student, "
      "bool grad_teacher) -> (Tensor, Tensor)");
  // Same with the teacher given as its top-k (indices [..., K], logits [..., K]); the teacher
  // distribution is the softmax over the K logits (zero elsewhere). grad_teacher is [..., K].
  m.def(
      "kd_loss_topk_forward(Tensor student, Tensor teacher_indices, Tensor teacher_logits, "
      "Tensor? valid, str divergence, float beta, float temperature, bool grad_student, "
      "bool grad_teacher) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "kd_loss_topk_backward(Tensor grad_rows, Tensor student, Tensor teacher_indices, "
      "Tensor teacher_logits, Tensor? valid, Tensor? stats, str divergence, float beta, "
      "float temperature, bool grad_student, bool grad_teacher) -> (Tensor, Tensor)");
  m.def("cpu_capability() -> str", &cpu_capability);
}

}  // namespace pydistill
