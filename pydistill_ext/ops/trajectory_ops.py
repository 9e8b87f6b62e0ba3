"""param_distance / sgd_step_accumulate: fake kernels, autograd and the public functions
(REFERENCE.md 5.2; issue 6, "The unrolled inner loop").

param_distance_forward(theta, target, start) -> (loss, den): L = num / den with
num = ‖θ − θ*‖², den = ‖θ_0 − θ*‖² per row. Autograd (upstream gL for L, gD for den):
    a = 2 gL / den,   b = −2 gL L / den + 2 gD
    ∂/∂θ = a (θ − θ*),   ∂/∂θ_0 = b (θ_0 − θ*),   ∂/∂θ* = −a (θ − θ*) − b (θ_0 − θ*)
(from ∂num/∂θ = 2(θ − θ*), ∂den/∂θ_0 = 2(θ_0 − θ*), ∂L/∂num = 1/den, ∂L/∂den = −L/den, and θ*
entering both differences with the opposite sign). The per-row coefficients a, b are computed
here (K scalars); the native backward is the one elementwise pass, and computes only the
gradients asked for. Double backward: when the backward itself is differentiated
(create_graph=True) the same formulas are evaluated with torch ops from the inputs, so
gradgradcheck holds.

sgd_step_accumulate(theta, grad, lr, grad_sum) -> (θ − lr g, G + g). Autograd, for upstream
gradients u (of θ') and w (of G'):
    ∂/∂θ = u,   ∂/∂g = w − lr u,   ∂/∂lr = −Σ u·g,   ∂/∂G = w
written with torch ops (elementwise plus one dot product: nothing to fuse), so it is twice
differentiable.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch

from pydistill_ext._lib import ops

_DTYPES = (torch.float32, torch.float64)


# ------------------------------------------------------------------------- param_distance
@torch.library.register_fake("pydistill_ext::param_distance_forward")
def _pd_forward_fake(theta, target, start):
    shape = theta.shape[:-1]
    return theta.new_empty(shape), theta.new_empty(shape)


@torch.library.register_fake("pydistill_ext::param_distance_backward")
def _pd_backward_fake(coef_theta, coef_start, theta, target, start, need_theta, need_target,
                      need_start):
    def out(need):
        return theta.new_empty(theta.shape if need else (0,))
    return out(need_theta), out(need_target), out(need_start)


def _pd_setup_context(ctx, inputs, output):
    theta, target, start = inputs
    ctx.save_for_backward(theta, target, start, output[0], output[1])


def _pd_backward(ctx, g_loss, g_den):
    theta, target, start, loss, den = ctx.saved_tensors
    need_theta, need_target, need_start = ctx.needs_input_grad[:3]
    if not (need_theta or need_target or need_start):
        return None, None, None
    if g_loss is None:
        g_loss = torch.zeros_like(loss)
    if g_den is None:
        g_den = torch.zeros_like(den)
    if torch.is_grad_enabled():
        # create_graph: the same formulas from the inputs with torch ops (differentiable)
        d, e = theta - target, start - target
        dd = (e * e).sum(-1)
        ll = (d * d).sum(-1) / dd
        a = (2.0 * g_loss / dd).unsqueeze(-1)
        b = (-2.0 * g_loss * ll / dd + 2.0 * g_den).unsqueeze(-1)
        gx, gs = a * d, b * e
        return (gx if need_theta else None, (-gx - gs) if need_target else None,
                gs if need_start else None)
    a = (2.0 * g_loss / den).contiguous()
    b = (-2.0 * g_loss * loss / den + 2.0 * g_den).contiguous()
    gx, gt, gs = ops.param_distance_backward(a, b, theta, target, start, need_theta,
                                             need_target, need_start)
    return (gx if need_theta else None, gt if need_target else None,
            gs if need_start else None)


torch.library.register_autograd("pydistill_ext::param_distance_forward", _pd_backward,
                                setup_context=_pd_setup_context)


def _check_vectors(names_tensors, ref_name):
    ref = names_tensors[0][1]
    for name, t in names_tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ref.dtype not in _DTYPES:
        raise ValueError(f"{ref_name} must be float32 or float64, got {ref.dtype}")
    for name, t in names_tensors[1:]:
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, got "
                             f"{tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def param_distance(theta: torch.Tensor, target: torch.Tensor,
                   start: torch.Tensor) -> torch.Tensor:
    """MTT's normalised parameter distance ‖θ − θ*‖² / ‖θ_0 − θ*‖² (REFERENCE.md 5.2, MTT Eq. 2)
    in one fused pass over the three vectors.

    ``theta`` (θ, the student's final parameters), ``target`` (θ*, the expert's later
    checkpoint) and ``start`` (θ_0, the expert checkpoint the student started from): flat
    vectors [P], or batches [K, P] of K independent problems (-> [K]); same shape, dtype
    (float32 or float64) and device. Returns the loss in that dtype (0-dim or [K]).

    Accumulation: float32 within fixed blocks of 4096 elements (float64 for float64 inputs),
    block partials folded in float64; the order depends on the shape only (bitwise
    reproducible, independent of the thread count). Differentiable w.r.t. all three inputs in
    closed form (∂L/∂θ = 2(θ − θ*)/D, ∂L/∂θ_0 = −2L(θ_0 − θ*)/D, ∂L/∂θ* = minus their sum; one
    elementwise pass), twice differentiable.

    D = ‖θ_0 − θ*‖² = 0 (start equal to target) is not checked, since that needs a device
    sync: as the eager formula, the result is inf (nan when θ = θ* too) and the gradients are
    not finite. Callers that can meet it should check ``start`` and ``target`` beforehand.
    """
    _check_vectors([("theta", theta), ("target", target), ("start", start)], "theta")
    if theta.dim() not in (1, 2):
        raise ValueError(f"theta must be a flat vector [P] or a batch [K, P], got shape "
                         f"{tuple(theta.shape)}")
    if theta.shape[-1] == 0:
        raise ValueError("theta has no parameters (P = 0)")
    return ops.param_distance_forward(theta, target, start)[0]


# -------------------------------------------------------------------- sgd_step_accumulate
@torch.library.register_fake("pydistill_ext::sgd_step_accumulate")
def _sgd_fake(theta, grad, lr, grad_sum):
    return torch.empty_like(theta, memory_format=torch.contiguous_format), \
        torch.empty_like(theta, memory_format=torch.contiguous_format)


def _sgd_setup_context(ctx, inputs, output):
    theta, grad, lr, grad_sum = inputs
    ctx.save_for_backward(grad, lr)


def _sgd_backward(ctx, u, w):
    grad, lr = ctx.saved_tensors
    need_theta, need_grad, need_lr, need_sum = ctx.needs_input_grad[:4]
    d_theta = d_grad = d_lr = d_sum = None
    if need_theta:
        d_theta = u if u is not None else torch.zeros_like(grad)
    if need_grad:
        if u is None:
            d_grad = w if w is not None else torch.zeros_like(grad)
        elif w is None:
            d_grad = -lr * u
        else:
            d_grad = torch.addcmul(w, lr, u, value=-1.0)
    if need_lr:
        d_lr = -(u * grad).sum() if u is not None else torch.zeros_like(lr)
    if need_sum:
        d_sum = w if w is not None else torch.zeros_like(grad)
    return d_theta, d_grad, d_lr, d_sum


torch.library.register_autograd("pydistill_ext::sgd_step_accumulate", _sgd_backward,
                                setup_context=_sgd_setup_context)


def sgd_step_accumulate(theta: torch.Tensor, grad: torch.Tensor,
                        lr: Union[torch.Tensor, float],
                        grad_sum: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of the unrolled student that also keeps TESLA's running gradient sum:
    returns ``(theta − lr * grad, grad_sum + grad)`` in one pass (REFERENCE.md 5.2 / 5.4:
    θ_{i+1} = θ_i − α g_i and G = Σ_i g_i, so that θ_N = θ_0 − α G).

    ``theta``, ``grad``, ``grad_sum``: one shape (any; flat [P] in the trajectory code), float32
    or float64, one device. ``lr``: a 0-dim tensor of that dtype and device (a learnable step
    size; a Python float is converted). The kernel reads lr on the device (no host sync). The
    inputs are not modified; both outputs are new contiguous tensors. ``theta − lr * grad`` is
    rounded once (fused multiply-add), so it can differ from the eager two-op expression by
    one ulp.

    Differentiable w.r.t. theta, grad, lr and grad_sum (both outputs are differentiable:
    ∂/∂θ = u, ∂/∂g = w − lr u, ∂/∂lr = −Σ u·g, ∂/∂G = w for upstream gradients u of θ', w of
    G'), twice differentiable.
    """
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and isinstance(theta,
                                                                                torch.Tensor):
        lr = torch.tensor(float(lr), dtype=theta.dtype, device=theta.device)
    _check_vectors([("theta", theta), ("grad", grad), ("grad_sum", grad_sum)], "theta")
    if not isinstance(lr, torch.Tensor):
        raise TypeError(f"lr must be a 0-dim tensor or a float, got {type(lr).__name__}")
    if lr.dim() != 0:
        raise ValueError(f"lr must be a 0-dim tensor, got shape {tuple(lr.shape)}")
    if lr.dtype != theta.dtype:
        raise ValueError(f"lr must have theta's dtype {theta.dtype}, got {lr.dtype}")
    if lr.device != theta.device:
        raise ValueError(f"lr is on {lr.device} but theta is on {theta.device}")
    return ops.sgd_step_accumulate(theta, grad, lr, grad_sum)
