// CPU kernels of dsa_apply_forward / dsa_apply_backward: TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m).
//
// Math (derived in full in csrc/include/pydistill/dsa_taps.h). Per sample n with colour
// coefficients alpha = k s, beta = k (1 - s), gamma = b + (1 - k) mu (mu = mean of x[n] over
// C, H, W; b, s, k brightness / saturation / contrast, identities when absent), and for each
// output pixel p the taps (s_k, w_k) of the geometric chain crop -> cutout -> flip -> scale ->
// rotate (<= 16: two nested bilinear reads, integer index maps and the cutout mask):
//   S_c(p) = sum_k w_k x_c(s_k),  W(p) = sum_k w_k
//   y_c(p) = alpha S_c(p) + beta (1/C) sum_c' S_c'(p) + gamma W(p)
// Backward, with h_c(p) = alpha g_c(p) + beta (1/C) sum_c' g_c'(p):
//   dx_c(q) = sum_{p, k: s_k(p) = q} w_k(p) h_c(p) + (1 - k)/(C H W) sum_p W(p) sum_c g_c(p)
//
// Passes.
//   forward: (1) mu per sample (double accumulation; only when contrast is present), parallel
//            over samples; (2) one pass over the output rows of all samples (parallel over
//            (n, i)): taps of each pixel, then the C channel sums S_c from those taps.
//   backward: parallel over samples, each worker owns the whole gradient plane of its sample
//            and scatters w_k h_c into it (a compute-dtype buffer, then cast), so no atomics
//            and the result is bitwise independent of the thread count.
// Compute dtype: float for float32 / float16 / bfloat16 (rounded once at the end), double for
// float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "pydistill/dsa_taps.h"
#include "pydistill/feature_checks.h"

namespace pydistill {
namespace {

using at::Tensor;
using dsa::kMaxTaps;
using dsa::kNumParams;

template <typename scalar_t>
void dsa_forward_impl(const scalar_t* x, const double* params, scalar_t* y, int64_t N, int64_t C,
                      int64_t H, int64_t W, int64_t flags, bool align) {
  using T = at::opmath_type<scalar_t>;
  const int64_t HW = H * W, CHW = C * HW;
  std::vector<T> mu(static_cast<size_t>(N), T(0));
  if (flags & dsa::kContrast) {
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t* xn = x + n * CHW;
        double acc = 0.0;
        for (int64_t e = 0; e < CHW; ++e) acc += static_cast<double>(xn[e]);
        mu[n] = static_cast<T>(acc / static_cast<double>(CHW));
      }
    });
  }
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(W * C, 1));
  at::parallel_for(0, N * H, grain, [&](int64_t r0, int64_t r1) {
    std::vector<T> S(static_cast<size_t>(C));
    int64_t src[kMaxTaps];
    T wt[kMaxTaps];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / H, i = r % H;
      const auto s = dsa::load_sample<T>(params + n * kNumParams);
      const T gamma = s.bright + s.one_minus_k * mu[n];
      const scalar_t* xn = x + n * CHW;
      scalar_t* yn = y + n * CHW + i * W;
      for (int64_t j = 0; j < W; ++j) {
        const int nt = dsa::collect_taps<T>(s, flags, align, H, W, i, j, src, wt);
        T wsum = T(0);
        for (int k = 0; k < nt; ++k) wsum += wt[k];
        T csum = T(0);
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* xc = xn + c * HW;
          T acc = T(0);
          for (int k = 0; k < nt; ++k) acc += wt[k] * static_cast<T>(xc[src[k]]);
          S[c] = acc;
          csum += acc;
        }
        const T sat = s.beta != T(0) ? s.beta * (csum / static_cast<T>(C)) : T(0);
        const T off = gamma * wsum;
        for (int64_t c = 0; c < C; ++c)
          yn[c * HW + j] = static_cast<scalar_t>(s.alpha * S[c] + sat + off);
      }
    }
  });
}

template <typename scalar_t>
void dsa_backward_impl(const scalar_t* go, const double* params, scalar_t* gx, int64_t N,
                       int64_t C, int64_t H, int64_t W, int64_t flags, bool align) {
  using T = at::opmath_type<scalar_t>;
  const int64_t HW = H * W, CHW = C * HW;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> buf(static_cast<size_t>(CHW));
    std::vector<T> g(static_cast<size_t>(C));
    int64_t src[kMaxTaps];
    T wt[kMaxTaps];
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(buf.begin(), buf.end(), T(0));
      const auto s = dsa::load_sample<T>(params + n * kNumParams);
      const scalar_t* gn = go + n * CHW;
      double G = 0.0;  // sum_p W(p) sum_c g_c(p), for the contrast mean term
      for (int64_t i = 0; i < H; ++i) {
        for (int64_t j = 0; j < W; ++j) {
          const int64_t p = i * W + j;
          const int nt = dsa::collect_taps<T>(s, flags, align, H, W, i, j, src, wt);
          T gsum = T(0);
          for (int64_t c = 0; c < C; ++c) {
            g[c] = static_cast<T>(gn[c * HW + p]);
            gsum += g[c];
          }
          if (flags & dsa::kContrast) {
            T wsum = T(0);
            for (int k = 0; k < nt; ++k) wsum += wt[k];
            G += static_cast<double>(wsum) * static_cast<double>(gsum);
          }
          if (nt == 0) continue;
          const T sat = s.beta != T(0) ? s.beta * (gsum / static_cast<T>(C)) : T(0);
          for (int64_t c = 0; c < C; ++c) {
            const T h = s.alpha * g[c] + sat;
            T* bc = buf.data() + c * HW;
            for (int k = 0; k < nt; ++k) bc[src[k]] += wt[k] * h;
          }
        }
      }
      const T corr = (flags & dsa::kContrast)
                         ? static_cast<T>(static_cast<double>(s.one_minus_k) * G /
                                          static_cast<double>(CHW))
                         : T(0);
      scalar_t* gxn = gx + n * CHW;
      for (int64_t e = 0; e < CHW; ++e) gxn[e] = static_cast<scalar_t>(buf[e] + corr);
    }
  });
}

Tensor dsa_apply_forward_cpu(const Tensor& x_in, const Tensor& params_in, int64_t flags,
                             bool align_corners) {
  check_dsa_apply_args(x_in, "x", params_in, flags);
  const Tensor x = x_in.contiguous();
  const Tensor params = params_in.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsa_apply_cpu", [&] {
    dsa_forward_impl<scalar_t>(x.const_data_ptr<scalar_t>(), params.const_data_ptr<double>(),
                               y.mutable_data_ptr<scalar_t>(), N, C, H, W, flags, align_corners);
  });
  return y;
}

Tensor dsa_apply_backward_cpu(const Tensor& grad_out, const Tensor& params_in, int64_t flags,
                              bool align_corners) {
  check_dsa_apply_args(grad_out, "grad_out", params_in, flags);
  const Tensor go = grad_out.contiguous();
  const Tensor params = params_in.contiguous();
  Tensor gx = at::empty_like(go, at::MemoryFormat::Contiguous);
  if (go.numel() == 0) return gx;
  const int64_t N = go.size(0), C = go.size(1), H = go.size(2), W = go.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "dsa_apply_bwd_cpu", [&] {
    dsa_backward_impl<scalar_t>(go.const_data_ptr<scalar_t>(), params.const_data_ptr<double>(),
                                gx.mutable_data_ptr<scalar_t>(), N, C, H, W, flags, align_corners);
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m) {
  m.impl("dsa_apply_forward", &dsa_apply_forward_cpu);
  m.impl("dsa_apply_backward", &dsa_apply_backward_cpu);
}

}  // namespace pydistill
