"""K ConvNets evaluated as one network with grouped convolutions (the expert ensemble's fast path).

Expert k's parameters are row k of a ``[K, P]`` flat tensor (``FlatModel`` layout). Stacking the
experts along the channel axis turns the ensemble into one ConvNet whose every layer acts on
the K channel blocks independently:

- input: ``x [K, B, C, H, W]`` -> ``[B, K·C, H, W]`` (block k = expert k's batch);
- conv: weights ``[K, Co, Ci, kh, kw]`` -> ``[K·Co, Ci, kh, kw]`` with ``groups=K``: output
  block k sees only input block k, so ``y_k = conv(x_k, W_k) + b_k``;
- instance norm ``GroupNorm(C, C)`` / ``GroupNorm(G, C)``: ``GroupNorm(K·G, K·C)``; its groups are
  runs of C/G consecutive channels, so none straddles two experts and every statistic is the
  one expert k's own layer computes;
- activations and pooling act per channel: unchanged;
- classifier: the features ``[B, K·C, h, w]`` viewed as ``[B, K, C·h·w]`` (expert k's block,
  flattened in its own C, h, w order) and ``logits_k = f_k W_kᵀ + b_k`` (one einsum).

The K losses are independent, so the gradient of ``Σ_k mean_b CE(logits_kb, y_kb)`` with
respect to row k of θ is expert k's own gradient: one forward and one backward for the whole
ensemble, no ``vmap`` batching rules (on CPU, vmap's rules for group norm and pooling copy
and re-lay-out their operands; measured in ``benchmarks/bench_trajectory.py``).

Supported: :class:`~pydistill_ext.models.convnet.ConvNet` with norm ``instancenorm``,
``groupnorm`` or ``none`` (batch norm's running statistics and layer norm's per-position affine
do not split by channel block); other models use ``vmap``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pydistill_ext.methods.trajectory.unroll import FlatModel

__all__ = ["GroupedConvNet", "grouped_supported"]

_STATELESS = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.AvgPool2d, nn.MaxPool2d, nn.Identity)


def grouped_supported(module: nn.Module) -> bool:
    """True when ``module`` is a ConvNet whose layers all split by channel block."""
    from pydistill_ext.models.convnet import ConvNet
    if not isinstance(module, ConvNet):
        return False
    for layer in module.features:
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros":
                return False
        elif not isinstance(layer, (nn.GroupNorm,) + _STATELESS):
            return False
    return True


class GroupedConvNet:
    """``ens(theta [K, P], x [K, B, C, H, W]) -> logits [K, B, num_classes]`` for a ConvNet.

    ``theta`` is in the :class:`FlatModel` layout of ``module``; row k gives expert k the
    logits ``module`` would give with row k's parameters (to rounding).
    """

    def __init__(self, module: nn.Module):
        if not grouped_supported(module):
            raise ValueError("GroupedConvNet needs a ConvNet with norm 'instancenorm', "
                             f"'groupnorm' or 'none'; got {type(module).__name__}")
        self.module = module
        self.flat = FlatModel(module)

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if theta.dim() != 2 or theta.shape[1] != self.flat.num_params:
            raise ValueError(f"theta must be [K, {self.flat.num_params}], got "
                             f"{tuple(theta.shape)}")
        k = theta.shape[0]
        if x.dim() != 5 or x.shape[0] != k:
            raise ValueError(f"x must be [K={k}, B, C, H, W], got {tuple(x.shape)}")
        p = self.flat.unflatten(theta)            # name -> [K, *shape] views
        b = x.shape[1]
        h = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])
        for i, layer in enumerate(self.module.features):
            if isinstance(layer, nn.Conv2d):
                w = p[f"features.{i}.weight"]
                bias = p.get(f"features.{i}.bias")
                h = F.conv2d(h, w.reshape(k * w.shape[1], *w.shape[2:]),
                             None if bias is None else bias.reshape(-1),
                             stride=layer.stride, padding=layer.padding,
                             dilation=layer.dilation, groups=k)
            elif isinstance(layer, nn.GroupNorm):
                w = p.get(f"features.{i}.weight")
                bias = p.get(f"features.{i}.bias")
                h = F.group_norm(h, k * layer.num_groups,
                                 None if w is None else w.reshape(-1),
                                 None if bias is None else bias.reshape(-1), layer.eps)
            else:
                h = layer(h)
        feats = h.reshape(b, k, -1)                               # [B, K, F]
        w, bias = p["classifier.weight"], p["classifier.bias"]    # [K, O, F], [K, O]
        return torch.einsum("bkf,kof->kbo", feats, w) + bias[:, None, :]

    def grad_fn(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """``g(theta [K, P], x [K, B, ...], y [K, B]) -> [K, P]``: every expert's gradient of
        its own mean cross-entropy, from one forward and one backward."""
        def g(theta, x, y):
            with torch.enable_grad():
                t = theta.detach().requires_grad_(True)
                logits = self(t, x)
                # Σ_k mean_b CE_kb: the K losses share no parameter, so row k of the gradient
                # is expert k's own
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                       reduction="sum") / y.shape[1]
                return torch.autograd.grad(loss, t)[0]
        return g

