// CUDA kernels of gradient_match_forward / gradient_match_backward:
// TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m).
//
// Same plan and math as the CPU kernels (csrc/include/pydistill/gradient_match.h): all rows of
// all tensors of the two lists are numbered consecutively and one launch covers them.
// Per-tensor metadata (row offsets, row widths, sizes and the data pointers of a, b and the
// gradient buffers) is packed into one int64 array, copied to the device once per call
// (pinned memory, asynchronous); a CTA (256 threads, grid-stride over rows) finds its row's
// tensor by binary search over the row offsets.
//   forward:  per row (dot, |a|^2, |b|^2) or (sum (a-b)^2, 0, 0), block reductions by warp
//             shuffles + one shared-memory round (fixed order: deterministic); the closing
//             sums run as torch ops on the [R, 3] statistics (gradient_match_loss).
//   backward: per row g_a = c_aa a + c_ab b, g_b = c_ba a + c_bb b with the coefficients
//             [R, 4] from gradient_match_coefficients; one read of a and b, one write per
//             differentiated side. No host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "pydistill/gradient_match.h"
#include "pydistill/block_sum.cuh"

namespace pydistill {
namespace {

using at::Tensor;
constexpr int kThreads = 256;

// meta layout (int64): row_offset[T + 1], width[T], numel[T], a[T], b[T], ga[T], gb[T]
struct Meta {
  const int64_t* m;
  int64_t T;
  __device__ int64_t row_offset(int64_t i) const { return m[i]; }
  __device__ int64_t width(int64_t i) const { return m[T + 1 + i]; }
  __device__ int64_t numel(int64_t i) const { return m[2 * T + 1 + i]; }
  __device__ int64_t ptr(int which, int64_t i) const { return m[(3 + which) * T + 1 + i]; }
  __device__ int64_t find(int64_t r) const {  // largest t with row_offset[t] <= r
    int64_t lo = 0, hi = T - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (m[mid] <= r) lo = mid; else hi = mid - 1;
    }
    return lo;
  }
};

template <typename scalar_t>
__global__ void match_stats_kernel(Meta meta, int64_t R, bool mse, at::opmath_type<scalar_t>* st) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t shared[32];
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int64_t t = meta.find(r);
    const int64_t start = (r - meta.row_offset(t)) * meta.width(t);
    const int64_t len = min(meta.width(t), meta.numel(t) - start);
    const scalar_t* x = reinterpret_cast<const scalar_t*>(meta.ptr(0, t)) + start;
    const scalar_t* y = reinterpret_cast<const scalar_t*>(meta.ptr(1, t)) + start;
    opmath_t s0 = 0, s1 = 0, s2 = 0;
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
      const opmath_t xa = static_cast<opmath_t>(x[j]), yb = static_cast<opmath_t>(y[j]);
      if (mse) {
        s0 += (xa - yb) * (xa - yb);
      } else {
        s0 += xa * yb;
        s1 += xa * xa;
        s2 += yb * yb;
      }
    }
    s0 = block_sum(s0, shared);
    s1 = block_sum(s1, shared);
    s2 = block_sum(s2, shared);
    if (threadIdx.x == 0) {
      st[3 * r] = s0;
      st[3 * r + 1] = s1;
      st[3 * r + 2] = s2;
    }
  }
}

template <typename scalar_t>
__global__ void match_grad_kernel(Meta meta, int64_t R, const at::opmath_type<scalar_t>* coef,
                                  bool need_a, bool need_b) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int64_t t = meta.find(r);
    const int64_t start = (r - meta.row_offset(t)) * meta.width(t);
    const int64_t len = min(meta.width(t), meta.numel(t) - start);
    const scalar_t* x = reinterpret_cast<const scalar_t*>(meta.ptr(0, t)) + start;
    const scalar_t* y = reinterpret_cast<const scalar_t*>(meta.ptr(1, t)) + start;
    scalar_t* gx = need_a ? reinterpret_cast<scalar_t*>(meta.ptr(2, t)) + start : nullptr;
    scalar_t* gy = need_b ? reinterpret_cast<scalar_t*>(meta.ptr(3, t)) + start : nullptr;
    const opmath_t caa = coef[4 * r], cab = coef[4 * r + 1], cba = coef[4 * r + 2], cbb = coef[4 * r + 3];
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
      const opmath_t xa = static_cast<opmath_t>(x[j]), yb = static_cast<opmath_t>(y[j]);
      if (gx) gx[j] = static_cast<scalar_t>(caa * xa + cab * yb);
      if (gy) gy[j] = static_cast<scalar_t>(cba * xa + cbb * yb);
    }
  }
}

// The int64 metadata on the device (pinned host buffer, asynchronous copy on the current stream).
Tensor device_meta(const MatchPlan& plan, const std::vector<Tensor>& a, const std::vector<Tensor>& b,
                   const std::vector<Tensor>& ga, const std::vector<Tensor>& gb, at::Device dev) {
  const int64_t T = static_cast<int64_t>(a.size());
  Tensor host = at::empty({7 * T + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* m = host.data_ptr<int64_t>();
  for (int64_t i = 0; i <= T; ++i) m[i] = plan.row_offset[i];
  for (int64_t i = 0; i < T; ++i) {
    m[T + 1 + i] = plan.width[i];
    m[2 * T + 1 + i] = plan.numel[i];
    m[3 * T + 1 + i] = reinterpret_cast<int64_t>(a[i].const_data_ptr());
    m[4 * T + 1 + i] = reinterpret_cast<int64_t>(b[i].const_data_ptr());
    m[5 * T + 1 + i] = ga.empty() ? 0 : reinterpret_cast<int64_t>(ga[i].data_ptr());
    m[6 * T + 1 + i] = gb.empty() ? 0 : reinterpret_cast<int64_t>(gb[i].data_ptr());
  }
  return host.to(dev, /*non_blocking=*/true);
}

std::vector<Tensor> contiguous_all(at::TensorList ts) {
  std::vector<Tensor> out;
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

unsigned grid_for(int64_t R) { return static_cast<unsigned>(std::min<int64_t>(R, 1 << 20)); }

std::tuple<Tensor, Tensor> gradient_match_forward_cuda(at::TensorList grads_a, at::TensorList grads_b,
                                                       std::string_view metric) {
  const MatchPlan plan = plan_gradient_match(grads_a, grads_b, metric);
  c10::cuda::CUDAGuard guard(grads_a[0].device());
  const auto dtype = grads_a[0].scalar_type();
  const auto a = contiguous_all(grads_a), b = contiguous_all(grads_b);
  const int64_t R = plan.rows();
  Tensor stats = at::zeros({R, 3}, a[0].options().dtype(at::toOpMathType(dtype)));
  if (R > 0) {
    const Tensor meta = device_meta(plan, a, b, {}, {}, a[0].device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradient_match_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      match_stats_kernel<scalar_t><<<grid_for(R), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          Meta{meta.const_data_ptr<int64_t>(), static_cast<int64_t>(a.size())}, R,
          plan.metric == MatchMetric::Mse, stats.mutable_data_ptr<opmath_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {gradient_match_loss(stats, plan.metric, dtype), stats};
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>> gradient_match_backward_cuda(
    const Tensor& grad, at::TensorList grads_a, at::TensorList grads_b, const Tensor& row_stats,
    std::string_view metric, bool need_a, bool need_b) {
  const MatchPlan plan = plan_gradient_match(grads_a, grads_b, metric);
  const auto dtype = grads_a[0].scalar_type();
  check_gradient_match_backward_args(grad, grads_a[0], row_stats, plan.rows());
  c10::cuda::CUDAGuard guard(grads_a[0].device());
  const auto a = contiguous_all(grads_a), b = contiguous_all(grads_b);
  std::vector<Tensor> ga = need_a ? gradient_match_grad_buffers(a, plan) : std::vector<Tensor>{};
  std::vector<Tensor> gb = need_b ? gradient_match_grad_buffers(b, plan) : std::vector<Tensor>{};
  const int64_t R = plan.rows();
  if ((!need_a && !need_b) || R == 0) return {ga, gb};
  const Tensor coef = gradient_match_coefficients(grad, row_stats.contiguous(), plan.metric);
  const Tensor meta = device_meta(plan, a, b, ga, gb, a[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradient_match_bwd_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    match_grad_kernel<scalar_t><<<grid_for(R), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        Meta{meta.const_data_ptr<int64_t>(), static_cast<int64_t>(a.size())}, R,
        coef.const_data_ptr<opmath_t>(), need_a, need_b);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m) {
  m.impl("gradient_match_forward", &gradient_match_forward_cuda);
  m.impl("gradient_match_backward", &gradient_match_backward_cuda);
}

}  // namespace pydistill
