"""Logit-level knowledge-distillation losses: nn.Module forms of kd_loss / kd_loss_topk, and
the fused lm_head + KD loss (fused_linear_kd_loss) that never materialises the logits."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from pydistill_ext.ops import fused_linear_kd_loss as _fl
from pydistill_ext.ops.kd_loss import _check_common, _reduce_total, kd_loss, kd_loss_topk


def _check_2d_weight(w: Tensor, name: str, hidden: int):
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"{name} must be a [V, H] tensor, got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    if w.shape[1] != hidden:
        raise ValueError(f"{name} has H={w.shape[1]} columns but the hidden states have "
                         f"H={hidden}")


def _check_bias(b: Optional[Tensor], name: str, vocab: int, ref: Tensor):
    if b is None:
        return
    if b.shape != (vocab,):
        raise ValueError(f"{name} must have shape ({vocab},), got {tuple(b.shape)}")
    if b.device != ref.device:
        raise ValueError(f"{name} is on {b.device} but the weight is on {ref.device}")


def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, *,
                         teacher_logits: Optional[Tensor] = None,
                         teacher_hidden: Optional[Tensor] = None,
                         teacher_weight: Optional[Tensor] = None,
                         student_bias: Optional[Tensor] = None,
                         teacher_bias: Optional[Tensor] = None,
                         chunk_size: Optional[int] = None,
                         divergence: str = "forward_kl", beta: float = 0.5,
                         temperature: float = 1.0, reduction: str = "batchmean",
                         labels: Optional[Tensor] = None, ignore_index: int = -100,
                         num_items_in_batch=None) -> Tensor:
    """KD loss on student logits ``student_hidden @ student_weight.T (+ student_bias)``
    computed chunk by chunk, never holding the [N, V] logits (REFERENCE.md 1.7).

    The teacher is either ``teacher_logits`` [..., V] or ``teacher_hidden`` [..., H_t] with
    ``teacher_weight`` [V, H_t] (+ ``teacher_bias``), projected per chunk as well. Rows per chunk
    default to :func:`auto_chunk_size` (V and free memory; at least 64 rows). Gradients for the
    hidden states, weights and biases (student, and teacher where it requires grad) are
    accumulated in float32 across chunks; a frozen weight gets no gradient buffer. Keywords as
    :func:`pydistill_ext.kd_loss`.
    """
    h = student_hidden
    if not isinstance(h, Tensor) or h.dim() < 1 or h.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError("student_hidden must be a floating tensor [..., H], got "
                         f"{getattr(h, 'dtype', type(h).__name__)}")
    H = h.shape[-1]
    _check_2d_weight(student_weight, "student_weight", H)
    V = student_weight.shape[0]
    if student_weight.dtype != h.dtype:
        raise ValueError(f"student_weight dtype {student_weight.dtype} must equal "
                         f"student_hidden dtype {h.dtype}")
    if student_weight.device != h.device:
        raise ValueError(f"student_weight is on {student_weight.device} but student_hidden is "
                         f"on {h.device}")
    _check_bias(student_bias, "student_bias", V, student_weight)
    lead = h.shape[:-1]
    if (teacher_logits is None) == (teacher_hidden is None):
        raise ValueError("give exactly one of teacher_logits or teacher_hidden (+ teacher_weight)")
    if teacher_logits is not None:
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("teacher_weight/teacher_bias are only used with teacher_hidden")
        if tuple(teacher_logits.shape) != tuple(lead) + (V,):
            raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must be "
                             f"{tuple(lead) + (V,)} (hidden leading shape + V)")
        if not teacher_logits.dtype.is_floating_point:
            raise ValueError(f"teacher_logits must be floating, got {teacher_logits.dtype}")
        if teacher_logits.device != h.device:
            raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_hidden "
                             f"is on {h.device}")
    else:
        if teacher_weight is None:
            raise ValueError("teacher_hidden needs teacher_weight [V, H_t]")
        if tuple(teacher_hidden.shape[:-1]) != tuple(lead):
            raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} "
                             f"must equal student_hidden's {tuple(lead)}")
        _check_2d_weight(teacher_weight, "teacher_weight", teacher_hidden.shape[-1])
        if teacher_weight.shape[0] != V:
            raise ValueError(f"teacher_weight has V={teacher_weight.shape[0]} rows but "
                             f"student_weight has V={V}")
        if teacher_weight.dtype != teacher_hidden.dtype:
            raise ValueError(f"teacher_weight dtype {teacher_weight.dtype} must equal "
                             f"teacher_hidden dtype {teacher_hidden.dtype}")
        for t, n in ((teacher_hidden, "teacher_hidden"), (teacher_weight, "teacher_weight")):
            if t.device != h.device:
                raise ValueError(f"{n} is on {t.device} but student_hidden is on {h.device}")
        _check_bias(teacher_bias, "teacher_bias", V, teacher_weight)
    probe = h.new_empty(tuple(lead) + (V,), device="meta")
    _check_common(probe, divergence, beta, temperature, reduction, None)
    if labels is not None:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if tuple(labels.shape) != tuple(lead):
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal {tuple(lead)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    n = math.prod(lead)
    h2 = h.reshape(n, H)
    tl = teacher_logits.reshape(n, V) if teacher_logits is not None else None
    th = teacher_hidden.reshape(n, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
    valid = labels.reshape(n).ne(ignore_index) if labels is not None else None
    chunk = chunk_size or _fl.auto_chunk_size(n, V, h.device)
    grad_on = torch.is_grad_enabled()
    flags = [grad_on and t is not None and t.requires_grad
             for t in (h, student_weight, student_bias, teacher_logits, teacher_hidden,
                       teacher_weight, teacher_bias)]
    deferred = reduction == "none" and any(flags)
    out = _fl.fused_linear_kd_forward(
        h2, student_weight, student_bias, tl, th, teacher_weight, teacher_bias, valid, None,
        divergence, float(beta), float(temperature), int(chunk), [False] * 7 if deferred else flags)
    rows, total = out[0], out[1]
    if reduction == "none":
        return rows.reshape(lead).to(h.dtype)
    # reduce through `total` (the row sum): the gradients formed in forward are of it
    return _reduce_total(total, n, valid, reduction, V, num_items_in_batch, h.dtype)


class KDLoss(nn.Module):
    """nn.Module form of :func:`pydistill_ext.kd_loss` (and of :func:`kd_loss_topk` when
    called with ``teacher_indices``)."""

    def __init__(self, divergence: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, reduction: str = "batchmean",
                 ignore_index: int = -100):
        super().__init__()
        _check_common(torch.empty(1, 1, device="meta"), divergence, beta, temperature, reduction, None)
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                labels: Optional[Tensor] = None, teacher_indices: Optional[Tensor] = None,
                num_items_in_batch=None) -> Tensor:
        kw = dict(divergence=self.divergence, beta=self.beta, temperature=self.temperature,
                  reduction=self.reduction, labels=labels, ignore_index=self.ignore_index,
                  num_items_in_batch=num_items_in_batch)
        if teacher_indices is not None:
            return kd_loss_topk(student_logits, teacher_indices, teacher_logits, **kw)
        return kd_loss(student_logits, teacher_logits, **kw)

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}")


class FusedLinearKDLoss(nn.Module):
    """nn.Module form of :func:`fused_linear_kd_loss`: ``forward(student_hidden,
    student_weight, teacher_logits=None, teacher_hidden=None, teacher_weight=None, ...)``."""

    def __init__(self, divergence: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, reduction: str = "batchmean",
                 ignore_index: int = -100, chunk_size: Optional[int] = None):
        super().__init__()
        _check_common(torch.empty(1, 1, device="meta"), divergence, beta, temperature, reduction, None)
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.reduction, self.ignore_index, self.chunk_size = reduction, ignore_index, chunk_size

    def forward(self, student_hidden: Tensor, student_weight: Tensor, *,
                teacher_logits: Optional[Tensor] = None, teacher_hidden: Optional[Tensor] = None,
                teacher_weight: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                num_items_in_batch=None) -> Tensor:
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_logits=teacher_logits,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=self.chunk_size,
            divergence=self.divergence, beta=self.beta, temperature=self.temperature,
            reduction=self.reduction, labels=labels, ignore_index=self.ignore_index,
            num_items_in_batch=num_items_in_batch)
