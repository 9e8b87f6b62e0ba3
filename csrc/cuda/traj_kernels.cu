// CUDA kernels of the trajectory-matching ops: TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m).
//
// Same math and semantics as the CPU kernels (csrc/cpu/traj_kernels.cpp):
//   param_distance: d = theta - target, e = start - target, num = sum d^2, den = sum e^2,
//     L = num / den; backward grad_theta = a d, grad_start = b e, grad_target = -a d - b e with
//     per-problem coefficients a = 2 gL / den, b = -2 gL L / den + 2 gD (computed by the caller).
//   sgd_step_accumulate: theta' = fma(-lr, g, theta), G' = G + g, one pass; lr is read from
//     device memory by the kernel (no host sync).
//
// Deterministic two-stage reduction for param_distance (no atomics; the order depends on
// (K, P) only, never on the SM count or timing):
//   stage 1: grid (nb, K), one block of kThreads per chunk of kChunk elements of row k; thread t
//     adds elements t, t + kThreads, ... of its chunk in scalar_t (float32 for float32 input),
//     then a fixed shared-memory tree; the chunk's partial sums are written in float64.
//   stage 2: one block per row: thread t adds partials t, t + kThreads, ... in float64, then
//     the same fixed tree; thread 0 writes L = num / den and den.
// den = 0 is not checked (it would need a host sync): IEEE division, as the eager formula.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "pydistill/traj_checks.h"

namespace pydistill {
namespace {

using at::Tensor;
constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per stage-1 block

// fixed-order tree over kThreads values in shared memory (result in s[0])
template <typename T>
__device__ __forceinline__ void block_tree(T* s) {
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    __syncthreads();
    if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void pd_stage1(const scalar_t* __restrict__ x, const scalar_t* __restrict__ t,
                          const scalar_t* __restrict__ s, int64_t P, int64_t nb,
                          double* __restrict__ pn, double* __restrict__ pd) {
  __shared__ scalar_t sn[kThreads];
  __shared__ scalar_t sd[kThreads];
  const int64_t b = blockIdx.x, k = blockIdx.y;
  const int64_t lo = b * kChunk, hi = min(P, lo + kChunk);
  const int64_t row = k * P;
  scalar_t an = 0, ad = 0;
  for (int64_t j = lo + threadIdx.x; j < hi; j += kThreads) {
    const scalar_t tv = t[row + j];
    const scalar_t d = x[row + j] - tv, e = s[row + j] - tv;
    an = fma(d, d, an);
    ad = fma(e, e, ad);
  }
  sn[threadIdx.x] = an;
  sd[threadIdx.x] = ad;
  block_tree(sn);
  block_tree(sd);
  if (threadIdx.x == 0) {
    pn[k * nb + b] = static_cast<double>(sn[0]);
    pd[k * nb + b] = static_cast<double>(sd[0]);
  }
}

template <typename scalar_t>
__global__ void pd_stage2(const double* __restrict__ pn, const double* __restrict__ pd,
                          int64_t nb, scalar_t* __restrict__ loss, scalar_t* __restrict__ den) {
  __shared__ double sn[kThreads];
  __shared__ double sd[kThreads];
  const int64_t k = blockIdx.x;
  double an = 0.0, ad = 0.0;
  for (int64_t b = threadIdx.x; b < nb; b += kThreads) {
    an += pn[k * nb + b];
    ad += pd[k * nb + b];
  }
  sn[threadIdx.x] = an;
  sd[threadIdx.x] = ad;
  block_tree(sn);
  block_tree(sd);
  if (threadIdx.x == 0) {
    loss[k] = static_cast<scalar_t>(sn[0] / sd[0]);
    den[k] = static_cast<scalar_t>(sd[0]);
  }
}

std::tuple<Tensor, Tensor> param_distance_forward_cuda(const Tensor& theta, const Tensor& target,
                                                       const Tensor& start) {
  const ParamDistShape sh = check_param_distance_args(theta, target, start);
  c10::cuda::CUDAGuard guard(theta.device());
  const Tensor x = theta.contiguous(), t = target.contiguous(), s = start.contiguous();
  const auto out_shape = param_distance_out_shape(sh);
  Tensor loss = at::empty(out_shape, theta.options());
  Tensor den = at::empty(out_shape, theta.options());
  if (sh.K == 0) return {loss, den};
  const int64_t nb = (sh.P + kChunk - 1) / kChunk;
  TORCH_CHECK(sh.K <= 65535 && nb < (int64_t(1) << 31), "pydistill_ext: param_distance CUDA: "
              "at most 65535 rows, got K = ", sh.K);
  Tensor pn = at::empty({sh.K * nb}, theta.options().dtype(at::kDouble));
  Tensor pd = at::empty({sh.K * nb}, theta.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "param_distance_forward_cuda", [&] {
    pd_stage1<scalar_t><<<dim3(static_cast<unsigned>(nb), static_cast<unsigned>(sh.K)), kThreads,
                          0, stream>>>(x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                       s.const_data_ptr<scalar_t>(), sh.P, nb,
                                       pn.mutable_data_ptr<double>(), pd.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pd_stage2<scalar_t><<<static_cast<unsigned>(sh.K), kThreads, 0, stream>>>(
        pn.const_data_ptr<double>(), pd.const_data_ptr<double>(), nb,
        loss.mutable_data_ptr<scalar_t>(), den.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, den};
}

template <typename scalar_t>
__global__ void pd_backward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ t,
                                   const scalar_t* __restrict__ s, const scalar_t* __restrict__ a,
                                   const scalar_t* __restrict__ b, int64_t P, int64_t numel,
                                   scalar_t* __restrict__ gx, scalar_t* __restrict__ gt,
                                   scalar_t* __restrict__ gs) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const int64_t k = i / P;
    const scalar_t tv = t[i];
    const scalar_t gd = (gx || gt) ? a[k] * (x[i] - tv) : scalar_t(0);
    const scalar_t ge = (gs || gt) ? b[k] * (s[i] - tv) : scalar_t(0);
    if (gx) gx[i] = gd;
    if (gs) gs[i] = ge;
    if (gt) gt[i] = scalar_t(0) - gd - ge;
  }
}

int64_t elementwise_blocks(int64_t numel) {
  return std::max<int64_t>(1, std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535LL * 8));
}

std::tuple<Tensor, Tensor, Tensor> param_distance_backward_cuda(
    const Tensor& coef_theta, const Tensor& coef_start, const Tensor& theta, const Tensor& target,
    const Tensor& start, bool need_theta, bool need_target, bool need_start) {
  const ParamDistShape sh =
      check_param_distance_backward_args(coef_theta, coef_start, theta, target, start);
  c10::cuda::CUDAGuard guard(theta.device());
  const Tensor x = theta.contiguous(), t = target.contiguous(), s = start.contiguous();
  const Tensor a = coef_theta.contiguous(), b = coef_start.contiguous();
  auto out = [&](bool need) {
    return need ? at::empty(theta.sizes(), theta.options()) : at::empty({0}, theta.options());
  };
  Tensor gx = out(need_theta), gt = out(need_target), gs = out(need_start);
  const int64_t numel = sh.K * sh.P;
  if (!(need_theta || need_target || need_start) || numel == 0) return {gx, gt, gs};
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "param_distance_backward_cuda", [&] {
    pd_backward_kernel<scalar_t><<<static_cast<unsigned>(elementwise_blocks(numel)), kThreads, 0,
                                   at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), sh.P, numel,
        need_theta ? gx.mutable_data_ptr<scalar_t>() : nullptr,
        need_target ? gt.mutable_data_ptr<scalar_t>() : nullptr,
        need_start ? gs.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gt, gs};
}

template <typename scalar_t>
__global__ void sgd_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                const scalar_t* __restrict__ lr, const scalar_t* __restrict__ G,
                                int64_t numel, scalar_t* __restrict__ xo,
                                scalar_t* __restrict__ Go) {
  const scalar_t neg_lr = -lr[0];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const scalar_t gv = g[i];
    xo[i] = fma(neg_lr, gv, x[i]);
    Go[i] = G[i] + gv;
  }
}

std::tuple<Tensor, Tensor> sgd_step_accumulate_cuda(const Tensor& theta, const Tensor& grad,
                                                    const Tensor& lr, const Tensor& grad_sum) {
  check_sgd_step_args(theta, grad, lr, grad_sum);
  c10::cuda::CUDAGuard guard(theta.device());
  const Tensor x = theta.contiguous(), g = grad.contiguous(), G = grad_sum.contiguous();
  Tensor x_out = at::empty(theta.sizes(), theta.options());
  Tensor G_out = at::empty(theta.sizes(), theta.options());
  const int64_t numel = theta.numel();
  if (numel == 0) return {x_out, G_out};
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "sgd_step_accumulate_cuda", [&] {
    sgd_step_kernel<scalar_t><<<static_cast<unsigned>(elementwise_blocks(numel)), kThreads, 0,
                                at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), lr.const_data_ptr<scalar_t>(),
        G.const_data_ptr<scalar_t>(), numel, x_out.mutable_data_ptr<scalar_t>(),
        G_out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_out, G_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m) {
  m.impl("param_distance_forward", &param_distance_forward_cuda);
  m.impl("param_distance_backward", &param_distance_backward_cuda);
  m.impl("sgd_step_accumulate", &sgd_step_accumulate_cuda);
}

}  // namespace pydistill
