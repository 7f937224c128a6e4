"""segcore.pipeline: what every pipeline shares: settings from a package (one rule, kept by the package schema),
input checks, normalisation."""

import json
import shutil
from dataclasses import fields, replace
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from segcore import packages
from segcore.errors import ModelPackageError, NotCTError, SegcoreError
from segcore.organs import OrganSegmenter, OrganSettings
from segcore.pipeline import normalise, read_input, settings_from_package, settings_to_json
from segcore.prostate import PipelineSettings, ProstateSegmenter
from segcore.refinement import Refiner, RefineSettings

BUNDLED = {"prostate": "prostate-metricunet-demo", "organs": "organs-hmrnet-demo", "refine": "refine-demo"}
SETTINGS = {"prostate": (PipelineSettings, ProstateSegmenter), "organs": (OrganSettings, OrganSegmenter),
            "refine": (RefineSettings, Refiner)}


def manifest(task, pipeline):
    """A bundled package's manifest with its ``pipeline`` block replaced."""
    data = packages.read_manifest(packages.bundled_models_dir() / BUNDLED[task])
    return {**data, "pipeline": pipeline}


def input_spec(data):
    spec = data["input"]
    return packages.InputSpec(tuple(spec["spacing_mm"]), tuple(spec["intensity_window"]), spec["normalisation"])


def settings_of(task, pipeline):
    """The settings a package with this ``pipeline`` block gives, after the checks opening it makes."""
    data = manifest(task, pipeline)
    packages.validate_manifest(data)
    settings_class, segmenter = SETTINGS[task]
    package = SimpleNamespace(manifest=data, input=input_spec(data))
    return settings_from_package(settings_class, package, **segmenter.input_settings(package))


@pytest.mark.parametrize("task", ["prostate", "organs", "refine"])
def test_the_schema_lists_exactly_the_settings_a_package_may_set(task):
    """Adding a setting to a pipeline without describing it in the schema (or the reverse) fails here."""
    schema = packages.manifest_schema()["$defs"][f"{task}_pipeline"]
    settings_class, segmenter = SETTINGS[task]
    from_input = segmenter.input_settings(SimpleNamespace(input=input_spec(manifest(task, {}))))
    assert set(schema["properties"]) == set(schema["propertyNames"]["enum"])
    assert set(schema["properties"]) | set(from_input) == {f.name for f in fields(settings_class)}
    assert not set(schema["properties"]) & set(from_input)  # the input block alone sets those


@pytest.mark.parametrize("task, key, value", [("prostate", "threshold", 0.7), ("organs", "score_threshold", 0.7),
                                               ("prostate", "crop_mm", [144, 144, 176]),
                                               ("organs", "organ_classes", ["bladder", "rectum"])])
def test_package_settings_override_defaults_and_the_input_block_sets_the_window(task, key, value):
    settings = settings_of(task, {key: value})
    assert getattr(settings, key) == (tuple(value) if isinstance(value, list) else value)
    assert settings.window == tuple(manifest(task, {})["input"]["intensity_window"])
    assert settings_of(task, {}) == replace(SETTINGS[task][0](), **{
        k: v for k, v in vars(settings_of(task, {})).items() if k in ("window", "fine_spacing_mm")})


@pytest.mark.parametrize("task, pipeline, problem", [
    ("prostate", {"attention_mode": "new"}, "has the key \"attention_mode\""),   # unknown: refused
    ("prostate", {"window": [0, 100]}, "has the key \"window\""),               # belongs to 'input'
    ("organs", {"crop_mm": [1, 2, 3]}, "has the key \"crop_mm\""),             # another task's setting
    ("prostate", {"crop_mm": 5}, "pipeline.crop_mm is 5"),                      # a size per axis
    ("prostate", {"crop_mm": [128, 128]}, "pipeline.crop_mm"),                  # three axes
    ("prostate", {"threshold": "0.5"}, "pipeline.threshold"),                   # a number
    ("prostate", {"coarse_slices": 5.5}, "pipeline.coarse_slices"),             # a whole number
    ("prostate", {"coarse_slices": True}, "pipeline.coarse_slices"),
    ("organs", {"organ_classes": ["bladder", 3]}, "pipeline.organ_classes"),
    ("organs", 5, "field 'pipeline' is 5"),
])
def test_a_setting_this_version_cannot_use_refuses_the_package_with_its_name(task, pipeline, problem):
    with pytest.raises(ModelPackageError, match=problem):
        packages.validate_manifest(manifest(task, pipeline))


def test_opening_a_package_with_an_unknown_setting_fails_before_any_work(tmp_path):
    folder = tmp_path / "future-prostate"
    shutil.copytree(packages.bundled_models_dir() / BUNDLED["prostate"], folder)
    data = manifest("prostate", {"attention_mode": "new"})
    (folder / "model.json").write_text(json.dumps({**data, "name": "future-prostate"}))
    with pytest.raises(ModelPackageError, match="attention_mode"):
        ProstateSegmenter(str(folder), device="cpu")
    assert not packages.verify_package(folder).ok


def test_settings_round_trip_through_json():
    settings = PipelineSettings(crop_mm=(144.0, 144.0, 176.0), crop_offset_mm=(0.0, 0.0, 24.0))
    stored = {k: v for k, v in settings_to_json(settings).items() if k not in ("window", "fine_spacing_mm")}
    assert stored["crop_mm"] == [144.0, 144.0, 176.0]
    assert settings_of("prostate", stored) == replace(settings, window=(-200.0, 300.0))


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
