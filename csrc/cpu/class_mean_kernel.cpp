// CPU kernel of class_mean_forward: TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m).
//
// Math. For features x [N, D] and labels y [N] in [0, K):
//   n_k        = |{i : y_i = k}|
//   mean[k, d] = (1 / n_k) * sum_{i : y_i = k} x[i, d]      (mean[k, :] = 0 when n_k = 0)
// The backward is the gather d mean[k, d] / d x[i, d] = [y_i = k] / n_k, i.e.
//   grad_x[i] = grad_mean[y_i] / n_{y_i}
// and is composed in Python (pydistill_ext/ops/class_mean.py) from the counts returned here.
//
// Passes.
//   1. serial over the N labels: range check (raises before any feature is read) and n_k.
//   2. one pass over the rows, parallel over column tiles: a worker owns columns [d0, d1),
//      walks every row in index order and adds x[i, d0:d1] into acc[y_i, d0:d1] (compute
//      dtype: float for float32/float16/bfloat16, double for float64), then scales by 1/n_k
//      and stores. No two workers write the same column and each column is summed in row
//      order, so the result is bitwise the same for any thread count (no atomics).
// Parallelism is over columns only: D = 1 with large N runs on one thread (the whole op is
// then N adds).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "pydistill/feature_checks.h"

namespace pydistill {
namespace {

using at::Tensor;
constexpr int64_t kTile = 256;  // columns per accumulator tile (K * 256 compute-type values)

template <typename scalar_t>
void class_mean_rows(const scalar_t* x, const int64_t* y, const int64_t* counts, scalar_t* out,
                     int64_t N, int64_t D, int64_t K) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(N, 1));
  at::parallel_for(0, D, grain, [&](int64_t c0, int64_t c1) {
    std::vector<opmath_t> acc(static_cast<size_t>(K * std::min(kTile, c1 - c0)));
    for (int64_t d0 = c0; d0 < c1; d0 += kTile) {
      const int64_t w = std::min(kTile, c1 - d0);
      std::fill(acc.begin(), acc.end(), opmath_t(0));
      for (int64_t i = 0; i < N; ++i) {
        opmath_t* a = acc.data() + y[i] * w;
        const scalar_t* xr = x + i * D + d0;
        int64_t j = 0;
        if constexpr (std::is_same_v<scalar_t, opmath_t>) {
          for (; j + Vec::size() <= w; j += Vec::size())
            (Vec::loadu(a + j) + Vec::loadu(xr + j)).store(a + j);
        }
        for (; j < w; ++j) a[j] += static_cast<opmath_t>(xr[j]);
      }
      for (int64_t k = 0; k < K; ++k) {
        const opmath_t inv = counts[k] > 0 ? opmath_t(1) / static_cast<opmath_t>(counts[k])
                                           : opmath_t(0);
        const opmath_t* a = acc.data() + k * w;
        scalar_t* o = out + k * D + d0;
        for (int64_t j = 0; j < w; ++j) o[j] = static_cast<scalar_t>(a[j] * inv);
      }
    }
  });
}

std::tuple<Tensor, Tensor> class_mean_forward_cpu(const Tensor& features, const Tensor& labels,
                                                  int64_t num_classes) {
  check_class_mean_args(features, labels, num_classes);
  const Tensor x = features.contiguous();
  const Tensor y = labels.contiguous();
  const int64_t N = x.size(0), D = x.size(1), K = num_classes;
  Tensor counts = at::zeros({K}, y.options());
  const int64_t* yp = y.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t k = yp[i];
    TORCH_CHECK(k >= 0 && k < K, "pydistill_ext: labels[", i, "] = ", k,
                " is out of range for num_classes = ", K);
    ++cp[k];
  }
  Tensor out = at::zeros({K, D}, x.options());
  if (N == 0 || D == 0 || K == 0) return {out, counts};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_mean_cpu", [&] {
    class_mean_rows<scalar_t>(x.const_data_ptr<scalar_t>(), yp, cp, out.mutable_data_ptr<scalar_t>(),
                              N, D, K);
  });
  return {out, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m) {
  m.impl("class_mean_forward", &class_mean_forward_cpu);
}

}  // namespace pydistill
