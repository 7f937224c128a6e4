"""Tests of segcore.metrics: hand-computed cases and cross-checks against SimpleITK."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage, spatial

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
    for x in a:  # APL slice indices are the image's, so padding along numpy axis 0 moves them
        x.apl_per_slice_mm = {k + pad[0][0]: v for k, v in x.apl_per_slice_mm.items()}
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
    assert {"sdsc_1mm", "sdsc_2mm", "sdsc_3mm", "apl_mm"} <= set(metrics.FIELD_NAMES)
    assert "apl_per_slice_mm" not in lines[0]  # CSV has the total only
    assert len(lines) == 1 + len(results)
    # exact, including None and flags; the per-slice APL is JSON only
    assert metrics.read_csv(path) == [dataclasses.replace(r, apl_per_slice_mm=None) for r in results]
    with pytest.raises(OutputExistsError):
        metrics.write_csv(results, path, overwrite=False)


def test_table_is_fixed_width_and_readable():
    results = sample_results()
    text = metrics.format_table(results)
    lines = text.splitlines()
    assert len(lines) == 2 + len(results)
    header = lines[0]
    for title in ("name", "DSC", "ASD mm", "HD mm", "HD95 mm", "sDSC 2mm", "APL mm", "SEN", "PPV",
                  "pred cc", "ref cc"):
        assert title in header
    sdsc_end = header.index("sDSC 2mm") + len("sDSC 2mm")
    apl_end = header.index("APL mm") + len("APL mm")
    assert lines[2][:sdsc_end].endswith(f"{results[0].sdsc_2mm:.4f}")
    assert lines[2][:apl_end].endswith(f"{results[0].apl_mm:.1f}")
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


def test_json_keeps_the_per_slice_apl_and_reads_old_files(tmp_path):
    results = sample_results()
    # Slice 5 of the reference has no prediction: its 4 x 4 square's 12 contour pixels count.
    assert results[0].apl_per_slice_mm == {5: pytest.approx(12 * PIXEL_MM)}
    path = tmp_path / "m.json"
    metrics.write_json(results, path)
    doc = json.loads(path.read_text())
    assert doc["labels"][0]["apl_per_slice_mm"] == {"5": results[0].apl_mm}  # JSON keys are strings
    back = metrics.read_json(path)
    assert back == results and list(back[0].apl_per_slice_mm) == [5]
    # A file written before sDSC/APL existed: the missing values read as None.
    for entry in doc["labels"]:
        for key in ("sdsc_1mm", "sdsc_2mm", "sdsc_3mm", "apl_mm", "apl_per_slice_mm"):
            del entry[key]
    path.write_text(json.dumps(doc))
    old = metrics.read_json(path)
    assert [r.dsc for r in old] == [r.dsc for r in results]
    assert all(r.sdsc_1mm is r.sdsc_2mm is r.sdsc_3mm is r.apl_mm is r.apl_per_slice_mm is None for r in old)
    assert "n/a" in metrics.format_table(old)
    old_csv = tmp_path / "old.csv"
    metrics.write_csv(old, old_csv)
    assert metrics.read_csv(old_csv) == old


# --------------------------------------------------------------------------- surface Dice


def test_surface_dice_of_the_row_at_each_tolerance():
    # The row above: pooled distances are 8 zeros, s and 2 s, with s = 2 mm.
    pred = np.zeros((1, 1, 10), bool)
    ref = pred.copy()
    pred[0, 0, 0:4] = True
    ref[0, 0, 0:6] = True
    r = metrics.mask_metrics(pred, ref, (2.0, 0.7, 3.0))
    assert r.sdsc_1mm == pytest.approx(8 / 10)
    assert r.sdsc_2mm == pytest.approx(9 / 10)  # a distance of exactly tau counts as within
    assert r.sdsc_3mm == pytest.approx(9 / 10)  # 4 mm is still out
    assert metrics.surface_dice(pred, ref, (2.0, 0.7, 3.0), 4.0) == 1.0


@pytest.mark.parametrize("axis, k, expected", [
    (2, 1, (0.0, 0.0, 1.0)),  # z: 2.5 mm apart
    (1, 1, (1.0, 1.0, 1.0)),  # y: 0.8 mm
    (1, 2, (0.0, 1.0, 1.0)),  # y: 1.6 mm
    (1, 3, (0.0, 0.0, 1.0)),  # y: 2.4 mm
    (0, 5, (0.0, 0.0, 1.0)),  # x: 2.5 mm
    (0, 6, (0.0, 0.0, 1.0)),  # x: 3.0 mm == tau, despite 6 * 0.5 rounding in the EDT
    (0, 7, (0.0, 0.0, 0.0)),  # x: 3.5 mm
])
def test_surface_dice_of_parallel_slabs_shifted_by_known_mm(axis, k, expected):
    # Every surface voxel of either slab is exactly k voxels from the other slab.
    shape = (10, 10, 10)
    lo, hi = [0, 0, 0], [10, 10, 10]
    lo[axis], hi[axis] = 1, 2
    a = box_mask(shape, lo, hi)
    lo[axis], hi[axis] = 1 + k, 2 + k
    b = box_mask(shape, lo, hi)
    r = metrics.mask_metrics(a, b, ANISO)
    assert r.hd == pytest.approx(k * ANISO[axis])
    assert (r.sdsc_1mm, r.sdsc_2mm, r.sdsc_3mm) == expected
    assert metrics.surface_dice(a, b, ANISO, 3.0) == expected[2]


@pytest.mark.parametrize("dx, within", [(0.6, True), (1.0000002, True), (1.000001, False)])
def test_surface_dice_tolerance_allowance(dx, within):
    # Slabs 5 (resp. 3) voxels apart along x: 3.0 mm, 3.0000006 mm (inside the documented
    # 1e-6 mm allowance for floating-point rounding) and 3.000003 mm (outside it).
    k = 5 if dx == 0.6 else 3
    a = box_mask((4, 4, 12), (1, 0, 0), (2, 4, 4))
    b = box_mask((4, 4, 12), (1 + k, 0, 0), (2 + k, 4, 4))
    assert metrics.surface_dice(a, b, (dx, 1.0, 1.0), 3.0) == (1.0 if within else 0.0)
    assert metrics.surface_dice(a, b, (dx, 1.0, 1.0), 2.99) == 0.0
    # APL uses the same rule: in each of the 4 slices, a 4-pixel contour k pixels off along x.
    apl = metrics.added_path_length(b, a, (dx, 1.0, 1.0), 3.0)[0]
    assert apl == (0.0 if within else pytest.approx(4 * 4 * (dx + 1.0) / 2))


def test_surface_dice_empty_cases():
    empty = np.zeros((6, 6, 6), bool)
    full = box_mask((6, 6, 6), (1, 1, 1), (4, 4, 4))
    both = metrics.mask_metrics(empty, empty, ANISO)
    assert (both.sdsc_1mm, both.sdsc_2mm, both.sdsc_3mm) == (1.0, 1.0, 1.0)
    for r in (metrics.mask_metrics(empty, full, ANISO), metrics.mask_metrics(full, empty, ANISO)):
        assert (r.sdsc_1mm, r.sdsc_2mm, r.sdsc_3mm) == (0.0, 0.0, 0.0)
    assert metrics.surface_dice(empty, empty, ANISO, 2.0) == 1.0
    assert metrics.surface_dice(full, empty, ANISO, 2.0) == 0.0
    assert metrics.surface_dice(empty, full, ANISO, 2.0) == 0.0
    with pytest.raises(ValueError):
        metrics.surface_dice(full, full, ANISO, -1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_dice_matches_a_kd_tree_count(seed):
    spacing = (0.6, 0.9, 2.2)
    pred = blobs((14, 30, 26), seed) == 1
    ref = blobs((14, 30, 26), seed + 100) == 1
    scale = np.array(spacing[::-1])
    pts_p = np.argwhere(metrics.surface_mask(pred)) * scale
    pts_r = np.argwhere(metrics.surface_mask(ref)) * scale
    d_pr = spatial.cKDTree(pts_r).query(pts_p)[0]
    d_rp = spatial.cKDTree(pts_p).query(pts_r)[0]
    r = metrics.mask_metrics(pred, ref, spacing)
    for tau, got in zip((1.0, 2.0, 3.0), (r.sdsc_1mm, r.sdsc_2mm, r.sdsc_3mm)):
        want = (np.sum(d_pr <= tau + 1e-6) + np.sum(d_rp <= tau + 1e-6)) / (d_pr.size + d_rp.size)
        assert got == pytest.approx(want, abs=1e-12)
    assert 0 < r.sdsc_1mm <= r.sdsc_2mm <= r.sdsc_3mm < 1


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.integers(-3, 3))
def test_surface_dice_is_symmetric(seed, shift):
    ref = blobs((8, 14, 12), seed, sigma=1.5) == 1
    pred = np.roll(ref, shift, axis=2)
    a = metrics.mask_metrics(pred, ref, ANISO)
    b = metrics.mask_metrics(ref, pred, ANISO)
    assert (a.sdsc_1mm, a.sdsc_2mm, a.sdsc_3mm) == pytest.approx((b.sdsc_1mm, b.sdsc_2mm, b.sdsc_3mm))


# --------------------------------------------------------------------------- added path length

PIXEL_MM = (ANISO[0] + ANISO[1]) / 2  # 0.65: the documented in-plane pixel length


def rectangles(shape=(12, 12, 14), z=(2, 10), y=(2, 8), x=(3, 11)):
    """[z, y, x] mask: a 6 x 8 pixel rectangle (24 contour pixels) on slices 2..9."""
    mask = np.zeros(shape, bool)
    mask[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return mask


def test_slice_contours_are_in_plane_four_neighbour_rings():
    ref = rectangles()
    contour = metrics.slice_contours(ref)
    assert contour[2].sum() == 2 * 8 + 2 * 4  # the top slice is a ring, not the whole face (3-D surface)
    assert list(np.count_nonzero(contour, axis=(1, 2))) == [0, 0] + [24] * 8 + [0, 0]
    full = np.ones((1, 4, 5), bool)  # the slice border is outside
    assert metrics.slice_contours(full).sum() == 2 * 5 + 2 * 2
    # 4-neighbour definition: a diagonal-only outside neighbour does not make a contour pixel.
    plus = np.zeros((1, 5, 5), bool)
    plus[0, 1:4, 1:4] = True
    plus[0, 2, 0] = plus[0, 2, 4] = plus[0, 0, 2] = plus[0, 4, 2] = True
    assert not metrics.slice_contours(plus)[0, 2, 2]


def test_apl_prediction_missing_slices():
    ref = rectangles()
    pred = ref.copy()
    pred[7:10] = False  # the last three slices of the reference are not predicted
    total, per_slice = metrics.added_path_length(pred, ref, ANISO)
    assert total == pytest.approx(3 * 24 * PIXEL_MM)  # 46.8 mm
    assert per_slice == {7: pytest.approx(24 * PIXEL_MM), 8: pytest.approx(15.6), 9: pytest.approx(15.6)}
    r = metrics.mask_metrics(pred, ref, ANISO)
    assert r.apl_mm == pytest.approx(total) and r.apl_per_slice_mm == per_slice
    # Extra predicted slices need deleting, not drawing: no APL.
    assert metrics.added_path_length(ref, pred, ANISO) == (0.0, {})


def test_apl_prediction_missing_rows_with_anisotropic_pixels():
    ref = rectangles()
    pred = rectangles(y=(2, 5))  # rows y 5, 6, 7 missing (y spacing 0.8 mm)
    # Reference contour beyond 1 mm of the prediction's contour (its last row is y 4):
    # row 7 (8 pixels, 2.4 mm) and the two side pixels of row 6 (1.6 mm); row 5's are 0.8 mm away.
    total, per_slice = metrics.added_path_length(pred, ref, ANISO)
    assert per_slice == {k: pytest.approx(10 * PIXEL_MM) for k in range(2, 10)}
    assert total == pytest.approx(8 * 10 * PIXEL_MM)
    # Tolerance 0: row 5's side pixels count too.
    assert metrics.added_path_length(pred, ref, ANISO, tolerance_mm=0)[0] == pytest.approx(8 * 12 * PIXEL_MM)
    # The same cut across x (0.5 mm pixels): columns 8 (0.5 mm) and 9 (1.0 mm == tolerance) are within,
    # only column 10 (6 pixels, 1.5 mm) counts. Swapped x/y spacings would give another number.
    pred_x = rectangles(x=(3, 8))
    assert metrics.added_path_length(pred_x, ref, ANISO)[0] == pytest.approx(8 * 6 * PIXEL_MM)
    assert metrics.added_path_length(pred_x, ref, ANISO, tolerance_mm=2.0)[0] == 0.0


def test_apl_shift_below_and_above_the_tolerance():
    ref = rectangles()
    assert metrics.added_path_length(np.roll(ref, 1, axis=1), ref, ANISO)[0] == 0.0  # 0.8 mm in y
    assert metrics.added_path_length(np.roll(ref, 2, axis=2), ref, ANISO)[0] == 0.0  # 1.0 mm in x
    assert metrics.added_path_length(ref, ref, ANISO, tolerance_mm=0.0) == (0.0, {})
    # A shift across slices is not an in-plane distance: the uncovered slice counts whole.
    _, per_slice = metrics.added_path_length(np.roll(ref, 1, axis=0), ref, ANISO)
    assert per_slice == {2: pytest.approx(24 * PIXEL_MM)}


def test_apl_empty_cases_and_dimensions():
    empty = np.zeros((12, 12, 14), bool)
    ref = rectangles()
    whole = 8 * 24 * PIXEL_MM  # every contour pixel of every reference slice
    assert metrics.added_path_length(empty, ref, ANISO)[0] == pytest.approx(whole)
    assert metrics.added_path_length(ref, empty, ANISO) == (0.0, {})
    assert metrics.added_path_length(empty, empty, ANISO) == (0.0, {})
    pred_empty = metrics.mask_metrics(empty, ref, ANISO)
    assert pred_empty.apl_mm == pytest.approx(whole) and len(pred_empty.apl_per_slice_mm) == 8
    for r in (metrics.mask_metrics(ref, empty, ANISO), metrics.mask_metrics(empty, empty, ANISO)):
        assert r.apl_mm == 0.0 and r.apl_per_slice_mm == {}
    # 2-D masks are one slice, index 0; other dimensions have no slices.
    _, per_slice = metrics.added_path_length(empty[0], ref[2], ANISO[:2])
    assert per_slice == {0: pytest.approx(24 * PIXEL_MM)}
    assert metrics.mask_metrics(np.ones(5, bool), np.ones(5, bool), (1.0,)).apl_mm is None
    with pytest.raises(GeometryError):
        metrics.added_path_length(np.ones(5, bool), np.ones(5, bool), (1.0,))
    with pytest.raises(ValueError):
        metrics.added_path_length(ref, ref, ANISO, tolerance_mm=float("nan"))


def test_apl_through_evaluate_uses_image_slice_indices_and_tolerance():
    ref = np.zeros((12, 12, 14), np.uint8)
    ref[rectangles()] = 1
    pred = ref.copy()
    pred[7:10] = 0
    pred[0, 0:2, 0:2] = 2  # label 2 only in pred: ref_empty
    r1, r2 = metrics.evaluate(image(pred), image(ref))
    assert sorted(r1.apl_per_slice_mm) == [7, 8, 9]
    assert r1.apl_mm == pytest.approx(3 * 24 * PIXEL_MM)
    assert r2.flags == (metrics.FLAG_REF_EMPTY,) and r2.apl_mm == 0.0
    # A large tolerance changes nothing where the prediction has no contour at all.
    wide = metrics.evaluate(image(pred), image(ref), apl_tolerance_mm=50.0)[0]
    assert wide.apl_mm == pytest.approx(r1.apl_mm)


def brute_force_apl(pred, ref, spacing, tol):
    """Slice by slice with explicit neighbour tests and a k-d tree, sharing no code with segcore."""
    sx, sy = spacing[0], spacing[1]
    total, per_slice = 0.0, {}

    def contour(m):
        p = np.pad(m, 1)
        inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        return m & ~inner

    for k in range(ref.shape[0]):
        cr, cp = np.argwhere(contour(ref[k])), np.argwhere(contour(pred[k]))
        if len(cr) == 0:
            continue
        if len(cp) == 0:
            n = len(cr)
        else:
            d = spatial.cKDTree(cp * (sy, sx)).query(cr * (sy, sx))[0]
            n = int(np.sum(d > tol + 1e-6))
        if n:
            per_slice[k] = n * (sx + sy) / 2
            total += per_slice[k]
    return total, per_slice


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("tol", [0.0, 1.0, 2.5])
def test_apl_matches_a_brute_force_count(seed, tol):
    spacing = (0.6, 0.9, 2.2)
    pred = blobs((14, 30, 26), seed) == 1
    ref = blobs((14, 30, 26), seed + 50) == 1
    pred[: seed + 1] = False  # some slices without prediction
    want_total, want = brute_force_apl(pred, ref, spacing, tol)
    total, per_slice = metrics.added_path_length(pred, ref, spacing, tol)
    assert total == pytest.approx(want_total) and total > 0
    assert per_slice.keys() == want.keys()
    assert per_slice == {k: pytest.approx(v) for k, v in want.items()}
    assert sum(per_slice.values()) == pytest.approx(total)


@pytest.mark.parametrize("seed", [0, 1])
def test_slice_contours_match_a_per_slice_erosion(seed):
    mask = blobs((6, 17, 23), seed) == 1
    mask[2] = True  # a full slice: only its border ring is contour
    cross = ndimage.generate_binary_structure(2, 1)
    want = np.stack([m & ~ndimage.binary_erosion(m, cross, border_value=0) for m in mask])
    np.testing.assert_array_equal(metrics.slice_contours(mask), want)
    np.testing.assert_array_equal(metrics.slice_contours(mask[3]), want[3])
    with pytest.raises(GeometryError):
        metrics.slice_contours(np.ones(4, bool))
