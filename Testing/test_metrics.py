"""Tests of segcore.metrics: hand-computed cases and cross-checks against SimpleITK."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from segcore import metrics
from segcore.errors import GeometryError, OutputExistsError, SegcoreError, UnsupportedImageError

ANISO = (0.5, 0.8, 2.5)  # (x, y, z) mm, deliberately all different


def image(arr, spacing=ANISO, origin=None, direction=None):
    img = sitk.GetImageFromArray(np.asarray(arr).astype(np.uint8))
    img.SetSpacing(spacing)
    if origin is not None:
        img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def box_mask(shape_zyx, lo_xyz, hi_xyz):
    """Boolean [z, y, x] mask of the half-open box lo <= (x, y, z) < hi."""
    mask = np.zeros(shape_zyx, bool)
    mask[lo_xyz[2]:hi_xyz[2], lo_xyz[1]:hi_xyz[1], lo_xyz[0]:hi_xyz[0]] = True
    return mask


def sitk_hausdorff(a, b, spacing=ANISO):
    f = sitk.HausdorffDistanceImageFilter()
    f.Execute(image(a, spacing), image(b, spacing))
    return f.GetHausdorffDistance()


# --------------------------------------------------------------------------- hand-computed


@pytest.mark.parametrize("axis", [0, 1, 2])  # x, y, z
@pytest.mark.parametrize("k", [1, 3])
def test_cubes_offset_along_each_axis(axis, k):
    n = 6
    lo = [3, 3, 3]
    hi = [3 + n] * 3
    a = box_mask((16, 16, 16), lo, hi)
    lo[axis] += k
    hi[axis] += k
    b = box_mask((16, 16, 16), lo, hi)

    r = metrics.mask_metrics(a, b, ANISO)
    assert r.dsc == pytest.approx((n - k) / n, abs=1e-12)
    assert r.sen == pytest.approx((n - k) / n) and r.ppv == pytest.approx((n - k) / n)
    # The face that leads (or trails) is k voxels from the other cube's surface, along that axis.
    assert r.hd == pytest.approx(k * ANISO[axis])
    assert r.flags == ()
    # Here every farthest point lies outside the other object, so ITK's voxel-set
    # Hausdorff distance must equal the surface one.
    assert sitk_hausdorff(a, b) == pytest.approx(r.hd, rel=1e-5)


def test_row_of_voxels_fully_hand_computed():
    # A 1-voxel-thick row: every voxel is a surface voxel. pred = x 0..3, ref = x 0..5.
    s = 2.0
    pred = np.zeros((1, 1, 10), bool)
    ref = pred.copy()
    pred[0, 0, 0:4] = True
    ref[0, 0, 0:6] = True
    r = metrics.mask_metrics(pred, ref, (s, 0.7, 3.0))
    # pred->ref: four zeros. ref->pred: 0,0,0,0,1s,2s. Pooled: 8 zeros, s, 2s.
    assert r.dsc == pytest.approx(0.8)
    assert r.asd == pytest.approx(3 * s / 10)
    assert r.hd == pytest.approx(2 * s)
    # Pooled 95th percentile (linear): rank 0.95 * 9 = 8.55 -> s + 0.55 s.
    # (The max-of-directed variant would give 1.75 s: this pins the documented choice.)
    assert r.hd95 == pytest.approx(1.55 * s)
    assert r.sen == pytest.approx(4 / 6)
    assert r.ppv == 1.0
    assert (r.n_pred, r.n_ref, r.n_tp) == (4, 6, 4)


def test_directed_distances_of_the_row():
    pred = np.zeros((1, 1, 10), bool)
    ref = pred.copy()
    pred[0, 0, 0:4] = True
    ref[0, 0, 0:6] = True
    d_pr, d_rp = metrics.surface_distances(pred, ref, (2.0, 1.0, 1.0))
    assert sorted(d_pr) == [0, 0, 0, 0]
    assert sorted(d_rp) == [0, 0, 0, 0, 2.0, 4.0]
    with pytest.raises(ValueError):
        metrics.surface_distances(pred, np.zeros_like(ref), (1, 1, 1))


def test_parallel_slabs_all_distances_equal():
    k = 3
    a = np.zeros((8, 5, 6), bool)
    b = a.copy()
    a[1] = True
    b[1 + k] = True
    r = metrics.mask_metrics(a, b, ANISO)
    expected = k * ANISO[2]  # numpy axis 0 is z
    assert r.asd == pytest.approx(expected)
    assert r.hd == pytest.approx(expected)
    assert r.hd95 == pytest.approx(expected)
    assert r.dsc == 0.0 and r.sen == 0.0 and r.ppv == 0.0
    assert r.flags == (metrics.FLAG_NO_OVERLAP,)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cube_with_one_voxel_added(axis):
    n = 5
    a = box_mask((12, 12, 12), (3, 3, 3), (3 + n,) * 3)
    b = a.copy()
    bump = [5, 5, 5]
    bump[axis] = 3 + n  # just outside the +axis face, at its centre
    b[bump[2], bump[1], bump[0]] = True
    r = metrics.mask_metrics(a, b, ANISO)
    assert r.hd == pytest.approx(ANISO[axis])
    assert r.dsc == pytest.approx(2 * n**3 / (2 * n**3 + 1))
    assert r.sen == pytest.approx(n**3 / (n**3 + 1)) and r.ppv == 1.0
    assert sitk_hausdorff(a, b) == pytest.approx(r.hd, rel=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_sphere_vs_shifted_sphere(axis):
    k = 2
    spacing = (0.9, 1.1, 2.0)
    shape = (24, 40, 40)
    z, y, x = np.indices(shape)
    # A ball in millimetres (an ellipsoid in voxels).
    ball = ((x - 20) * spacing[0]) ** 2 + ((y - 20) * spacing[1]) ** 2 + ((z - 12) * spacing[2]) ** 2 <= 12**2
    shifted = np.roll(ball, k, axis=2 - axis)
    r = metrics.mask_metrics(ball, shifted, spacing)
    # A translated shape: the extreme pole is exactly k voxels from anything of the other.
    assert r.hd == pytest.approx(k * spacing[axis])
    assert 0 < r.asd < r.hd95 <= r.hd
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(image(ball, spacing), image(shifted, spacing))
    assert r.dsc == pytest.approx(overlap.GetDiceCoefficient(1), rel=1e-9)
    assert sitk_hausdorff(ball, shifted, spacing) == pytest.approx(r.hd, rel=1e-5)


def test_nested_cubes_sen_ppv_and_corner_distance():
    outer = box_mask((12, 12, 12), (1, 1, 1), (11, 11, 11))  # 10^3
    inner = box_mask((12, 12, 12), (3, 3, 3), (9, 9, 9))  # 6^3, 2 voxels in from each outer face
    r = metrics.mask_metrics(inner, outer, ANISO)
    assert r.sen == pytest.approx(216 / 1000)
    assert r.ppv == 1.0
    assert r.dsc == pytest.approx(2 * 216 / 1216)
    # Farthest: an outer corner to the nearest inner corner, two voxels along every axis.
    assert r.hd == pytest.approx(math.hypot(*(2 * s for s in ANISO)))
    swapped = metrics.mask_metrics(outer, inner, ANISO)
    assert swapped.sen == 1.0 and swapped.ppv == pytest.approx(216 / 1000)


def test_volume_in_cc_of_a_known_box():
    spacing = (0.7, 0.7, 3.0)
    ref = box_mask((40, 30, 20), (2, 3, 4), (12, 23, 34))  # 10 x 20 x 30 voxels
    pred = np.zeros_like(ref)
    pred[0:2, 0:3, 0:5] = True  # 30 voxels
    r = metrics.evaluate(image(pred, spacing), image(ref, spacing))[0]
    assert r.vol_ref_cc == pytest.approx(6000 * 0.7 * 0.7 * 3.0 / 1000)  # 8.82 cc
    assert r.vol_pred_cc == pytest.approx(30 * 1.47 / 1000)
    assert (r.n_pred, r.n_ref) == (30, 6000)


def test_image_border_counts_as_outside():
    # pred fills the whole image; ref misses the last x layer. Without the border
    # rule pred would have no surface at all.
    pred = np.ones((4, 5, 6), bool)
    ref = pred.copy()
    ref[:, :, -1] = False
    r = metrics.mask_metrics(pred, ref, ANISO)
    assert r.hd == pytest.approx(ANISO[0])


def test_identical_masks():
    m = box_mask((10, 10, 10), (2, 2, 2), (7, 8, 6))
    r = metrics.mask_metrics(m, m, ANISO)
    assert (r.dsc, r.asd, r.hd, r.hd95, r.sen, r.ppv) == (1.0, 0.0, 0.0, 0.0, 1.0, 1.0)


# --------------------------------------------------------------------------- empty masks


def test_empty_cases_have_documented_values_and_flags():
    empty = np.zeros((6, 6, 6), bool)
    full = box_mask((6, 6, 6), (1, 1, 1), (4, 4, 4))

    both = metrics.mask_metrics(empty, empty, ANISO)
    assert (both.dsc, both.asd, both.hd, both.hd95, both.sen, both.ppv) == (1.0, 0.0, 0.0, 0.0, 1.0, 1.0)
    assert both.flags == (metrics.FLAG_BOTH_EMPTY,)
    assert both.vol_pred_cc == both.vol_ref_cc == 0.0

    pred_empty = metrics.mask_metrics(empty, full, ANISO)
    assert pred_empty.dsc == 0.0 and pred_empty.sen == 0.0
    assert pred_empty.asd is None and pred_empty.hd is None and pred_empty.hd95 is None
    assert pred_empty.ppv is None
    assert pred_empty.flags == (metrics.FLAG_PRED_EMPTY,)
    assert pred_empty.vol_ref_cc == pytest.approx(27 * 1.0 / 1000)

    ref_empty = metrics.mask_metrics(full, empty, ANISO)
    assert ref_empty.dsc == 0.0 and ref_empty.ppv == 0.0
    assert ref_empty.asd is None and ref_empty.hd is None and ref_empty.hd95 is None
    assert ref_empty.sen is None
    assert ref_empty.flags == (metrics.FLAG_REF_EMPTY,)

    # None of them may produce NaN/inf; JSON with allow_nan=False proves it.
    text = metrics.results_to_json([both, pred_empty, ref_empty])
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["labels"][1]["hd"] is None


def test_requested_label_absent_from_both_images():
    pred = np.zeros((5, 5, 5), np.uint8)
    pred[1:3, 1:3, 1:3] = 1
    results = metrics.evaluate(image(pred), image(pred), labels=[1, 3])
    assert [r.label for r in results] == [1, 3]
    assert results[1].flags == (metrics.FLAG_BOTH_EMPTY,) and results[1].name == "rectum"


# --------------------------------------------------------------------------- against SimpleITK


def blobs(shape, seed, n_labels=1, sigma=2.0):
    """Smooth random label blobs; some touch the image border."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.uint8)
    for value in range(1, n_labels + 1):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
        out[field > np.quantile(field, 0.8)] = value
    return out


def sitk_surface_distances(pred, ref, spacing):
    """Directed surface distances by another route: ITK erosion + Maurer distance maps."""

    def surface(mask):
        img = image(mask, spacing)
        erode = sitk.BinaryErodeImageFilter()
        erode.SetKernelType(sitk.sitkCross)
        erode.SetKernelRadius(1)
        erode.SetForegroundValue(1)
        erode.SetBoundaryToForeground(False)  # the image border is outside
        return sitk.GetArrayFromImage(img - erode.Execute(img)).astype(bool)

    def directed(src, dst):
        dmap = sitk.SignedMaurerDistanceMap(
            image(dst, spacing), insideIsPositive=False, squaredDistance=False, useImageSpacing=True
        )
        d = np.abs(sitk.GetArrayFromImage(dmap).astype(np.float64))
        d[dst] = 0.0  # on the other surface itself
        return d[src]

    sp, sr = surface(pred), surface(ref)
    return directed(sp, sr), directed(sr, sp)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_metrics_match_an_itk_computation(seed):
    spacing = (0.6, 0.9, 2.2)
    pred = blobs((14, 30, 26), seed) == 1
    ref = blobs((14, 30, 26), seed + 100) == 1
    d_pr, d_rp = sitk_surface_distances(pred, ref, spacing)
    pooled = np.concatenate([d_pr, d_rp])
    r = metrics.mask_metrics(pred, ref, spacing)
    # ITK's distance maps are float32, hence the tolerance.
    assert r.hd == pytest.approx(pooled.max(), rel=1e-5)
    assert r.asd == pytest.approx(pooled.mean(), rel=1e-5)
    assert r.hd95 == pytest.approx(np.percentile(pooled, 95), rel=1e-5)
    mine_pr, mine_rp = metrics.surface_distances(pred, ref, spacing)
    np.testing.assert_allclose(np.sort(mine_pr), np.sort(d_pr), rtol=1e-5)
    np.testing.assert_allclose(np.sort(mine_rp), np.sort(d_rp), rtol=1e-5)


def test_overlap_matches_itk_label_overlap_measures():
    spacing = (0.6, 0.9, 2.2)
    pred = blobs((14, 30, 26), 7, n_labels=3)
    ref = blobs((14, 30, 26), 8, n_labels=3)
    pred_img, ref_img = image(pred, spacing), image(ref, spacing)
    results = metrics.evaluate(pred_img, ref_img)
    assert [r.label for r in results] == [1, 2, 3]
    itk = sitk.LabelOverlapMeasuresImageFilter()
    itk.Execute(pred_img, ref_img)  # source = prediction, target = reference
    for r in results:
        assert r.dsc == pytest.approx(itk.GetDiceCoefficient(r.label), rel=1e-9)
        assert r.sen == pytest.approx(1 - itk.GetFalseNegativeError(r.label), rel=1e-9)
        assert r.ppv == pytest.approx(1 - itk.GetFalseDiscoveryRate(r.label), rel=1e-9)
        jaccard = itk.GetJaccardCoefficient(r.label)
        assert r.dsc == pytest.approx(2 * jaccard / (1 + jaccard), rel=1e-9)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.integers(-3, 3))
def test_swapping_prediction_and_reference_is_symmetric(seed, shift):
    ref = blobs((8, 14, 12), seed, sigma=1.5) == 1
    pred = np.roll(ref, shift, axis=1)
    a = metrics.mask_metrics(pred, ref, ANISO)
    b = metrics.mask_metrics(ref, pred, ANISO)
    assert (a.dsc, a.asd, a.hd, a.hd95) == pytest.approx((b.dsc, b.asd, b.hd, b.hd95))
    assert a.sen == b.ppv and a.ppv == b.sen


def test_cropping_does_not_change_the_result():
    small = blobs((10, 12, 14), 3, n_labels=2)
    other = blobs((10, 12, 14), 4, n_labels=2)
    pad = ((5, 2), (0, 9), (7, 0))
    a = metrics.evaluate_arrays(small, other, ANISO)
    b = metrics.evaluate_arrays(np.pad(small, pad), np.pad(other, pad), ANISO)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]


# --------------------------------------------------------------------------- evaluate and grids


def test_evaluate_default_labels_names_and_order():
    pred = np.zeros((6, 6, 6), np.uint8)
    ref = pred.copy()
    pred[1:3, 1:3, 1:3] = 2
    ref[3:5, 3:5, 3:5] = 42  # unknown to the catalogue
    results = metrics.evaluate(image(pred), image(ref))
    assert [(r.label, r.name) for r in results] == [(2, "bladder"), (42, "label_42")]
    assert results[0].flags == (metrics.FLAG_REF_EMPTY,)
    assert results[1].flags == (metrics.FLAG_PRED_EMPTY,)
    chosen = metrics.evaluate(image(pred), image(ref), labels=[42, 2, 42])
    assert [r.label for r in chosen] == [42, 2]


def test_evaluate_uses_image_spacing_in_xyz_order():
    a = box_mask((10, 10, 10), (2, 2, 2), (6, 6, 6))
    b = box_mask((10, 10, 10), (2, 2, 3), (6, 6, 7))  # shifted by one voxel along z
    r = metrics.evaluate(image(a, (0.5, 0.8, 2.5)), image(b, (0.5, 0.8, 2.5)))[0]
    assert r.hd == pytest.approx(2.5)


def test_float_label_images_accepted_when_integral():
    a = box_mask((6, 6, 6), (1, 1, 1), (4, 4, 4)).astype(np.float32)
    img = sitk.GetImageFromArray(a)
    assert metrics.evaluate(img, img)[0].dsc == 1.0
    fuzzy = sitk.GetImageFromArray(a * 0.5)
    with pytest.raises(UnsupportedImageError):
        metrics.evaluate(fuzzy, fuzzy)


def test_vector_image_rejected():
    vec = sitk.Image([4, 4, 4], sitk.sitkVectorUInt8, 2)
    with pytest.raises(UnsupportedImageError):
        metrics.evaluate(vec, vec)


@pytest.mark.parametrize(
    "change",
    [
        lambda img: img.SetSpacing((0.5, 0.8, 3.0)),
        lambda img: img.SetOrigin((0.0, 0.0, 1.0)),
        lambda img: img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1)),
    ],
    ids=["spacing", "origin", "direction"],
)
def test_mismatched_grids_raise_geometry_error(change):
    arr = box_mask((6, 6, 6), (1, 1, 1), (4, 4, 4))
    pred, ref = image(arr), image(arr)
    change(pred)
    with pytest.raises(GeometryError, match="not on the same voxel grid") as info:
        metrics.evaluate(pred, ref)
    assert "esample the prediction onto the reference grid" in str(info.value)
    assert isinstance(info.value, SegcoreError)


def test_mismatched_size_raises_geometry_error():
    with pytest.raises(GeometryError, match="size"):
        metrics.evaluate(image(np.zeros((6, 6, 6))), image(np.zeros((6, 6, 7))))
    with pytest.raises(GeometryError):
        metrics.mask_metrics(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)), ANISO)
    with pytest.raises(GeometryError):
        metrics.mask_metrics(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1.0, 1.0))
    with pytest.raises(GeometryError):
        metrics.mask_metrics(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1.0, 0.0, 1.0))


def test_float32_rounding_of_the_grid_is_tolerated():
    arr = box_mask((6, 6, 6), (1, 1, 1), (4, 4, 4))
    pred = image(arr, origin=(-250.1, 10.3, 7.7))
    ref = image(arr, spacing=tuple(float(np.float32(s)) for s in ANISO),
                origin=tuple(float(np.float32(o)) for o in (-250.1, 10.3, 7.7)))
    assert metrics.evaluate(pred, ref)[0].dsc == 1.0


# --------------------------------------------------------------------------- centroids


def test_centroids_in_physical_space():
    arr = np.zeros((10, 12, 14), np.uint8)
    arr[2:4, 3:7, 1:6] = 1  # x 1..5 -> 3, y 3..6 -> 4.5, z 2..3 -> 2.5 (index)
    arr[8, 10, 12] = 9
    origin = (10.0, -20.0, 5.0)
    direction = (0, -1, 0, 1, 0, 0, 0, 0, 1)  # x axis -> +y, y axis -> -x
    img = image(arr, ANISO, origin, direction)
    got = metrics.centroids(img)
    assert sorted(got) == [1, 9]
    expected = img.TransformContinuousIndexToPhysicalPoint((3.0, 4.5, 2.5))
    assert got[1] == pytest.approx(expected)
    assert got[9] == pytest.approx(img.TransformIndexToPhysicalPoint((12, 10, 8)))
    # By hand: origin + D @ (index * spacing).
    assert got[1] == pytest.approx((10.0 - 4.5 * 0.8, -20.0 + 3.0 * 0.5, 5.0 + 2.5 * 2.5))


# --------------------------------------------------------------------------- output


def sample_results():
    pred = np.zeros((8, 8, 8), np.uint8)
    ref = pred.copy()
    pred[1:5, 1:5, 1:5] = 1
    ref[2:6, 1:5, 1:5] = 1
    pred[6:8, 6:8, 6:8] = 2
    ref[0:2, 6:8, 6:8] = 17
    return metrics.evaluate(image(pred), image(ref), labels=[1, 2, 17, 6])


def test_json_round_trip(tmp_path):
    results = sample_results()
    path = tmp_path / "m.json"
    metrics.write_json(results, path, meta={"prediction": "p.nii.gz"})
    doc = json.loads(path.read_text())
    assert doc["schema"] == metrics.JSON_SCHEMA and doc["meta"] == {"prediction": "p.nii.gz"}
    assert metrics.read_json(path) == results
    with pytest.raises(OutputExistsError):
        metrics.write_json(results, path, overwrite=False)


def test_csv_round_trip(tmp_path):
    results = sample_results()
    path = tmp_path / "m.csv"
    metrics.write_csv(results, path)
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(metrics.FIELD_NAMES)
    assert len(lines) == 1 + len(results)
    assert metrics.read_csv(path) == results  # exact, including None and flags
    with pytest.raises(OutputExistsError):
        metrics.write_csv(results, path, overwrite=False)


def test_table_is_fixed_width_and_readable():
    results = sample_results()
    text = metrics.format_table(results)
    lines = text.splitlines()
    assert len(lines) == 2 + len(results)
    header = lines[0]
    for title in ("name", "DSC", "ASD mm", "HD mm", "HD95 mm", "SEN", "PPV", "pred cc", "ref cc"):
        assert title in header
    # Right-aligned numbers: each value ends where its header ends.
    dsc_end = header.index("DSC") + len("DSC")
    hd95_end = header.index("HD95 mm") + len("HD95 mm")
    r1 = lines[2]
    assert r1.split()[1] == "prostate"
    assert r1[:dsc_end].endswith(f"{results[0].dsc:.4f}")
    assert r1[:hd95_end].endswith(f"{results[0].hd95:.2f}")
    ref_empty_row = lines[3]
    assert "bladder" in ref_empty_row and "n/a" in ref_empty_row and "ref_empty" in ref_empty_row
    assert "both_empty" in lines[5]
