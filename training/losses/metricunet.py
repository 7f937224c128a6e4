"""MetricUNet's training loss: online voxel-wise tuple sampling with triplet and positive-pair losses.

The voxel-metric module works on the features of the network's last decoder
convolution (``MetricUNet(x, return_features=True)``); it has no parameters and
never enters an exported package.

Choices where the paper is silent or inconsistent:
- Voxel features are L2-normalised before distances are taken, so the triplet
  margin (0.7) and pair threshold (0.01) have a fixed scale.
- The positive-pair term is a hinge, max(0, d(a, p) - epsilon): pairs closer
  than epsilon cost nothing, as "epsilon is the maximum distance of positive
  pairs" implies; the paper's eq. 2 prints it without the hinge.
- The losses are summed over tuples and images as in eq. 2, then weighted by
  lambda in the total (eq. 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .boundaries import contour_map

STRATEGIES = ("random", "hard", "contour")


def anchor_candidates(strategy: str, probabilities: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """Where anchors may be drawn for one strategy: a boolean (N, H, W) map inside the foreground.

    random: any foreground voxel. hard (focal hard negative): foreground voxels
    whose predicted foreground probability is off by more than ``tau`` (eq. 1,
    intersected with the positive map). contour: foreground voxels on the
    organ boundary.
    """
    fg = target.bool()
    if strategy == "random":
        return fg
    if strategy == "hard":
        return fg & ((probabilities - target.float()).abs() > tau)
    if strategy == "contour":
        return contour_map(target)
    raise ValueError(f"unknown sampling strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def _pick(mask: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` flat indices drawn uniformly (with replacement) from the True entries of a 1-D mask."""
    where = mask.nonzero(as_tuple=True)[0]
    choice = torch.randint(len(where), (count,), generator=generator, device="cpu").to(where.device)
    return where[choice]


@dataclass
class MetricLossConfig:
    """Hyper-parameters of the voxel-metric module; defaults are the paper's HCP configuration."""

    strategies: tuple = ("hard", "contour")
    anchors: int = 20          # k anchors per image and strategy
    samples: int = 1           # m positives and m negatives per anchor
    tau: float = 0.1           # focal hard negative threshold
    margin: float = 0.7        # triplet margin sigma
    pair_epsilon: float = 0.01
    beta: float = 0.1          # weight of the positive-pair term
    pair_loss: bool = True
    weight: float = 0.01       # lambda in the total loss

    def __post_init__(self):
        self.strategies = tuple(self.strategies)
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ValueError(f"unknown sampling strategies {unknown}; choose from {', '.join(STRATEGIES)}")


class VoxelMetricLoss(nn.Module):
    """Online voxel-wise tuple sampling with triplet and positive-pair losses (eq. 2). Training only."""

    def __init__(self, config: MetricLossConfig | None = None, **overrides):
        super().__init__()
        self.config = config or MetricLossConfig(**overrides)

    def forward(self, features: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Loss per strategy (summed over images and tuples), e.g. ``{"hard": ..., "contour": ...}``."""
        cfg = self.config
        n, d = features.shape[:2]
        embedding = F.normalize(features.float(), dim=1).permute(0, 2, 3, 1).reshape(n, -1, d)
        probabilities = torch.softmax(logits.detach().float(), dim=1)[:, 1]
        flat_target = target.reshape(n, -1).bool()
        losses = {}
        for strategy in cfg.strategies:
            candidates = anchor_candidates(strategy, probabilities, target, cfg.tau).reshape(n, -1)
            total = embedding.new_zeros(())
            for i in range(n):
                positives, negatives = flat_target[i], ~flat_target[i]
                if not candidates[i].any() or not negatives.any():
                    continue
                anchors = _pick(candidates[i], cfg.anchors, generator)
                pos = _pick(positives, cfg.anchors * cfg.samples, generator).view(cfg.anchors, cfg.samples)
                neg = _pick(negatives, cfg.anchors * cfg.samples, generator).view(cfg.anchors, cfg.samples)
                a = embedding[i, anchors].unsqueeze(1)                           # (k, 1, d)
                d_ap = (a - embedding[i, pos]).pow(2).sum(-1)                    # (k, m)
                d_an = (a - embedding[i, neg]).pow(2).sum(-1)                    # (k, m)
                # every positive against every negative of the same anchor
                triplet = F.relu(d_ap.unsqueeze(2) - d_an.unsqueeze(1) + cfg.margin)
                total = total + triplet.sum()
                if cfg.pair_loss:
                    total = total + cfg.beta * F.relu(d_ap - cfg.pair_epsilon).sum()
            losses[strategy] = total
        return losses


def metricunet_loss(logits: torch.Tensor, features: torch.Tensor, target: torch.Tensor,
                    metric: VoxelMetricLoss | None, generator: torch.Generator | None = None) -> dict:
    """The total loss of eq. 4, CE + lambda * sum of metric losses, with each term for logging."""
    terms = {"ce": F.cross_entropy(logits.float(), target.long())}
    total = terms["ce"]
    if metric is not None:
        for strategy, value in metric(features, logits, target, generator).items():
            terms[f"metric_{strategy}"] = value
            total = total + metric.config.weight * value
    terms["total"] = total
    return terms
