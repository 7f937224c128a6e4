"""The bundled HF-UNet and HMEDN demo packages through the prostate pipeline: chosen by name, accuracy
on a held-out phantom, HMEDN's bladder and rectum, geometry under re-orientation, the real pelvic CT,
and a package whose labels do not fit its network."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from segcore import anatomy, packages
from segcore.errors import ModelPackageError
from segcore.metrics import mask_metrics
from segcore.phantom import make_phantom
from segcore.prostate import ProstateSegmenter, paste_back_classes

HELD_OUT_SEED = 9100   # the demo models trained on seeds 1000-1039 and validated on 5000-5003
MODELS = {"prostate-hfunet-demo": ["prostate"], "prostate-hmedn-demo": ["prostate", "bladder", "rectum"]}
FLOORS = {"prostate": 0.8, "bladder": 0.8, "rectum": 0.7}


@pytest.fixture(scope="module")
def case():
    return make_phantom(HELD_OUT_SEED, matrix=512, orientation="LPS")


@pytest.fixture(scope="module")
def segmenters():
    return {name: ProstateSegmenter(name, device="cpu") for name in MODELS}


def organ(image, name):
    return sitk.GetArrayViewFromImage(image) == anatomy.structure(name).value


@pytest.mark.parametrize("name", MODELS)
def test_bundled_package_says_what_it_is(name):
    package = packages.find_package(name)
    assert package.where == "bundled" and package.task == "prostate"
    assert "not validated on patient data" in package.description
    assert packages.verify_package(package.path).ok
    assert [s.name for s in package.labels] == MODELS[name]
    assert "prostate-metricunet-demo" in package.validation["stage1"]["from_package"]


@pytest.mark.parametrize("name", MODELS)
def test_segments_a_held_out_phantom(segmenters, case, name):
    result = segmenters[name](case.ct)
    assert [s.name for s in result.segments] == MODELS[name]
    assert result.labelmap.GetSize() == case.ct.GetSize() and result.model == name
    assert set(np.unique(sitk.GetArrayViewFromImage(result.labelmap))) <= {0} | {
        anatomy.structure(o).value for o in MODELS[name]}
    for organ_name in MODELS[name]:
        score = mask_metrics(organ(result.labelmap, organ_name), organ(case.labels, organ_name),
                             case.ct.GetSpacing()[::-1])
        assert score.dsc > FLOORS[organ_name], (organ_name, score)
    assert 0.5 < result.confidence <= 1.0


def test_hmedn_organs_are_the_same_whatever_the_storage_order(segmenters, case):
    segmenter = segmenters["prostate-hmedn-demo"]
    reference = segmenter(case.ct).labelmap
    permuted = sitk.PermuteAxes(sitk.Flip(case.ct, [True, True, True]), [1, 0, 2])
    result = segmenter(permuted).labelmap
    assert result.GetDirection() == permuted.GetDirection() and result.GetSize() == permuted.GetSize()
    back = sitk.Resample(result, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    for name in MODELS["prostate-hmedn-demo"]:
        agreement = mask_metrics(organ(back, name), organ(reference, name), reference.GetSpacing()[::-1])
        assert agreement.dsc > 0.95, (name, agreement)


def test_class_paste_back_lands_on_the_same_physical_voxels():
    reference = sitk.Image([20, 20, 20], sitk.sitkUInt8)
    reference.SetOrigin((-10.0, -10.0, -10.0))
    probabilities = np.zeros((3, 20, 20, 20), np.float32)
    probabilities[0] = 1.0
    probabilities[:, :, :, :5] = [[[[0.0]]], [[[1.0]]], [[[0.0]]]]   # class 1 at x < -5 (patient's right)
    probabilities[:, 15:] = [[[[0.1]]], [[[0.0]]], [[[0.9]]]]        # class 2 at z >= 5 (superior)
    target = sitk.Image([30, 30, 30], sitk.sitkInt16)
    target.SetOrigin((14.5, 14.5, -14.5))
    target.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))                # stored RAS-like: x and y flipped
    labels = paste_back_classes(probabilities, reference, target)
    # target index (i, j, k) lies at LPS (14.5 - i, 14.5 - j, k - 14.5)
    expected = {(24, 24, 14): 1,    # (-9.5, -9.5, -0.5): right of x = -5
                (10, 10, 22): 2,    # (4.5, 4.5, 7.5): above z = 5
                (12, 12, 14): 0,    # (2.5, 2.5, -0.5): background inside the crop
                (2, 20, 14): 0}     # (12.5, -5.5, -0.5): beyond the crop
    for (i, j, k), value in expected.items():
        assert labels[k, j, i] == value, (i, j, k)
    assert labels.shape == (30, 30, 30) and labels.dtype == np.uint8


@pytest.fixture(scope="module")
def real_ct(pelvis_ct_path, pelvis_labels_path):
    """Both models on the real pelvic CT, through the agreement evaluation: its summary, the label maps
    and the reference."""
    from training.evaluate_prostate import agreement

    reference = sitk.ReadImage(str(pelvis_labels_path))
    out, labelmaps = agreement(sitk.ReadImage(str(pelvis_ct_path)), reference, list(MODELS), "cpu", log=lambda _: None)
    return out, labelmaps, reference


def test_real_pelvic_ct(real_ct):
    """Each network's prostate lands where a prostate is; HMEDN's bladder matches the reference bladder.
    The prostate's centroid must lie below the bladder's; its lowest slice may be the bladder's lowest
    (HMEDN's is: it calls the scan's last four slices bladder, where the reference has none)."""
    from training.evaluate_prostate import TS_BLADDER, real_ct_plausibility

    _, labelmaps, reference = real_ct
    for name, labelmap in labelmaps.items():
        checks = real_ct_plausibility(labelmap, reference)
        assert checks["found"], name
        assert checks["centroid_lps_mm"][2] < checks["bladder_centroid_lps_mm"][2] - 20, (name, checks)
        assert checks["between_femoral_heads"] and checks["anterior_to_rectum"], (name, checks)
        if "bladder" in MODELS[name]:
            bladder = np.rint(sitk.GetArrayViewFromImage(reference)) == TS_BLADDER
            score = mask_metrics(organ(labelmap, "bladder"), bladder, reference.GetSpacing()[::-1])
            assert score.dsc > 0.5, score


def test_agreement_between_models_on_the_real_ct(real_ct, pelvis_ct_path, tmp_path):
    """The agreement summary is the models' own pairwise DSC, volumes and lowest confidence; its
    picture draws every model's prostate."""
    from training.evaluate_prostate import draw_real_ct

    out, labelmaps, reference = real_ct
    (a, b) = MODELS
    spacing = reference.GetSpacing()[::-1]
    expected = mask_metrics(organ(labelmaps[a], "prostate"), organ(labelmaps[b], "prostate"), spacing).dsc
    assert out["pairwise_dsc"] == {f"{a} / {b}": pytest.approx(expected, abs=1e-9)}
    assert out["min_pairwise_dsc"] == pytest.approx(expected, abs=1e-9)
    assert out["min_confidence"] == min(row["confidence"] for row in out["models"].values())
    # The two networks outline much the same prostate (README: pairwise DSC 0.62 for the models trained on the
    # lifted phantom, 0.73 for the ones before; issue 17's target is 0.7, and 0.03-0.05 is disagreement)
    assert out["min_pairwise_dsc"] >= 0.55
    for name, row in out["models"].items():
        voxels = int(organ(labelmaps[name], "prostate").sum())
        assert row["volume_cc"] == pytest.approx(voxels * np.prod(spacing) / 1000)
    picture = tmp_path / "agree.png"
    draw_real_ct(sitk.ReadImage(str(pelvis_ct_path)), labelmaps, reference, picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 20_000


def test_pairwise_dsc_of_prostates():
    """Overlap of the prostate label only; two empty predictions are no agreement."""
    from training.evaluate_prostate import pairwise_dsc

    prostate, bladder = anatomy.structure("prostate").value, anatomy.structure("bladder").value

    def image(box, value=prostate):
        a = np.zeros((10, 10, 10), np.uint8)
        a[box] = value
        return sitk.GetImageFromArray(a)

    maps = {"a": image(np.s_[0:4, 0:5, 0:5]), "b": image(np.s_[2:4, 0:5, 0:5]),
            "c": image(np.s_[0:4, 0:5, 0:5], value=bladder)}
    assert pairwise_dsc(maps) == {"a / b": pytest.approx(2 * 50 / 150), "a / c": 0.0, "b / c": 0.0}
    assert pairwise_dsc({"x": maps["c"], "y": maps["c"]}) == {"x / y": 0.0}


def test_labels_that_do_not_fit_the_network_are_named(tmp_path):
    copy = tmp_path / "wrong-labels"
    shutil.copytree(packages.find_package("prostate-hmedn-demo").path, copy)
    manifest = json.loads((copy / "model.json").read_text())
    manifest["labels"] = manifest["labels"][:2]
    (copy / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelPackageError, match="predicts 4 classes"):
        ProstateSegmenter(copy, device="cpu")
