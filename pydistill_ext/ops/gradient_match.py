"""gradient_match_forward / gradient_match_backward: fake kernels, autograd and the public
function gradient_match_distance (DC's match_loss, REFERENCE.md 3).

Autograd: the forward keeps its inputs and the per-row statistics [R, 3]; the registered
backward op writes each gradient row as g * (c_aa a + c_ab b) (coefficients from the
statistics, csrc/include/pydistill/gradient_match.h) in one pass over the rows. The backward
itself is not differentiable (no double backward): DC differentiates the distance once, and
the second-order path to the synthetic images runs through the autograd graph that produced
the gradients, not through this op.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pydistill_ext._lib import ops

METRICS = ("ours", "mse", "cos")
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_CHUNK = 4096  # kMatchChunk in gradient_match.h


def _rows(grads, metric):
    total = 0
    for t in grads:
        if metric == "ours":
            total += t.shape[0] if t.dim() >= 2 else 0
        else:
            total += (t.numel() + _CHUNK - 1) // _CHUNK
    return total


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("pydistill_ext::gradient_match_forward")
def _forward_fake(grads_a, grads_b, metric):
    ref = grads_a[0]
    return (ref.new_empty(()),
            ref.new_empty((_rows(grads_a, metric), 3), dtype=_compute_dtype(ref.dtype)))


@torch.library.register_fake("pydistill_ext::gradient_match_backward")
def _backward_fake(grad, grads_a, grads_b, row_stats, metric, need_a, need_b):
    def like(ts):
        return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]
    return (like(grads_a) if need_a else []), (like(grads_b) if need_b else [])


def _setup_context(ctx, inputs, output):
    grads_a, grads_b, metric = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.n = len(grads_a)
    ctx.metric = metric
    ctx.save_for_backward(*grads_a, *grads_b, output[1])


def _backward(ctx, grad, _grad_stats):
    none = [None] * ctx.n  # list inputs take lists of gradients
    if grad is None:
        return none, none, None
    saved = ctx.saved_tensors
    a, b, stats = list(saved[:ctx.n]), list(saved[ctx.n:2 * ctx.n]), saved[-1]
    need_a, need_b = any(ctx.needs_input_grad[0]), any(ctx.needs_input_grad[1])
    ga, gb = ops.gradient_match_backward(grad, a, b, stats, ctx.metric, need_a, need_b)
    return (list(ga) if need_a else none), (list(gb) if need_b else none), None


torch.library.register_autograd("pydistill_ext::gradient_match_forward", _backward,
                                setup_context=_setup_context)


def _check(grads_a, grads_b, metric):
    for name, gs in (("grads_a", grads_a), ("grads_b", grads_b)):
        if not isinstance(gs, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(gs).__name__}")
        for i, t in enumerate(gs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOATS:
                raise ValueError(f"{name}[{i}] must be float64, float32, float16 or bfloat16, "
                                 f"got {t.dtype}")
    if len(grads_a) != len(grads_b):
        raise ValueError(f"grads_a and grads_b must have the same length, got {len(grads_a)} "
                         f"and {len(grads_b)}")
    if len(grads_a) == 0:
        raise ValueError("grads_a must hold at least one tensor")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    ref = grads_a[0]
    for i, (a, b) in enumerate(zip(grads_a, grads_b)):
        if a.shape != b.shape:
            raise ValueError(f"grads_b[{i}] shape {tuple(b.shape)} must equal grads_a[{i}] "
                             f"shape {tuple(a.shape)}")
        if a.dtype != ref.dtype or b.dtype != ref.dtype:
            raise ValueError(f"grads_a[{i}] / grads_b[{i}] dtype {a.dtype} / {b.dtype} must "
                             f"equal grads_a[0] dtype {ref.dtype}")
        if a.device != ref.device or b.device != ref.device:
            raise ValueError(f"grads_a[{i}] / grads_b[{i}] are on {a.device} / {b.device} but "
                             f"grads_a[0] is on {ref.device}")


def gradient_match_distance(grads_a: Sequence[torch.Tensor], grads_b: Sequence[torch.Tensor],
                            metric: str = "ours") -> torch.Tensor:
    """DC's gradient-matching distance between two lists of gradients (``match_loss`` of
    "Dataset Condensation with Gradient Matching", REFERENCE.md 3), as a scalar:

    * ``ours`` (DC's ``distance_wb``): each tensor of >= 2 dims is reshaped to [shape[0], rest]
      (conv [O, I, kh, kw] -> [O, I*kh*kw]) and contributes sum_rows (1 - <a_r, b_r> /
      (|a_r| |b_r| + 1e-6)); tensors of < 2 dims (biases, norm parameters) contribute 0.
    * ``mse``: sum over all tensors of sum (a - b)^2.
    * ``cos``: 1 - <A, B> / (|A| |B| + 1e-6) of all tensors flattened and concatenated.

    The lists hold pairwise equal shapes, one floating dtype and one device. Sums in float32
    (float64 for float64), result in that dtype. Differentiable w.r.t. both lists (first
    derivative; the second-order path of DC runs through the graph that made the gradients).
    One native call covers the whole list.
    """
    _check(grads_a, grads_b, metric)
    return ops.gradient_match_forward(list(grads_a), list(grads_b), metric)[0]
