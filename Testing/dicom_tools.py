"""Independent DICOM tools that judge what we write: dciodvfy (dicom3tools), plastimatch, dcmtk, dcmqi.

A test that needs one skips with a message when it is absent, and fails instead
when PROSTATESEG_REQUIRE_DICOM_TOOLS=1 (CI sets it, after installing them).
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

INSTALL_HINT = {
    "dciodvfy": "Debian package dicom3tools",
    "plastimatch": "Debian package plastimatch",
    "dcmdump": "Debian package dcmtk",
    "segimage2itkimage": "PyPI package dcmqi",
    "storescu": "Debian package dcmtk",
    "storescp": "Debian package dcmtk",
    "echoscu": "Debian package dcmtk",
}


DCMTK = {"storescu", "storescp", "echoscu", "dcmdump"}


def _is_dcmtk(path: str) -> bool:
    """pynetdicom installs its own storescu/storescp/echoscu into the virtual environment; we want dcmtk's."""
    run = subprocess.run([path, "--version"], check=False, capture_output=True, text=True, timeout=30)
    return "dcmtk" in (run.stdout + run.stderr).lower()


def require_tool(name: str) -> str:
    candidates = [shutil.which(name, path=folder) for folder in os.environ.get("PATH", "").split(os.pathsep)]
    for path in dict.fromkeys(p for p in candidates if p):
        if name not in DCMTK or _is_dcmtk(path):
            return path
    message = f"{name} is not installed ({INSTALL_HINT.get(name, name)})"
    if os.environ.get("PROSTATESEG_REQUIRE_DICOM_TOOLS") == "1":
        pytest.fail(message + " and PROSTATESEG_REQUIRE_DICOM_TOOLS=1")
    pytest.skip(message)


def dciodvfy_errors(path) -> list[str]:
    """dciodvfy's 'Error' lines for a DICOM file (an empty list: the object is valid for its IOD)."""
    run = subprocess.run([require_tool("dciodvfy"), str(path)], check=False, capture_output=True, text=True)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dcmdump(path) -> str:
    run = subprocess.run([require_tool("dcmdump"), "+P", "0008,0060", "+P", "0008,0016", str(path)],
                         capture_output=True, text=True, check=True)
    return run.stdout


def plastimatch_masks(rtstruct, reference_image, workdir) -> dict[str, np.ndarray]:
    """plastimatch's rasterisation of an RT Structure Set on a reference image's grid, one (k, j, i) mask
    per ROI name; contours of one plane are combined by the even-odd rule (--xor-contours)."""
    out = Path(workdir) / "plastimatch"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([require_tool("plastimatch"), "convert", "--input", str(rtstruct), "--fixed", str(reference_image),
                    "--output-prefix", str(out), "--prefix-format", "nrrd", "--xor-contours"],
                   capture_output=True, text=True, check=True)
    return {path.name[: -len(".nrrd")]: sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
            for path in sorted(out.glob("*.nrrd"))}


def dcmqi_segments(seg, workdir) -> dict[str, sitk.Image]:
    """dcmqi's reading of a DICOM SEG (segimage2itkimage, what Slicer's QuantitativeReporting uses): one
    image per segment, by segment label, on dcmqi's own grid."""
    out = Path(workdir) / "dcmqi"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    subprocess.run([require_tool("segimage2itkimage"), "--inputDICOM", str(seg), "--outputDirectory", str(out),
                    "--outputType", "nrrd"], capture_output=True, text=True, check=True)
    meta = json.loads((out / "meta.json").read_text())
    images = {}
    for n, attributes in enumerate(meta["segmentAttributes"], start=1):
        images[attributes[0]["SegmentLabel"]] = sitk.ReadImage(str(out / f"{n}.nrrd"))
    return images


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def organ_labels(labels: sitk.Image) -> sitk.Image:
    """A phantom's label map with the six target organs (1-6) only, as UInt8."""
    array = sitk.GetArrayFromImage(labels)
    array[array > 6] = 0
    out = sitk.GetImageFromArray(array.astype(np.uint8))
    out.CopyInformation(labels)
    return out
