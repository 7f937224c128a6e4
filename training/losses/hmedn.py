"""HMEDN's training targets and losses: difficulty-guided cross-entropy (eq. 5) and the contour loss.

`hmedn_loss` takes what ``HMEDN(x, return_all=True)`` returns (`HMEDNOutput`):
the difficulty-weighted cross-entropy of the segmentation and of the
high-resolution pathway's deep supervision, plus the Euclidean loss of the
contour regression (eq. 2) weighted by alpha. How boundaries, weights and the
contour target are read from the paper is listed in
``segcore/networks/hmedn.py`` (organ boundaries, "summed up and then normalized").
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from segcore.networks.hmedn import HMEDNOutput

from .boundaries import contour_map


def organ_boundaries(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) labels -> (N, num_classes - 1, H, W) bool: the inner boundary of each organ k >= 1."""
    if num_classes < 2:
        raise ValueError("organ boundaries need at least one organ class besides the background")
    return torch.stack([contour_map(target == k) for k in range(1, num_classes)], dim=1)


def _gaussian_1d(delta: float, device) -> torch.Tensor:
    radius = math.ceil(3 * delta)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    g = torch.exp(-x.pow(2) / (2 * delta ** 2))
    return g / g.sum()


def smooth_boundaries(boundaries: torch.Tensor, delta: float) -> torch.Tensor:
    """Gaussian-smoothed (N, K, H, W) boundary maps, scaled so a long straight line peaks at 1, in [0, 1]."""
    if delta <= 0:
        raise ValueError(f"the Gaussian bandwidth must be positive, got {delta}")
    n, k, h, w = boundaries.shape
    g = _gaussian_1d(delta, boundaries.device)
    radius = (len(g) - 1) // 2
    maps = boundaries.float().reshape(n * k, 1, h, w)
    maps = F.conv2d(maps, g.view(1, 1, -1, 1), padding=(radius, 0))
    maps = F.conv2d(maps, g.view(1, 1, 1, -1), padding=(0, radius))
    # the unit-sum 2-D Gaussian across a straight line gives 1 / (sqrt(2 pi) delta) on it
    return (maps * (math.sqrt(2 * math.pi) * delta)).clamp_(0.0, 1.0).reshape(n, k, h, w)


def difficulty_weights(target: torch.Tensor, num_classes: int, mu0: float = 1.0, mu: float = 25.0,
                       delta2: float = 8.0) -> torch.Tensor:
    """The difficulty-guided weight map of eq. 4, mu0 + mu * sum_k SB_k, as (N, H, W) float."""
    smoothed = smooth_boundaries(organ_boundaries(target, num_classes), delta2)
    return mu0 + mu * smoothed.sum(dim=1)


def contour_target(target: torch.Tensor, num_classes: int, delta: float = 2.0) -> torch.Tensor:
    """The contour regression target: per voxel the largest smoothed organ boundary, (N, 1, H, W) in [0, 1]."""
    smoothed = smooth_boundaries(organ_boundaries(target, num_classes), delta)
    return smoothed.amax(dim=1, keepdim=True)


def _weighted_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights * F.cross_entropy(logits.float(), target, reduction="none")).mean()


def hmedn_loss(output: HMEDNOutput, target: torch.Tensor, mu0: float = 1.0, mu: float = 25.0, delta: float = 2.0,
               delta2: float = 8.0, alpha: float = 1.0, hr_weight: float = 1.0) -> dict:
    """Eq. 6 without the weight decay: seg + hr_weight * hr + alpha * contour, with each term for logging."""
    target = target.long()
    num_classes = output.logits.shape[1]
    with torch.no_grad():
        weights = difficulty_weights(target, num_classes, mu0, mu, delta2)
        contour = contour_target(target, num_classes, delta)
    terms = {
        "seg": _weighted_ce(output.logits, target, weights),
        "hr": _weighted_ce(output.hr_logits, target, weights),
        "contour": F.mse_loss(output.contour.float(), contour),
    }
    terms["total"] = terms["seg"] + hr_weight * terms["hr"] + alpha * terms["contour"]
    return terms
