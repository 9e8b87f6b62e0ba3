// One row of a KD divergence on the CPU, vectorized with at::vec::Vectorized.
//
// Math (REFERENCE.md section 1). For a row with P-logits x and Q-logits y, temperature T:
//   ep_j = exp((x_j - max x) / T),  Zp = sum_j ep_j,  p_j = ep_j / Zp,
//   lp_j = (x_j - max x) / T - log Zp                  (likewise eq, Zq, q, lq)
// so no exp ever sees a positive argument and log-probabilities are formed from shifted
// logits (no cancellation between two large log-sum-exps).
//
//   KL   L = sum_j p_j d_j + log Zq - log Zp,  d_j = ((x_j - mx) - (y_j - my)) / T
//        dL/dy = (q - p) / T
//        dL/dx = p * (lp - lq - L) / T
//   SKEW lm_j = logaddexp(log w + lp_j, log(1-w) + lq_j)       (log of w p + (1-w) q)
//        rho_j = (1-w) q_j / m_j = exp(log(1-w) + lq_j - lm_j),  S = sum_j p_j rho_j
//        L = sum_j p_j (lp_j - lm_j)
//        dL/dy = (q * S - p * rho) / T
//        dL/dx = p * (lp - lm + rho - L - S) / T
//   JSD  lm as SKEW; Kp = sum p (lp - lm), Kq = sum q (lq - lm), L = w Kp + (1-w) Kq
//        dL/dx = w p (lp - lm - Kp) / T,  dL/dy = (1-w) q (lq - lm - Kq) / T
//   TVD  sigma_j = sign(q_j - p_j) (sign 0 = 0), L = 1/2 sum |p - q|
//        Sq = sum q sigma, Sp = sum p sigma
//        dL/dy = 1/2 q (sigma - Sq) / T,  dL/dx = -1/2 p (sigma - Sp) / T
// Each follows from dL/dlogit_i = (G_i - p_i sum_j G_j) / T with G = dL/dlog p (the
// log-softmax Jacobian) and was checked against float64 autograd (tests/ops).
//
// Numerics: the xlogy rule p * (...) = 0 whenever p == 0 is applied with a select, never a
// multiply, so -inf logits (masked vocabulary), exp underflow and log-probabilities below
// -104 give exact zeros instead of 0 * inf = NaN; log M is formed in log space (Liger issue
// 1453). Lanes past the row end are filled with -inf and fall under the same rule.
//
// Passes: (1) row maxima, (2) exponentials and normalisers (KL also accumulates its loss
// here), (3) SKEW/JSD/TVD loss and cross-column sums, (4) gradients. Passes 2-4 read rows
// that the first pass pulled into cache; ep/eq are kept in scratch so that each element
// pays exactly one exp per distribution.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "pydistill/divergence.h"

namespace pydistill {
namespace cpu {

using at::vec::Vectorized;

template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& v) {
  return v.exp();
}
template <>
inline Vectorized<float> vexp<float>(const Vectorized<float>& v) {
  // exp_u20: 20-ulp polynomial exp (flushes results below FLT_MIN to 0), several times
  // cheaper than Sleef's 1-ulp expf; ample for a loss accumulated over the row.
  return v.exp_u20();
}

// Load count (<= size) elements; lanes past count read as -inf.
template <typename T>
inline Vectorized<T> load_row(const T* ptr, int64_t count) {
  using Vec = Vectorized<T>;
  if (count >= Vec::size()) return Vec::loadu(ptr);
  const Vec lanes = Vec::arange(T(0), T(1));
  const Vec in_row = lanes < Vec(static_cast<T>(count));
  return Vec::blendv(Vec(-std::numeric_limits<T>::infinity()),
                     Vec::loadu(ptr, count), in_row);
}

template <typename T>
inline void store_row(const Vectorized<T>& v, T* ptr, int64_t count) {
  if (count >= Vectorized<T>::size())
    v.store(ptr);
  else
    v.store(ptr, count);
}

// select(mask, a, b): a where mask, else b
template <typename T>
inline Vectorized<T> select(const Vectorized<T>& mask, const Vectorized<T>& a,
                            const Vectorized<T>& b) {
  return Vectorized<T>::blendv(b, a, mask);
}

// log(exp(a) + exp(b)), -inf when both are -inf.
template <typename T>
inline Vectorized<T> logaddexp(const Vectorized<T>& a, const Vectorized<T>& b) {
  using Vec = Vectorized<T>;
  const Vec hi = at::vec::maximum(a, b);
  const Vec lo = at::vec::minimum(a, b);
  const Vec ninf(-std::numeric_limits<T>::infinity());
  const Vec r = hi + vexp(lo - hi).log1p();
  return select(hi == ninf, ninf, r);
}

// Two-level vector sum: lanes accumulate blocks of kBlock vectors, blocks are added to an
// outer accumulator. A 128K-column fp32 row then rounds ~(64 + V/(16*64)) times per lane
// instead of V/16 times (error ~2e-5 relative -> ~1e-6 at V = 262144).
template <typename T>
struct BlockSum {
  static constexpr int kBlock = 64;
  Vectorized<T> inner{T(0)}, outer{T(0)};
  int count = 0;
  inline void add(const Vectorized<T>& v) {
    inner = inner + v;
    if (++count == kBlock) {
      outer = outer + inner;
      inner = Vectorized<T>(T(0));
      count = 0;
    }
  }
  inline T total() const {
    const Vectorized<T> all = outer + inner;
    return at::vec::vec_reduce_all<T>(
        [](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, all);
  }
};

// Row constants of the gradient formulas (header): grad_scale/T, L and the family's row sums.
template <typename T>
struct GradTerms {
  Vectorized<T> gs, L, s0, s1, s2, w, one_minus_w, log1mw;
  GradTerms(T grad_scale_over_t, T L_, T s0_, T s1_, T s2_, T w_)
      : gs(grad_scale_over_t), L(L_), s0(s0_), s1(s1_), s2(s2_), w(w_),
        one_minus_w(T(1) - w_), log1mw(std::log1p(-w_)) {}
};

// The gradient formulas for one vector of lanes, shared by the forward (pass 4) and the
// backward from statistics. a, b: exp of the shifted P/Q logits; p, q: probabilities; lp, lq:
// log-probabilities; m: log M (SKEW/JSD; unused otherwise). Stores n (<= size) lanes.
template <typename T>
C10_ALWAYS_INLINE void store_grad_lanes(Family family, const GradTerms<T>& c, const Vectorized<T>& a,
                             const Vectorized<T>& b, const Vectorized<T>& p,
                             const Vectorized<T>& q, const Vectorized<T>& lp,
                             const Vectorized<T>& lq, const Vectorized<T>& m, T* gx, T* gy,
                             int64_t n) {
  using Vec = Vectorized<T>;
  const Vec zero(T(0)), one(T(1));
  switch (family) {
    case Family::KL:
      if (gy) store_row((q - p) * c.gs, gy, n);
      if (gx) store_row(select(a > zero, p * (lp - lq - c.L) * c.gs, zero), gx, n);
      break;
    case Family::TVD: {
      const Vec diff = q - p;
      const Vec sigma = select(diff > zero, one, select(diff < zero, -one, zero));
      if (gy) store_row(Vec(T(0.5)) * q * (sigma - c.s1) * c.gs, gy, n);
      if (gx) store_row(Vec(T(-0.5)) * p * (sigma - c.s2) * c.gs, gx, n);
      break;
    }
    case Family::SKEW: {
      const Vec rho = select(b > zero, vexp(c.log1mw + lq - m), zero);
      if (gy) store_row((q * c.s1 - p * rho) * c.gs, gy, n);
      if (gx) store_row(select(a > zero, p * (lp - m + rho - c.L - c.s1) * c.gs, zero), gx, n);
      break;
    }
    case Family::JSD:
      if (gx) store_row(select(a > zero, c.w * p * (lp - m - c.s0) * c.gs, zero), gx, n);
      if (gy) store_row(select(b > zero, c.one_minus_w * q * (lq - m - c.s1) * c.gs, zero), gy, n);
      break;
  }
}

// Per-row statistics handed from the forward to the backward (see registration.cpp):
// (mx, my, logZp, logZq, L, s0, s1, s2).
constexpr int kStats = 8;

template <typename T>
inline void fill_row(T* g, int64_t V, T value) {
  if (g) std::fill(g, g + V, value);
}

// Computes one row. x, y: P and Q logits (length V, compute dtype). gx, gy: gradient rows
// (nullptr when not wanted), written as grad_scale * d loss / d logits (the 1/T of the
// chain rule is included: pass grad_scale = 1 for the plain gradient). ep, eq, lm: scratch
// rows of length V + padding, zero past V. st: kStats entries (nullptr: not wanted).
template <typename T>
T divergence_row(const T* x, const T* y, int64_t V, const DivergencePlan& plan, T inv_temp,
                 T grad_scale, T* gx, T* gy, T* ep, T* eq, T* lm, T* st = nullptr) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T ninf = -std::numeric_limits<T>::infinity();

  // pass 1: maxima
  Vec vmx(ninf), vmy(ninf);
  for (int64_t j = 0; j < V; j += W) {
    vmx = at::vec::maximum(vmx, load_row(x + j, V - j));
    vmy = at::vec::maximum(vmy, load_row(y + j, V - j));
  }
  const T mx = at::vec::vec_reduce_all<T>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmx);
  const T my = at::vec::vec_reduce_all<T>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmy);
  if (st) {
    std::fill(st, st + kStats, T(0));
    st[0] = mx;
    st[1] = my;
  }
  if (std::isnan(mx) || std::isnan(my)) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    for (int64_t j = 0; j < V; ++j) {
      if (gx) gx[j] = nan;
      if (gy) gy[j] = nan;
    }
    return nan;
  }
  if (mx == ninf || my == ninf) {
    for (int64_t j = 0; j < V; ++j) {
      if (gx) gx[j] = T(0);
      if (gy) gy[j] = T(0);
    }
    return T(0);
  }

  const Vec vmxs(mx), vmys(my), vit(inv_temp), zero(T(0));
  const bool is_kl = plan.family == Family::KL;

  // pass 2: exponentials, normalisers; KL also accumulates sum ep * d
  BlockSum<T> zp, zq, sd;
  for (int64_t j = 0; j < V; j += W) {
    const Vec xs = (load_row(x + j, V - j) - vmxs) * vit;
    const Vec ys = (load_row(y + j, V - j) - vmys) * vit;
    const Vec a = vexp(xs), b = vexp(ys);
    zp.add(a);
    zq.add(b);
    if (is_kl) sd.add(select(a > zero, a * (xs - ys), zero));
    store_row(a, ep + j, V - j);
    store_row(b, eq + j, V - j);
  }
  const T Zp = zp.total(), Zq = zq.total();
  const T logZp = std::log(Zp), logZq = std::log(Zq);
  const T invZp = T(1) / Zp, invZq = T(1) / Zq;
  const Vec vinvZp(invZp), vinvZq(invZq), vlogZp(logZp), vlogZq(logZq);
  if (st) {
    st[2] = logZp;
    st[3] = logZq;
  }

  if (is_kl) {
    const T L = sd.total() * invZp + logZq - logZp;
    if (st) st[4] = L;
    if (gx || gy) {
      const GradTerms<T> c(grad_scale * inv_temp, L, T(0), T(0), T(0), T(0));
      for (int64_t j = 0; j < V; j += W) {
        const int64_t n = V - j;
        const Vec a = Vec::loadu(ep + j), b = Vec::loadu(eq + j);
        const Vec lp = (load_row(x + j, n) - vmxs) * vit - vlogZp;
        const Vec lq = (load_row(y + j, n) - vmys) * vit - vlogZq;
        store_grad_lanes(Family::KL, c, a, b, a * vinvZp, b * vinvZq, lp, lq, zero,
                         gx ? gx + j : nullptr, gy ? gy + j : nullptr, n);
      }
    }
    return L;
  }

  const T w = static_cast<T>(plan.w);
  if (plan.family == Family::SKEW && w == T(1)) {
    // KL(P || 1*P + 0*Q) = 0 identically, and so is its gradient (log(1-w) = -inf would
    // otherwise meet lm = -inf at entries where p = 0 and give NaN)
    for (int64_t j = 0; j < V; ++j) {
      if (gx) gx[j] = T(0);
      if (gy) gy[j] = T(0);
    }
    return T(0);
  }
  const Vec vlogw(std::log(w)), vlog1mw(std::log1p(-w));
  const bool want_grad = gx || gy;

  // pass 3: loss and cross-column sums
  BlockSum<T> acc0, acc1, acc2;
  for (int64_t j = 0; j < V; j += W) {
    const int64_t n = V - j;
    const Vec a = Vec::loadu(ep + j), b = Vec::loadu(eq + j);
    const Vec p = a * vinvZp, q = b * vinvZq;
    if (plan.family == Family::TVD) {
      const Vec diff = q - p;
      const Vec one(T(1));
      const Vec sigma = select(diff > zero, one, select(diff < zero, -one, zero));
      acc0.add(diff.abs());
      acc1.add(q * sigma);
      acc2.add(p * sigma);
      continue;
    }
    const Vec lp = (load_row(x + j, n) - vmxs) * vit - vlogZp;
    const Vec lq = (load_row(y + j, n) - vmys) * vit - vlogZq;
    const Vec m = logaddexp(vlogw + lp, vlog1mw + lq);
    if (want_grad) store_row(m, lm + j, n);
    acc0.add(select(a > zero, p * (lp - m), zero));
    if (plan.family == Family::SKEW) {
      const Vec rho = select(b > zero, vexp(vlog1mw + lq - m), zero);
      acc1.add(p * rho);
    } else {  // JSD
      acc1.add(select(b > zero, q * (lq - m), zero));
    }
  }
  const T s0 = acc0.total(), s1 = acc1.total(), s2 = acc2.total();
  T L;
  if (plan.family == Family::TVD)
    L = T(0.5) * s0;
  else if (plan.family == Family::SKEW)
    L = s0;
  else
    L = w * s0 + (T(1) - w) * s1;
  if (st) {
    st[4] = L;
    st[5] = s0;
    st[6] = s1;
    st[7] = s2;
  }
  if (!want_grad) return L;

  // pass 4: gradients
  const GradTerms<T> c(grad_scale * inv_temp, L, s0, s1, s2, w);
  const bool tvd = plan.family == Family::TVD;
  for (int64_t j = 0; j < V; j += W) {
    const int64_t n = V - j;
    const Vec a = Vec::loadu(ep + j), b = Vec::loadu(eq + j);
    const Vec lp = tvd ? zero : (load_row(x + j, n) - vmxs) * vit - vlogZp;
    const Vec lq = tvd ? zero : (load_row(y + j, n) - vmys) * vit - vlogZq;
    const Vec m = tvd ? zero : Vec::loadu(lm + j);
    store_grad_lanes(plan.family, c, a, b, a * vinvZp, b * vinvZq, lp, lq, m,
                     gx ? gx + j : nullptr, gy ? gy + j : nullptr, n);
  }
  return L;
}

// Gradients of one row from the statistics of its forward, in one pass over the row:
//   p = exp((x - mx)/T - logZp), q likewise, and the pass-4 formulas above with L, s0..s2
// from st; each element pays one exp per distribution (plus logaddexp for SKEW/JSD).
// Agrees with divergence_row's gradients up to rounding (p is formed as exp(xs)/Zp there).
template <typename T>
void divergence_row_backward(const T* x, const T* y, int64_t V, const DivergencePlan& plan,
                             T inv_temp, T grad_scale, const T* st, T* gx, T* gy) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T mx = st[0], my = st[1];
  if (std::isnan(mx) || std::isnan(my)) {
    fill_row(gx, V, std::numeric_limits<T>::quiet_NaN());
    fill_row(gy, V, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  const T w = static_cast<T>(plan.w);
  if (mx == -std::numeric_limits<T>::infinity() || my == -std::numeric_limits<T>::infinity() ||
      (plan.family == Family::SKEW && w == T(1))) {
    fill_row(gx, V, T(0));
    fill_row(gy, V, T(0));
    return;
  }
  const T logZp = st[2], logZq = st[3];
  const GradTerms<T> c(grad_scale * inv_temp, st[4], st[5], st[6], st[7], w);
  const Vec vmxs(mx), vmys(my), vit(inv_temp), zero(T(0));
  const Vec vinvZp(std::exp(-logZp)), vinvZq(std::exp(-logZq)), vlogZp(logZp), vlogZq(logZq);
  const Vec vlogw(std::log(w));
  const bool mixes = plan.family == Family::SKEW || plan.family == Family::JSD;
  for (int64_t j = 0; j < V; j += W) {
    const int64_t n = V - j;
    const Vec xs = (load_row(x + j, n) - vmxs) * vit;
    const Vec ys = (load_row(y + j, n) - vmys) * vit;
    const Vec a = vexp(xs), b = vexp(ys);
    const Vec lp = xs - vlogZp, lq = ys - vlogZq;
    const Vec m = mixes ? logaddexp(vlogw + lp, c.log1mw + lq) : zero;
    store_grad_lanes(plan.family, c, a, b, a * vinvZp, b * vinvZq, lp, lq, m,
                     gx ? gx + j : nullptr, gy ? gy + j : nullptr, n);
  }
}

}  // namespace cpu
}  // namespace pydistill
