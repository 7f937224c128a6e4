"""segcore.dataset: the training-case layout that training reads and phantoms, Slicer and imports write."""

import numpy as np
import pytest
import SimpleITK as sitk

from segcore import dataset
from segcore.errors import GeometryError, OutputExistsError, SegcoreError


def volume(value=0, spacing=(1.0, 1.0, 2.0), pixel=sitk.sitkInt16):
    image = sitk.Image([8, 7, 5], pixel)
    image.SetSpacing(spacing)
    image.SetOrigin((-4.0, 3.0, 10.0))
    return image + value


def test_written_cases_are_found_again_with_their_pairs(tmp_path):
    labels = sitk.Cast(volume(), sitk.sitkUInt8)
    labels[2, 3, 1] = 1
    dataset.write_training_case(volume(-1000), labels, tmp_path, "patient012")
    dataset.write_training_case(volume(40), labels, tmp_path, "patient003")
    (tmp_path / "notes.txt").write_text("not a case")
    cases = dataset.find_training_cases(tmp_path)
    assert [name for name, _, _ in cases] == ["patient003", "patient012"]
    _, ct_path, labels_path = cases[1]
    assert ct_path.name == "patient012_ct.nii.gz" and labels_path.name == "patient012_labels.nii.gz"
    back = sitk.ReadImage(str(labels_path))
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
    assert back.GetSpacing() == labels.GetSpacing() and back.GetOrigin() == labels.GetOrigin()


def test_a_case_may_mix_image_formats(tmp_path):
    sitk.WriteImage(volume(), str(tmp_path / "a_ct.mha"))
    sitk.WriteImage(sitk.Cast(volume(), sitk.sitkUInt8), str(tmp_path / "a_labels.nrrd"))
    assert dataset.find_training_cases(tmp_path) == [("a", tmp_path / "a_ct.mha", tmp_path / "a_labels.nrrd")]


def test_a_ct_without_labels_is_an_error_not_a_smaller_dataset(tmp_path):
    sitk.WriteImage(volume(), str(tmp_path / "lonely_ct.nii.gz"))
    with pytest.raises(SegcoreError, match="lonely_labels.nii.gz"):
        dataset.find_training_cases(tmp_path)
    with pytest.raises(SegcoreError, match="does not exist"):
        dataset.find_training_cases(tmp_path / "missing")


def test_labels_off_the_ct_grid_or_an_existing_case_are_refused(tmp_path):
    labels = sitk.Cast(volume(spacing=(1.0, 1.0, 3.0)), sitk.sitkUInt8)
    with pytest.raises(GeometryError, match="not on the CT's grid"):
        dataset.write_training_case(volume(), labels, tmp_path, "p1")
    assert list(tmp_path.iterdir()) == []
    good = sitk.Cast(volume(), sitk.sitkUInt8)
    dataset.write_training_case(volume(), good, tmp_path, "p1")
    with pytest.raises(OutputExistsError, match="already exists"):
        dataset.write_training_case(volume(5), good, tmp_path, "p1")
    dataset.write_training_case(volume(5), good, tmp_path, "p1", overwrite=True)
    assert sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / "p1_ct.nii.gz"))).max() == 5


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "c:d", 'e"f'])
def test_case_names_that_are_not_plain_file_names_are_refused(tmp_path, name):
    with pytest.raises(SegcoreError, match="invalid case name"):
        dataset.training_case_paths(tmp_path, name)
