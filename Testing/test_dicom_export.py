"""RT Structure Sets and DICOM SEG out (segcore.dicom, `--formats rtstruct,dicom-seg`), judged by
independent tools: dciodvfy (IOD conformance), plastimatch (rasterises the RTSTRUCT as SlicerRT does),
dcmqi (reads the SEG as Slicer's QuantitativeReporting does) and dcmtk (parses both).

CT series are written by segcore.dicom.ct.write_ct_series from phantoms in several patient positions and
acquisition planes, and from the real pelvic CT in ../shared/data.
"""

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_tools import dciodvfy_errors, dcmdump, dcmqi_segments, dice, organ_labels, plastimatch_masks

from segcore import anatomy
from segcore.cli import main
from segcore.dicom.ct import Algorithm, ct_series_for, slice_of, write_ct_series
from segcore.dicom.names import roi_names
from segcore.dicom.rtstruct import RT_STRUCTURE_SET_STORAGE, rasterise, read_rtstruct, trace_slices
from segcore.errors import GeometryError, SegcoreError
from segcore.export import export_labelmap
from segcore.image import read_image
from segcore.metrics import read_json
from segcore.phantom import make_phantom

TARGETS = [anatomy.BY_NAME[name] for name in anatomy.TARGET_NAMES]
TG263 = {"Prostate": 1, "Bladder": 2, "Rectum": 3, "Femur_Head_L": 4, "Femur_Head_R": 5, "SeminalVes": 6}

# How each patient position / acquisition is stored: index axes flipped from the phantom's LPS grid
# (the anatomy stays where it is in patient space; the grid's direction says how it was scanned).
POSITIONS = {
    "HFS": None,
    "FFS": [True, False, True],   # feet first: rows run to the patient's right, slices from head to feet
    "HFP": [True, True, False],   # prone: rows to the right, columns to the front
}


def dicom_case(folder, seed=5, position="HFS", spacing=(1.0, 1.0, 1.0), matrix=112, orientation="LPS"):
    """A phantom written as a DICOM CT series (file names in no slice order); returns (series folder,
    the CT as read back, its target labels on that grid)."""
    case = make_phantom(seed, matrix=matrix, spacing=spacing, orientation=orientation, implant=False)
    ct, labels = case.ct, organ_labels(case.labels)
    if POSITIONS.get(position):
        ct, labels = sitk.Flip(ct, POSITIONS[position]), sitk.Flip(labels, POSITIONS[position])
    write_ct_series(ct, folder, patient_position=position, seed=f"{seed}{position}{orientation}",
                    patient_name="Doe^Jane", patient_id="PID-42",
                    file_names=lambda k: f"IM{(k * 7919) % 10007:05d}")
    read = read_image(folder)
    # A left-handed grid (the sagittal phantom) cannot be stored in DICOM: reading reorders it.
    return folder, read, sitk.Resample(labels, read, sitk.Transform(), sitk.sitkNearestNeighbor)


def _export(tmp_path, folder, ct, labels, formats=("rtstruct", "dicom-seg", "nii.gz"), **options):
    out = tmp_path / "out"
    written = export_labelmap(labels, TARGETS, out, "case_seg", formats, source=folder,
                              algorithm=Algorithm("organs-test-model", "1.2"), **options)
    return out, {p.name: p for p in written}


def _check_against_tools(tmp_path, out, files, labels, min_dice):
    array = sitk.GetArrayFromImage(labels)
    for name in ("case_rtstruct.dcm", "case_seg.dcm"):
        assert dciodvfy_errors(files[name]) == [], name
    assert "RTSTRUCT" in dcmdump(files["case_rtstruct.dcm"])
    assert "SegmentationStorage" in dcmdump(files["case_seg.dcm"])

    masks = plastimatch_masks(files["case_rtstruct.dcm"], files["case_seg.nii.gz"], tmp_path)
    assert sorted(masks) == sorted(name for name, value in TG263.items() if (array == value).any())
    for name, mask in masks.items():
        assert dice(mask, array == TG263[name]) >= min_dice, name

    segments = dcmqi_segments(files["case_seg.dcm"], tmp_path)
    assert sorted(segments) == sorted(s.name for s in TARGETS)  # an organ not found is an empty segment
    for s in TARGETS:
        image = segments[s.name]
        if not (array == s.value).any():
            assert not sitk.GetArrayViewFromImage(image).any()
            continue
        # dcmqi keeps only the frames that hold the segment: a part of our grid, voxel for voxel
        assert np.allclose(image.GetDirection(), labels.GetDirection(), atol=1e-4)
        assert np.allclose(image.GetSpacing(), labels.GetSpacing(), atol=1e-4)
        start = np.asarray(labels.TransformPhysicalPointToContinuousIndex(image.GetOrigin()))
        assert np.allclose(start, np.round(start), atol=1e-3)
        on_our_grid = sitk.Resample(image, labels, sitk.Transform(), sitk.sitkNearestNeighbor)
        assert np.array_equal(sitk.GetArrayFromImage(on_our_grid) > 0, array == s.value), s.name


@pytest.mark.parametrize("position, spacing, orientation, min_dice", [
    ("HFS", (1.0, 1.0, 1.0), "LPS", 0.97),
    ("FFS", (1.0, 1.0, 3.0), "LPS", 0.95),
    ("HFP", (1.0, 1.0, 3.0), "LPS", 0.95),
    ("HFS", (1.2, 1.2, 1.2), "sagittal", 0.97),   # a sagittal acquisition: slices are sagittal planes
])
def test_phantom_series_judged_by_independent_tools(tmp_path, position, spacing, orientation, min_dice):
    folder, ct, labels = dicom_case(tmp_path / "ct", position=position, spacing=spacing, orientation=orientation)
    out, files = _export(tmp_path, folder, ct, labels)
    assert sorted(files) == ["case_rtstruct.dcm", "case_seg.dcm", "case_seg.nii.gz"]
    _check_against_tools(tmp_path, out, files, labels, min_dice)


def test_real_pelvic_ct_as_dicom(tmp_path, pelvis_ct_path, pelvis_labels_path):
    """The real CT (3 mm, stored RAS) as a DICOM series, with TotalSegmentator's bladder and femurs."""
    ct = sitk.ReadImage(str(pelvis_ct_path))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(pelvis_labels_path))).astype(np.uint8)
    write_ct_series(ct, tmp_path / "ct", seed="real", file_names=lambda k: f"{k * 37 % 101:03d}")
    read = read_image(tmp_path / "ct")
    array = np.zeros(reference.shape, np.uint8)
    array[reference == 104], array[reference == 88], array[reference == 89] = 2, 4, 5
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(ct)
    labels = sitk.Resample(labels, read, sitk.Transform(), sitk.sitkNearestNeighbor)
    out, files = _export(tmp_path, tmp_path / "ct", read, labels)
    _check_against_tools(tmp_path, out, files, labels, 0.95)


def test_contours_reference_the_instance_of_their_plane(tmp_path):
    folder, ct, labels = dicom_case(tmp_path / "ct", position="FFS", matrix=96)
    _, files = _export(tmp_path, folder, ct, labels, formats=("rtstruct",), roi_names={"prostate": "Prostate_AI"})
    ds = pydicom.dcmread(files["case_rtstruct.dcm"])
    series = ct_series_for(ct, folder)
    by_uid = {str(instance.SOPInstanceUID): instance for instance in series.instances}
    planes = 0
    for roi in ds.ROIContourSequence:
        for contour in getattr(roi, "ContourSequence", []):
            (reference,) = contour.ContourImageSequence
            instance = by_uid[reference.ReferencedSOPInstanceUID]
            k, _ = slice_of(instance, ct)
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            index = np.array([ct.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
            assert np.allclose(index[:, 2], k, atol=1e-3)  # the contour lies in its instance's plane
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert int(contour.NumberOfContourPoints) == len(points)
            planes += 1
    assert planes > 20

    # The modules a planning system reads: patient and study from the CT, new UIDs, names, algorithm.
    first = series.first
    assert ds.SOPClassUID == RT_STRUCTURE_SET_STORAGE and ds.Modality == "RTSTRUCT"
    assert (ds.PatientName, ds.PatientID, ds.StudyInstanceUID) == (first.PatientName, "PID-42", first.StudyInstanceUID)
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID and ds.SOPInstanceUID not in by_uid
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == first.StudyInstanceUID
    assert study.RTReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert len(study.RTReferencedSeriesSequence[0].ContourImageSequence) == ct.GetSize()[2]
    names = [roi.ROIName for roi in ds.StructureSetROISequence]
    assert names == ["Prostate_AI", "Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R", "SeminalVes"]
    assert {roi.ROIGenerationAlgorithm for roi in ds.StructureSetROISequence} == {"AUTOMATIC"}
    assert "organs-test-model 1.2" in ds.StructureSetROISequence[0].ROIGenerationDescription
    assert [o.RTROIInterpretedType for o in ds.RTROIObservationsSequence] == ["ORGAN"] * 6
    assert [list(map(int, r.ROIDisplayColor)) for r in ds.ROIContourSequence] == [list(s.color) for s in TARGETS]
    assert ds.RTROIObservationsSequence[0].RTROIIdentificationCodeSequence[0].CodeValue == "41216001"


def test_our_reader_gives_back_the_label_map(tmp_path):
    folder, ct, labels = dicom_case(tmp_path / "ct", position="HFP", spacing=(1.0, 1.0, 2.5), matrix=96)
    _, files = _export(tmp_path, folder, ct, labels, formats=("rtstruct",))
    structure_set = read_rtstruct(files["case_rtstruct.dcm"])
    assert structure_set.problems == []
    array = sitk.GetArrayFromImage(labels)
    for roi in structure_set.rois:
        mask, problems = rasterise(roi, ct)
        assert problems == []
        assert np.array_equal(mask, array == TG263[roi.name]), roi.name


def _ring_with_islands() -> np.ndarray:
    """Three slices: a ring (a hole) holding an island, plus a separate island; the middle slice also
    has two voxels that touch only at a corner."""
    mask = np.zeros((3, 40, 40), bool)
    mask[:, 5:30, 5:30] = True
    mask[:, 10:25, 10:25] = False    # the hole
    mask[:, 15:20, 15:20] = True     # an island in the hole
    mask[:, 33:37, 2:6] = True       # a separate island
    mask[1, 36, 36] = mask[1, 37, 37] = True
    return mask


def test_islands_and_holes_as_planning_systems_read_them(tmp_path):
    """Holes and islands are separate contours combined by the even-odd rule: plastimatch with
    --xor-contours and our reader both give back exactly the voxels written."""
    mask = _ring_with_islands()
    assert len(trace_slices(mask)[1]) == 6  # outer, hole, island in the hole, island, two corner voxels
    ct = sitk.GetImageFromArray(np.where(mask, 40, -1000).astype(np.int16))
    ct.SetSpacing((0.8, 0.8, 2.0))
    ct.SetOrigin((-16.0, -16.0, 10.0))
    labels = sitk.GetImageFromArray(mask.astype(np.uint8))
    labels.CopyInformation(ct)
    write_ct_series(ct, tmp_path / "ct", seed="ring")
    out = export_labelmap(labels, [anatomy.BY_VALUE[1]], tmp_path / "out", "ring", ("rtstruct", "nii.gz"),
                          source=tmp_path / "ct")
    rtstruct = next(p for p in out if p.name.endswith("_rtstruct.dcm"))
    assert np.array_equal(plastimatch_masks(rtstruct, tmp_path / "out" / "ring.nii.gz", tmp_path)["Prostate"], mask)
    (roi,) = read_rtstruct(rtstruct).rois
    assert np.array_equal(rasterise(roi, ct)[0], mask)


def test_empty_structure_is_listed_without_contours(tmp_path):
    folder, ct, labels = dicom_case(tmp_path / "ct", matrix=96, spacing=(1.5, 1.5, 3.0))
    array = sitk.GetArrayFromImage(labels)
    array[array == 6] = 0
    empty_vesicles = sitk.GetImageFromArray(array)
    empty_vesicles.CopyInformation(labels)
    _, files = _export(tmp_path, folder, ct, empty_vesicles, formats=("rtstruct", "dicom-seg"))
    ds = pydicom.dcmread(files["case_rtstruct.dcm"])
    assert ds.StructureSetROISequence[5].ROIName == "SeminalVes"
    assert "ContourSequence" not in ds.ROIContourSequence[5]
    assert dciodvfy_errors(files["case_rtstruct.dcm"]) == []


def test_export_refuses_what_does_not_fit(tmp_path):
    folder, _, labels = dicom_case(tmp_path / "ct", matrix=96, spacing=(1.5, 1.5, 3.0))
    with pytest.raises(SegcoreError, match="needs a DICOM CT input"):
        export_labelmap(labels, TARGETS, tmp_path / "a", "x", ("rtstruct",), source=tmp_path / "x.nii.gz")
    with pytest.raises(SegcoreError, match="need a DICOM CT input"):
        export_labelmap(labels, TARGETS, tmp_path / "a", "x", ("rtstruct", "dicom-seg"))
    # a label map on another grid than the series': refused before anything is written
    shifted = sitk.Image(labels)
    shifted.SetOrigin(tuple(np.asarray(labels.GetOrigin()) + (0.3, 0, 0)))
    with pytest.raises(GeometryError, match="does not match the image's voxel grid"):
        export_labelmap(shifted, TARGETS, tmp_path / "b", "x", ("rtstruct", "nii.gz"), source=folder)
    assert not (tmp_path / "b" / "x.nii.gz").exists()
    # a series with a slice missing
    next(p for p in sorted(folder.iterdir())).unlink()
    with pytest.raises(GeometryError, match="have no CT instance"):
        export_labelmap(labels, TARGETS, tmp_path / "c", "x", ("dicom-seg",), source=folder)
    with pytest.raises(SegcoreError, match="not a structure we write"):
        roi_names(TARGETS, {"liver": "Liver"})
    with pytest.raises(SegcoreError, match="same ROI name"):
        roi_names(TARGETS, {"prostate": "Bladder"})


def test_cli_writes_rtstruct_and_seg_for_a_dicom_series(tmp_path, capsys):
    folder, ct, _ = dicom_case(tmp_path / "ct", matrix=96, spacing=(2.0, 2.0, 3.0))
    names = tmp_path / "names.yaml"
    names.write_text("Prostate: Prostate_AI\nfemoral_head_left: FemurHead_Lt\n")
    assert main(["--quiet", "organs", str(folder), "-o", str(tmp_path / "out"), "--formats",
                 "rtstruct,dicom-seg,nii.gz", "--names", str(names)]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["ct_rtstruct.dcm", "ct_seg.dcm", "ct_seg.json", "ct_seg.nii.gz",
                                                     "manifest.jsonl"]
    ds = pydicom.dcmread(out / "ct_rtstruct.dcm")
    assert sorted(r.ROIName for r in ds.StructureSetROISequence) == sorted(
        ["Prostate_AI", "Bladder", "Rectum", "FemurHead_Lt", "Femur_Head_R", "SeminalVes"])
    assert "hmrnet" in ds.StructureSetROISequence[0].ROIGenerationDescription.lower()
    assert dciodvfy_errors(out / "ct_rtstruct.dcm") == [] and dciodvfy_errors(out / "ct_seg.dcm") == []
    # the RT Structure Set holds what the NIfTI holds
    result = sitk.ReadImage(str(out / "ct_seg.nii.gz"))
    array = sitk.GetArrayFromImage(result)
    for roi in read_rtstruct(out / "ct_rtstruct.dcm").rois:
        value = {"Prostate_AI": 1, "FemurHead_Lt": 4}.get(roi.name) or TG263[roi.name]
        assert np.array_equal(rasterise(roi, read_image(folder))[0], array == value), roi.name

    # a NIfTI input cannot give DICOM outputs: one error line, exit 1, no output folder
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    capsys.readouterr()
    assert main(["--quiet", "segment", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "none"),
                 "--formats", "rtstruct"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rtstruct needs a DICOM CT input" in err[0]
    assert not (tmp_path / "none").exists()
    names.write_text("liver: Liver\n")
    assert main(["--quiet", "organs", str(folder), "-o", str(tmp_path / "none"), "--formats", "rtstruct",
                 "--names", str(names)]) == 1
    assert "not a structure we write" in capsys.readouterr().err


def test_dicom_seg_read_back_and_overlaps_refused(tmp_path, capsys):
    """Our SEG placed back on the CT by segment codes equals the label map (also as evaluate's reference);
    a SEG whose segments overlap cannot be one label map: a one-line error naming the labels."""
    import highdicom as hd

    from segcore.dicom.names import SynonymTable
    from segcore.dicom.seg import _description, seg_labelmap

    folder, ct, labels = dicom_case(tmp_path / "ct", matrix=96, spacing=(1.5, 1.5, 3.0))
    _, files = _export(tmp_path, folder, ct, labels, formats=("dicom-seg", "nii.gz"))
    series = ct_series_for(ct, folder)
    back, notes = seg_labelmap(files["case_seg.dcm"], ct, series, SynonymTable())
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
    assert "segment 'femoral_head_right' -> 5 femoral_head_right" in notes

    assert main(["evaluate", str(files["case_seg.nii.gz"]), str(files["case_seg.dcm"]), "--ct", str(folder),
                 "--json", str(tmp_path / "m.json")]) == 0
    rows = read_json(tmp_path / "m.json")
    assert [r.label for r in rows] == [1, 2, 3, 4, 6] and all(r.dsc == 1.0 for r in rows)

    prostate = sitk.GetArrayFromImage(labels) == 1
    both = np.stack([prostate, prostate | (sitk.GetArrayFromImage(labels) == 2)], axis=-1).astype(np.uint8)
    overlapping = hd.seg.Segmentation(
        series.instances, both, hd.seg.SegmentationTypeValues.BINARY,
        [_description(1, TARGETS[0], Algorithm()), _description(2, TARGETS[1], Algorithm())],
        hd.UID(), 5, hd.UID(), 1, "test", "test", "0", "0")
    overlapping.save_as(tmp_path / "overlap.dcm")
    with pytest.raises(SegcoreError, match=r"segments overlap \(\d+ voxels, e.g. labels 1 and 2\)"):
        seg_labelmap(tmp_path / "overlap.dcm", ct, series, SynonymTable())
    capsys.readouterr()
    assert main(["evaluate", str(files["case_seg.nii.gz"]), str(tmp_path / "overlap.dcm"), "--ct", str(folder)]) == 1
    assert capsys.readouterr().err.strip().startswith("error: overlap.dcm: segments overlap")


@pytest.mark.parametrize("generation", ["SEMIAUTOMATIC", "MANUAL"])
def test_edited_or_manual_contours_say_so(tmp_path, generation):
    """A model's result edited by hand is SEMIAUTOMATIC, a hand-drawn one MANUAL (with no algorithm named
    in the SEG, as DICOM requires); both objects stay valid."""
    folder, _, labels = dicom_case(tmp_path / "ct", matrix=96, spacing=(2.0, 2.0, 3.0))
    out = export_labelmap(labels, TARGETS[:2], tmp_path / "out", "case_seg", ("rtstruct", "dicom-seg"),
                          source=folder, algorithm=Algorithm("organs-test-model", "1.2", generation))
    rtstruct, seg = sorted(out)
    assert {r.ROIGenerationAlgorithm for r in pydicom.dcmread(rtstruct).StructureSetROISequence} == {generation}
    segments = pydicom.dcmread(seg).SegmentSequence
    assert {s.SegmentAlgorithmType for s in segments} == {generation}
    assert all(("SegmentationAlgorithmIdentificationSequence" in s) == (generation != "MANUAL") for s in segments)
    assert dciodvfy_errors(rtstruct) == [] and dciodvfy_errors(seg) == []
    with pytest.raises(ValueError, match="generation must be"):
        Algorithm("m", "1", "automatic")


def test_phantom_as_a_clinic_would_send_it(tmp_path, caplog):
    """`prostateseg phantom --dicom`: each case also as a CT series with an RT Structure Set beside it,
    which segments as a DICOM input (the RTSTRUCT is not taken for a damaged file) and imports back to
    the phantom's own labels."""
    assert main(["--quiet", "phantom", str(tmp_path / "cases"), "-n", "1", "--size", "64", "--seed", "11",
                 "--dicom", "--orientation", "sagittal"]) == 0
    folder = tmp_path / "cases" / "case000_dicom"
    assert (folder / "RS.dcm").is_file() and len(list(folder.glob("CT*.dcm"))) > 10
    with caplog.at_level("WARNING", logger="segcore"):
        ct = read_image(folder)
    assert "damaged" not in caplog.text
    assert main(["--quiet", "dataset", "import", str(tmp_path / "cases"), str(tmp_path / "imported")]) == 0
    (labels_path,) = (tmp_path / "imported").glob("*_labels.nii.gz")
    imported = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))
    phantom = organ_labels(sitk.ReadImage(str(tmp_path / "cases" / "case000_labels.nii.gz")))
    expected = sitk.Resample(phantom, ct, sitk.Transform(), sitk.sitkNearestNeighbor)  # reordered, not resampled
    assert np.array_equal(imported, sitk.GetArrayFromImage(expected))
    assert main(["--quiet", "phantom", str(tmp_path / "cases"), "-n", "1", "--size", "64", "--seed", "11",
                 "--dicom"]) == 1  # existing cases are never replaced without --overwrite


def test_one_file_of_the_series_is_enough(tmp_path):
    """`source` may be any one file of the series (as a user may give one DICOM file as the input)."""
    folder, ct, labels = dicom_case(tmp_path / "ct", matrix=64, spacing=(2.0, 2.0, 3.0))
    one_file = sorted(folder.iterdir())[3]
    (rtstruct,) = export_labelmap(labels, TARGETS, tmp_path / "out", "x_seg", ("rtstruct",), source=one_file)
    assert rtstruct.name == "x_rtstruct.dcm"
    for roi in read_rtstruct(rtstruct).rois:
        assert np.array_equal(rasterise(roi, ct)[0], sitk.GetArrayFromImage(labels) == TG263[roi.name])


def test_non_ascii_roi_names_are_declared(tmp_path):
    folder, _, labels = dicom_case(tmp_path / "ct", matrix=64, spacing=(2.0, 2.0, 3.0))
    for path in folder.iterdir():  # a CT that declares no character set
        ds = pydicom.dcmread(path)
        del ds.SpecificCharacterSet
        ds.save_as(path)
    (rtstruct,) = export_labelmap(labels, TARGETS[:2], tmp_path / "out", "x", ("rtstruct",), source=folder,
                                  roi_names={"bladder": "Blase_ü"})
    ds = pydicom.dcmread(rtstruct)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and ds.StructureSetROISequence[1].ROIName == "Blase_ü"
    assert dciodvfy_errors(rtstruct) == []
