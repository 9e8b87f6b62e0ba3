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
// Passes (all per sample, parallel over samples with at::parallel_for; each worker owns its
// sample's output / gradient plane and a small scratch, so no atomics, and the result is
// bitwise independent of the thread count):
//   forward: (1) mu (double accumulation; only when contrast is present); (2) the sample's
//            index map through flip / cutout / crop and the separable scale tables (from the
//            parameters only); (3) stage A: the scale resampling into C + 1 scratch planes
//            (the C channel sums and the weight sum); (4) stage B: the rotation resampling of
//            those planes and the colour map, written to y. The scratch is (C + 1) H W values
//            (13 KB for 3x32x32) and stays in cache, so y is produced in one pass over x.
//            This is the nested 16-tap sum of the header evaluated stage by stage (4 + 4 taps
//            per pixel instead of 16); the CUDA kernel uses the nested taps directly.
//   backward: the transpose, B^T then A^T, scattering into a compute-dtype gradient buffer
//            of the sample, then the contrast term and the cast.
// Compute dtype: float for float32 / float16 / bfloat16 (rounded once at the end), double for
// float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "pydistill/dsa_taps.h"
#include "pydistill/feature_checks.h"

namespace pydistill {
namespace {

using at::Tensor;
using dsa::kNumParams;

// Per-sample tables and scratch of one worker. The chain is evaluated in two stages on the
// sample's own (cache-resident) scratch instead of the 16 nested taps per pixel of the CUDA
// kernel; the sums are the same (the taps of stage B times those of stage A), only their
// rounding order differs:
//   fmap[r, c]   source index into x's H*W plane of f-pixel (r, c) through flip, cutout,
//                crop; -1 where the chain gives 0 (cutout box, cropped away)
//   stage A      A_c(q) = sum_{scale corners b of q} w_b x_c(fmap(b)),  A_C(q) = sum w_b over
//                the same corners with fmap >= 0 (the weight plane W at the scale output);
//                without scale: A_c(q) = x_c(fmap(q)), A_C(q) = [fmap(q) >= 0]
//   stage B      S_c(p) = sum_{rotate corners a of p} w_a A_c(a), W(p) likewise from A_C;
//                without rotate S = A
//   colour       y_c(p) = alpha S_c(p) + beta mean_c S(p) + gamma W(p)
// The scale map is axis-aligned, so its corners and weights are separable: per-column
// (x0, tx) and per-row (y0, ty) tables; the rotation is evaluated per output pixel from the
// base-coordinate tables (no division in the pixel loops).
template <typename T>
struct Worker {
  int64_t C, H, W, HW, flags;
  bool align;
  std::vector<T> bx, by;              // affine_grid base coordinates of columns / rows
  std::vector<int32_t> fmap;          // [HW]
  std::vector<int64_t> cx0, cy0;      // scale tables: first corner per column / row
  std::vector<T> ctx, cty;            //               fractional parts
  std::vector<T> A;                   // [(C + 1) * HW] stage-A planes (forward) / their
                                      // gradients (backward)
  bool ident;                         // no crop / cutout / flip: fmap is the identity

  Worker(int64_t C_, int64_t H_, int64_t W_, int64_t flags_, bool align_)
      : C(C_), H(H_), W(W_), HW(H_ * W_), flags(flags_), align(align_), bx(W_), by(H_),
        fmap(H_ * W_), cx0(W_), cy0(H_), ctx(W_), cty(H_), A((C_ + 1) * H_ * W_),
        ident(!(flags_ & (dsa::kCrop | dsa::kCutout | dsa::kFlip))) {
    for (int64_t j = 0; j < W; ++j) bx[j] = dsa::base_coord<T>(j, W, align);
    for (int64_t i = 0; i < H; ++i) by[i] = dsa::base_coord<T>(i, H, align);
    if (ident)
      for (int64_t q = 0; q < HW; ++q) fmap[q] = static_cast<int32_t>(q);
  }

  // pixel coordinate -> (first corner, fraction); far outside or NaN: a corner pair that is
  // entirely out of range (as dsa::bilinear)
  static void split(T v, int64_t size, int64_t* v0, T* t) {
    if (!(v > T(-2) && v < static_cast<T>(size + 1))) {
      *v0 = -8;
      *t = T(0);
      return;
    }
    const T f = std::floor(v);
    *v0 = static_cast<int64_t>(f);
    *t = v - f;
  }

  void prepare(const dsa::Sample<T>& s) {
    for (int64_t r = 0; r < H && !ident; ++r) {
      for (int64_t c0 = 0; c0 < W; ++c0) {
        int64_t rr = r, c = ((flags & dsa::kFlip) && s.flip) ? W - 1 - c0 : c0;
        int32_t idx = -1;
        const bool cut = (flags & dsa::kCutout) && rr >= s.top && rr < s.top + s.sh &&
                         c >= s.left && c < s.left + s.sw;
        if (!cut) {
          if (flags & dsa::kCrop) {
            rr += s.dh;
            c += s.dw;
          }
          if (rr >= 0 && rr < H && c >= 0 && c < W) idx = static_cast<int32_t>(rr * W + c);
        }
        fmap[r * W + c0] = idx;
      }
    }
    if (flags & dsa::kScale) {
      for (int64_t j = 0; j < W; ++j) split(dsa::unnormalize(s.sx * bx[j], W, align), W, &cx0[j], &ctx[j]);
      for (int64_t i = 0; i < H; ++i) split(dsa::unnormalize(s.sy * by[i], H, align), H, &cy0[i], &cty[i]);
    }
  }

  // rotate corners of output pixel (i, j) on the scale-output grid; returns how many
  int rotate_corners(const dsa::Sample<T>& s, int64_t i, int64_t j, int64_t* q, T* w) const {
    const T xs = s.cs * bx[j] - s.sn * by[i];
    const T ys = s.sn * bx[j] + s.cs * by[i];
    int64_t ri[4], rj[4];
    const int n = dsa::bilinear(dsa::unnormalize(ys, H, align), dsa::unnormalize(xs, W, align),
                                H, W, ri, rj, w);
    for (int k = 0; k < n; ++k) q[k] = ri[k] * W + rj[k];
    return n;
  }

  // scale corners of scale-output pixel (qi, qj), already through fmap (only fmap >= 0)
  int scale_corners(int64_t qi, int64_t qj, int32_t* src, T* w) const {
    int n = 0;
    for (int dy = 0; dy < 2; ++dy) {
      const int64_t y = cy0[qi] + dy;
      if (y < 0 || y >= H) continue;
      const T wy = dy ? cty[qi] : T(1) - cty[qi];
      for (int dx = 0; dx < 2; ++dx) {
        const int64_t x = cx0[qj] + dx;
        if (x < 0 || x >= W) continue;
        const int32_t idx = fmap[y * W + x];
        if (idx < 0) continue;
        src[n] = idx;
        w[n] = wy * (dx ? ctx[qj] : T(1) - ctx[qj]);
        ++n;
      }
    }
    return n;
  }
};

template <typename scalar_t>
void dsa_forward_impl(const scalar_t* x, const double* params, scalar_t* y, int64_t N, int64_t C,
                      int64_t H, int64_t W, int64_t flags, bool align) {
  using T = at::opmath_type<scalar_t>;
  const int64_t HW = H * W, CHW = C * HW;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    Worker<T> wk(C, H, W, flags, align);
    std::vector<T> S(static_cast<size_t>(C));
    T* A = wk.A.data();
    for (int64_t n = n0; n < n1; ++n) {
      const auto s = dsa::load_sample<T>(params + n * kNumParams);
      const scalar_t* xn = x + n * CHW;
      scalar_t* yn = y + n * CHW;
      // first small pass: mu = mean of x[n] (contrast only)
      T mu = T(0);
      if (flags & dsa::kContrast) {
        double acc[4] = {0.0, 0.0, 0.0, 0.0};  // 4 chains: not latency-bound
        int64_t e = 0;
        for (; e + 4 <= CHW; e += 4)
          for (int u = 0; u < 4; ++u) acc[u] += static_cast<double>(xn[e + u]);
        for (; e < CHW; ++e) acc[0] += static_cast<double>(xn[e]);
        mu = static_cast<T>(((acc[0] + acc[1]) + (acc[2] + acc[3])) / static_cast<double>(CHW));
      }
      const T gamma = s.bright + s.one_minus_k * mu;
      wk.prepare(s);
      if (wk.ident && !(flags & (dsa::kScale | dsa::kRotate))) {
        // colour only: plane loops (the channel-sum plane in A, then every channel)
        T* msum = A;
        if (s.beta != T(0)) {
          std::fill(msum, msum + HW, T(0));
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* xc = xn + c * HW;
            for (int64_t p = 0; p < HW; ++p) msum[p] += static_cast<T>(xc[p]);
          }
        }
        const T invC = T(1) / static_cast<T>(C);
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* xc = xn + c * HW;
          scalar_t* yc = yn + c * HW;
          if (s.beta != T(0)) {
            for (int64_t p = 0; p < HW; ++p)
              yc[p] = static_cast<scalar_t>(s.alpha * static_cast<T>(xc[p]) +
                                            s.beta * (msum[p] * invC) + gamma);
          } else {
            for (int64_t p = 0; p < HW; ++p)
              yc[p] = static_cast<scalar_t>(s.alpha * static_cast<T>(xc[p]) + gamma);
          }
        }
        continue;
      }
      if (!(flags & (dsa::kScale | dsa::kRotate))) {
        // no resampling: one tap of weight 1 (or none) per pixel, straight from fmap
        for (int64_t p = 0; p < HW; ++p) {
          const int32_t idx = wk.fmap[p];
          if (idx < 0) {
            for (int64_t c = 0; c < C; ++c) yn[c * HW + p] = static_cast<scalar_t>(T(0));
            continue;
          }
          T csum = T(0);
          for (int64_t c = 0; c < C; ++c) {
            S[c] = static_cast<T>(xn[c * HW + idx]);
            csum += S[c];
          }
          const T sat = s.beta != T(0) ? s.beta * (csum / static_cast<T>(C)) : T(0);
          for (int64_t c = 0; c < C; ++c)
            yn[c * HW + p] = static_cast<scalar_t>(s.alpha * S[c] + sat + gamma);
        }
        continue;
      }
      // stage A: crop / cutout / flip (fmap) and scale, into the C + 1 planes
      for (int64_t qi = 0; qi < H; ++qi) {
        for (int64_t qj = 0; qj < W; ++qj) {
          const int64_t q = qi * W + qj;
          if (flags & dsa::kScale) {
            int32_t src[4];
            T w[4];
            const int nb = wk.scale_corners(qi, qj, src, w);
            T wsum = T(0);
            for (int b = 0; b < nb; ++b) wsum += w[b];
            for (int64_t c = 0; c < C; ++c) {
              const scalar_t* xc = xn + c * HW;
              T acc = T(0);
              for (int b = 0; b < nb; ++b) acc += w[b] * static_cast<T>(xc[src[b]]);
              A[c * HW + q] = acc;
            }
            A[C * HW + q] = wsum;
          } else {
            const int32_t idx = wk.fmap[q];
            for (int64_t c = 0; c < C; ++c)
              A[c * HW + q] = idx >= 0 ? static_cast<T>(xn[c * HW + idx]) : T(0);
            A[C * HW + q] = idx >= 0 ? T(1) : T(0);
          }
        }
      }
      // stage B: rotate, then the colour map
      for (int64_t i = 0; i < H; ++i) {
        for (int64_t j = 0; j < W; ++j) {
          const int64_t p = i * W + j;
          T wsum = T(0), csum = T(0);
          if (flags & dsa::kRotate) {
            int64_t q[4];
            T w[4];
            const int na = wk.rotate_corners(s, i, j, q, w);
            for (int64_t c = 0; c <= C; ++c) {
              const T* Ac = A + c * HW;
              T acc = T(0);
              for (int a = 0; a < na; ++a) acc += w[a] * Ac[q[a]];
              if (c < C) {
                S[c] = acc;
                csum += acc;
              } else {
                wsum = acc;
              }
            }
          } else {
            for (int64_t c = 0; c < C; ++c) {
              S[c] = A[c * HW + p];
              csum += S[c];
            }
            wsum = A[C * HW + p];
          }
          const T sat = s.beta != T(0) ? s.beta * (csum / static_cast<T>(C)) : T(0);
          const T off = gamma * wsum;
          for (int64_t c = 0; c < C; ++c)
            yn[c * HW + p] = static_cast<scalar_t>(s.alpha * S[c] + sat + off);
        }
      }
    }
  });
}

// The transpose of the forward's two stages, per sample (the worker owns the sample's whole
// gradient plane: no atomics). Stage B^T scatters h_c(p) = alpha g_c(p) + beta mean_c g(p)
// and sum_c g_c(p) (for the contrast term) onto the scale-output grid (planes in wk.A); stage
// A^T scatters those through the scale corners and fmap into the gradient of x, and sums
// G = sum_p W(p) sum_c g_c(p) = <A_C, B^T sum_c g>.
template <typename scalar_t>
void dsa_backward_impl(const scalar_t* go, const double* params, scalar_t* gx, int64_t N,
                       int64_t C, int64_t H, int64_t W, int64_t flags, bool align) {
  using T = at::opmath_type<scalar_t>;
  const int64_t HW = H * W, CHW = C * HW;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    Worker<T> wk(C, H, W, flags, align);
    std::vector<T> buf(static_cast<size_t>(CHW));
    T* Hb = wk.A.data();
    const bool contrast = (flags & dsa::kContrast) != 0;
    for (int64_t n = n0; n < n1; ++n) {
      const auto s = dsa::load_sample<T>(params + n * kNumParams);
      const scalar_t* gn = go + n * CHW;
      wk.prepare(s);
      scalar_t* gxn = gx + n * CHW;
      if (!(flags & (dsa::kScale | dsa::kRotate))) {
        // no resampling: fmap is injective, each valid output pixel feeds one input pixel
        std::fill(buf.begin(), buf.end(), T(0));
        double G = 0.0;
        for (int64_t p = 0; p < HW; ++p) {
          const int32_t idx = wk.fmap[p];
          if (idx < 0) continue;
          T gsum = T(0);
          for (int64_t c = 0; c < C; ++c) gsum += static_cast<T>(gn[c * HW + p]);
          const T sat = s.beta != T(0) ? s.beta * (gsum / static_cast<T>(C)) : T(0);
          for (int64_t c = 0; c < C; ++c)
            buf[c * HW + idx] += s.alpha * static_cast<T>(gn[c * HW + p]) + sat;
          if (contrast) G += static_cast<double>(gsum);
        }
        const T corr = contrast ? static_cast<T>(static_cast<double>(s.one_minus_k) * G /
                                                 static_cast<double>(CHW))
                                : T(0);
        for (int64_t e = 0; e < CHW; ++e) gxn[e] = static_cast<scalar_t>(buf[e] + corr);
        continue;
      }
      // stage B^T
      if (flags & dsa::kRotate) std::fill(wk.A.begin(), wk.A.end(), T(0));
      for (int64_t i = 0; i < H; ++i) {
        for (int64_t j = 0; j < W; ++j) {
          const int64_t p = i * W + j;
          T gsum = T(0);
          for (int64_t c = 0; c < C; ++c) gsum += static_cast<T>(gn[c * HW + p]);
          const T sat = s.beta != T(0) ? s.beta * (gsum / static_cast<T>(C)) : T(0);
          if (flags & dsa::kRotate) {
            int64_t q[4];
            T w[4];
            const int na = wk.rotate_corners(s, i, j, q, w);
            for (int64_t c = 0; c < C; ++c) {
              const T h = s.alpha * static_cast<T>(gn[c * HW + p]) + sat;
              T* Hc = Hb + c * HW;
              for (int a = 0; a < na; ++a) Hc[q[a]] += w[a] * h;
            }
            T* Hw = Hb + C * HW;
            for (int a = 0; a < na; ++a) Hw[q[a]] += w[a] * gsum;
          } else {
            for (int64_t c = 0; c < C; ++c)
              Hb[c * HW + p] = s.alpha * static_cast<T>(gn[c * HW + p]) + sat;
            Hb[C * HW + p] = gsum;
          }
        }
      }
      // stage A^T
      std::fill(buf.begin(), buf.end(), T(0));
      double G = 0.0;
      for (int64_t qi = 0; qi < H; ++qi) {
        for (int64_t qj = 0; qj < W; ++qj) {
          const int64_t q = qi * W + qj;
          if (flags & dsa::kScale) {
            int32_t src[4];
            T w[4];
            const int nb = wk.scale_corners(qi, qj, src, w);
            for (int64_t c = 0; c < C; ++c) {
              const T h = Hb[c * HW + q];
              T* bc = buf.data() + c * HW;
              for (int b = 0; b < nb; ++b) bc[src[b]] += w[b] * h;
            }
            if (contrast) {
              T wsum = T(0);
              for (int b = 0; b < nb; ++b) wsum += w[b];
              G += static_cast<double>(wsum) * static_cast<double>(Hb[C * HW + q]);
            }
          } else {
            const int32_t idx = wk.fmap[q];
            if (idx < 0) continue;
            for (int64_t c = 0; c < C; ++c) buf[c * HW + idx] += Hb[c * HW + q];
            if (contrast) G += static_cast<double>(Hb[C * HW + q]);
          }
        }
      }
      const T corr = contrast ? static_cast<T>(static_cast<double>(s.one_minus_k) * G /
                                               static_cast<double>(CHW))
                              : T(0);
      for (int64_t e = 0; e < CHW; ++e) gxn[e] = static_cast<scalar_t>(buf[e] + corr);
    }
  });
}

// One wrapper for both directions: the same checks, layout and dispatch; only the kernel (and
// the argument named in errors) differs.
template <bool kBackward>
Tensor dsa_apply_cpu(const Tensor& in, const char* name, const Tensor& params_in, int64_t flags,
                     bool align_corners) {
  check_dsa_apply_args(in, name, params_in, flags);
  const Tensor src = in.contiguous();
  const Tensor params = params_in.contiguous();
  Tensor out = at::empty_like(src, at::MemoryFormat::Contiguous);
  if (src.numel() == 0) return out;
  const int64_t N = src.size(0), C = src.size(1), H = src.size(2), W = src.size(3);
  TORCH_CHECK(H * W < (int64_t{1} << 31), "pydistill_ext: ", name, " has ", H * W,
              " pixels per image; at most 2^31 - 1 are supported");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(),
                                  kBackward ? "dsa_apply_bwd_cpu" : "dsa_apply_cpu", [&] {
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    const double* p = params.const_data_ptr<double>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if constexpr (kBackward) {
      dsa_backward_impl<scalar_t>(s, p, o, N, C, H, W, flags, align_corners);
    } else {
      dsa_forward_impl<scalar_t>(s, p, o, N, C, H, W, flags, align_corners);
    }
  });
  return out;
}

Tensor dsa_apply_forward_cpu(const Tensor& x, const Tensor& params, int64_t flags,
                             bool align_corners) {
  return dsa_apply_cpu<false>(x, "x", params, flags, align_corners);
}

Tensor dsa_apply_backward_cpu(const Tensor& grad_out, const Tensor& params, int64_t flags,
                              bool align_corners) {
  return dsa_apply_cpu<true>(grad_out, "grad_out", params, flags, align_corners);
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m) {
  m.impl("dsa_apply_forward", &dsa_apply_forward_cpu);
  m.impl("dsa_apply_backward", &dsa_apply_backward_cpu);
}

}  // namespace pydistill
