// CUDA kernel of class_mean_forward: TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m).
//
// Same math and semantics as the CPU kernel (csrc/cpu/class_mean_kernel.cpp):
//   mean[k, d] = (1 / n_k) * sum_{i : y_i = k} x[i, d],  mean[k, :] = 0 when n_k = 0.
//
// Deterministic scheme (no floating-point atomics): the rows are grouped by class with a
// stable sort of the labels (perm = row indices in class order, ties in row order), the class
// segments come from searchsorted(sorted_labels, 0..K) (offsets [K + 1], counts = diff). Then
// one launch: block (column tile, class k), one thread per column, each thread sums its
// column over the class's rows in row order. Every feature element is read once; the sum
// order is fixed, so results are bitwise reproducible. Parallelism is K * ceil(D / 256)
// blocks (DM's 10 classes x 2048 dims: 80 blocks of 256 threads).
//
// Labels out of [0, num_classes) are caught without a host synchronisation by an
// asynchronous device assert on the smallest / largest sorted label (as torch's index ops,
// it surfaces at the next synchronisation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "pydistill/feature_checks.h"

namespace pydistill {
namespace {

using at::Tensor;
constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void class_mean_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ perm,
                                  const int64_t* __restrict__ offsets, scalar_t* __restrict__ out,
                                  int64_t D, int64_t K) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  for (int64_t k = blockIdx.y; k < K; k += gridDim.y) {
    const int64_t begin = offsets[k], end = offsets[k + 1];
    opmath_t acc = opmath_t(0);
    int64_t i = begin;
    for (; i + 4 <= end; i += 4) {  // four independent loads in flight, added in row order
      const opmath_t v0 = static_cast<opmath_t>(x[perm[i] * D + d]);
      const opmath_t v1 = static_cast<opmath_t>(x[perm[i + 1] * D + d]);
      const opmath_t v2 = static_cast<opmath_t>(x[perm[i + 2] * D + d]);
      const opmath_t v3 = static_cast<opmath_t>(x[perm[i + 3] * D + d]);
      acc += v0;
      acc += v1;
      acc += v2;
      acc += v3;
    }
    for (; i < end; ++i) acc += static_cast<opmath_t>(x[perm[i] * D + d]);
    const int64_t n = end - begin;
    out[k * D + d] = static_cast<scalar_t>(n > 0 ? acc / static_cast<opmath_t>(n) : opmath_t(0));
  }
}

std::tuple<Tensor, Tensor> class_mean_forward_cuda(const Tensor& features, const Tensor& labels,
                                                   int64_t num_classes) {
  check_class_mean_args(features, labels, num_classes);
  c10::cuda::CUDAGuard guard(features.device());
  const Tensor x = features.contiguous();
  const int64_t N = x.size(0), D = x.size(1), K = num_classes;
  Tensor out = at::zeros({K, D}, x.options());
  if (N == 0) return {out, at::zeros({K}, labels.options())};
  auto [sorted, perm] = at::sort(labels.contiguous(), /*stable=*/true, 0, false);
  at::_assert_async(at::logical_and(sorted.select(0, 0) >= 0, sorted.select(0, N - 1) < K),
                    "pydistill_ext: labels out of range [0, num_classes)");
  const Tensor offsets = at::searchsorted(sorted, at::arange(K + 1, labels.options()));
  Tensor counts = offsets.slice(0, 1) - offsets.slice(0, 0, K);
  if (D == 0 || K == 0) return {out, counts};
  const dim3 grid(static_cast<unsigned>((D + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min<int64_t>(K, 65535)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_mean_cuda", [&] {
    class_mean_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), perm.const_data_ptr<int64_t>(),
        offsets.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), D, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CUDA, m) {
  m.impl("class_mean_forward", &class_mean_forward_cuda);
}

}  // namespace pydistill
