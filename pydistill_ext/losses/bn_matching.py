"""BatchNorm-statistic matching: the loss of DeepInversion, ZeroQ, SRe2L, CDA, CV-DD and kin.

A :class:`BNStatMatcher` hooks every BatchNorm layer of a frozen (eval-mode) network. On each
forward pass of the network it computes the batch statistics of each BN layer's *input* with
the fused one-pass op :func:`pydistill_ext.bn_moments` (no activation copy; closed-form
backward, REFERENCE.md 4.2) and compares them with the layer's running statistics.
``matcher.loss`` is the summed loss of the last forward.

Variants (REFERENCE.md 4.1):

``"deepinversion"`` (default; DeepInversion, Yin et al., CVPR 2020, eq. 4 as its released
    code computes it, and the same hook in SRe2L/CDA/CV-DD):
    ``R_l = ||mu_run - mu||_2 + var_weight * ||var_run - var||_2`` (non-squared norms, biased
    batch variance over N, H, W), ``loss = sum_l s_l R_l`` with ``s = [first_bn_multiplier,
    1, 1, ...]``. ``var_weight`` is DWA's r_var (Du et al., NeurIPS 2024; 1 elsewhere).
``"mse"``: the paper's squared form ``||mu_run - mu||^2 + var_weight * ||var_run - var||^2``.
``"zeroq"`` (ZeroQ, Cai et al., CVPR 2020, distill_data.py): per-sample statistics over the
    spatial dims, sigma_hat = sqrt(unbiased var + 1e-6), targets (mu_run, sqrt(var_run + 1e-6)),
    ``R_l = ||mu_run - mu_hat||_F^2 / N + ||sigma - sigma_hat||_F^2 / N`` (first_bn_multiplier
    defaults to 1 here: ZeroQ weights layers equally).

``ema_momentum`` (G-VBSM, Shao et al., CVPR 2024): the compared statistics are a
straight-through exponential moving average over forwards, ``ema + stat - stat.detach()`` with
``ema <- m * ema + (1 - m) * stat.detach()``: the value is the EMA, the gradient that of the
current batch.

:class:`BNStatCommittee` (CV-DD, Cui et al., 2025): several matched models with weights
``softmax(prior / temperature)`` or given weights; ``committee.loss = sum_i w_i loss_i``.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import pydistill_ext as _pde

__all__ = ["BNStatMatcher", "BNStatCommittee", "BN_VARIANTS", "bn_layers"]

BN_VARIANTS = ("deepinversion", "mse", "zeroq")
_ZEROQ_EPS = 1e-6


def bn_layers(model: nn.Module) -> List[tuple]:
    """(qualified name, module) of every BatchNorm layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


class BNStatMatcher:
    """Match the BatchNorm input statistics of ``model`` to its running statistics.

    Usage (one synthesis step)::

        teacher.eval()
        with pde.BNStatMatcher(teacher, first_bn_multiplier=10.0) as bn:
            logits = teacher(images)
            loss = F.cross_entropy(logits, targets) + r_bn * bn.loss
            loss.backward()

    ``first_bn_multiplier``: s_0, the weight of the first hooked layer; None = the variant's
    default, 10 (DeepInversion / SRe2L code) or 1 for ``zeroq``.
    ``layers``: names (as in ``model.named_modules()``) or modules of the BN layers to match;
    default every BatchNorm layer. ``allow_training``: by default a hooked layer found in
    training mode during a forward raises (its running statistics would be overwritten by the
    synthetic batch and the loss would compare a batch with itself).
    """

    def __init__(self, model: nn.Module, *, variant: str = "deepinversion",
                 first_bn_multiplier: Optional[float] = None, var_weight: float = 1.0,
                 layers: Optional[Iterable] = None, ema_momentum: Optional[float] = None,
                 allow_training: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if variant not in BN_VARIANTS:
            raise ValueError(f"variant must be one of {BN_VARIANTS}, got {variant!r}")
        if first_bn_multiplier is None:
            first_bn_multiplier = 1.0 if variant == "zeroq" else 10.0
        for name, v in (("first_bn_multiplier", first_bn_multiplier), ("var_weight", var_weight)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if ema_momentum is not None and not (isinstance(ema_momentum, (int, float))
                                             and 0.0 <= ema_momentum < 1.0):
            raise ValueError(f"ema_momentum must be None or in [0, 1), got {ema_momentum!r}")
        self.variant, self.var_weight = variant, float(var_weight)
        self.ema_momentum = None if ema_momentum is None else float(ema_momentum)
        self.allow_training = bool(allow_training)
        self.layers = self._select(model, layers)
        self.scales = [float(first_bn_multiplier)] + [1.0] * (len(self.layers) - 1)
        self.model = model
        self._losses: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self._ema: List[Optional[tuple]] = [None] * len(self.layers)
        self._handles = [model.register_forward_pre_hook(self._reset)]
        for i, (_, m) in enumerate(self.layers):
            self._handles.append(m.register_forward_pre_hook(self._make_hook(i)))

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _select(model, layers):
        found = bn_layers(model)
        if not found:
            raise ValueError(f"model {type(model).__name__} has no BatchNorm layer to match")
        if layers is not None:
            by_name = dict(found)
            by_id = {id(m): n for n, m in found}
            chosen = []
            for layer in layers:
                if isinstance(layer, str):
                    if layer not in by_name:
                        raise ValueError(f"layers: {layer!r} is not a BatchNorm layer of the model; "
                                         f"BatchNorm layers: {list(by_name)[:8]}...")
                    chosen.append((layer, by_name[layer]))
                elif isinstance(layer, nn.Module) and id(layer) in by_id:
                    chosen.append((by_id[id(layer)], layer))
                else:
                    raise ValueError(f"layers: {layer!r} is not a BatchNorm layer of the model")
            if not chosen:
                raise ValueError("layers is empty: give at least one BatchNorm layer")
            found = chosen
        for name, m in found:
            if not m.track_running_stats or m.running_mean is None or m.running_var is None:
                raise ValueError(f"BatchNorm layer {name!r} keeps no running statistics "
                                 "(track_running_stats=False): nothing to match")
        return found

    def _reset(self, _module, _inputs):
        self._losses = [None] * len(self.layers)

    def _make_hook(self, i):
        name, bn = self.layers[i]

        def hook(module, inputs):
            x = inputs[0]
            if module.training and not self.allow_training:
                raise RuntimeError(
                    f"BatchNorm layer {name!r} is in training mode: the synthetic batch would "
                    "overwrite its running statistics. Call model.eval() before matching "
                    "(or pass allow_training=True).")
            if x.device != module.running_mean.device:
                raise RuntimeError(f"BatchNorm layer {name!r}: input is on {x.device} but its "
                                   f"running statistics are on {module.running_mean.device}")
            self._losses[i] = self.scales[i] * self._layer_loss(i, x, module)
        return hook

    # ------------------------------------------------------------------ the loss
    def _layer_loss(self, i, x, bn):
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        mu_run = bn.running_mean.to(compute)
        var_run = bn.running_var.to(compute)
        if self.variant == "zeroq":
            if x.dim() < 3:
                raise ValueError(f"zeroq matching needs spatial dims; BatchNorm layer "
                                 f"{self.layers[i][0]!r} got input of shape {tuple(x.shape)}")
            mean, var = _pde.bn_moments(x, per_sample=True, unbiased=True)
            mean, var = self._ema_update(i, mean.to(compute), var.to(compute))
            sigma_hat = torch.sqrt(var + _ZEROQ_EPS)
            sigma = torch.sqrt(var_run + _ZEROQ_EPS)
            n = x.shape[0]
            return ((mean - mu_run).pow(2).sum() / n
                    + self.var_weight * (sigma_hat - sigma).pow(2).sum() / n)
        mean, var = _pde.bn_moments(x)
        mean, var = self._ema_update(i, mean.to(compute), var.to(compute))
        if self.variant == "mse":
            return (mu_run - mean).pow(2).sum() + self.var_weight * (var_run - var).pow(2).sum()
        return torch.linalg.vector_norm(mu_run - mean) + \
            self.var_weight * torch.linalg.vector_norm(var_run - var)

    def _ema_update(self, i, mean, var):
        if self.ema_momentum is None:
            return mean, var
        m = self.ema_momentum
        prev = self._ema[i]
        if prev is None or prev[0].shape != mean.shape:
            ema = (mean.detach(), var.detach())
        else:
            ema = (m * prev[0] + (1 - m) * mean.detach(), m * prev[1] + (1 - m) * var.detach())
        self._ema[i] = ema
        return ema[0] + mean - mean.detach(), ema[1] + var - var.detach()

    @property
    def layer_losses(self) -> List[torch.Tensor]:
        """The weighted per-layer losses s_l R_l of the last forward (in layer order)."""
        missing = [self.layers[i][0] for i, v in enumerate(self._losses) if v is None]
        if missing:
            raise RuntimeError("no statistics recorded for BatchNorm layer(s) "
                               f"{missing[:4]}: run a forward pass of the model first")
        return list(self._losses)

    @property
    def loss(self) -> torch.Tensor:
        """sum_l s_l R_l over the hooked layers, from the last forward pass."""
        return torch.stack(self.layer_losses).sum()

    def reset_ema(self) -> None:
        self._ema = [None] * len(self.layers)

    # ------------------------------------------------------------------ hook lifetime
    def remove(self) -> None:
        """Detach every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BNStatMatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"BNStatMatcher({type(self.model).__name__}, variant={self.variant!r}, "
                f"layers={len(self.layers)}, scales[0]={self.scales[0]}, "
                f"var_weight={self.var_weight}, ema_momentum={self.ema_momentum})")


class BNStatCommittee:
    """Several BN-matched models weighted into one loss (CV-DD's committee voting).

    ``weights``: explicit non-negative weights, or ``priors`` turned into
    ``softmax(prior / temperature)`` (CV-DD: priors = each model's accuracy, temperature 5 for
    recover, 10 for relabel); default equal weights. Other keyword arguments go to every
    :class:`BNStatMatcher`.
    """

    def __init__(self, models: Sequence[nn.Module], *, weights: Optional[Sequence[float]] = None,
                 priors: Optional[Sequence[float]] = None, temperature: float = 5.0, **matcher_kwargs):
        models = list(models)
        if not models:
            raise ValueError("models is empty: give at least one model")
        if weights is not None and priors is not None:
            raise ValueError("give weights or priors, not both")
        if priors is not None:
            if len(priors) != len(models):
                raise ValueError(f"priors has {len(priors)} entries for {len(models)} models")
            if not temperature > 0:
                raise ValueError(f"temperature must be > 0, got {temperature!r}")
            w = torch.softmax(torch.tensor(priors, dtype=torch.float64) / temperature, 0).tolist()
        elif weights is not None:
            if len(weights) != len(models):
                raise ValueError(f"weights has {len(weights)} entries for {len(models)} models")
            if any(not float(v) >= 0 for v in weights):
                raise ValueError(f"weights must be >= 0, got {list(weights)}")
            w = [float(v) for v in weights]
        else:
            w = [1.0 / len(models)] * len(models)
        self.models, self.weights = models, w
        self.matchers = []
        try:
            for m in models:
                self.matchers.append(BNStatMatcher(m, **matcher_kwargs))
        except Exception:
            self.remove()
            raise

    @property
    def loss(self) -> torch.Tensor:
        return sum(w * m.loss for w, m in zip(self.weights, self.matchers))

    def remove(self) -> None:
        for m in self.matchers:
            m.remove()

    def __enter__(self) -> "BNStatCommittee":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
