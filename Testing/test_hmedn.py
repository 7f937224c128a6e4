"""HMEDN: shapes per high-resolution stage, the dilated pathway, boundary targets, weights and losses."""

import itertools

import pytest
import torch
from torch.nn import functional as F

from segcore.networks.hmedn import HMEDN, HMEDNOutput, ResidualDilatedBlock
from training.losses.hmedn import (
    contour_target,
    difficulty_weights,
    hmedn_loss,
    organ_boundaries,
    smooth_boundaries,
)

TINY = {"widths": (8, 8, 16, 16, 16), "hr_channels": 8, "side_channels": 4}


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny networks here run fastest on one thread; two threads on a busy core can stall for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides):
    torch.manual_seed(0)
    return HMEDN(**{**TINY, **overrides})


def two_organs(n=2, size=32):
    target = torch.zeros(n, size, size, dtype=torch.long)
    target[:, 4:14, 6:20] = 1
    target[:, 14:24, 6:20] = 2      # touches organ 1
    target[:, 8:20, 22:28] = 3
    return target


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_outputs_and_high_resolution_stage(stage):
    net = tiny(hr_stage=stage).eval()
    sizes = []
    net.hr.entry.register_forward_hook(lambda module, args, out: sizes.append(tuple(args[0].shape[-2:])))
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        out = net(x, return_all=True)
        plain = net(x)
    assert isinstance(out, HMEDNOutput)
    assert out.logits.shape == (2, 4, 32, 32) and torch.equal(plain, out.logits)
    assert out.contour.shape == (2, 1, 32, 32)
    assert out.contour.min() >= 0 and out.contour.max() <= 1
    assert out.hr_logits.shape == (2, 4, 32, 32)
    assert net.divisor == 16
    # the pathway runs at its stage's resolution and joins the decoder at that level
    assert sizes[0] == (32 // 2 ** (stage - 1),) * 2
    widths = TINY["widths"]
    for block, level in zip(net.up, reversed(range(len(widths) - 1))):
        extra = TINY["hr_channels"] if level == stage - 1 else 0
        assert block.layers[0][0].in_channels == 2 * widths[level] + extra


@pytest.mark.parametrize("stage, message", [(0, "between 1"), (5, "bottom"), (6, "between 1")])
def test_bad_high_resolution_stage_is_refused(stage, message):
    with pytest.raises(ValueError, match=message):
        HMEDN(**TINY, hr_stage=stage)


def test_input_size_must_fit_the_divisor():
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny()(torch.randn(1, 5, 40, 32))


@pytest.mark.parametrize("blocks, dilations", [(9, (1, 2, 4)), (5, (2, 3))])
def test_high_resolution_pathway_blocks_and_dilations(blocks, dilations):
    net = tiny(hr_blocks=blocks, hr_dilations=dilations)
    found = [m for m in net.hr.modules() if isinstance(m, ResidualDilatedBlock)]
    assert len(found) == blocks
    for i, block in enumerate(found):
        d = dilations[i % len(dilations)]
        for conv in (block.conv1, block.conv2):
            assert conv.dilation == (d, d) and conv.padding == (d, d) and conv.kernel_size == (3, 3)
    # densely connected: the fusion sees the pathway input and every block's output
    assert net.hr.fuse[0].in_channels == TINY["hr_channels"] * (blocks + 1)


def test_dense_blocks_and_side_outputs():
    net = tiny(growth=6, dense_layers=3)
    for block, width in zip(net.down, TINY["widths"]):
        first = block.layers[0][0].in_channels
        assert [layer[0].in_channels for layer in block.layers] == [first, first + 6, first + 12]
        assert block.transition[0].in_channels == first + 18 and block.transition[0].out_channels == width
    # three side outputs (1/8, 1/4, 1/2 resolution) join the last decoder output before the heads
    assert net.side_levels == (1, 2, 3)
    assert net.fuse[0].in_channels == TINY["widths"][0] + 3 * TINY["side_channels"]
    assert HMEDN(widths=(8, 8, 8), hr_stage=1).side_levels == (1,)


def test_residual_block_has_an_identity_shortcut():
    block = ResidualDilatedBlock(4, 2).eval()
    torch.nn.init.zeros_(block.conv2.weight)
    x = torch.randn(1, 4, 12, 12)
    assert torch.allclose(block(x), F.relu(x))


def test_boundaries_are_the_inner_ring():
    target = torch.zeros(1, 12, 12, dtype=torch.long)
    target[0, 3:9, 2:10] = 2
    boundaries = organ_boundaries(target, 3)
    assert boundaries.shape == (1, 2, 12, 12) and boundaries.dtype == torch.bool
    assert not boundaries[0, 0].any()          # class 1 is absent
    ring = torch.zeros(12, 12, dtype=torch.bool)
    ring[3:9, 2:10] = True
    ring[4:8, 3:9] = False
    assert torch.equal(boundaries[0, 1], ring)


@pytest.mark.parametrize("delta", [2.0, 8.0])
def test_smoothed_straight_line_peaks_at_one_and_decays(delta):
    line = torch.zeros(1, 1, 96, 96, dtype=torch.bool)
    line[0, 0, 48] = True
    smooth = smooth_boundaries(line, delta)
    assert smooth.shape == (1, 1, 96, 96) and smooth.dtype == torch.float32
    column = smooth[0, 0, :, 48]
    assert column[48].item() == pytest.approx(1.0, abs=0.02)
    steps = [column[48 + int(k * delta)].item() for k in (0, 0.5, 1, 2)]
    assert all(a > b for a, b in itertools.pairwise(steps))
    assert column[48 + int(delta)].item() == pytest.approx(0.6065, abs=0.03)   # exp(-1/2) one delta away
    assert column[48 + 3 * int(delta) + 2:].abs().max() == 0
    assert smooth.min() >= 0 and smooth.max() <= 1


def test_difficulty_weights_far_on_a_boundary_and_where_organs_touch():
    target = torch.zeros(1, 160, 160, dtype=torch.long)
    target[0, 20:100, 20:60] = 1
    target[0, 20:100, 60:100] = 2
    weights = difficulty_weights(target, 3, mu0=1.0, mu=25.0, delta2=8.0)
    assert weights.shape == (1, 160, 160)
    assert weights[0, 150, 150].item() == pytest.approx(1.0, abs=1e-6)
    assert weights[0, 5, 150].item() == pytest.approx(1.0, abs=1e-6)
    edge = weights[0, 60, 20].item()            # middle of organ 1's free left edge
    assert edge == pytest.approx(26.0, abs=0.5)
    touching = weights[0, 60, 59].item()        # organ 1's edge, one voxel from organ 2's
    assert touching > edge + 0.8 * 25
    assert touching == pytest.approx(1 + 2 * 25, abs=1.5)
    flat = difficulty_weights(target, 3, mu0=1.0, mu=0.0)
    assert torch.equal(flat, torch.ones_like(flat))


def test_contour_target_is_in_unit_range():
    torch.manual_seed(0)
    for target in (two_organs(), torch.randint(0, 4, (2, 32, 32))):
        contour = contour_target(target, 4, delta=2.0)
        assert contour.shape == (2, 1, 32, 32)
        assert contour.min() >= 0 and contour.max() <= 1
    contour = contour_target(two_organs(), 4)
    assert contour.max() > 0.9 and contour[0, 0, 31, 0] == 0


def test_loss_terms_total_and_gradients():
    net = tiny(hr_stage=2).train()
    target = two_organs()
    out = net(torch.randn(2, 5, 32, 32), return_all=True)
    terms = hmedn_loss(out, target, alpha=2.0, hr_weight=0.5)
    assert set(terms) == {"seg", "hr", "contour", "total"}
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    expected = terms["seg"] + 0.5 * terms["hr"] + 2.0 * terms["contour"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)

    def moved(param):
        return param.grad is not None and param.grad.abs().sum() > 0

    hr_block = net.hr.blocks[0].conv1.weight
    sides = [net.sides[str(level)][0].weight for level in net.side_levels]
    reached = {}
    for name in ("seg", "hr", "contour", "total"):
        net.zero_grad(set_to_none=True)
        terms[name].backward(retain_graph=True)
        if name == "seg":
            assert all(moved(side) for side in sides)
        reached[name] = (moved(hr_block), moved(net.hr_head.weight), moved(net.seg_head.weight),
                         moved(net.contour_head.weight))
    # the pathway feeds the decoder (seg reaches it) and is deeply supervised (hr reaches it)
    assert reached["seg"] == (True, False, True, False)
    assert reached["hr"] == (True, True, False, False)
    assert reached["contour"] == (True, False, False, True)
    assert reached["total"] == (True, True, True, True)


def test_difficulty_weighting_changes_the_cross_entropy():
    torch.manual_seed(1)
    target = two_organs()
    out = HMEDNOutput(logits=torch.randn(2, 4, 32, 32), contour=torch.rand(2, 1, 32, 32),
                      hr_logits=torch.randn(2, 4, 32, 32))
    plain = F.cross_entropy(out.logits, target)
    weighted = hmedn_loss(out, target)
    unweighted = hmedn_loss(out, target, mu=0.0)
    assert unweighted["seg"].item() == pytest.approx(plain.item(), rel=1e-6)
    assert unweighted["hr"].item() == pytest.approx(F.cross_entropy(out.hr_logits, target).item(), rel=1e-6)
    assert abs(weighted["seg"].item() - plain.item()) > 0.1 * plain.item()
    weights = difficulty_weights(target, 4)
    manual = (weights * F.cross_entropy(out.logits, target, reduction="none")).mean()
    assert weighted["seg"].item() == pytest.approx(manual.item(), rel=1e-6)
    assert weighted["contour"].item() == pytest.approx(
        F.mse_loss(out.contour, contour_target(target, 4)).item(), rel=1e-6)
