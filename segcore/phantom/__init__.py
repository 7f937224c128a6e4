"""The digital pelvis phantom: labelled synthetic planning CTs of the male pelvis.

The anatomy is a set of analytic shapes (ellipsoids, capsules, boxes, shells) defined in a patient frame
of millimetres centred on the prostate: x to the patient's left, y posterior, z superior (LPS). Each case
draws its patient from its seed (`patient`: sizes, positions, bladder filling, rectal gas, body habitus,
devices such as gold markers, a catheter, a rectal spacer, hip prostheses, couch and positioning aids),
then its scan (`scanner`: field of view, spacing, 1-5 mm slices, storage orientation, kernel, kVp, dose),
and evaluates the shapes at the voxel centres of that grid. Because the shapes are evaluated in physical
space, the label map is exact on any grid and orientation.

The pieces: `shapes` (distance functions and the canvas), `body` (outline, muscles, fat, bowel),
`organs` (the organs and the devices in them), `bones`, `scanner`. Tissue values, sizes and rates are
taken from the literature and anatomy atlases (cited where drawn); `docs/make_phantom_vs_real.py`
measures the result against a real pelvic CT, which the phantom is not tuned to.

Label values are fixed project-wide in `segcore.anatomy`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segcore import anatomy
from segcore.phantom import body, bones, organs, patient, scanner
from segcore.phantom.scanner import MIN_HU, ORIENTATIONS, euler_rotation
from segcore.phantom.shapes import Canvas, in_slabs

__all__ = [
    "MAX_HU",
    "MIN_HU",
    "OPTIONS",
    "ORIENTATIONS",
    "PhantomCase",
    "euler_rotation",
    "include_proximal_seminal_vesicles",
    "make_phantom",
    "source_digest",
    "write_dicom_case",
    "write_phantoms",
]

MAX_HU = 3071

# Everything a caller may force instead of drawing it: the patient's devices and the scan's settings.
OPTIONS = {**patient.OPTIONS, **scanner.OPTIONS}


@dataclass
class PhantomCase:
    """One synthetic case: CT in HU (int16), label map (uint8) on the same grid,
    and the drawn parameters (JSON-serialisable)."""

    ct: sitk.Image
    labels: sitk.Image
    info: dict = field(default_factory=dict)


def make_phantom(seed: int, matrix: int = 512, spacing=None, orientation: str = "random",
                 oblique: bool = False, implant: bool | str | None = None, options: dict | None = None) -> PhantomCase:
    """Make one labelled synthetic pelvic CT, deterministic for a given seed.

    matrix: in-plane matrix size (512 as on scanners; 96-160 for quick tests); the field of view is drawn,
    so in-plane spacing is FOV / matrix and slices are 1-5 mm thick at 512 (about as thick as wide at small
    matrices).
    spacing: (x, y, z) mm to force a spacing (the field of view follows).
    orientation: 'random' or a key of ORIENTATIONS (how the voxels are stored);
    oblique: tilt the grid by up to 20 degrees about each axis.
    implant: True/False forces a hip prosthesis on/off (True: the drawn side, or the left), or 'left',
    'right', 'both', 'none'; None draws it (about one case in seven).
    options: force any of OPTIONS, e.g. {"fiducials": True, "kernel": "sharp", "kvp": 100}.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown phantom option(s) {unknown}; known: {sorted(OPTIONS)}")
    # Separate random streams for the patient and the scan, so that the same seed gives the same patient
    # at the same place whatever grid is asked for.
    rng = np.random.default_rng([seed, 0])
    patient_options = {k: v for k, v in options.items() if k in patient.OPTIONS}
    a = patient.draw_patient(rng, patient_options)
    if implant is not None:
        side = a["implant"] if a["implant"] != "none" else ("left" if seed % 2 else "right")
        a["implant"] = {True: side, False: "none"}.get(implant, implant)
        patient.resolve(a)
    # The patient's prostate sits at a drawn position in scanner space.
    patient_center = np.array([rng.uniform(-10, 10), rng.uniform(-60, -20), rng.uniform(-400, 400)])
    scan = scanner.draw_scan(np.random.default_rng([seed, 1]), matrix, spacing, orientation, oblique, a,
                             {k: v for k, v in options.items() if k in scanner.OPTIONS})
    yaw = np.deg2rad(a["yaw_deg"])
    patient_rotation = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    origin = scan.origin + patient_center
    canvas = Canvas(scan.size, scan.spacing, origin, scan.direction, patient_center, patient_rotation)
    hu = scanner.hu_at_kvp(a["hu"], scan.kvp)
    _paint_patient(canvas, a, hu, scan)
    scanner.add_scanner_effects(canvas, scan, seed)
    ct_array = np.empty(canvas.hu.shape, np.int16)

    def to_int16(rows):
        ct_array[rows] = np.clip(np.rint(canvas.hu[rows]), MIN_HU, MAX_HU)

    in_slabs(ct_array.shape, to_int16)
    ct = sitk.GetImageFromArray(ct_array)
    labels = sitk.GetImageFromArray(canvas.labels)
    for image in (ct, labels):
        image.SetSpacing(scan.spacing)
        image.SetOrigin(tuple(float(v) for v in origin))
        image.SetDirection(tuple(float(v) for v in scan.direction.ravel()))
    hidden = ("bowel", "calcification_points", "fiducial_points", "muscle_offsets")
    info = {
        "seed": int(seed),
        "matrix": int(matrix),
        "size": list(scan.size),
        "spacing_mm": [round(v, 4) for v in scan.spacing],
        "orientation": scan.orientation,
        "oblique": bool(oblique),
        "prostate_center_lps_mm": [round(float(v), 2) for v in patient_center],
        "anatomy": _jsonable({k: v for k, v in a.items() if k not in hidden}),
        "scan": _jsonable(scan.info()),
        "hu": _jsonable(hu),   # the tissue values as this scan shows them (a["hu"] at its kVp)
    }
    return PhantomCase(ct=ct, labels=labels, info=info)


@functools.cache
def source_digest() -> str:
    """A hash of this package's source: what caches of made phantoms are keyed on, so that a changed
    phantom is made again rather than read back."""
    sources = b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))
    return hashlib.sha256(sources).hexdigest()[:12]


def _paint_patient(canvas: Canvas, a: dict, hu: dict, scan) -> None:
    """Paint one drawn patient back to front (what is painted later wins): couch and body, pelvic fat,
    bowel, organs and devices, bones; then the beam hardening the bones cause."""
    outline = body.paint_body(canvas, a, hu)
    body.paint_pelvic_fat(canvas, a, hu, outline)
    body.paint_bowel(canvas, a, hu)
    organs.paint_organs(canvas, a, hu, outline.abdominal_wall_back)
    bones.paint_bones(canvas, a, hu)
    scanner.add_beam_hardening(canvas, scan, [bones.head_centre(a, 1.0), bones.head_centre(a, -1.0)],
                               a["femoral_head_radius"])


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return round(float(value), 3)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# --------------------------------------------------------------------------- writing


def write_dicom_case(case: PhantomCase, folder, overwrite: bool = False) -> Path:
    """A case as a clinic's planning system exports it: `folder` holds its CT series (``CT0000.dcm``...)
    and ``RS.dcm``, an RT Structure Set of its six target organs (TG-263 names). The folder appears whole
    or not at all. A left-handed grid (a mirrored reformat) cannot be stored in DICOM, so the series holds
    the same voxels in the right-handed order that reading it gives."""
    import SimpleITK as sitk

    from segcore.dicom.ct import Algorithm, ct_series_for, write_ct_series
    from segcore.dicom.rtstruct import write_rtstruct
    from segcore.files import atomic_folder
    from segcore.image import read_image

    folder = Path(folder)
    name = folder.name.removesuffix("_dicom")
    organs = sitk.Mask(case.labels, sitk.LessEqual(case.labels, len(anatomy.TARGET_NAMES)))
    with atomic_folder(folder, overwrite=overwrite) as staging:
        write_ct_series(case.ct, staging, patient_name=f"Phantom^{name}", patient_id=name,
                        seed=f"phantom{case.info.get('seed')}{case.info.get('matrix')}")
        ct = read_image(staging)
        organs = sitk.Resample(organs, ct, sitk.Transform(), sitk.sitkNearestNeighbor)
        write_rtstruct(organs, [anatomy.BY_NAME[n] for n in anatomy.TARGET_NAMES], ct_series_for(ct, staging),
                       staging / "RS.dcm", algorithm=Algorithm("digital phantom", str(case.info.get("seed"))))
    return folder


def include_proximal_seminal_vesicles(labels: sitk.Image, mm: float) -> sitk.Image:
    """The label map under a common CTV convention: the prostate label also covers the seminal vesicles'
    proximal part, the voxels within `mm` of the prostate (straight-line distance in physical space, on
    any grid), which leave the seminal-vesicle label. The rest is unchanged."""
    prostate_value = anatomy.structure("prostate").value
    sv_value = anatomy.structure("seminal_vesicles").value
    prostate = sitk.Equal(labels, prostate_value)
    distance = sitk.SignedMaurerDistanceMap(prostate, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    out = sitk.GetArrayFromImage(labels)
    near = (out == sv_value) & (sitk.GetArrayViewFromImage(distance) <= mm)
    out[near] = prostate_value
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(labels)
    return result


def write_phantoms(outdir: str | Path, count: int, seed: int = 0, matrix: int = 512, overwrite: bool = False,
                   progress=None, dicom: bool = False, prostate_sv_mm: float = 0.0, **options) -> list[Path]:
    """Write `count` cases as caseNNN_ct.nii.gz / caseNNN_labels.nii.gz plus
    labels.json (and caseNNN_info.json with the drawn parameters); with `dicom`, also
    caseNNN_dicom/ (`write_dicom_case`). Case i uses seed + i, so any case can be
    remade alone. `prostate_sv_mm` > 0 contours the prostate under the CTV convention of
    `include_proximal_seminal_vesicles`."""
    from segcore.dataset import training_case_paths
    from segcore.files import atomic_output
    from segcore.image import write_image

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    labels_path = outdir / "labels.json"
    labels_text = json.dumps(anatomy.labels_json(), indent=1)
    if not labels_path.exists() or labels_path.read_text() != labels_text:
        with atomic_output(labels_path, overwrite=True) as tmp:
            tmp.write_text(labels_text)
    written = []
    for i in range(count):
        case = make_phantom(seed + i, matrix=matrix, **options)
        if prostate_sv_mm > 0:
            case.labels = include_proximal_seminal_vesicles(case.labels, prostate_sv_mm)
            case.info["prostate_includes_seminal_vesicles_mm"] = prostate_sv_mm
        ct_path, labels_path = training_case_paths(outdir, f"case{i:03d}")
        written.append(write_image(case.ct, ct_path, overwrite=overwrite))
        written.append(write_image(case.labels, labels_path, overwrite=overwrite))
        with atomic_output(outdir / f"case{i:03d}_info.json", overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(case.info, indent=1))
        if dicom:
            written.append(write_dicom_case(case, outdir / f"case{i:03d}_dicom", overwrite=overwrite))
        if progress is not None:
            progress(i + 1, count)
    return written
