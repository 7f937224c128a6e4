"""The modules' Refine (guided correction) on real MRML (slicer-core): the console logic's refineSegment and
undoRefine, and the Refine section's include/exclude points (ProstateSegLib.refinepoints; the Qt panel around
it runs in Slicer's self-test, SelfTestMixin.test_Refine).

A phantom prostate segment with one half cut away stands for a result to correct; its CT is stored in RAS
order, so that a mix-up of RAS and LPS would put every point in the wrong place.
"""

import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, load_volume

pytest.importorskip("slicer")
sys.path.insert(0, str(ROOT / "ProstateSeg"))

from ProstateSegLib.logic import ProstateSegmentationLogic
from ProstateSegLib.refinepoints import EXCLUDE_COLOR, INCLUDE_COLOR, RefinePoints
from segcore import anatomy, metrics, mrml
from segcore.errors import SegcoreError

NAMES = ("prostate", "bladder", "rectum")


@pytest.fixture(scope="module")
def logic():
    return ProstateSegmentationLogic()  # one per file: the refinement model is loaded once


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """(case, CT path, labels with the prostate's right-hand half (in the image) cut away, the truth)."""
    from segcore.phantom import make_phantom

    case = make_phantom(9201, matrix=128, orientation="RAS")
    path = tmp_path_factory.mktemp("refine") / "phantom_ct.nrrd"
    sitk.WriteImage(case.ct, str(path))
    labels = sitk.GetArrayFromImage(case.labels)
    labels[labels > 3] = 0
    truth = labels == 1
    middle = int(np.median(np.nonzero(truth)[2]))
    damaged = labels.copy()
    damaged[:, :, middle:][truth[:, :, middle:]] = 0
    image = sitk.GetImageFromArray(damaged)
    image.CopyInformation(case.labels)
    return case, path, image, truth


@pytest.fixture
def scene_case(mrml_scene, phantom):
    """The phantom CT loaded as Slicer loads it, and a segmentation of prostate (damaged), bladder, rectum."""
    case, path, damaged, truth = phantom
    volume = load_volume(mrml_scene, path)
    segmentation = mrml.labelmap_to_segmentation_node(damaged, [anatomy.BY_NAME[n] for n in NAMES], volume,
                                                      show_3d=False)
    return volume, segmentation, case, truth


def segment_arrays(segmentation, volume):
    """Every segment as a 0/1 array on the volume's grid, by name."""
    return {name: sitk.GetArrayFromImage(mrml.segmentation_node_to_labelmap(segmentation, volume, [name])) != 0
            for name in NAMES}


def ras_of_voxel(volume, kji):
    """The world RAS position of voxel (k, j, i), from the volume node's own IJK -> RAS matrix (not segcore's)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return tuple(matrix.MultiplyPoint([float(kji[2]), float(kji[1]), float(kji[0]), 1.0])[:3])


def missing_click(segments, truth, volume):
    """The RAS position of the deepest voxel of the largest missed part (as the simulated user clicks)."""
    from training.clicks import next_click

    zyx, kind = next_click(segments["prostate"], truth, volume.GetSpacing()[::-1])
    assert kind == 0  # include: the cut-away half is the error
    return ras_of_voxel(volume, zyx), zyx


def dice(mask, truth, volume):
    return metrics.mask_metrics(mask, truth, volume.GetSpacing()[::-1]).dsc


def test_an_include_click_grows_the_segment_towards_the_truth_and_leaves_the_others(logic, scene_case):
    volume, segmentation, _, truth = scene_case
    before = segment_arrays(segmentation, volume)
    click, zyx = missing_click(before, truth, volume)
    segment = segmentation.GetSegmentation().GetSegment("prostate")
    colour = segment.GetColor()

    result = logic.refineSegment(segmentation, "prostate", volume, include=[click], device="cpu")

    after = segment_arrays(segmentation, volume)
    assert result is logic.lastRefineResult and result.details["added_voxels"] > 20   # voxels of 3-4 mm: about 1 cc
    assert after["prostate"][tuple(zyx)] and not before["prostate"][tuple(zyx)]
    assert after["prostate"].sum() > before["prostate"].sum()
    assert dice(after["prostate"], truth, volume) > dice(before["prostate"], truth, volume) + 0.05
    for name in ("bladder", "rectum"):  # bit for bit, and never overlapped by the grown prostate
        assert np.array_equal(after[name], before[name]), name
        assert not (after["prostate"] & after[name]).any(), name
    # the same segment: ID, name, colour; no node left behind
    assert segmentation.GetSegmentation().GetSegment("prostate") is segment
    assert segment.GetName() == "prostate" and segment.GetColor() == colour
    assert volume.GetScene().GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0


def test_undo_gives_back_exactly_what_the_segment_held_also_after_a_correction_by_hand(logic, scene_case):
    volume, segmentation, _, truth = scene_case
    # a correction by hand first: a few voxels drawn far from where the click will go
    drawn = segment_arrays(segmentation, volume)["prostate"]
    k = np.nonzero(drawn.any(axis=(1, 2)))[0].min()
    j, i = np.argwhere(drawn[k])[0]
    drawn[k, j:j + 2, max(i - 4, 0):i] = True
    logic._writeSegment(segmentation, "prostate", volume, drawn)
    handEdited = segment_arrays(segmentation, volume)
    assert np.array_equal(handEdited["prostate"], drawn)
    click, _ = missing_click(handEdited, truth, volume)

    logic.clearRefineHistory()
    logic.refineSegment(segmentation, "prostate", volume, include=[click], device="cpu")
    once = segment_arrays(segmentation, volume)["prostate"]
    inside = np.argwhere(once & truth)[len(np.argwhere(once & truth)) // 2]
    logic.refineSegment(segmentation, "prostate", volume, include=[click], exclude=[ras_of_voxel(volume, inside)],
                        device="cpu")
    twice = segment_arrays(segmentation, volume)["prostate"]
    assert not twice[tuple(inside)] and not np.array_equal(twice, once)

    assert logic.undoRefine() == "prostate"
    assert np.array_equal(segment_arrays(segmentation, volume)["prostate"], once)
    assert logic.undoRefine() == "prostate"
    restored = segment_arrays(segmentation, volume)
    for name in NAMES:  # the hand-corrected content, exactly; the others as they were
        assert np.array_equal(restored[name], handEdited[name]), name
    assert not logic.canUndoRefine() and logic.undoRefine() is None


def test_bad_input_is_refused_with_segcores_message_and_changes_nothing(logic, scene_case):
    volume, segmentation, _, _ = scene_case
    scene = volume.GetScene()
    before = segment_arrays(segmentation, volume)
    nodes = scene.GetNumberOfNodes()
    logic.clearRefineHistory()
    inside = ras_of_voxel(volume, np.argwhere(before["prostate"])[0])

    with pytest.raises(SegcoreError, match=r"the include point .* lies outside the image, which spans"):
        logic.refineSegment(segmentation, "prostate", volume, include=[(0.0, 0.0, 5000.0)], device="cpu")
    with pytest.raises(SegcoreError, match="101 points were given; refine takes at most 100"):
        logic.refineSegment(segmentation, "prostate", volume, include=[inside] * 60, exclude=[inside] * 41,
                            device="cpu")
    with pytest.raises(SegcoreError, match="has no segment 'liver'"):
        logic.refineSegment(segmentation, "liver", volume, include=[inside], device="cpu")
    with pytest.raises(SegcoreError, match="no volume selected"):
        logic.refineSegment(segmentation, "prostate", None, include=[inside], device="cpu")
    with pytest.raises(SegcoreError, match="in RAS millimetres"):
        logic.refineSegment(segmentation, "prostate", volume, include=[(1.0, 2.0)], device="cpu")

    after = segment_arrays(segmentation, volume)
    for name in NAMES:
        assert np.array_equal(after[name], before[name]), name
    assert scene.GetNumberOfNodes() == nodes and not logic.canUndoRefine()


def test_points_are_taken_in_ras_as_markups_give_them(logic, scene_case):
    """An exclude point placed with a markups node on a voxel (its RAS from the volume node's own matrix)
    removes exactly that voxel: RAS -> LPS is right. The same numbers taken as LPS land in another place."""
    volume, segmentation, case, _ = scene_case
    assert logic.rasToLps([(1.5, -2.0, 3.0)]) == [(-1.5, 2.0, 3.0)]
    before = segment_arrays(segmentation, volume)["prostate"]
    kji = tuple(np.argwhere(before)[np.argwhere(before).shape[0] // 2])
    markups = volume.GetScene().AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    markups.AddControlPoint(ras_of_voxel(volume, kji))
    point = tuple(markups.GetNthControlPointPositionWorld(0))
    lps = (-point[0], -point[1], point[2])
    assert np.allclose(case.ct.TransformPhysicalPointToContinuousIndex(lps)[::-1], kji, atol=1e-6)
    assert not np.allclose(case.ct.TransformPhysicalPointToContinuousIndex(point)[::-1], kji, atol=1)

    logic.refineSegment(segmentation, "prostate", volume, exclude=[point], device="cpu")
    assert not segment_arrays(segmentation, volume)["prostate"][kji]


def test_each_placed_point_refines_at_once_and_a_refused_one_is_removed(logic, scene_case):
    """The Refine section's points (what the panel's Include/Exclude buttons place): green and red lists;
    placing a point refines with every point so far; a refused point is taken away with segcore's message;
    Undo takes the refinement and its point back; Clear removes the points."""
    volume, segmentation, _, truth = scene_case
    scene = volume.GetScene()
    logic.clearRefineHistory()
    refined, failed = [], []
    points = RefinePoints(logic, scene, target=lambda: (segmentation, "prostate", volume),
                          options=lambda: {"device": "cpu"}, refined=refined.append, failed=failed.append)
    include, exclude = points.nodes()
    assert include.GetDisplayNode().GetSelectedColor() == pytest.approx(INCLUDE_COLOR)
    assert exclude.GetDisplayNode().GetSelectedColor() == pytest.approx(EXCLUDE_COLOR)
    before = segment_arrays(segmentation, volume)
    click, zyx = missing_click(before, truth, volume)

    include.AddControlPoint(click)  # what a click in a slice view does once the Include button is on
    assert len(refined) == 1 and not failed
    grown = segment_arrays(segmentation, volume)
    assert grown["prostate"][tuple(zyx)] and grown["prostate"].sum() > before["prostate"].sum()
    assert refined[0].details["include"] == 1 and logic.canUndoRefine()

    exclude.AddControlPoint((0.0, 0.0, 5000.0))  # outside the image: refused, removed, nothing changed
    assert len(refined) == 1 and "lies outside the image" in failed[0]
    assert exclude.GetNumberOfControlPoints() == 0 and include.GetNumberOfControlPoints() == 1
    assert np.array_equal(segment_arrays(segmentation, volume)["prostate"], grown["prostate"])

    assert points.undo() == "prostate"
    assert include.GetNumberOfControlPoints() == 0 and not logic.canUndoRefine()
    assert np.array_equal(segment_arrays(segmentation, volume)["prostate"], before["prostate"])

    include.AddControlPoint(click)
    assert len(refined) == 2 and points.pointCount() == 1
    points.clear()
    assert points.pointCount() == 0 and logic.canUndoRefine()  # the segment stays as refined
    points.cleanup()
