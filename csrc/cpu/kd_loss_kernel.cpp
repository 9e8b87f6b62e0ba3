// CPU kernels of kd_loss_forward and kd_loss_topk_forward.
//
// Row-parallel (at::parallel_for over rows); each row is evaluated by
// pydistill::cpu::divergence_row (math derived in kd_row_cpu.h) in the compute type
// (float for float32/float16/bfloat16, double for float64). The gradient w.r.t. the logits
// is produced in the same call as the loss when asked for, so the autograd backward only
// scales it by the incoming per-row gradient.
//
// kd_loss_topk_forward: the teacher row is rebuilt in scratch as logits that are -inf off
// the K given entries, so that its softmax is the softmax over the K given logits, and the
// dense row kernel runs unchanged; the teacher gradient is gathered back to [.., K].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>
#include <string_view>
#include <vector>

#include "pydistill/checks.h"
#include "pydistill/cpu_memory.h"
#include "pydistill/divergence.h"
#include "pydistill/kd_row_cpu.h"

namespace pydistill {
namespace {

using at::Tensor;

constexpr int64_t kPad = 64;  // scratch padding: whole-vector loads past the row end

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// The optional per-row statistics given to a backward: [rows, kStats] of the compute dtype.
Tensor checked_stats(const std::optional<Tensor>& stats, const Tensor& ref, int64_t rows,
                     at::ScalarType op_dtype) {
  if (!stats.has_value()) return Tensor();
  const Tensor& st = *stats;
  TORCH_CHECK(st.numel() == rows * cpu::kStats, "pydistill_ext: stats must hold ", cpu::kStats,
              " values per row (", rows * cpu::kStats, "), got ", st.numel());
  TORCH_CHECK(st.scalar_type() == op_dtype, "pydistill_ext: stats must be ", op_dtype,
              " (the compute dtype of the logits), got ", st.scalar_type());
  check_same_device(ref, "student_logits", st, "stats");
  return st.contiguous();
}

// The per-row inputs and outputs shared by the dense and top-k kernels: the backward's
// grad_rows (checked, compute dtype) and optional stats, the forward's stats output.
struct RowIO {
  Tensor grad_rows, stats_in, stats;
  RowIO(const Tensor& student, const Tensor& grad_rows_in, const std::optional<Tensor>& st,
        bool backward) {
    const auto lead = student.sizes().slice(0, student.dim() - 1);
    const int64_t rows = c10::multiply_integers(lead);
    const auto op_dtype = at::toOpMathType(student.scalar_type());
    if (backward) {
      TORCH_CHECK(grad_rows_in.numel() == rows,
                  "pydistill_ext: grad_rows must have one entry per row");
      check_same_device(student, "student_logits", grad_rows_in, "grad_rows");
      grad_rows = grad_rows_in.to(op_dtype).contiguous();
    }
    stats_in = checked_stats(st, student, rows, op_dtype);
    auto shape = lead.vec();
    shape.push_back(cpu::kStats);
    stats = at::zeros(backward ? std::vector<int64_t>{0} : shape,
                      student.options().dtype(op_dtype));
  }
};

// Row buffers for one worker: compute-type copies of the rows (only for half/bf16) and
// the kernel's scratch. Zero-initialised so padded lanes read as 0.
template <typename opmath_t>
struct Scratch {
  std::vector<opmath_t> buf;
  int64_t stride;
  Scratch(int64_t V, int n) : buf(static_cast<size_t>((V + kPad) * n), opmath_t(0)), stride(V + kPad) {}
  opmath_t* row(int i) { return buf.data() + i * stride; }
};

// One row, student/teacher mapped onto the plan's (P, Q): the one-pass backward when the
// forward's statistics st_in are given (returns 0), else the full row kernel (returns the row
// loss, writes the statistics to st_out when given). Scratch rows 0-2 are the kernel's.
template <typename T>
T run_row(const DivergencePlan& plan, const T* srow, const T* trow, T* gs, T* gt, int64_t V,
          T inv_temp, T scale, const T* st_in, T* st_out, Scratch<T>& sc) {
  const T* x = plan.teacher_is_p ? trow : srow;
  const T* y = plan.teacher_is_p ? srow : trow;
  T* gx = plan.teacher_is_p ? gt : gs;
  T* gy = plan.teacher_is_p ? gs : gt;
  if (st_in) {
    cpu::divergence_row_backward<T>(x, y, V, plan, inv_temp, scale, st_in, gx, gy);
    return T(0);
  }
  return cpu::divergence_row<T>(x, y, V, plan, inv_temp, scale, gx, gy, sc.row(0), sc.row(1),
                                sc.row(2), st_out);
}

template <typename scalar_t, typename opmath_t>
inline const opmath_t* as_compute(const scalar_t* src, int64_t V, opmath_t* tmp) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return src;
  } else {
    for (int64_t j = 0; j < V; ++j) tmp[j] = static_cast<opmath_t>(src[j]);
    return tmp;
  }
}

template <typename scalar_t, typename opmath_t>
inline void store_back(const opmath_t* src, int64_t V, scalar_t* dst) {
  if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
    for (int64_t j = 0; j < V; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

// Shared body of kd_loss_forward (grad_rows undefined: row losses, and the plain gradients
// when asked) and kd_loss_backward (grad_rows [rows]: gradients scaled per row, no loss).
std::tuple<Tensor, Tensor, Tensor, Tensor> kd_loss_dense_cpu(
    const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& valid,
    std::string_view divergence, double beta, double temperature, bool grad_student,
    bool grad_teacher, const Tensor& grad_rows, const std::optional<Tensor>& stats_in) {
  const DivergencePlan plan =
      check_kd_dense_args(student, teacher, valid, divergence, beta, temperature);
  const int64_t V = student.size(-1);
  const int64_t N = V == 0 ? 0 : student.numel() / V;
  const auto lead = student.sizes().slice(0, student.dim() - 1);
  const auto op_dtype = at::toOpMathType(student.scalar_type());
  const bool backward = grad_rows.defined();
  const RowIO io(student, grad_rows, stats_in, backward);
  const Tensor &gr = io.grad_rows, &st_in = io.stats_in;
  Tensor stats = io.stats;

  Tensor loss = at::zeros(backward ? at::IntArrayRef{0} : lead, student.options().dtype(op_dtype));
  Tensor gs = grad_student ? at::empty_like(student, at::MemoryFormat::Contiguous)
                           : at::empty({0}, student.options());
  Tensor gt = grad_teacher ? at::empty_like(teacher, at::MemoryFormat::Contiguous)
                           : at::empty({0}, teacher.options());
  advise_huge_pages(gs);
  advise_huge_pages(gt);
  if (N == 0 || V == 0) {
    if (grad_student) gs.zero_();
    if (grad_teacher) gt.zero_();
    return {loss, gs, gt, stats};
  }
  const Tensor s = student.contiguous(), t = teacher.contiguous();
  const Tensor vmask = valid.has_value() ? valid->contiguous() : Tensor();
  const bool* vptr = valid.has_value() ? vmask.data_ptr<bool>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* gsp = grad_student ? gs.data_ptr<scalar_t>() : nullptr;
    scalar_t* gtp = grad_teacher ? gt.data_ptr<scalar_t>() : nullptr;
    opmath_t* lp = backward ? nullptr : loss.data_ptr<opmath_t>();
    opmath_t* stp = backward ? nullptr : stats.data_ptr<opmath_t>();
    const opmath_t* stin = st_in.defined() ? st_in.data_ptr<opmath_t>() : nullptr;
    const opmath_t* grp = backward ? gr.data_ptr<opmath_t>() : nullptr;
    const opmath_t inv_temp = static_cast<opmath_t>(1.0 / temperature);
    constexpr bool reduced = !std::is_same_v<scalar_t, opmath_t>;
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      // rows: 0 ep, 1 eq, 2 lm, then (reduced only) 3 s, 4 t, 5 gs, 6 gt
      Scratch<opmath_t> sc(V, reduced ? 7 : 3);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* gs_row = gsp ? gsp + r * V : nullptr;
        scalar_t* gt_row = gtp ? gtp + r * V : nullptr;
        const opmath_t scale = grp ? grp[r] : opmath_t(1);
        if ((vptr && !vptr[r]) || (backward && scale == opmath_t(0))) {
          if (gs_row) std::fill(gs_row, gs_row + V, scalar_t(0));
          if (gt_row) std::fill(gt_row, gt_row + V, scalar_t(0));
          continue;
        }
        const opmath_t* srow = as_compute<scalar_t, opmath_t>(sp + r * V, V, reduced ? sc.row(3) : nullptr);
        const opmath_t* trow = as_compute<scalar_t, opmath_t>(tp + r * V, V, reduced ? sc.row(4) : nullptr);
        opmath_t* gs_c = nullptr;
        opmath_t* gt_c = nullptr;
        if constexpr (reduced) {
          gs_c = gs_row ? sc.row(5) : nullptr;
          gt_c = gt_row ? sc.row(6) : nullptr;
        } else {
          gs_c = reinterpret_cast<opmath_t*>(gs_row);
          gt_c = reinterpret_cast<opmath_t*>(gt_row);
        }
        const opmath_t l = run_row<opmath_t>(plan, srow, trow, gs_c, gt_c, V, inv_temp, scale,
                                             stin ? stin + r * cpu::kStats : nullptr,
                                             stp ? stp + r * cpu::kStats : nullptr, sc);
        if (lp) lp[r] = l;
        if constexpr (reduced) {
          if (gs_row) store_back<scalar_t, opmath_t>(gs_c, V, gs_row);
          if (gt_row) store_back<scalar_t, opmath_t>(gt_c, V, gt_row);
        }
      }
    });
  });
  return {loss, gs, gt, stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> kd_loss_forward_cpu(
    const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& valid,
    std::string_view divergence, double beta, double temperature, bool grad_student,
    bool grad_teacher) {
  return kd_loss_dense_cpu(student, teacher, valid, divergence, beta, temperature,
                           grad_student, grad_teacher, Tensor(), std::nullopt);
}

std::tuple<Tensor, Tensor> kd_loss_backward_cpu(
    const Tensor& grad_rows, const Tensor& student, const Tensor& teacher,
    const std::optional<Tensor>& valid, const std::optional<Tensor>& stats,
    std::string_view divergence, double beta, double temperature, bool grad_student,
    bool grad_teacher) {
  auto out = kd_loss_dense_cpu(student, teacher, valid, divergence, beta, temperature,
                               grad_student, grad_teacher, grad_rows, stats);
  return {std::get<1>(out), std::get<2>(out)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> kd_loss_topk_cpu(
    const Tensor& student, const Tensor& indices, const Tensor& teacher_topk,
    const std::optional<Tensor>& valid, std::string_view divergence, double beta,
    double temperature, bool grad_student, bool grad_teacher, const Tensor& grad_rows,
    const std::optional<Tensor>& stats_in) {
  const DivergencePlan plan = check_kd_topk_args(student, indices, teacher_topk, valid,
                                                 divergence, beta, temperature);
  const int64_t V = student.size(-1);
  const int64_t K = indices.size(-1);
  const int64_t N = V == 0 ? 0 : student.numel() / V;
  const Tensor idx = indices.to(at::kLong).contiguous();
  if (idx.numel() > 0) {
    const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < V, "pydistill_ext: teacher_indices must lie in [0, ", V,
                "), got values in [", lo, ", ", hi, "]");
  }

  const auto lead = student.sizes().slice(0, student.dim() - 1);
  const auto op_dtype = at::toOpMathType(student.scalar_type());
  const bool backward = grad_rows.defined();
  const RowIO io(student, grad_rows, stats_in, backward);
  const Tensor &gr = io.grad_rows, &st_in = io.stats_in;
  Tensor stats = io.stats;
  Tensor loss = at::zeros(backward ? at::IntArrayRef{0} : lead, student.options().dtype(op_dtype));
  Tensor gs = grad_student ? at::empty_like(student, at::MemoryFormat::Contiguous)
                           : at::empty({0}, student.options());
  advise_huge_pages(gs);
  Tensor gt_c = grad_teacher ? at::zeros(indices.sizes(), student.options().dtype(op_dtype))
                             : at::empty({0}, student.options().dtype(op_dtype));
  if (N == 0 || V == 0) {
    if (grad_student) gs.zero_();
    return {loss, gs, gt_c.to(teacher_topk.scalar_type()), stats};
  }
  const Tensor s = student.contiguous();
  const Tensor tk = teacher_topk.to(op_dtype).contiguous();
  const Tensor vmask = valid.has_value() ? valid->contiguous() : Tensor();
  const bool* vptr = valid.has_value() ? vmask.data_ptr<bool>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_loss_topk_forward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const opmath_t* tkp = tk.data_ptr<opmath_t>();
    scalar_t* gsp = grad_student ? gs.data_ptr<scalar_t>() : nullptr;
    opmath_t* gtp = grad_teacher ? gt_c.data_ptr<opmath_t>() : nullptr;
    opmath_t* lp = backward ? nullptr : loss.data_ptr<opmath_t>();
    opmath_t* stp = backward ? nullptr : stats.data_ptr<opmath_t>();
    const opmath_t* stin = st_in.defined() ? st_in.data_ptr<opmath_t>() : nullptr;
    const opmath_t* grp = backward ? gr.data_ptr<opmath_t>() : nullptr;
    const opmath_t inv_temp = static_cast<opmath_t>(1.0 / temperature);
    constexpr bool reduced = !std::is_same_v<scalar_t, opmath_t>;
    const opmath_t ninf = -std::numeric_limits<opmath_t>::infinity();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      // rows: 0 ep, 1 eq, 2 lm, 3 dense teacher, 4 teacher grad, 5 student (reduced), 6 gs (reduced)
      Scratch<opmath_t> sc(V, 7);
      std::vector<int64_t> stamp(static_cast<size_t>(V), -1);
      opmath_t* trow = sc.row(3);
      std::fill(trow, trow + V, ninf);
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* gs_row = gsp ? gsp + r * V : nullptr;
        const int64_t* irow = ip + r * K;
        for (int64_t k = 0; k < K; ++k) {
          TORCH_CHECK(stamp[irow[k]] != r, "pydistill_ext: teacher_indices row ", r,
                      " repeats vocabulary index ", irow[k], "; the K indices must be distinct");
          stamp[irow[k]] = r;
        }
        const opmath_t scale = grp ? grp[r] : opmath_t(1);
        if ((vptr && !vptr[r]) || (backward && scale == opmath_t(0))) {
          if (gs_row) std::fill(gs_row, gs_row + V, scalar_t(0));
          continue;
        }
        for (int64_t k = 0; k < K; ++k) trow[irow[k]] = tkp[r * K + k];
        const opmath_t* srow = as_compute<scalar_t, opmath_t>(sp + r * V, V, reduced ? sc.row(5) : nullptr);
        opmath_t* gs_c = nullptr;
        if constexpr (reduced) {
          gs_c = gs_row ? sc.row(6) : nullptr;
        } else {
          gs_c = reinterpret_cast<opmath_t*>(gs_row);
        }
        opmath_t* gt_dense = gtp ? sc.row(4) : nullptr;
        const opmath_t l = run_row<opmath_t>(plan, srow, trow, gs_c, gt_dense, V, inv_temp, scale,
                                             stin ? stin + r * cpu::kStats : nullptr,
                                             stp ? stp + r * cpu::kStats : nullptr, sc);
        if (lp) lp[r] = l;
        if (gtp)
          for (int64_t k = 0; k < K; ++k) gtp[r * K + k] = gt_dense[irow[k]];
        for (int64_t k = 0; k < K; ++k) trow[irow[k]] = ninf;
        if constexpr (reduced) {
          if (gs_row) store_back<scalar_t, opmath_t>(gs_c, V, gs_row);
        }
      }
    });
  });
  return {loss, gs, gt_c.to(teacher_topk.scalar_type()), stats};
}


std::tuple<Tensor, Tensor, Tensor, Tensor> kd_loss_topk_forward_cpu(
    const Tensor& student, const Tensor& indices, const Tensor& teacher_topk,
    const std::optional<Tensor>& valid, std::string_view divergence, double beta,
    double temperature, bool grad_student, bool grad_teacher) {
  return kd_loss_topk_cpu(student, indices, teacher_topk, valid, divergence, beta,
                          temperature, grad_student, grad_teacher, Tensor(), std::nullopt);
}

std::tuple<Tensor, Tensor> kd_loss_topk_backward_cpu(
    const Tensor& grad_rows, const Tensor& student, const Tensor& indices,
    const Tensor& teacher_topk, const std::optional<Tensor>& valid,
    const std::optional<Tensor>& stats, std::string_view divergence, double beta,
    double temperature, bool grad_student, bool grad_teacher) {
  auto out = kd_loss_topk_cpu(student, indices, teacher_topk, valid, divergence, beta,
                              temperature, grad_student, grad_teacher, grad_rows, stats);
  return {std::get<1>(out), std::get<2>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pydistill_ext, CPU, m) {
  m.impl("kd_loss_forward", &kd_loss_forward_cpu);
  m.impl("kd_loss_backward", &kd_loss_backward_cpu);
  m.impl("kd_loss_topk_forward", &kd_loss_topk_forward_cpu);
  m.impl("kd_loss_topk_backward", &kd_loss_topk_backward_cpu);
}

}  // namespace pydistill
