"""CIFAR-style ResNet (He et al., "Deep Residual Learning for Image Recognition").

The small-image variant used as teacher/student in KD and as a cross-architecture evaluation
net in dataset distillation (the ``ResNet``/``ResNet18BN`` of
`VICO-UoE/DatasetCondensation: networks.py`): a 3x3 stem conv with stride 1 and no max-pool,
four stages of BasicBlocks with widths ``width * (1, 2, 4, 8)`` and strides ``(1, 2, 2, 2)``,
global average pooling and a linear classifier. Convs have no bias; a block's shortcut is a
1x1 conv + norm when the stride or the width changes.

Global *adaptive* average pooling replaces the reference's ``avg_pool2d(out, 4)`` (identical for
32x32 inputs), so any input size works: 28x28 gives 28 -> 14 -> 7 -> 4, 8x8 gives 8 -> 4 -> 2 -> 1.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from pydistill_ext.models.convnet import _check_choice, _check_pos_int

RESNET_NORMS = ("batchnorm", "instancenorm")
# depth -> BasicBlocks per stage
RESNET_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _norm2d(norm: str, c: int) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm2d(c)
    return nn.GroupNorm(c, c, affine=True)  # instance norm with affine, as in the reference


class BasicBlock(nn.Module):
    """conv3x3(stride) -> norm -> ReLU -> conv3x3 -> norm, + shortcut, -> ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "batchnorm"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm2d(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm2d(norm, planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), _norm2d(norm, planes))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # out-of-place: safe under vmap / hooks


class ResNet(nn.Module):
    """CIFAR-style ResNet-``depth``.

    Args:
        channels: input channels.
        num_classes: number of outputs.
        depth: 10 (BasicBlocks [1,1,1,1]), 18 ([2,2,2,2]) or 34 ([3,4,6,3]).
        width: stem / first-stage width; stages use ``width * (1, 2, 4, 8)`` (64 -> 512).
        norm: ``"batchnorm"`` (default) or ``"instancenorm"`` (``GroupNorm(C, C, affine=True)``,
            the default of the dataset-distillation code's ``ResNet18``).

    ResNet-18 with width 64 has 11,173,962 parameters for CIFAR-10. Default PyTorch
    initialisation.
    """

    def __init__(self, channels: int, num_classes: int, depth: int = 18, width: int = 64,
                 norm: str = "batchnorm"):
        super().__init__()
        channels = _check_pos_int(channels, "channels")
        num_classes = _check_pos_int(num_classes, "num_classes")
        width = _check_pos_int(width, "width")
        norm = _check_choice(norm, RESNET_NORMS, "norm")
        if isinstance(depth, bool) or depth not in RESNET_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(RESNET_BLOCKS)}, got {depth!r}")
        self.channels, self.num_classes = channels, num_classes
        self.depth, self.width, self.norm = int(depth), width, norm

        self.conv1 = nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = _norm2d(norm, width)
        in_planes = width
        stages = []
        for i, (n_blocks, stride) in enumerate(zip(RESNET_BLOCKS[self.depth], (1, 2, 2, 2))):
            planes = width * (2 ** i)
            blocks = []
            for s in [stride] + [1] * (n_blocks - 1):
                blocks.append(BasicBlock(in_planes, planes, s, norm))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_feat: int = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def _stages(self, x: torch.Tensor) -> List[torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer(out)
            maps.append(out)
        return maps

    @staticmethod
    def _pool(out: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features before the classifier: ``[N, 8 * width]``."""
        return self._pool(self._stages(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

    def feature_maps(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """The four stage outputs (after each stage's last ReLU) and the logits.

        ``([layer1, layer2, layer3, layer4], logits)`` with ``layer_i`` of shape
        ``[N, width * 2**(i-1), H_i, W_i]`` -- the group outputs attention transfer uses.
        """
        maps = self._stages(x)
        return maps, self.classifier(self._pool(maps[-1]))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, norm={self.norm!r}"
