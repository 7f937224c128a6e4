"""HMR-Net: holistic multitask regression of organ class, box and contour on 2-D slices.

The network of the HMR-Net paper, written here in plain PyTorch:

- two N-Nets (ResNet backbone + FPN P2-P5 + an extra pathway H2-H5 that folds
  every pyramid level into the P2 resolution), joined after every backbone stage
  and every H level by learned cross-stitch units; the input gets two CoordConv
  coordinate channels;
- N-Net A serves detection: a region proposal network (anchors, box refinement,
  non-maximum suppression) on P2-P5, then ROIAlign from the H level chosen by
  the ROI's size (eq. 1) and a linear regression network (class + box, maxout
  final layer);
- N-Net B serves shape: ROIAlign from H2-H5 concatenated, then a shape
  regression network (two convolutions, fully connected layers, maxout final
  layer) that predicts p boundary points per detected organ, in coordinates
  normalised to the ROI box (centre 0, box edges at +-0.5);
- training (``training/losses/hmrnet.py``, no parameters, never in a package):
  RPN objectness and box, class cross-entropy, box smooth-L1, shape loss
  (eq. 10) and the manifold regularisation tr(Z^T L_norm Z) over a kNN
  heat-kernel graph of the target shapes (eqs. 2-6).

torchvision does not install beside the CPU torch used here, so ROIAlign, NMS,
anchors and box coding are written in vectorised PyTorch below.

Choices where the paper is silent, or where it had to be read:
- the cross-stitch alphas are one 2x2 matrix per channel, initialised to
  0.9 on the diagonal and 0.1 across (Misra et al.), learned (Ruder et al.);
- H2 = P2 and H(i+1) = conv3x3(H(i) + upsample(P(i+1))), all at P2's resolution;
- "maxout for the final fully connected layer" is read as the activation of the
  last hidden layer of each head (two pieces), followed by linear outputs;
- shapes are class-specific (one set of p points per class, the predicted
  class's set is used), as masks are in Mask R-CNN;
- eq. 10's ||q||^2 term is kept with its own weight (the loss's
  `shape_norm_weight`, default 1e-3): at weight 1 its optimum would be half the
  true contour;
- widths are configurable: the paper's 256-channel pathway and 100/500-filter,
  1024-wide shape head are the defaults; the bundled demo model is narrower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LEVELS = (2, 3, 4, 5)


# --------------------------------------------------------------------------- geometry: boxes, ROIAlign, NMS


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU between every box of ``a`` (n, 4) and of ``b`` (m, 4), boxes as (x1, y1, x2, y2)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(dim=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-9), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, limit: int | None = None) -> torch.Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first (at most ``limit``).

    The IoU matrix is computed once, in torch; the greedy pass, which is sequential by nature, runs on it
    as a NumPy array, once per kept box."""
    order = torch.argsort(scores, descending=True)
    if order.numel() == 0:
        return order
    overlaps = (box_iou(boxes[order], boxes[order]) > threshold).cpu().numpy()
    alive = np.ones(order.numel(), bool)
    keep = []
    for i in range(order.numel()):
        if not alive[i]:
            continue
        keep.append(i)
        if limit is not None and len(keep) >= limit:
            break
        alive &= ~overlaps[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float,
                limit: int | None = None) -> torch.Tensor:
    """NMS within each group (class or image) only: boxes of different groups are moved apart first."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    shift = groups.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + shift, scores, threshold, limit)


def encode_boxes(reference: torch.Tensor, target: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Deltas (dx, dy, dw, dh) that turn ``reference`` boxes into ``target`` boxes (Faster R-CNN coding)."""
    rw, rh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
    rx, ry = reference[:, 0] + 0.5 * rw, reference[:, 1] + 0.5 * rh
    tw, th = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
    tx, ty = target[:, 0] + 0.5 * tw, target[:, 1] + 0.5 * th
    wx, wy, ww, wh = weights
    return torch.stack([wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * torch.log(tw / rw), wh * torch.log(th / rh)],
                       dim=1)


_MAX_LOG_SCALE = math.log(1000.0 / 16)


def decode_boxes(reference: torch.Tensor, deltas: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Inverse of `encode_boxes` (size changes are clamped, so a wild delta cannot overflow)."""
    rw, rh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
    rx, ry = reference[:, 0] + 0.5 * rw, reference[:, 1] + 0.5 * rh
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = (deltas[:, 2] / ww).clamp(max=_MAX_LOG_SCALE)
    dh = (deltas[:, 3] / wh).clamp(max=_MAX_LOG_SCALE)
    cx, cy = rx + dx * rw, ry + dy * rh
    w, h = rw * torch.exp(dw), rh * torch.exp(dh)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int = 2) -> torch.Tensor:
    """ROIAlign (He et al., 2017; pixel-centre aligned): (R, C, size, size) from ``features`` (B, C, H, W).

    ``rois`` is (R, 5): batch index, x1, y1, x2, y2 in input pixels. Each output
    bin averages ``sampling_ratio``^2 bilinear samples at regularly spaced points
    inside the bin; a sample more than one pixel outside the map counts as zero
    and one within a pixel of the edge reads the edge, as in torchvision. The
    bilinear reads are one `grid_sample` call per image (coordinates clamped to
    the map first, so its interpolation is exactly the bilinear one)."""
    _, c, h, w = features.shape
    r = rois.shape[0]
    if r == 0:
        return features.new_zeros((0, c, output_size, output_size))
    n = output_size * sampling_ratio
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - 0.5 for i in range(1, 5))
    steps = (torch.arange(n, device=features.device, dtype=features.dtype) + 0.5) / n  # (n,)
    ys = (y1[:, None] + (y2 - y1)[:, None] * steps[None, :])[:, :, None].expand(r, n, n)
    xs = (x1[:, None] + (x2 - x1)[:, None] * steps[None, :])[:, None, :].expand(r, n, n)
    inside = ((ys >= -1) & (ys <= h) & (xs >= -1) & (xs <= w)).to(features.dtype)
    # grid_sample (align_corners=False) reads pixel centre i at (2 i + 1) / size - 1.
    grid = torch.stack([(2 * xs.clamp(0, w - 1) + 1) / w - 1, (2 * ys.clamp(0, h - 1) + 1) / h - 1], dim=-1)
    out = features.new_zeros((r, c, n, n))
    batch = rois[:, 0].long()
    for i in torch.unique(batch).tolist():
        pick = torch.nonzero(batch == i).flatten()
        sampled = F.grid_sample(features[i:i + 1], grid[pick].reshape(1, -1, n, 2), mode="bilinear",
                                padding_mode="border", align_corners=False)       # (1, C, k*n, n)
        out[pick] = sampled.view(c, pick.numel(), n, n).transpose(0, 1)
    out = out * inside[:, None]
    return out.view(r, c, output_size, sampling_ratio, output_size, sampling_ratio).mean(dim=(3, 5))


def make_anchors(size: int, stride: int, feature_hw: tuple[int, int], ratios, device) -> torch.Tensor:
    """Anchors of one pyramid level, (H*W*len(ratios), 4), centred on the feature-map pixels."""
    h, w = feature_hw
    ratios = torch.as_tensor(ratios, dtype=torch.float32, device=device)
    half_w = 0.5 * size / torch.sqrt(ratios)   # ratio = height / width, area size^2
    half_h = 0.5 * size * torch.sqrt(ratios)
    base = torch.stack([-half_w, -half_h, half_w, half_h], dim=1)  # (A, 4)
    cy = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    cx = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (centres + base[None]).reshape(-1, 4)


# --------------------------------------------------------------------------- building blocks


class CoordConv(nn.Module):
    """Appends two channels holding each pixel's (row, column) position scaled to [-1, 1] (Liu et al., 2018)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        rows = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        cols = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([x, rows, cols], dim=1)


class CrossStitch(nn.Module):
    """A learned cross-stitch unit: per channel, [a; b] <- alpha [a; b] with a learned 2x2 alpha."""

    def __init__(self, channels: int, keep: float = 0.9):
        super().__init__()
        alpha = torch.tensor([[keep, 1 - keep], [1 - keep, keep]]).repeat(channels, 1, 1)
        self.alpha = nn.Parameter(alpha)  # (C, 2, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        al = self.alpha.view(1, -1, 2, 2, 1, 1)
        return al[:, :, 0, 0] * a + al[:, :, 0, 1] * b, al[:, :, 1, 0] * a + al[:, :, 1, 1] * b


class Maxout(nn.Module):
    """A fully connected layer with maxout activation (Goodfellow et al., 2013): max over ``pieces`` outputs."""

    def __init__(self, in_features: int, out_features: int, pieces: int = 2):
        super().__init__()
        self.pieces = pieces
        self.linear = nn.Linear(in_features, out_features * pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y.view(*y.shape[:-1], -1, self.pieces).amax(dim=-1)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out))
        self.skip = None if stride == 1 and in_channels == out else nn.Sequential(
            nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        return F.relu(self.body(x) + (x if self.skip is None else self.skip(x)))


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        nn.Module.__init__(self)
        out = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out))
        self.skip = None if stride == 1 and in_channels == out else nn.Sequential(
            nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))


RESNETS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


class NNet(nn.Module):
    """One N-shaped network: ResNet stages C1-C5, FPN P2-P5 and the H2-H5 pathway (the stages are called
    one at a time by `HMRNet`, so that cross-stitch units can join two N-Nets between them)."""

    def __init__(self, in_channels: int, depth: int, widths, channels: int):
        super().__init__()
        if depth not in RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNETS)}, not {depth}")
        block, counts = RESNETS[depth]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages, previous = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, counts)):
            layers = [nn.MaxPool2d(3, 2, 1)] if i == 0 else []
            for j in range(count):
                layers.append(block(previous, width, 2 if (j == 0 and i > 0) else 1))
                previous = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.stage_channels = [widths[0]] + [w * block.expansion for w in widths]  # C1..C5
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in self.stage_channels[1:])
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in LEVELS)
        self.fuse = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
                                  for _ in LEVELS[1:])

    def pyramid(self, c: list[torch.Tensor]) -> list[torch.Tensor]:
        """P2-P5 from C2-C5: top-down path with lateral 1x1 connections and 3x3 smoothing."""
        inner = self.lateral[-1](c[-1])
        out = [self.smooth[-1](inner)]
        for i in range(len(c) - 2, -1, -1):
            inner = self.lateral[i](c[i]) + F.interpolate(inner, size=c[i].shape[-2:], mode="nearest")
            out.insert(0, self.smooth[i](inner))
        return out

    def h_step(self, i: int, h: torch.Tensor, p_next: torch.Tensor) -> torch.Tensor:
        """H(i+1) from H(i) and P(i+1) brought up to H's (P2's) resolution."""
        return self.fuse[i](h + F.interpolate(p_next, size=h.shape[-2:], mode="bilinear", align_corners=False))


@dataclass
class Detections:
    """What the network found on one slice, in input pixels: boxes (n, 4) as x1, y1, x2, y2; labels (n,)
    as class indices 1..K; scores (n,); points (n, p, 2) as x, y along each contour."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    points: torch.Tensor


class HMRNet(nn.Module):
    """Two cross-stitched N-Nets, RPN, linear regression network and shape regression network."""

    def __init__(self, num_classes: int = 6, in_channels: int = 1, depth: int = 50,
                 widths=(64, 128, 256, 512), channels: int = 256, points: int = 50,
                 anchor_sizes=(32, 64, 128, 256), aspect_ratios=(0.5, 1.0, 2.0),
                 box_roi: int = 7, box_fc: int = 1024, shape_roi: int = 14, shape_convs=(100, 500),
                 shape_fc: int = 1024, shape_fc_layers: int = 4, maxout_pieces: int = 2,
                 canonical_roi: float = 224.0, rpn_pre_nms: int = 1000, rpn_post_nms: int = 100,
                 rpn_nms: float = 0.7, detection_nms: float = 0.3, score_threshold: float = 0.05,
                 max_detections: int = 20, min_box: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.points = points
        self.anchor_sizes = tuple(anchor_sizes)
        self.aspect_ratios = tuple(aspect_ratios)
        self.box_roi, self.shape_roi = box_roi, shape_roi
        self.canonical_roi = canonical_roi
        self.rpn_pre_nms, self.rpn_post_nms, self.rpn_nms = rpn_pre_nms, rpn_post_nms, rpn_nms
        self.detection_nms, self.score_threshold, self.max_detections = detection_nms, score_threshold, max_detections
        self.min_box = min_box
        self.coord = CoordConv()
        self.net_a = NNet(in_channels + 2, depth, widths, channels)  # detection: RPN + LRN
        self.net_b = NNet(in_channels + 2, depth, widths, channels)  # shape: SRN
        self.stitch_c = nn.ModuleList(CrossStitch(c) for c in self.net_a.stage_channels)
        self.stitch_h = nn.ModuleList(CrossStitch(channels) for _ in LEVELS)
        anchors = len(self.aspect_ratios)
        self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.rpn_objectness = nn.Conv2d(channels, anchors, 1)
        self.rpn_deltas = nn.Conv2d(channels, 4 * anchors, 1)
        # Linear regression network: class (background + K) and a box per class.
        self.box_head = nn.Sequential(nn.Flatten(), nn.Linear(channels * box_roi ** 2, box_fc), nn.ReLU(inplace=True),
                                      Maxout(box_fc, box_fc, maxout_pieces))
        self.class_logits = nn.Linear(box_fc, num_classes + 1)
        self.box_deltas = nn.Linear(box_fc, 4 * (num_classes + 1))
        # Shape regression network: two convolutions (the second halves the ROI), fully connected layers.
        c1, c2 = shape_convs
        self.shape_convs = nn.Sequential(
            nn.Conv2d(channels * len(LEVELS), c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True))
        fc_in = c2 * ((shape_roi + 1) // 2) ** 2
        layers: list[nn.Module] = [nn.Flatten()]
        for _ in range(shape_fc_layers - 1):
            layers += [nn.Linear(fc_in, shape_fc), nn.ReLU(inplace=True)]
            fc_in = shape_fc
        layers.append(Maxout(fc_in, shape_fc, maxout_pieces))
        self.shape_latent = nn.Sequential(*layers)
        self.shape_points = nn.Linear(shape_fc, num_classes * points * 2)

    # ------------------------------------------------------------------ features

    @property
    def divisor(self) -> int:
        return 32

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """P2-P5 of N-Net A (for the RPN), H2-H5 of N-Net A (for the LRN) and N-Net B's H2-H5 concatenated
        (for the SRN)."""
        x = self.coord(x)
        a, b = self.stitch_c[0](self.net_a.stem(x), self.net_b.stem(x))
        ca, cb = [], []
        for i, (stage_a, stage_b) in enumerate(zip(self.net_a.stages, self.net_b.stages)):
            a, b = self.stitch_c[i + 1](stage_a(a), stage_b(b))
            ca.append(a), cb.append(b)
        pa, pb = self.net_a.pyramid(ca), self.net_b.pyramid(cb)
        ha, hb = self.stitch_h[0](pa[0], pb[0])
        h_a, h_b = [ha], [hb]
        for i in range(len(LEVELS) - 1):
            ha, hb = self.stitch_h[i + 1](self.net_a.h_step(i, ha, pa[i + 1]), self.net_b.h_step(i, hb, pb[i + 1]))
            h_a.append(ha), h_b.append(hb)
        return pa, h_a, torch.cat(h_b, dim=1)

    # ------------------------------------------------------------------ region proposals

    def rpn(self, pyramid: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Objectness logits (B, N), deltas (B, N, 4) and anchors (N, 4) over all levels."""
        logits, deltas, anchors = [], [], []
        for level, (p, size) in enumerate(zip(pyramid, self.anchor_sizes)):
            t = F.relu(self.rpn_conv(p))
            b, _, h, w = t.shape
            logits.append(self.rpn_objectness(t).permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(self.rpn_deltas(t).permute(0, 2, 3, 1).reshape(b, -1, 4))
            anchors.append(make_anchors(size, 2 ** LEVELS[level], (h, w), self.aspect_ratios, p.device))
        return torch.cat(logits, 1), torch.cat(deltas, 1), torch.cat(anchors, 0)

    def proposals(self, logits, deltas, anchors, image_hw, post_nms: int) -> list[torch.Tensor]:
        """Per image: the best-scoring anchors refined by their deltas, clipped, small ones removed, NMS."""
        h, w = image_hw
        out = []
        for i in range(logits.shape[0]):
            score = logits[i].detach()
            top = torch.topk(score, min(self.rpn_pre_nms, score.numel())).indices
            boxes = decode_boxes(anchors[top], deltas[i, top].detach())
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                                 boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
            big = ((boxes[:, 2] - boxes[:, 0]) >= self.min_box) & ((boxes[:, 3] - boxes[:, 1]) >= self.min_box)
            boxes, s = boxes[big], score[top][big]
            keep = nms(boxes, s, self.rpn_nms, post_nms)
            out.append(boxes[keep])
        return out

    # ------------------------------------------------------------------ heads

    def level_of(self, boxes: torch.Tensor) -> torch.Tensor:
        """Eq. 1: which H level an ROI is pooled from, by its size (k0 = 4 at ``canonical_roi`` pixels)."""
        scale = torch.sqrt(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-6))
        k = torch.floor(4 + torch.log2(scale / self.canonical_roi + 1e-8))
        return k.clamp(LEVELS[0], LEVELS[-1]).long() - LEVELS[0]

    def box_features(self, h_levels: list[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """The LRN's hidden features for ROIs (R, 5), each pooled from its own H level."""
        pooled = h_levels[0].new_zeros((rois.shape[0], h_levels[0].shape[1], self.box_roi, self.box_roi))
        levels = self.level_of(rois[:, 1:])
        for k, h in enumerate(h_levels):
            pick = torch.nonzero(levels == k).flatten()
            if pick.numel():
                pooled[pick] = roi_align(h, rois[pick], self.box_roi, 1 / 2 ** LEVELS[0])
        return self.box_head(pooled)

    def shape_features(self, h_concat: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """The SRN's latent features (R, shape_fc): the Z of the manifold loss."""
        return self.shape_latent(self.shape_convs(roi_align(h_concat, rois, self.shape_roi, 1 / 2 ** LEVELS[0])))

    def class_points(self, latent: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Normalised points (R, p, 2) of each ROI's class (1..K)."""
        all_points = self.shape_points(latent).view(-1, self.num_classes, self.points, 2)
        return all_points[torch.arange(latent.shape[0], device=latent.device), classes - 1]

    # ------------------------------------------------------------------ inference

    def forward(self, x: torch.Tensor) -> list[Detections]:
        """Detections per image, in input pixels (use `pad_to_multiple` of `divisor` first)."""
        image_hw = x.shape[-2:]
        pyramid, h_a, h_b = self.features(x)
        logits, deltas, anchors = self.rpn(pyramid)
        proposals = self.proposals(logits, deltas, anchors, image_hw, self.rpn_post_nms)
        rois = _with_batch_index(proposals)
        hidden = self.box_features(h_a, rois)
        probabilities = F.softmax(self.class_logits(hidden), dim=1)
        box_deltas = self.box_deltas(hidden).view(-1, self.num_classes + 1, 4)
        out = []
        for i in range(x.shape[0]):
            mine = rois[:, 0] == i
            k = int(mine.sum())
            p = probabilities[mine][:, 1:]                      # (k, K)
            classes = torch.arange(1, self.num_classes + 1, device=x.device).repeat(k, 1)
            boxes = decode_boxes(rois[mine, 1:].repeat_interleave(self.num_classes, 0),
                                 box_deltas[mine][:, 1:].reshape(-1, 4), BOX_WEIGHTS)
            h, w = image_hw
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                                 boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
            scores, classes = p.reshape(-1), classes.reshape(-1)
            ok = (scores > self.score_threshold) & ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
            boxes, scores, classes = boxes[ok], scores[ok], classes[ok]
            keep = batched_nms(boxes, scores, classes, self.detection_nms, self.max_detections)
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
            out.append(Detections(boxes, classes, scores, boxes.new_zeros((0, self.points, 2))))
        # The shapes of the final boxes, all images at once.
        final = _with_batch_index([d.boxes for d in out])
        if final.shape[0]:
            points = self.class_points(self.shape_features(h_b, final), torch.cat([d.labels for d in out]))
            points = points_to_pixels(points, final[:, 1:])
            start = 0
            for d in out:
                d.points = points[start:start + d.boxes.shape[0]]
                start += d.boxes.shape[0]
        return out


BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the LRN's box coding (Faster R-CNN's second-stage weights)


def _with_batch_index(per_image: list[torch.Tensor]) -> torch.Tensor:
    parts = [torch.cat([torch.full((b.shape[0], 1), float(i), device=b.device, dtype=b.dtype), b], dim=1)
             for i, b in enumerate(per_image)]
    return torch.cat(parts, 0) if parts else torch.zeros((0, 5))


def points_to_box(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Pixel points (R, p, 2) -> coordinates normalised to the boxes (R, 4): centre 0, edges at +-0.5."""
    centre = 0.5 * (boxes[:, None, :2] + boxes[:, None, 2:])
    size = (boxes[:, None, 2:] - boxes[:, None, :2]).clamp(min=1e-3)
    return (points - centre) / size


def points_to_pixels(normalised: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Inverse of `points_to_box`."""
    centre = 0.5 * (boxes[:, None, :2] + boxes[:, None, 2:])
    size = boxes[:, None, 2:] - boxes[:, None, :2]
    return normalised * size + centre
