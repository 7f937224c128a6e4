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

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import anatomy
from . import image as imageio
from .errors import ModelPackageError, SegcoreError
from .postprocess import bounding_box, clean_mask
from .result import Result, SegmentResult, label_volume_cc

log = logging.getLogger("segcore")

DEFAULT_MODEL = "prostate-metricunet-demo"
PROSTATE = anatomy.structure("prostate")
Progress = Callable[[float, str], None]


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

    @classmethod
    def from_package(cls, package) -> PipelineSettings:
        extra = dict(package.manifest.get("pipeline", {}))
        extra["window"] = tuple(package.input.intensity_window)
        extra["fine_spacing_mm"] = tuple(package.input.spacing_mm)
        known = {k: v for k, v in extra.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})
        except TypeError as error:
            raise ModelPackageError(f"model package {package.name!r}: bad 'pipeline' settings: {error}") from None

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# --------------------------------------------------------------------------- preparing network input


def normalise(hu: np.ndarray, window) -> np.ndarray:
    """HU clipped to the window and scaled to [0, 1] (float32); air and anything below the window is 0."""
    low, high = float(window[0]), float(window[1])
    out = np.clip(np.asarray(hu, dtype=np.float32), low, high)
    out -= low
    out *= 1.0 / (high - low)
    return out


def coarse_image(ct: sitk.Image, settings: PipelineSettings) -> sitk.Image:
    """The CT on the stage-1 grid: axis-aligned LPS, coarse spacing, covering the whole image."""
    return imageio.resample_to_spacing(ct, settings.coarse_spacing_mm, "linear")


def crop_reference(center_lps, settings: PipelineSettings) -> sitk.Image:
    """The stage-2 grid: an axis-aligned cube of ``crop_mm`` at fine spacing centred on a point."""
    spacing = np.asarray(settings.fine_spacing_mm, float)
    size = np.maximum(1, np.round(np.asarray(settings.crop_mm, float) / spacing)).astype(int)
    origin = np.asarray(center_lps, float) - (size - 1) / 2 * spacing
    reference = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(s) for s in spacing))
    reference.SetOrigin(tuple(float(o) for o in origin))
    return reference


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


# --------------------------------------------------------------------------- devices and models


def resolve_device(device: str = "auto"):
    """'auto' (CUDA when torch sees it, else CPU), 'cpu' or 'cuda[:n]' as a torch.device."""
    import torch

    name = (device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SegcoreError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here "
                           "(a CPU-only PyTorch, or no GPU driver). Use --device cpu or auto.")
    if name.startswith("cuda:") and name[5:].isdigit() and int(name[5:]) >= torch.cuda.device_count():
        raise SegcoreError(f"device {name!r} was asked for, but PyTorch sees {torch.cuda.device_count()} GPU(s) "
                           "(numbered from 0).")
    if name != "cpu" and not name.startswith("cuda"):
        raise SegcoreError(f"unknown device {device!r}: use auto, cpu or cuda")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise SegcoreError(f"unknown device {device!r}: {error}") from None


def use_available_cores() -> None:
    """Never run more CPU threads than this process may use (containers and batch systems limit it)."""
    import torch

    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    if torch.get_num_threads() > available:
        torch.set_num_threads(available)


def open_model(model=None):
    """The prostate model package: by name, by folder path, an open package, or the default."""
    from . import packages

    package = model if isinstance(model, packages.ModelPackage) else packages.open_package(model or DEFAULT_MODEL)
    if package.task != "prostate":
        raise ModelPackageError(f"model package {package.name!r} is for task {package.task!r}, "
                                "not 'prostate'; choose a prostate model (prostateseg models list).")
    for stage in ("stage1", "stage2"):
        package.stage(stage)
    return package


def load_network(package, stage: str, device):
    """Build one stage's network from the package and load its checked weights."""
    from . import networks

    spec = package.stage(stage)
    network = networks.build(spec.architecture, spec.arguments)
    networks.load_state(network, package.load_weights(stage), f"model package {package.name!r} {stage}")
    return network.to(device).eval()


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


class ProstateSegmenter:
    """A loaded prostate model, ready to segment many images (what a batch should use)."""

    def __init__(self, model=None, device: str = "auto"):
        self.package = open_model(model)
        self.settings = PipelineSettings.from_package(self.package)
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            use_available_cores()
        self.stage1 = load_network(self.package, "stage1", self.device)
        self.stage2 = load_network(self.package, "stage2", self.device)
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

    @property
    def structures(self) -> list[anatomy.Structure]:
        """What this pipeline's label maps can hold (written to every output, found or not)."""
        return list(self.organs)

    def __call__(self, image_or_path, progress: Progress | None = None) -> Result:
        report = progress or (lambda fraction, message: None)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        report(0.0, "reading")
        ct = read_input(image_or_path)
        timings["read"] = time.perf_counter() - started

        tick = time.perf_counter()
        report(0.05, "stage 1: locating the prostate")
        coarse = coarse_image(ct, self.settings)
        volume = normalise(sitk.GetArrayViewFromImage(coarse), self.settings.window)
        coarse_p = predict_slices(self.stage1, volume, range(volume.shape[0]), self.settings.coarse_slices,
                                  self.device, batch_size=32)
        where = localise(coarse_p, coarse, self.settings)
        timings["stage1"] = time.perf_counter() - tick
        labelmap = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
        labelmap.CopyInformation(ct)
        details = {"coarse_volume_cc": round(where.volume_cc, 2)}
        if not where.found:
            timings["total"] = time.perf_counter() - started
            report(1.0, "no prostate found")
            return Result(labelmap, [], 0.0, self.package.name, timings=timings, details=details, messages=[(
                "no prostate found: the localiser saw nothing prostate-like in this image. "
                "Check that the pelvis is in the field of view.")])
        details["center_lps_mm"] = [round(v, 2) for v in where.center_lps]

        tick = time.perf_counter()
        report(0.15, "stage 2: segmenting the prostate")
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
        fine_p = np.zeros((len(self.organs) + 1,) + fine.shape, np.float32)
        fine_p[0] = 1.0  # background where stage 2 does not run
        if len(slices):
            fine_p[:, slices.start:slices.stop] = predict_slices(
                self.stage2, fine[inside.start:inside.stop], np.arange(slices.start, slices.stop) - inside.start,
                self.settings.fine_slices, self.device, batch_size=8, classes=True,
                progress=lambda done, total: report(0.15 + 0.7 * done / total, "stage 2: segmenting the prostate"),
            ).transpose(1, 0, 2, 3)
        timings["stage2"] = time.perf_counter() - tick

        tick = time.perf_counter()
        report(0.9, "placing the result on the input grid")
        if len(self.organs) == 1:
            probabilities = sitk.GetImageFromArray(fine_p[1])
            probabilities.CopyInformation(reference)
            classes = paste_back(probabilities, ct, self.settings.threshold).astype(np.uint8)
        else:
            classes = paste_back_classes(fine_p, reference, ct)
        labels = np.zeros(classes.shape, np.uint8)
        for k, organ in enumerate(self.organs, start=1):
            mask = classes == k
            box = bounding_box(mask, margin=1)
            if box is not None:  # clean only where the crop landed: the rest of a large CT is empty anyway
                mask[box] = clean_mask(mask[box])
            labels[mask & (labels == 0)] = organ.value
        labelmap = sitk.GetImageFromArray(labels)
        labelmap.CopyInformation(ct)
        timings["paste_back"] = time.perf_counter() - tick

        messages = []
        segments = []
        volume_cc = label_volume_cc(labelmap, PROSTATE.value)
        confidence = where.mean_probability * soft_agreement(fine_p[self.prostate_class], self.settings.threshold)
        extent = where.z_range_lps[1] - where.z_range_lps[0]
        if extent > self.settings.max_coarse_extent_mm:
            confidence *= 0.25
            messages.append(f"the localiser's region is {extent:.0f} mm tall, far more than a prostate: "
                            "the result is unreliable.")
        if volume_cc > 0:
            from .metrics import centroids

            shift = np.linalg.norm(np.asarray(centroids(labelmap)[PROSTATE.value]) - np.asarray(where.center_lps))
            details["stage_shift_mm"] = round(float(shift), 1)
            if shift > self.settings.max_shift_mm:
                confidence *= 0.5
                messages.append(f"the two stages disagree on where the prostate is ({shift:.0f} mm apart): "
                                "check the result.")
        if volume_cc == 0:
            confidence = 0.0
            messages.append("no prostate found: stage 2 found no prostate voxels near the located region.")
        else:
            low_cc, high_cc = self.settings.plausible_cc
            if not low_cc <= volume_cc <= high_cc:
                confidence *= 0.5
                messages.append(f"unusual prostate volume {volume_cc:.1f} cc (expected {low_cc:g}-{high_cc:g} cc): "
                                "check the result.")
            segments.append(SegmentResult(PROSTATE, volume_cc, confidence))
        for k, organ in enumerate(self.organs, start=1):
            organ_cc = label_volume_cc(labelmap, organ.value)
            if organ == PROSTATE or organ_cc == 0:
                continue
            segments.append(SegmentResult(organ, organ_cc, where.mean_probability
                                          * soft_agreement(fine_p[k], self.settings.threshold)))
            if _touches_crop_side(fine_p.argmax(axis=0) == k, inside):
                messages.append(f"the {organ.name.replace('_', ' ')} reaches the edge of the "
                                f"{' x '.join(f'{v:g}' for v in self.settings.crop_mm)} mm region stage 2 "
                                "segments: any part beyond it is missing.")
        timings["total"] = time.perf_counter() - started
        report(1.0, "done")
        return Result(labelmap, segments, float(confidence), self.package.name, messages, timings, details)


def _touches_crop_side(mask: np.ndarray, inside: range) -> bool:
    """Whether a (z, y, x) crop mask reaches a side of the crop (the top and bottom only where the crop
    ends inside the scan, not where the scan itself ends)."""
    sides = [mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
    if inside.start == 0:
        sides.append(mask[0])
    if inside.stop == mask.shape[0]:
        sides.append(mask[-1])
    return any(side.any() for side in sides)


def read_input(image_or_path) -> sitk.Image:
    """A CT from a path (file, DICOM file or folder) or an image, checked to be a CT volume."""
    if isinstance(image_or_path, (str, Path)):
        return imageio.read_image(image_or_path, kind="ct")
    if isinstance(image_or_path, sitk.Image):
        imageio.check_volume(image_or_path)
        imageio.check_not_blank(image_or_path)
        imageio.check_ct_like(image_or_path)
        return image_or_path
    raise SegcoreError(f"expected a path or a SimpleITK image, got {type(image_or_path).__name__}")


def segment_prostate(image_or_path, model=None, device: str = "auto", progress: Progress | None = None) -> Result:
    """Segment the prostate in one CT; the label map lies on the input's own grid.

    ``model`` is a package name, a package folder or None for the bundled default;
    ``progress(fraction, message)`` is called as the work advances. To segment
    many images, make one `ProstateSegmenter` and call it per image.
    """
    return ProstateSegmenter(model, device)(image_or_path, progress)
