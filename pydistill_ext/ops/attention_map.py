"""attention_map_forward / attention_map_backward: fake kernels, autograd and the public
function attention_map.

Autograd: the forward keeps the features and the unnormalised map a = sum_c |f|^p [N, H*W] in
the compute dtype (1/C of the features in float32); the registered backward op reads the
features once and writes the gradient (closed form in csrc/cpu/attention_map_kernel.cpp).
"""
from __future__ import annotations

import math

import torch

from pydistill_ext._lib import ops

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("pydistill_ext::attention_map_forward")
def _forward_fake(features, p, eps):
    n, _, h, w = features.shape
    return (features.new_empty((n, h * w)),
            features.new_empty((n, h * w), dtype=_compute_dtype(features.dtype)))


@torch.library.register_fake("pydistill_ext::attention_map_backward")
def _backward_fake(grad_out, features, a, p, eps):
    return torch.empty_like(features, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    features, p, eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(features, output[1])
    ctx.p, ctx.eps = p, eps


def _backward(ctx, grad_out, _grad_a):
    if grad_out is None or not ctx.needs_input_grad[0]:
        return None, None, None
    features, a = ctx.saved_tensors
    return ops.attention_map_backward(grad_out.contiguous(), features, a, ctx.p, ctx.eps), None, None


torch.library.register_autograd("pydistill_ext::attention_map_forward", _backward,
                                setup_context=_setup_context)


def attention_map(features: torch.Tensor, p: float = 4.0, eps: float = 1e-12) -> torch.Tensor:
    """Spatial attention map of ``features`` [N, C, H, W]: a = sum over channels of |f|^p,
    flattened to [N, H*W] and L2-normalised per sample as F.normalize (a / max(||a||_2, eps)).

    ``p`` > 0: 1 is DataDAM's code, 2 attention transfer (whose code uses the channel mean,
    i.e. this / C before normalising, which the normalisation cancels), 4 DataDAM's paper.
    The gradient at f = 0 is 0 for every p (for p < 1 the subgradient is defined as 0).
    Math in float32 (float64 for float64), output in ``features``' dtype; fused forward and
    backward kernels (REFERENCE.md 3).
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dtype not in _FLOATS:
        raise ValueError(f"features must be float64, float32, float16 or bfloat16, got {features.dtype}")
    if features.dim() != 4:
        raise ValueError(f"features must be [N, C, H, W], got shape {tuple(features.shape)}")
    for name, v in (("p", p), ("eps", eps)):
        if isinstance(v, (bool, torch.Tensor)) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a Python number, got {type(v).__name__}")
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"p must be finite and > 0, got {p}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return ops.attention_map_forward(features, float(p), float(eps))[0]
