// The per-output-pixel math of the fused DSA op (dsa_apply_forward / dsa_apply_backward):
// the parameter layout, affine_grid / grid_sample coordinates, and the nested tap list used
// as-is by the CUDA kernel (csrc/cuda/dsa_augment_kernel.cu); the CPU kernel
// (csrc/cpu/dsa_augment_kernel.cpp) evaluates the same sums stage by stage from the same
// coordinate functions. Host + device, no allocation.
//
// The transform is the canonical DSA chain (pydistill_ext/augment/dsa.py), every op optional,
// in this order:
//   z  = colour(x)                       brightness, saturation, contrast (per-sample affine)
//   c1 = crop(z)        c1[i, j] = z[i + dh, j + dw]  (0 outside the image)
//   c2 = cutout(c1)     c2[i, j] = c1[i, j] * keep[i, j]  (box of rows [top, top + sh),
//                                                          cols [left, left + sw) zeroed)
//   f  = flip(c2)       f[i, j] = c2[i, W - 1 - j]  when the sample's flip bit is set
//   g  = scale(f)       grid_sample(f, affine_grid([[sx, 0, 0], [0, sy, 0]]))
//   y  = rotate(g)      grid_sample(g, affine_grid([[cos, -sin, 0], [sin, cos, 0]]))
// grid_sample is bilinear with zero padding, align_corners as given.
//
// Geometry. Everything after the colour ops is linear in z and the same for every channel, so
// for each output pixel p there is a short list of taps (source pixel index s_k into z's
// H*W plane, weight w_k) with
//   y_c(p) = sum_k w_k z_c(s_k).
// The list is built by walking the chain backwards from p:
//   * rotate: affine_grid's base grid gives the normalised output coordinate
//       xn(j) = (2j + 1 - W) / W           (align_corners False; = linspace(-a, a, W),
//                                            a = (W-1)/W)
//       xn(j) = (2j + 1 - W) / (W - 1)     (align_corners True; = linspace(-1, 1, W))
//     (0 when W = 1), likewise yn(i); the source is (xs, ys) = theta (xn, yn, 1); grid_sample
//     unnormalises it to pixel units, ix = ((xs + 1) W - 1) / 2 (False) or (xs + 1)(W - 1)/2
//     (True), and reads the 4 corners (floor(iy) + {0,1}, floor(ix) + {0,1}) of g with the
//     bilinear weights (1 - ty or ty)(1 - tx or tx), skipping corners outside the image (zero
//     padding). Without rotate: one tap p, weight 1.
//   * scale: each of those g-pixels q is itself a bilinear read of f through the scale theta:
//     up to 4 more corners, weights multiply. Two bilinear resamplings do NOT compose into one
//     (the pure-torch path, and the original, interpolate twice), so this is exact nesting:
//     at most 4 x 4 = 16 taps per output pixel, not one composed map.
//   * flip, cutout, crop are integer index maps / masks on the f-grid: an f-pixel (r, c) reads
//     c2[r, c'] with c' = W - 1 - c if flipped; it is dropped if (r, c') is in the cutout box
//     (the box lives on the crop output, i.e. before the geometry); it reads z[r + dh, c' + dw]
//     and is dropped if that is outside the image.
//
// Colour. With b the brightness shift, s the saturation factor, k the contrast factor
// (identities b = 0, s = 1, k = 1 when an op is absent), per sample:
//   x1 = x + b
//   x2 = (x1 - m_c(x1)) s + m_c(x1)            m_c = mean over channels at each pixel
//   z  = (x2 - M) k + M                        M = mean of x2 over C, H, W
// Since m_c(x1) = m_c(x) + b and the channel mean of (x1 - m_c(x1)) is 0, M = mu + b with
// mu = mean(x) over C, H, W, and
//   z_c = alpha x_c + beta m_c(x) + gamma,  alpha = k s,  beta = k (1 - s),
//                                           gamma = b + (1 - k) mu.
// m_c is linear and channel-independent, so it commutes with the tap sums: writing
// S_c(p) = sum_k w_k x_c(s_k) and W(p) = sum_k w_k,
//   y_c(p) = alpha S_c(p) + beta (1/C) sum_c' S_c'(p) + gamma W(p).
// So the forward needs one small first pass (mu per sample, only when contrast is present)
// and then one pass over the output pixels. The whole op is affine in x: y = A x + b W.
//
// Backward (g = dL/dy): dL/dS_c(p) = h_c(p) = alpha g_c(p) + beta (1/C) sum_c' g_c'(p), and
// mu = (1/(CHW)) sum x gives the extra uniform term, so
//   dL/dx_c(q) = sum_p sum_k [s_k(p) = q] w_k(p) h_c(p)
//              + (1 - k) / (C H W) * sum_p W(p) sum_c g_c(p).
// The first term is the transpose of the tap sums (a scatter); the backward never reads x.
// Double backward: the backward is x -> A^T g, whose derivative w.r.t. g applied to gg is
// A gg = forward(gg) with b = 0 (done in Python by zeroing the brightness column).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace pydistill {
namespace dsa {

// flags: which geometric ops are present (colour ops use identity values when absent) and
// whether contrast is present (then mu is needed).
constexpr int64_t kCrop = 1, kCutout = 2, kFlip = 4, kScale = 8, kRotate = 16, kContrast = 32;
constexpr int64_t kAllFlags = 63;
// params [N, kNumParams] float64, one row per sample:
//   0 brightness b, 1 saturation s, 2 contrast k, 3 crop dh, 4 crop dw, 5 cutout top,
//   6 cutout left, 7 cutout size_h, 8 cutout size_w, 9 flip (0/1), 10 sx, 11 sy,
//   12 cos(angle), 13 sin(angle)
constexpr int64_t kNumParams = 14;
constexpr int kMaxTaps = 16;

template <typename T>
struct Sample {
  T alpha, beta, bright, one_minus_k;  // colour: z = alpha x + beta m_c + bright + (1-k) mu
  int64_t dh, dw, top, left, sh, sw;
  bool flip;
  T sx, sy, cs, sn;
};

template <typename T>
C10_HOST_DEVICE inline Sample<T> load_sample(const double* p) {
  Sample<T> s;
  const double b = p[0], sat = p[1], k = p[2];
  s.alpha = static_cast<T>(k * sat);
  s.beta = static_cast<T>(k * (1.0 - sat));
  s.bright = static_cast<T>(b);
  s.one_minus_k = static_cast<T>(1.0 - k);
  s.dh = static_cast<int64_t>(p[3]);
  s.dw = static_cast<int64_t>(p[4]);
  s.top = static_cast<int64_t>(p[5]);
  s.left = static_cast<int64_t>(p[6]);
  s.sh = static_cast<int64_t>(p[7]);
  s.sw = static_cast<int64_t>(p[8]);
  s.flip = p[9] != 0.0;
  s.sx = static_cast<T>(p[10]);
  s.sy = static_cast<T>(p[11]);
  s.cs = static_cast<T>(p[12]);
  s.sn = static_cast<T>(p[13]);
  return s;
}

// affine_grid's normalised coordinate of pixel j on an axis of `size` pixels
template <typename T>
C10_HOST_DEVICE inline T base_coord(int64_t j, int64_t size, bool align) {
  if (size <= 1) return T(0);
  const T num = static_cast<T>(2 * j + 1 - size);
  return num / static_cast<T>(align ? size - 1 : size);
}

// grid_sample's normalised -> pixel coordinate
template <typename T>
C10_HOST_DEVICE inline T unnormalize(T c, int64_t size, bool align) {
  return align ? (c + T(1)) / T(2) * static_cast<T>(size - 1)
               : ((c + T(1)) * static_cast<T>(size) - T(1)) / T(2);
}

// In-bounds bilinear corners of pixel coordinate (iy, ix) on an H x W grid: writes up to 4
// (row, col, weight), returns how many. Coordinates far outside (or NaN) give none.
template <typename T>
C10_HOST_DEVICE inline int bilinear(T iy, T ix, int64_t H, int64_t W, int64_t* ri, int64_t* rj,
                                    T* rw) {
  if (!(iy > T(-2) && iy < static_cast<T>(H + 1) && ix > T(-2) && ix < static_cast<T>(W + 1)))
    return 0;
  const T fy = std::floor(iy), fx = std::floor(ix);
  const int64_t y0 = static_cast<int64_t>(fy), x0 = static_cast<int64_t>(fx);
  const T ty = iy - fy, tx = ix - fx;
  int n = 0;
  for (int dy = 0; dy < 2; ++dy) {
    const int64_t y = y0 + dy;
    if (y < 0 || y >= H) continue;
    const T wy = dy ? ty : T(1) - ty;
    for (int dx = 0; dx < 2; ++dx) {
      const int64_t x = x0 + dx;
      if (x < 0 || x >= W) continue;
      ri[n] = y;
      rj[n] = x;
      rw[n] = wy * (dx ? tx : T(1) - tx);
      ++n;
    }
  }
  return n;
}

// The taps (source index into the H*W plane of z, weight) of output pixel (i, j); returns
// their number (<= kMaxTaps). See the derivation at the top of this file.
template <typename T>
C10_HOST_DEVICE inline int collect_taps(const Sample<T>& s, int64_t flags, bool align, int64_t H,
                                        int64_t W, int64_t i, int64_t j, int64_t* src, T* wt) {
  int64_t ai[4], aj[4];
  T aw[4];
  int na = 1;
  if (flags & kRotate) {  // output pixel -> corners on the scale output grid
    const T xn = base_coord<T>(j, W, align), yn = base_coord<T>(i, H, align);
    const T xs = s.cs * xn - s.sn * yn;
    const T ys = s.sn * xn + s.cs * yn;
    na = bilinear(unnormalize(ys, H, align), unnormalize(xs, W, align), H, W, ai, aj, aw);
  } else {
    ai[0] = i;
    aj[0] = j;
    aw[0] = T(1);
  }
  int n = 0;
  for (int a = 0; a < na; ++a) {
    int64_t bi[4], bj[4];
    T bw[4];
    int nb = 1;
    if (flags & kScale) {  // scale output pixel -> corners on the flip output grid
      const T xs = s.sx * base_coord<T>(aj[a], W, align);
      const T ys = s.sy * base_coord<T>(ai[a], H, align);
      nb = bilinear(unnormalize(ys, H, align), unnormalize(xs, W, align), H, W, bi, bj, bw);
    } else {
      bi[0] = ai[a];
      bj[0] = aj[a];
      bw[0] = T(1);
    }
    for (int b = 0; b < nb; ++b) {
      int64_t r = bi[b], c = bj[b];
      if ((flags & kFlip) && s.flip) c = W - 1 - c;
      if ((flags & kCutout) && r >= s.top && r < s.top + s.sh && c >= s.left &&
          c < s.left + s.sw)
        continue;
      if (flags & kCrop) {
        r += s.dh;
        c += s.dw;
        if (r < 0 || r >= H || c < 0 || c >= W) continue;
      }
      src[n] = r * W + c;
      wt[n] = (flags & kRotate) ? aw[a] * bw[b] : bw[b];
      ++n;
    }
  }
  return n;
}

}  // namespace dsa
}  // namespace pydistill
