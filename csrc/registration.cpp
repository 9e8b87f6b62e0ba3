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
  // Returns (row_loss [...], grad_student, grad_teacher): row_loss in the compute dtype
  // (float32, float64 for float64 input), zero for rows with valid == false; the gradients
  // are d row_loss / d logits (shape of the logits) when grad_* is set, else empty [0].
  m.def(
      "kd_loss_forward(Tensor student, Tensor teacher, Tensor? valid, str divergence, "
      "float beta, float temperature, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor, Tensor)");
  // Gradients of sum_r grad_rows[r] * row_loss[r] w.r.t. the logits (recomputed from the
  // logits: nothing but the inputs is kept between forward and backward).
  m.def(
      "kd_loss_backward(Tensor grad_rows, Tensor student, Tensor teacher, Tensor? valid, "
      "str divergence, float beta, float temperature, bool grad_student, bool grad_teacher) "
      "-> (Tensor, Tensor)");
  // Same with the teacher given as its top-k (indices [..., K], logits [..., K]); the teacher
  // distribution is the softmax over the K logits (zero elsewhere). grad_teacher is [..., K].
  m.def(
      "kd_loss_topk_forward(Tensor student, Tensor teacher_indices, Tensor teacher_logits, "
      "Tensor? valid, str divergence, float beta, float temperature, bool grad_student, "
      "bool grad_teacher) -> (Tensor, Tensor, Tensor)");
  m.def(
      "kd_loss_topk_backward(Tensor grad_rows, Tensor student, Tensor teacher_indices, "
      "Tensor teacher_logits, Tensor? valid, str divergence, float beta, float temperature, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor)");
  m.def("cpu_capability() -> str", &cpu_capability);
}

}  // namespace pydistill
