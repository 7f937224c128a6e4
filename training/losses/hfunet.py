"""HF-UNet's training target and loss: the contour-sensitive map of eq. 1 and the total of eq. 6.

`hfunet_loss` takes what ``HFUNet(x, return_all=True)`` returns (`HFUNetOutput`):
lambda-weighted cross-entropy of the segmentation, mean squared error of the
contour regression against `contour_target`, and the Task Consistency Learning
loss of eq. 3, which pulls each TCL block's two branch features (the "private"
ones, before fusion) towards its public feature; eq. 3's squared norms are taken
as mean squared errors, summed over blocks. During the cold start the total is
lambda1 * CE alone. The choices behind the network are in
``segcore/networks/hfunet.py``.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from segcore.networks.hfunet import HFUNetOutput

from .boundaries import contour_map


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """Eq. 1's weights on a (2r+1)^2 grid, r = ceil(sigma), zero at distance >= sigma."""
    radius = math.ceil(sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    squared = offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2
    kernel = torch.exp(-squared / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))
    return torch.where(squared < sigma ** 2, kernel, torch.zeros_like(kernel)).float()


def contour_target(target: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """The contour-sensitive regression target S(y) of eq. 1 for (N, H, W) label maps, as float (N, 1, H, W).

    Each pixel gets the sum over inner-boundary pixels of the prostate (class 1)
    closer than ``sigma`` of exp(-d^2 / (2 sigma^2)) / (sigma sqrt(2 pi)).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, not {sigma}")
    boundary = contour_map(target == 1).float().unsqueeze(1)
    kernel = _gaussian_kernel(float(sigma)).to(boundary.device)
    with torch.autocast(device_type=boundary.device.type, enabled=False):  # float32 sums
        return F.conv2d(boundary, kernel[None, None], padding=kernel.shape[-1] // 2)


def hfunet_loss(output: HFUNetOutput, target: torch.Tensor, lambdas=(1.0, 0.01, 1.0), sigma: float = 5.0,
                cold: bool = False) -> dict:
    """Eq. 6's terms: "ce", "contour" (MSE to `contour_target`), "tcl" (eq. 3) and their weighted "total".

    With ``cold`` (the cold-start phase) the total is lambda1 * CE alone and the
    other terms are reported detached.
    """
    l_ce, l_contour, l_tcl = (float(v) for v in lambdas)
    terms = {"ce": F.cross_entropy(output.logits.float(), target.long())}
    terms["contour"] = F.mse_loss(output.contour.float(), contour_target(target, sigma))
    tcl = output.logits.new_zeros((), dtype=torch.float32)
    for seg, contour, public in output.pairs:
        public = public.float()
        tcl = tcl + F.mse_loss(seg.float(), public) + F.mse_loss(contour.float(), public)
    terms["tcl"] = tcl
    if cold:
        terms["contour"], terms["tcl"] = terms["contour"].detach(), terms["tcl"].detach()
        terms["total"] = l_ce * terms["ce"]
    else:
        terms["total"] = l_ce * terms["ce"] + l_contour * terms["contour"] + l_tcl * terms["tcl"]
    return terms
