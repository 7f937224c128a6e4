"""The training-case layout: one folder of ``<name>_ct.<ext>`` files, each with
``<name>_labels.<ext>`` beside it on the same voxel grid.

`training/` reads it, and `prostateseg phantom` and Slicer's *Save as training
case* write it, so the names are decided here alone.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from segcore.errors import GeometryError, OutputExistsError, SegcoreError
from segcore.image import grid_differences, write_image

CASE_CT_SUFFIX = "_ct"
CASE_LABELS_SUFFIX = "_labels"
# The image formats a case may be stored in, in order of preference.
CASE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


def training_case_paths(folder, name: str, ext: str = ".nii.gz") -> tuple[Path, Path]:
    """Where a training case called `name` goes in `folder`: (CT path, label map path)."""
    if not name or name.startswith(".") or any(c in name for c in '/\\:*?"<>|'):
        raise SegcoreError(f"invalid case name {name!r}: use letters, digits, '-' and '_' (e.g. patient012)")
    folder = Path(folder)
    return folder / f"{name}{CASE_CT_SUFFIX}{ext}", folder / f"{name}{CASE_LABELS_SUFFIX}{ext}"


def find_training_cases(folder) -> list[tuple[str, Path, Path]]:
    """Every case in `folder` as (name, CT path, label map path), sorted by name.

    A CT without a label map beside it is an error (a half-copied dataset
    should not train silently on fewer cases); other files are ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SegcoreError(f"training data folder {folder} does not exist")
    cases = []
    for ct_path in sorted(folder.iterdir()):
        ext = next((e for e in CASE_EXTENSIONS if ct_path.name.endswith(CASE_CT_SUFFIX + e)), None)
        if ext is None:
            continue
        name = ct_path.name[: -len(CASE_CT_SUFFIX + ext)]
        labels = [folder / f"{name}{CASE_LABELS_SUFFIX}{e}" for e in CASE_EXTENSIONS]
        labels = [p for p in labels if p.is_file()]
        if not labels:
            raise SegcoreError(f"{ct_path} has no label map beside it (expected {name}{CASE_LABELS_SUFFIX}{ext})")
        cases.append((name, ct_path, labels[0]))
    return cases


def write_training_case(ct: sitk.Image, labels: sitk.Image, folder, name: str,
                        overwrite: bool = False) -> tuple[Path, Path]:
    """Write a CT and its label map (same grid) as one training case; neither file is written if either exists."""
    from segcore.export import write_labelmap

    differences = grid_differences(ct, labels, 1e-3)
    if differences:
        raise GeometryError("the label map is not on the CT's grid: " + "; ".join(differences))
    ct_path, labels_path = training_case_paths(folder, name)
    existing = [p for p in (ct_path, labels_path) if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"training case {name!r} already exists in {folder} ({', '.join(p.name for p in existing)}): "
                                "choose another case name or allow overwriting")
    write_image(ct, ct_path, overwrite=overwrite)
    write_labelmap(labels, labels_path, overwrite=overwrite)
    return ct_path, labels_path
