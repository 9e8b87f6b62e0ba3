"""fused_linear_kd_forward: lm_head projection + KD divergence, chunked over rows.

Student logits z_s = h W^T (+ b) are formed one chunk of rows at a time and fed to the native
kd_loss_forward kernel, which returns the row losses and G = d loss / d z_s for the chunk in
the same pass. The chunk's contribution to the parameter gradients follows from z_s = h W^T + b:
    dh_c = G_c W,    dW += G_c^T h_c,    db += sum_rows G_c        (dW, db in float32)
so the [N, V] logits are never materialised; peak extra memory is a few [C, V] chunk buffers
plus dW. The teacher side is either given logits (chunked views) or its own hidden/weight
(projected per chunk too).

Two gradient modes:
  * scalar reductions: gradients are computed during the forward (gradient-in-forward) for the
    summed loss and scaled by the incoming scalar gradient in backward;
  * reduction 'none': the forward only computes row losses; the backward recomputes the chunks
    with the incoming per-row weights.
Registered as an opaque custom op so torch.compile(fullgraph=True) traces it as one node.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
from torch import Tensor

from pydistill_ext._lib import ops

_EMPTY_SHAPE = (0,)
MIN_CHUNK_ROWS = 64        # below this, re-reading W per chunk dominates (Liger FLJSD pathology)
CHUNK_BUDGET_BYTES = 32 << 20  # per [C, V] float32 buffer


def auto_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: one [C, V] float32 buffer within CHUNK_BUDGET_BYTES (less when free
    memory is short), at least MIN_CHUNK_ROWS, at most n_rows."""
    budget = CHUNK_BUDGET_BYTES
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = min(budget, max(free // 16, 1 << 20))
    except (ValueError, OSError, RuntimeError, AttributeError):
        pass
    rows = max(MIN_CHUNK_ROWS, budget // (4 * max(vocab, 1)))
    return int(max(1, min(rows, max(n_rows, 1))))


def _project(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return torch.addmm(b, h, w.t()) if b is not None else h @ w.t()


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with acc in float32/float64: in place (no [V, H] temporary) when the
    operands already have acc's dtype, else one low-precision product added in fp32."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(torch.mm(a, b))


def _empty(ref: Tensor) -> Tensor:
    return ref.new_empty(_EMPTY_SHAPE)


def _run(h, w, b, t_logits, t_h, t_w, t_b, valid, divergence, beta, temperature, chunk,
         row_weights, want: List[bool]):
    """The chunk loop. want = [h, w, b, t_logits, t_h, t_w, t_b] gradient flags."""
    n, vocab = h.shape[0], w.shape[0]
    rows = h.new_empty((n,), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    g_h = torch.empty_like(h) if want[0] else _empty(h)
    g_w = torch.zeros(w.shape, dtype=acc, device=w.device) if want[1] else None
    g_b = torch.zeros((vocab,), dtype=acc, device=w.device) if want[2] else None
    g_tl = torch.empty_like(t_logits) if want[3] else None
    g_th = torch.empty_like(t_h) if want[4] else None
    g_tw = torch.zeros(t_w.shape, dtype=acc, device=t_w.device) if want[5] else None
    g_tb = torch.zeros((vocab,), dtype=acc, device=t_w.device) if want[6] else None
    need_s = any(want[:3])
    need_t = any(want[3:])
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        hc = h[start:end]
        zs = _project(hc, w, b)
        zt = t_logits[start:end] if t_logits is not None else _project(t_h[start:end], t_w, t_b)
        if zt.dtype != zs.dtype:
            zt = zt.to(zs.dtype)
        vc = valid[start:end] if valid is not None else None
        r, gs, gt, _ = ops.kd_loss_forward(zs, zt, vc, divergence, beta, temperature, need_s, need_t)
        rows[start:end] = r
        if row_weights is not None:
            wts = row_weights[start:end].unsqueeze(-1)
            if need_s:
                gs = gs.mul_(wts.to(gs.dtype))
            if need_t:
                gt = gt.mul_(wts.to(gt.dtype))
        if need_s:
            if want[0]:
                torch.mm(gs, w, out=g_h[start:end])
            if want[1]:
                _accumulate_mm(g_w, gs.t(), hc)
            if want[2]:
                g_b.add_(gs.sum(0, dtype=acc))
        if need_t:
            if want[3]:
                g_tl[start:end] = gt.to(g_tl.dtype)
            if want[4]:
                torch.mm(gt.to(t_w.dtype), t_w, out=g_th[start:end])
            if want[5]:
                _accumulate_mm(g_tw, gt.t().to(t_h.dtype), t_h[start:end])
            if want[6]:
                g_tb.add_(gt.sum(0, dtype=acc))
    out = [g_h,
           g_w.to(w.dtype) if g_w is not None else _empty(w),
           g_b.to(b.dtype) if g_b is not None else _empty(w),
           g_tl if g_tl is not None else _empty(h),
           g_th if g_th is not None else _empty(h),
           g_tw.to(t_w.dtype) if g_tw is not None else _empty(w),
           g_tb.to(t_b.dtype) if g_tb is not None else _empty(w)]
    return rows, out


@torch.library.custom_op("pydistill_ext::fused_linear_kd_forward", mutates_args=())
def fused_linear_kd_forward(
        student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
        teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor],
        teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor], valid: Optional[Tensor],
        row_weights: Optional[Tensor], divergence: str, beta: float, temperature: float,
        chunk_size: int, want: List[bool]) -> List[Tensor]:
    """Returns [rows, total, g_h, g_w, g_b, g_tlogits, g_th, g_tw, g_tb]; rows are the
    per-row losses, total their sum; gradients are of sum_r row_weights[r] * rows[r] (of the
    plain sum when row_weights is None), empty where want[i] is False."""
    rows, grads = _run(student_hidden, student_weight, student_bias, teacher_logits,
                       teacher_hidden, teacher_weight, teacher_bias, valid, divergence, beta,
                       temperature, chunk_size, row_weights, want)
    return [rows, rows.sum()] + grads


@fused_linear_kd_forward.register_fake
def _fake(student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
          teacher_weight, teacher_bias, valid, row_weights, divergence, beta, temperature,
          chunk_size, want):
    h, w = student_hidden, student_weight
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    rows = h.new_empty((h.shape[0],), dtype=acc)
    shapes = [(h, h.shape), (w, w.shape), (w, (w.shape[0],)),
              (h, teacher_logits.shape if teacher_logits is not None else None),
              (h, teacher_hidden.shape if teacher_hidden is not None else None),
              (w, teacher_weight.shape if teacher_weight is not None else None),
              (w, (w.shape[0],))]
    dtypes = [h.dtype, w.dtype, student_bias.dtype if student_bias is not None else w.dtype,
              teacher_logits.dtype if teacher_logits is not None else h.dtype,
              teacher_hidden.dtype if teacher_hidden is not None else h.dtype,
              teacher_weight.dtype if teacher_weight is not None else w.dtype,
              teacher_bias.dtype if teacher_bias is not None else w.dtype]
    grads = [ref.new_empty(shape if flag else _EMPTY_SHAPE, dtype=dt)
             for (ref, shape), dt, flag in zip(shapes, dtypes, want)]
    return [rows, rows.new_empty(())] + grads


_GRAD_INPUTS = (0, 1, 2, 3, 4, 5, 6)  # positions of the differentiable inputs


def _setup(ctx, inputs, output):
    ctx.args = inputs[9:13]  # divergence, beta, temperature, chunk_size
    ctx.deferred = inputs[8] is None and not any(inputs[13])  # forward formed no gradients
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    # The inputs (references, no copies) allow recomputation; the gradients formed in forward
    # are stashed for a single in-place use when they are plain eager tensors (no extra
    # [V, H] copy in backward), and saved normally while tracing (torch.compile).
    ctx.stash = None
    grads = output[2:]
    saved = list(inputs[:9])
    if not ctx.deferred:
        if all(type(g) is torch.Tensor for g in grads):
            ctx.stash = list(grads)
        else:
            saved += list(grads)
    ctx.save_for_backward(*saved)


def _backward(ctx, grads):
    g_rows, g_total = grads[0], grads[1]
    saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    if g_total is None and (g_rows is None or not ctx.deferred):
        return (None,) * 14
    if not ctx.deferred:
        # gradients of the plain row sum were formed in forward; callers in this mode use
        # only `total` (the wrapper reduces through it), so d loss / d total scales them all.
        if ctx.stash is not None:  # first backward: consume the buffers in place
            stash, ctx.stash = ctx.stash, None
            return tuple(g.mul_(g_total.to(g.dtype)) if need[i] else None
                         for i, g in enumerate(stash)) + (None,) * 7
        if len(saved) > 9:  # traced: out of place
            return tuple(g * g_total.to(g.dtype) if need[i] else None
                         for i, g in enumerate(saved[9:])) + (None,) * 7
        # a retained graph differentiated again: recompute the same sums, scale the same way
        h, w, b, tl, th, tw, tb, valid, _ = saved[:9]
        res = fused_linear_kd_forward(h, w, b, tl, th, tw, tb, valid, None, *ctx.args,
                                      [bool(need[i]) for i in _GRAD_INPUTS])
        return tuple(g.mul_(g_total.to(g.dtype)) if need[i] else None
                     for i, g in enumerate(res[2:])) + (None,) * 7
    g_sum = g_total.expand(saved[0].shape[0]) if g_total is not None else None
    if ctx.deferred and g_rows is not None:
        g_sum = g_rows if g_sum is None else g_rows + g_sum
    h, w, b, tl, th, tw, tb, valid, _ = saved[:9]
    want = [bool(need[i]) for i in _GRAD_INPUTS]
    res = fused_linear_kd_forward(h, w, b, tl, th, tw, tb, valid, g_sum.contiguous(),
                                  *ctx.args, want)
    return tuple(g if want[i] else None for i, g in enumerate(res[2:])) + (None,) * 7


fused_linear_kd_forward.register_autograd(_backward, setup_context=_setup)
