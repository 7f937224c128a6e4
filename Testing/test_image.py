"""segcore.image: reading every supported input, clear errors for bad input, real data geometry."""

import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_series import write_ct_series

from segcore import errors
from segcore.image import (
    as_labelmap,
    canonicalize,
    read_image,
    restore_orientation,
    same_grid,
    write_image,
)
from segcore.metrics import centroids

BLADDER = 104


def ct_like(size=(20, 18, 12), spacing=(0.8, 0.9, 2.5), seed=0):
    """A small CT-like volume: air around a water cylinder with a bone spot."""
    rng = np.random.default_rng(seed)
    _k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    array = np.full(size[::-1], -1000, np.int16)
    inside = (i - size[0] / 2) ** 2 + (j - size[1] / 2) ** 2 < (min(size[:2]) / 2.5) ** 2
    array[inside] = 40
    array[inside & (i < 6)] = 700
    array = (array + rng.normal(0, 10, array.shape)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-12.5, 30.25, -100.0))
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_volume_formats_keep_values_and_geometry(tmp_path, suffix):
    image = ct_like()
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    read = read_image(path)
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))
    assert same_grid(read, image, tolerance_mm=1e-4)


def test_write_image_is_atomic_and_refuses_to_overwrite(tmp_path):
    image = ct_like()
    path = write_image(image, tmp_path / "out.nii.gz")
    before = path.read_bytes()
    with pytest.raises(errors.OutputExistsError, match="overwrite"):
        write_image(ct_like(seed=1), path)
    assert path.read_bytes() == before
    write_image(ct_like(seed=1), path, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]  # no temporary left behind


def test_missing_file(tmp_path):
    with pytest.raises(errors.InputNotFoundError, match="no such file"):
        read_image(tmp_path / "nothing.nii.gz")


@pytest.mark.parametrize("name", ["broken.nii.gz", "broken.nrrd", "notes.txt"])
def test_corrupt_or_unknown_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image" * 10)
    with pytest.raises(errors.UnreadableImageError, match="cannot read"):
        read_image(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct_like(), str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(errors.UnreadableImageError):
        read_image(path)


def test_empty_folder_and_folder_without_dicom(tmp_path):
    with pytest.raises(errors.UnreadableImageError, match="empty"):
        read_image(tmp_path)
    sitk.WriteImage(ct_like(), str(tmp_path / "ct.nii.gz"))
    with pytest.raises(errors.UnreadableImageError, match="give one of them"):
        read_image(tmp_path)


def test_2d_4d_and_vector_images_are_refused(tmp_path):
    sitk.WriteImage(sitk.Image([30, 30], sitk.sitkInt16), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(errors.UnsupportedImageError, match="2-D"):
        read_image(tmp_path / "slice.nii.gz")
    sitk.WriteImage(sitk.Image([10, 10, 10, 3], sitk.sitkInt16), str(tmp_path / "time.nii.gz"))
    with pytest.raises(errors.UnsupportedImageError, match="4-D"):
        read_image(tmp_path / "time.nii.gz")
    sitk.WriteImage(sitk.Image([10, 10, 10], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(errors.UnsupportedImageError, match="vector"):
        read_image(tmp_path / "rgb.nrrd")


def test_mr_like_intensities_are_refused(tmp_path):
    mr = sitk.Cast(sitk.RescaleIntensity(ct_like(size=(60, 60, 20)), 0, 1200), sitk.sitkInt16)
    sitk.WriteImage(mr, str(tmp_path / "t2.nii.gz"))
    with pytest.raises(errors.NotCTError, match="Hounsfield"):
        read_image(tmp_path / "t2.nii.gz")
    # the same file is fine when any intensities are allowed
    assert read_image(tmp_path / "t2.nii.gz", kind="any").GetSize() == mr.GetSize()


@pytest.mark.parametrize("spacing", [(0.001, 0.001, 0.002), (0.8, 0.8, 250.0)])
def test_absurd_spacing_is_refused(tmp_path, spacing):
    image = ct_like()
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    with pytest.raises(errors.GeometryError, match="spacing"):
        read_image(tmp_path / "ct.nii.gz")


def test_absurd_size_is_refused(tmp_path):
    sitk.WriteImage(ct_like(size=(20, 18, 2)), str(tmp_path / "thin.nii.gz"))
    with pytest.raises(errors.GeometryError, match="size"):
        read_image(tmp_path / "thin.nii.gz")


def test_labelmaps_are_cast_and_checked(tmp_path):
    labels = sitk.GetImageFromArray(np.array([[[0, 1], [2, 300]]] * 4, np.float64))
    assert as_labelmap(labels).GetPixelID() == sitk.sitkUInt16
    fractional = sitk.GetImageFromArray(np.full((4, 4, 4), 0.5))
    with pytest.raises(errors.UnsupportedImageError, match="fractional"):
        as_labelmap(fractional)


# ----------------------------------------------------------------------------- DICOM


def test_real_dicom_series_geometry(abdomen_dicom, shared_data):
    """The 20 real slices read as one volume with the documented grid, and
    line up with their label map voxel for voxel (liver and spleen HU)."""
    ct = read_image(abdomen_dicom)
    assert ct.GetSize() == (512, 512, 20)
    assert np.allclose(ct.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    assert np.allclose(ct.GetDirection(), np.eye(3).ravel())  # slices sorted along +z whatever the names
    labels = read_image(shared_data / "real" / "abdomen_dicom_seg.nii.gz", kind="labels")
    ct_c, _ = canonicalize(ct)
    labels_c, _ = canonicalize(labels)
    assert same_grid(ct_c, labels_c, tolerance_mm=0.01)
    hu, lab = sitk.GetArrayFromImage(ct_c), sitk.GetArrayFromImage(labels_c)
    assert 40 < np.median(hu[lab == 5]) < 150  # liver (contrast-enhanced)
    assert 40 < np.median(hu[lab == 1]) < 150  # spleen
    assert np.median(hu[lab == 32]) > 150  # vertebra


def test_single_dicom_file_reads_its_whole_series(abdomen_dicom, caplog):
    one = sorted(abdomen_dicom.iterdir())[7]
    with caplog.at_level(logging.INFO, logger="segcore"):
        ct = read_image(one)
    assert ct.GetSize() == (512, 512, 20)
    assert "whole series" in caplog.text


def test_lonely_dicom_file_is_one_slice(abdomen_dicom, tmp_path):
    one = sorted(abdomen_dicom.iterdir())[7]
    shutil.copy(one, tmp_path / "only")
    with pytest.raises(errors.SegcoreError):
        read_image(tmp_path / "only")


def test_largest_ct_series_is_picked_and_named(tmp_path, caplog):
    big, small = ct_like(size=(20, 18, 12)), ct_like(size=(20, 18, 6), seed=3)
    write_ct_series(big, tmp_path, series_uid="1.2.3.4.100")
    write_ct_series(small, tmp_path / "x", series_uid="1.2.3.4.200")
    for f in (tmp_path / "x").iterdir():
        f.rename(tmp_path / ("b" + f.name))
    write_ct_series(ct_like(size=(20, 18, 30)), tmp_path / "y", series_uid="1.2.3.4.300", modality="MR")
    for f in (tmp_path / "y").iterdir():
        f.rename(tmp_path / ("c" + f.name))
    with caplog.at_level(logging.INFO, logger="segcore"):
        ct = read_image(tmp_path)
    assert ct.GetSize() == (20, 18, 12)
    assert "3 series" in caplog.text and "1.2.3.4.100" in caplog.text


def test_folder_without_ct_series(tmp_path):
    write_ct_series(ct_like(), tmp_path, modality="MR")
    with pytest.raises(errors.NotCTError, match="MR"):
        read_image(tmp_path)


def test_series_with_a_missing_slice_is_refused(tmp_path):
    write_ct_series(ct_like(), tmp_path, skip_slices={5})
    with pytest.raises(errors.GeometryError, match="evenly spaced"):
        read_image(tmp_path)


# ----------------------------------------------------------------------------- the real pelvic CT


def test_real_pelvic_ct_geometry(pelvis_ct_path, pelvis_labels_path):
    ct = read_image(pelvis_ct_path)
    assert ct.GetSize() == (122, 101, 112)
    assert np.allclose(ct.GetSpacing(), (3.0, 3.0, 3.0))
    assert np.allclose(ct.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1))  # stored RAS
    labels = read_image(pelvis_labels_path, kind="labels")
    assert labels.GetPixelID() == sitk.sitkUInt8 and same_grid(ct, labels)
    hu, lab = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(labels)
    assert -10 < np.median(hu[lab == BLADDER]) < 40  # urine
    # LPS: the left femur (88) lies at larger x than the right (89), the bladder anterior (smaller y) of the sacrum
    c = centroids(labels)
    assert c[88][0] > c[89][0]
    assert c[BLADDER][1] < c[92][1]


def _reoriented_copies(image):
    """The same physical image stored differently, made with ITK's own filters."""
    yield "flip x", sitk.Flip(image, [True, False, False], flipAboutOrigin=False)
    yield "flip y z", sitk.Flip(image, [False, True, True], flipAboutOrigin=False)
    yield "permute", sitk.PermuteAxes(image, [2, 0, 1])
    yield "permute+flip", sitk.Flip(sitk.PermuteAxes(image, [1, 2, 0]), [True, False, True], flipAboutOrigin=False)


def test_reoriented_pelvic_ct_lands_on_the_same_anatomy(pelvis_ct_path, pelvis_labels_path, tmp_path):
    """Flipped and permuted copies (NIfTI and NRRD on disk) canonicalise to the
    very same voxels, and the bladder keeps its physical centroid after
    read -> canonicalise -> back."""
    ct = read_image(pelvis_ct_path)
    labels = read_image(pelvis_labels_path, kind="labels")
    reference_canonical = sitk.GetArrayFromImage(canonicalize(ct)[0])
    bladder = centroids(labels)[BLADDER]
    for n, ((name, ct_copy), (_, labels_copy)) in enumerate(zip(_reoriented_copies(ct), _reoriented_copies(labels))):
        suffix = ".nrrd" if n % 2 else ".nii.gz"
        write_image(ct_copy, tmp_path / f"ct{n}{suffix}")
        write_image(labels_copy, tmp_path / f"labels{n}{suffix}")
        ct_read = read_image(tmp_path / f"ct{n}{suffix}")
        labels_read = read_image(tmp_path / f"labels{n}{suffix}", kind="labels")
        ct_canonical, _orientation = canonicalize(ct_read)
        assert np.array_equal(sitk.GetArrayFromImage(ct_canonical), reference_canonical), name
        labels_canonical, label_orientation = canonicalize(labels_read)
        assert centroids(labels_canonical)[BLADDER] == pytest.approx(bladder, abs=1e-3), name
        back = restore_orientation(labels_canonical, label_orientation)
        assert same_grid(back, labels_read) and np.array_equal(
            sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels_read)), name
        assert centroids(back)[BLADDER] == pytest.approx(bladder, abs=1e-3), name


@pytest.mark.parametrize("flip_z", [False, True])
def test_pelvic_ct_as_shuffled_dicom_series(pelvis_ct_path, pelvis_labels_path, tmp_path, flip_z):
    """Written as a DICOM series with shuffled file names (and, once, slices
    stored head first), the CT reads back on the same physical grid, so the
    reference bladder label sits on the same anatomy."""
    ct = read_image(pelvis_ct_path)
    labels = read_image(pelvis_labels_path, kind="labels")
    source = sitk.Flip(ct, [False, False, True], flipAboutOrigin=False) if flip_z else ct
    write_ct_series(source, tmp_path / "series", shuffle_seed=4)
    ct_read = read_image(tmp_path / "series")
    canonical_read, _ = canonicalize(ct_read)
    canonical_ref, _ = canonicalize(ct)
    assert same_grid(canonical_read, canonical_ref, tolerance_mm=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(canonical_read), sitk.GetArrayFromImage(canonical_ref))
    # the reference bladder mapped onto the DICOM grid keeps its centroid
    from segcore.image import resample_like

    on_dicom_grid = resample_like(labels, ct_read, "nearest")
    assert centroids(on_dicom_grid)[BLADDER] == pytest.approx(centroids(labels)[BLADDER], abs=1e-3)
