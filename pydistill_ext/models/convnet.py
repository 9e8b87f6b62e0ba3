"""ConvNet of the dataset-distillation papers (DC, DSA, DM, MTT, DataDAM, ...).

The architecture follows the description in "Dataset Condensation with Gradient Matching"
(Zhao et al., 2021) and the network those papers share
(`VICO-UoE/DatasetCondensation: networks.py ConvNet`, identical in
`GeorgeCazenavette/mtt-distillation: networks.py`): ``depth`` blocks of

    Conv3x3(width) -> norm -> activation -> pool(2, 2)

followed by ``flatten -> Linear(feat, num_classes)``. The default (width 128, depth 3,
instance norm, ReLU, average pooling) is "ConvNet-3": 320,010 parameters on CIFAR-10
(3x32x32, 10 classes), 317,706 on MNIST (1x28x28, 10 classes).

Differences from the reference code, none of which changes the default networks:

* The feature shape is computed by arithmetic for any input size (the reference hard-codes
  28 -> 32 for MNIST). The first conv uses padding 3 when the input has one channel, so a
  28x28 digit becomes 32x32 as in the papers; an 8x8 digit becomes 12x12.
* Pooling never shrinks a spatial dimension below 1: a block whose input has a dimension of
  size 1 pools with window 1 along it (8x8, one channel, depth 3: 12 -> 6 -> 3 -> 1, and
  a fourth block would keep 1x1).
* Activations are not in-place, so the intermediate maps returned by :meth:`feature_maps`
  and forward hooks on the activation modules see unmodified tensors.

Layer names mirror the reference (``features.<i>``, ``classifier``), so state dicts line up
with it for the same configuration.
"""
from __future__ import annotations

import numbers
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTS = ("relu", "leakyrelu", "sigmoid")
POOLS = ("avgpool", "maxpool", "none")

ImSize = Union[int, Sequence[int]]


# --------------------------------------------------------------------------------------
# argument checks shared by the model modules (private)
# --------------------------------------------------------------------------------------
def _check_pos_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_im_size(im_size, name: str = "im_size") -> Tuple[int, int]:
    """An int ``s`` means ``(s, s)``; otherwise a pair of positive ints ``(H, W)``."""
    if isinstance(im_size, numbers.Integral) and not isinstance(im_size, bool):
        im_size = (im_size, im_size)
    try:
        items = tuple(im_size)
    except TypeError:
        raise ValueError(f"{name} must be a positive int or a pair (H, W) of positive ints, "
                         f"got {im_size!r}") from None
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                              or int(v) < 1 for v in items):
        raise ValueError(f"{name} must be a positive int or a pair (H, W) of positive ints, "
                         f"got {im_size!r}")
    return int(items[0]), int(items[1])


def _check_choice(value, choices: Sequence[str], name: str) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value.lower()


# --------------------------------------------------------------------------------------
def _make_norm(norm: str, shape_chw: Tuple[int, int, int]) -> nn.Module:
    c = shape_chw[0]
    if norm == "instancenorm":
        # GroupNorm with one channel per group = instance norm with a learnable affine, as in
        # the reference code (nn.InstanceNorm2d would not be affine by default).
        return nn.GroupNorm(c, c, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(c, affine=True)
    if norm == "layernorm":
        return nn.LayerNorm(list(shape_chw), elementwise_affine=True)
    if norm == "groupnorm":
        return nn.GroupNorm(4, c, affine=True)
    raise AssertionError(norm)  # pragma: no cover


def _make_act(act: str) -> nn.Module:
    if act == "relu":
        return nn.ReLU()
    if act == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    return nn.Sigmoid()


class ConvNet(nn.Module):
    """ConvNet-``depth`` of the dataset-distillation papers.

    Args:
        channels: input channels (1 for digits, 3 for colour images).
        num_classes: number of outputs.
        im_size: input size ``(H, W)`` (or one int for square inputs). Only the classifier's
            input width and the ``layernorm`` shapes depend on it.
        width: channels of every conv (128 in the papers).
        depth: number of conv blocks (3; 4 for 64x64 Tiny ImageNet).
        norm: ``"instancenorm"`` (``GroupNorm(C, C, affine=True)``, the default),
            ``"batchnorm"``, ``"layernorm"`` (``LayerNorm([C, H, W])``, elementwise affine),
            ``"groupnorm"`` (``GroupNorm(4, C)``, needs ``width % 4 == 0``) or ``"none"``.
        act: ``"relu"``, ``"leakyrelu"`` (slope 0.01) or ``"sigmoid"``.
        pool: ``"avgpool"``, ``"maxpool"`` (2x2, stride 2) or ``"none"``.

    Attributes:
        feat_shape: ``(C, H, W)`` of the last block's output; ``num_feat`` its product (the
            width of :meth:`embed`, 2048 for ConvNet-3 at 32x32).
        block_shapes: ``(C, H, W)`` of each block's activation as returned by
            :meth:`feature_maps` (before pooling).

    Initialisation is PyTorch's default for each layer, as in the papers.
    """

    def __init__(self, channels: int, num_classes: int, im_size: ImSize = (32, 32),
                 width: int = 128, depth: int = 3, norm: str = "instancenorm",
                 act: str = "relu", pool: str = "avgpool"):
        super().__init__()
        channels = _check_pos_int(channels, "channels")
        num_classes = _check_pos_int(num_classes, "num_classes")
        im_size = _check_im_size(im_size)
        width = _check_pos_int(width, "width")
        depth = _check_pos_int(depth, "depth")
        norm = _check_choice(norm, NORMS, "norm")
        act = _check_choice(act, ACTS, "act")
        pool = _check_choice(pool, POOLS, "pool")
        if norm == "groupnorm" and width % 4:
            raise ValueError(f"width must be divisible by 4 for norm='groupnorm', got {width}")

        self.channels, self.num_classes, self.im_size = channels, num_classes, im_size
        self.width, self.depth, self.norm, self.act, self.pool = width, depth, norm, act, pool

        layers: List[nn.Module] = []
        act_index: List[int] = []
        block_shapes: List[Tuple[int, int, int]] = []
        c, (h, w) = channels, im_size
        for d in range(depth):
            pad = 3 if (channels == 1 and d == 0) else 1
            layers.append(nn.Conv2d(c, width, kernel_size=3, padding=pad))
            c, h, w = width, h + 2 * pad - 2, w + 2 * pad - 2
            if norm != "none":
                layers.append(_make_norm(norm, (c, h, w)))
            layers.append(_make_act(act))
            act_index.append(len(layers) - 1)
            block_shapes.append((c, h, w))
            if pool != "none":
                # window 2 along a dimension of size >= 2, else 1 (no shrinking below 1)
                kh, kw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
                cls = nn.AvgPool2d if pool == "avgpool" else nn.MaxPool2d
                k = (kh, kw) if (kh, kw) != (2, 2) else 2
                layers.append(cls(kernel_size=k, stride=k))
                h, w = h // kh, w // kw
        self.features = nn.Sequential(*layers)
        self.feat_shape: Tuple[int, int, int] = (c, h, w)
        self.num_feat: int = c * h * w
        self.block_shapes: Tuple[Tuple[int, int, int], ...] = tuple(block_shapes)
        self._act_index = frozenset(act_index)
        self.classifier = nn.Linear(self.num_feat, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the classifier, flattened: ``[N, num_feat]`` (DM's ``net.embed``)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

    def feature_maps(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Each block's activation and the logits: ``([a_1, ..., a_depth], logits)``.

        ``a_i`` is block ``i``'s output **after the activation and before pooling**
        (``[N, width, H_i, W_i]``, shapes in ``block_shapes``) -- the tensors DataDAM's hooks
        on the ReLU modules see. The logits equal ``forward(x)``.
        """
        maps: List[torch.Tensor] = []
        out = x
        for i, layer in enumerate(self.features):
            out = layer(out)
            if i in self._act_index:
                maps.append(out)
        return maps, self.classifier(out.flatten(1))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_classes={self.num_classes}, "
                f"im_size={self.im_size}, feat_shape={self.feat_shape}")
