"""Stage 2: HF-UNet, the hierarchically fused multi-task U-Net.

Two U-Nets of the same shape work side by side on 3 stacked slices: one
segments the prostate, the other regresses a contour-sensitive map (every
boundary pixel spread by a truncated Gaussian, eq. 1). At ``tcl_blocks``
levels a Task Consistency Learning (TCL) block joins them: the sum of the two
branch features passes a 1x1 bottleneck and a 3x3 convolution and becomes the
level's "public" feature, which is mixed back into both branches either by a
weighted residual (eq. 4) or by channel and/or position attention (eq. 5). A
consistency loss pulls both branch features towards the public one (eq. 3);
the total loss is lambda-weighted CE + contour MSE + TCL loss (eq. 6). At
inference only the segmentation logits are used, but the contour branch still
runs because the TCL blocks feed it into the segmentation branch. The
training target and loss (`contour_target`, `hfunet_loss`) live in
``training/losses/hfunet.py``; they have no parameters and never enter an
exported package.

Choices where the paper is silent:
- Block positions: decoder levels from the full-resolution one down, then
  encoder levels from the top down; the bottom level never has a block.
  ``tcl_blocks`` = n <= levels - 1 takes the first n decoder positions
  (HF-UNet-1/2/3) and the two branches share one encoder, as the paper's
  single feature extraction path; 2 * (levels - 1) (HF-UNet-6 with four
  levels) gives each branch its own encoder and puts a block at every encoder
  and decoder level but the bottom.
- A block sits after a level's double convolution. Its fused output replaces
  the branch feature at that level: in the encoder it is both the skip
  connection and the input of the next max-pooling, in the decoder it goes to
  the next up-sampling or, at the top, to the branch's 1x1 head.
- The TCL loss pairs are the branch features before fusion (the "private"
  features) with the public feature; eq. 3's squared norms are taken as
  mean squared errors, summed over blocks.
- "datt" adds all four attention terms of eq. 5 (so the plain private and
  public features enter twice); "catt" and "patt" keep only the two terms of
  their kind, Ac1 x priv + priv + Ac2 x pub + pub and likewise with Ap.
- Channel attention follows the DANet channel module: softmax over the rows
  of the d x d Gram matrix X X^T, output gamma * (A X). Position attention
  follows the DANet position module: 1x1 query and key convolutions to
  max(1, C // 8) channels, a 1x1 value convolution to C, softmax over the
  keys, output gamma * (V A^T). Every gamma starts at 0, so a fresh attention
  block is exactly the plain residual sum of its private and public features
  and the cold start begins from that.
- The attention modules for the private features belong to each branch; for
  the public feature, which is the same for both branches, one module per
  kind is shared and evaluated once.
- Position attention cost: an exact mask is (H W)^2 floats, 1 GB per image on
  a whole 128 x 128 slice, and its products took ~80 % of a forward pass on
  a CPU. The module therefore attends on the feature map average-pooled to at
  most ``attention_grid`` x ``attention_grid`` positions (a mask of at most
  grid^4 floats, 4 MB per image with the default 32) and up-samples its output
  bilinearly; the gamma-weighted output is added to full-resolution features,
  so only the attention's own term is smooth. On 64 x 64 training patches only
  the top level is pooled (2x); on a 128 x 128 slice the top level is pooled
  4x and the second level 2x. Maps no larger than the grid are exact.
- Both attention kinds are computed in float32 with autocast off: the Gram
  matrix sums over every pixel and would overflow float16.
- Contour target (training/losses/hfunet.py): the foreground is class 1 (the
  prostate); its boundary is the one-pixel inner boundary of `contour_map`, and
  the Gaussian sum of eq. 1 (weight 1 / (sigma sqrt(2 pi)), no further
  normalisation) runs over boundary pixels closer than sigma. The contour head
  is linear (no activation).
- Cold start (`cold_start`): the contour branch and every TCL block are
  frozen (a shared encoder belongs to the segmentation branch and keeps
  training); the loss is then lambda1 * CE alone, the other terms are still
  reported, detached. Batch-norm running statistics of the frozen parts still
  follow the batches in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .unet import conv_bn_relu, decoder_blocks, encoder_blocks

TCL_KINDS = ("residual", "catt", "patt", "datt")


def _float32(x: torch.Tensor):
    """A context without autocast, for attention computed in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class ChannelAttention(nn.Module):
    """Self-attention across channels (DANet's channel module): gamma * softmax(X X^T) X."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        with _float32(x):
            flat = x.float().reshape(n, c, h * w)
            weights = torch.softmax(torch.bmm(flat, flat.transpose(1, 2)), dim=-1)    # (n, c, c)
            out = torch.bmm(weights, flat).view(n, c, h, w)
            return (self.gamma * out).to(x.dtype)


class PositionAttention(nn.Module):
    """Self-attention across positions (DANet's position module), on the map pooled to at most
    ``grid`` x ``grid`` positions and bilinearly up-sampled back (exact when the map is that small)."""

    def __init__(self, channels: int, grid: int = 32):
        super().__init__()
        inner = max(1, channels // 8)
        self.grid = int(grid)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        with _float32(x):
            small = x.float()
            if h > self.grid or w > self.grid:
                small = F.adaptive_avg_pool2d(small, (min(h, self.grid), min(w, self.grid)))
            sh, sw = small.shape[-2:]
            query = self.query(small).flatten(2).transpose(1, 2)                # (n, m, inner)
            key = self.key(small).flatten(2)                                    # (n, inner, m)
            value = self.value(small).flatten(2)                                # (n, c, m)
            weights = torch.softmax(torch.bmm(query, key), dim=-1)             # (n, m, m)
            out = torch.bmm(value, weights.transpose(1, 2)).view(n, c, sh, sw)
            if (sh, sw) != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            return (self.gamma * out).to(x.dtype)


class TCLBlock(nn.Module):
    """One Task Consistency Learning block: public feature from both branches, mixed back into each.

    ``forward(seg, contour)`` returns the fused segmentation and contour features
    and the public feature (for the consistency loss).
    """

    def __init__(self, channels: int, kind: str = "datt", alpha: float = 0.2, grid: int = 32):
        super().__init__()
        if kind not in TCL_KINDS:
            raise ValueError(f"unknown TCL block kind {kind!r}; choose from {', '.join(TCL_KINDS)}")
        self.kind = kind
        self.alpha = float(alpha)
        self.public = nn.Sequential(conv_bn_relu(channels, channels, kernel=1), conv_bn_relu(channels, channels))
        use_channel = kind in ("catt", "datt")
        use_position = kind in ("patt", "datt")
        # index 0: segmentation branch, 1: contour branch
        self.channel_private = nn.ModuleList([ChannelAttention() for _ in range(2)]) if use_channel else None
        self.channel_public = ChannelAttention() if use_channel else None
        self.position_private = (nn.ModuleList([PositionAttention(channels, grid) for _ in range(2)])
                                 if use_position else None)
        self.position_public = PositionAttention(channels, grid) if use_position else None

    def forward(self, seg: torch.Tensor, contour: torch.Tensor):
        public = self.public(seg + contour)
        if self.kind == "residual":
            shared = (1 - self.alpha) * public
            return self.alpha * seg + shared, self.alpha * contour + shared, public
        kinds = [(a, b) for a, b in ((self.channel_private, self.channel_public),
                                     (self.position_private, self.position_public)) if a is not None]
        shared = len(kinds) * public
        for _, public_attention in kinds:
            shared = shared + public_attention(public)
        fused = []
        for index, private in enumerate((seg, contour)):
            out = len(kinds) * private + shared
            for private_attention, _ in kinds:
                out = out + private_attention[index](private)
            fused.append(out)
        return fused[0], fused[1], public


class UNetBranch(nn.Module):
    """One branch: an optional encoder (None when it uses the other branch's), a decoder and a 1x1 head."""

    def __init__(self, in_channels: int, widths: list[int], out_channels: int, encoder: bool = True):
        super().__init__()
        self.down = encoder_blocks(in_channels, widths) if encoder else None
        self.upsample, self.up = decoder_blocks(widths[-1], reversed(widths[:-1]))
        self.head = nn.Conv2d(widths[0], out_channels, 1)


@dataclass
class HFUNetOutput:
    """Everything the training loss needs: logits, the contour regression and per-block feature triples.

    ``pairs`` holds one (segmentation feature, contour feature, public feature)
    tuple per TCL block, in block order (decoder from the top down, then encoder).
    """

    logits: torch.Tensor
    contour: torch.Tensor
    pairs: list = field(default_factory=list)


class HFUNet(nn.Module):
    """Segmentation and contour-regression U-Nets joined by TCL blocks.

    ``widths`` gives the channels per level of each branch; ``tcl_blocks`` the
    number of TCL blocks (1 .. levels - 1 with a shared encoder, or
    2 * (levels - 1)); ``tcl`` their kind ("residual" with weight ``alpha``,
    "catt", "patt" or "datt"). ``attention_grid`` bounds
    the memory of position attention. The input's height and width must be
    multiples of ``divisor``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, widths=(32, 64, 128, 256), tcl_blocks: int = 6,
                 tcl: str = "datt", alpha: float = 0.2, attention_grid: int = 32):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2:
            raise ValueError("HF-UNet needs at least two levels")
        steps = len(widths) - 1
        tcl_blocks = int(tcl_blocks)
        if not (1 <= tcl_blocks <= steps or tcl_blocks == 2 * steps):
            raise ValueError(f"tcl_blocks must be 1 to {steps} (decoder blocks, shared encoder) or {2 * steps} "
                             f"(every encoder and decoder level but the bottom) for {len(widths)} levels, "
                             f"not {tcl_blocks}")
        if tcl not in TCL_KINDS:
            raise ValueError(f"unknown TCL block kind {tcl!r}; choose from {', '.join(TCL_KINDS)}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], not {alpha}")
        if int(attention_grid) < 1:
            raise ValueError("attention_grid must be positive")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.tcl_blocks = tcl_blocks
        self.shared_encoder = tcl_blocks <= steps
        self.seg = UNetBranch(in_channels, widths, num_classes)
        self.contour = UNetBranch(in_channels, widths, 1, encoder=not self.shared_encoder)
        # position p < steps: decoder level p; position steps + k: encoder level k
        levels = [p if p < steps else p - steps for p in range(tcl_blocks)]
        self.tcl = nn.ModuleList([TCLBlock(widths[level], tcl, alpha, attention_grid)
                                  for level in levels])

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.seg.down) - 1)

    def cold_start(self, frozen: bool) -> None:
        """Freeze (or release) the contour branch and every TCL block; the segmentation branch stays trainable."""
        for parameter in list(self.contour.parameters()) + list(self.tcl.parameters()):
            parameter.requires_grad_(not frozen)

    def _fuse(self, position: int, seg, contour, pairs: list):
        if position >= len(self.tcl):
            return seg, contour
        fused_seg, fused_contour, public = self.tcl[position](seg, contour)
        pairs[position] = (seg, contour, public)
        return fused_seg, fused_contour

    def forward(self, x: torch.Tensor, return_all: bool = False):
        steps = len(self.seg.down) - 1
        pairs: list = [None] * len(self.tcl)
        seg_skips, contour_skips = [], []
        seg = contour = x
        for level, block in enumerate(self.seg.down):
            if level:
                seg = F.max_pool2d(seg, 2)
            seg = block(seg)
            if self.shared_encoder:
                contour = seg
            else:
                if level:
                    contour = F.max_pool2d(contour, 2)
                contour = self.contour.down[level](contour)
                if level < steps:
                    seg, contour = self._fuse(steps + level, seg, contour, pairs)
            seg_skips.append(seg)
            contour_skips.append(contour)
        for i, level in enumerate(reversed(range(steps))):
            seg = self.seg.up[i](torch.cat([self.seg.upsample[i](seg), seg_skips[level]], dim=1))
            contour = self.contour.up[i](torch.cat([self.contour.upsample[i](contour), contour_skips[level]], dim=1))
            seg, contour = self._fuse(level, seg, contour, pairs)
        logits = self.seg.head(seg)
        if not return_all:
            return logits
        return HFUNetOutput(logits=logits, contour=self.contour.head(contour), pairs=pairs)
