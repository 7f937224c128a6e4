"""segcore.refine: include/exclude clicks refine one structure with the bundled refine-demo package; the result
lies on the input's grid, changes only near the clicks and only the asked label; bad input changes nothing."""

import numpy as np
import pytest
import SimpleITK as sitk

import segcore
from segcore.errors import SegcoreError
from segcore.refinement import EXCLUDE, INCLUDE, Refiner, RefineSettings, click_maps
from training import clicks as simulated

PROSTATE, BLADDER = 1, 2


@pytest.fixture(scope="module")
def phantom():
    """A phantom whose label map holds only the six organs, as a segmentation's result does."""
    from segcore.phantom import make_phantom

    case = make_phantom(9201, matrix=256, orientation="LPS")
    organs = sitk.GetArrayFromImage(case.labels)
    organs[organs > 6] = 0
    case.labels = sitk.GetImageFromArray(organs)
    case.labels.CopyInformation(case.ct)
    return case


@pytest.fixture(scope="module")
def refiner():
    return Refiner(device="cpu")


def replaced(labels: sitk.Image, value: int, mask: np.ndarray) -> sitk.Image:
    """The label map with label ``value`` replaced by ``mask`` (where no other label is)."""
    array = sitk.GetArrayFromImage(labels)
    array[array == value] = 0
    array[mask & (array == 0)] = value
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(labels)
    return out


def point_of(image: sitk.Image, zyx) -> tuple:
    return image.TransformIndexToPhysicalPoint([int(v) for v in zyx[::-1]])


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def test_no_points_give_the_label_map_back_unchanged(phantom, refiner):
    result = refiner(phantom.ct, phantom.labels, [], [], PROSTATE)
    assert np.array_equal(array(result.labelmap), array(phantom.labels))
    assert result.details["added_voxels"] == result.details["removed_voxels"] == 0
    assert "unchanged" in result.messages[0]


def test_clicks_move_a_poor_mask_towards_the_truth_and_leave_everything_else_alone(phantom, refiner):
    labels = array(phantom.labels)
    truth = labels == PROSTATE
    spacing_zyx = phantom.ct.GetSpacing()[::-1]
    current = replaced(phantom.labels, PROSTATE, simulated.poor_mask(truth, spacing_zyx, np.random.default_rng(3)))
    before = array(current).copy()
    scores, include, exclude = [simulated.dice(before == PROSTATE, truth)], [], []
    for _ in range(3):
        (zyx, kind) = simulated.next_click(array(current) == PROSTATE, truth, spacing_zyx)
        (include if kind == INCLUDE else exclude).append(point_of(phantom.ct, zyx))
        previous = array(current)
        current = refiner(phantom.ct, current, include, exclude, PROSTATE).labelmap
        now = array(current)
        assert sitk.Image.GetSize(current) == phantom.ct.GetSize()
        assert current.GetOrigin() == phantom.ct.GetOrigin() and current.GetDirection() == phantom.ct.GetDirection()
        # Other labels untouched; the clicked voxel as asked.
        others = (previous != PROSTATE) & (previous != 0)
        assert np.array_equal(now[others], previous[others])
        assert (now[tuple(zyx)] == PROSTATE) == (kind == INCLUDE)
        # Only slices within reach of a click change.
        changed_z = np.nonzero((now != previous).any(axis=(1, 2)))[0]
        click_z = [phantom.ct.TransformPhysicalPointToIndex(p)[2] for p in include + exclude]
        reach = refiner.settings.reach_mm / phantom.ct.GetSpacing()[2]
        assert all(min(abs(z - c) for c in click_z) <= reach + 1 for z in changed_z)
        scores.append(simulated.dice(now == PROSTATE, truth))
    assert np.array_equal(array(phantom.labels), labels)  # the input was not modified
    assert scores[-1] > scores[0] + 0.03, scores


def test_an_include_point_creates_an_absent_structure(phantom, refiner):
    labels = array(phantom.labels)
    k, j, i = (int(np.median(v)) for v in np.nonzero(labels == PROSTATE))
    empty = replaced(phantom.labels, PROSTATE, np.zeros(labels.shape, bool))
    result = refiner(phantom.ct, empty, [point_of(phantom.ct, (k, j, i))], [], PROSTATE)
    made = array(result.labelmap) == PROSTATE
    assert made[k, j, i]
    assert result.segments and result.segments[0].name == "prostate"
    # A cautious seed inside the prostate (more clicks grow it), on the slices the click reaches only.
    reach = int(refiner.settings.reach_mm / phantom.ct.GetSpacing()[2])
    assert made.sum() == made[k - reach:k + reach + 1].sum()
    assert (made & (labels == PROSTATE)).sum() > 0.9 * made.sum()
    assert result.segments[0].volume_cc > 1.0


def test_an_exclude_point_removes_a_false_part(phantom, refiner):
    labels = array(phantom.labels)
    truth = labels == BLADDER
    spacing_zyx = phantom.ct.GetSpacing()[::-1]
    grown = simulated.grown(truth, 6.0, spacing_zyx)
    current = replaced(phantom.labels, BLADDER, grown)
    zyx, kind = simulated.next_click(array(current) == BLADDER, truth, spacing_zyx)
    assert kind == EXCLUDE
    result = refiner(phantom.ct, current, [], [point_of(phantom.ct, zyx)], BLADDER)
    after = array(result.labelmap) == BLADDER
    assert not after[tuple(zyx)]
    assert result.details["removed_voxels"] > 0
    assert result.details["added_voxels"] == 0           # an exclude point never makes the structure larger
    assert not (after & (array(current) != BLADDER)).any()
    assert simulated.dice(after, truth) > simulated.dice(array(current) == BLADDER, truth)


def test_an_include_point_adds_a_missing_part(phantom, refiner):
    labels = array(phantom.labels)
    truth = labels == BLADDER
    spacing_zyx = phantom.ct.GetSpacing()[::-1]
    current = replaced(phantom.labels, BLADDER, simulated.grown(truth, -6.0, spacing_zyx))
    before = array(current) == BLADDER
    zyx, kind = simulated.next_click(before, truth, spacing_zyx)
    assert kind == INCLUDE
    result = refiner(phantom.ct, current, [point_of(phantom.ct, zyx)], [], BLADDER)
    after = array(result.labelmap) == BLADDER
    assert after[tuple(zyx)]
    assert result.details["added_voxels"] > result.details["removed_voxels"]
    assert simulated.dice(after, truth) > simulated.dice(before, truth)


def test_the_result_does_not_depend_on_how_the_voxels_are_stored(phantom, refiner):
    """The same physical clicks on a flipped copy of the image give the same physical result."""
    truth = array(phantom.labels) == PROSTATE
    spacing_zyx = phantom.ct.GetSpacing()[::-1]
    current = replaced(phantom.labels, PROSTATE, simulated.grown(truth, -3.0, spacing_zyx))
    zyx, _ = simulated.next_click(array(current) == PROSTATE, truth, spacing_zyx)
    points = [point_of(phantom.ct, zyx)]
    plain = refiner(phantom.ct, current, points, [], PROSTATE).labelmap
    flip = [True, True, False]
    flipped = refiner(sitk.Flip(phantom.ct, flip), sitk.Flip(current, flip), points, [], PROSTATE).labelmap
    assert flipped.GetDirection() != plain.GetDirection()
    back = sitk.Resample(flipped, plain, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.array_equal(array(back), array(plain))


def test_click_maps_are_disks_that_fade_along_the_body_axis():
    settings = RefineSettings(reach_mm=10.0, click_radius_mm=3.0)
    maps = click_maps([(5, 10, 10, INCLUDE), (5, 20, 20, EXCLUDE)], [5, 10, 15], (32, 32), (1.0, 1.0, 1.0), settings)
    assert maps.shape == (3, 2, 32, 32)
    assert maps[0, 0, 10, 10] == 1.0 and maps[0, 1, 20, 20] == 1.0 and maps[0, 0, 20, 20] == 0.0
    assert maps[0, 0, 10, 13] == 1.0 and maps[0, 0, 10, 14] == 0.0          # radius 3 mm
    assert maps[1, 0, 10, 10] == pytest.approx(0.5)                       # 5 mm away of a 10 mm reach
    assert not maps[2].any()                                              # 10 mm away: out of reach


def test_a_package_may_keep_the_mask_away_from_the_clicks(phantom, refiner):
    from dataclasses import replace

    truth = array(phantom.labels) == PROSTATE
    spacing_zyx = phantom.ct.GetSpacing()[::-1]
    current = replaced(phantom.labels, PROSTATE, simulated.grown(truth, -4.0, spacing_zyx))
    zyx, _ = simulated.next_click(array(current) == PROSTATE, truth, spacing_zyx)
    point = np.asarray(point_of(phantom.ct, zyx))
    limited = Refiner(refiner.package, device="cpu")
    limited.settings = replace(limited.settings, near_mm=8.0, keep_margin=0.5)   # no change beyond 8 mm
    changed = array(limited(phantom.ct, current, [tuple(point)], [], PROSTATE).labelmap) != array(current)
    k, j, i = np.nonzero(changed)
    where = np.array([phantom.ct.TransformIndexToPhysicalPoint([int(a), int(b), int(c)]) for a, b, c in zip(i, j, k)])
    assert len(where) and np.sqrt(((where - point) ** 2).sum(axis=1)).max() <= 8.0 + max(phantom.ct.GetSpacing())
    unlimited = array(refiner(phantom.ct, current, [tuple(point)], [], PROSTATE).labelmap) != array(current)
    assert unlimited.sum() > changed.sum()


@pytest.mark.parametrize("change, message", [
    (lambda p, c: {"include": [(1e4, 0.0, 0.0)]}, "lies outside the image"),
    (lambda p, c: {"include": [c] * 101}, "at most 100"),
    (lambda p, c: {"include": [c], "label": 0}, "from 1 to 255"),
    (lambda p, c: {"include": [c], "label": "prostate"}, "from 1 to 255"),
    (lambda p, c: {"exclude": [c], "label": 99}, "label 99 is not in the label map"),
    (lambda p, c: {"include": [(1, 2)]}, "(x, y, z) positions"),
    (lambda p, c: {"exclude": [far_point(p)]}, "more than 50 mm from label 1"),
    (lambda p, c: {"include": [voxel_of(p, BLADDER)]}, "lies in label 2 (bladder), and refine never changes"),
    (lambda p, c: {"include": [c], "labelmap": sitk.Shrink(p.labels, [2, 2, 1])}, "not on the image's grid"),
])
def test_bad_input_is_refused_with_a_clear_message_and_changes_nothing(phantom, refiner, change, message):
    labels = array(phantom.labels)
    k, j, i = (int(np.median(v)) for v in np.nonzero(labels == PROSTATE))
    arguments = {"include": [], "exclude": [], "label": PROSTATE, "labelmap": phantom.labels,
                 **change(phantom, point_of(phantom.ct, (k, j, i)))}
    with pytest.raises(SegcoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        refiner(phantom.ct, arguments["labelmap"], arguments["include"], arguments["exclude"], arguments["label"])
    assert np.array_equal(array(phantom.labels), labels)


def voxel_of(phantom, value):
    k, j, i = (int(np.median(v)) for v in np.nonzero(array(phantom.labels) == value))
    return point_of(phantom.ct, (k, j, i))


def far_point(phantom):
    """A point in the image, in air beside the body, far from the prostate."""
    return phantom.ct.TransformIndexToPhysicalPoint([2, 2, phantom.ct.GetSize()[2] // 2])


def test_the_public_function_takes_paths_and_the_default_package(phantom, tmp_path):
    sitk.WriteImage(phantom.ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(phantom.labels, str(tmp_path / "labels.nii.gz"))
    labels = array(phantom.labels)
    k, j, i = (int(np.median(v)) for v in np.nonzero(labels == PROSTATE))
    result = segcore.refine(str(tmp_path / "ct.nii.gz"), str(tmp_path / "labels.nii.gz"),
                            include=[point_of(phantom.ct, (k, j, i))], label=PROSTATE, device="cpu")
    assert result.model == "refine-demo" and result.model_version
    assert array(result.labelmap)[k, j, i] == PROSTATE
