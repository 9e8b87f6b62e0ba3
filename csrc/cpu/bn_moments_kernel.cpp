// CPU kernels of bn_moments_forward / bn_moments_backward: TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m).
//
// Math (REFERENCE.md 4.1-4.2). x [N, C, *], S = prod(x.shape[2:]). A group g is a channel c
// (per-channel form: its M = N * S elements x[n, c, s]) or a (sample, channel) pair (per-sample
// form, ZeroQ: its M = S elements x[n, c, :]).
//   mean_g = (1/M) sum x,   var_g = (1/M') sum (x - mean_g)^2,   M' = M (biased) or M - 1.
// Accumulation in the compute dtype (double for float64, float for float32/float16/bfloat16)
// with Welford's update and Chan's merge, never with sum(x^2)/M - mean^2 (which loses every
// digit of var when |mean| >> std: in float32 at mean 1e4, std 1e-2 the two terms agree to ~1e-8
// relative and their difference is rounding noise):
//   Welford, adding one value v to (k, mu, m2):  k += 1; d = v - mu; mu += d / k; m2 += d (v - mu)
//   Chan, merging (ka, mua, m2a) and (kb, mub, m2b): k = ka + kb; d = mub - mua;
//         mu = mua + d kb / k;  m2 = m2a + m2b + d^2 ka kb / k.
// Shift: every group is accumulated as x - K with K = the group's first element (exact in the
// compute dtype), and K is added back to the mean at the end. Variance is shift-invariant; the
// shift keeps the running means small so that their rounding (ulp(mean)) does not swamp a small
// variance (mean 1e4, std 1e-2 in float32: ulp(1e4) ~ 1e-3 is a tenth of the std).
// Vectorisation: a block of R rows x W contiguous columns is reduced per column, the vector lanes
// being columns: after row r every column has count r + 1, so one reciprocal 1/(r+1) per row
// serves all lanes and the W columns are W independent dependency chains. The column states
// (all of count R) are then Chan-merged into the group in column order.
//
// Layouts (one read of x either way):
//   runs (x contiguous, NCHW): per channel, rows = the N samples (stride C*S), columns = the S
//     positions of a block of cb = kTile / S adjacent channels (contiguous cb * S elements per
//     row: long runs, not N*C short ones; S > kTile: one channel in tiles of kTile), then each
//     channel's S column states merged in s order; per sample, the S contiguous elements folded
//     into rows of 4 vectors plus a scalar tail. Parallel over channel blocks / groups.
//   rows (x.movedim(1, -1) contiguous: channels_last, [N, C], S = 1): x is [B, R, C] with
//     B = 1, R = N*S (per channel) or B = N, R = S (per sample); columns = channels. Two stages:
//     chunks of a fixed number of rows (chosen from C only) in parallel -> per-chunk column
//     states, then per group a Chan merge of its chunks in chunk order.
//   anything else: x.contiguous() first.
// Determinism: the order of every addition and merge depends only on the shape (tiles, chunks,
// the vector/scalar split), never on the thread count; no atomics. Bitwise reproducible.
//
// Backward (closed form, one read of x and one write): with g_m = dL/dmean_g, g_v = dL/dvar_g,
//   dvar/dx = 2 (x - mean) / M',  dmean/dx = 1/M, so
//   dL/dx = g_m / M + 2 g_v (x - mean) / M' = a_g + b_g x,
//   b_g = 2 g_v / M',  a_g = g_m / M - b_g mean_g      (bn_moments_coefficients, bn_checks.h).
// The output has x's dtype and memory format (at::empty_like); it is written in the layout it has.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "pydistill/bn_checks.h"
#include "pydistill/chan_merge.h"

namespace pydistill {
namespace {

using at::Tensor;
constexpr int64_t kTile = 1024;  // columns per block (runs: cb * S positions; rows: channels)
constexpr int64_t kChunkElems = 32768;  // elements per chunk in the rows layout

template <typename T>
struct Stat {
  int64_t n = 0;
  T mean = T(0);
  T m2 = T(0);
};

// VL values of scalar_t at p as a vector of the compute type.
template <typename scalar_t>
inline at::vec::Vectorized<at::opmath_type<scalar_t>> load_op(const scalar_t* p) {
  using opmath_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return at::vec::Vectorized<opmath_t>::loadu(p);
  } else {
    at::vec::Vectorized<float> v;
    at::vec::load_to_float<scalar_t>(p, v);
    return v;
  }
}

// Store a vector of the compute type as VL values of scalar_t.
template <typename scalar_t>
inline void store_op(scalar_t* p, const at::vec::Vectorized<at::opmath_type<scalar_t>>& v) {
  using opmath_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    v.store(p);
  } else {
    opmath_t tmp[at::vec::Vectorized<opmath_t>::size()];
    v.store(tmp);
    for (int64_t i = 0; i < at::vec::Vectorized<opmath_t>::size(); ++i) p[i] = static_cast<scalar_t>(tmp[i]);
  }
}

// Optional elementwise output written in the same pass (frozen_bn_moments): y = k[j] * x + h[j]
// at the same offset as x (y has x's layout); k, h per column.
template <typename scalar_t>
struct YAffine {
  scalar_t* y = nullptr;  // base of the block, like `base`
  const at::opmath_type<scalar_t>* k = nullptr;
  const at::opmath_type<scalar_t>* h = nullptr;
};

// Per-column Welford over a [R, W] block (row r at base + r * row_stride, W contiguous
// columns) of the shifted values x - shift[j]. On return mean[j], m2[j] are the statistics of
// column j (count R; mean[j] relative to shift[j]). With kY, also writes y (YAffine).
template <typename scalar_t, bool kY = false>
void welford_columns(const scalar_t* base, int64_t R, int64_t row_stride, int64_t W,
                     const at::opmath_type<scalar_t>* shift, at::opmath_type<scalar_t>* mean,
                     at::opmath_type<scalar_t>* m2, YAffine<scalar_t> ya = {}) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t VL = Vec::size();
  std::fill(mean, mean + W, opmath_t(0));
  std::fill(m2, m2 + W, opmath_t(0));
  const int64_t Wv = W - W % VL;
  for (int64_t r = 0; r < R; ++r) {
    const opmath_t inv = opmath_t(1) / static_cast<opmath_t>(r + 1);
    const Vec vinv(inv);
    const scalar_t* row = base + r * row_stride;
    int64_t j = 0;
    for (; j < Wv; j += VL) {
      const Vec raw = load_op(row + j);
      if constexpr (kY) {
        store_op(ya.y + r * row_stride + j,
                 at::vec::fmadd(raw, Vec::loadu(ya.k + j), Vec::loadu(ya.h + j)));
      }
      const Vec v = raw - Vec::loadu(shift + j);
      Vec mu = Vec::loadu(mean + j);
      const Vec d = v - mu;
      mu = at::vec::fmadd(d, vinv, mu);
      const Vec q = at::vec::fmadd(d, v - mu, Vec::loadu(m2 + j));
      mu.store(mean + j);
      q.store(m2 + j);
    }
    for (; j < W; ++j) {
      const opmath_t raw = static_cast<opmath_t>(row[j]);
      if constexpr (kY) ya.y[r * row_stride + j] = static_cast<scalar_t>(ya.k[j] * raw + ya.h[j]);
      const opmath_t v = raw - shift[j];
      const opmath_t d = v - mean[j];
      mean[j] += d * inv;
      m2[j] += d * (v - mean[j]);
    }
  }
}

template <typename opmath_t, typename out_t>
inline void finish(const Stat<opmath_t>& s, opmath_t shift, bool unbiased, out_t* mean, out_t* var) {
  *mean = static_cast<out_t>(shift + s.mean);
  *var = static_cast<out_t>(s.m2 / static_cast<opmath_t>(unbiased ? s.n - 1 : s.n));
}

// ---------------------------------------------------------------- forward, runs layout (NCHW)
// kY: also y = k_c x + h_c (k, h: [C]) into y (x's layout).
template <typename scalar_t, bool kY = false>
void forward_runs(const scalar_t* x, const BnMomentsShape& sh, bool per_sample, bool unbiased,
                  at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* var_out,
                  scalar_t* y = nullptr, const at::opmath_type<scalar_t>* k = nullptr,
                  const at::opmath_type<scalar_t>* h = nullptr) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  if (!per_sample) {
    // Channel blocks: cb channels with cb * S <= kTile form one [N, cb * S] block whose rows
    // are contiguous (so x is read, and y written, in runs of cb * S elements rather than S);
    // a channel with S > kTile is tiled over s instead. Per channel, its S column states are
    // merged in s order.
    const int64_t cb = S >= kTile ? 1 : kTile / S;
    const int64_t nblk = (C + cb - 1) / cb;
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      const size_t W0 = static_cast<size_t>(std::min(kTile, cb * S));
      std::vector<opmath_t> mb(W0), qb(W0), sb(W0), kb(kY ? W0 : 0), hb(kb.size());
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t c0 = blk * cb, cn = std::min(cb, C - c0);
        if (S >= kTile) {  // one channel, tiles of kTile positions
          const opmath_t shift = static_cast<opmath_t>(x[c0 * S]);  // x[0, c, 0]
          std::fill(sb.begin(), sb.end(), shift);
          if constexpr (kY) {
            std::fill(kb.begin(), kb.end(), k[c0]);
            std::fill(hb.begin(), hb.end(), h[c0]);
          }
          Stat<opmath_t> acc;
          for (int64_t s0 = 0; s0 < S; s0 += kTile) {
            const int64_t W = std::min(kTile, S - s0);
            welford_columns<scalar_t, kY>(x + c0 * S + s0, N, C * S, W, sb.data(), mb.data(),
                                          qb.data(), {kY ? y + c0 * S + s0 : nullptr, kb.data(), hb.data()});
            for (int64_t j = 0; j < W; ++j) chan_merge(acc, N, mb[j], qb[j]);
          }
          finish(acc, shift, unbiased, mean_out + c0, var_out + c0);
          continue;
        }
        for (int64_t ci = 0; ci < cn; ++ci) {
          const int64_t c = c0 + ci;
          std::fill(sb.begin() + ci * S, sb.begin() + (ci + 1) * S, static_cast<opmath_t>(x[c * S]));
          if constexpr (kY) {
            std::fill(kb.begin() + ci * S, kb.begin() + (ci + 1) * S, k[c]);
            std::fill(hb.begin() + ci * S, hb.begin() + (ci + 1) * S, h[c]);
          }
        }
        welford_columns<scalar_t, kY>(x + c0 * S, N, C * S, cn * S, sb.data(), mb.data(),
                                      qb.data(), {kY ? y + c0 * S : nullptr, kb.data(), hb.data()});
        for (int64_t ci = 0; ci < cn; ++ci) {
          Stat<opmath_t> acc;
          for (int64_t j = ci * S; j < (ci + 1) * S; ++j) chan_merge(acc, N, mb[j], qb[j]);
          finish(acc, sb[ci * S], unbiased, mean_out + c0 + ci, var_out + c0 + ci);
        }
      }
    });
    return;
  }
  // per (n, c): S contiguous elements = R rows of L columns (L = 4 vectors) + a scalar tail
  const int64_t L = std::min<int64_t>(S, 4 * Vec::size());
  const int64_t R = S / L, tail0 = R * L;
  const int64_t grain = std::max<int64_t>(1, 32768 / S);
  at::parallel_for(0, N * C, grain, [&](int64_t g0, int64_t g1) {
    std::vector<opmath_t> mb(static_cast<size_t>(L)), qb(mb.size()), sb(mb.size()),
        kb(kY ? mb.size() : 0), hb(kb.size());
    for (int64_t g = g0; g < g1; ++g) {
      const scalar_t* row = x + g * S;
      const opmath_t shift = static_cast<opmath_t>(row[0]);
      std::fill(sb.begin(), sb.end(), shift);
      if constexpr (kY) {
        std::fill(kb.begin(), kb.end(), k[g % C]);
        std::fill(hb.begin(), hb.end(), h[g % C]);
      }
      Stat<opmath_t> acc;
      welford_columns<scalar_t, kY>(row, R, L, L, sb.data(), mb.data(), qb.data(),
                                    {kY ? y + g * S : nullptr, kb.data(), hb.data()});
      for (int64_t j = 0; j < L; ++j) chan_merge(acc, R, mb[j], qb[j]);
      for (int64_t j = tail0; j < S; ++j) {
        const opmath_t raw = static_cast<opmath_t>(row[j]);
        if constexpr (kY) y[g * S + j] = static_cast<scalar_t>(k[g % C] * raw + h[g % C]);
        chan_merge(acc, 1, raw - shift, opmath_t(0));
      }
      finish(acc, shift, unbiased, mean_out + g, var_out + g);
    }
  });
}

// ------------------------------------------------- forward, rows layout (channels_last, [N, C])
template <typename scalar_t, bool kY = false>
void forward_rows(const scalar_t* x, const BnMomentsShape& sh, bool per_sample, bool unbiased,
                  at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* var_out,
                  scalar_t* y = nullptr, const at::opmath_type<scalar_t>* k = nullptr,
                  const at::opmath_type<scalar_t>* h = nullptr) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t C = sh.C;
  const int64_t B = per_sample ? sh.N : 1;
  const int64_t R = per_sample ? sh.S : sh.N * sh.S;
  if (B == 0 || C == 0) return;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / C);  // shape-only choice
  const int64_t P = (R + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t T = std::min(C, kTile);
  const int64_t tiles = (C + T - 1) / T;
  // shifts: the group's first element, x[b, row 0, c]
  std::vector<opmath_t> shifts(static_cast<size_t>(B * C));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) shifts[b * C + c] = static_cast<opmath_t>(x[b * R * C + c]);
  // stage 1: column states of every (batch, chunk, column tile)
  std::vector<opmath_t> pm(static_cast<size_t>(B * P * C)), pq(pm.size());
  at::parallel_for(0, B * P * tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (P * tiles), p = (t / tiles) % P, ct = t % tiles;
      const int64_t r0 = p * rows_per_chunk, rn = std::min(rows_per_chunk, R - r0);
      const int64_t cs = ct * T, W = std::min(T, C - cs);
      const int64_t off = (b * P + p) * C + cs;
      welford_columns<scalar_t, kY>(x + (b * R + r0) * C + cs, rn, C, W,
                                    shifts.data() + b * C + cs, pm.data() + off, pq.data() + off,
                                    {kY ? y + (b * R + r0) * C + cs : nullptr, kY ? k + cs : nullptr,
                                     kY ? h + cs : nullptr});
    }
  });
  // stage 2: per group, the chunks in chunk order
  at::parallel_for(0, B * C, 256, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g / C, c = g % C;
      Stat<opmath_t> acc;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t rn = std::min(rows_per_chunk, R - p * rows_per_chunk);
        const int64_t off = (b * P + p) * C + c;
        chan_merge(acc, rn, pm[off], pq[off]);
      }
      finish(acc, shifts[g], unbiased, mean_out + g, var_out + g);
    }
  });
}

std::tuple<Tensor, Tensor> bn_moments_forward_cpu(const Tensor& x_in, bool per_sample,
                                                  bool unbiased) {
  const BnMomentsShape sh = check_bn_moments_args(x_in, per_sample, unbiased);
  const auto op_dtype = at::toOpMathType(x_in.scalar_type());
  const auto shape = bn_moments_out_shape(sh, per_sample);
  Tensor mean = at::empty(shape, x_in.options().dtype(op_dtype));
  Tensor var = at::empty(shape, x_in.options().dtype(op_dtype));
  if (sh.G == 0) return {mean, var};
  const bool rows = bn_is_rows_layout(x_in, sh.S);
  const Tensor x = rows ? x_in : x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_moments_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // rows layout: x.movedim(1, -1) is contiguous, so data_ptr walks [N, *, C]
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    opmath_t* mp = mean.mutable_data_ptr<opmath_t>();
    opmath_t* vp = var.mutable_data_ptr<opmath_t>();
    if (rows) {
      forward_rows<scalar_t>(xp, sh, per_sample, unbiased, mp, vp);
    } else {
      forward_runs<scalar_t>(xp, sh, per_sample, unbiased, mp, vp);
    }
  });
  return {mean, var};
}

// ---------------------------------------------------------------- backward: out = a_g + b_g x
// y[0:n] = a + b * v[0:n] with per-lane (a, b) (a_vec/b_vec, stride 1) or one (a, b) for all.
template <typename scalar_t, bool kPerLane>
inline void affine_span(const scalar_t* v, scalar_t* y, int64_t n, const at::opmath_type<scalar_t>* a,
                        const at::opmath_type<scalar_t>* b) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t VL = Vec::size();
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    const Vec va(a[0]), vb(b[0]);
    for (; j + VL <= n; j += VL) {
      const Vec ca = kPerLane ? Vec::loadu(a + j) : va;
      const Vec cb = kPerLane ? Vec::loadu(b + j) : vb;
      at::vec::fmadd(Vec::loadu(v + j), cb, ca).store(y + j);
    }
  } else {
    const Vec va(a[0]), vb(b[0]);
    for (; j + 2 * VL <= n; j += 2 * VL) {
      Vec x0, x1;
      at::vec::load_to_float<scalar_t>(v + j, x0, x1);
      const Vec a0 = kPerLane ? Vec::loadu(a + j) : va, a1 = kPerLane ? Vec::loadu(a + j + VL) : va;
      const Vec b0 = kPerLane ? Vec::loadu(b + j) : vb, b1 = kPerLane ? Vec::loadu(b + j + VL) : vb;
      at::vec::convert_from_float<scalar_t>(at::vec::fmadd(x0, b0, a0), at::vec::fmadd(x1, b1, a1))
          .store(y + j);
    }
  }
  for (; j < n; ++j) {
    const opmath_t ca = kPerLane ? a[j] : a[0], cb = kPerLane ? b[j] : b[0];
    y[j] = static_cast<scalar_t>(ca + cb * static_cast<opmath_t>(v[j]));
  }
}

Tensor bn_moments_backward_cpu(const Tensor& grad_mean, const Tensor& grad_var, const Tensor& x_in,
                               const Tensor& mean, bool per_sample, bool unbiased) {
  const BnMomentsShape sh =
      check_bn_moments_backward_args(grad_mean, grad_var, x_in, mean, per_sample, unbiased);
  Tensor out = at::empty_like(x_in);
  if (x_in.numel() == 0) return out;
  auto [a, b] = bn_moments_coefficients(grad_mean, grad_var, mean, sh, unbiased);
  // write in out's layout: rows (channels_last-like), runs (contiguous), else via a temporary
  const bool rows = bn_is_rows_layout(out, sh.S);
  const bool direct = rows || out.is_contiguous();
  Tensor dst = direct ? out : at::empty(x_in.sizes(), out.options());
  const Tensor x = rows ? x_in.movedim(1, -1).contiguous().movedim(-1, 1) : x_in.contiguous();
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_moments_bwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = dst.mutable_data_ptr<scalar_t>();
    const opmath_t* ap = a.const_data_ptr<opmath_t>();
    const opmath_t* bp = b.const_data_ptr<opmath_t>();
    if (rows) {  // N*S rows of C channels
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
      at::parallel_for(0, N * S, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t g0 = per_sample ? (r / S) * C : 0;
          affine_span<scalar_t, true>(xp + r * C, yp + r * C, C, ap + g0, bp + g0);
        }
      });
    } else {  // N*C runs of S
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1));
      at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t g = per_sample ? r : r % C;
          affine_span<scalar_t, false>(xp + r * S, yp + r * S, S, ap + g, bp + g);
        }
      });
    }
  });
  if (!direct) out.copy_(dst);
  return out;
}

// ------------------------------------------------------------ frozen_bn_moments (stretch)
// Frozen (eval-mode) BatchNorm fused with the moments of its input, one read of x:
//   y = k_c x + h_c  (k = weight / sqrt(running_var + eps), h = bias - running_mean k: computed
//   by the caller), mean / var as bn_moments. Backward, one read of x and grad_y, one write:
//   dL/dx = k_c grad_y + a_g + b_g x.
std::tuple<Tensor, Tensor, Tensor> frozen_bn_moments_forward_cpu(const Tensor& x_in,
                                                                 const Tensor& scale,
                                                                 const Tensor& shift,
                                                                 bool per_sample, bool unbiased) {
  const BnMomentsShape sh = check_frozen_bn_moments_args(x_in, scale, shift, per_sample, unbiased);
  const auto op_dtype = at::toOpMathType(x_in.scalar_type());
  const auto shape = bn_moments_out_shape(sh, per_sample);
  Tensor mean = at::empty(shape, x_in.options().dtype(op_dtype));
  Tensor var = at::empty(shape, x_in.options().dtype(op_dtype));
  Tensor y = at::empty_like(x_in);
  if (x_in.numel() == 0) return {y, mean, var};
  const bool rows = bn_is_rows_layout(x_in, sh.S);
  const Tensor x = rows ? x_in : x_in.contiguous();
  // rows: x_in is dense, so y = empty_like(x_in) has its strides; else y may be non-contiguous
  const bool direct = rows || y.is_contiguous();
  Tensor dst = direct ? y : at::empty_like(x);
  const Tensor k = scale.contiguous(), h = shift.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frozen_bn_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = dst.mutable_data_ptr<scalar_t>();
    opmath_t* mp = mean.mutable_data_ptr<opmath_t>();
    opmath_t* vp = var.mutable_data_ptr<opmath_t>();
    const opmath_t* kp = k.const_data_ptr<opmath_t>();
    const opmath_t* hp = h.const_data_ptr<opmath_t>();
    if (rows) {
      forward_rows<scalar_t, true>(xp, sh, per_sample, unbiased, mp, vp, yp, kp, hp);
    } else {
      forward_runs<scalar_t, true>(xp, sh, per_sample, unbiased, mp, vp, yp, kp, hp);
    }
  });
  if (!direct) y.copy_(dst);
  return {y, mean, var};
}

// y[0:n] = k * gy + a + b * v with per-lane (k, a, b) or one value each.
template <typename scalar_t, bool kPerLane>
inline void affine2_span(const scalar_t* v, const scalar_t* gy, scalar_t* y, int64_t n,
                         const at::opmath_type<scalar_t>* k, const at::opmath_type<scalar_t>* a,
                         const at::opmath_type<scalar_t>* b) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t VL = Vec::size();
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    const Vec vk(k[0]), va(a[0]), vb(b[0]);
    for (; j + VL <= n; j += VL) {
      const Vec ck = kPerLane ? Vec::loadu(k + j) : vk;
      const Vec ca = kPerLane ? Vec::loadu(a + j) : va;
      const Vec cb = kPerLane ? Vec::loadu(b + j) : vb;
      at::vec::fmadd(Vec::loadu(gy + j), ck, at::vec::fmadd(Vec::loadu(v + j), cb, ca)).store(y + j);
    }
  }
  for (; j < n; ++j) {
    const opmath_t ck = kPerLane ? k[j] : k[0], ca = kPerLane ? a[j] : a[0],
                   cb = kPerLane ? b[j] : b[0];
    y[j] = static_cast<scalar_t>(ck * static_cast<opmath_t>(gy[j]) + ca +
                                 cb * static_cast<opmath_t>(v[j]));
  }
}

Tensor frozen_bn_moments_backward_cpu(const Tensor& grad_y, const Tensor& grad_mean,
                                      const Tensor& grad_var, const Tensor& x_in,
                                      const Tensor& mean, const Tensor& scale, bool per_sample,
                                      bool unbiased) {
  const BnMomentsShape sh =
      check_bn_moments_backward_args(grad_mean, grad_var, x_in, mean, per_sample, unbiased);
  check_frozen_bn_moments_backward_args(grad_y, x_in, scale);
  Tensor out = at::empty_like(x_in);
  if (x_in.numel() == 0) return out;
  auto [a, b] = bn_moments_coefficients(grad_mean, grad_var, mean, sh, unbiased);
  const bool rows = bn_is_rows_layout(out, sh.S);
  const bool direct = rows || out.is_contiguous();
  Tensor dst = direct ? out : at::empty(x_in.sizes(), out.options());
  auto as_layout = [&](const Tensor& t) {
    return rows ? t.movedim(1, -1).contiguous().movedim(-1, 1) : t.contiguous();
  };
  const Tensor x = as_layout(x_in), gy = as_layout(grad_y);
  const Tensor k = scale.contiguous();
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frozen_bn_bwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = gy.const_data_ptr<scalar_t>();
    scalar_t* yp = dst.mutable_data_ptr<scalar_t>();
    const opmath_t* kp = k.const_data_ptr<opmath_t>();
    const opmath_t* ap = a.const_data_ptr<opmath_t>();
    const opmath_t* bp = b.const_data_ptr<opmath_t>();
    if (rows) {
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
      at::parallel_for(0, N * S, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t g0 = per_sample ? (r / S) * C : 0;
          affine2_span<scalar_t, true>(xp + r * C, gp + r * C, yp + r * C, C, kp, ap + g0, bp + g0);
        }
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1));
      at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t g = per_sample ? r : r % C;
          affine2_span<scalar_t, false>(xp + r * S, gp + r * S, yp + r * S, S, kp + r % C, ap + g,
                                        bp + g);
        }
      });
    }
  });
  if (!direct) out.copy_(dst);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m) {
  m.impl("bn_moments_forward", &bn_moments_forward_cpu);
  m.impl("bn_moments_backward", &bn_moments_backward_cpu);
  m.impl("frozen_bn_moments_forward", &frozen_bn_moments_forward_cpu);
  m.impl("frozen_bn_moments_backward", &frozen_bn_moments_backward_cpu);
}

}  // namespace pydistill
