"""MetricUNet and the 2.5-D U-Net: shapes, the paper's parameter count, the voxel-metric loss and its samplers,
the network registry and weight loading."""

import pytest
import torch

from segcore import networks
from segcore.errors import ModelPackageError
from segcore.networks.metricunet import MetricUNet
from segcore.networks.unet import UNet2p5D
from training.losses.boundaries import contour_map
from training.losses.metricunet import (
    MetricLossConfig,
    VoxelMetricLoss,
    _pick,
    anchor_candidates,
    metricunet_loss,
)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_metricunet_default_is_table_one_of_the_paper():
    # Table I of the MetricUNet paper: 3.28 M parameters in total.
    assert abs(count(MetricUNet()) - 3.28e6) / 3.28e6 < 0.01


@pytest.mark.parametrize("size", [(64, 64), (128, 96)])
def test_shapes(size):
    torch.manual_seed(0)
    net = MetricUNet().eval()
    logits, features = net(torch.randn(2, 3, *size), return_features=True)
    assert logits.shape == (2, 2, *size)
    assert features.shape == (2, 256, *size)
    unet = UNet2p5D().eval()
    assert unet(torch.randn(2, 5, *size)).shape == (2, 2, *size)


def test_every_loss_term_reaches_the_weights():
    torch.manual_seed(0)
    net = MetricUNet(encoder=(8, 16, 32, 64), decoder=(32, 16, 16), head=16)
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, 8:20, 10:24] = 1
    metric = VoxelMetricLoss(strategies=("random", "hard", "contour"))
    logits, features = net(torch.randn(2, 3, 32, 32), return_features=True)
    terms = metricunet_loss(logits, features, target, metric, torch.Generator().manual_seed(0))
    assert set(terms) == {"ce", "metric_random", "metric_hard", "metric_contour", "total"}
    decoder_weight = net.up[-1][1][0].weight
    head_weight = net.head[1].weight
    for name in ("ce", "metric_random", "metric_hard", "metric_contour"):
        net.zero_grad()
        terms[name].backward(retain_graph=True)
        assert decoder_weight.grad.abs().sum() > 0, name
        # the metric module works on the decoder features, before the segmentation head
        head_moved = head_weight.grad is not None and head_weight.grad.abs().sum() > 0
        assert head_moved == (name == "ce"), name


def test_metric_module_is_training_only():
    assert count(VoxelMetricLoss()) == 0
    keys = MetricUNet().state_dict().keys()
    assert not any("metric" in k for k in keys)


def test_hard_anchors_are_mispredicted_foreground_voxels():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    probabilities = torch.full((1, 4, 4), 0.05)
    probabilities[0, 0] = torch.tensor([0.95, 0.5, 0.89, 0.91])   # foreground row: 0.5 and 0.89 are off by > 0.1
    probabilities[0, 1] = 0.99
    probabilities[0, 3, 3] = 0.8                                   # a false positive is not a positive anchor
    hard = anchor_candidates("hard", probabilities, target, tau=0.1)
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 0, 1] = expected[0, 0, 2] = True
    assert torch.equal(hard, expected)
    assert torch.equal(anchor_candidates("random", probabilities, target, 0.1), target.bool())


def test_contour_anchors_lie_on_the_organ_boundary():
    target = torch.zeros(1, 7, 7, dtype=torch.long)
    target[0, 1:6, 1:6] = 1
    ring = contour_map(target)[0]
    assert ring.sum() == 16          # the 5x5 square's outer ring
    assert not ring[2:5, 2:5].any()  # inside stays out
    assert ring[1, 1:6].all() and ring[5, 1:6].all()


def test_sampling_draws_only_candidates():
    mask = torch.zeros(100, dtype=torch.bool)
    mask[[3, 17, 42]] = True
    picked = _pick(mask, 200, torch.Generator().manual_seed(1))
    assert set(picked.tolist()) == {3, 17, 42}


def test_triplet_and_pair_losses_match_hand_values():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    logits = torch.zeros(1, 2, 8, 8)  # p = 0.5 everywhere: every foreground voxel is a hard anchor
    config = MetricLossConfig(strategies=("random", "hard"), anchors=20, samples=1)
    # All voxels share one feature: d(a, p) = d(a, n) = 0, so each triplet costs the margin.
    same = torch.ones(1, 4, 8, 8)
    losses = VoxelMetricLoss(config)(same, logits, target, torch.Generator().manual_seed(0))
    assert losses["random"].item() == pytest.approx(20 * 0.7)
    # Foreground and background on orthogonal unit vectors: d(a, p) = 0, d(a, n) = 2 > margin: no loss.
    apart = torch.zeros(1, 4, 8, 8)
    apart[0, 0] = target[0].float()
    apart[0, 1] = 1 - target[0].float()
    losses = VoxelMetricLoss(config)(apart, logits, target, torch.Generator().manual_seed(0))
    assert losses["hard"].item() == pytest.approx(0.0)


def test_positive_pair_term_and_total_match_hand_values():
    # One image: foreground voxels split between two orthogonal directions, background on a third.
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    features = torch.zeros(1, 3, 4, 4)
    features[0, 0, 0] = 1.0       # foreground row 0: e0
    features[0, 1, 1] = 1.0       # foreground row 1: e1  -> d(e0, e1) = 2
    features[0, 2, 2:] = 1.0      # background: e2, at distance 2 from both
    logits = torch.zeros(1, 2, 4, 4)
    config = MetricLossConfig(strategies=("random",), anchors=50, samples=1, margin=0.0, beta=0.1,
                              pair_epsilon=0.01)
    generator = torch.Generator().manual_seed(0)
    loss = VoxelMetricLoss(config)(features, logits, target, generator)["random"]
    # Recompute what eq. 2 gives for the same draws: the triplet term relu(d_ap - d_an + 0) is 0 here
    # (d_an = 2 >= d_ap), the pair term is beta * relu(d_ap - eps) = 0.1 * 1.99 for each mixed pair.
    generator = torch.Generator().manual_seed(0)
    flat = target.reshape(-1).bool()
    anchors = _pick(flat, 50, generator)
    positives = _pick(flat, 50, generator)
    mixed = ((anchors < 4) != (positives < 4)).sum().item()
    assert mixed > 0
    assert loss.item() == pytest.approx(0.1 * 1.99 * mixed, rel=1e-5)

    net = MetricUNet(encoder=(4, 8, 8, 8), decoder=(8, 8, 8), head=8)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:10, 4:10] = 1
    logits, feats = net(torch.randn(2, 3, 16, 16), return_features=True)
    metric = VoxelMetricLoss(weight=0.01)
    terms = metricunet_loss(logits, feats, target, metric, torch.Generator().manual_seed(0))
    expected = terms["ce"] + 0.01 * (terms["metric_hard"] + terms["metric_contour"])
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["metric_hard"].item() > 0 and terms["metric_contour"].item() > 0


def test_unknown_strategy_and_architecture_are_refused():
    with pytest.raises(ValueError, match="unknown sampling"):
        MetricLossConfig(strategies=("nearest",))
    with pytest.raises(ModelPackageError, match="unknown network architecture 'vnet'"):
        networks.build("vnet", {})
    with pytest.raises(ModelPackageError, match="cannot build network 'metricunet'"):
        networks.build("metricunet", {"depth": 3})


def test_mismatched_weights_name_what_differs():
    small = UNet2p5D(widths=(8, 16))
    state = UNet2p5D(widths=(8, 32)).state_dict()
    with pytest.raises(ModelPackageError, match="stage1: the weights do not fit.*wrong shape"):
        networks.load_state(small, state, "stage1")
    # fp16 weights, as the bundled packages store them (integer buffers stay integers)
    networks.load_state(small, {k: v.half() if v.is_floating_point() else v
                                for k, v in UNet2p5D(widths=(8, 16)).state_dict().items()}, "fp16")
    assert small.head.weight.dtype == torch.float32
    with pytest.raises(ModelPackageError, match="wrong type"):  # a count stored as a float is damage
        networks.load_state(small, {k: v.half() for k, v in UNet2p5D(widths=(8, 16)).state_dict().items()}, "x")
