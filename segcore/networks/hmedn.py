"""HMEDN: the high-resolution multi-scale encoder-decoder network.

A 2-D network on stacked neighbouring slices (5 in the paper's pelvic setting)
that labels the middle slice as background, prostate, bladder or rectum. It
joins three pathways:

- the distilling pathway, a U-Net with four down- and four up-sampling steps
  whose building block is a dense block, with three HED-style side outputs of
  the decoder up-sampled and merged into the full-resolution features;
- a high-resolution pathway of nine densely connected residual dilated blocks
  that runs beside the encoder-decoder at one stage (the third is best on
  pelvic CT), feeds the decoder at that stage and is deeply supervised;
- two heads on the fused features: the segmentation and a regression of a
  smoothed organ contour map.

Training uses the difficulty-guided cross-entropy (eq. 5) on the segmentation
and on the high-resolution pathway's head, plus the Euclidean contour loss
(eq. 2) weighted by alpha. The targets and losses live in
``training/losses/hmedn.py``; they have no parameters and never enter an
exported package.

Choices where the paper is silent:
- Widths: the paper gives none for the distilling pathway; the defaults double
  per level from 32 to 512. Each dense block has ``dense_layers`` (3) 3x3
  convolutions of ``growth`` channels, each seeing the block input and every
  earlier layer, then a 1x1 transition to the level's width. ``growth``
  defaults to a sixth of the level's width (at least 8): with the default
  widths the distilling pathway then has 3.21 M parameters and the whole
  network 3.76 M, close to the paper's 3.2 M (DstNet1) and 3.78 M (HMEDN).
- Up-sampling is a 2x transposed convolution to the width of the level below,
  followed by the concatenation with the skip and a dense block.
- The side outputs come from the three decoder levels nearest the top below it
  (1/8, 1/4 and 1/2 resolution with four steps); each is a 1x1 conv-BN-ReLU to
  ``side_channels`` (16), bilinearly up-sampled, concatenated with the last
  decoder output and fused by a 3x3 conv-BN-ReLU to ``widths[0]`` channels.
- The high-resolution pathway starts with a 1x1 conv-BN-ReLU to its width L
  (56 at stage 3, the paper's value for that stage); its blocks are two 3x3
  convolutions with dilation d and batch norm, ReLU between them, an identity
  shortcut and a ReLU after the sum, d cycling through (1, 2, 4). "Densely
  connected" is read as: a 1x1 conv-BN-ReLU fuses the pathway input and every
  block's output into the pathway output. That output joins the decoder at
  the same stage beside the skip connection, and a 1x1 convolution to the
  classes, bilinearly up-sampled to the input size, is its deep supervision.
- Organ boundaries (training/losses/hmedn.py): the paper runs a Canny
  detector on the ground truth; on a binary mask that finds the step between
  organ and outside, taken here as the one-pixel inner boundary (organ voxels
  with a 4-neighbour outside the organ).
- "Summed up and then normalized": each boundary map is smoothed by a Gaussian
  of bandwidth delta (truncated at ceil(3 delta)) scaled so that a long
  straight one-pixel boundary peaks at 1, then clipped to [0, 1]; the
  difficulty weight is mu0 + mu * (sum over organs), so voxels far from every
  organ weigh mu0, a boundary about mu0 + mu and a border where two organs touch
  about mu0 + 2 mu. The contour target is the per-voxel maximum over organs of
  the same maps with delta = 2, in [0, 1] like the sigmoid that predicts it.
- Both cross-entropies are means over voxels of weight times per-voxel CE
  (eq. 5 with its 1/N); the deep supervision term has weight ``hr_weight`` (1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .unet import conv_bn_relu


class DenseBlock(nn.Module):
    """``layers`` 3x3 conv-BN-ReLU layers, each on everything before it, then a 1x1 transition."""

    def __init__(self, in_channels: int, out_channels: int, growth: int, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(conv_bn_relu(in_channels + i * growth, growth) for i in range(layers))
        self.transition = conv_bn_relu(in_channels + layers * growth, out_channels, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return self.transition(torch.cat(features, dim=1))


class ResidualDilatedBlock(nn.Module):
    """Two 3x3 convolutions of dilation ``dilation`` with batch norm and an identity shortcut."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.dilation = int(dilation)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=self.dilation, dilation=self.dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=self.dilation, dilation=self.dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(x + self.bn2(self.conv2(y)), inplace=True)


class HighResolutionPathway(nn.Module):
    """1x1 entry to ``channels``, ``blocks`` residual dilated blocks, a dense 1x1 fusion of them all."""

    def __init__(self, in_channels: int, channels: int, blocks: int, dilations):
        super().__init__()
        dilations = [int(d) for d in dilations]
        if blocks < 1 or not dilations or min(dilations) < 1:
            raise ValueError("the high-resolution pathway needs at least one block and positive dilations")
        self.entry = conv_bn_relu(in_channels, channels, kernel=1)
        self.blocks = nn.ModuleList(ResidualDilatedBlock(channels, dilations[i % len(dilations)])
                                    for i in range(blocks))
        self.fuse = conv_bn_relu(channels * (blocks + 1), channels, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        features = [x]
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return self.fuse(torch.cat(features, dim=1))


@dataclass
class HMEDNOutput:
    """Everything the training losses need: logits, contour map in [0, 1], deep-supervision logits."""

    logits: torch.Tensor
    contour: torch.Tensor
    hr_logits: torch.Tensor


class HMEDN(nn.Module):
    """Dense U-Net with side outputs, a high-resolution pathway at stage ``hr_stage``, two heads.

    ``widths`` gives the channels per level (``len(widths) - 1`` down-sampling
    steps); ``growth`` the channels each dense layer adds (an int for every
    level, a sequence per level, or None for a sixth of the level's width, at least 8).
    ``hr_stage`` 1 puts the high-resolution pathway at full resolution, 2
    after one down-sampling and so on; the bottom level is not allowed. The
    input's height and width must be multiples of ``divisor``.
    """

    def __init__(self, in_channels: int = 5, num_classes: int = 4, widths=(32, 64, 128, 256, 512), growth=None,
                 dense_layers: int = 3, hr_stage: int = 3, hr_channels: int = 56, hr_blocks: int = 9,
                 hr_dilations=(1, 2, 4), side_channels: int = 16):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2:
            raise ValueError("HMEDN needs at least two levels (one down-sampling step)")
        if growth is None:
            growth = [max(8, w // 6) for w in widths]
        elif isinstance(growth, int):
            growth = [growth] * len(widths)
        else:
            growth = [int(g) for g in growth]
            if len(growth) != len(widths):
                raise ValueError("growth needs one value per level")
        hr_stage = int(hr_stage)
        if hr_stage == len(widths):
            raise ValueError(f"hr_stage {hr_stage} is the bottom of the encoder-decoder, which has no decoder "
                             f"level for the high-resolution pathway to join; use 1 to {len(widths) - 1}")
        if not 1 <= hr_stage < len(widths):
            raise ValueError(f"hr_stage must be between 1 (full resolution) and {len(widths) - 1}, got {hr_stage}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.hr_stage = hr_stage
        hr_level = hr_stage - 1

        self.down = nn.ModuleList()
        channels = in_channels
        for width, grow in zip(widths, growth):
            self.down.append(DenseBlock(channels, width, grow, dense_layers))
            channels = width
        self.hr = HighResolutionPathway(widths[hr_level], hr_channels, hr_blocks, hr_dilations)
        self.hr_head = nn.Conv2d(hr_channels, num_classes, 1)

        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths) - 1)):
            width = widths[level]
            extra = hr_channels if level == hr_level else 0
            self.upsample.append(nn.ConvTranspose2d(channels, width, 2, stride=2))
            self.up.append(DenseBlock(2 * width + extra, width, growth[level], dense_layers))
            channels = width
        # side outputs from the decoder levels just below the top (at most three)
        self.side_levels = tuple(range(1, min(3, len(widths) - 2) + 1))
        self.sides = nn.ModuleDict({str(level): conv_bn_relu(widths[level], side_channels, kernel=1)
                                    for level in self.side_levels})
        self.fuse = conv_bn_relu(widths[0] + side_channels * len(self.side_levels), widths[0])
        self.seg_head = nn.Conv2d(widths[0], num_classes, 1)
        self.contour_head = nn.Conv2d(widths[0], 1, 1)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.down) - 1)

    def forward(self, x: torch.Tensor, return_all: bool = False):
        """Logits (N, num_classes, H, W); with ``return_all`` an `HMEDNOutput` for the training losses.

        Plain inference skips the contour and deep-supervision heads, which only training needs.
        """
        size = tuple(x.shape[-2:])
        if size[0] % self.divisor or size[1] % self.divisor:
            raise ValueError(f"HMEDN input height and width must be multiples of {self.divisor}, got {size}")
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        hr = self.hr(skips[self.hr_stage - 1])
        sides = []
        level = len(self.down) - 1
        for step, block in zip(self.upsample, self.up):
            level -= 1
            parts = [step(x), skips[level]]
            if level == self.hr_stage - 1:
                parts.append(hr)
            x = block(torch.cat(parts, dim=1))
            if level in self.side_levels:
                side = self.sides[str(level)](x)
                sides.append(F.interpolate(side, size=size, mode="bilinear", align_corners=False))
        features = self.fuse(torch.cat([x, *sides], dim=1))
        logits = self.seg_head(features)
        if not return_all:
            return logits
        hr_logits = self.hr_head(hr)
        if tuple(hr_logits.shape[-2:]) != size:
            hr_logits = F.interpolate(hr_logits, size=size, mode="bilinear", align_corners=False)
        return HMEDNOutput(logits=logits, contour=torch.sigmoid(self.contour_head(features)), hr_logits=hr_logits)
