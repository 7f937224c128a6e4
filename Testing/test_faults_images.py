"""Bad image input (issue #14, the fault-injection run): every bad input is made here at test time.

Each one is refused through the command line (exit code 1, a line `error: ...` on stderr that names
the problem, no traceback, nothing already in the output folder changed) and through the Python API
(a `SegcoreError`). Only the mirrored grid reaches the model, and it is not segmented here: its
warning is given when the image is read.
"""

import gzip
import json
import shutil
import sys
from dataclasses import replace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_series import write_ct_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcore import errors, segment_prostate
from segcore.cli import main as cli
from segcore.image import MAX_GRID_VOXELS, centred_grid, check_grid, read_image
from segcore.pipeline import read_input
from segcore.prostate import PipelineSettings, crop_reference

LPS = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def pelvis_like(size=(48, 40, 20), spacing=(1.0, 1.0, 2.5), dtype=np.int16, seed=0):
    """A small CT-like volume (air, soft tissue, bone) that passes every input check."""
    rng = np.random.default_rng(seed)
    _k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    array = np.full(size[::-1], -1000.0)
    inside = ((i - size[0] / 2) / (size[0] / 2.5)) ** 2 + ((j - size[1] / 2) / (size[1] / 2.5)) ** 2 < 1
    array[inside] = 40
    array[inside & (np.abs(i - size[0] / 2) > size[0] / 4)] = 700
    image = sitk.GetImageFromArray((array + rng.normal(0, 10, array.shape)).astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, -15.0, -30.0))
    return image


def refused(tmp_path, capsys, bad, *phrases, error=errors.SegcoreError):
    """`bad` (a path) is refused by `prostateseg segment` and by `segment_prostate`, naming `phrases`."""
    out = tmp_path / "results"
    out.mkdir(exist_ok=True)
    (out / "earlier.txt").write_text("kept")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli(["-q", "segment", str(bad), "-o", str(out)]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    manifest = after.pop("manifest.jsonl", b"")  # the batch's record of the failure, nothing else
    assert after == before
    assert [json.loads(line)["status"] for line in manifest.splitlines()] in ([], ["failed"])
    with pytest.raises(error) as caught:
        segment_prostate(bad, device="cpu")
    for phrase in phrases:
        assert phrase in str(caught.value)
    return lines[0]


# --------------------------------------------------------------------------- 1. bounded work


def test_header_with_20mm_voxels_is_refused_before_any_resampling(tmp_path, capsys):
    bad = tmp_path / "ct.nrrd"
    sitk.WriteImage(pelvis_like(size=(120, 120, 30), spacing=(20.0, 20.0, 20.0)), str(bad))
    refused(tmp_path, capsys, bad, "2400 x 2400 x 600 mm", "spacing", error=errors.GeometryError)


def test_huge_crop_from_a_package_is_a_geometry_error():
    settings = replace(PipelineSettings(), crop_mm=(100000.0, 100000.0, 100000.0))
    with pytest.raises(errors.GeometryError, match="crop_mm"):
        crop_reference((0.0, 0.0, 0.0), settings)


@settings(max_examples=40, deadline=None)
@given(spacing=st.tuples(*[st.floats(0.01, 50.0)] * 3), size=st.tuples(*[st.integers(1, 10**7)] * 3))
def test_every_grid_is_bounded_before_it_is_allocated(spacing, size):
    volume = float(np.prod(np.asarray(size, float)))
    extent = max(n * s for n, s in zip(size, spacing))
    if volume > MAX_GRID_VOXELS or extent > 3000:
        with pytest.raises(errors.GeometryError, match="cannot resample onto a grid"):
            centred_grid((0, 0, 0), spacing, size)
    else:
        check_grid(spacing, size)


# --------------------------------------------------------------------------- 2. complex values


def test_complex_image_through_the_api():
    image = pelvis_like()
    complex_image = sitk.RealAndImaginaryToComplex(sitk.Cast(image, sitk.sitkFloat32),
                                                   sitk.Cast(image, sitk.sitkFloat32))
    with pytest.raises(errors.UnsupportedImageError, match="complex-valued"):
        segment_prostate(complex_image, device="cpu")


# --------------------------------------------------------------------------- 3. silent wrong results


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file_is_refused(tmp_path, capsys, suffix):
    bad = tmp_path / f"ct{suffix}"
    sitk.WriteImage(pelvis_like(), str(bad), useCompression=suffix != ".nii")
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    refused(tmp_path, capsys, bad, "incomplete", error=errors.UnreadableImageError)


def test_detached_data_file_cut_short(tmp_path, capsys):
    bad = tmp_path / "ct.nhdr"
    sitk.WriteImage(pelvis_like(), str(bad), useCompression=True)
    data_file = next(p for p in tmp_path.iterdir() if p.name != "ct.nhdr")
    data_file.write_bytes(data_file.read_bytes()[:-300])
    refused(tmp_path, capsys, bad, "incomplete", error=errors.UnreadableImageError)


def test_damaged_gzip_stream_is_refused(tmp_path, capsys):
    bad = tmp_path / "ct.nii.gz"
    sitk.WriteImage(pelvis_like(), str(bad))
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x10  # ITK reads such a file without a word, with wrong voxels
    bad.write_bytes(bytes(data))
    refused(tmp_path, capsys, bad, "incomplete or damaged", "CRC", error=errors.UnreadableImageError)


def test_nifti_longer_than_promised_is_read(tmp_path):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(pelvis_like(), str(path))
    with gzip.open(path, "ab") as f:  # some writers pad; extra bytes lose no voxel
        f.write(b"\0" * 64)
    assert read_image(path).GetSize() == (48, 40, 20)


def _two_stacks(folder, **second):
    """Two interleaved stacks (the second half a slice higher) written into one folder."""
    image = pelvis_like()
    write_ct_series(image, folder, series_uid="1.2.826.0.1.3680043.2.1125.9.1")
    other = pelvis_like(seed=1)
    other.SetOrigin((-20.0, -15.0, -28.75))
    write_ct_series(other, folder, series_uid="1.2.826.0.1.3680043.2.1125.9.1", prefix="b", **second)


@pytest.mark.parametrize("how", ["same study", "other study", "no SeriesInstanceUID"])
def test_interleaved_stacks_are_refused(tmp_path, capsys, how):
    folder = tmp_path / "series"
    _two_stacks(folder, **({} if how == "same study" else {"study_uid": "1.2.826.0.1.3680043.2.1125.2.42"}))
    if how == "no SeriesInstanceUID":
        for path in folder.iterdir():
            dataset = pydicom.dcmread(path)
            del dataset.SeriesInstanceUID
            dataset.save_as(path)
    phrase = "same instance number" if how == "same study" else "2 different studies"
    refused(tmp_path, capsys, folder, phrase, "Put each series in its own folder", error=errors.GeometryError)


def test_series_acquired_in_two_parts_is_one_volume(tmp_path):
    """Instance numbers restarting for a second part that continues the first are no second stack."""
    folder, image = tmp_path / "series", pelvis_like()
    uid = "1.2.826.0.1.3680043.2.1125.9.6"
    write_ct_series(image, folder, series_uid=uid, skip_slices=range(10, 20))
    write_ct_series(image, folder, series_uid=uid, skip_slices=range(10), prefix="b", first_instance=-9)
    read = read_image(folder)
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_interleaved_stacks_told_apart_by_their_content(tmp_path, capsys):
    folder = tmp_path / "series"
    write_ct_series(pelvis_like(), folder, series_uid="1.2.826.0.1.3680043.2.1125.9.5")
    # another scan of the same study, its body elsewhere in the field of view, half a slice higher
    other = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(pelvis_like(seed=1)), 17, axis=2))
    other.SetSpacing((1.0, 1.0, 2.5))
    other.SetOrigin((-20.0, -15.0, -28.75))
    write_ct_series(other, folder, series_uid="1.2.826.0.1.3680043.2.1125.9.5", prefix="b", first_instance=21)
    refused(tmp_path, capsys, folder, "every other slice looks like another scan", error=errors.GeometryError)


def test_left_handed_grid_is_named_in_the_result(small_phantom):
    from segcore.prostate import ProstateSegmenter

    segment = ProstateSegmenter(device="cpu")
    assert not any("left-handed" in m for m in segment(small_phantom.ct).messages)
    mirrored = sitk.Image(small_phantom.ct)
    direction = np.asarray(mirrored.GetDirection()).reshape(3, 3) @ np.diag([-1.0, 1.0, 1.0])
    mirrored.SetDirection(tuple(direction.ravel()))  # the header alone flipped: the anatomy is mirrored
    notes = [m for m in segment(mirrored).messages if "left-handed" in m]
    assert len(notes) == 1 and "check left and right" in notes[0]


# --------------------------------------------------------------------------- 4. messages that say what it is


def test_tiny_image_is_called_too_small(tmp_path, capsys):
    bad = tmp_path / "tiny.nii.gz"
    sitk.WriteImage(pelvis_like(size=(4, 4, 4)), str(bad))
    line = refused(tmp_path, capsys, bad, "too small to be a CT", error=errors.NotCTError)
    assert "MR" not in line


def test_label_map_given_as_ct(tmp_path, capsys):
    labels = sitk.Cast(pelvis_like() > 0, sitk.sitkUInt8) + sitk.Cast(pelvis_like() > 500, sitk.sitkUInt8)
    bad = tmp_path / "labels.nii.gz"
    sitk.WriteImage(labels, str(bad))
    line = refused(tmp_path, capsys, bad, "label map", "0, 1, 2", error=errors.NotCTError)
    assert "MR" not in line


def test_slicer_segmentation_given_as_ct(tmp_path, capsys):
    segmentation = sitk.Cast(pelvis_like() > 500, sitk.sitkUInt8)
    segmentation.SetMetaData("Segment0_ID", "prostate")
    segmentation.SetMetaData("Segment0_Name", "prostate")
    bad = tmp_path / "case.seg.nrrd"
    sitk.WriteImage(segmentation, str(bad), useCompression=True)
    line = refused(tmp_path, capsys, bad, "a Slicer segmentation", error=errors.UnsupportedImageError)
    assert "damaged" not in line
    renamed = tmp_path / "case.nrrd"  # the segment fields tell, whatever the name
    shutil.copy(bad, renamed)
    with pytest.raises(errors.UnsupportedImageError, match="Slicer segmentation"):
        read_image(renamed)
    assert read_image(renamed, kind="labels").GetSize() == segmentation.GetSize()  # fine as labels


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_damaged_dicom_file_is_named(tmp_path, capsys, keep):
    folder = tmp_path / "series"
    files = write_ct_series(pelvis_like(), folder)
    data = files[7].read_bytes()
    files[7].write_bytes(data[: int(len(data) * keep)])
    line = refused(tmp_path, capsys, folder, files[7].name, "damaged", error=errors.UnreadableImageError)
    assert "not evenly spaced" not in line


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_nan_voxels_are_refused_in_every_format(tmp_path, capsys, suffix):
    array = sitk.GetArrayFromImage(pelvis_like(dtype=np.float32))
    array[3, 5:9, 5:9] = np.nan
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.5))
    bad = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(bad))
    refused(tmp_path, capsys, bad, "16 voxel(s) hold NaN", error=errors.UnreadableImageError)
    with pytest.raises(errors.UnreadableImageError, match="NaN"):
        read_input(image)


def _scout(folder, series_uid):
    scout = pelvis_like(size=(48, 40, 1))
    scout.SetDirection((1, 0, 0, 0, 0, -1, 0, 1, 0))  # coronal
    write_ct_series(scout, folder, prefix="scout", series_uid=series_uid,
                    extra_tags={"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})


def test_scout_inside_the_series_is_named(tmp_path, capsys):
    folder = tmp_path / "series"
    write_ct_series(pelvis_like(), folder, series_uid="1.2.826.0.1.3680043.2.1125.9.2")
    _scout(folder, "1.2.826.0.1.3680043.2.1125.9.2")
    refused(tmp_path, capsys, folder, "scoutslice0000.dcm is a scout (localizer) image",
            error=errors.GeometryError)


def test_scout_in_its_own_series_is_left_aside(tmp_path):
    folder = tmp_path / "series"
    write_ct_series(pelvis_like(), folder, series_uid="1.2.826.0.1.3680043.2.1125.9.3")
    _scout(folder, "1.2.826.0.1.3680043.2.1125.9.4")
    assert read_image(folder).GetSize() == (48, 40, 20)


def test_library_warnings_stay_off_stderr(tmp_path, capfd):
    bad = tmp_path / "ct.mha"
    sitk.WriteImage(pelvis_like(), str(bad), useCompression=True)
    bad.write_bytes(bad.read_bytes()[:-500])
    capfd.readouterr()
    with pytest.raises(errors.UnreadableImageError, match="incomplete"):
        read_image(bad)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    print("still here", file=sys.stderr, flush=True)  # stderr is given back after reading
    assert capfd.readouterr().err == "still here\n"


# --------------------------------------------------------------------------- 5. header fuzzing

_DTYPES = [np.int16, np.uint16, np.int32, np.float32, np.float64, np.uint8]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spacing=st.tuples(*[st.floats(1e-3, 100.0)] * 3),
       angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
       mirror=st.booleans(),
       size=st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 12)),
       dtype=st.sampled_from(_DTYPES),
       suffix=st.sampled_from([".nrrd", ".nii.gz", ".mha"]))
def test_fuzzed_headers_give_an_image_or_a_clear_error(tmp_path, spacing, angles, mirror, size, dtype, suffix):
    image = pelvis_like(size=size, dtype=dtype)
    image.SetSpacing(spacing)
    rotation = sitk.Euler3DTransform((0, 0, 0), *angles).GetMatrix()
    direction = np.asarray(rotation).reshape(3, 3) * ([-1, 1, 1] if mirror else 1)
    image.SetDirection(direction.ravel().tolist())
    path = tmp_path / f"fuzz{suffix}"
    sitk.WriteImage(image, str(path))
    try:
        read = read_image(path)
    except errors.SegcoreError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
        return
    extent = np.asarray(read.GetSize()) * np.asarray(read.GetSpacing())
    assert min(read.GetSize()) >= 8 and np.all(extent <= 2500 * np.sqrt(3))
