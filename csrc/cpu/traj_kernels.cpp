// CPU kernels of the trajectory-matching ops: TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m).
//
// param_distance (MTT Eq. 2, REFERENCE.md 5.2). For one problem (a row of [K, P]):
//   d = theta - target,  e = start - target,
//   num = sum_j d_j^2,   den = sum_j e_j^2,   L = num / den.
// Gradients (L = num / den; d num / d theta = 2 d; d den / d start = 2 e; target enters both
// with the opposite sign), for an upstream gradient gL and gD (of den, if the raw op's second
// output is used):
//   dL/dtheta  = 2 d / den                   -> grad_theta  = a d,  a = 2 gL / den
//   dL/dstart  = -num / den^2 * 2 e = -2 L e / den
//                                            -> grad_start  = b e,  b = -2 gL L / den + 2 gD
//   grad_target = -(grad_theta + grad_start) = -a d - b e.
// The coefficients are per problem (a few scalars, computed by the caller); the backward kernel
// is the elementwise pass. den = 0 (start == target) is not checked (that would need a device
// sync on CUDA): IEEE division gives L = inf (nan if num = 0 too), as the eager formula does.
//
// Forward reduction: each row is cut into blocks of kBlock elements. A block is summed with
// kAcc independent vector accumulators (float32 for float32 input, float64 for float64), lane
// j of accumulator q taking elements q*VL + j (mod kAcc*VL); the accumulators are added in a
// fixed tree, then the lanes in order, then the scalar tail. The block partials are stored in
// float64 and added in block order per row. The order depends only on (K, P): bitwise
// reproducible, independent of the thread count. Blocks of 4096 bound the float32 rounding
// error to that of 4096/(kAcc*VL) sequential additions per lane, the float64 fold adds nothing.
//
// sgd_step_accumulate: per element j, with one rounding each (fused multiply-add):
//   theta'_j = fma(-lr, grad_j, theta_j) = theta_j - lr grad_j,   G'_j = G_j + grad_j,
// one read of theta, grad, grad_sum and one write of theta', G' (an eager `theta - lr * grad`
// plus `grad_sum + grad` reads grad twice and materialises lr * grad).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "pydistill/traj_checks.h"

namespace pydistill {
namespace {

using at::Tensor;
constexpr int64_t kBlock = 4096;   // elements per reduction block
constexpr int kAcc = 4;            // independent vector accumulators per block
constexpr int64_t kGrain = 16384;  // elements per parallel task of the elementwise kernels

// sum (x - t)^2 and sum (s - t)^2 over n elements (one block), in scalar_t lanes.
template <typename scalar_t>
void block_sums(const scalar_t* x, const scalar_t* t, const scalar_t* s, int64_t n, double* num,
                double* den) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  Vec an[kAcc], ad[kAcc];
  for (int q = 0; q < kAcc; ++q) {
    an[q] = Vec(scalar_t(0));
    ad[q] = Vec(scalar_t(0));
  }
  int64_t j = 0;
  for (; j + kAcc * VL <= n; j += kAcc * VL) {
    for (int q = 0; q < kAcc; ++q) {
      const Vec tv = Vec::loadu(t + j + q * VL);
      const Vec d = Vec::loadu(x + j + q * VL) - tv;
      const Vec e = Vec::loadu(s + j + q * VL) - tv;
      an[q] = at::vec::fmadd(d, d, an[q]);
      ad[q] = at::vec::fmadd(e, e, ad[q]);
    }
  }
  for (; j + VL <= n; j += VL) {  // remaining whole vectors into accumulator 0
    const Vec tv = Vec::loadu(t + j);
    const Vec d = Vec::loadu(x + j) - tv;
    const Vec e = Vec::loadu(s + j) - tv;
    an[0] = at::vec::fmadd(d, d, an[0]);
    ad[0] = at::vec::fmadd(e, e, ad[0]);
  }
  // fixed tree over the accumulators: (0 + 1) + (2 + 3)
  const Vec vn = (an[0] + an[1]) + (an[2] + an[3]);
  const Vec vd = (ad[0] + ad[1]) + (ad[2] + ad[3]);
  scalar_t ln[VL], ld[VL];
  vn.store(ln);
  vd.store(ld);
  scalar_t sn = 0, sd = 0;
  for (int64_t l = 0; l < VL; ++l) {
    sn += ln[l];
    sd += ld[l];
  }
  for (; j < n; ++j) {
    const scalar_t d = x[j] - t[j], e = s[j] - t[j];
    sn = std::fma(d, d, sn);
    sd = std::fma(e, e, sd);
  }
  *num = static_cast<double>(sn);
  *den = static_cast<double>(sd);
}

std::tuple<Tensor, Tensor> param_distance_forward_cpu(const Tensor& theta, const Tensor& target,
                                                      const Tensor& start) {
  const ParamDistShape sh = check_param_distance_args(theta, target, start);
  const Tensor x = theta.contiguous(), t = target.contiguous(), s = start.contiguous();
  const auto out_shape = param_distance_out_shape(sh);
  Tensor loss = at::empty(out_shape, theta.options());
  Tensor den = at::empty(out_shape, theta.options());
  const int64_t nb = (sh.P + kBlock - 1) / kBlock;
  std::vector<double> pn(static_cast<size_t>(sh.K * nb)), pd(pn.size());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "param_distance_forward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    at::parallel_for(0, sh.K * nb, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = i / nb, b = i % nb;
        const int64_t off = k * sh.P + b * kBlock;
        const int64_t n = std::min(kBlock, sh.P - b * kBlock);
        block_sums<scalar_t>(xp + off, tp + off, sp + off, n, &pn[i], &pd[i]);
      }
    });
    scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
    scalar_t* dp = den.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < sh.K; ++k) {
      double n = 0.0, d = 0.0;
      for (int64_t b = 0; b < nb; ++b) {
        n += pn[k * nb + b];
        d += pd[k * nb + b];
      }
      lp[k] = static_cast<scalar_t>(n / d);
      dp[k] = static_cast<scalar_t>(d);
    }
  });
  return {loss, den};
}

std::tuple<Tensor, Tensor, Tensor> param_distance_backward_cpu(
    const Tensor& coef_theta, const Tensor& coef_start, const Tensor& theta, const Tensor& target,
    const Tensor& start, bool need_theta, bool need_target, bool need_start) {
  const ParamDistShape sh =
      check_param_distance_backward_args(coef_theta, coef_start, theta, target, start);
  const Tensor x = theta.contiguous(), t = target.contiguous(), s = start.contiguous();
  const Tensor a = coef_theta.contiguous(), bc = coef_start.contiguous();
  auto out = [&](bool need) {
    return need ? at::empty(theta.sizes(), theta.options()) : at::empty({0}, theta.options());
  };
  Tensor gx = out(need_theta), gt = out(need_target), gs = out(need_start);
  if (!(need_theta || need_target || need_start)) return {gx, gt, gs};
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "param_distance_backward_cpu", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t VL = Vec::size();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    scalar_t* gxp = need_theta ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = need_target ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gsp = need_start ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    const bool need_d = need_theta || need_target, need_e = need_start || need_target;
    at::parallel_for(0, sh.K * sh.P, kGrain, [&](int64_t i0, int64_t i1) {
      int64_t i = i0;
      while (i < i1) {  // runs that stay within one row k
        const int64_t k = i / sh.P;
        const int64_t end = std::min(i1, (k + 1) * sh.P);
        const scalar_t av = ap[k], bv = bp[k];
        const Vec va(av), vb(bv);
        int64_t j = i;
        for (; j + VL <= end; j += VL) {
          const Vec tv = Vec::loadu(tp + j);
          const Vec gd = need_d ? va * (Vec::loadu(xp + j) - tv) : Vec(scalar_t(0));
          const Vec ge = need_e ? vb * (Vec::loadu(sp + j) - tv) : Vec(scalar_t(0));
          if (need_theta) gd.store(gxp + j);
          if (need_start) ge.store(gsp + j);
          if (need_target) (Vec(scalar_t(0)) - gd - ge).store(gtp + j);
        }
        for (; j < end; ++j) {
          const scalar_t gd = need_d ? av * (xp[j] - tp[j]) : scalar_t(0);
          const scalar_t ge = need_e ? bv * (sp[j] - tp[j]) : scalar_t(0);
          if (need_theta) gxp[j] = gd;
          if (need_start) gsp[j] = ge;
          if (need_target) gtp[j] = scalar_t(0) - gd - ge;
        }
        i = end;
      }
    });
  });
  return {gx, gt, gs};
}

std::tuple<Tensor, Tensor> sgd_step_accumulate_cpu(const Tensor& theta, const Tensor& grad,
                                                   const Tensor& lr, const Tensor& grad_sum) {
  check_sgd_step_args(theta, grad, lr, grad_sum);
  const Tensor x = theta.contiguous(), g = grad.contiguous(), G = grad_sum.contiguous();
  Tensor x_out = at::empty(theta.sizes(), theta.options());
  Tensor G_out = at::empty(theta.sizes(), theta.options());
  const int64_t n = theta.numel();
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "sgd_step_accumulate_cpu", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t VL = Vec::size();
    const scalar_t neg_lr = -lr.item<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* Gp = G.const_data_ptr<scalar_t>();
    scalar_t* xo = x_out.mutable_data_ptr<scalar_t>();
    scalar_t* Go = G_out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      const Vec vl(neg_lr);
      int64_t j = i0;
      for (; j + VL <= i1; j += VL) {
        const Vec gv = Vec::loadu(gp + j);
        at::vec::fmadd(vl, gv, Vec::loadu(xp + j)).store(xo + j);
        (Vec::loadu(Gp + j) + gv).store(Go + j);
      }
      for (; j < i1; ++j) {
        xo[j] = std::fma(neg_lr, gp[j], xp[j]);
        Go[j] = Gp[j] + gp[j];
      }
    });
  });
  return {x_out, G_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m) {
  m.impl("param_distance_forward", &param_distance_forward_cpu);
  m.impl("param_distance_backward", &param_distance_backward_cpu);
  m.impl("sgd_step_accumulate", &sgd_step_accumulate_cpu);
}

}  // namespace pydistill
