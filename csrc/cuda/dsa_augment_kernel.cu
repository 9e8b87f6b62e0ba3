// CUDA kernels of dsa_apply_forward / dsa_apply_backward: TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m).
//
// Same math as the CPU kernels, from the same header (csrc/include/pydistill/dsa_taps.h):
//   S_c(p) = sum_k w_k x_c(s_k),  W(p) = sum_k w_k   (taps of crop/cutout/flip/scale/rotate)
//   y_c(p) = alpha S_c(p) + beta (1/C) sum_c' S_c'(p) + (b + (1 - k) mu) W(p)
//   dx_c(q) = sum_{p,k: s_k(p) = q} w_k(p) (alpha g_c(p) + beta (1/C) sum_c' g_c'(p))
//           + (1 - k)/(C H W) sum_p W(p) sum_c g_c(p)
//
// Layout: grid (ceil(H*W / 256), min(N, 65535)), blockIdx.y strides over the samples, so a
// block only ever holds pixels of one sample.
//   forward: (1) only with contrast: one block per sample sums x[n] (double, fixed-order block
//            reduction) -> mu[n]; (2) one thread per output pixel: taps, then the channels (a
//            first loop for the channel mean of S when saturation is present, a second that
//            writes). Deterministic.
//   backward: one thread per output pixel scatters w_k h_c into a compute-dtype buffer with
//            atomicAdd (the transpose of the gather; a gather formulation would need the inverse
//            of the two bilinear maps), and block-reduces W(p) sum_c g_c(p) into one double
//            atomicAdd per block; (3) a last elementwise pass adds the contrast term and casts.
//            The atomics make the float32 gradient's rounding order-dependent (not bitwise
//            reproducible run to run), as with grid_sample's own CUDA backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "pydistill/dsa_taps.h"
#include "pydistill/feature_checks.h"
#include "pydistill/block_sum.cuh"

namespace pydistill {
namespace {

using at::Tensor;
using dsa::kMaxTaps;
using dsa::kNumParams;
constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void dsa_mean_kernel(const scalar_t* __restrict__ x, at::opmath_type<scalar_t>* __restrict__ mu,
                                int64_t N, int64_t CHW) {
  __shared__ double shared[32];
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    double acc = 0.0;
    for (int64_t e = threadIdx.x; e < CHW; e += blockDim.x)
      acc += static_cast<double>(x[n * CHW + e]);
    acc = block_sum<double>(acc, shared);
    if (threadIdx.x == 0)
      mu[n] = static_cast<at::opmath_type<scalar_t>>(acc / static_cast<double>(CHW));
  }
}

template <typename scalar_t>
__global__ void dsa_forward_kernel(const scalar_t* __restrict__ x, const double* __restrict__ params,
                                   const at::opmath_type<scalar_t>* __restrict__ mu,
                                   scalar_t* __restrict__ y, int64_t N, int64_t C, int64_t H,
                                   int64_t W, int64_t flags, bool align) {
  using T = at::opmath_type<scalar_t>;
  const int64_t HW = H * W, CHW = C * HW;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= HW) return;
  const int64_t i = p / W, j = p % W;
  int64_t src[kMaxTaps];
  T wt[kMaxTaps];
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const auto s = dsa::load_sample<T>(params + n * kNumParams);
    const T gamma = s.bright + ((flags & dsa::kContrast) ? s.one_minus_k * mu[n] : T(0));
    const int nt = dsa::collect_taps<T>(s, flags, align, H, W, i, j, src, wt);
    T wsum = T(0);
    for (int k = 0; k < nt; ++k) wsum += wt[k];
    const scalar_t* xn = x + n * CHW;
    T sat = T(0);
    if (s.beta != T(0)) {
      T csum = T(0);
      for (int64_t c = 0; c < C; ++c) {
        T acc = T(0);
        for (int k = 0; k < nt; ++k) acc += wt[k] * static_cast<T>(xn[c * HW + src[k]]);
        csum += acc;
      }
      sat = s.beta * (csum / static_cast<T>(C));
    }
    const T off = gamma * wsum;
    for (int64_t c = 0; c < C; ++c) {
      T acc = T(0);
      for (int k = 0; k < nt; ++k) acc += wt[k] * static_cast<T>(xn[c * HW + src[k]]);
      y[n * CHW + c * HW + p] = static_cast<scalar_t>(s.alpha * acc + sat + off);
    }
  }
}

template <typename scalar_t>
__global__ void dsa_backward_scatter_kernel(const scalar_t* __restrict__ go,
                                            const double* __restrict__ params,
                                            at::opmath_type<scalar_t>* __restrict__ buf,
                                            double* __restrict__ G, int64_t N, int64_t C,
                                            int64_t H, int64_t W, int64_t flags, bool align) {
  using T = at::opmath_type<scalar_t>;
  __shared__ double shared[32];
  const int64_t HW = H * W, CHW = C * HW;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = p < HW;
  const int64_t i = active ? p / W : 0, j = active ? p % W : 0;
  int64_t src[kMaxTaps];
  T wt[kMaxTaps];
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    double contrib = 0.0;
    if (active) {
      const auto s = dsa::load_sample<T>(params + n * kNumParams);
      const int nt = dsa::collect_taps<T>(s, flags, align, H, W, i, j, src, wt);
      const scalar_t* gn = go + n * CHW;
      T gsum = T(0);
      for (int64_t c = 0; c < C; ++c) gsum += static_cast<T>(gn[c * HW + p]);
      if (flags & dsa::kContrast) {
        T wsum = T(0);
        for (int k = 0; k < nt; ++k) wsum += wt[k];
        contrib = static_cast<double>(wsum) * static_cast<double>(gsum);
      }
      const T sat = s.beta != T(0) ? s.beta * (gsum / static_cast<T>(C)) : T(0);
      T* bn = buf + n * CHW;
      for (int64_t c = 0; c < C && nt > 0; ++c) {
        const T h = s.alpha * static_cast<T>(gn[c * HW + p]) + sat;
        for (int k = 0; k < nt; ++k) atomicAdd(bn + c * HW + src[k], wt[k] * h);
      }
    }
    if (flags & dsa::kContrast) {  // uniform per block: every thread reaches the reduction
      const double tot = block_sum<double>(contrib, shared);
      if (threadIdx.x == 0) atomicAdd(G + n, tot);
    }
  }
}

template <typename scalar_t>
__global__ void dsa_backward_finish_kernel(const at::opmath_type<scalar_t>* __restrict__ buf,
                                           const double* __restrict__ G,
                                           const double* __restrict__ params,
                                           scalar_t* __restrict__ gx, int64_t N, int64_t CHW,
                                           bool contrast) {
  using T = at::opmath_type<scalar_t>;
  const int64_t total = N * CHW;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / CHW;
    T v = buf[e];
    if (contrast)
      v += static_cast<T>((1.0 - params[n * kNumParams + 2]) * G[n] / static_cast<double>(CHW));
    gx[e] = static_cast<scalar_t>(v);
  }
}

dim3 pixel_grid(int64_t N, int64_t HW) {
  return dim3(static_cast<unsigned>((HW + kThreads - 1) / kThreads),
              static_cast<unsigned>(std::min<int64_t>(N, 65535)));
}

Tensor dsa_apply_forward_cuda(const Tensor& x_in, const Tensor& params_in, int64_t flags,
                              bool align_corners) {
  check_dsa_apply_args(x_in, "x", params_in, flags);
  c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor params = params_in.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto op_dtype = at::toOpMathType(x.scalar_type());
  Tensor mu = at::zeros({N}, x.options().dtype(op_dtype));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsa_apply_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    if (flags & dsa::kContrast) {
      dsa_mean_kernel<scalar_t><<<static_cast<unsigned>(std::min<int64_t>(N, 65535)), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), mu.mutable_data_ptr<opmath_t>(), N, C * H * W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dsa_forward_kernel<scalar_t><<<pixel_grid(N, H * W), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), params.const_data_ptr<double>(), mu.const_data_ptr<opmath_t>(),
        y.mutable_data_ptr<scalar_t>(), N, C, H, W, flags, align_corners);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

Tensor dsa_apply_backward_cuda(const Tensor& grad_out, const Tensor& params_in, int64_t flags,
                               bool align_corners) {
  check_dsa_apply_args(grad_out, "grad_out", params_in, flags);
  c10::cuda::CUDAGuard guard(grad_out.device());
  const Tensor go = grad_out.contiguous();
  const Tensor params = params_in.contiguous();
  Tensor gx = at::empty_like(go, at::MemoryFormat::Contiguous);
  if (go.numel() == 0) return gx;
  const int64_t N = go.size(0), C = go.size(1), H = go.size(2), W = go.size(3);
  const auto op_dtype = at::toOpMathType(go.scalar_type());
  Tensor buf = at::zeros_like(go, go.options().dtype(op_dtype));
  Tensor G = at::zeros({N}, go.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "dsa_apply_bwd_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    dsa_backward_scatter_kernel<scalar_t><<<pixel_grid(N, H * W), kThreads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), params.const_data_ptr<double>(), buf.mutable_data_ptr<opmath_t>(),
        G.mutable_data_ptr<double>(), N, C, H, W, flags, align_corners);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = go.numel();
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
    dsa_backward_finish_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        buf.const_data_ptr<opmath_t>(), G.const_data_ptr<double>(), params.const_data_ptr<double>(),
        gx.mutable_data_ptr<scalar_t>(), N, C * H * W, (flags & dsa::kContrast) != 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m) {
  m.impl("dsa_apply_forward", &dsa_apply_forward_cuda);
  m.impl("dsa_apply_backward", &dsa_apply_backward_cuda);
}

}  // namespace pydistill
