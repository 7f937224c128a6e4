"""Guided correction: include and exclude clicks refine one structure of a label map.

A small 2.5-D U-Net (the ``refine`` task; bundled package ``refine-demo``) works on
an axis-aligned 1 mm grid around the clicks. For each axial slice it sees the CT
on three neighbouring slices, the structure's current mask on the same three
slices, and two click maps (include, exclude), and predicts the structure on the
middle slice. It was trained on every phantom organ, so it refines any of them.

Clicks are encoded as disks (RITM, Sofiiuk et al. 2022, found disks better than
distance maps and Gaussians): a disk of ``click_radius_mm`` at the click's
in-plane position, on every slice within ``reach_mm`` of it, of strength 1 on
the click's own slice falling linearly to 0 at ``reach_mm``. The fading tells
the 2.5-D network how far along the body axis a click is, so that one click
corrects a slab of slices rather than one slice.

How far the mask may change: only voxels within ``reach_mm`` (12 mm) along the
body axis of a click and inside the in-plane window (a 128 mm square around the
clicks, wider when the clicks are spread wider) may change; of those, only the
ones where the network's answer differs from the current mask on the 1 mm grid,
and only ones that are background or this label. Every other voxel, and every
other label, keeps its value. The clicked voxels themselves always end up as
asked (include: the label; exclude: not the label). With exclude points only the
structure can only shrink.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from . import anatomy
from . import image as imageio
from .errors import ModelPackageError, SegcoreError
from .pipeline import (
    labelmap_like,
    normalise,
    open_model,
    read_input,
    resolve_device,
    settings_from_package,
    use_available_cores,
)
from .prostate import pad_to_multiple, paste_back, slice_stacks
from .result import Result, SegmentResult, label_volume_cc

TASK = "refine"
DEFAULT_MODEL = "refine-demo"
STAGE = "refine"
MAX_CLICKS = 100
INCLUDE, EXCLUDE = 0, 1  # the click-map channels, in this order after the CT and mask slices


@dataclass(frozen=True)
class RefineSettings:
    """How the refinement grid and the click maps are made; a package may override them in ``pipeline``."""

    window: tuple[float, float] = (-200.0, 300.0)   # HU mapped to [0, 1] (from the package's input block)
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)  # the grid (from the input block)
    slices: int = 3                  # neighbouring CT (and mask) slices the network sees
    window_mm: float = 128.0         # the in-plane window around the clicks
    reach_mm: float = 12.0           # a click acts on the slices this close to it along the body axis
    click_radius_mm: float = 5.0     # the disk drawn for a click
    threshold: float = 0.5
    max_distance_mm: float = 50.0    # a click farther than this from the structure is a mistake
    # Farther than near_mm from every click the mask changes only where the network is sure: its probability
    # more than keep_margin from the threshold (0.5: no change at all out there).
    # On two held-out phantoms 20 mm and 0.25 kept good starting masks from getting worse click by click
    # at a small cost to large corrections (bench/bench_refine.py).
    near_mm: float = 20.0
    keep_margin: float = 0.25


# --------------------------------------------------------------------------- the grid-level core


def click_maps(clicks, z_indices, shape_yx, spacing, settings: RefineSettings) -> np.ndarray:
    """The include and exclude maps of the given slices: (len(z_indices), 2, y, x) float32.

    ``clicks`` are (z, y, x, kind) in (continuous) voxel indices of the grid, kind INCLUDE or EXCLUDE;
    ``spacing`` is the grid's (x, y, z) spacing in mm. Where disks overlap, the stronger one counts.
    """
    maps = np.zeros((len(z_indices), 2) + tuple(shape_yx), np.float32)
    sx, sy, sz = (float(v) for v in spacing)
    yy = (np.arange(shape_yx[0]) * sy)[:, None]
    xx = (np.arange(shape_yx[1]) * sx)[None, :]
    for z, y, x, kind in clicks:
        disk = (yy - y * sy) ** 2 + (xx - x * sx) ** 2 <= settings.click_radius_mm ** 2
        for n, k in enumerate(z_indices):
            strength = 1.0 - abs(k - z) * sz / settings.reach_mm
            if strength > 0:
                np.maximum(maps[n, int(kind)], disk * np.float32(strength), out=maps[n, int(kind)])
    return maps


def near_clicks(clicks, z_indices, shape_yx, spacing, radius_mm: float) -> np.ndarray:
    """Which voxels of the given slices lie within ``radius_mm`` of a click: (len(z_indices), y, x) bool."""
    sx, sy, sz = (float(v) for v in spacing)
    yy = (np.arange(shape_yx[0]) * sy)[:, None]
    xx = (np.arange(shape_yx[1]) * sx)[None, :]
    near = np.zeros((len(z_indices),) + tuple(shape_yx), bool)
    for z, y, x, _ in clicks:
        in_plane = (yy - y * sy) ** 2 + (xx - x * sx) ** 2
        for n, k in enumerate(z_indices):
            left = radius_mm ** 2 - ((k - z) * sz) ** 2
            if left >= 0:
                near[n] |= in_plane <= left
    return near


def slices_reached(clicks, depth: int, spacing_z: float, settings: RefineSettings) -> np.ndarray:
    """The axial indices (of a grid ``depth`` slices deep) that some click acts on."""
    reached = np.zeros(depth, bool)
    for z, *_ in clicks:
        reached |= np.abs(np.arange(depth) - z) * spacing_z < settings.reach_mm
    return np.nonzero(reached)[0]


def network_input(ct: np.ndarray, mask: np.ndarray, clicks, z_indices, spacing,
                  settings: RefineSettings) -> np.ndarray:
    """The network's input for the given slices of a normalised CT and a 0/1 mask on the grid:
    (n, 2 * slices + 2, y, x) float32 -- CT slices, mask slices, include map, exclude map."""
    return np.concatenate([slice_stacks(ct, z_indices, settings.slices),
                           slice_stacks(mask.astype(np.float32), z_indices, settings.slices),
                           click_maps(clicks, z_indices, ct.shape[1:], spacing, settings)], axis=1)


def predict(network, ct: np.ndarray, mask: np.ndarray, clicks, spacing, settings: RefineSettings, device,
            batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The network's probability of the structure on every slice a click reaches: (indices, (n, y, x))."""
    import torch

    indices = slices_reached(clicks, ct.shape[0], float(spacing[2]), settings)
    out = np.zeros((len(indices),) + ct.shape[1:], np.float32)
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            batch, (y, x) = pad_to_multiple(network_input(ct, mask, clicks, chunk, spacing, settings),
                                            network.divisor)
            logits = network(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
            out[start:start + len(chunk)] = torch.softmax(logits.float(), 1)[:, 1, :y, :x].cpu().numpy()
    return indices, out


def refine_on_grid(network, ct: np.ndarray, mask: np.ndarray, clicks, spacing, settings: RefineSettings,
                   device) -> tuple[np.ndarray, float]:
    """The refined 0/1 mask on the grid (a new array) and the network's mean probability inside it.

    The training kit and the click benchmark call this too, so that they refine exactly as the API does.
    """
    refined = mask.astype(np.uint8, copy=True)
    if not clicks:
        return refined, 1.0
    indices, probability = predict(network, ct, mask, clicks, spacing, settings, device)
    # Away from the clicks, where the network is unsure, the current mask (perhaps drawn by hand) stays.
    unsure = np.abs(probability - settings.threshold) <= settings.keep_margin
    if settings.near_mm > 0:
        unsure &= ~near_clicks(clicks, indices, ct.shape[1:], spacing, settings.near_mm)
    refined[indices] = np.where(unsure, refined[indices], probability > settings.threshold)
    # Exclude points alone never make the structure larger: without this, an exclude point on a leak grew
    # the bladder into the muscle beside it on the phantom with lifted hip joints. Include points alone may
    # still remove voxels: a shifted mask needs both, and forbidding it cost accuracy (bench_refine.py).
    if all(click[3] == EXCLUDE for click in clicks):
        refined &= mask.astype(np.uint8)
    inside = probability[probability > settings.threshold]
    return refined, float(inside.mean()) if inside.size else 0.0


# --------------------------------------------------------------------------- checks


def _points(points, what: str) -> np.ndarray:
    try:
        array = np.asarray(list(points or []), dtype=float).reshape(-1, 3)
    except (TypeError, ValueError):
        raise SegcoreError(f"{what} points must be (x, y, z) positions in LPS millimetres, "
                           f"e.g. [(12.5, -30.0, 4.0)]; got {points!r}") from None
    if not np.all(np.isfinite(array)):
        raise SegcoreError(f"{what} points must be finite numbers; got {array.tolist()}")
    return array


def _check_labelmap(image: sitk.Image, labelmap, label) -> sitk.Image:
    if isinstance(labelmap, str) or hasattr(labelmap, "__fspath__"):
        labelmap = imageio.read_image(labelmap, kind="labels")
    if not isinstance(labelmap, sitk.Image):
        raise SegcoreError(f"expected the label map as a path or a SimpleITK image, got {type(labelmap).__name__}")
    differences = imageio.grid_differences(image, labelmap)
    if differences:
        raise SegcoreError("the label map is not on the image's grid (" + "; ".join(differences) + "): refine needs "
                           "the label map the image was segmented into; resample it onto the image first.")
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 1 <= int(label) <= 255:
        raise SegcoreError(f"label must be a whole number from 1 to 255 (0 is the background), not {label!r}")
    return imageio.as_labelmap(labelmap)


def _check_clicks(image: sitk.Image, labels: np.ndarray, label: int, include: np.ndarray, exclude: np.ndarray,
                  settings: RefineSettings) -> None:
    total = len(include) + len(exclude)
    if total > MAX_CLICKS:
        raise SegcoreError(f"{total} points were given; refine takes at most {MAX_CLICKS}. Start again from "
                           "a fresh mask, or correct large errors by hand.")
    size = np.asarray(image.GetSize())
    for what, points in (("include", include), ("exclude", exclude)):
        for point in points:
            index = np.asarray(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))
            if np.any(index < -0.5) or np.any(index > size - 0.5):
                low, high = imageio.physical_bounds(image)
                raise SegcoreError(f"the {what} point {_mm(point)} lies outside the image, which spans "
                                   f"{_mm(low)} to {_mm(high)} (LPS mm): place points on the image.")
    for point in include:
        held = int(labels[_voxel(image, point)])
        if held not in (0, label):
            known = anatomy.BY_VALUE.get(held)
            what = f"label {held} ({known.name})" if known else f"another structure (label {held})"
            raise SegcoreError(f"the include point {_mm(point)} lies in {what}, and refine never changes other "
                               "labels: correct that structure first, or place the point on background.")
    mask = labels == label
    if not len(include) and not mask.any():
        held = ", ".join(str(v) for v in np.unique(labels) if v) or "no label"
        raise SegcoreError(f"label {label} is not in the label map (it holds {held}): to create it, place an "
                           "include point where it should be.")
    for what, points in (("include", include), ("exclude", exclude)):
        for point in points:
            near_include = np.sqrt(((include - point) ** 2).sum(axis=1)).min() if len(include) else np.inf
            distance = min(near_include, _distance_to(image, mask, point, settings.max_distance_mm))
            if distance > settings.max_distance_mm:
                raise SegcoreError(
                    f"the {what} point {_mm(point)} is more than {settings.max_distance_mm:.0f} mm from label "
                    f"{label}; a point corrects the structure near it. Is it meant for another structure?")


def _distance_to(image: sitk.Image, mask: np.ndarray, point, limit_mm: float) -> float:
    """The distance (mm) from a point to the nearest voxel of ``mask``, or inf beyond ``limit_mm``; only the
    voxels of a box around the point are looked at, so a click stays fast on a large label map."""
    index = np.asarray(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))[::-1]
    reach = limit_mm / np.asarray(image.GetSpacing())[::-1] + 1
    low = np.clip(np.floor(index - reach), 0, mask.shape).astype(int)
    high = np.clip(np.ceil(index + reach) + 1, 0, mask.shape).astype(int)
    k, j, i = np.nonzero(mask[tuple(slice(a, b) for a, b in zip(low, high))])
    if not len(k):
        return np.inf
    matrix = imageio.ijk_to_lps_matrix(image)
    ijk = np.stack([i + low[2], j + low[1], k + low[0]], axis=1).astype(float)
    return float(np.sqrt((((ijk @ matrix[:3, :3].T + matrix[:3, 3]) - point) ** 2).sum(axis=1)).min())


def _voxel(image: sitk.Image, point) -> tuple[int, int, int]:
    """The (k, j, i) index of the image voxel a point lies in."""
    index = np.rint(image.TransformPhysicalPointToContinuousIndex([float(v) for v in point])).astype(int)
    return tuple(int(v) for v in np.clip(index, 0, np.asarray(image.GetSize()) - 1)[::-1])


def _mm(point) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in point) + ")"


# --------------------------------------------------------------------------- the refiner


def refinement_grid(include: np.ndarray, exclude: np.ndarray, settings: RefineSettings) -> sitk.Image:
    """The axis-aligned grid the network works on: ``window_mm`` square in-plane around the clicks (wider when
    they spread wider), from ``reach_mm`` below the lowest click to ``reach_mm`` above the highest."""
    points = np.concatenate([include.reshape(-1, 3), exclude.reshape(-1, 3)])
    low, high = points.min(axis=0), points.max(axis=0)
    spacing = np.asarray(settings.spacing_mm, float)
    extent = np.maximum(settings.window_mm, high - low + 2 * settings.click_radius_mm + 32.0)
    extent[2] = high[2] - low[2] + 2 * settings.reach_mm + (settings.slices + 1) * spacing[2]
    size = np.ceil(extent / spacing).astype(int)
    size[:2] += (-size[:2]) % 16  # whole multiples of any divisor the bundled networks need
    return imageio.centred_grid((low + high) / 2, spacing, size)


class Refiner:
    """A loaded refinement package, ready for many clicks (what Slicer keeps between clicks)."""

    def __init__(self, model=None, device: str = "auto"):
        self.package = open_model(model, TASK, DEFAULT_MODEL, (STAGE,), "refinement model")
        self.settings = settings_from_package(RefineSettings, self.package, **self.input_settings(self.package))
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            use_available_cores()
        from .pipeline import load_network

        self.network = load_network(self.package, STAGE, self.device)
        if self.device.type == "cpu":  # about a fifth faster on CPUs (oneDNN's preferred layout)
            import torch

            self.network = self.network.to(memory_format=torch.channels_last)
        if self.network.in_channels != 2 * self.settings.slices + 2 or self.network.num_classes != 2:
            raise ModelPackageError(
                f"model package {self.package.name!r}: a refinement network takes {2 * self.settings.slices + 2} "
                f"channels and predicts 2 classes, but this one takes {self.network.in_channels} and predicts "
                f"{self.network.num_classes}.")

    @staticmethod
    def input_settings(package) -> dict:
        return {"window": tuple(package.input.intensity_window), "spacing_mm": tuple(package.input.spacing_mm)}

    def __call__(self, image, labelmap, include=(), exclude=(), label: int = 1) -> Result:
        started = time.perf_counter()
        ct = read_input(image)
        labelmap = _check_labelmap(ct, labelmap, label)
        label = int(label)
        include, exclude = _points(include, "include"), _points(exclude, "exclude")
        labels = sitk.GetArrayFromImage(labelmap)
        _check_clicks(ct, labels, label, include, exclude, self.settings)
        timings = {"check": time.perf_counter() - started}
        confidence, changed = 1.0, (0, 0)
        if len(include) or len(exclude):
            confidence, changed = self._refine(ct, labels, label, include, exclude, timings)
        result = labelmap_like(labels, ct)
        timings["total"] = time.perf_counter() - started
        return self._result(result, label, confidence, changed, len(include), len(exclude), timings)

    def _refine(self, ct, labels, label, include, exclude, timings) -> tuple[float, tuple[int, int]]:
        """Refine ``labels`` (the input grid's array) in place; the confidence and the voxels added and removed."""
        tick = time.perf_counter()
        grid = refinement_grid(include, exclude, self.settings)
        hu = sitk.GetArrayFromImage(imageio.resample_like(ct, grid, "linear"))
        mask_image = labelmap_like((labels == label).astype(np.float32), ct)
        mask = sitk.GetArrayFromImage(imageio.resample_like(mask_image, grid, "linear", default_value=0.0)) > 0.5
        clicks = [(*grid.TransformPhysicalPointToContinuousIndex([float(v) for v in p])[::-1], kind)
                  for kind, points in ((INCLUDE, include), (EXCLUDE, exclude)) for p in points]
        timings["prepare"] = time.perf_counter() - tick
        tick = time.perf_counter()
        refined, confidence = refine_on_grid(self.network, normalise(hu, self.settings.window), mask, clicks,
                                             grid.GetSpacing(), self.settings, self.device)
        timings["network"] = time.perf_counter() - tick
        tick = time.perf_counter()
        add = paste_back(labelmap_like((refined & ~mask).astype(np.float32), grid), ct, 0.5)
        remove = paste_back(labelmap_like((mask & ~refined.astype(bool)).astype(np.float32), grid), ct, 0.5)
        for kind, points in ((INCLUDE, include), (EXCLUDE, exclude)):
            for point in points:  # the clicked voxels end up as asked, whatever the network said
                (add if kind == INCLUDE else remove)[_voxel(ct, point)] = True
                (remove if kind == INCLUDE else add)[_voxel(ct, point)] = False
        added = add & (labels == 0)
        removed = remove & (labels == label)
        labels[added], labels[removed] = label, 0
        timings["apply"] = time.perf_counter() - tick
        return confidence, (int(added.sum()), int(removed.sum()))

    def _result(self, labelmap, label, confidence, changed, includes, excludes, timings) -> Result:
        structure = anatomy.BY_VALUE.get(label) or anatomy.Structure(label, f"label_{label}", (128, 174, 128))
        volume = label_volume_cc(labelmap, label)
        segments = [SegmentResult(structure, volume, confidence)] if volume > 0 else []
        messages = [] if includes or excludes else ["no points: the label map is returned unchanged"]
        if not segments:
            messages.append(f"label {label} is now empty")
        return Result(labelmap, segments, confidence, self.package.name, messages, timings,
                      details={"label": label, "include": includes, "exclude": excludes,
                               "added_voxels": changed[0], "removed_voxels": changed[1]},
                      model_version=self.package.version)


@functools.lru_cache(maxsize=2)
def _cached_refiner(model, device: str) -> Refiner:
    return Refiner(model, device)


def refine(image, labelmap, include=(), exclude=(), label: int = 1, model=None, device: str = "auto") -> Result:
    """Refine label ``label`` of ``labelmap`` with include and exclude points; a new label map on the image's grid.

    ``image`` is the CT (a path or a SimpleITK image); ``labelmap`` a label map on the same grid (path or
    image); ``include`` and ``exclude`` are lists of (x, y, z) points in LPS millimetres; ``model`` a
    refinement package (name, folder or open package; default ``refine-demo``). The inputs are never
    modified. The mask changes only within ``reach_mm`` (12 mm) along the body axis of a click and within
    the in-plane window around the clicks (128 mm square), and only where the network's answer differs from
    the current mask; other labels are untouched; with no points the label map comes back unchanged; an
    include point where the label is absent creates the structure there. Bad input (points outside the
    image or more than 50 mm from the structure, more than 100 points, a label that is absent with no
    include point, a label map on another grid) raises a SegcoreError and changes nothing.
    """
    if model is None or isinstance(model, str):
        return _cached_refiner(model, device)(image, labelmap, include, exclude, label)
    return Refiner(model, device)(image, labelmap, include, exclude, label)
