"""segcore.pipeline: what every pipeline shares (settings from a package, input, normalisation)."""

from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from segcore.errors import ModelPackageError, NotCTError, SegcoreError
from segcore.organs import OrganSettings
from segcore.pipeline import normalise, read_input, settings_from_package, settings_to_json
from segcore.prostate import PipelineSettings


def package(pipeline, window=(-100.0, 200.0)):
    return SimpleNamespace(name="test-package", manifest={"pipeline": pipeline},
                           input=SimpleNamespace(intensity_window=list(window), spacing_mm=[1.0, 1.0, 1.0]))


@pytest.mark.parametrize("settings_class", [PipelineSettings, OrganSettings])
def test_package_settings_override_defaults_and_input_values_win(settings_class):
    field = "threshold" if settings_class is PipelineSettings else "score_threshold"
    settings = settings_from_package(settings_class, package({field: 0.7, "window": [0, 1]}), window=(-100.0, 200.0))
    assert getattr(settings, field) == 0.7
    assert settings.window == (-100.0, 200.0)  # the package's input block, not a stray pipeline key
    assert settings_from_package(settings_class, package({})) == settings_class()


@pytest.mark.parametrize("settings_class", [PipelineSettings, OrganSettings])
def test_an_unknown_package_setting_is_an_error_for_every_pipeline(settings_class):
    with pytest.raises(ModelPackageError, match=r"unknown 'pipeline' setting\(s\) 'attention_mode'"):
        settings_from_package(settings_class, package({"attention_mode": "new"}))


@pytest.mark.parametrize("pipeline, problem", [
    ({"crop_mm": 5}, "crop_mm"),                        # a size per axis, not one number
    ({"crop_mm": [128, 128]}, "crop_mm"),               # three axes
    ({"threshold": "0.5"}, "threshold"),                 # a number
    ({"coarse_slices": 5.5}, "coarse_slices"),          # a whole number
    ({"coarse_slices": True}, "coarse_slices"),
])
def test_a_badly_typed_setting_is_refused_with_its_name(pipeline, problem):
    with pytest.raises(ModelPackageError, match=f"test-package.*{problem}"):
        settings_from_package(PipelineSettings, package(pipeline))


def test_organ_classes_may_be_any_number_of_names():
    settings = settings_from_package(OrganSettings, package({"organ_classes": ["bladder", "rectum"]}))
    assert settings.organ_classes == ("bladder", "rectum")
    with pytest.raises(ModelPackageError, match="organ_classes"):
        settings_from_package(OrganSettings, package({"organ_classes": ["bladder", 3]}))


def test_settings_round_trip_through_json():
    settings = PipelineSettings(crop_mm=(144.0, 144.0, 176.0), crop_offset_mm=(0.0, 0.0, 24.0))
    stored = settings_to_json(settings)
    assert stored["crop_mm"] == [144.0, 144.0, 176.0]
    assert settings_from_package(PipelineSettings, package(stored)) == settings


def test_normalise_maps_the_window_onto_zero_to_one():
    out = normalise(np.array([-1000, -200, 50, 300, 3000], np.int16), (-200, 300))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_read_input_checks_images_and_refuses_other_objects():
    rng = np.random.default_rng(0)
    mr_like = sitk.GetImageFromArray(rng.integers(0, 900, (8, 16, 16)).astype(np.int16))
    with pytest.raises(NotCTError):
        read_input(mr_like)
    with pytest.raises(SegcoreError, match="expected a path or a SimpleITK image, got list"):
        read_input([1, 2, 3])
