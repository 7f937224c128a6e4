"""The training losses of the networks, one module per network (segcore ships inference code only).

- `metricunet`: the voxel-metric loss (`VoxelMetricLoss`, `MetricLossConfig`) and `metricunet_loss`;
- `hfunet`: the contour-sensitive target and `hfunet_loss`;
- `hmedn`: boundary maps, difficulty weights, the contour target and `hmedn_loss`;
- `hmrnet`: `LossConfig` and `hmrnet_loss` with its RPN, box, shape and manifold parts;
- `boundaries`: `contour_map`, the inner organ boundary the contour-aware targets start from.

None of them has parameters, so nothing of them enters an exported model package.
"""

from .boundaries import contour_map
from .hfunet import hfunet_loss
from .hmedn import hmedn_loss
from .hmrnet import hmrnet_loss
from .metricunet import MetricLossConfig, VoxelMetricLoss, metricunet_loss

__all__ = ["MetricLossConfig", "VoxelMetricLoss", "contour_map", "hfunet_loss", "hmedn_loss", "hmrnet_loss",
           "metricunet_loss"]
