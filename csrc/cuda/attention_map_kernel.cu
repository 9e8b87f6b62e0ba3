// CUDA kernels of attention_map_forward / attention_map_backward:
// TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m).
//
// Same math and semantics as the CPU kernels (derivation in
// csrc/cpu/attention_map_kernel.cpp):
//   a_s = sum_c |x_cs|^p,  r = ||a||_2,  out_s = a_s / max(r, eps)
//   dL/da = (g - out <out, g>) / r  (r >= eps)  or  g / eps  (r < eps)
//   dL/dx_cs = dL/da_s * p |x_cs|^(p-2) x_cs,  0 at x_cs = 0.
//
// Layout: one CTA of 256 threads per sample (grid-stride over samples). Threads stride over
// the spatial index s (coalesced: consecutive s are consecutive addresses for every channel),
// each sums its columns over the channels; the spatial row a [N, H*W] (compute dtype: float;
// double for float64) is an output of the forward, kept for the backward. The block
// reductions (sum a^2; <a, g>) are warp shuffles + one shared-memory round in a fixed order:
// deterministic. Forward reads x once; backward reads x once (+ a, g) and writes the gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "pydistill/feature_checks.h"
#include "pydistill/block_sum.cuh"

namespace pydistill {
namespace {

using at::Tensor;
constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T abs_pow(T x, T p, int mode) {
  const T v = x < T(0) ? -x : x;
  switch (mode) {
    case 1: return v;
    case 2: return v * v;
    case 4: return (v * v) * (v * v);
    default: return v == T(0) ? T(0) : ::pow(v, p);
  }
}

// p |x|^(p-2) x, 0 at x = 0
template <typename T>
__device__ __forceinline__ T abs_pow_grad(T x, T p, int mode) {
  switch (mode) {
    case 1: return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
    case 2: return T(2) * x;
    case 4: return T(4) * x * x * x;
    default: return x == T(0) ? T(0) : p * ::pow(x < T(0) ? -x : x, p - T(2)) * x;
  }
}

template <typename scalar_t>
__global__ void attention_map_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                         at::opmath_type<scalar_t>* __restrict__ work, int64_t N,
                                         int64_t C, int64_t S, at::opmath_type<scalar_t> p, int mode,
                                         at::opmath_type<scalar_t> eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t shared[32];
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const scalar_t* xn = x + n * C * S;
    opmath_t* an = work + n * S;
    opmath_t ss = 0;
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      opmath_t a = 0;
      for (int64_t c = 0; c < C; ++c) a += abs_pow(static_cast<opmath_t>(xn[c * S + s]), p, mode);
      an[s] = a;
      ss += a * a;
    }
    const opmath_t r = ::sqrt(block_sum(ss, shared));
    const opmath_t inv = opmath_t(1) / (r > eps ? r : eps);
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x)
      out[n * S + s] = static_cast<scalar_t>(an[s] * inv);
  }
}

template <typename scalar_t>
__global__ void attention_map_bwd_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                         const at::opmath_type<scalar_t>* __restrict__ a_in,
                                         scalar_t* __restrict__ gx,
                                         at::opmath_type<scalar_t>* __restrict__ work, int64_t N,
                                         int64_t C, int64_t S, at::opmath_type<scalar_t> p, int mode,
                                         at::opmath_type<scalar_t> eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t shared[32];
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const scalar_t* xn = x + n * C * S;
    const scalar_t* gn = go + n * S;
    opmath_t* an = work + n * S;
    opmath_t dot = 0, ss = 0;  // <a, g>, |a|^2
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      const opmath_t a = a_in[n * S + s];
      dot += a * static_cast<opmath_t>(gn[s]);
      ss += a * a;
    }
    dot = block_sum(dot, shared);
    const opmath_t r = ::sqrt(block_sum(ss, shared));  // the forward's norm (same order)
    const bool proj = r >= eps;
    const opmath_t inv = opmath_t(1) / (proj ? r : eps);
    const opmath_t dot_hat = dot * inv;  // <out, g>
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      const opmath_t g = static_cast<opmath_t>(gn[s]);
      an[s] = proj ? (g - a_in[n * S + s] * inv * dot_hat) * inv : g * inv;  // dL/da_s
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < C * S; i += blockDim.x) {
      const int64_t s = i % S;
      gx[n * C * S + i] =
          static_cast<scalar_t>(an[s] * abs_pow_grad(static_cast<opmath_t>(xn[i]), p, mode));
    }
    __syncthreads();
  }
}

int mode_of(double p) { return p == 1.0 ? 1 : (p == 2.0 ? 2 : (p == 4.0 ? 4 : 0)); }

unsigned blocks_for(int64_t N) {
  return static_cast<unsigned>(std::min<int64_t>(N, 65535));
}

std::tuple<Tensor, Tensor> attention_map_forward_cuda(const Tensor& features, double p, double eps) {
  check_attention_map_args(features, p, eps);
  c10::cuda::CUDAGuard guard(features.device());
  const Tensor x = features.contiguous();
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2) * x.size(3);
  const auto op_dtype = at::toOpMathType(x.scalar_type());
  Tensor out = at::empty({N, S}, x.options());
  Tensor a = at::empty({N, S}, x.options().dtype(op_dtype));
  if (N == 0) return {out, a};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_map_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    attention_map_fwd_kernel<scalar_t><<<blocks_for(N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), a.mutable_data_ptr<opmath_t>(),
        N, C, S, static_cast<opmath_t>(p), mode_of(p), static_cast<opmath_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, a};
}

Tensor attention_map_backward_cuda(const Tensor& grad_out, const Tensor& features, const Tensor& a,
                                   double p, double eps) {
  check_attention_map_backward_args(grad_out, features, a, p, eps);
  const int64_t N = features.size(0), C = features.size(1);
  const int64_t S = features.size(2) * features.size(3);
  const auto op_dtype = at::toOpMathType(features.scalar_type());
  c10::cuda::CUDAGuard guard(features.device());
  const Tensor x = features.contiguous();
  const Tensor g = grad_out.to(x.scalar_type()).contiguous();
  const Tensor a_c = a.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return gx;
  Tensor work = at::empty({N, S}, x.options().dtype(op_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_map_bwd_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    attention_map_bwd_kernel<scalar_t><<<blocks_for(N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), a_c.const_data_ptr<opmath_t>(),
        gx.mutable_data_ptr<scalar_t>(), work.mutable_data_ptr<opmath_t>(), N, C, S,
        static_cast<opmath_t>(p), mode_of(p), static_cast<opmath_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m) {
  m.impl("attention_map_forward", &attention_map_forward_cuda);
  m.impl("attention_map_backward", &attention_map_backward_cuda);
}

}  // namespace pydistill
