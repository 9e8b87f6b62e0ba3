"""Multi-layer perceptron of the dataset-distillation papers (DC's ``MLP``: 3 layers, width 128).

``flatten -> (Linear -> ReLU) x (depth - 1) -> Linear``. Unlike the reference, the input width
is ``channels * H * W`` from ``im_size`` rather than hard-coded to 28x28x1 / 32x32x3.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from pydistill_ext.models.convnet import ImSize, _check_im_size, _check_pos_int


class MLP(nn.Module):
    """``depth`` linear layers, ReLU between them.

    Args:
        channels, num_classes, im_size: input channels, outputs, input ``(H, W)`` (or one int).
        width: hidden width (128).
        depth: number of linear layers (3); ``depth=1`` is a linear classifier.

    ``features`` holds everything but the last layer (``classifier``); :meth:`embed` returns its
    output, ``[N, width]`` (``[N, C*H*W]`` when ``depth == 1``).
    """

    def __init__(self, channels: int, num_classes: int, im_size: ImSize = (32, 32),
                 width: int = 128, depth: int = 3):
        super().__init__()
        channels = _check_pos_int(channels, "channels")
        num_classes = _check_pos_int(num_classes, "num_classes")
        im_size = _check_im_size(im_size)
        width = _check_pos_int(width, "width")
        depth = _check_pos_int(depth, "depth")
        self.channels, self.num_classes, self.im_size = channels, num_classes, im_size
        self.width, self.depth = width, depth

        d_in = channels * im_size[0] * im_size[1]
        layers: List[nn.Module] = [nn.Flatten(1)]
        for _ in range(depth - 1):
            layers += [nn.Linear(d_in, width), nn.ReLU()]
            d_in = width
        self.features = nn.Sequential(*layers)
        self.num_feat: int = d_in
        self.classifier = nn.Linear(d_in, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last hidden layer (after ReLU), ``[N, num_feat]``."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def feature_maps(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Each hidden layer's activation (after ReLU, ``[N, width]``; empty list when
        ``depth == 1``) and the logits."""
        maps: List[torch.Tensor] = []
        out = x
        for layer in self.features:
            out = layer(out)
            if isinstance(layer, nn.ReLU):
                maps.append(out)
        return maps, self.classifier(out)
