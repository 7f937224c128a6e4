"""HMR-Net's multitask training loss (eq. 7), in the parts the network trains.

- `rpn_losses`: anchors labelled by IoU with the organs' boxes, a balanced sample
  of them scored (objectness cross-entropy) and the positive ones regressed
  (smooth-L1 on the box deltas);
- `sample_rois`: the second stage's regions, proposals plus the true boxes, a
  balanced sample matched to organs;
- `box_loss`: the linear regression network's class-specific box deltas
  (its class cross-entropy is one line of `hmrnet_loss`);
- `shape_losses`: the shape regression network's points against the matched
  contour (eq. 10) and the manifold regularisation of its latent features
  (eqs. 2-6).

Nothing here has parameters or enters a package; the network and the reading of
the paper are in ``segcore/networks/hmrnet.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from segcore.networks.hmrnet import BOX_WEIGHTS, HMRNet, box_iou, encode_boxes, points_to_box


@dataclass
class LossConfig:
    """Weights and sampling of the multitask loss (eq. 7; the L2 term is the optimiser's weight decay)."""

    class_weight: float = 1.0          # lambda_c (RPN objectness and LRN class)
    box_weight: float = 1.0            # lambda_b (RPN and LRN boxes)
    shape_weight: float = 1.0          # lambda_s
    manifold_weight: float = 0.1       # lambda_m
    shape_norm_weight: float = 1e-3    # weight of eq. 10's ||q||^2 term
    neighbours: int = 5                # k of the kNN graph (eq. 2)
    rpn_positive_iou: float = 0.7
    rpn_negative_iou: float = 0.3
    rpn_batch: int = 256               # anchors sampled per image
    rpn_positive_fraction: float = 0.5
    rpn_train_post_nms: int = 300
    roi_positive_iou: float = 0.5
    roi_batch: int = 64                # ROIs sampled per image
    roi_positive_fraction: float = 0.25


def smooth_l1(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Eq. 9 (with the usual beta; 1 gives the paper's form), summed over the last axis."""
    a = x.abs()
    return torch.where(a < beta, 0.5 * a ** 2 / beta, a - 0.5 * beta).sum(dim=-1)


def shape_loss(predicted: torch.Tensor, target: torch.Tensor, norm_weight: float) -> torch.Tensor:
    """Eq. 10: mean over ROIs of the squared point error, plus ``norm_weight`` * ||q||^2."""
    if predicted.shape[0] == 0:
        return predicted.sum() * 0
    error = ((target - predicted) ** 2).flatten(1).sum(1)
    return (error + norm_weight * (predicted ** 2).flatten(1).sum(1)).mean()


def similarity_matrix(targets: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Eq. 2: heat-kernel weights between each target shape and its k nearest neighbours, made symmetric.

    sigma is the mean pairwise distance between the shapes (the paper's expression)."""
    n = targets.shape[0]
    y = targets.flatten(1)
    distance = torch.cdist(y, y)
    sigma = distance.sum() / max(n * (n - 1), 1)
    k = min(neighbours, n - 1)
    masked = distance + torch.diag(torch.full((n,), float("inf"), device=y.device))
    nearest = torch.topk(masked, k, dim=1, largest=False).indices
    s = torch.zeros_like(distance)
    weights = torch.exp(-distance.gather(1, nearest) ** 2 / (2 * sigma.clamp(min=1e-6) ** 2))
    s.scatter_(1, nearest, weights)
    return torch.maximum(s, s.T)


def manifold_loss(latent: torch.Tensor, targets: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Eqs. 5-6: 2 / (number of edges) * tr(Z^T L_norm Z), L_norm = D^-1/2 (D - S) D^-1/2."""
    if latent.shape[0] < 3:
        return latent.sum() * 0
    s = similarity_matrix(targets.detach(), neighbours)
    degree = s.sum(1)
    inv_sqrt = torch.where(degree > 0, degree.clamp(min=1e-12).rsqrt(), torch.zeros_like(degree))
    laplacian = torch.diag(degree) - s
    normalised = inv_sqrt[:, None] * laplacian * inv_sqrt[None, :]
    edges = (s > 0).sum().clamp(min=1)
    return 2.0 / edges * torch.trace(latent.T @ normalised @ latent)


def _sample(positive: torch.Tensor, negative: torch.Tensor, total: int, fraction: float, generator):
    pos = torch.nonzero(positive).flatten()
    neg = torch.nonzero(negative).flatten()
    n_pos = min(pos.numel(), int(total * fraction))
    pos = pos[torch.randperm(pos.numel(), generator=generator)[:n_pos].to(pos.device)]
    n_neg = min(neg.numel(), total - n_pos)
    neg = neg[torch.randperm(neg.numel(), generator=generator)[:n_neg].to(neg.device)]
    return pos, neg


@dataclass
class RoiSample:
    """The ROIs the second stage trains on and what each is matched to.

    ``rois`` (R, 5): batch index, x1, y1, x2, y2; ``labels`` (R,): class 1..K, 0
    for background; ``boxes`` (R, 4) and ``points`` (R, p, 2): the matched organ's
    box and contour in input pixels (for background ROIs of an image without
    organs, the ROI itself and zeros)."""

    rois: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    points: torch.Tensor


def rpn_losses(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor, targets: list[dict],
               config: LossConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RPN objectness and box losses: anchors labelled by IoU with the organs' boxes, a balanced sample of
    them scored, the positive ones regressed."""
    device = logits.device
    rpn_cls, rpn_box = [], []
    for i, target in enumerate(targets):
        gt = target["boxes"].to(device)
        if gt.shape[0] == 0:
            positive = torch.zeros(anchors.shape[0], dtype=torch.bool, device=device)
            negative = ~positive
            matched = None
        else:
            iou = box_iou(anchors, gt)
            best, matched = iou.max(dim=1)
            positive = best >= config.rpn_positive_iou
            positive[iou.argmax(dim=0)] = True  # every organ gets at least its best anchor
            negative = (best < config.rpn_negative_iou) & ~positive
        pos, neg = _sample(positive, negative, config.rpn_batch, config.rpn_positive_fraction, generator)
        chosen = torch.cat([pos, neg])
        labels = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).float()
        rpn_cls.append(F.binary_cross_entropy_with_logits(logits[i, chosen], labels, reduction="sum")
                       / max(chosen.numel(), 1))
        if pos.numel():
            wanted = encode_boxes(anchors[pos], gt[matched[pos]])
            rpn_box.append(smooth_l1(deltas[i, pos] - wanted, beta=1 / 9).sum() / max(chosen.numel(), 1))
    rpn_class_loss = torch.stack(rpn_cls).mean()
    rpn_box_loss = torch.stack(rpn_box).sum() / len(targets) if rpn_box else deltas.sum() * 0
    return rpn_class_loss, rpn_box_loss


def sample_rois(proposals: list[torch.Tensor], targets: list[dict], config: LossConfig, generator,
                points: int) -> RoiSample:
    """Per image, its proposals plus its true boxes, a balanced sample of them matched to organs by IoU."""
    rois, roi_labels, roi_boxes, roi_points = [], [], [], []
    for i, (boxes, target) in enumerate(zip(proposals, targets)):
        device = boxes.device
        gt = target["boxes"].to(device)
        candidates = torch.cat([boxes, gt])
        if gt.shape[0]:
            best, matched = box_iou(candidates, gt).max(dim=1)
        else:
            best = torch.zeros(candidates.shape[0], device=device)
            matched = torch.zeros(candidates.shape[0], dtype=torch.long, device=device)
        pos, neg = _sample(best >= config.roi_positive_iou, best < config.roi_positive_iou, config.roi_batch,
                           config.roi_positive_fraction, generator)
        chosen = torch.cat([pos, neg])
        rois.append(torch.cat([torch.full((chosen.numel(), 1), float(i), device=device), candidates[chosen]], 1))
        label = torch.zeros(chosen.numel(), dtype=torch.long, device=device)
        if pos.numel():
            label[: pos.numel()] = target["labels"].to(device)[matched[pos]]
        roi_labels.append(label)
        roi_boxes.append(gt[matched[chosen]] if gt.shape[0] else candidates[chosen])
        roi_points.append(target["points"].to(device)[matched[chosen]] if gt.shape[0]
                          else candidates.new_zeros((chosen.numel(), points, 2)))
    return RoiSample(torch.cat(rois), torch.cat(roi_labels), torch.cat(roi_boxes), torch.cat(roi_points))


def box_loss(network: HMRNet, hidden: torch.Tensor, sample: RoiSample, positive: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 of the LRN's box deltas for each positive ROI's own class, over all sampled ROIs."""
    labels = sample.labels[positive]
    predicted = network.box_deltas(hidden).view(-1, network.num_classes + 1, 4)[positive, labels]
    wanted = encode_boxes(sample.rois[positive, 1:], sample.boxes[positive], BOX_WEIGHTS)
    return smooth_l1(predicted - wanted).sum() / max(sample.rois.shape[0], 1)


def shape_losses(network: HMRNet, h_b: torch.Tensor, sample: RoiSample, positive: torch.Tensor,
                 config: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The SRN's shape loss (eq. 10) and manifold regularisation (eqs. 2-6) on the positive ROIs, the
    target contours normalised to each ROI's box."""
    rois = sample.rois[positive]
    latent = network.shape_features(h_b, rois)
    points = network.class_points(latent, sample.labels[positive])
    wanted_points = points_to_box(sample.points[positive], rois[:, 1:])
    shape = shape_loss(points, wanted_points, config.shape_norm_weight)
    manifold = manifold_loss(latent, wanted_points, config.neighbours)
    return shape, manifold


def hmrnet_loss(network: HMRNet, images: torch.Tensor, targets: list[dict], config: LossConfig | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """All loss terms for a batch. ``targets`` per image: ``boxes`` (n, 4) and ``points`` (n, p, 2) in input
    pixels, ``labels`` (n,) as class indices 1..K. Returns the terms and their weighted ``total``."""
    config = config or LossConfig()
    pyramid, h_a, h_b = network.features(images)
    logits, deltas, anchors = network.rpn(pyramid)
    rpn_class_loss, rpn_box_loss = rpn_losses(logits, deltas, anchors, targets, config, generator)
    proposals = network.proposals(logits, deltas, anchors, images.shape[-2:], config.rpn_train_post_nms)
    sample = sample_rois(proposals, targets, config, generator, network.points)
    hidden = network.box_features(h_a, sample.rois)
    class_loss = F.cross_entropy(network.class_logits(hidden), sample.labels)
    positive = torch.nonzero(sample.labels > 0).flatten()
    if positive.numel():
        box = box_loss(network, hidden, sample, positive)
        shape, manifold = shape_losses(network, h_b, sample, positive, config)
    else:  # no organ among the sampled ROIs: zeros that stay in the graph
        box = shape = manifold = hidden.sum() * 0
    terms = {"rpn_class": rpn_class_loss, "rpn_box": rpn_box_loss, "class": class_loss, "box": box,
             "shape": shape, "manifold": manifold}
    terms["total"] = (config.class_weight * (rpn_class_loss + class_loss) + config.box_weight * (rpn_box_loss + box)
                      + config.shape_weight * shape + config.manifold_weight * manifold)
    return terms
