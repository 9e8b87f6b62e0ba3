"""class_mean_forward: fake kernel, autograd and the public functions class_mean and
class_moments.

Autograd: the forward returns the per-class counts with the means; the backward is the gather
grad_features[i] = grad_mean[labels[i]] / counts[labels[i]] (REFERENCE.md 3, DM), composed from
torch ops here (a division of the [K, D] gradient and one index_select over N rows: the same
memory traffic a dedicated kernel would have, and torch.compile fuses it).
"""
from __future__ import annotations

from typing import Tuple

import torch

from pydistill_ext._lib import ops

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@torch.library.register_fake("pydistill_ext::class_mean_forward")
def _class_mean_forward_fake(features, labels, num_classes):
    return (features.new_empty((num_classes, features.shape[1])),
            labels.new_empty((num_classes,)))


def _setup_context(ctx, inputs, output):
    _, labels, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(labels, output[1])


def _backward(ctx, grad_mean, _grad_counts):
    labels, counts = ctx.saved_tensors
    if grad_mean is None or not ctx.needs_input_grad[0]:
        return None, None, None
    compute = torch.float64 if grad_mean.dtype == torch.float64 else torch.float32
    scale = counts.clamp_min(1).to(compute).unsqueeze(1)
    per_class = (grad_mean.to(compute) / scale).to(grad_mean.dtype)
    return per_class.index_select(0, labels), None, None


torch.library.register_autograd("pydistill_ext::class_mean_forward", _backward,
                                setup_context=_setup_context)


def _check(features, labels, num_classes):
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dtype not in _FLOATS:
        raise ValueError(f"features must be float64, float32, float16 or bfloat16, got {features.dtype}")
    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        raise ValueError("labels must be an int64 tensor, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must be [N] with N = {features.shape[0]} (features.shape[0]), "
                         f"got shape {tuple(labels.shape)}")
    if labels.device != features.device:
        raise ValueError(f"labels is on {labels.device} but features is on {features.device}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")


def class_mean(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of the rows of ``features`` [N, D]: returns [num_classes, D] with row k the
    mean of the rows whose label is k (DM / DataDAM class embeddings, REFERENCE.md 3).

    ``labels`` is int64 [N] with values in [0, num_classes) (checked by the kernel: CPU raises,
    CUDA asserts on the device). A class without rows has mean 0 (and gets no gradient).
    One pass over the rows, accumulation in float32 (float64 for float64), output in
    ``features``' dtype; deterministic on CPU and CUDA. Differentiable w.r.t. ``features``:
    grad_features[i] = grad[labels[i]] / count[labels[i]].
    """
    _check(features, labels, num_classes)
    return ops.class_mean_forward(features, labels, num_classes)[0]


def class_moments(features: torch.Tensor, labels: torch.Tensor,
                  num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean and biased variance of the rows of ``features`` [N, D]:
    (mean [num_classes, D], var [num_classes, D]), var[k] = mean over the class's rows of
    (x - mean[k])^2. Two passes (class_mean, then class_mean of the squared deviations)
    computed in float32 (float64 for float64), returned in ``features``' dtype. Empty class:
    mean 0 and var 0. Differentiable w.r.t. ``features`` (composite of class_mean).
    """
    _check(features, labels, num_classes)
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    x = features.to(compute)
    mean = ops.class_mean_forward(x, labels, num_classes)[0]
    dev = x - mean.index_select(0, labels)
    var = ops.class_mean_forward(dev * dev, labels, num_classes)[0]
    return mean.to(features.dtype), var.to(features.dtype)
