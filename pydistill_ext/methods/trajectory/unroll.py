"""The unrolled inner loop of trajectory matching and its three gradient modes.

MTT — Cazenavette et al., "Dataset Distillation by Matching Training Trajectories", CVPR 2022,
Eq. (1)–(2) and Algorithm 1 (REFERENCE.md 5.2). Starting from an expert checkpoint
θ_0 = θ*_t, a student takes N = ``syn_steps`` SGD steps on synthetic minibatches with a
learnable step size α (``syn_lr``)::

    g_i     = ∇_θ ℓ(f(A_i(X[b_i]); θ_i), y[b_i])          (A_i: step i's DSA transform)
    θ_{i+1} = θ_i − α g_i                                   i = 0 .. N−1
    L       = ‖θ_N − θ*_{t+M}‖² / D,   D = ‖θ*_t − θ*_{t+M}‖²

and L is minimised over the images X, α and (DATM / TESLA) soft labels y.

Everything random in one call is a function of ``seed`` and the step index: minibatch b_i is
chunk ``i mod c`` of permutation ``i div c`` (c = ⌈n / batch_syn⌉ chunks per permutation —
MTT's ``indices_chunks`` refilled from ``randperm`` when empty), each permutation drawn from its
own derived seed, and A_i is ``dsa_params(derive(seed, i))``. So step i can be rebuilt
exactly in a reverse sweep without storing the minibatch or the augmentation.

Three gradient modes, same API (:func:`trajectory_step`):

``unroll`` (MTT)
    ``create_graph=True`` through all N steps, then one backward. Saved-graph memory grows
    linearly with N (≈ 2.8 MB per image per step for ConvNet-3 at 32², REFERENCE.md 5.5).

``exact`` (default) — the adjoint (reverse-mode by hand, REFERENCE.md 5.5)
    Forward: N detached SGD steps, keeping only θ_0 .. θ_{N−1} (N·P numbers; no graph).
    Reverse: with λ_{i+1} := ∂L/∂θ_{i+1} and θ_{i+1} = θ_i − α g_i(θ_i, X, y)::

        λ_N        = 2 (θ_N − θ*) / D
        ∂L/∂θ_i    = λ_{i+1}ᵀ ∂θ_{i+1}/∂θ_i = λ_{i+1} − α H_i λ_{i+1}      (H_i = ∂g_i/∂θ_i,
                                                                           symmetric)
        ∂L/∂X     += −α (∂g_i/∂X)ᵀ λ_{i+1} = −α ∇_X (λ_{i+1} · g_i)
        ∂L/∂y     += −α ∇_y (λ_{i+1} · g_i)
        ∂L/∂α     += −λ_{i+1} · g_i

    (λ is treated as a constant in the inner products: it depends on steps after i only.)
    For each i = N−1 .. 0 step i is rebuilt — same θ_i, same minibatch, same augmentation —
    g_i is taken with ``create_graph=True`` and ONE double-backward
    ``grad(λ_{i+1}·g_i, (θ_i, X_b, y_b))`` returns H_i λ_{i+1} (the vector–Hessian product
    that carries the adjoint to step i−1) together with the image and label gradients.
    The result is the exact gradient of L (the same chain rule as ``unroll``, summed in the
    same order up to floating-point association); the autograd graph alive at any time is
    that of ONE step, so saved-graph memory does not grow with N. What does grow is the
    trajectory storage θ_0..θ_{N−1}: N·P numbers (1.27 MB per step for ConvNet-3 on MNIST),
    which is reported separately by the benchmark; ``checkpoint_every`` cuts it to
    ⌈N/k⌉ + k vectors (k = ⌈√N⌉: O(√N)) at the price of recomputing the forward steps of
    each segment once more.

``tesla`` — TESLA, Cui et al., "Scaling Up Dataset Distillation to ImageNet-1K with Constant
Memory", ICML 2023, Eq. (5)–(6) (REFERENCE.md 5.4)
    TESLA writes θ_N = θ_0 − α Σ_i g_i and differentiates the loss treating every θ_i as a
    constant w.r.t. X, i.e. it keeps λ frozen at λ_N and drops the Hessian terms::

        ∂L/∂X ≈ Σ_i −α ∇_X (λ_N · g_i),   ∂L/∂α = −λ_N · Σ_i g_i

    (its code's ``2 · grad((α(θ*−θ_0) + α²G)·g_i / D, x_i)`` is the same expression, since
    α(θ*−θ_0) + α²G = −α(θ_N − θ*)). This mode is that approximation, computed on the same
    reverse sweep as ``exact`` without the Hessian product. The implementation's bug
    ``2 * torch.autograd.grad(...)`` (which repeats the tuple instead of doubling, so the
    image gradient of the released code is half of Eq. 6; tesla issue 5, fixed in DATM's
    ``DATM_tesla.py``) is NOT reproduced: the factor 2 sits in λ_N. The approximation
    itself (tesla issue 4) is kept: that is the mode's purpose; its deviation from the exact
    gradient is measured in the tests and the benchmark.

The student is functional over ONE flat parameter vector (:class:`FlatModel`; MTT's
``ReparamModule``): parameters are views of the vector, buffers are not reparametrised.

Fused ops (``pydistill_ext/ops/trajectory_ops.py``; float32 / float64 parameters, eager torch
otherwise): the loss L, its denominator D and λ_N = 2(θ_N − θ*)/D come from
``pde.param_distance`` (one read of θ_N, θ*, θ_0; λ_N from its native backward), in every mode.
The detached forward sweep of ``exact`` / ``tesla`` takes its steps with
``pde.sgd_step_accumulate``, which returns θ_{i+1} = θ_i − α g_i (one rounding, fma) and the
running sum G = Σ_i g_i in the same pass; ``tesla`` takes ∂L/∂α = −λ_N · G from it (TESLA's
Eq. 6 form) instead of summing −λ_N · g_i in the reverse sweep. The reverse sweep recomputes
θ_i with the same op, so checkpointed segments stay bitwise equal to the stored θ_i. ``unroll``
takes its differentiable steps with the same op too (its autograd backward is one addcmul and
one dot product instead of the eager mul / sub nodes; the G output is discarded there). Timings
of both ops against the eager forms: benchmarks/results/bench_trajectory_ops.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pydistill_ext.ops.trajectory_ops import param_distance as _param_distance
from pydistill_ext._lib import ops as _ops
from pydistill_ext.augment.dsa import DSAParams, dsa_apply, dsa_params

__all__ = ["FlatModel", "TrajectoryResult", "trajectory_step", "derive_seed", "step_batch",
           "param_distance_loss", "MODES"]

MODES = ("exact", "unroll", "tesla")
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------- seeds
def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``seed`` and integer ``keys`` (SplitMix64 finaliser, chained): a
    pure function, so any step's randomness can be recomputed without replaying the others."""
    z = int(seed) & _MASK64
    for k in keys:
        z = (z ^ (int(k) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        z ^= z >> 31
    return z >> 1


_TAG_PERM, _TAG_AUG = 1, 2


def step_batch(seed: int, step: int, n: int, batch_syn: int) -> torch.Tensor:
    """Indices of step ``step``'s synthetic minibatch: chunk ``step mod c`` of the permutation
    number ``step div c`` (c = ⌈n / batch_syn⌉), each permutation seeded by
    ``derive_seed(seed, 1, number)``. ``batch_syn >= n``: the whole set, in order."""
    if batch_syn >= n:
        return torch.arange(n)
    chunks = -(-n // batch_syn)
    perm_no, chunk = divmod(step, chunks)
    g = torch.Generator().manual_seed(derive_seed(seed, _TAG_PERM, perm_no))
    perm = torch.randperm(n, generator=g)
    return perm[chunk * batch_syn:(chunk + 1) * batch_syn]


# ---------------------------------------------------------------------------------- student
class FlatModel:
    """A module evaluated functionally at a flat parameter vector (MTT's ``ReparamModule``).

    ``model(flat, x)`` runs ``module`` with its parameters replaced by views of ``flat``
    (``torch.func.functional_call``); buffers stay the module's own. ``flatten(module)`` gives
    the vector in the same order (``named_parameters``), so expert checkpoints, students and
    buffers share one layout.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)
        self.buffers = dict(module.named_buffers())

    def flatten(self, module: Optional[nn.Module] = None) -> torch.Tensor:
        m = self.module if module is None else module
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        if flat.shape[-1] != self.num_params:
            raise ValueError(f"flat parameter vector has {flat.shape[-1]} entries, the model "
                             f"{self.num_params}")
        out, off = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.numels):
            out[name] = flat[..., off:off + n].view(*flat.shape[:-1], *shape)
            off += n
        return out

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, {**self.unflatten(flat), **self.buffers}, (x,))


# ---------------------------------------------------------------------------------- pieces
def inner_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The student's loss: cross-entropy for int labels; for float labels (logits, the soft
    labels of TESLA / DATM) the soft cross-entropy ``−Σ softmax(y) log softmax(z) / B``
    (DATM ``SoftCrossEntropy``)."""
    if labels.is_floating_point():
        return -(F.softmax(labels, dim=1) * F.log_softmax(logits, dim=1)).sum() / logits.shape[0]
    return F.cross_entropy(logits, labels)


def _fused(*ts) -> bool:
    return all(t.dtype in (torch.float32, torch.float64) for t in ts)


def param_distance_loss(theta_n: torch.Tensor, target: torch.Tensor,
                        start: torch.Tensor) -> torch.Tensor:
    """MTT Eq. (2): ‖θ_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖² (MTT divides both by P; it cancels).
    ``pde.param_distance`` (fused, closed-form backward) for float32 / float64 vectors of one
    dtype; the eager formula otherwise."""
    if _fused(theta_n, target, start) and theta_n.dtype == target.dtype == start.dtype:
        return _param_distance(theta_n, target, start)
    return (theta_n - target).pow(2).sum() / (start - target).pow(2).sum()


def _loss_and_adjoint(theta_n, target, start):
    """L = ‖θ_N − θ*‖² / D and λ_N = ∂L/∂θ_N = 2(θ_N − θ*)/D, detached: one fused forward pass
    and one elementwise pass (the native backward with coefficient a = 2/D, b = 0, only the
    θ gradient)."""
    if _fused(theta_n):
        loss, den = _ops.param_distance_forward(theta_n, target, start)
        a = 2.0 / den
        lam = _ops.param_distance_backward(a, torch.zeros_like(a), theta_n, target, start,
                                           True, False, False)[0]
        return loss, lam
    D = (start - target).pow(2).sum()
    return (theta_n - target).pow(2).sum() / D, 2.0 * (theta_n - target) / D


@dataclass
class Augment:
    """How step i's minibatch is augmented: DSA ``strategy`` (None: no augmentation),
    ``per_sample`` parameters (MTT: the DSA code's unseeded per-sample mode) and strengths."""
    strategy: Optional[str] = None
    per_sample: bool = True
    params: Optional[DSAParams] = None

    def transform(self, seed: int, step: int, shape):
        if not self.strategy:
            return None
        return dsa_params(derive_seed(seed, _TAG_AUG, step), shape, strategy=self.strategy,
                          per_sample=self.per_sample, params=self.params)


@dataclass
class TrajectoryResult:
    """``loss`` (detached scalar), gradients of the loss w.r.t. the images ``[n, ...]``,
    ``syn_lr`` (0-d) and the labels (None unless float labels were given with
    ``requires_grad``); ``theta_n`` the student's final parameters (detached)."""
    loss: torch.Tensor
    grad_images: torch.Tensor
    grad_lr: torch.Tensor
    grad_labels: Optional[torch.Tensor]
    theta_n: torch.Tensor


class _Step:
    """Step i of the inner loop: its minibatch and augmentation, rebuilt from the seed."""

    def __init__(self, model: FlatModel, images, labels, seed, batch_syn, augment: Augment):
        self.model, self.images, self.labels = model, images, labels
        self.seed, self.batch_syn, self.augment = seed, batch_syn, augment
        self.n = images.shape[0]

    def batch(self, i: int):
        idx = step_batch(self.seed, i, self.n, self.batch_syn).to(self.images.device)
        t = self.augment.transform(self.seed, i, (len(idx), *self.images.shape[1:]))
        return idx, t

    def loss(self, theta, x_b, y_b, t):
        x = x_b if t is None else dsa_apply(x_b, t)
        return inner_loss(self.model(theta, x), y_b)


def _check(images, labels, start_params, target_params, syn_lr, syn_steps, batch_syn, mode,
           model):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if not isinstance(syn_steps, int) or syn_steps < 1:
        raise ValueError(f"syn_steps must be an int >= 1, got {syn_steps!r}")
    if not isinstance(batch_syn, int) or batch_syn < 1:
        raise ValueError(f"batch_syn must be an int >= 1, got {batch_syn!r}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    for name, p in (("start_params", start_params), ("target_params", target_params)):
        if p.dim() != 1 or p.numel() != model.num_params:
            raise ValueError(f"{name} must be a flat vector of {model.num_params} entries, got "
                             f"shape {tuple(p.shape)}")
    if not torch.is_tensor(syn_lr) or syn_lr.dim() != 0:
        raise ValueError("syn_lr must be a 0-d tensor")


def trajectory_step(images: torch.Tensor, labels: torch.Tensor, start_params: torch.Tensor,
                    target_params: torch.Tensor, syn_lr: torch.Tensor, syn_steps: int,
                    batch_syn: int, seed: int, mode: str = "exact", *, model: FlatModel,
                    augment: Optional[Augment] = None,
                    checkpoint_every: Union[int, str, None] = None) -> TrajectoryResult:
    """One trajectory-matching evaluation: N = ``syn_steps`` student steps from
    ``start_params`` on minibatches of ``batch_syn`` synthetic images, the MTT loss against
    ``target_params``, and its gradients (see the module docstring for the three modes).

    ``images`` [n, C, H, W] and ``syn_lr`` (0-d) are the variables (their ``requires_grad``
    is ignored: gradients are always returned); ``labels`` int64 [n] or float logits
    [n, classes] (a gradient is returned if they require grad). ``seed`` fixes every
    minibatch and augmentation. Inputs are not modified.

    ``checkpoint_every`` (``exact`` / ``tesla``): keep θ_i only at every k-th step (k = the
    int, or ⌈√N⌉ for ``"sqrt"``) and recompute each segment's θ_i from its checkpoint in the
    reverse sweep — the same operations on the same values, so bitwise the same result —
    trading ≈ N·(k−1)/k extra forward/backward passes for θ storage of ⌈N/k⌉ + k vectors
    instead of N. Default: every θ_i is kept.
    """
    _check(images, labels, start_params, target_params, syn_lr, syn_steps, batch_syn, mode,
           model)
    augment = augment or Augment()
    want_y = labels.is_floating_point() and labels.requires_grad
    X = images.detach()
    Y = labels.detach()
    alpha = syn_lr.detach()
    theta0 = start_params.detach().to(X.dtype)
    target = target_params.detach().to(X.dtype)
    if mode == "unroll":
        return _unroll(model, X, Y, want_y, theta0, target, alpha, syn_steps, batch_syn, seed,
                       augment)
    if mode == "unroll" and checkpoint_every is not None:
        raise ValueError("checkpoint_every applies to the exact and tesla modes (unroll keeps "
                         "the whole graph)")
    k = _segment_length(checkpoint_every, syn_steps)
    return _adjoint(model, X, Y, want_y, theta0, target, alpha, syn_steps, batch_syn, seed,
                    augment, exact=(mode == "exact"), k=k)


def _unroll(model, X, Y, want_y, theta0, target, alpha, N, batch_syn, seed, augment):
    X = X.clone().requires_grad_(True)
    a = alpha.clone().requires_grad_(True)
    Yv = Y.clone().requires_grad_(True) if want_y else Y
    step = _Step(model, X, Yv, seed, batch_syn, augment)
    theta = theta0.clone().requires_grad_(True)
    fused = _fused(theta0)
    zero = torch.zeros_like(theta0) if fused else None       # G input, output unused
    a_t = a.to(theta0.dtype)
    for i in range(N):
        idx, t = step.batch(i)
        ell = step.loss(theta, X[idx], Yv[idx], t)
        g, = torch.autograd.grad(ell, theta, create_graph=True)
        theta = _ops.sgd_step_accumulate(theta, g, a_t, zero)[0] if fused else theta - a * g
    loss = param_distance_loss(theta, target, theta0)
    inputs = [X, a] + ([Yv] if want_y else [])
    grads = torch.autograd.grad(loss, inputs)
    return TrajectoryResult(loss.detach(), grads[0], grads[1], grads[2] if want_y else None,
                            theta.detach())


def _segment_length(checkpoint_every, N: int) -> int:
    if checkpoint_every is None:
        return 1
    if checkpoint_every == "sqrt":
        return max(1, math.ceil(math.sqrt(N)))
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) \
            or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be None, 'sqrt' or an int >= 1, got "
                         f"{checkpoint_every!r}")
    return min(checkpoint_every, N)


def _sgd_step(step: "_Step", theta, alpha, i, grad_sum):
    """θ_{i+1} = θ_i − α g_i and G + g_i without a graph (the forward pass of exact / tesla),
    fused (``pde.sgd_step_accumulate``) for float32 / float64."""
    idx, t = step.batch(i)
    th = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        g, = torch.autograd.grad(step.loss(th, step.images[idx], step.labels[idx], t), th)
    if _fused(theta):
        return _ops.sgd_step_accumulate(theta, g, alpha.to(theta.dtype), grad_sum)
    return (theta - alpha * g).detach(), grad_sum + g


def _adjoint(model, X, Y, want_y, theta0, target, alpha, N, batch_syn, seed, augment, exact,
             k=1):
    step = _Step(model, X, Y, seed, batch_syn, augment)
    # forward: detached steps, keeping θ_i at i = 0, k, 2k, ... (k = 1: every θ_i)
    # and the running gradient sum G = Σ g_i (TESLA's ∂L/∂α = −λ_N · G)
    checkpoints: List[torch.Tensor] = []
    theta = theta0
    G = torch.zeros_like(theta0)
    for i in range(N):
        if i % k == 0:
            checkpoints.append(theta)
        theta, G = _sgd_step(step, theta, alpha, i, G)
    theta_n = theta
    loss, lam = _loss_and_adjoint(theta_n, target, theta0)  # λ_N = ∂L/∂θ_N
    scratch = torch.zeros_like(theta0) if k > 1 else None    # G of the recomputed segments
    gX = torch.zeros_like(X)
    gY = torch.zeros_like(Y) if want_y else None
    g_alpha = torch.zeros((), dtype=X.dtype, device=X.device)
    # reverse sweep, segment by segment: recompute the segment's θ_i from its checkpoint (the
    # same operations on the same values: bitwise the θ_i of the forward pass), then rebuild
    # each step i and take one double-backward
    for s in range(len(checkpoints) - 1, -1, -1):
        i0, i1 = s * k, min(s * k + k, N)
        thetas = [checkpoints[s]]
        for i in range(i0, i1 - 1):
            thetas.append(_sgd_step(step, thetas[-1], alpha, i, scratch)[0])
        for i in range(i1 - 1, i0 - 1, -1):
            idx, t = step.batch(i)
            th = thetas[i - i0].detach().requires_grad_(True)
            xb = X[idx].detach().requires_grad_(True)
            yb = Y[idx].detach().requires_grad_(want_y)
            with torch.enable_grad():
                ell = step.loss(th, xb, yb, t)
                g, = torch.autograd.grad(ell, th, create_graph=True)
                v = torch.dot(lam, g)                        # λ_{i+1} · g_i
                inputs = [xb] + ([yb] if want_y else []) + ([th] if exact else [])
                grads = torch.autograd.grad(v, inputs)
            if exact:
                g_alpha -= v.detach()                        # ∂L/∂α += −λ_{i+1}·g_i
            gX.index_add_(0, idx, -alpha * grads[0])         # ∂L/∂X += −α ∇_X(λ·g_i)
            if want_y:
                gY.index_add_(0, idx, -alpha * grads[1])
            if exact:
                lam = lam - alpha * grads[-1]                # λ_i = λ_{i+1} − α H_i λ_{i+1}
            del ell, g, v, grads, th, xb, yb
        del thetas
    if not exact:                                            # TESLA: ∂L/∂α = −λ_N · G
        g_alpha = -torch.dot(lam, G)
    return TrajectoryResult(loss, gX, g_alpha, gY, theta_n)
