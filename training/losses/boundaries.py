"""Organ boundaries on label maps, the common ground of the contour-aware training targets."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def contour_map(target: torch.Tensor) -> torch.Tensor:
    """Foreground voxels with a background 4-neighbour (the inner boundary), for (N, H, W) masks."""
    fg = target.bool()
    padded = F.pad((~fg).float().unsqueeze(1), (1, 1, 1, 1), mode="replicate")
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=target.device)
    touches_background = F.conv2d(padded, cross.view(1, 1, 3, 3)).squeeze(1) > 0
    return fg & touches_background
