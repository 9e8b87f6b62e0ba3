// Chan, Golub & LeVeque's pairwise update of running moments, shared by the CPU and CUDA
// bn_moments kernels (host and device).
//
// State (n_a, mean_a, M2_a) with M2 = sum (x - mean)^2; merging a block (n_b, mean_b, M2_b):
//   n = n_a + n_b,  d = mean_b - mean_a,  r = n_b / n,
//   mean = mean_a + d * r,
//   M2   = M2_a + M2_b + d^2 * n_a * n_b / n   (= M2_a + M2_b + d * d * n_a * r).
// Both updates use only differences of means, so large means with a small spread do not cancel
// the way E[x^2] - E[x]^2 does. An empty side leaves the other unchanged (the n_a = 0 branch
// copies, so an all-zero state needs no special start value).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace pydistill {

// State: any struct with fields n (int64_t), mean and m2 (T).
template <typename State, typename T>
C10_HOST_DEVICE inline void chan_merge(State& a, int64_t nb, T mb, T m2b) {
  if (nb == 0) return;
  if (a.n == 0) {
    a.n = nb;
    a.mean = mb;
    a.m2 = m2b;
    return;
  }
  const int64_t n = a.n + nb;
  const T d = mb - a.mean;
  const T r = static_cast<T>(nb) / static_cast<T>(n);
  a.mean += d * r;
  a.m2 += m2b + d * d * static_cast<T>(a.n) * r;
  a.n = n;
}

}  // namespace pydistill
