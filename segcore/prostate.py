"""The two-stage prostate pipeline of the MetricUNet paper.

Stage 1 looks at the whole CT on a coarse (about 4 mm) grid with a light 2.5-D
U-Net and finds where the prostate is; stage 2 segments a 128 mm cube around
that point at 1 mm, slice by slice with 3 neighbouring slices as channels.
The probabilities are resampled straight onto the input's own grid, so the
result lies on the input voxels whatever their orientation.

Both grids are axis-aligned in LPS (the canonical orientation) and are made by
resampling in physical space, so an input stored in any orientation (flipped,
permuted, oblique, any DICOM slice order) reaches the networks the same way.
The functions that prepare network input are shared with `training/`, so a
model sees in use exactly what it saw in training.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from . import anatomy
from . import image as imageio
from .errors import ModelPackageError
from .pipeline import Progress, Segmenter, empty_labelmap, labelmap_like, normalise
from .postprocess import bounding_box, clean_mask
from .result import Result, SegmentResult, label_volume_cc

DEFAULT_MODEL = "prostate-metricunet-demo"
PROSTATE = anatomy.structure("prostate")


@dataclass(frozen=True)
class PipelineSettings:
    """How a CT is prepared for the two stages; a package may override any of these in ``pipeline``."""

    window: tuple[float, float] = (-200.0, 300.0)        # HU mapped to [0, 1]
    coarse_spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0)
    coarse_slices: int = 5
    fine_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    fine_slices: int = 3
    crop_mm: tuple[float, float, float] = (128.0, 128.0, 128.0)
    # Where the crop's centre lies relative to the located prostate (LPS mm): a multi-organ stage 2
    # looks further up, where the bladder is.
    crop_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    threshold: float = 0.5
    slice_margin_mm: float = 12.0      # stage 2 runs this far beyond the coarse mask's top and bottom
    min_coarse_cc: float = 3.0         # a smaller coarse blob is noise, not a prostate
    max_coarse_extent_mm: float = 100.0  # a taller coarse blob is not a prostate either (bladder, bowel...)
    max_midline_offset_mm: float = 50.0  # the prostate sits on the body's left-right midline
    plausible_cc: tuple[float, float] = (8.0, 200.0)
    max_shift_mm: float = 20.0         # stage 2's prostate this far from stage 1's centre: the two disagree


# --------------------------------------------------------------------------- preparing network input


def coarse_image(ct: sitk.Image, settings: PipelineSettings) -> sitk.Image:
    """The CT on the stage-1 grid: axis-aligned LPS, coarse spacing, covering the whole image."""
    return imageio.resample_to_spacing(ct, settings.coarse_spacing_mm, "linear")


def crop_reference(center_lps, settings: PipelineSettings) -> sitk.Image:
    """The stage-2 grid: an axis-aligned cube of ``crop_mm`` at fine spacing centred on a point."""
    spacing = np.asarray(settings.fine_spacing_mm, float)
    size = np.maximum(1, np.round(np.asarray(settings.crop_mm, float) / spacing)).astype(int)
    return imageio.centred_grid(center_lps, spacing, size)


def slice_stacks(volume: np.ndarray, indices, count: int) -> np.ndarray:
    """For each axial index, ``count`` neighbouring slices centred on it (edges repeated): (n, count, y, x)."""
    half = count // 2
    offsets = np.arange(-half, count - half)
    which = np.clip(np.asarray(indices)[:, None] + offsets[None, :], 0, volume.shape[0] - 1)
    return volume[which]


def pad_to_multiple(batch: np.ndarray, divisor: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad the last two axes up to multiples of ``divisor``; return the original (y, x) size."""
    y, x = batch.shape[-2:]
    py, px = (-y) % divisor, (-x) % divisor
    if py or px:
        batch = np.pad(batch, [(0, 0)] * (batch.ndim - 2) + [(0, py), (0, px)])
    return batch, (y, x)


def predict_slices(network, volume: np.ndarray, indices, count: int, device, batch_size: int = 16,
                   progress: Callable[[int, int], None] | None = None, classes: bool = False) -> np.ndarray:
    """Foreground probability for the given axial slices of a normalised volume: (len(indices), y, x);
    with ``classes`` every class's probability: (len(indices), num_classes, y, x)."""
    import torch

    indices = np.asarray(list(indices), dtype=int)
    shape = (len(indices), network.num_classes) if classes else (len(indices),)
    out = np.zeros(shape + volume.shape[1:], np.float32)
    network.eval()
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch, (y, x) = pad_to_multiple(slice_stacks(volume, chunk, count), network.divisor)
            logits = network(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
            probabilities = torch.softmax(logits.float(), dim=1)[:, :, :y, :x]
            out[start:start + len(chunk)] = (probabilities if classes else probabilities[:, 1]).cpu().numpy()
            if progress is not None:
                progress(min(start + batch_size, len(indices)), len(indices))
    return out


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Localisation:
    """What stage 1 found."""

    found: bool
    center_lps: tuple[float, float, float] | None
    z_range_lps: tuple[float, float] | None
    volume_cc: float
    mean_probability: float


def localise(probabilities: np.ndarray, coarse: sitk.Image, settings: PipelineSettings) -> Localisation:
    """Pick the prostate among stage 1's blobs; not found when no blob is big enough and near the midline.

    The prostate is a midline organ: blobs whose centre lies more than
    ``max_midline_offset_mm`` from the body's left-right middle (over the blob's
    slices) are discarded, which keeps a hip or buttock look-alike from winning.
    Among the rest, the one with the most probability mass wins. ``coarse`` is
    the CT on the stage-1 grid (axis-aligned LPS), in HU.
    """
    from scipy import ndimage

    mask = probabilities > settings.threshold
    labelled, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    voxel_cc = float(np.prod(coarse.GetSpacing())) / 1000.0
    body = sitk.GetArrayViewFromImage(coarse) > -300
    spacing_x, origin_x = coarse.GetSpacing()[0], coarse.GetOrigin()[0]
    best, best_mass, largest_cc = None, 0.0, 0.0
    for index, where in enumerate(ndimage.find_objects(labelled), start=1):
        blob = labelled[where] == index
        volume = float(blob.sum()) * voxel_cc
        largest_cc = max(largest_cc, volume)
        if volume < settings.min_coarse_cc:
            continue
        i = np.nonzero(blob)[2]
        blob_x = origin_x + spacing_x * (i.mean() + where[2].start)
        slab = body[where[0]]
        if slab.any():
            body_x = origin_x + spacing_x * np.nonzero(slab)[2].mean()
            if abs(blob_x - body_x) > settings.max_midline_offset_mm:
                continue
        mass = float(probabilities[where][blob].sum())
        if mass > best_mass:
            best, best_mass = (index, where), mass
    if best is None:
        return Localisation(False, None, None, largest_cc, 0.0)
    index, where = best
    blob = labelled == index
    k, j, i = np.nonzero(blob)
    center = coarse.TransformContinuousIndexToPhysicalPoint([float(i.mean()), float(j.mean()), float(k.mean())])
    z_low = coarse.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, float(k.min()) - 0.5])[2]
    z_high = coarse.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, float(k.max()) + 0.5])[2]
    return Localisation(True, tuple(center), (min(z_low, z_high), max(z_low, z_high)), float(blob.sum()) * voxel_cc,
                        float(probabilities[blob].mean()))


def paste_back(probabilities: sitk.Image, target: sitk.Image, threshold: float) -> np.ndarray:
    """Resample crop probabilities onto the target grid (only where the crop reaches) and threshold."""
    mask = np.zeros(target.GetSize()[::-1], bool)
    where, values = imageio.resample_onto_part(probabilities, target)
    if where is not None:
        mask[where] = values > threshold
    return mask


def paste_back_classes(probabilities: np.ndarray, reference: sitk.Image, target: sitk.Image) -> np.ndarray:
    """Class indices on the target grid from per-class crop probabilities (num_classes, z, y, x) on the
    ``reference`` grid: each class resampled linearly, then the most probable one (0 beyond the crop)."""
    labels = np.zeros(target.GetSize()[::-1], np.uint8)
    where, values = None, []
    for plane in probabilities:
        image = sitk.GetImageFromArray(plane)
        image.CopyInformation(reference)
        where, part = imageio.resample_onto_part(image, target)
        if where is None:
            return labels
        values.append(part)
    labels[where] = np.argmax(np.stack(values), axis=0)
    return labels


def soft_agreement(probabilities: np.ndarray, threshold: float) -> float:
    """How decided the network is: soft Dice between the probabilities and their own thresholded mask."""
    mask = probabilities > threshold
    total = float(probabilities.sum() + mask.sum())
    return 2.0 * float(probabilities[mask].sum()) / total if total > 0 else 0.0


@dataclass
class CropPrediction:
    """What stage 2 gave on its 1 mm crop."""

    reference: sitk.Image       # the crop's grid
    probabilities: np.ndarray   # (classes, z, y, x); background 1 where stage 2 did not run
    inside: range               # the crop's slices that lie inside the scan


class ProstateSegmenter(Segmenter):
    """A loaded prostate model, ready to segment many images (what a batch should use)."""

    TASK = "prostate"
    DEFAULT_MODEL = DEFAULT_MODEL
    STAGES = ("stage1", "stage2")
    KIND = "prostate model"
    SETTINGS = PipelineSettings

    def __init__(self, model=None, device: str = "auto"):
        super().__init__(model, device)
        self.stage1 = self.load_stage("stage1")
        self.stage2 = self.load_stage("stage2")
        if self.stage1.in_channels != self.settings.coarse_slices or self.stage2.in_channels != self.settings.fine_slices:
            raise ModelPackageError(
                f"model package {self.package.name!r}: the networks take {self.stage1.in_channels} and "
                f"{self.stage2.in_channels} slices, but its pipeline settings say {self.settings.coarse_slices} "
                f"and {self.settings.fine_slices}.")
        # Stage 2's class k is the package's k-th label; a multi-organ stage 2 (HMEDN) also gives
        # bladder and rectum around the prostate.
        self.organs = list(self.package.labels)
        names = [s.name for s in self.organs]
        if PROSTATE.name not in names or self.stage2.num_classes != len(self.organs) + 1:
            raise ModelPackageError(
                f"model package {self.package.name!r}: stage 2 predicts {self.stage2.num_classes} classes "
                f"(background and {self.stage2.num_classes - 1} structures), but the package lists "
                f"{len(self.organs)} labels ({', '.join(names)}); a prostate model must list the prostate.")
        self.prostate_class = names.index(PROSTATE.name) + 1

    @staticmethod
    def input_settings(package) -> dict:
        return {"window": tuple(package.input.intensity_window), "fine_spacing_mm": tuple(package.input.spacing_mm)}

    def segment(self, ct: sitk.Image, report: Progress, timings: dict[str, float]) -> Result:
        tick = time.perf_counter()
        report(0.05, "stage 1: locating the prostate")
        where = self.locate(ct)
        timings["stage1"] = time.perf_counter() - tick
        details = {"coarse_volume_cc": round(where.volume_cc, 2)}
        if not where.found:
            return Result(empty_labelmap(ct), [], 0.0, self.package.name, timings=timings, details=details, messages=[(
                "no prostate found: the localiser saw nothing prostate-like in this image. "
                "Check that the pelvis is in the field of view.")])
        details["center_lps_mm"] = [round(v, 2) for v in where.center_lps]

        tick = time.perf_counter()
        report(0.15, "stage 2: segmenting the prostate")
        crop = self.segment_crop(ct, where, lambda done: report(0.15 + 0.7 * done, "stage 2: segmenting the prostate"))
        timings["stage2"] = time.perf_counter() - tick

        tick = time.perf_counter()
        report(0.9, "placing the result on the input grid")
        labelmap = self.place_on_input(crop, ct)
        timings["paste_back"] = time.perf_counter() - tick

        segments, confidence, messages = self.assess(labelmap, where, crop, details)
        return Result(labelmap, segments, confidence, self.package.name, messages, timings, details)

    def locate(self, ct: sitk.Image) -> Localisation:
        """Stage 1: the prostate's blob on the coarse grid."""
        coarse = coarse_image(ct, self.settings)
        volume = normalise(sitk.GetArrayViewFromImage(coarse), self.settings.window)
        probabilities = predict_slices(self.stage1, volume, range(volume.shape[0]), self.settings.coarse_slices,
                                       self.device, batch_size=32)
        return localise(probabilities, coarse, self.settings)

    def segment_crop(self, ct: sitk.Image, where: Localisation, report: Callable[[float], None]) -> CropPrediction:
        """Stage 2: class probabilities on the 1 mm crop around the located prostate."""
        center = np.asarray(where.center_lps) + np.asarray(self.settings.crop_offset_mm)
        reference = crop_reference(center, self.settings)
        crop = imageio.resample_like(ct, reference, "linear")
        fine = normalise(sitk.GetArrayViewFromImage(crop), self.settings.window)
        z0 = reference.GetOrigin()[2]
        dz = reference.GetSpacing()[2]
        # Only crop slices inside the scan are segmented, and their neighbour stacks repeat the scan's
        # last slice rather than the air the crop is padded with, as stage 1 and training do.
        scan_low, scan_high = imageio.physical_bounds(ct)
        inside = range(max(0, int(np.ceil((scan_low[2] - z0) / dz))),
                       min(fine.shape[0], int(np.floor((scan_high[2] - z0) / dz)) + 1))
        if len(self.organs) > 1:
            slices = inside  # bladder and rectum reach far beyond the prostate's slices
        else:
            low = int(np.floor((where.z_range_lps[0] - self.settings.slice_margin_mm - z0) / dz))
            high = int(np.ceil((where.z_range_lps[1] + self.settings.slice_margin_mm - z0) / dz))
            slices = range(max(inside.start, low), min(inside.stop, high + 1))
        probabilities = np.zeros((len(self.organs) + 1,) + fine.shape, np.float32)
        probabilities[0] = 1.0  # background where stage 2 does not run
        if len(slices):
            probabilities[:, slices.start:slices.stop] = predict_slices(
                self.stage2, fine[inside.start:inside.stop], np.arange(slices.start, slices.stop) - inside.start,
                self.settings.fine_slices, self.device, batch_size=8, classes=True,
                progress=lambda done, total: report(done / total),
            ).transpose(1, 0, 2, 3)
        return CropPrediction(reference, probabilities, inside)

    def place_on_input(self, crop: CropPrediction, ct: sitk.Image) -> sitk.Image:
        """The crop's classes resampled onto the input grid, each organ cleaned (largest piece, no holes)."""
        if len(self.organs) == 1:
            probabilities = sitk.GetImageFromArray(crop.probabilities[1])
            probabilities.CopyInformation(crop.reference)
            classes = paste_back(probabilities, ct, self.settings.threshold).astype(np.uint8)
        else:
            classes = paste_back_classes(crop.probabilities, crop.reference, ct)
        labels = np.zeros(classes.shape, np.uint8)
        for k, organ in enumerate(self.organs, start=1):
            mask = classes == k
            box = bounding_box(mask, margin=1)
            if box is not None:  # clean only where the crop landed: the rest of a large CT is empty anyway
                mask[box] = clean_mask(mask[box])
            labels[mask & (labels == 0)] = organ.value
        return labelmap_like(labels, ct)

    def assess(self, labelmap: sitk.Image, where: Localisation, crop: CropPrediction, details: dict):
        """Segments with their volumes and confidences, the overall confidence, and what a user should know."""
        settings, probabilities = self.settings, crop.probabilities
        messages = []
        segments = []
        volume_cc = label_volume_cc(labelmap, PROSTATE.value)
        confidence = where.mean_probability * soft_agreement(probabilities[self.prostate_class], settings.threshold)
        extent = where.z_range_lps[1] - where.z_range_lps[0]
        if extent > settings.max_coarse_extent_mm:
            confidence *= 0.25
            messages.append(f"the localiser's region is {extent:.0f} mm tall, far more than a prostate: "
                            "the result is unreliable.")
        if volume_cc > 0:
            from .metrics import centroids

            shift = np.linalg.norm(np.asarray(centroids(labelmap)[PROSTATE.value]) - np.asarray(where.center_lps))
            details["stage_shift_mm"] = round(float(shift), 1)
            if shift > settings.max_shift_mm:
                confidence *= 0.5
                messages.append(f"the two stages disagree on where the prostate is ({shift:.0f} mm apart): "
                                "check the result.")
        if volume_cc == 0:
            confidence = 0.0
            messages.append("no prostate found: stage 2 found no prostate voxels near the located region.")
        else:
            low_cc, high_cc = settings.plausible_cc
            if not low_cc <= volume_cc <= high_cc:
                confidence *= 0.5
                messages.append(f"unusual prostate volume {volume_cc:.1f} cc (expected {low_cc:g}-{high_cc:g} cc): "
                                "check the result.")
            segments.append(SegmentResult(PROSTATE, volume_cc, confidence))
        for k, organ in enumerate(self.organs, start=1):
            organ_cc = label_volume_cc(labelmap, organ.value)
            if organ.name == PROSTATE.name or organ_cc == 0:  # by name: a package may give its own colour
                continue
            segments.append(SegmentResult(organ, organ_cc, where.mean_probability
                                          * soft_agreement(probabilities[k], settings.threshold)))
            if _touches_crop_side(probabilities.argmax(axis=0) == k, crop.inside):
                messages.append(f"the {organ.name.replace('_', ' ')} reaches the edge of the "
                                f"{' x '.join(f'{v:g}' for v in settings.crop_mm)} mm region stage 2 "
                                "segments: any part beyond it is missing.")
        return segments, float(confidence), messages


def _touches_crop_side(mask: np.ndarray, inside: range) -> bool:
    """Whether a (z, y, x) crop mask reaches a side of the crop (the top and bottom only where the crop
    ends inside the scan, not where the scan itself ends)."""
    sides = [mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
    if inside.start == 0:
        sides.append(mask[0])
    if inside.stop == mask.shape[0]:
        sides.append(mask[-1])
    return any(side.any() for side in sides)


def segment_prostate(image_or_path, model=None, device: str = "auto", progress: Progress | None = None) -> Result:
    """Segment the prostate in one CT; the label map lies on the input's own grid.

    ``model`` is a package name, a package folder or None for the bundled default;
    ``progress(fraction, message)`` is called as the work advances. To segment
    many images, make one `ProstateSegmenter` and call it per image.
    """
    return ProstateSegmenter(model, device)(image_or_path, progress)
