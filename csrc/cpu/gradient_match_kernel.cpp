// CPU kernels of gradient_match_forward / gradient_match_backward:
// TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m).
//
// The closing sums and the per-row coefficients use the scalar host forms in
// gradient_match.h (a serial loop over the R rows: no small torch ops per call).
// Math and row plan in csrc/include/pydistill/gradient_match.h: the forward computes per
// packed row (dot, |a|^2, |b|^2) (ours, cos) or (sum (a-b)^2, 0, 0) (mse), the backward writes
// every gradient row as a linear combination g_a = c_aa a + c_ab b, g_b = c_ba a + c_bb b of
// the input rows with per-row coefficients. One at::parallel_for over all rows of all
// tensors (a row finds its tensor by binary search in the row offsets); per-row sums in the
// compute dtype (float for float32/half/bf16, double for float64) with at::vec lanes, so
// the result is the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "pydistill/gradient_match.h"

namespace pydistill {
namespace {

using at::Tensor;

struct RowRef {
  int64_t t, start, len;
};

inline RowRef locate(const MatchPlan& plan, int64_t r) {
  const auto it = std::upper_bound(plan.row_offset.begin(), plan.row_offset.end(), r);
  const int64_t t = static_cast<int64_t>(it - plan.row_offset.begin()) - 1;
  const int64_t start = (r - plan.row_offset[t]) * plan.width[t];
  return {t, start, std::min(plan.width[t], plan.numel[t] - start)};
}

template <typename T>
inline T lane_sum(const at::vec::Vectorized<T>& v) {
  alignas(64) T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T s = 0;
  for (int i = 0; i < at::vec::Vectorized<T>::size(); ++i) s += lanes[i];
  return s;
}

int64_t grain(const MatchPlan& plan) {
  int64_t total = 0;
  for (auto n : plan.numel) total += n;
  const int64_t avg = std::max<int64_t>(1, total / std::max<int64_t>(plan.rows(), 1));
  return std::max<int64_t>(1, 16384 / avg);
}

template <typename scalar_t>
void stats_rows(const std::vector<const scalar_t*>& a, const std::vector<const scalar_t*>& b,
                const MatchPlan& plan, at::opmath_type<scalar_t>* st) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const bool mse = plan.metric == MatchMetric::Mse;
  at::parallel_for(0, plan.rows(), grain(plan), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const RowRef ref = locate(plan, r);
      const scalar_t* x = a[ref.t] + ref.start;
      const scalar_t* y = b[ref.t] + ref.start;
      Vec v0(0), v1(0), v2(0);
      int64_t j = 0;
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        for (; j + Vec::size() <= ref.len; j += Vec::size()) {
          const Vec xa = Vec::loadu(x + j), yb = Vec::loadu(y + j);
          if (mse) {
            const Vec d = xa - yb;
            v0 = at::vec::fmadd(d, d, v0);
          } else {
            v0 = at::vec::fmadd(xa, yb, v0);
            v1 = at::vec::fmadd(xa, xa, v1);
            v2 = at::vec::fmadd(yb, yb, v2);
          }
        }
      }
      opmath_t s0 = lane_sum(v0), s1 = lane_sum(v1), s2 = lane_sum(v2);
      for (; j < ref.len; ++j) {
        const opmath_t xa = static_cast<opmath_t>(x[j]), yb = static_cast<opmath_t>(y[j]);
        if (mse) {
          s0 += (xa - yb) * (xa - yb);
        } else {
          s0 += xa * yb;
          s1 += xa * xa;
          s2 += yb * yb;
        }
      }
      st[3 * r] = s0;
      st[3 * r + 1] = s1;
      st[3 * r + 2] = s2;
    }
  });
}

template <typename scalar_t>
void grad_rows(const std::vector<const scalar_t*>& a, const std::vector<const scalar_t*>& b,
               const std::vector<scalar_t*>& ga, const std::vector<scalar_t*>& gb,
               const MatchPlan& plan, const at::opmath_type<scalar_t>* st,
               at::opmath_type<scalar_t> g) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  // cos: one set of coefficients from the totals (summed in row order)
  opmath_t tot[3] = {0, 0, 0};
  if (plan.metric == MatchMetric::Cos)
    for (int64_t r = 0; r < plan.rows(); ++r)
      for (int i = 0; i < 3; ++i) tot[i] += st[3 * r + i];
  at::parallel_for(0, plan.rows(), grain(plan), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const RowRef ref = locate(plan, r);
      const scalar_t* x = a[ref.t] + ref.start;
      const scalar_t* y = b[ref.t] + ref.start;
      const opmath_t* s = plan.metric == MatchMetric::Cos ? tot : st + 3 * r;
      opmath_t coef[4];
      gradient_match_row_coefficients<opmath_t>(s[0], s[1], s[2], g, plan.metric, coef);
      scalar_t* gx = ga.empty() ? nullptr : ga[ref.t] + ref.start;
      scalar_t* gy = gb.empty() ? nullptr : gb[ref.t] + ref.start;
      const opmath_t caa = coef[0], cab = coef[1], cba = coef[2], cbb = coef[3];
      int64_t j = 0;
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        for (; j + Vec::size() <= ref.len; j += Vec::size()) {
          const Vec xa = Vec::loadu(x + j), yb = Vec::loadu(y + j);
          if (gx) (Vec(caa) * xa + Vec(cab) * yb).store(gx + j);
          if (gy) (Vec(cba) * xa + Vec(cbb) * yb).store(gy + j);
        }
      }
      for (; j < ref.len; ++j) {
        const opmath_t xa = static_cast<opmath_t>(x[j]), yb = static_cast<opmath_t>(y[j]);
        if (gx) gx[j] = static_cast<scalar_t>(caa * xa + cab * yb);
        if (gy) gy[j] = static_cast<scalar_t>(cba * xa + cbb * yb);
      }
    }
  });
}

template <typename T>
std::vector<const T*> ptrs(const std::vector<Tensor>& ts) {
  std::vector<const T*> out;
  for (const auto& t : ts) out.push_back(t.const_data_ptr<T>());
  return out;
}

std::vector<Tensor> contiguous_all(at::TensorList ts) {
  std::vector<Tensor> out;
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

std::tuple<Tensor, Tensor> gradient_match_forward_cpu(at::TensorList grads_a, at::TensorList grads_b,
                                                      std::string_view metric) {
  const MatchPlan plan = plan_gradient_match(grads_a, grads_b, metric);
  const auto dtype = grads_a[0].scalar_type();
  const auto a = contiguous_all(grads_a), b = contiguous_all(grads_b);
  Tensor stats = at::zeros({plan.rows(), 3}, a[0].options().dtype(at::toOpMathType(dtype)));
  Tensor loss = at::empty({}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradient_match_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    stats_rows<scalar_t>(ptrs<scalar_t>(a), ptrs<scalar_t>(b), plan, stats.mutable_data_ptr<opmath_t>());
    *loss.mutable_data_ptr<opmath_t>() =
        gradient_match_loss_host<opmath_t>(stats.const_data_ptr<opmath_t>(), plan.rows(), plan.metric);
  });
  return {loss.to(dtype), stats};
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>> gradient_match_backward_cpu(
    const Tensor& grad, at::TensorList grads_a, at::TensorList grads_b, const Tensor& row_stats,
    std::string_view metric, bool need_a, bool need_b) {
  const MatchPlan plan = plan_gradient_match(grads_a, grads_b, metric);
  const auto dtype = grads_a[0].scalar_type();
  check_gradient_match_backward_args(grad, grads_a[0], row_stats, plan.rows());
  const auto a = contiguous_all(grads_a), b = contiguous_all(grads_b);
  std::vector<Tensor> ga = need_a ? gradient_match_grad_buffers(a, plan) : std::vector<Tensor>{};
  std::vector<Tensor> gb = need_b ? gradient_match_grad_buffers(b, plan) : std::vector<Tensor>{};
  if (!need_a && !need_b) return {ga, gb};
  const Tensor st = row_stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradient_match_bwd_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<scalar_t*> pa, pb;
    for (auto& t : ga) pa.push_back(t.mutable_data_ptr<scalar_t>());
    for (auto& t : gb) pb.push_back(t.mutable_data_ptr<scalar_t>());
    grad_rows<scalar_t>(ptrs<scalar_t>(a), ptrs<scalar_t>(b), pa, pb, plan, st.const_data_ptr<opmath_t>(),
                        grad.item<opmath_t>());
  });
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m) {
  m.impl("gradient_match_forward", &gradient_match_forward_cpu);
  m.impl("gradient_match_backward", &gradient_match_backward_cpu);
}

}  // namespace pydistill
