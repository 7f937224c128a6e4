"""The multi-organ pipeline's parts: polygon rasterising, contour targets with a fixed start and direction,
slice-to-slice consistency, and contours landing on the right physical voxels of any input grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from segcore import image as imageio
from segcore.anatomy import structure
from segcore.errors import SegcoreError
from segcore.organs import (
    OrganSettings,
    OrganTrack,
    choose_organs,
    fine_grid,
    make_consistent,
    pixels_to_lps,
    rasterise,
    slice_grid,
)
from segcore.postprocess import polygon_mask


def test_polygon_mask_by_hand():
    rectangle = polygon_mask(np.array([[1, 1], [4, 1], [4, 3], [1, 3]]), (5, 6))
    expected = np.zeros((5, 6), bool)
    expected[1:3, 1:4] = True
    assert np.array_equal(rectangle, expected)
    triangle = polygon_mask(np.array([[0, 0], [6, 0], [0, 5]]), (5, 6))
    # Pixel centre (j + 0.5, i + 0.5) is inside when x / 6 + y / 5 < 1.
    j, i = np.meshgrid(np.arange(6) + 0.5, np.arange(5) + 0.5)
    assert np.array_equal(triangle, j / 6 + i / 5 < 1)
    # Clipped at the edges, empty for degenerate input.
    assert polygon_mask(np.array([[-5, -5], [20, -5], [20, 20], [-5, 20]]), (3, 4)).all()
    assert not polygon_mask(np.array([[1, 1], [2, 2]]), (4, 4)).any()
    assert not polygon_mask(np.array([[1, 1], [np.nan, 2], [3, 1]]), (4, 4)).any()


def test_contour_points_start_anterior_and_turn_counter_clockwise():
    from training.train_hmrnet import contour_points

    mask = np.zeros((40, 40), bool)
    yy, xx = np.mgrid[:40, :40]
    mask[(yy - 20) ** 2 / 100 + (xx - 18) ** 2 / 36 < 1] = True   # an ellipse, taller than wide
    points = contour_points(mask, 40)
    assert points.shape == (40, 2)
    centre = points.mean(axis=0)
    # Starts straight anterior (smallest y) of the centre.
    assert points[0, 1] == pytest.approx(points[:, 1].min(), abs=0.6)
    assert points[0, 0] == pytest.approx(18.5, abs=0.6)
    # Counter-clockwise as seen in the image (x right, y down): negative shoelace area in these axes.
    x, y = points[:, 0], points[:, 1]
    assert 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) < 0
    # The second point is to the left of the first (anterior, going counter-clockwise on screen).
    assert points[1, 0] < points[0, 0]
    # Evenly spaced, and filling the polygon gives the mask back.
    steps = np.linalg.norm(np.diff(np.vstack([points, points[:1]]), axis=0), axis=1)
    assert steps.std() / steps.mean() < 0.15
    filled = polygon_mask(points, mask.shape)
    assert (filled & mask).sum() / (filled | mask).sum() > 0.95
    assert np.allclose(centre, [18.5, 20.5], atol=0.5)


def test_slice_targets_one_instance_per_organ_and_pieces_for_vesicles():
    from training.train_hmrnet import slice_targets

    labels = np.zeros((64, 64), np.uint8)
    labels[10:20, 10:30] = structure("bladder").value
    labels[40:44, 40:44] = structure("bladder").value        # a second bladder piece: only the largest counts
    labels[30:36, 5:12] = structure("seminal_vesicles").value
    labels[30:36, 20:27] = structure("seminal_vesicles").value
    labels[50:52, 50:51] = structure("rectum").value         # 2 pixels: too small to be an instance
    t = slice_targets(labels, 20)
    assert t["labels"].tolist() == [2, 6, 6]
    assert t["boxes"][0].tolist() == [10, 10, 30, 20]
    assert t["points"].shape == (3, 20, 2)
    # Points lie on the instance's boundary, inside its box.
    assert np.all(t["points"][0] >= [10 - 1e-6, 10 - 1e-6]) and np.all(t["points"][0] <= [30 + 1e-6, 20 + 1e-6])


def track_of(slices: dict) -> OrganTrack:
    return OrganTrack("bladder", {k: [(score, np.asarray(points, float)) for score, points in v] for k, v in slices.items()})


SQUARE = [[10, 10], [20, 10], [20, 20], [10, 20]]


def test_make_consistent_bridges_gaps_and_drops_isolated_slices():
    moved = [[p[0] + 4, p[1]] for p in SQUARE]
    track = track_of({2: [(0.9, SQUARE)], 4: [(0.7, moved)], 5: [(0.8, moved)], 9: [(0.99, SQUARE)],
                      20: [(0.6, SQUARE)], 21: [(0.6, SQUARE)]})
    kept = make_consistent(track, min_slices=2)
    assert sorted(kept.slices) == [2, 3, 4, 5]              # gap 3 bridged; 9 isolated; 20-21 weaker
    score, bridged = kept.slices[3][0]
    assert score == pytest.approx(0.8)
    assert np.allclose(bridged, [[p[0] + 2, p[1]] for p in SQUARE])   # the mean of the neighbours' contours
    assert not make_consistent(track_of({7: [(0.9, SQUARE)]}), 2).slices


def test_choose_organs():
    offered = [structure(n) for n in ("prostate", "bladder", "rectum")]
    assert [s.name for s in choose_organs(offered, None)] == ["prostate", "bladder", "rectum"]
    assert [s.name for s in choose_organs(offered, "rectum, bladder")] == ["bladder", "rectum"]
    with pytest.raises(SegcoreError, match="offers no 'liver'.*prostate, bladder, rectum"):
        choose_organs(offered, ["liver"])
    with pytest.raises(SegcoreError, match="no organs asked for"):
        choose_organs(offered, ",")


def ct_like(direction, size=(80, 70, 30), spacing=(1.1, 0.9, 2.0), origin=(-40.0, -30.0, 10.0)) -> sitk.Image:
    ct = sitk.Image(size, sitk.sitkInt16) - 1000
    ct.SetSpacing(spacing)
    ct.SetOrigin(origin)
    ct.SetDirection(direction)
    # A body: a box of water in the middle, so the canonical grid is centred on it.
    arr = sitk.GetArrayFromImage(ct)
    arr[:, 10:-10, 10:-10] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(ct)
    return out


def test_slice_grid_is_canonical_and_centred_on_the_body():
    ct = ct_like((1, 0, 0, 0, 1, 0, 0, 0, 1))
    settings = OrganSettings(size=64, slice_mm=2.5)
    grid = slice_grid(ct, settings)
    assert grid.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert grid.GetSpacing() == (2.0, 2.0, 2.5)
    assert grid.GetSize()[:2] == (64, 64)
    low, high = imageio.physical_bounds(ct)
    centre = grid.TransformContinuousIndexToPhysicalPoint([31.5, 31.5, (grid.GetSize()[2] - 1) / 2])
    assert np.allclose(centre, (low + high) / 2, atol=1.0)
    assert grid.GetSize()[2] * 2.5 >= high[2] - low[2]


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),                    # RAS-like storage
    (0, 1, 0, 1, 0, 0, 0, 0, -1),                     # permuted and flipped
])
def test_contours_land_on_the_same_physical_voxels(direction):
    """A square contour drawn on the canonical grid fills the input voxels whose centres lie in that square
    in physical space, whatever the input's storage order, and the contours come back in LPS mm."""
    ct = ct_like(direction)
    reference = slice_grid(ct, OrganSettings(size=64))
    square_px = np.array([[20.0, 22.0], [40.0, 22.0], [40.0, 36.0], [20.0, 36.0]])
    slices = range(3, 9)
    track = OrganTrack("bladder", {k: [(0.9, square_px)] for k in slices})
    fraction = rasterise(track, reference, 2)
    where, values = imageio.resample_onto_part(fraction, ct)
    mask = np.zeros(ct.GetSize()[::-1], bool)
    mask[where] = values > 0.5
    corners = np.array([pixels_to_lps(square_px, k, reference) for k in (slices[0], slices[-1])])
    low = corners.reshape(-1, 3).min(axis=0) - [0, 0, 1.25]   # half a slice beyond the first and last
    high = corners.reshape(-1, 3).max(axis=0) + [0, 0, 1.25]
    kji = np.indices(mask.shape).reshape(3, -1)
    points = (imageio.ijk_to_lps_matrix(ct) @ np.vstack([kji[::-1], np.ones(kji.shape[1])]))[:3].T
    points = points.reshape(*mask.shape, 3)
    inside = np.all((points > low + 0.6) & (points < high - 0.6), axis=-1)
    outside = np.any((points < low - 0.6) | (points > high + 0.6), axis=-1)
    assert mask[inside].all()
    assert not mask[outside].any()
    assert inside.sum() > 100


def test_fine_grid_pixel_coordinates_scale_by_the_factor():
    reference = slice_grid(ct_like((1, 0, 0, 0, 1, 0, 0, 0, 1)), OrganSettings(size=32))
    fine = fine_grid(reference, 2)
    # Coarse pixel coordinate (x, y) = coarse index (x - 0.5, y - 0.5) = fine index (2x - 0.5, 2y - 0.5).
    for x, y in [(0.5, 0.5), (3.0, 7.25), (16.0, 16.0)]:
        coarse = reference.TransformContinuousIndexToPhysicalPoint([x - 0.5, y - 0.5, 2.0])
        finer = fine.TransformContinuousIndexToPhysicalPoint([2 * x - 0.5, 2 * y - 0.5, 2.0])
        assert np.allclose(coarse, finer)
