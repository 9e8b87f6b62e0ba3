"""bn_moments_forward / bn_moments_backward: fake kernels, autograd and the public function
bn_moments (REFERENCE.md 4: DeepInversion / SRe2L / ZeroQ BatchNorm-statistic matching).

Autograd: the forward saves x and its own mean output; the backward is the native closed form
dL/dx = a_g + b_g * x (b_g = 2 g_v / M', a_g = g_m / M - b_g * mean_g; one read of x, one write).
Double backward: the backward op is itself differentiable, with its derivatives composed here
from torch ops (for gg = the gradient arriving at grad_x, reductions over the group's elements):
    d/d grad_mean = sum(gg) / M
    d/d grad_var  = (2 / M') * sum(gg * (x - mean))
    d/d x         = b_g * gg                      (the direct dependence)
    d/d mean      = -b_g * sum(gg)                (mean is the forward's output, so this flows
                                                   back into x through the forward's backward)
"""
from __future__ import annotations

from typing import Tuple

import torch

from pydistill_ext._lib import ops

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _out_shape(x, per_sample):
    return (x.shape[0], x.shape[1]) if per_sample else (x.shape[1],)


@torch.library.register_fake("pydistill_ext::bn_moments_forward")
def _forward_fake(x, per_sample, unbiased):
    shape = _out_shape(x, per_sample)
    dt = _compute_dtype(x.dtype)
    return x.new_empty(shape, dtype=dt), x.new_empty(shape, dtype=dt)


@torch.library.register_fake("pydistill_ext::bn_moments_backward")
def _backward_fake(grad_mean, grad_var, x, mean, per_sample, unbiased):
    return torch.empty_like(x)


def _counts(x, per_sample, unbiased):
    spatial = 1
    for d in x.shape[2:]:
        spatial *= d
    m = spatial if per_sample else x.shape[0] * spatial
    return m, (m - 1 if unbiased else m)


def _setup_context(ctx, inputs, output):
    x, per_sample, unbiased = inputs
    ctx.per_sample, ctx.unbiased = per_sample, unbiased
    ctx.save_for_backward(x, output[0])


def _backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    if grad_mean is None:
        grad_mean = torch.zeros_like(mean)
    if grad_var is None:
        grad_var = torch.zeros_like(mean)
    grad_x = ops.bn_moments_backward(grad_mean.contiguous(), grad_var.contiguous(), x, mean,
                                     ctx.per_sample, ctx.unbiased)
    return grad_x, None, None


torch.library.register_autograd("pydistill_ext::bn_moments_forward", _backward,
                                setup_context=_setup_context)


def _setup_context_bwd(ctx, inputs, output):
    grad_mean, grad_var, x, mean, per_sample, unbiased = inputs
    ctx.per_sample, ctx.unbiased = per_sample, unbiased
    ctx.save_for_backward(grad_var, x, mean)


def _backward_bwd(ctx, gg):
    grad_var, x, mean = ctx.saved_tensors
    per_sample, unbiased = ctx.per_sample, ctx.unbiased
    need_gm, need_gv, need_x, need_mean = ctx.needs_input_grad[:4]
    m, mp = _counts(x, per_sample, unbiased)
    op = _compute_dtype(x.dtype)
    trail = (1,) * (x.dim() - 2)
    dims = list(range(2, x.dim())) if per_sample else [0] + list(range(2, x.dim()))
    if per_sample:
        shape = (x.shape[0], x.shape[1]) + trail
    else:
        shape = (1, x.shape[1]) + trail
    ggo = gg.to(op)
    b = grad_var.reshape(shape) * (2.0 / mp)
    sum_gg = ggo.sum(dims) if (need_gm or need_mean) else None
    d_gm = sum_gg / m if need_gm else None
    d_gv = None
    if need_gv:
        d_gv = (ggo * (x.to(op) - mean.reshape(shape))).sum(dims) * (2.0 / mp)
    d_x = (b * ggo).to(x.dtype) if need_x else None
    d_mean = (-b.reshape(mean.shape) * sum_gg) if need_mean else None
    return d_gm, d_gv, d_x, d_mean, None, None


torch.library.register_autograd("pydistill_ext::bn_moments_backward", _backward_bwd,
                                setup_context=_setup_context_bwd)


def _check(x, per_sample, unbiased):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample must be a bool, got {type(per_sample).__name__}")
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be [N, C, *] with at least 2 dims, got shape {tuple(x.shape)}")
    m, _ = _counts(x, per_sample, unbiased)
    if m == 0:
        what = "prod(x.shape[2:])" if per_sample else "N * prod(x.shape[2:])"
        raise ValueError(f"x has an empty reduction: {what} = 0 elements per "
                         f"{'(sample, channel)' if per_sample else 'channel'} for shape "
                         f"{tuple(x.shape)}")
    if unbiased and m == 1:
        raise ValueError(f"unbiased=True needs at least 2 elements per "
                         f"{'(sample, channel)' if per_sample else 'channel'}, got 1 for x of "
                         f"shape {tuple(x.shape)}")


def bn_moments(x: torch.Tensor, *, per_sample: bool = False,
               unbiased: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of a BatchNorm input ``x`` [N, C, *] (REFERENCE.md 4.1).

    Returns ``(mean, var)``, each [C]: statistics over every dim except 1, exactly what the
    DeepInversion / SRe2L hook computes (``x.mean([0, 2, 3])`` and the biased
    ``x.permute(1, 0, 2, 3).contiguous().view(C, -1).var(1, unbiased=False)``) but in one read
    of ``x`` and with no copy. ``per_sample=True``: per (sample, channel) over the trailing dims
    only, [N, C] (ZeroQ's form). ``unbiased=True`` divides by M - 1 instead of the count M
    (ZeroQ uses it); it needs M >= 2.

    Accumulation: one-pass Welford updates and Chan merges in float32 (float64 for float64) in
    an order fixed by the shape alone: bitwise reproducible, independent of the thread count.
    Outputs are in that compute dtype: float64 for float64 inputs, float32 for float32,
    float16 and bfloat16 (a float16 variance would overflow above 65504 and round to 11 bits).
    Any memory format; contiguous (NCHW) and channels_last are read in place.

    Differentiable w.r.t. ``x`` (closed form, one read of x and one write:
    dL/dx = g_m / M + 2 g_v (x - mean) / M'), twice differentiable.
    """
    _check(x, per_sample, unbiased)
    return ops.bn_moments_forward(x, per_sample, unbiased)


# ------------------------------------------------------------------ frozen_bn_moments (stretch)
@torch.library.register_fake("pydistill_ext::frozen_bn_moments_forward")
def _frozen_forward_fake(x, scale, shift, per_sample, unbiased):
    shape = _out_shape(x, per_sample)
    dt = _compute_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(shape, dtype=dt), x.new_empty(shape, dtype=dt)


@torch.library.register_fake("pydistill_ext::frozen_bn_moments_backward")
def _frozen_backward_fake(grad_y, grad_mean, grad_var, x, mean, scale, per_sample, unbiased):
    return torch.empty_like(x)


def _frozen_setup_context(ctx, inputs, output):
    x, scale, _, per_sample, unbiased = inputs
    ctx.per_sample, ctx.unbiased = per_sample, unbiased
    ctx.save_for_backward(x, output[1], scale)


def _frozen_backward(ctx, grad_y, grad_mean, grad_var):
    x, mean, scale = ctx.saved_tensors
    need_x, need_scale, need_shift = ctx.needs_input_grad[:3]
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    if grad_mean is None:
        grad_mean = torch.zeros_like(mean)
    if grad_var is None:
        grad_var = torch.zeros_like(mean)
    grad_x = grad_scale = grad_shift = None
    if need_x:
        grad_x = ops.frozen_bn_moments_backward(grad_y, grad_mean.contiguous(),
                                                grad_var.contiguous(), x, mean, scale,
                                                ctx.per_sample, ctx.unbiased)
    if need_scale or need_shift:  # y = scale * x + shift: per-channel reductions of grad_y
        dims = [0] + list(range(2, x.dim()))
        op = scale.dtype
        gy = grad_y.to(op)
        if need_scale:
            grad_scale = (gy * x.to(op)).sum(dims)
        if need_shift:
            grad_shift = gy.sum(dims)
    return grad_x, grad_scale, grad_shift, None, None


torch.library.register_autograd("pydistill_ext::frozen_bn_moments_forward", _frozen_backward,
                                setup_context=_frozen_setup_context)


def _frozen_no_double_backward(ctx, grad):
    raise RuntimeError("pydistill_ext: frozen_bn_moments does not support double backward; "
                       "use F.batch_norm (eval) + pde.bn_moments, which do")


torch.library.register_autograd("pydistill_ext::frozen_bn_moments_backward",
                                _frozen_no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def frozen_bn_moments(x: torch.Tensor, weight, bias, running_mean: torch.Tensor,
                      running_var: torch.Tensor, eps: float = 1e-5, *, per_sample: bool = False,
                      unbiased: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A frozen (eval-mode) BatchNorm and the moments of its input in one read of ``x``:
    returns ``(y, mean, var)`` with ``y = F.batch_norm(x, running_mean, running_var, weight,
    bias, training=False, eps=eps)`` (in x's dtype and memory format) and ``(mean, var) =
    bn_moments(x, per_sample=per_sample, unbiased=unbiased)``.

    Made for swapping a teacher's eval-mode BN layers during BN-statistic matching
    (DeepInversion, SRe2L): the statistics then cost no extra pass over the activation, and
    the backward is one pass, dL/dx = k_c grad_y + a_g + b_g x with k = weight / sqrt(running_var
    + eps). ``weight`` / ``bias`` may be None (1 / 0). Gradients also reach weight, bias and the
    running statistics when they require grad. CPU only; no double backward.
    """
    _check(x, per_sample, unbiased)
    if x.device.type != "cpu":
        raise NotImplementedError(f"frozen_bn_moments has a CPU kernel only (x is on {x.device}); "
                                  "on other devices use F.batch_norm(..., training=False) and "
                                  "pde.bn_moments")
    c = x.shape[1]
    op = _compute_dtype(x.dtype)
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is None and name in ("weight", "bias"):
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (c,):
            raise ValueError(f"{name} must be a [C] = [{c}] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    scale = torch.rsqrt(running_var.to(op) + eps)
    if weight is not None:
        scale = weight.to(op) * scale
    shift = -running_mean.to(op) * scale
    if bias is not None:
        shift = shift + bias.to(op)
    return ops.frozen_bn_moments_forward(x, scale, shift, per_sample, unbiased)
