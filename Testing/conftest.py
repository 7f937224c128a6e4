"""Shared fixtures: the real CT data beside the project, and small phantoms."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def own_prostateseg_home(tmp_path_factory):
    """The tests' own PROSTATESEG_HOME: installs and the package-check cache never touch the user's folder
    (subprocesses inherit it). Tests that need another home set it themselves."""
    previous = os.environ.get("PROSTATESEG_HOME")
    os.environ["PROSTATESEG_HOME"] = str(tmp_path_factory.mktemp("prostateseg-home"))
    yield
    if previous is None:
        os.environ.pop("PROSTATESEG_HOME", None)
    else:
        os.environ["PROSTATESEG_HOME"] = previous


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: skipped when absent, a failure when PROSTATESEG_REQUIRE_SHARED_DATA=1 (CI)."""
    if not (SHARED_DATA / "real").is_dir():
        if os.environ.get("PROSTATESEG_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"shared test data not found at {SHARED_DATA} (PROSTATESEG_REQUIRE_SHARED_DATA=1)")
        pytest.skip("shared test data (../shared/data) not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def pelvis_ct_path(shared_data) -> Path:
    return shared_data / "real" / "pelvis_ct" / "example_ct.nii.gz"


@pytest.fixture(scope="session")
def pelvis_labels_path(shared_data) -> Path:
    return shared_data / "real" / "pelvis_ct" / "example_seg_v1.nii.gz"


@pytest.fixture(scope="session")
def abdomen_dicom(shared_data) -> Path:
    return shared_data / "real" / "abdomen_dicom"


@pytest.fixture(scope="session")
def small_phantom():
    from segcore.phantom import make_phantom

    return make_phantom(11, matrix=96, orientation="LPS")


@pytest.fixture
def mrml_scene():
    """A fresh MRML scene with the module logics Slicer sets up at start-up (slicer-core, no Qt)."""
    slicer = pytest.importorskip("slicer")
    from slicer_scene import standalone_scene

    scene, logics = standalone_scene()
    scene.volumes_logic = logics["Volumes"]
    yield scene
    scene.Clear(1)
    slicer.mrmlScene = None


def load_volume(scene, path, name="ct"):
    """Load an image file the way Slicer's Add Data does (Volumes logic, ITK reader)."""
    node = scene.volumes_logic.AddArchetypeVolume(str(path), name)
    assert node is not None, f"Slicer could not load {path}"
    return node
