"""The phantom as Slicer Sample Data (ProstateSegLib.sampledata), as far as it runs without the application.

Making the files and turning them into a CT volume node and a reference
segmentation run here on real MRML (slicer-core); the Sample Data module itself
is Slicer's, so registering is checked against a stand-in that records the call
and against the parameters of Slicer's own ``registerCustomSampleDataSource``.
The whole path through Sample Data's button is ProstateSegTest.test_SampleData,
run inside Slicer.
"""

import contextlib
import functools
import subprocess
import sys
import types

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, load_volume

sys.path.insert(0, str(ROOT / "ProstateSeg"))

from ProstateSegLib import sampledata
from segcore import anatomy
from segcore.phantom import make_phantom

SEED, MATRIX = sampledata.SEED, 64  # the sample's phantom, on a small grid for speed

# The keyword parameters of SampleData.SampleDataLogic.registerCustomSampleDataSource (Slicer 5.x).
REGISTER_PARAMETERS = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                       "thumbnailFileName", "loadFileTypes", "loadFiles", "loadFileProperties", "checksums",
                       "loadFileType"}


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(SEED, matrix=MATRIX)


@pytest.fixture
def sample_files(tmp_path):
    return sampledata.makeSampleFiles(tmp_path / "cache", seed=SEED, matrix=MATRIX)


def test_files_are_the_phantom_made_once(tmp_path, phantom, sample_files):
    ct_path, labels_path = sample_files
    assert (ct_path.name, labels_path.name) == (sampledata.CT_FILE, sampledata.LABELS_FILE)
    for path, image in ((ct_path, phantom.ct), (labels_path, phantom.labels)):
        written = sitk.ReadImage(str(path))
        assert np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image))
        assert written.GetPixelID() == image.GetPixelID()
        assert np.allclose(written.GetDirection(), image.GetDirection())
        assert np.allclose(written.GetOrigin(), image.GetOrigin()) and np.allclose(written.GetSpacing(), image.GetSpacing())

    made_at = [p.stat().st_mtime_ns for p in sample_files]
    assert sampledata.makeSampleFiles(ct_path.parent, seed=SEED, matrix=MATRIX) == sample_files
    assert [p.stat().st_mtime_ns for p in sample_files] == made_at  # reused, not made again

    labels_path.unlink()  # one file lost: both are made again, so they stay a pair
    sampledata.makeSampleFiles(ct_path.parent, seed=SEED, matrix=MATRIX)
    assert labels_path.is_file() and ct_path.stat().st_mtime_ns >= made_at[0]
    assert sorted(p.name for p in ct_path.parent.iterdir()) == sorted([sampledata.CT_FILE, sampledata.LABELS_FILE])


def test_reference_structures_are_the_target_organs_present(phantom):
    names = [s.name for s in sampledata.referenceStructures(phantom.labels)]
    assert names == list(anatomy.TARGET_NAMES)
    only_prostate = sitk.Cast(phantom.labels == 1, sitk.sitkUInt8)
    assert [s.name for s in sampledata.referenceStructures(only_prostate)] == ["prostate"]


def test_reference_segmentation_holds_the_organs_on_the_ct_grid(mrml_scene, phantom, sample_files):
    import slicer
    import vtk

    from segcore import mrml

    ct_path, labels_path = sample_files
    volume = load_volume(mrml_scene, ct_path, sampledata.CT_NODE_NAME)
    node = sampledata.referenceSegmentation(volume, labels_path)
    assert node.GetName() == sampledata.REFERENCE_NODE_NAME and node.GetScene() is mrml_scene
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == list(anatomy.TARGET_NAMES)
    assert segmentation.ContainsRepresentation("Closed surface")
    prostate = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("prostate"))
    tag = vtk.reference("")
    assert prostate.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), tag)
    assert str(tag) == anatomy.terminology_entry(anatomy.structure("prostate"))

    exported = sitk.GetArrayFromImage(mrml.segmentation_node_to_labelmap(node, volume))
    reference = sitk.GetArrayFromImage(phantom.labels)
    expected = np.where(np.isin(reference, [anatomy.structure(n).value for n in anatomy.TARGET_NAMES]), reference, 0)
    assert np.array_equal(exported, expected)


def test_load_phantom_sample_makes_then_loads(mrml_scene, tmp_path, monkeypatch):
    """The Sample Data button's function, with the application's volume loading and error box
    replaced by the Volumes logic and nothing."""
    import slicer

    cache = tmp_path / "cache"
    monkeypatch.setattr(sampledata, "cacheFolder", lambda: cache)
    monkeypatch.setattr(sampledata, "makeSampleFiles", functools.partial(sampledata.makeSampleFiles, matrix=MATRIX))
    monkeypatch.setattr(slicer.util, "loadVolume", lambda path, properties: load_volume(mrml_scene, path, properties["name"]))
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", lambda *args, **kwargs: contextlib.nullcontext())

    volume, reference = sampledata.loadPhantomSample(source=object())
    assert volume.GetName() == sampledata.CT_NODE_NAME and volume.IsA("vtkMRMLScalarVolumeNode")
    assert reference.GetSegmentation().GetNumberOfSegments() == len(anatomy.TARGET_NAMES)
    assert sorted(p.name for p in cache.iterdir()) == sorted([sampledata.CT_FILE, sampledata.LABELS_FILE])
    assert mrml_scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 1


def test_registering_lists_the_phantom_and_makes_nothing(tmp_path, monkeypatch):
    calls = []

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataCategory(category, title):
            calls.append(("category", category, title))

        @staticmethod
        def registerCustomSampleDataSource(**kwargs):
            calls.append(("source", kwargs))

    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=SampleDataLogic))
    cache = tmp_path / "cache"
    monkeypatch.setattr(sampledata, "cacheFolder", lambda: cache)
    sampledata.registerSampleData()

    assert calls[0] == ("category", "ProstateSeg", "ProstateSeg")
    kwargs = calls[1][1]
    assert set(kwargs) <= REGISTER_PARAMETERS
    assert kwargs["category"] == "ProstateSeg" and kwargs["sampleName"] == sampledata.SAMPLE_NAME
    assert kwargs["customDownloader"] is sampledata.loadPhantomSample
    assert kwargs["fileNames"] == [sampledata.CT_FILE, sampledata.LABELS_FILE]
    assert kwargs["uris"] == [(cache / name).as_uri() for name in kwargs["fileNames"]]
    lengths = {len(kwargs[key]) for key in ("uris", "fileNames", "nodeNames", "loadFiles", "loadFileTypes")}
    assert lengths == {2}  # Sample Data requires one entry per file in each list
    thumbnail = sitk.ReadImage(kwargs["thumbnailFileName"])
    assert thumbnail.GetNumberOfComponentsPerPixel() == 3 and 200 <= thumbnail.GetWidth() <= 300
    assert not cache.exists()  # nothing is made until the data set is clicked


def test_older_slicer_without_category_titles(monkeypatch, tmp_path):
    sources = []
    logic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kwargs: sources.append(kwargs))
    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=logic))
    monkeypatch.setattr(sampledata, "cacheFolder", lambda: tmp_path)
    sampledata.registerSampleData()
    assert len(sources) == 1


def test_importing_and_registering_compute_nothing():
    code = ("import sys, types; sys.path.insert(0, 'ProstateSeg'); from ProstateSegLib import sampledata; "
            "from pathlib import Path; sampledata.cacheFolder = lambda: Path.cwd() / 'unused'; "
            "log = types.SimpleNamespace(registerCustomSampleDataSource=lambda **k: None); "
            "sys.modules['SampleData'] = types.SimpleNamespace(SampleDataLogic=log); sampledata.registerSampleData(); "
            "print(sorted({'numpy', 'SimpleITK', 'scipy', 'segcore.phantom', 'slicer'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
