"""HF-UNet: shapes, block placement, memory-bounded position attention, contour target, loss and cold start."""

import math

import pytest
import torch
from torch.nn import functional as F

from segcore.networks.hfunet import ChannelAttention, HFUNet, HFUNetOutput, PositionAttention
from training.losses.boundaries import contour_map
from training.losses.hfunet import contour_target, hfunet_loss

WIDTHS = (8, 16, 32, 64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread is as fast and does not spin against other work on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count(module):
    return sum(p.numel() for p in module.parameters())


def square_target(n=2, size=32, lo=8, hi=24):
    target = torch.zeros(n, size, size, dtype=torch.long)
    target[:, lo:hi, lo:hi] = 1
    return target


@pytest.mark.parametrize("kind", ["residual", "catt", "patt", "datt"])
@pytest.mark.parametrize("blocks", [1, 2, 3, 6])
def test_shapes_for_every_kind_and_block_count(kind, blocks):
    torch.manual_seed(0)
    net = HFUNet(widths=WIDTHS, tcl_blocks=blocks, tcl=kind).eval()
    assert net.divisor == 8 and net.in_channels == 3 and net.num_classes == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = net(x)
        output = net(x, return_all=True)
    assert logits.shape == (2, 2, 32, 32)
    assert isinstance(output, HFUNetOutput)
    assert torch.allclose(output.logits, logits)
    assert output.contour.shape == (2, 1, 32, 32)
    assert len(output.pairs) == blocks
    # block order: decoder from the top down, then encoder from the top down
    levels = [0, 1, 2, 0, 1, 2][:blocks]
    for (seg, contour, public), level in zip(output.pairs, levels):
        side = 32 // 2 ** level
        assert seg.shape == contour.shape == public.shape == (2, WIDTHS[level], side, side)


def test_encoder_is_shared_below_six_blocks():
    three, six = HFUNet(widths=WIDTHS, tcl_blocks=3), HFUNet(widths=WIDTHS, tcl_blocks=6)
    assert three.shared_encoder and three.contour.down is None
    assert not six.shared_encoder and len(six.contour.down) == len(WIDTHS)
    # apart from the three extra TCL blocks, HF-UNet-6 differs exactly by a second encoder
    assert count(six) - count(six.tcl) - (count(three) - count(three.tcl)) == count(six.contour.down)
    assert count(three) < count(six)


@pytest.mark.parametrize("blocks", [0, 4, 5, 7, -1])
def test_bad_block_counts_are_refused(blocks):
    with pytest.raises(ValueError, match="tcl_blocks"):
        HFUNet(widths=WIDTHS, tcl_blocks=blocks)


def test_block_counts_follow_the_depth_and_bad_kinds_are_refused():
    for blocks in (1, 2, 4):
        assert len(HFUNet(widths=(8, 16, 32), tcl_blocks=blocks).tcl) == blocks
    with pytest.raises(ValueError, match="tcl_blocks"):
        HFUNet(widths=(8, 16, 32), tcl_blocks=3)
    with pytest.raises(ValueError, match="kind"):
        HFUNet(widths=(8, 16, 32), tcl_blocks=2, tcl="xatt")


def naive_position_attention(module, x, keys_from=None):
    """The DANet position module with one full softmax over all key positions."""
    n, c, h, w = x.shape
    source = x if keys_from is None else keys_from
    query = module.query(x).flatten(2)                                        # (n, c', hw)
    key = module.key(source).flatten(2)                                       # (n, c', m)
    value = module.value(source).flatten(2)                                   # (n, c, m)
    weights = torch.softmax(torch.einsum("nqi,nqj->nij", query, key), dim=-1)  # (n, hw, m)
    return module.gamma * torch.einsum("ncj,nij->nci", value, weights).view(n, c, h, w)


def test_position_attention_on_a_small_map_equals_the_full_softmax():
    torch.manual_seed(0)
    module = PositionAttention(16, grid=12)      # a 12 x 10 map: no pooling, exact
    with torch.no_grad():
        module.gamma.fill_(1.5)
        x = torch.randn(2, 16, 12, 10)
        out = module(x)
        reference = naive_position_attention(module, x)
    assert out.shape == x.shape
    assert torch.allclose(out, reference, atol=1e-5)
    assert out.abs().max() > 0.1


def test_large_maps_attend_on_the_pooled_map_and_are_upsampled(monkeypatch):
    torch.manual_seed(0)
    module = PositionAttention(8, grid=8)
    with torch.no_grad():
        module.gamma.fill_(1.0)
    shapes = []
    softmax = torch.softmax

    def spy(tensor, dim):
        shapes.append(tuple(tensor.shape))
        return softmax(tensor, dim)

    x = torch.randn(1, 8, 128, 128)
    monkeypatch.setattr(torch, "softmax", spy)
    with torch.no_grad():
        out = module(x)
    monkeypatch.setattr(torch, "softmax", softmax)
    assert out.shape == x.shape
    assert shapes == [(1, 64, 64)]              # one 8x8-position mask, not (128*128)^2
    with torch.no_grad():
        pooled = F.adaptive_avg_pool2d(x, 8)
        reference = F.interpolate(naive_position_attention(module, pooled), size=(128, 128), mode="bilinear",
                                  align_corners=False)
    assert torch.allclose(out, reference, atol=1e-5)


def test_channel_attention_and_float32_under_autocast():
    torch.manual_seed(0)
    module = ChannelAttention()
    with torch.no_grad():
        module.gamma.fill_(0.5)
        x = torch.randn(2, 6, 5, 4)
        flat = x.flatten(2)
        reference = 0.5 * torch.softmax(flat @ flat.transpose(1, 2), -1) @ flat
        assert torch.allclose(module(x), reference.view_as(x), atol=1e-5)
        # values whose Gram matrix would overflow float16 stay finite
        big = torch.full((1, 4, 32, 32), 20.0, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(big)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_contour_target_of_an_isolated_pixel_is_the_truncated_gaussian():
    sigma = 5.0
    target = torch.zeros(1, 41, 41, dtype=torch.long)
    target[0, 20, 20] = 1
    s = contour_target(target, sigma)
    assert s.shape == (1, 1, 41, 41) and s.dtype == torch.float32
    peak = 1 / (sigma * math.sqrt(2 * math.pi))
    assert s[0, 0, 20, 20].item() == pytest.approx(peak, rel=1e-6)
    assert s[0, 0, 20, 24].item() == pytest.approx(peak * math.exp(-16 / 50), rel=1e-6)
    assert s[0, 0, 20, 25].item() == 0          # distance sigma: outside the neighbour set
    assert s[0, 0, 23, 24].item() == 0          # distance 5 diagonally (3, 4)
    assert s.max().item() == pytest.approx(peak, rel=1e-6)
    # other labels are not the prostate
    assert contour_target(2 * target, sigma).abs().max() == 0


def test_contour_target_peaks_on_the_boundary_and_vanishes_far_from_it():
    target = torch.zeros(1, 48, 48, dtype=torch.long)
    target[0, 10:38, 10:38] = 1
    s = contour_target(target, 5.0)[0, 0]
    boundary = contour_map(target)[0]
    # the sum of eq. 1 is largest where boundary pixels crowd: just inside a corner, 2 pixels from it
    near = F.max_pool2d(boundary[None].float(), 5, stride=1, padding=2)[0] > 0
    assert s.max() == s[near].max() > s[~near].max()
    # along a straight edge the profile peaks on the boundary itself
    band = torch.zeros(1, 48, 48, dtype=torch.long)
    band[0, 10:38] = 1
    profile = contour_target(band, 5.0)[0, 0]
    assert profile.max() == profile[10, 24] == profile[37, 24] > max(profile[11, 24], profile[9, 24])
    assert profile.max() == pytest.approx(s[10, 24].item())
    assert s[10, 24] > s[11, 24] > s[14, 24] > 0 and s[10, 24] > s[9, 24] > s[6, 24] > 0
    assert s[24, 24] == 0 and s[0, 0] == 0 and s[47, 47] == 0
    assert s[15, 24] == 0 and s[5, 24] == 0     # 5 pixels from the boundary
    assert s[10, 24] > 1 / (5.0 * math.sqrt(2 * math.pi))


def tiny_net(**kwargs):
    torch.manual_seed(0)
    return HFUNet(widths=(8, 16, 32), tcl_blocks=4, **kwargs)


def test_loss_terms_and_gradients_reach_contour_branch_tcl_blocks_and_gammas():
    net = tiny_net()
    x, target = torch.randn(2, 3, 32, 32), square_target()
    terms = hfunet_loss(net(x, return_all=True), target, lambdas=(1.0, 0.5, 2.0))
    assert set(terms) == {"ce", "contour", "tcl", "total"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["contour"] > 0 and terms["tcl"] > 0
    weighted = terms["ce"] + 0.5 * terms["contour"] + 2.0 * terms["tcl"]
    assert torch.allclose(terms["total"], weighted)
    terms["total"].backward()
    assert net.contour.head.weight.grad.abs().sum() > 0
    assert net.contour.down[0][0][0].weight.grad.abs().sum() > 0
    for block in net.tcl:
        assert block.public[0][0].weight.grad.abs().sum() > 0
        gammas = [p for name, p in block.named_parameters() if name.endswith("gamma")]
        assert len(gammas) == 6
        for gamma in gammas:
            assert gamma.grad is not None and gamma.grad.abs().item() > 0


def test_tcl_loss_is_the_sum_of_feature_mses():
    net = tiny_net(tcl="residual")
    output = net(torch.randn(2, 3, 32, 32), return_all=True)
    terms = hfunet_loss(output, square_target())
    expected = sum(F.mse_loss(s, t) + F.mse_loss(c, t) for s, c, t in output.pairs)
    assert torch.allclose(terms["tcl"], expected)


def test_cold_start_trains_only_the_segmentation_branch():
    net = tiny_net()
    x, target = torch.randn(2, 3, 32, 32), square_target()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    net.cold_start(True)
    frozen = {name: p.detach().clone() for name, p in net.named_parameters()
              if name.startswith(("contour.", "tcl."))}
    segmentation = {name: p.detach().clone() for name, p in net.named_parameters() if name.startswith("seg.")}
    assert frozen and all(not p.requires_grad for n, p in net.named_parameters() if n in frozen)
    terms = hfunet_loss(net(x, return_all=True), target, cold=True)
    assert not terms["contour"].requires_grad and not terms["tcl"].requires_grad
    assert torch.isfinite(terms["tcl"]) and terms["tcl"] > 0
    assert torch.equal(terms["total"], terms["ce"])
    optimizer.zero_grad()
    terms["total"].backward()
    optimizer.step()
    params = dict(net.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), name
    changed = [name for name, before in segmentation.items() if not torch.equal(params[name], before)]
    assert any(n.startswith("seg.down.") for n in changed) and "seg.head.weight" in changed
    net.cold_start(False)
    assert all(p.requires_grad for p in net.parameters())


def test_fresh_attention_blocks_are_plain_residual_sums():
    torch.manual_seed(0)
    net = HFUNet(widths=(8, 16, 32), tcl_blocks=4, tcl="datt").eval()
    block = net.tcl[0]
    seg, contour = torch.rand(2, 8, 16, 16), torch.rand(2, 8, 16, 16)
    with torch.no_grad():
        fused_seg, fused_contour, public = block(seg, contour)
        assert torch.allclose(public, block.public(seg + contour))
        assert torch.allclose(fused_seg, 2 * seg + 2 * public)
        assert torch.allclose(fused_contour, 2 * contour + 2 * public)
    residual = HFUNet(widths=(8, 16, 32), tcl_blocks=1, tcl="residual", alpha=0.3).eval().tcl[0]
    with torch.no_grad():
        fused_seg, _, public = residual(seg, contour)
        assert torch.allclose(fused_seg, 0.3 * seg + 0.7 * public)
