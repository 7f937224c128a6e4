"""Stage 1: a light 2.5-D U-Net that finds the prostate on a coarse (about 4 mm) grid.

Neighbouring axial slices are stacked as input channels and the network
predicts the middle slice, as in the MetricUNet paper's first stage. The same
building blocks serve every U-Net-shaped network of the project.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(in_channels, out_channels), conv_bn_relu(out_channels, out_channels))


def encoder_blocks(in_channels: int, widths) -> nn.ModuleList:
    """The encoder of a U-Net: one double convolution per level, ``widths`` channels each."""
    blocks = nn.ModuleList()
    channels = in_channels
    for width in widths:
        blocks.append(double_conv(channels, width))
        channels = width
    return blocks


def decoder_blocks(bottom: int, skips, widths=None) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The decoder of a U-Net, from the bottom level up: per level a 2x transposed convolution to the
    level's width and a double convolution of it concatenated with the skip of that level.

    ``bottom`` is the channels of the bottom block, ``skips`` those of the skips from the deepest one up;
    ``widths`` gives each decoder level's channels (default: those of its skip, the classic U-Net).
    Returns the up-sampling steps and the blocks, built level by level in that order.
    """
    skips = list(skips)
    widths = skips if widths is None else list(widths)
    upsample, up = nn.ModuleList(), nn.ModuleList()
    channels = bottom
    for width, skip in zip(widths, skips):
        upsample.append(nn.ConvTranspose2d(channels, width, 2, stride=2))
        up.append(double_conv(width + skip, width))
        channels = width
    return upsample, up


def encode_decode(x: torch.Tensor, down, upsample, up) -> torch.Tensor:
    """The U-Net pass shared by every U-shaped network here: encoder blocks with 2x max-pooling between
    them, then per level an up-sampling, a concatenation with the skip of that level and a block."""
    skips = []
    for i, block in enumerate(down):
        if i:
            x = nn.functional.max_pool2d(x, 2)
        x = block(x)
        skips.append(x)
    for step, block, skip in zip(upsample, up, reversed(skips[:-1])):
        x = block(torch.cat([step(x), skip], dim=1))
    return x


class UNet2p5D(nn.Module):
    """Encoder-decoder with skip connections; ``widths`` gives the channels per level.

    ``in_channels`` is the number of stacked slices (5 for stage 1). The input's
    height and width must be multiples of ``2 ** (len(widths) - 1)``.
    """

    def __init__(self, in_channels: int = 5, num_classes: int = 2, widths=(16, 32, 64, 128)):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2:
            raise ValueError("a U-Net needs at least two levels")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.down = encoder_blocks(in_channels, widths)
        self.upsample, self.up = decoder_blocks(widths[-1], reversed(widths[:-1]))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.down) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(encode_decode(x, self.down, self.upsample, self.up))
