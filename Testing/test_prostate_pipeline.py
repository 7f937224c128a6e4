"""The prostate pipeline's geometry and decision pieces, without a trained model."""

import numpy as np
import pytest
import SimpleITK as sitk

from segcore.postprocess import bounding_box, clean_mask, fill_holes, largest_component
from segcore.prostate import (
    PipelineSettings,
    crop_reference,
    localise,
    normalise,
    paste_back,
    slice_stacks,
    soft_agreement,
)


def test_normalise_maps_the_window_to_unit_range():
    out = normalise(np.array([-1000, -200, 50, 300, 2000]), (-200, 300))
    assert out.dtype == np.float32
    assert out.tolist() == pytest.approx([0, 0, 0.5, 1, 1])


def test_slice_stacks_centre_on_each_index_and_repeat_edges():
    volume = np.arange(5)[:, None, None] * np.ones((1, 2, 2))
    stacks = slice_stacks(volume, [0, 2, 4], 3)
    assert stacks.shape == (3, 3, 2, 2)
    assert stacks[:, :, 0, 0].tolist() == [[0, 0, 1], [1, 2, 3], [3, 4, 4]]


def test_crop_is_centred_on_the_point():
    settings = PipelineSettings()
    ref = crop_reference((10.0, -40.0, 300.0), settings)
    assert ref.GetSize() == (128, 128, 128)
    centre = ref.TransformContinuousIndexToPhysicalPoint([63.5, 63.5, 63.5])
    assert centre == pytest.approx((10.0, -40.0, 300.0))


def coarse_grid():
    image = sitk.Image([40, 40, 30], sitk.sitkFloat32)
    image.SetSpacing((4.0, 4.0, 4.0))
    image.SetOrigin((-80.0, -100.0, 200.0))
    return image


def test_localise_finds_the_blob_centre_and_extent():
    image = coarse_grid()
    p = np.zeros((30, 40, 40), np.float32)
    p[10:14, 20:24, 16:20] = 0.9        # 64 voxels of 64 mm3 = 4.1 cc
    p[2, 2, 2] = 0.9                    # a stray voxel elsewhere is ignored
    found = localise(p, image, PipelineSettings())
    assert found.found
    assert found.center_lps == pytest.approx((-80 + 4 * 17.5, -100 + 4 * 21.5, 200 + 4 * 11.5))
    assert found.z_range_lps == pytest.approx((200 + 4 * 9.5, 200 + 4 * 13.5))
    assert found.volume_cc == pytest.approx(64 * 64 / 1000)
    assert found.mean_probability == pytest.approx(0.9)


def test_localise_prefers_the_midline_blob_over_a_bigger_lateral_one():
    image = coarse_grid()   # 0 HU everywhere: the body's middle is the grid's middle, x = -2 mm
    p = np.zeros((30, 40, 40), np.float32)
    p[10:14, 20:24, 18:22] = 0.95       # near the midline, 4.1 cc
    p[10:15, 20:25, 1:6] = 0.99         # bigger, but 70 mm to the side (a hip look-alike)
    found = localise(p, image, PipelineSettings())
    assert found.found and found.center_lps[0] == pytest.approx(-80 + 4 * 19.5)
    only_lateral = np.zeros_like(p)
    only_lateral[10:15, 20:25, 1:6] = 0.99
    lost = localise(only_lateral, image, PipelineSettings())
    assert not lost.found and lost.volume_cc == pytest.approx(125 * 64 / 1000)


def test_localise_calls_a_speck_not_found():
    p = np.zeros((30, 40, 40), np.float32)
    p[10:12, 20:22, 5:7] = 0.99         # 0.5 cc: too small to be a prostate
    found = localise(p, coarse_grid(), PipelineSettings())
    assert not found.found and found.center_lps is None


@pytest.mark.parametrize("direction", ["identity", "flipped", "oblique"])
def test_paste_back_lands_on_the_same_physical_voxels(direction):
    settings = PipelineSettings(crop_mm=(64.0, 64.0, 64.0))
    center = np.array([5.0, -30.0, 120.0])
    crop = crop_reference(center, settings)
    z, y, x = np.indices(crop.GetSize()[::-1])
    pts = np.stack([x, y, z], -1) * 1.0 + np.asarray(crop.GetOrigin())
    # A sphere off the crop's centre, so that a mirrored or transposed paste would miss it.
    sphere_centre = center + np.array([9.0, -6.0, 4.0])
    sphere = (np.linalg.norm(pts - sphere_centre, axis=-1) < 12).astype(np.float32)
    prob = sitk.GetImageFromArray(sphere)
    prob.CopyInformation(crop)

    target = sitk.Image([90, 80, 50], sitk.sitkInt16)
    target.SetSpacing((0.9, 1.1, 2.5))
    if direction == "flipped":
        target.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    elif direction == "oblique":
        c, s = np.cos(0.3), np.sin(0.3)
        target.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    middle = np.asarray(target.TransformContinuousIndexToPhysicalPoint([44.5, 39.5, 24.5]))
    target.SetOrigin(tuple(np.asarray(target.GetOrigin()) + center - middle))
    mask = paste_back(prob, target, 0.5)
    assert mask.shape == (50, 80, 90)
    kk, jj, ii = np.nonzero(mask)
    physical = np.array([target.TransformIndexToPhysicalPoint([int(i), int(j), int(k)])
                         for i, j, k in zip(ii[::7], jj[::7], kk[::7])])
    assert np.linalg.norm(physical - sphere_centre, axis=1).max() < 13.5
    expected_voxels = 4 / 3 * np.pi * 12 ** 3 / np.prod(target.GetSpacing())
    assert mask.sum() == pytest.approx(expected_voxels, rel=0.08)


def test_paste_back_outside_the_target_is_empty():
    crop = crop_reference((1000.0, 1000.0, 1000.0), PipelineSettings(crop_mm=(16.0, 16.0, 16.0)))
    prob = sitk.GetImageFromArray(np.ones((16, 16, 16), np.float32))
    prob.CopyInformation(crop)
    target = sitk.Image([20, 20, 20], sitk.sitkInt16)
    assert not paste_back(prob, target, 0.5).any()


def test_soft_agreement_is_one_when_decided_and_lower_when_lukewarm():
    decided = np.zeros((4, 4), np.float32)
    decided[1:3, 1:3] = 1
    assert soft_agreement(decided, 0.5) == pytest.approx(1.0)
    lukewarm = decided * 0.55 + (1 - decided) * 0.3
    assert soft_agreement(lukewarm, 0.5) < 0.5
    assert soft_agreement(np.zeros((4, 4)), 0.5) == 0.0


def test_clean_mask_keeps_the_largest_piece_and_fills_holes():
    mask = np.zeros((9, 9, 9), bool)
    mask[1:6, 1:6, 1:6] = True
    mask[3, 3, 3] = False               # a cavity
    mask[8, 8, 8] = True                # a stray voxel
    cleaned = clean_mask(mask)
    assert cleaned[3, 3, 3] and not cleaned[8, 8, 8]
    assert cleaned.sum() == 125
    assert largest_component(np.zeros((3, 3), bool)).sum() == 0
    ring = np.zeros((1, 5, 5), bool)
    ring[0, 1:4, 1:4] = True
    ring[0, 2, 2] = False               # a hole open in 3-D, closed in its slice
    assert fill_holes(ring)[0, 2, 2]
    assert bounding_box(mask, margin=1) == (slice(0, 9),) * 3
    assert bounding_box(cleaned, margin=1) == (slice(0, 7),) * 3
    assert bounding_box(np.zeros((2, 2), bool)) is None


def test_importing_the_pipeline_and_cli_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, segcore, segcore.prostate, segcore.cli, segcore.result; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
