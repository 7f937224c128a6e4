"""The multi-organ pipeline of the HMR-Net paper: slice-wise detection and contour regression.

The CT is resampled onto a canonical slice grid (axis-aligned LPS, 2 mm pixels,
a fixed square field of view centred on the body, slices every 2.5 mm). On
every axial slice the network detects organs and regresses p boundary points for
each; per organ the slice contours are made consistent along z (isolated
detections dropped, one-slice gaps bridged by averaging the neighbours'
contours, which the fixed point order allows, and only the longest run of
slices kept), rasterised on a grid twice as fine, and resampled straight onto
the input's own grid. The contours themselves are kept in the `Result`, in
physical coordinates.

Pixel coordinates follow the network's convention: pixel (row i, column j) spans
[j, j + 1) x [i, i + 1), so its centre is (j + 0.5, i + 0.5). The functions that
prepare network input are shared with `training/train_hmrnet.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from . import anatomy, pipeline
from . import image as imageio
from .errors import ModelPackageError, SegcoreError
from .pipeline import Progress, Segmenter, labelmap_like, normalise, settings_from_package
from .postprocess import polygon_mask
from .result import Result, SegmentResult

DEFAULT_MODEL = "organs-hmrnet-demo"
# Organs that are one body: at most one detection per slice is kept. Others (seminal vesicles: left and
# right lobes) may have several.
SINGLE_BODY = ("prostate", "bladder", "rectum", "femoral_head_left", "femoral_head_right")


@dataclass(frozen=True)
class OrganSettings:
    """How a CT is prepared for HMR-Net; a package may override any of these in ``pipeline``."""

    window: tuple[float, float] = (-200.0, 300.0)   # HU mapped to [0, 1]
    pixel_mm: float = 2.0
    slice_mm: float = 2.5
    size: int = 224                                 # pixels per side of the canonical slice
    score_threshold: float = 0.5                    # detections below this are ignored
    min_slices: int = 2                             # shorter runs of slices are dropped as isolated
    raster_factor: int = 2                          # contours are rasterised this much finer than the slices
    batch_size: int = 8
    organ_classes: tuple[str, ...] = anatomy.TARGET_NAMES  # network class k (1..K) is organ_classes[k - 1]


# --------------------------------------------------------------------------- the canonical slice grid


def body_centre(ct: sitk.Image) -> np.ndarray:
    """Physical (x, y) centre of the body (voxels above -300 HU on an 8 mm grid); the image centre if none."""
    coarse = imageio.resample_to_spacing(ct, 8.0, "linear")
    body = sitk.GetArrayViewFromImage(coarse) > -300
    if not body.any():
        low, high = imageio.physical_bounds(ct)
        return ((low + high) / 2)[:2]
    k, j, i = np.nonzero(body)
    centre = coarse.TransformContinuousIndexToPhysicalPoint([float(i.mean()), float(j.mean()), float(k.mean())])
    return np.asarray(centre[:2])


def slice_grid(ct: sitk.Image, settings: OrganSettings) -> sitk.Image:
    """The canonical grid: axis-aligned LPS, ``size`` x ``size`` pixels of ``pixel_mm`` centred on the body,
    slices every ``slice_mm`` through the image's whole extent."""
    low, high = imageio.physical_bounds(ct)
    slices = max(1, int(np.ceil((high[2] - low[2]) / settings.slice_mm - 1e-6)))
    centre = body_centre(ct)
    spacing = np.array([settings.pixel_mm, settings.pixel_mm, settings.slice_mm])
    size = np.array([settings.size, settings.size, slices])
    return imageio.centred_grid([*centre, (low[2] + high[2]) / 2], spacing, size)


def slice_volume(ct: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """The CT on the canonical grid, (z, y, x) HU, air outside the scan."""
    return sitk.GetArrayFromImage(imageio.resample_like(ct, reference, "linear"))


def fine_grid(reference: sitk.Image, factor: int) -> sitk.Image:
    """The canonical grid with pixels ``factor`` times finer in-plane and the same outer edges: fine pixel
    coordinates are the coarse ones times ``factor``."""
    spacing = np.asarray(reference.GetSpacing(), float)
    fine_spacing = spacing * [1.0 / factor, 1.0 / factor, 1.0]
    shift = (-0.5 + 0.5 / factor) * spacing * [1.0, 1.0, 0.0]  # the first fine centre, in coarse pixels
    origin = np.asarray(reference.GetOrigin(), float) + shift
    size = np.asarray(reference.GetSize()) * [factor, factor, 1]
    fine = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    fine.SetSpacing(tuple(float(s) for s in fine_spacing))
    fine.SetOrigin(tuple(float(o) for o in origin))
    return fine


def pixels_to_lps(points_xy: np.ndarray, slice_index: int, reference: sitk.Image) -> np.ndarray:
    """(n, 2) pixel coordinates on one canonical slice -> (n, 3) LPS points in mm."""
    spacing = np.asarray(reference.GetSpacing())
    origin = np.asarray(reference.GetOrigin())
    xy = origin[:2] + (np.asarray(points_xy, float) - 0.5) * spacing[:2]
    z = np.full((len(xy), 1), origin[2] + slice_index * spacing[2])
    return np.hstack([xy, z])


# --------------------------------------------------------------------------- slices -> organs


@dataclass
class OrganTrack:
    """One organ's contours through the slices: slice index -> list of (score, points (p, 2) in pixels)."""

    name: str
    slices: dict[int, list[tuple[float, np.ndarray]]] = field(default_factory=dict)

    @property
    def scores(self) -> list[float]:
        return [score for found in self.slices.values() for score, _ in found]


def collect_detections(detections, first_slice: int, tracks: dict[str, OrganTrack], settings: OrganSettings):
    """Add one batch of per-slice detections to the organs' tracks (above the score threshold only)."""
    for offset, found in enumerate(detections):
        k = first_slice + offset
        scores = found.scores.cpu().numpy()
        labels = found.labels.cpu().numpy()
        points = found.points.cpu().numpy()
        for score, label, shape in zip(scores, labels, points):
            if score < settings.score_threshold or not 1 <= label <= len(settings.organ_classes):
                continue
            name = settings.organ_classes[label - 1]
            if name not in tracks:
                continue
            kept = tracks[name].slices.setdefault(k, [])
            if name in SINGLE_BODY and kept:
                if score > kept[0][0]:
                    kept[0] = (float(score), shape)
                continue
            kept.append((float(score), shape))


def make_consistent(track: OrganTrack, min_slices: int) -> OrganTrack:
    """Bridge one-slice gaps, then keep only the longest run of consecutive slices (by summed score) if it
    has at least ``min_slices`` slices: organs are single bodies along z, isolated hits are noise."""
    slices = dict(track.slices)
    for k in sorted(slices):
        if k + 1 not in slices and k + 2 in slices:
            below, above = slices[k], slices[k + 2]
            if len(below) == len(above):  # same order of points in both: the mean contour is in between
                slices[k + 1] = [(0.5 * (a[0] + b[0]), 0.5 * (a[1] + b[1])) for a, b in zip(below, above)]
            else:
                slices[k + 1] = list(below)
    runs, run = [], []
    for k in sorted(slices):
        if run and k != run[-1] + 1:
            runs.append(run)
            run = []
        run.append(k)
    if run:
        runs.append(run)
    runs = [r for r in runs if len(r) >= min_slices]
    if not runs:
        return OrganTrack(track.name)
    best = max(runs, key=lambda r: sum(score for k in r for score, _ in slices[k]))
    return OrganTrack(track.name, {k: slices[k] for k in best})


def rasterise(track: OrganTrack, reference: sitk.Image, factor: int) -> sitk.Image | None:
    """The organ's slice contours as a 0/1 float image on a fine canonical sub-grid with an empty border
    (one slice above and below, two fine pixels around), ready for linear resampling onto any grid."""
    if not track.slices:
        return None
    fine = fine_grid(reference, factor)
    all_points = np.concatenate([shape for found in track.slices.values() for _, shape in found]) * factor
    low = np.floor(all_points.min(axis=0)).astype(int) - 2
    high = np.ceil(all_points.max(axis=0)).astype(int) + 2
    k0, k1 = min(track.slices) - 1, max(track.slices) + 1
    region = np.zeros((k1 - k0 + 1, high[1] - low[1], high[0] - low[0]), np.float32)
    for k, found in track.slices.items():
        for _, shape in found:
            region[k - k0] = np.maximum(region[k - k0], polygon_mask(shape * factor - low, region.shape[1:]))
    image = sitk.GetImageFromArray(region)
    image.SetSpacing(fine.GetSpacing())
    image.SetOrigin(fine.TransformContinuousIndexToPhysicalPoint([float(low[0]), float(low[1]), float(k0)]))
    return image


# --------------------------------------------------------------------------- the segmenter


def open_model(model=None):
    """The multi-organ model package: by name, by folder path, an open package, or the default."""
    return pipeline.open_model(model, OrganSegmenter.TASK, DEFAULT_MODEL, OrganSegmenter.STAGES, OrganSegmenter.KIND)


def offered_organs(model=None) -> list[str]:
    """The organs a model offers, in its network's class order, read from its package (no network loaded)."""
    package = open_model(model)
    settings = settings_from_package(OrganSettings, package, **OrganSegmenter.input_settings(package))
    return list(settings.organ_classes)


def choose_organs(offered: list[anatomy.Structure], organs) -> list[anatomy.Structure]:
    """The structures asked for (names, or None for all the model offers), in the model's order."""
    if organs is None:
        return list(offered)
    if isinstance(organs, str):
        organs = [o for o in organs.split(",")]
    wanted = [o.strip() for o in organs if o.strip()]
    names = [s.name for s in offered]
    unknown = [o for o in wanted if o not in names]
    if unknown:
        raise SegcoreError(f"the model offers no {', '.join(map(repr, unknown))}; it offers {', '.join(names)}")
    if not wanted:
        raise SegcoreError(f"no organs asked for; the model offers {', '.join(names)}")
    return [s for s in offered if s.name in wanted]


class OrganSegmenter(Segmenter):
    """A loaded HMR-Net model, ready to segment many images (what a batch should use)."""

    TASK = "organs"
    DEFAULT_MODEL = DEFAULT_MODEL
    STAGES = ("hmrnet",)
    KIND = "multi-organ model"
    SETTINGS = OrganSettings

    def __init__(self, model=None, device: str = "auto", organs=None):
        super().__init__(model, device)
        offered = {s.name: s for s in self.package.labels}
        missing = [name for name in self.settings.organ_classes if name not in offered]
        if missing:
            raise ModelPackageError(f"model package {self.package.name!r}: its network classes name "
                                    f"{', '.join(missing)}, which its labels do not list.")
        self.offered = [offered[name] for name in self.settings.organ_classes]
        self.organs = choose_organs(self.offered, organs)
        self.network = self.load_stage("hmrnet")
        if self.network.num_classes != len(self.settings.organ_classes):
            raise ModelPackageError(
                f"model package {self.package.name!r}: the network has {self.network.num_classes} classes, but "
                f"its pipeline names {len(self.settings.organ_classes)} organs.")

    def detect(self, volume: np.ndarray, tracks: dict[str, OrganTrack], report) -> None:
        """Run the network on every slice of the normalised canonical volume, batch by batch."""
        import torch

        batch = self.settings.batch_size
        with torch.inference_mode():
            for start in range(0, volume.shape[0], batch):
                x = torch.from_numpy(np.ascontiguousarray(volume[start:start + batch, None])).to(self.device)
                collect_detections(self.network(x), start, tracks, self.settings)
                report(min(start + batch, volume.shape[0]) / volume.shape[0])

    def segment(self, ct: sitk.Image, report: Progress, timings: dict[str, float]) -> Result:
        tick = time.perf_counter()
        report(0.05, "detecting organs slice by slice")
        reference = slice_grid(ct, self.settings)
        volume = normalise(slice_volume(ct, reference), self.settings.window)
        tracks = {s.name: OrganTrack(s.name) for s in self.organs}
        self.detect(volume, tracks, lambda done: report(0.05 + 0.75 * done, "detecting organs slice by slice"))
        timings["detect"] = time.perf_counter() - tick

        tick = time.perf_counter()
        report(0.8, "building the organs and placing them on the input grid")
        kept = {name: make_consistent(track, self.settings.min_slices) for name, track in tracks.items()}
        labelmap, contours, messages = self.place_on_input(kept, reference, ct)
        details = {name: {"slices": len(kept[name].slices), "raw_slices": len(tracks[name].slices)} for name in tracks}
        segments = self.assess(labelmap, kept, contours, messages)
        timings["paste_back"] = time.perf_counter() - tick
        confidence = float(np.mean([s.confidence for s in segments])) if segments else 0.0
        return Result(labelmap, segments, confidence, self.package.name, messages, timings, details, contours)

    def place_on_input(self, kept: dict[str, OrganTrack], reference: sitk.Image, ct: sitk.Image):
        """Each organ's contours filled and resampled onto the input grid; a voxel claimed by two organs goes
        to the one covering more of it. Returns the label map, the contours in LPS and the messages."""
        # Fractions kept as 0-255 to save memory.
        best = np.zeros(ct.GetSize()[::-1], np.uint8)
        labels = np.zeros(ct.GetSize()[::-1], np.uint8)
        contours, messages = {}, []
        for structure in self.organs:
            track = kept[structure.name]
            fraction = rasterise(track, reference, self.settings.raster_factor)
            if fraction is None:
                messages.append(f"no {structure.name.replace('_', ' ')} found.")
                continue
            where, values = imageio.resample_onto_part(fraction, ct)
            if where is None:
                continue
            quantised = np.round(values * 255).astype(np.uint8)
            wins = (values > 0.5) & (quantised > best[where])
            best[where][wins] = quantised[wins]
            labels[where][wins] = structure.value
            contours[structure.name] = [pixels_to_lps(shape, k, reference)
                                        for k, found in sorted(track.slices.items()) for _, shape in found]
        return labelmap_like(labels, ct), contours, messages

    def assess(self, labelmap: sitk.Image, kept: dict[str, OrganTrack], contours: dict, messages: list[str]):
        """Each found organ's volume and confidence (its mean detection score); says what was not found."""
        voxel_cc = float(np.prod(labelmap.GetSpacing())) / 1000.0
        counts = np.bincount(sitk.GetArrayViewFromImage(labelmap).ravel(), minlength=256)
        segments = []
        for structure in self.organs:
            volume_cc = float(counts[structure.value]) * voxel_cc
            if volume_cc > 0:
                segments.append(SegmentResult(structure, volume_cc, float(np.mean(kept[structure.name].scores))))
            elif structure.name in contours:
                messages.append(f"no {structure.name.replace('_', ' ')} found: its contours cover no input voxel.")
                contours.pop(structure.name)
        if not segments:
            messages.insert(0, "no organs found: check that the pelvis is in the field of view.")
        return segments


def segment_organs(image_or_path, model=None, organs=None, device: str = "auto",
                   progress: Progress | None = None) -> Result:
    """Segment the pelvic organs in one CT; the label map lies on the input's own grid.

    ``model`` is a package name, a package folder or None for the bundled default;
    ``organs`` a list of names (or a comma-separated string) out of those the
    model offers, None for all; ``progress(fraction, message)`` is called as the
    work advances. To segment many images, make one `OrganSegmenter` and call it
    per image.
    """
    return OrganSegmenter(model, device, organs)(image_or_path, progress)
