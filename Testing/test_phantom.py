"""segcore.phantom: anatomy in the right places, realistic values, any grid, deterministic."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from segcore import anatomy
from segcore.image import canonicalize, check_ct_like, check_volume, same_grid
from segcore.metrics import centroids
from segcore.phantom import ORIENTATIONS, make_phantom, write_phantoms

L = {s.name: s.value for s in anatomy.STRUCTURES}


def volume_cc(labels, value):
    return float((sitk.GetArrayViewFromImage(labels) == value).sum() * np.prod(labels.GetSpacing()) / 1000)


def test_same_seed_same_case_other_seed_other_case():
    a, b, c = make_phantom(5, matrix=64), make_phantom(5, matrix=64), make_phantom(6, matrix=64)
    assert np.array_equal(sitk.GetArrayViewFromImage(a.ct), sitk.GetArrayViewFromImage(b.ct))
    assert np.array_equal(sitk.GetArrayViewFromImage(a.labels), sitk.GetArrayViewFromImage(b.labels))
    assert a.info == b.info
    assert a.info["anatomy"]["prostate_cc"] != c.info["anatomy"]["prostate_cc"]


def test_target_organs_are_present_with_plausible_volumes(small_phantom):
    labels, info = small_phantom.labels, small_phantom.info["anatomy"]
    present = set(np.unique(sitk.GetArrayViewFromImage(labels)))
    for name in anatomy.TARGET_NAMES + ("hip_bone_left", "sacrum", "muscle", "fat", "skin"):
        assert L[name] in present, name
    # label volumes follow the drawn volumes (partial volume and bone give a little)
    assert volume_cc(labels, L["prostate"]) == pytest.approx(info["prostate_cc"], rel=0.25)
    assert volume_cc(labels, L["bladder"]) == pytest.approx(info["bladder_cc"], rel=0.25)
    assert 15 <= info["prostate_cc"] <= 80


def test_anatomical_relations_in_patient_space():
    """LPS: x to the patient's left, y posterior, z superior."""
    for seed in (1, 2, 3):
        case = make_phantom(seed, matrix=96)
        c = centroids(case.labels)
        prostate, bladder, rectum = c[L["prostate"]], c[L["bladder"]], c[L["rectum"]]
        assert bladder[2] > prostate[2] + 15  # bladder above the prostate
        assert rectum[1] > prostate[1] + 10  # rectum behind it
        assert c[L["femoral_head_left"]][0] > prostate[0] + 60 > c[L["femoral_head_right"]][0] + 120
        assert abs(c[L["femoral_head_left"]][2] - c[L["femoral_head_right"]][2]) < 1
        assert c[L["sacrum"]][1] > rectum[1]  # sacrum behind the rectum
        sv = c[L["seminal_vesicles"]]
        assert sv[2] > prostate[2] and sv[1] > prostate[1]  # above and behind the prostate


def test_hounsfield_units_per_tissue(small_phantom):
    ct, labels = sitk.GetArrayViewFromImage(small_phantom.ct), sitk.GetArrayViewFromImage(small_phantom.labels)
    hu = small_phantom.info["anatomy"]["hu"]

    def inner_median(value):
        mask = ndimage.binary_erosion(labels == value, iterations=1)
        return float(np.median(ct[mask]))

    assert inner_median(L["fat"]) == pytest.approx(hu["fat"], abs=15)
    assert inner_median(L["muscle"]) == pytest.approx(hu["muscle"], abs=15)
    assert inner_median(L["prostate"]) == pytest.approx(hu["prostate"], abs=15)
    assert inner_median(L["femoral_head_left"]) > 80
    assert np.median(ct[labels == 0]) < -900  # air around the patient
    # the prostate is only a little brighter or darker than muscle, as on real CT
    assert abs(hu["prostate"] - hu["muscle"]) < 30
    check_ct_like(small_phantom.ct)


def test_noise_level_matches_the_drawn_sigma():
    case = make_phantom(21, matrix=256, spacing=(1.8, 1.8, 2.0), orientation="LPS", implant=False)
    ct, labels = sitk.GetArrayViewFromImage(case.ct), sitk.GetArrayViewFromImage(case.labels)
    muscle = ndimage.binary_erosion(labels == L["muscle"], iterations=3)
    assert float(ct[muscle].std()) == pytest.approx(case.info["anatomy"]["noise_hu"], rel=0.35)


def test_implant_adds_metal_and_streaks():
    with_metal = make_phantom(4, matrix=128, implant=True, orientation="LPS")
    without = make_phantom(4, matrix=128, implant=False, orientation="LPS")
    assert (sitk.GetArrayViewFromImage(with_metal.labels) == L["metal_implant"]).any()
    assert sitk.GetArrayViewFromImage(with_metal.ct).max() == 3071
    assert not (sitk.GetArrayViewFromImage(without.labels) == L["metal_implant"]).any()
    soft = sitk.GetArrayViewFromImage(without.labels) == L["muscle"]
    diff = np.abs(sitk.GetArrayViewFromImage(with_metal.ct).astype(float) - sitk.GetArrayViewFromImage(without.ct))
    assert np.percentile(diff[soft], 99.9) > 50  # streaks change soft tissue near the metal


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_every_orientation_is_the_same_patient(orientation):
    """Stored in any orientation (or obliquely), the same seed puts the same
    organs at the same physical places."""
    reference = centroids(make_phantom(8, matrix=96, orientation="LPS").labels)
    for oblique in (False, True):
        case = make_phantom(8, matrix=96, orientation=orientation, oblique=oblique)
        check_volume(case.ct)
        assert same_grid(case.ct, case.labels)
        c = centroids(case.labels)
        voxel = max(case.ct.GetSpacing())
        for name in ("prostate", "bladder", "rectum", "femoral_head_left"):
            assert np.linalg.norm(np.subtract(c[L[name]], reference[L[name]])) < voxel, (name, oblique)
    direction = np.asarray(case.ct.GetDirection()).reshape(3, 3)
    if orientation != "LPS":
        assert not np.allclose(direction, np.eye(3))
    canonical, _ = canonicalize(case.ct)
    assert np.all(np.diag(np.asarray(canonical.GetDirection()).reshape(3, 3)) > 0.8)


def test_full_size_case_is_scanner_like():
    case = make_phantom(2, matrix=512)
    size, spacing = case.ct.GetSize(), case.ct.GetSpacing()
    in_plane = sorted(size)[-2:]
    assert in_plane == [512, 512]
    assert 0.75 <= min(spacing) <= 1.1 and max(spacing) <= 3.0
    assert 50 <= min(size) <= 300


def test_write_phantoms_layout(tmp_path):
    written = write_phantoms(tmp_path, 2, seed=3, matrix=64)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["case000_ct.nii.gz", "case000_info.json", "case000_labels.nii.gz",
                     "case001_ct.nii.gz", "case001_info.json", "case001_labels.nii.gz", "labels.json"]
    assert len(written) == 4
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert anatomy.structures_from_labels_json(labels) == list(anatomy.STRUCTURES)
    assert json.loads((tmp_path / "case001_info.json").read_text())["seed"] == 4
    ct = sitk.ReadImage(str(tmp_path / "case001_ct.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(make_phantom(4, matrix=64).ct))
    from segcore.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        write_phantoms(tmp_path, 1, seed=3, matrix=64)
