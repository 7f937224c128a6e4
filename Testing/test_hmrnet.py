"""HMR-Net parts: ROIAlign, NMS and box coding against hand-computed values; the network's shapes; every
loss term reaching the parts it should train; learned cross-stitch units; the manifold loss's algebra."""

from __future__ import annotations

import pytest
import torch

from segcore.errors import ModelPackageError
from segcore.networks import build
from segcore.networks.hmrnet import (
    HMRNet,
    batched_nms,
    box_iou,
    decode_boxes,
    encode_boxes,
    make_anchors,
    nms,
    points_to_box,
    points_to_pixels,
    roi_align,
)
from training.losses.hmrnet import LossConfig, hmrnet_loss, manifold_loss, shape_loss, similarity_matrix

SMALL = {"num_classes": 3, "in_channels": 1, "depth": 18, "widths": [8, 8, 16, 16], "channels": 16, "points": 12,
         "anchor_sizes": [8, 16, 32, 64], "box_fc": 32, "shape_roi": 6, "shape_convs": [8, 8], "shape_fc": 32,
         "shape_fc_layers": 2, "rpn_pre_nms": 200, "rpn_post_nms": 20, "max_detections": 5,
         "score_threshold": 0.0, "canonical_roi": 16}


def ramp(h=6, w=6):
    """f(y, x) = x + 10 y on a (1, 1, h, w) map: bilinear sampling of it is exact."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return (x + 10 * y)[None, None]


def test_roi_align_reads_bin_centres_of_a_linear_map():
    features = ramp()
    # ROI over pixels [0, 4) x [0, 4): 2x2 bins, 2x2 samples per bin at index 0,1 | 2,3 in each direction.
    out = roi_align(features, torch.tensor([[0.0, 0, 0, 4, 4]]), 2, 1.0, 2)
    assert torch.allclose(out[0, 0], torch.tensor([[0.5 + 5, 2.5 + 5], [0.5 + 25, 2.5 + 25]]))
    # ROI [1, 3) x [1, 3) in one bin: samples at index 1 and 2, mean 1.5 in x and in y.
    out = roi_align(features, torch.tensor([[0.0, 1, 1, 3, 3]]), 1, 1.0, 2)
    assert out.item() == pytest.approx(1.5 + 15)
    # Half resolution (spatial scale 0.5): input pixels [2, 10) are feature pixels [1, 5).
    out = roi_align(features, torch.tensor([[0.0, 2, 2, 10, 10]]), 1, 0.5, 2)
    assert out.item() == pytest.approx(2.5 + 25)


def test_roi_align_edges_batch_index_and_gradient():
    features = torch.ones(2, 1, 4, 4)
    features[1] *= 3
    features.requires_grad_(True)
    rois = torch.tensor([[0.0, -8, -8, -4, -4],       # far outside: zero
                         [1.0, -0.5, -0.5, 1.5, 1.5],  # samples within a pixel of the edge read the edge
                         [1.0, 0, 0, 4, 4],
                         [1.0, -1, -1, 1, 1]])         # samples at index -1.25 (out), -0.75, -0.25, 0.25
    out = roi_align(features, rois, 2, 1.0, 2)
    assert out.shape == (4, 1, 2, 2)
    assert torch.all(out[0] == 0)
    assert torch.allclose(out[1], torch.full((1, 2, 2), 3.0))
    assert torch.allclose(out[2], torch.full((1, 2, 2), 3.0))
    # Bin (0, 0) has one of its four samples inside, bins (0, 1) and (1, 0) two, bin (1, 1) all four.
    assert torch.allclose(out[3, 0], torch.tensor([[0.75, 1.5], [1.5, 3.0]]))
    out.sum().backward()
    assert features.grad[1].sum() > 0 and features.grad[0].sum() == 0


def test_box_iou_and_nms_by_hand():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5]])
    iou = box_iou(boxes, boxes)
    assert iou[0, 1].item() == pytest.approx(81 / 119)
    assert iou[0, 2].item() == 0 and iou[0, 3].item() == pytest.approx(0.5)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # 3 (0.95) first; 0 overlaps it by 0.5 exactly (kept at 0.5, gone at 0.4); 1 overlaps 0 by 0.68.
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
    assert nms(boxes, scores, 0.4).tolist() == [3, 1, 2]
    assert nms(boxes, scores, 0.7).tolist() == [3, 0, 1, 2]
    assert nms(boxes, scores, 0.5, limit=2).tolist() == [3, 0]
    # Different classes never suppress each other.
    assert sorted(batched_nms(boxes[:2], scores[:2], torch.tensor([1, 2]), 0.5).tolist()) == [0, 1]
    assert nms(torch.zeros((0, 4)), torch.zeros(0), 0.5).numel() == 0


def test_box_coding_round_trip_and_anchors():
    reference = torch.tensor([[0.0, 0, 10, 20], [5, 5, 9, 7]])
    target = torch.tensor([[2.0, -1, 14, 19], [4, 4, 12, 8]])
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        assert torch.allclose(decode_boxes(reference, encode_boxes(reference, target, weights), weights), target,
                              atol=1e-5)
    anchors = make_anchors(16, 4, (2, 3), (0.5, 1.0, 2.0), "cpu")
    assert anchors.shape == (2 * 3 * 3, 4)
    # Pixel (0, 0) of a stride-4 map is centred on (2, 2); the square anchor is 16 wide.
    assert anchors[1].tolist() == [-6.0, -6.0, 10.0, 10.0]
    # ratio 2 = twice as tall as wide, same area.
    w, h = anchors[2, 2] - anchors[2, 0], anchors[2, 3] - anchors[2, 1]
    assert float(h / w) == pytest.approx(2.0) and float(w * h) == pytest.approx(256.0)


def test_points_normalised_to_their_box_and_back():
    boxes = torch.tensor([[10.0, 20, 30, 60]])
    points = torch.tensor([[[10.0, 20], [20, 40], [30, 60]]])
    normalised = points_to_box(points, boxes)
    assert torch.allclose(normalised, torch.tensor([[[-0.5, -0.5], [0, 0], [0.5, 0.5]]]))
    assert torch.allclose(points_to_pixels(normalised, boxes), points)


def test_shape_loss_is_equation_10():
    target = torch.ones(1, 2, 2)
    assert shape_loss(torch.zeros(1, 2, 2), target, 0.0).item() == pytest.approx(4.0)
    assert shape_loss(torch.ones(1, 2, 2), target, 0.5).item() == pytest.approx(0.5 * 4.0)
    # Mean over ROIs.
    assert shape_loss(torch.zeros(2, 2, 2), torch.cat([target, 0 * target]), 0.0).item() == pytest.approx(2.0)


def test_manifold_loss_matches_its_definition():
    torch.manual_seed(0)
    targets = torch.randn(7, 10)
    latent = torch.randn(7, 4)
    s = similarity_matrix(targets, 3)
    assert torch.allclose(s, s.T) and torch.all(torch.diag(s) == 0)
    assert torch.all((s > 0).sum(1) >= 3)        # every shape keeps its 3 nearest neighbours (or more, by symmetry)
    # The heat kernel's sigma is the mean distance between distinct shapes (eq. 2).
    distance = torch.cdist(targets, targets)
    sigma = distance.sum() / (7 * 6)
    i, j = torch.nonzero(s)[0]
    assert s[i, j].item() == pytest.approx(torch.exp(-distance[i, j] ** 2 / (2 * sigma ** 2)).item(), rel=1e-5)
    # tr(Z^T L_norm Z) = 1/2 sum_ij S_ij || z_i / sqrt(d_i) - z_j / sqrt(d_j) ||^2, scaled by 2 / #edges.
    d = s.sum(1)
    explicit = sum(s[a, b] * ((latent[a] / d[a].sqrt() - latent[b] / d[b].sqrt()) ** 2).sum()
                   for a in range(7) for b in range(7)) / 2
    assert manifold_loss(latent, targets, 3).item() == pytest.approx((2 / (s > 0).sum() * explicit).item(), rel=1e-4)
    # Shapes that look alike should have latent features alike: the loss is zero for a constant scaled latent.
    scaled = d.sqrt()[:, None] * torch.ones(7, 4)
    assert manifold_loss(scaled, targets, 3).item() == pytest.approx(0.0, abs=1e-5)


def targets_for(batch: int):
    boxes = torch.tensor([[8.0, 10, 30, 34], [36, 30, 56, 50]])
    centre = 0.5 * (boxes[:, None, :2] + boxes[:, None, 2:])
    angle = torch.linspace(0, 2 * torch.pi, 13)[:-1]
    ring = torch.stack([torch.cos(angle), torch.sin(angle)], 1)[None] * 0.45 * (boxes[:, None, 2:] - boxes[:, None, :2])
    return [{"boxes": boxes, "labels": torch.tensor([1, 3]), "points": centre + ring} for _ in range(batch)]


def test_rois_are_pooled_from_the_level_their_size_asks_for():
    network = build("hmrnet", SMALL)   # eq. 1 with k0 = 4 at 16 pixels
    boxes = torch.tensor([[0.0, 0, 4, 4], [0, 0, 8, 8], [0, 0, 16, 16], [0, 0, 32, 32], [0, 0, 200, 200]])
    assert network.level_of(boxes).tolist() == [0, 1, 2, 3, 3]   # H2 (clamped), H3, H4, H5, H5 (clamped)


def test_network_shapes_and_registry():
    network = build("hmrnet", SMALL)
    assert isinstance(network, HMRNet)
    network.eval()
    with torch.inference_mode():
        found = network(torch.randn(2, 1, 64, 64))
    assert len(found) == 2
    for d in found:
        n = d.boxes.shape[0]
        assert 0 < n <= SMALL["max_detections"]
        assert d.points.shape == (n, SMALL["points"], 2) and d.labels.shape == d.scores.shape == (n,)
        assert int(d.labels.min()) >= 1 and int(d.labels.max()) <= SMALL["num_classes"]
        assert float(d.boxes.min()) >= 0 and float(d.boxes.max()) <= 64
    # The CoordConv channels are added inside: the first convolutions see 1 + 2 channels.
    assert network.net_a.stem[0].in_channels == 3 and network.net_b.stem[0].in_channels == 3
    with pytest.raises(ModelPackageError, match="depth must be one of"):
        build("hmrnet", {**SMALL, "depth": 20})


@pytest.mark.parametrize("depth", [34, 50])
def test_deeper_backbones_build(depth):
    network = build("hmrnet", {**SMALL, "depth": depth})
    terms = hmrnet_loss(network, torch.randn(1, 1, 64, 64), targets_for(1))
    assert torch.isfinite(terms["total"])


# Which parameters each loss term must reach.
REACHES = {
    "rpn_class": ["rpn_objectness.weight", "net_a.stages.0.1.body.0.weight"],
    "rpn_box": ["rpn_deltas.weight", "net_a.lateral.3.weight"],
    "class": ["class_logits.weight", "box_head.1.weight", "net_a.fuse.0.0.weight"],
    "box": ["box_deltas.weight", "box_head.3.linear.weight"],
    "shape": ["shape_points.weight", "shape_convs.0.weight", "net_b.fuse.2.0.weight", "stitch_h.3.alpha"],
    "manifold": ["shape_latent.1.weight", "net_b.stages.3.0.body.0.weight"],
}


@pytest.mark.parametrize("term", list(REACHES))
def test_every_loss_term_trains_its_parts(term):
    torch.manual_seed(1)
    network = build("hmrnet", SMALL)
    network.train()
    terms = hmrnet_loss(network, torch.randn(2, 1, 64, 64), targets_for(2), LossConfig(neighbours=2),
                        torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms[term].item() > 0
    terms[term].backward()
    params = dict(network.named_parameters())
    for name in REACHES[term]:
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"{term} does not reach {name}"
    if term in ("class", "box", "rpn_class", "rpn_box"):  # detection terms leave the shape head alone
        assert params["shape_points.weight"].grad is None


def test_cross_stitch_alphas_are_learned():
    torch.manual_seed(2)
    network = build("hmrnet", SMALL)
    alphas = {n: p for n, p in network.named_parameters() if n.endswith("alpha")}
    assert len(alphas) == 5 + 4      # C1-C5 and H2-H5
    first = alphas["stitch_c.2.alpha"]
    assert first.shape == (8, 2, 2) and torch.allclose(first[0], torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    before = {n: p.detach().clone() for n, p in alphas.items()}
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
    hmrnet_loss(network, torch.randn(2, 1, 64, 64), targets_for(2))["total"].backward()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in alphas.items())


def test_a_slice_without_organs_trains_only_background():
    network = build("hmrnet", SMALL)
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.long),
              "points": torch.zeros((0, SMALL["points"], 2))}]
    terms = hmrnet_loss(network, torch.randn(1, 1, 64, 64), empty)
    assert terms["class"].item() > 0 and terms["shape"].item() == 0 and terms["box"].item() == 0
    terms["total"].backward()
