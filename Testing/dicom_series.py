"""Write a 3-D CT as a DICOM series (one file per slice), for reading tests."""

import random
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def write_ct_series(image: sitk.Image, folder: Path, shuffle_seed=None, modality="CT", series_uid=None,
                    skip_slices=(), study_uid=None, prefix="", extra_tags=None, first_instance=1) -> list[Path]:
    """One file per k-slice with Image Position/Orientation (Patient) from the
    image's geometry. File names are random when shuffle_seed is given, so the
    file order says nothing about the slice order; `prefix` starts every name
    (two series in one folder), `extra_tags` are added to every slice, and
    instance numbers start at `first_instance`."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    series_uid = series_uid or "1.2.826.0.1.3680043.2.1125.1." + str(abs(hash(str(folder))) % 10**12)
    study_uid = study_uid or "1.2.826.0.1.3680043.2.1125.2.777"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    names = list(range(image.GetSize()[2]))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(names)
    written = []
    for k in range(image.GetSize()[2]):
        if k in skip_slices:
            continue
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0013": str(k + first_instance),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}",
            "0008|103e": f"test series {modality}",
            **(extra_tags or {}),
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        path = folder / (f"{prefix}IM{names[k]:05d}" if shuffle_seed is not None else f"{prefix}slice{k:04d}.dcm")
        writer.SetFileName(str(path))
        writer.SetImageIO("GDCMImageIO")  # the names carry no .dcm extension
        writer.Execute(slice_)
        written.append(path)
    return written
