"""Reference networks by name: ``get_model("convnet", channels=3, num_classes=10, im_size=32)``.

=================  =========================================================================
name               network
=================  =========================================================================
``convnet``        ConvNet-3, width 128, instance norm, ReLU, avg-pool (DC/DSA/DM/MTT
                   "ConvNet"; 320,010 params on CIFAR-10, 317,706 on MNIST)
``convnet-bn``     as ``convnet`` with BatchNorm2d (reference "ConvNetBN")
``convnet-ln``     as ``convnet`` with LayerNorm over [C, H, W] (reference "ConvNetLN")
``convnet-gn``     as ``convnet`` with GroupNorm(4, C) (reference "ConvNetGN")
``convnet-nonorm`` as ``convnet`` without normalisation (reference "ConvNetNN")
``convnet-maxpool`` as ``convnet`` with max-pooling (reference "ConvNetMP")
``convnet-d4``     ConvNet-4, width 128, instance norm (Tiny ImageNet 64x64 in the papers)
``convnet-small``  ConvNet-2, width 32, instance norm -- a small KD student, fast on CPU
``resnet10``       CIFAR ResNet-10 ([1,1,1,1] BasicBlocks), width 64, BatchNorm
``resnet18``       CIFAR ResNet-18 ([2,2,2,2]), width 64, BatchNorm (reference "ResNet18BN";
                   11,173,962 params on CIFAR-10)
``resnet18-in``    CIFAR ResNet-18 with instance norm (the dataset-distillation code's
                   "ResNet18", used for cross-architecture evaluation)
``resnet-small``   CIFAR ResNet-10, width 16, BatchNorm -- fast on CPU
``resnet18-small`` CIFAR ResNet-18, width 16, BatchNorm -- a deep BN teacher that trains on CPU
``mlp``            MLP, 3 layers, width 128 (reference "MLP")
=================  =========================================================================

Names are matched case-insensitively, with ``_`` treated as ``-``. Keyword overrides go to the
constructor (``get_model("convnet", 3, 10, 32, width=64)``).
"""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from pydistill_ext.models.convnet import ConvNet, ImSize, _check_im_size, _check_pos_int
from pydistill_ext.models.mlp import MLP
from pydistill_ext.models.resnet import ResNet

# name -> (constructor, default keyword arguments, one-line description)
_REGISTRY: Dict[str, Tuple[Callable[..., nn.Module], Dict[str, Any], str]] = {
    "convnet": (ConvNet, dict(width=128, depth=3, norm="instancenorm"),
                "ConvNet-3, width 128, instance norm, ReLU, avg-pool"),
    "convnet-bn": (ConvNet, dict(width=128, depth=3, norm="batchnorm"),
                   "ConvNet-3, width 128, BatchNorm"),
    "convnet-ln": (ConvNet, dict(width=128, depth=3, norm="layernorm"),
                   "ConvNet-3, width 128, LayerNorm([C, H, W])"),
    "convnet-gn": (ConvNet, dict(width=128, depth=3, norm="groupnorm"),
                   "ConvNet-3, width 128, GroupNorm(4, C)"),
    "convnet-nonorm": (ConvNet, dict(width=128, depth=3, norm="none"),
                       "ConvNet-3, width 128, no normalisation"),
    "convnet-maxpool": (ConvNet, dict(width=128, depth=3, norm="instancenorm", pool="maxpool"),
                        "ConvNet-3, width 128, instance norm, max-pool"),
    "convnet-d4": (ConvNet, dict(width=128, depth=4, norm="instancenorm"),
                   "ConvNet-4, width 128, instance norm"),
    "convnet-small": (ConvNet, dict(width=32, depth=2, norm="instancenorm"),
                      "ConvNet-2, width 32, instance norm (small student)"),
    "resnet10": (ResNet, dict(depth=10, width=64, norm="batchnorm"),
                 "CIFAR ResNet-10, width 64, BatchNorm"),
    "resnet18": (ResNet, dict(depth=18, width=64, norm="batchnorm"),
                 "CIFAR ResNet-18, width 64, BatchNorm"),
    "resnet18-in": (ResNet, dict(depth=18, width=64, norm="instancenorm"),
                    "CIFAR ResNet-18, width 64, instance norm"),
    "resnet-small": (ResNet, dict(depth=10, width=16, norm="batchnorm"),
                     "CIFAR ResNet-10, width 16, BatchNorm (small)"),
    "resnet18-small": (ResNet, dict(depth=18, width=16, norm="batchnorm"),
                       "CIFAR ResNet-18, width 16, BatchNorm (deep, small)"),
    "mlp": (MLP, dict(width=128, depth=3), "MLP, 3 layers, width 128"),
}


def known_models() -> List[str]:
    """The names :func:`get_model` accepts, sorted."""
    return sorted(_REGISTRY)


def describe_models() -> Dict[str, str]:
    """``{name: one-line description}`` for every registered name."""
    return {name: _REGISTRY[name][2] for name in known_models()}


def _normalise_name(name) -> str:
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string; known models: {known_models()}")
    key = name.strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {known_models()}")
    return key


def get_model(name: str, channels: int, num_classes: int, im_size: ImSize, *,
              seed: Optional[int] = None, **overrides) -> nn.Module:
    """Build a registered reference network (see the module docstring for the names).

    Args:
        name: a name from :func:`known_models` (case-insensitive, ``_`` = ``-``).
        channels: input channels (positive int).
        num_classes: number of outputs (positive int).
        im_size: input ``(H, W)`` or one int for square inputs. ResNets accept any size and
            ignore it apart from the check.
        seed: if given, the parameters are initialised from ``seed`` deterministically (same
            seed -> identical parameters) **without touching the global RNG** (the CPU
            generator's state is forked and restored; CUDA generators are never touched). If
            ``None``, the global RNG is used and advanced as by any ``nn.Module`` constructor.
        **overrides: constructor keywords that replace the registered defaults
            (e.g. ``width=64``, ``norm="batchnorm"``).

    Initialisation is PyTorch's default per layer, as in the papers. The model is built on the
    CPU (in the default dtype); move it with ``.to(device)``.

    Raises:
        ValueError: unknown name (the message lists the known ones), or an invalid
            ``channels`` / ``num_classes`` / ``im_size`` / ``seed`` / override value
            (the message names the argument).
        TypeError: an override keyword the constructor does not take.
    """
    key = _normalise_name(name)
    channels = _check_pos_int(channels, "channels")
    num_classes = _check_pos_int(num_classes, "num_classes")
    im_size = _check_im_size(im_size)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")

    ctor, defaults, _ = _REGISTRY[key]
    params = inspect.signature(ctor).parameters
    fixed = {"channels", "num_classes", "im_size"}
    allowed = [p for p in params if p not in fixed]
    bad = sorted(set(overrides) - set(allowed))
    if bad:
        raise TypeError(f"get_model({key!r}) got unexpected keyword argument(s) {bad}; "
                        f"allowed overrides: {allowed}")
    kwargs = {**defaults, **overrides}
    if "im_size" in params:
        kwargs["im_size"] = im_size

    if seed is None:
        return ctor(channels, num_classes, **kwargs)
    # fork only the CPU generator (devices=[]) and seed it alone: torch.manual_seed would also
    # reseed every CUDA generator, which fork_rng(devices=[]) does not restore.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        return ctor(channels, num_classes, **kwargs)
