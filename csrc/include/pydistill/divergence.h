// Divergence families shared by every backend (CPU, CUDA).
//
// Every public divergence is one of four families evaluated on an ordered pair of
// distributions (P, Q), each given by its logits:
//   KL   : KL(P || Q)                                   forward_kl (P=teacher, Q=student),
//                                                       reverse_kl (P=student, Q=teacher)
//   SKEW : KL(P || w P + (1-w) Q)                       skew_forward_kl (P=teacher), skew_reverse_kl (P=student)
//   JSD  : w KL(P || M) + (1-w) KL(Q || M), M = wP+(1-w)Q   jsd (P=teacher, Q=student, w=beta)
//   TVD  : 1/2 sum |P - Q|                              tvd (P=teacher, Q=student)
// The kernels compute the family on (P, Q) and hand back gradients for both logit rows;
// the caller maps P/Q onto student/teacher. The jsd endpoints follow TRL: beta=0 is
// forward_kl and beta=1 is reverse_kl (full, unscaled).
#pragma once

#include <string>
#include <c10/util/Exception.h>

namespace pydistill {

enum class Family : int { KL = 0, SKEW = 1, JSD = 2, TVD = 3 };

struct DivergencePlan {
  Family family;
  bool teacher_is_p;  // P = teacher (else P = student)
  double w;           // mixing weight of P (SKEW, JSD)
};

inline DivergencePlan plan_divergence(const std::string& name, double beta) {
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0,
              "pydistill_ext: beta must lie in [0, 1], got ", beta);
  if (name == "forward_kl") return {Family::KL, true, 0.0};
  if (name == "reverse_kl") return {Family::KL, false, 0.0};
  if (name == "jsd") {
    if (beta == 0.0) return {Family::KL, true, 0.0};
    if (beta == 1.0) return {Family::KL, false, 0.0};
    return {Family::JSD, true, beta};
  }
  if (name == "skew_forward_kl") {
    if (beta == 0.0) return {Family::KL, true, 0.0};
    return {Family::SKEW, true, beta};
  }
  if (name == "skew_reverse_kl") {
    if (beta == 0.0) return {Family::KL, false, 0.0};
    return {Family::SKEW, false, beta};
  }
  if (name == "tvd") return {Family::TVD, true, 0.0};
  TORCH_CHECK(false, "pydistill_ext: unknown divergence '", name,
              "'; expected one of forward_kl, reverse_kl, jsd, skew_forward_kl, "
              "skew_reverse_kl, tvd");
}

}  // namespace pydistill
