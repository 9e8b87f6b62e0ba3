"""kd_loss_forward / kd_loss_topk_forward: fake kernels, autograd, backend choice, and the
public functional API (kd_loss, kd_loss_topk).

Autograd: the forward computes per-row losses and 8 statistics per row and keeps them with its
inputs; the registered backward op makes one more pass over the rows and writes
grad_row * d row_loss / d logits directly into the gradient buffer (one [N, V] buffer per
differentiated input, no extra scaling pass). The forward ops can also return the plain gradients in the same pass
(grad_student / grad_teacher flags): fused_linear_kd_loss uses that per chunk.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from pydistill_ext._lib import has_kernel, ops

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


STATS_PER_ROW = 8  # (mx, my, logZp, logZq, L, s0, s1, s2): csrc/registration.cpp


def _stats_like(rows: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(tuple(rows.shape) + (STATS_PER_ROW,))


# ---------------------------------------------------------------- fake (meta) kernels

@torch.library.register_fake("pydistill_ext::kd_loss_forward")
def _kd_loss_forward_fake(student, teacher, valid, divergence, beta, temperature,
                          grad_student, grad_teacher):
    rows = student.new_empty(student.shape[:-1], dtype=_compute_dtype(student.dtype))
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_student \
        else student.new_empty((0,))
    gt = torch.empty_like(teacher, memory_format=torch.contiguous_format) if grad_teacher \
        else teacher.new_empty((0,))
    return rows, gs, gt, _stats_like(rows)


@torch.library.register_fake("pydistill_ext::kd_loss_topk_forward")
def _kd_loss_topk_forward_fake(student, indices, teacher_topk, valid, divergence, beta,
                               temperature, grad_student, grad_teacher):
    rows = student.new_empty(student.shape[:-1], dtype=_compute_dtype(student.dtype))
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_student \
        else student.new_empty((0,))
    gt = teacher_topk.new_empty(teacher_topk.shape) if grad_teacher \
        else teacher_topk.new_empty((0,))
    return rows, gs, gt, _stats_like(rows)


@torch.library.register_fake("pydistill_ext::kd_loss_backward")
def _kd_loss_backward_fake(grad_rows, student, teacher, valid, stats, divergence, beta,
                           temperature, grad_student, grad_teacher):
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_student \
        else student.new_empty((0,))
    gt = torch.empty_like(teacher, memory_format=torch.contiguous_format) if grad_teacher \
        else teacher.new_empty((0,))
    return gs, gt


@torch.library.register_fake("pydistill_ext::kd_loss_topk_backward")
def _kd_loss_topk_backward_fake(grad_rows, student, indices, teacher_topk, valid, stats,
                                divergence, beta, temperature, grad_student, grad_teacher):
    gs = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_student \
        else student.new_empty((0,))
    gt = teacher_topk.new_empty(teacher_topk.shape) if grad_teacher \
        else teacher_topk.new_empty((0,))
    return gs, gt


# ---------------------------------------------------------------- autograd
#
# The forward keeps its inputs and 8 floats per row (row maxima, log normalisers, loss and the
# family's row sums); the backward op reads the rows once more and writes
# grad_rows[r] * d row_loss[r] / d logits straight into the one gradient buffer per
# differentiated input. Memory of fwd+bwd: the gradients themselves (+ 32 B per row).
# Repeated backward (retain_graph, gradcheck) is exact because nothing is consumed.

def _backward_fallback(forward_op, grad_rows, tensors, args, need_s, need_t):
    """For a backend without a dedicated backward kernel: plain gradients, then scaled."""
    _, gs, gt, _ = forward_op(*tensors, *args, need_s, need_t)
    scale = grad_rows.unsqueeze(-1)
    return (gs * scale.to(gs.dtype) if need_s else gs,
            gt * scale.to(gt.dtype) if need_t else gt)


def make_autograd(topk: bool, forward_op, backward_op=None):
    """(setup_context, backward) for a kd_loss forward op. backward_op: a native
    kd_loss(_topk)_backward op (used where it has a kernel for the tensors' device), or None
    to use the forward with gradients + scaling."""
    # decided once here, not per call: torch.compile cannot trace dispatcher queries
    backward_on_cuda = backward_op is not None and has_kernel(
        backward_op._qualified_op_name.split("::")[-1], "CUDA")
    n_tensors = 4 if topk else 3
    teacher_pos = 2 if topk else 1

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1], output[2], output[3])
        ctx.set_materialize_grads(False)
        # None inputs (no valid mask) are not saved: traced graphs drop them from the list
        keep = list(inputs[:n_tensors]) + [output[3]]
        ctx.present = [t is not None for t in keep]
        ctx.save_for_backward(*[t for t in keep if t is not None])
        ctx.args = tuple(inputs[n_tensors:n_tensors + 3])  # divergence, beta, temperature

    def backward(ctx, grad_rows, _g_s=None, _g_t=None, _g_stats=None):
        n_inputs = n_tensors + 5
        if grad_rows is None:
            return (None,) * n_inputs
        it = iter(ctx.saved_tensors)
        *tensors, stats = [next(it) if present else None for present in ctx.present]
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[teacher_pos]
        grad_rows = grad_rows.contiguous()
        if backward_op is not None and (tensors[0].device.type != "cuda" or backward_on_cuda):
            gs, gt = backward_op(grad_rows, *tensors, stats, *ctx.args, need_s, need_t)
        else:
            gs, gt = _backward_fallback(forward_op, grad_rows, tensors, ctx.args, need_s, need_t)
        grads = [None] * n_inputs
        grads[0] = gs if need_s else None
        grads[teacher_pos] = gt if need_t else None
        return tuple(grads)

    return setup_context, backward


for _topk, _fwd, _bwd in ((False, ops.kd_loss_forward, ops.kd_loss_backward),
                          (True, ops.kd_loss_topk_forward, ops.kd_loss_topk_backward)):
    _setup, _bw = make_autograd(_topk, _fwd, _bwd)
    torch.library.register_autograd(_fwd._qualified_op_name, _bw, setup_context=_setup)


# ---------------------------------------------------------------- backend choice

_NATIVE_CUDA = has_kernel("kd_loss_forward", "CUDA")  # fixed at build time


def cuda_backend() -> str:
    """'cuda' (the C++ CUDA kernels) or 'triton', from PYDISTILL_CUDA_BACKEND (default cuda,
    falling back to triton when the CUDA kernels were not built)."""
    want = os.environ.get("PYDISTILL_CUDA_BACKEND", "").strip().lower() or None
    if want not in (None, "cuda", "triton"):
        raise ValueError(f"PYDISTILL_CUDA_BACKEND must be 'cuda' or 'triton', got {want!r}")
    if want is None:
        want = "cuda" if _NATIVE_CUDA else "triton"
    return want


def _forward_op(device: torch.device, topk: bool, backend: Optional[str]):
    if backend is None:
        backend = cuda_backend() if device.type == "cuda" else "native"
    if backend == "triton":
        from pydistill_ext.triton import kd_loss as tkd  # imported lazily: triton is optional
        return tkd.kd_loss_topk_forward_triton if topk else tkd.kd_loss_forward_triton
    if device.type == "cuda" and not _NATIVE_CUDA:
        raise RuntimeError("pydistill_ext was built without CUDA kernels; rebuild with a CUDA "
                           "torch or set PYDISTILL_CUDA_BACKEND=triton")
    return ops.kd_loss_topk_forward if topk else ops.kd_loss_forward


# ---------------------------------------------------------------- argument checks

def _check_logits(x: torch.Tensor, name: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape [..., V], got a 0-d tensor")


def _check_common(student, divergence, beta, temperature, reduction, labels):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if isinstance(beta, torch.Tensor) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a Python number, got {type(beta).__name__}")
    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or \
                labels.dtype == torch.bool or labels.is_complex():
            raise ValueError("labels must be an integer tensor, got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if tuple(labels.shape) != tuple(student.shape[:-1]):
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal the leading shape "
                             f"{tuple(student.shape[:-1])} of student_logits")
        if labels.device != student.device:
            raise ValueError(f"labels is on {labels.device} but student_logits is on "
                             f"{student.device}")


def _reduce_total(total, n_rows, valid, reduction, vocab, num_items_in_batch, out_dtype):
    """Scalar reduction of the row-loss sum `total` (REFERENCE.md 1.5)."""
    if reduction != "sum":
        if num_items_in_batch is not None:
            denom = num_items_in_batch
        elif valid is None:
            denom = max(n_rows, 1)
        else:
            denom = valid.sum().clamp_min(1)  # on device: no host sync
        if reduction == "mean":
            denom = denom * max(vocab, 1)  # V = 0: every row is 0, and so is the mean
        total = total / denom
    return total.to(out_dtype)


def _reduce(rows, valid, reduction, vocab, num_items_in_batch, out_dtype):
    if reduction == "none":
        return rows.to(out_dtype)
    return _reduce_total(rows.sum(), rows.numel(), valid, reduction, vocab,
                         num_items_in_batch, out_dtype)


# ---------------------------------------------------------------- public API

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
            divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
            reduction: str = "batchmean", labels: Optional[torch.Tensor] = None,
            ignore_index: int = -100, num_items_in_batch=None,
            _backend: Optional[str] = None) -> torch.Tensor:
    """Fused KD divergence between softmax(student/T) and softmax(teacher/T).

    Divergences (REFERENCE.md 1.2): ``forward_kl`` KL(p_t||p_s); ``reverse_kl`` KL(p_s||p_t);
    ``jsd`` beta*KL(p_t||M) + (1-beta)*KL(p_s||M), M = beta*p_t + (1-beta)*p_s, with beta=0 /
    beta=1 giving forward_kl / reverse_kl as TRL's ``generalized_jsd_loss`` (GKD, arXiv
    2306.13649 Eq. 1); ``skew_forward_kl`` KL(p_t || beta*p_t + (1-beta)*p_s) and
    ``skew_reverse_kl`` KL(p_s || beta*p_s + (1-beta)*p_t) (DistiLLM); ``tvd`` 1/2 sum|p_t-p_s|.

    Logits are [..., V] of one floating dtype; math runs in float32 (float64 for float64).
    ``labels`` (leading shape) masks rows equal to ``ignore_index``. Reductions: ``batchmean``
    (sum / unmasked rows), ``sum``, ``mean`` (sum / (unmasked rows * V), as F.kl_div),
    ``none`` (one value per row). ``num_items_in_batch`` replaces the row count of batchmean
    and mean (gradient accumulation). No T^2 factor: recipes apply it. The teacher receives a
    gradient when it requires grad (mutual learning). The loss has the logits' dtype.
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits, "teacher_logits")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal "
                         f"student_logits shape {tuple(student_logits.shape)}")
    if teacher_logits.dtype != student_logits.dtype:
        raise ValueError(f"teacher_logits dtype {teacher_logits.dtype} must equal "
                         f"student_logits dtype {student_logits.dtype}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_logits is "
                         f"on {student_logits.device}")
    _check_common(student_logits, divergence, beta, temperature, reduction, labels)
    valid = None if labels is None else labels.ne(ignore_index)
    op = _forward_op(student_logits.device, False, _backend)
    rows = op(student_logits, teacher_logits, valid, divergence, float(beta),
              float(temperature), False, False)[0]
    return _reduce(rows, valid, reduction, student_logits.shape[-1], num_items_in_batch,
                   student_logits.dtype)


def kd_loss_topk(student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                 teacher_logits_topk: torch.Tensor, *, divergence: str = "forward_kl",
                 beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                 labels: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 num_items_in_batch=None, _backend: Optional[str] = None) -> torch.Tensor:
    """KD divergence against a teacher cached as its top-k logits.

    Convention ("renormalize", DistillKit's ZERO policy): the teacher distribution is
    softmax(teacher_logits_topk / T) over its K distinct indices and exactly zero on the other
    V - K entries; the student is the full-vocabulary softmax(student / T). forward_kl, jsd,
    skew_* and tvd are finite under this convention; reverse_kl is not (the student has mass
    where the teacher has none) and is rejected. ``teacher_logits_topk`` may have another
    floating dtype than the student (e.g. an fp16 cache); indices are int64 or int32 in
    [0, V), distinct per row. Other arguments as :func:`kd_loss`.
    """
    _check_logits(student_logits, "student_logits")
    _check_logits(teacher_logits_topk, "teacher_logits_topk")
    if not isinstance(teacher_indices, torch.Tensor) or teacher_indices.dtype not in (torch.int64, torch.int32):
        raise ValueError("teacher_indices must be an int64 or int32 tensor, got "
                         f"{getattr(teacher_indices, 'dtype', type(teacher_indices).__name__)}")
    if teacher_indices.shape != teacher_logits_topk.shape:
        raise ValueError(f"teacher_indices shape {tuple(teacher_indices.shape)} must equal "
                         f"teacher_logits_topk shape {tuple(teacher_logits_topk.shape)}")
    if teacher_indices.shape[:-1] != student_logits.shape[:-1] or teacher_indices.dim() != student_logits.dim():
        raise ValueError(f"teacher_indices shape {tuple(teacher_indices.shape)} must be the "
                         f"student's leading shape {tuple(student_logits.shape[:-1])} plus K")
    K, V = teacher_indices.shape[-1], student_logits.shape[-1]
    if K > V:
        raise ValueError(f"top-k size K={K} exceeds the vocabulary size V={V}")
    for t, n in ((teacher_indices, "teacher_indices"), (teacher_logits_topk, "teacher_logits_topk")):
        if t.device != student_logits.device:
            raise ValueError(f"{n} is on {t.device} but student_logits is on {student_logits.device}")
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        raise ValueError(f"divergence={divergence!r} (beta={beta}) is infinite for a top-k teacher "
                         "(zero mass off its K entries); use forward_kl, jsd, skew_reverse_kl or tvd")
    _check_common(student_logits, divergence, beta, temperature, reduction, labels)
    if student_logits.device.type != "cpu" and not torch.compiler.is_compiling() and teacher_indices.numel():
        lo, hi = int(teacher_indices.min()), int(teacher_indices.max())  # the CPU kernel checks itself
        if lo < 0 or hi >= V:
            raise ValueError(f"teacher_indices must lie in [0, {V}), got values in [{lo}, {hi}]")
    valid = None if labels is None else labels.ne(ignore_index)
    op = _forward_op(student_logits.device, True, _backend)
    rows = op(student_logits, teacher_indices, teacher_logits_topk, valid, divergence,
              float(beta), float(temperature), False, False)[0]
    return _reduce(rows, valid, reduction, V, num_items_in_batch, student_logits.dtype)
