"""Stage 2: MetricUNet (Table I of the MetricUNet paper).

The network is a 2-D U-Net on 3 stacked slices with three down- and three
up-sampling blocks. Its voxel-metric learning loss works on the features of the
last decoder convolution (``forward(x, return_features=True)``) and exists only
in training: `VoxelMetricLoss` and `metricunet_loss` live in
``training/losses/metricunet.py``, have no parameters and never enter an
exported package.

A choice where the paper is inconsistent (the loss's own choices are listed in
training/losses/metricunet.py): Table I lists ``sega`` as 3x3 but its parameter
count (66 K for 256 -> 256) is that of a 1x1 convolution; we use 1x1, which
matches the 3.28 M total.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import conv_bn_relu, decoder_blocks, encode_decode, encoder_blocks


class MetricUNet(nn.Module):
    """The segmentation path of MetricUNet.

    ``encoder`` gives the channels of the three down-sampling blocks and the
    bottom block; ``decoder`` those of the three up-sampling blocks (Table I has
    an unusually wide last one, 256); ``head`` the width of the 1x1 ``sega``
    layer. Defaults reproduce Table I (3.28 M parameters).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, encoder=(32, 64, 128, 256),
                 decoder=(128, 64, 256), head: int = 256):
        super().__init__()
        encoder, decoder = [int(c) for c in encoder], [int(c) for c in decoder]
        if len(decoder) != len(encoder) - 1:
            raise ValueError("MetricUNet needs one decoder block per down-sampling step")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.feature_channels = decoder[-1]
        self.down = encoder_blocks(in_channels, encoder)
        self.upsample, self.up = decoder_blocks(encoder[-1], reversed(encoder[:-1]), decoder)
        self.head = nn.Sequential(conv_bn_relu(decoder[-1], head, kernel=1), nn.Conv2d(head, num_classes, 1))

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.down) - 1)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = encode_decode(x, self.down, self.upsample, self.up)
        logits = self.head(features)
        return (logits, features) if return_features else logits
