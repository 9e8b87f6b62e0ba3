// CPU kernels of attention_map_forward / attention_map_backward:
// TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m).
//
// Math (REFERENCE.md 3, attention transfer / DataDAM), per sample n, spatial s, channel c:
//   a_s   = sum_c |x_cs|^p
//   r     = ||a||_2,   q = max(r, eps)          (F.normalize: a / clamp_min(||a||, eps))
//   out_s = a_s / q
// Backward, g = dL/d out:
//   r >= eps:  dL/da = (g - out * <out, g>) / r        (d(a/||a||)/da = (I - â âᵀ) / ||a||)
//   r <  eps:  dL/da = g / eps                         (the clamp is constant there)
//   dL/dx_cs = dL/da_s * p |x_cs|^(p-1) sign(x_cs) = dL/da_s * p |x_cs|^(p-2) x_cs,
// with the subgradient 0 at x_cs = 0 for every p (p = 1: sign(0) = 0; p < 1: the derivative is
// unbounded there, defined as 0 so no NaN; p > 1: it is 0 anyway).
// p = 1, 2, 4 have exact power-free paths (DataDAM code, AT, DataDAM paper); other p use pow.
//
// Layout: features [N, C, H, W] contiguous, one sample per task (at::parallel_for over N), the
// spatial row a [H*W] in the compute dtype (float; double for float64) returned by the forward
// and kept for the backward (1/C of the features' size in float32), inner loops over s
// vectorised with at::vec for float32/float64. The forward reads x once; the backward reads
// x once and writes the gradient (r and <out, g> come from the kept a).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "pydistill/feature_checks.h"

namespace pydistill {
namespace {

using at::Tensor;

enum class PowMode { One, Two, Four, General };

inline PowMode pow_mode(double p) {
  if (p == 1.0) return PowMode::One;
  if (p == 2.0) return PowMode::Two;
  if (p == 4.0) return PowMode::Four;
  return PowMode::General;
}

// |x|^p and p |x|^(p-2) x (0 at x = 0), scalar and vector forms.
template <typename T, PowMode M>
struct Pow {
  using Vec = at::vec::Vectorized<T>;
  T p;
  inline T f(T x) const {
    const T v = std::abs(x);
    if constexpr (M == PowMode::One) return v;
    else if constexpr (M == PowMode::Two) return v * v;
    else if constexpr (M == PowMode::Four) return (v * v) * (v * v);
    else return v == T(0) ? T(0) : std::pow(v, p);
  }
  inline T df(T x) const {
    if constexpr (M == PowMode::One) return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
    else if constexpr (M == PowMode::Two) return T(2) * x;
    else if constexpr (M == PowMode::Four) return T(4) * x * x * x;
    else return x == T(0) ? T(0) : p * std::pow(std::abs(x), p - T(2)) * x;
  }
  inline Vec f(Vec x) const {
    const Vec v = x.abs();
    if constexpr (M == PowMode::One) return v;
    else if constexpr (M == PowMode::Two) return v * v;
    else if constexpr (M == PowMode::Four) return (v * v) * (v * v);
    else return Vec::blendv(v.pow(Vec(p)), Vec(T(0)), x == Vec(T(0)));
  }
  inline Vec df(Vec x) const {
    const Vec zero(T(0));
    if constexpr (M == PowMode::One)
      return Vec::blendv(zero, Vec(T(1)), x > zero) - Vec::blendv(zero, Vec(T(1)), x < zero);
    else if constexpr (M == PowMode::Two) return Vec(T(2)) * x;
    else if constexpr (M == PowMode::Four) return Vec(T(4)) * x * x * x;
    else return Vec::blendv(Vec(p) * x.abs().pow(Vec(p - T(2))) * x, zero, x == zero);
  }
};

// a[s] = sum_c |x[c, s]|^p for one sample (x: [C, S]).
template <typename scalar_t, typename P>
void channel_pow_sum(const scalar_t* x, int64_t C, int64_t S, const P& pw,
                     at::opmath_type<scalar_t>* a) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  std::fill(a, a + S, opmath_t(0));
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xr = x + c * S;
    int64_t s = 0;
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      for (; s + Vec::size() <= S; s += Vec::size())
        (Vec::loadu(a + s) + pw.f(Vec::loadu(xr + s))).store(a + s);
    }
    for (; s < S; ++s) a[s] += pw.f(static_cast<opmath_t>(xr[s]));
  }
}

template <typename scalar_t, PowMode M>
void forward_impl(const scalar_t* x, scalar_t* out, at::opmath_type<scalar_t>* a_out, int64_t N,
                  int64_t C, int64_t S, double p, double eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Pow<opmath_t, M> pw{static_cast<opmath_t>(p)};
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      opmath_t* a = a_out + n * S;
      channel_pow_sum<scalar_t>(x + n * C * S, C, S, pw, a);
      opmath_t ss = 0;
      for (int64_t s = 0; s < S; ++s) ss += a[s] * a[s];
      const opmath_t r = std::sqrt(ss);
      const opmath_t inv = opmath_t(1) / std::max(r, static_cast<opmath_t>(eps));
      for (int64_t s = 0; s < S; ++s) out[n * S + s] = static_cast<scalar_t>(a[s] * inv);
    }
  });
}

template <typename scalar_t, PowMode M>
void backward_impl(const scalar_t* go, const scalar_t* x, const at::opmath_type<scalar_t>* a_in,
                   scalar_t* gx, int64_t N, int64_t C, int64_t S, double p, double eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const Pow<opmath_t, M> pw{static_cast<opmath_t>(p)};
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<opmath_t> a(static_cast<size_t>(S));
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* xn = x + n * C * S;
      const scalar_t* gn = go + n * S;
      std::copy(a_in + n * S, a_in + (n + 1) * S, a.begin());
      opmath_t ss = 0;
      for (int64_t s = 0; s < S; ++s) ss += a[s] * a[s];
      const opmath_t r = std::sqrt(ss);  // the forward's norm, bitwise (same sum order)
      // a <- dL/da (in place)
      if (r >= static_cast<opmath_t>(eps)) {
        const opmath_t inv = opmath_t(1) / r;
        opmath_t dot = 0;  // <out, g> with out = a / r
        for (int64_t s = 0; s < S; ++s) dot += a[s] * inv * static_cast<opmath_t>(gn[s]);
        for (int64_t s = 0; s < S; ++s)
          a[s] = (static_cast<opmath_t>(gn[s]) - a[s] * inv * dot) * inv;
      } else {
        const opmath_t inv = opmath_t(1) / static_cast<opmath_t>(eps);
        for (int64_t s = 0; s < S; ++s) a[s] = static_cast<opmath_t>(gn[s]) * inv;
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* xr = xn + c * S;
        scalar_t* gr = gx + (n * C + c) * S;
        int64_t s = 0;
        if constexpr (std::is_same_v<scalar_t, opmath_t>) {
          for (; s + Vec::size() <= S; s += Vec::size())
            (Vec::loadu(a.data() + s) * pw.df(Vec::loadu(xr + s))).store(gr + s);
        }
        for (; s < S; ++s)
          gr[s] = static_cast<scalar_t>(a[s] * pw.df(static_cast<opmath_t>(xr[s])));
      }
    }
  });
}

template <typename F>
void with_pow_mode(double p, F&& f) {
  switch (pow_mode(p)) {
    case PowMode::One: f(std::integral_constant<PowMode, PowMode::One>{}); break;
    case PowMode::Two: f(std::integral_constant<PowMode, PowMode::Two>{}); break;
    case PowMode::Four: f(std::integral_constant<PowMode, PowMode::Four>{}); break;
    default: f(std::integral_constant<PowMode, PowMode::General>{}); break;
  }
}

std::tuple<Tensor, Tensor> attention_map_forward_cpu(const Tensor& features, double p, double eps) {
  check_attention_map_args(features, p, eps);
  const Tensor x = features.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2) * x.size(3);
  Tensor out = at::empty({N, S}, x.options());
  Tensor a = at::empty({N, S}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (N == 0) return {out, a};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_map_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    with_pow_mode(p, [&](auto mode) {
      forward_impl<scalar_t, decltype(mode)::value>(x.const_data_ptr<scalar_t>(),
                                                    out.mutable_data_ptr<scalar_t>(),
                                                    a.mutable_data_ptr<opmath_t>(), N, C, S, p, eps);
    });
  });
  return {out, a};
}

Tensor attention_map_backward_cpu(const Tensor& grad_out, const Tensor& features, const Tensor& a,
                                  double p, double eps) {
  check_attention_map_backward_args(grad_out, features, a, p, eps);
  const int64_t N = features.size(0), C = features.size(1);
  const int64_t S = features.size(2) * features.size(3);
  const Tensor x = features.contiguous();
  const Tensor g = grad_out.to(x.scalar_type()).contiguous();
  const Tensor r = a.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_map_bwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    with_pow_mode(p, [&](auto mode) {
      backward_impl<scalar_t, decltype(mode)::value>(g.const_data_ptr<scalar_t>(),
                                                     x.const_data_ptr<scalar_t>(),
                                                     r.const_data_ptr<opmath_t>(),
                                                     gx.mutable_data_ptr<scalar_t>(), N, C, S, p, eps);
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m) {
  m.impl("attention_map_forward", &attention_map_forward_cpu);
  m.impl("attention_map_backward", &attention_map_backward_cpu);
}

}  // namespace pydistill
