"""dsa_apply_forward / dsa_apply_backward: fake kernels, autograd, the packing of a
:class:`~pydistill_ext.augment.dsa.DSATransform` into the op's arguments, and the public
``dsa_augment`` (``pde.dsa_augment``) on the fused op.

The op applies the canonical DSA chain colour -> crop -> cutout -> flip -> scale -> rotate
(every op optional) in one pass per output pixel; math in csrc/include/pydistill/dsa_taps.h.
The parameters are those of :func:`~pydistill_ext.augment.dsa.dsa_params`, so a seed gives the
same transform as the pure-torch path (``dsa_apply(x, t, fused=False)``), which stays the
reference and the fallback for transforms whose ops are not in canonical order (e.g. the
strategy ``"flip_crop_color"`` in mode "all").

Autograd: the op is affine in x (y = A x + b W, b the brightness shift), so the backward op
needs only the parameters (A^T g), and the backward of the backward is A gg = the forward with
the brightness column zeroed: double backward (gradgradcheck) works too.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from pydistill_ext._lib import ops
from pydistill_ext.augment import dsa as _dsa

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
#: the op's flag bits (csrc/include/pydistill/dsa_taps.h)
CROP, CUTOUT, FLIP, SCALE, ROTATE, CONTRAST = 1, 2, 4, 8, 16, 32
NUM_PARAMS = 14
#: the canonical op order the kernel implements (== DSA_OPS)
_ORDER = {name: i for i, name in enumerate(_dsa.DSA_OPS)}
_FLAG = {"crop": CROP, "cutout": CUTOUT, "flip": FLIP, "scale": SCALE, "rotate": ROTATE,
         "contrast": CONTRAST}


@torch.library.register_fake("pydistill_ext::dsa_apply_forward")
def _forward_fake(x, params, flags, align_corners):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("pydistill_ext::dsa_apply_backward")
def _backward_fake(grad_out, params, flags, align_corners):
    return torch.empty_like(grad_out, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, params, flags, align_corners = inputs
    ctx.save_for_backward(params)
    ctx.flags, ctx.align_corners = flags, align_corners


def _forward_backward(ctx, grad_out):
    if grad_out is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    (params,) = ctx.saved_tensors
    return (ops.dsa_apply_backward(grad_out.contiguous(), params, ctx.flags, ctx.align_corners),
            None, None, None)


def _no_brightness(params):
    return torch.cat([torch.zeros_like(params[:, :1]), params[:, 1:]], dim=1)


def _backward_backward(ctx, gg):
    # d/d grad_out of <gg, A^T grad_out> = A gg: the forward without its constant b W term
    if gg is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    (params,) = ctx.saved_tensors
    return (ops.dsa_apply_forward(gg.contiguous(), _no_brightness(params), ctx.flags,
                                  ctx.align_corners), None, None, None)


torch.library.register_autograd("pydistill_ext::dsa_apply_forward", _forward_backward,
                                setup_context=_setup_context)
torch.library.register_autograd("pydistill_ext::dsa_apply_backward", _backward_backward,
                                setup_context=_setup_context)


def pack_transform(t: "_dsa.DSATransform") -> Optional[Tuple[torch.Tensor, int]]:
    """(params [N, 14] float64 CPU, flags) of the op for transform ``t``, or None when its ops
    are not a subsequence of the canonical order (then only the pure-torch path applies it).

    Columns: 0 brightness shift, 1 saturation factor, 2 contrast factor (identities 0, 1, 1 when
    absent), 3-4 crop (dh, dw), 5-8 cutout (top = centre - size // 2, left, size_h, size_w),
    9 flip, 10-11 scale (sx, sy), 12-13 rotate (cos a, sin a). Integers are exact in float64.
    """
    names = [op.name for op in t.ops]
    idx = [_ORDER.get(n, -1) for n in names]
    if any(i < 0 for i in idx) or any(b <= a for a, b in zip(idx, idx[1:])):
        return None
    n = t.batch_size
    cols = [torch.zeros(n, dtype=torch.float64) for _ in range(NUM_PARAMS)]
    cols[1] = torch.ones(n, dtype=torch.float64)
    cols[2] = torch.ones(n, dtype=torch.float64)
    flags = 0
    for op in t.ops:
        v = op.values
        flags |= _FLAG.get(op.name, 0)
        if op.name == "brightness":
            cols[0] = v["shift"]
        elif op.name == "saturation":
            cols[1] = v["factor"]
        elif op.name == "contrast":
            cols[2] = v["factor"]
        elif op.name == "crop":
            cols[3], cols[4] = v["shift_h"], v["shift_w"]
        elif op.name == "cutout":
            cols[5] = v["center_h"] - v["size_h"] // 2
            cols[6] = v["center_w"] - v["size_w"] // 2
            cols[7], cols[8] = v["size_h"], v["size_w"]
        elif op.name == "flip":
            cols[9] = v["flip"]
        elif op.name == "scale":
            cols[10], cols[11] = v["sx"], v["sy"]
        elif op.name == "rotate":
            a = v["angle"].to(torch.float64)
            cols[12], cols[13] = torch.cos(a), torch.sin(a)
    params = torch.stack([c.to(device="cpu", dtype=torch.float64) for c in cols], dim=1)
    return params, flags


def _check_x(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dsa: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"dsa: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"dsa: x must be a floating-point tensor (float64, float32, float16 or "
                        f"bfloat16), got dtype {x.dtype}")


def dsa_apply_fused(x: torch.Tensor, params: torch.Tensor, flags: int,
                    align_corners: bool = False) -> torch.Tensor:
    """The fused op on packed arguments (see :func:`pack_transform`): x [N, C, H, W] float,
    params [N, 14] float64 (moved to x's device), flags in [0, 63]. Differentiable w.r.t. x
    (to any order)."""
    _check_x(x)
    if not isinstance(params, torch.Tensor) or params.dtype != torch.float64:
        raise TypeError("dsa: params must be a float64 tensor, got "
                        f"{getattr(params, 'dtype', type(params).__name__)}")
    if params.dim() != 2 or params.shape[0] != x.shape[0] or params.shape[1] != NUM_PARAMS:
        raise ValueError(f"dsa: params must be [N, {NUM_PARAMS}] with N = {x.shape[0]} "
                         f"(x.shape[0]), got shape {tuple(params.shape)}")
    if isinstance(flags, bool) or not isinstance(flags, int) or not 0 <= flags <= 63:
        raise ValueError(f"dsa: flags must be an int in [0, 63], got {flags!r}")
    if not isinstance(align_corners, bool):
        raise TypeError(f"dsa: align_corners must be a bool, got {align_corners!r}")
    return ops.dsa_apply_forward(x, params.to(x.device), flags, align_corners)


def dsa_augment(x: torch.Tensor, *, seed: int, strategy: str = _dsa.DEFAULT_STRATEGY,
                per_sample: bool = False, mode: str = "single",
                params: Optional["_dsa.DSAParams"] = None) -> torch.Tensor:
    """Differentiable Siamese Augmentation of ``x`` [N, C, H, W] driven by ``seed``, on the
    fused op: ``dsa_apply(x, dsa_params(seed, x.shape, ...))`` (same arguments and semantics as
    :func:`pydistill_ext.augment.dsa_augment`, which is this function). Same seed -> same
    transform as the pure-torch path, bitwise identical output across calls; the global RNG is
    never touched."""
    return _dsa.dsa_augment(x, seed=seed, strategy=strategy, per_sample=per_sample, mode=mode,
                            params=params)
