"""Training cases: where they come from, the preprocessing cache, 2.5-D patch sampling and augmentation.

A case is prepared once per pipeline setting and cached as arrays in HU:
- the whole CT on the stage-1 grid (made by `segcore.prostate.coarse_image`, so
  training sees exactly what inference sees) with its label maps;
- a cube around the prostate on the stage-2 grid, ``margin_mm`` larger on each
  side than the inference crop so that patches can wander as far as a stage-1
  error would move the crop.

Folder layout (what `prostateseg phantom` writes and Slicer's "Save as training
case" writes): ``<name>_ct.<ext>`` with ``<name>_labels.<ext>`` beside it, ext
one of nii.gz, nii, nrrd, mha. Labels follow ProstateSeg's values (prostate = 1)
unless ``prostate_label`` says otherwise; all other labels are kept and used
only to randomise intensities per tissue.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segcore import image as imageio
from segcore.dataset import find_training_cases
from segcore.errors import SegcoreError
from segcore.files import atomic_output
from segcore.prostate import PipelineSettings, coarse_image, crop_reference

CACHE_VERSION = 1


@dataclass
class PreparedCase:
    """One case's arrays, (z, y, x), CT in HU (int16), masks uint8."""

    case_id: str
    coarse_ct: np.ndarray
    coarse_target: np.ndarray
    coarse_tissue: np.ndarray
    coarse_spacing: tuple
    fine_ct: np.ndarray
    fine_target: np.ndarray
    fine_tissue: np.ndarray
    fine_spacing: tuple


@dataclass(frozen=True)
class CaseSource:
    """Where a case comes from: a phantom seed or a CT/label file pair."""

    case_id: str
    phantom_seed: int | None = None
    phantom_matrix: int = 512
    ct_path: str | None = None
    labels_path: str | None = None
    prostate_label: int = 1

    def load(self) -> tuple[sitk.Image, sitk.Image]:
        if self.phantom_seed is not None:
            from segcore.phantom import make_phantom

            case = make_phantom(self.phantom_seed, matrix=self.phantom_matrix)
            return case.ct, case.labels
        ct = imageio.read_image(self.ct_path, kind="ct")
        labels = imageio.read_image(self.labels_path, kind="labels")
        if not imageio.same_grid(ct, labels):
            raise SegcoreError(f"{self.labels_path} is not on the grid of {self.ct_path}: "
                               f"{'; '.join(imageio.grid_differences(ct, labels))}")
        return ct, labels

    def describe(self) -> dict:
        """Everything that identifies the case's data; for files also their size and time, so that a label
        map corrected in place is prepared again."""
        out = {k: v for k, v in self.__dict__.items() if v is not None}
        if self.phantom_seed is not None:   # a changed phantom makes other cases from the same seed
            from segcore.phantom import source_digest

            out["phantom_source"] = source_digest()
        for key in ("ct_path", "labels_path"):
            if out.get(key) and Path(out[key]).exists():
                stat = Path(out[key]).stat()
                out[key + "_stat"] = [stat.st_size, stat.st_mtime_ns]
        return out


def phantom_sources(seed: int, count: int, matrix: int = 512) -> list[CaseSource]:
    return [CaseSource(f"phantom{seed + i:05d}", phantom_seed=seed + i, phantom_matrix=matrix) for i in range(count)]


def folder_sources(folder, prostate_label: int = 1) -> list[CaseSource]:
    """Every ``<name>_ct.<ext>`` / ``<name>_labels.<ext>`` pair in a folder (sorted by name)."""
    sources = [CaseSource(name, ct_path=str(ct), labels_path=str(labels), prostate_label=prostate_label)
               for name, ct, labels in find_training_cases(folder)]
    if not sources:
        raise SegcoreError(f"no training cases in {folder}: expected <name>_ct.nii.gz with <name>_labels.nii.gz")
    return sources


def case_sources(config: dict) -> tuple[list[CaseSource], list[CaseSource], str]:
    """Training and validation cases of a run's ``data`` section, and a sentence for model.json saying
    what they are: phantoms by seed, or a folder's pairs (the last ``validation_cases`` of them kept for
    validation unless ``validation_folder`` is given)."""
    spec = config["data"]
    if spec["source"] == "phantom":
        train = phantom_sources(spec["seed"], spec["cases"], spec["matrix"])
        val = phantom_sources(spec["validation_seed"], spec["validation_cases"], spec["matrix"])
        text = (f"digital pelvis phantoms (segcore.phantom), training seeds {spec['seed']}-"
                f"{spec['seed'] + spec['cases'] - 1}, validation seeds {spec['validation_seed']}-"
                f"{spec['validation_seed'] + spec['validation_cases'] - 1}, matrix {spec['matrix']}")
        return train, val, text
    if spec["source"] == "folder":
        train = folder_sources(spec["folder"], spec.get("prostate_label", 1))
        if spec.get("validation_folder"):
            val = folder_sources(spec["validation_folder"], spec.get("prostate_label", 1))
        else:
            count = max(1, spec["validation_cases"])
            if len(train) <= count:
                raise SegcoreError(f"{len(train)} cases are too few to keep {count} for validation")
            train, val = train[:-count], train[-count:]
        return train, val, f"{len(train)} training / {len(val)} validation cases from {spec['folder']}"
    raise SegcoreError(f"data.source must be 'phantom' or 'folder', not {spec['source']!r}")


def prepare_case(source: CaseSource, settings: PipelineSettings, margin_mm: float) -> PreparedCase:
    """Resample one case onto the stage-1 grid and a stage-2 cube around its prostate."""
    ct, labels = source.load()
    prostate = sitk.Equal(labels, source.prostate_label)
    if not np.any(sitk.GetArrayViewFromImage(prostate)):
        raise SegcoreError(f"case {source.case_id} has no voxel of prostate label {source.prostate_label}")
    coarse = coarse_image(ct, settings)
    coarse_labels = imageio.resample_like(labels, coarse, "label")
    # The fine cube is centred on the prostate's centroid (what a perfect stage 1 would find).
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(prostate, sitk.sitkUInt8))
    center = np.asarray(stats.GetCentroid(1)) + np.asarray(settings.crop_offset_mm)  # as inference places it
    wide = replace(settings, crop_mm=tuple(c + 2 * margin_mm for c in settings.crop_mm))
    reference = crop_reference(center, wide)
    fine = imageio.resample_like(ct, reference, "linear")
    fine_labels = imageio.resample_like(labels, reference, "label")

    def hu(img):
        return np.clip(np.rint(sitk.GetArrayViewFromImage(img)), -1024, 3071).astype(np.int16)

    def lab(img):
        return np.clip(sitk.GetArrayViewFromImage(img), 0, 255).astype(np.uint8)

    coarse_tissue, fine_tissue = lab(coarse_labels), lab(fine_labels)
    return PreparedCase(
        case_id=source.case_id,
        coarse_ct=hu(coarse), coarse_target=(coarse_tissue == source.prostate_label).astype(np.uint8),
        coarse_tissue=coarse_tissue, coarse_spacing=coarse.GetSpacing(),
        fine_ct=hu(fine), fine_target=(fine_tissue == source.prostate_label).astype(np.uint8),
        fine_tissue=fine_tissue, fine_spacing=reference.GetSpacing(),
    )


def cache_key(source: CaseSource, settings: PipelineSettings, margin_mm: float) -> str:
    """A hash of what shapes a prepared case: its source and the grids (not thresholds or windows)."""
    grids = {k: list(getattr(settings, k)) for k in ("coarse_spacing_mm", "fine_spacing_mm", "crop_mm")}
    if any(settings.crop_offset_mm):  # (absent from older keys, which stay valid)
        grids["crop_offset_mm"] = list(settings.crop_offset_mm)
    key_data = {"v": CACHE_VERSION, "source": source.describe(), "grids": grids, "margin": margin_mm}
    return hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]


def cached_case(source: CaseSource, settings: PipelineSettings, margin_mm: float, cache_dir) -> PreparedCase:
    """`prepare_case`, cached on disk under a key of everything that affects the arrays."""
    path = Path(cache_dir) / f"{source.case_id}-{cache_key(source, settings, margin_mm)}.npz"
    if path.is_file():
        with np.load(path) as data:
            return PreparedCase(case_id=source.case_id,
                                coarse_spacing=tuple(data["coarse_spacing"]), fine_spacing=tuple(data["fine_spacing"]),
                                **{k: data[k] for k in ("coarse_ct", "coarse_target", "coarse_tissue",
                                                        "fine_ct", "fine_target", "fine_tissue")})
    case = prepare_case(source, settings, margin_mm)
    with atomic_output(path, overwrite=True) as tmp:
        np.savez(tmp, **{k: v for k, v in case.__dict__.items() if k != "case_id"})
    return case


def class_targets(tissue: np.ndarray, values) -> np.ndarray:
    """Class indices for a multi-organ network: class k where the label map holds ``values[k - 1]``."""
    lookup = np.zeros(256, np.uint8)
    for k, value in enumerate(values, start=1):
        lookup[value] = k
    return lookup[tissue]


# --------------------------------------------------------------------------- patches


@dataclass
class PatchSpec:
    """How one stage samples 2.5-D patches."""

    size: int = 64               # in-plane patch size (voxels)
    slices: int = 3              # stacked neighbouring slices
    foreground_fraction: float = 0.5
    jitter: int = 24             # in-plane offset (voxels) of foreground-centred patches
    z_margin: int = 0            # slices beyond the prostate's top and bottom that may be patch centres
    # Share of patches from a scan that ends (inferiorly) inside or just below the prostate, as real
    # planning CTs sometimes do: slices below the cut do not exist and the stack repeats the last one.
    cut_probability: float = 0.0
    # How far up the gland such a cut may lie, as a fraction of the prostate's height: 0.5 keeps at
    # least its upper half in the scan; an abdominal CT that stops at the femoral heads keeps less.
    cut_reach: float = 0.5


def sample_patches(ct: np.ndarray, tissue: np.ndarray, target: np.ndarray, count: int, spec: PatchSpec,
                   rng: np.random.Generator, region: tuple | None = None):
    """``count`` patches: HU (count, slices, size, size), tissue labels of the same shape, target (count, size, size).

    Half (``foreground_fraction``) are centred near a prostate voxel; the rest at
    random inside ``region`` (a (z, y, x) tuple of slices; default the whole
    volume), limited in z to the prostate's extent plus ``z_margin``. Outside
    the volume the CT is air and the labels background; slices repeat at the
    top and bottom as they do in inference.
    """
    fg = np.argwhere(target > 0)
    zs = fg[:, 0]
    z_low, z_high = max(0, zs.min() - spec.z_margin), min(ct.shape[0] - 1, zs.max() + spec.z_margin)
    region = region or tuple(slice(0, n) for n in ct.shape)
    half = spec.size // 2
    centers = np.empty((count, 3), int)
    cuts = np.zeros(count, int)
    for n in range(count):
        if spec.cut_probability and rng.random() < spec.cut_probability:
            # k grows superiorly on the canonical grids: cut between just below the prostate and cut_reach
            # of its height
            top = zs.min() + int(spec.cut_reach * (zs.max() - zs.min()))
            cuts[n] = rng.integers(max(0, zs.min() - 2), top + 1)
        usable = fg[fg[:, 0] >= cuts[n]]
        if rng.random() < spec.foreground_fraction:
            z, y, x = usable[rng.integers(len(usable))]
            y += rng.integers(-spec.jitter, spec.jitter + 1)
            x += rng.integers(-spec.jitter, spec.jitter + 1)
        else:
            z = rng.integers(max(z_low, region[0].start, cuts[n]), min(z_high, region[0].stop - 1) + 1)
            y = rng.integers(region[1].start, region[1].stop)
            x = rng.integers(region[2].start, region[2].stop)
        centers[n] = z, y, x
    offsets = np.arange(spec.slices) - spec.slices // 2
    images = np.full((count, spec.slices, spec.size, spec.size), -1024, np.int16)
    tissues = np.zeros(images.shape, np.uint8)
    targets = np.zeros((count, spec.size, spec.size), np.uint8)
    for n, ((z, y, x), cut) in enumerate(zip(centers, cuts)):
        ys, xs = slice(y - half, y - half + spec.size), slice(x - half, x - half + spec.size)
        src_y = slice(max(0, ys.start), min(ct.shape[1], ys.stop))
        src_x = slice(max(0, xs.start), min(ct.shape[2], xs.stop))
        dst_y = slice(src_y.start - ys.start, src_y.stop - ys.start)
        dst_x = slice(src_x.start - xs.start, src_x.stop - xs.start)
        if src_y.stop <= src_y.start or src_x.stop <= src_x.start:
            continue
        zz = np.clip(z + offsets, cut, ct.shape[0] - 1)
        images[n, :, dst_y, dst_x] = ct[zz, src_y, src_x]
        tissues[n, :, dst_y, dst_x] = tissue[zz, src_y, src_x]
        targets[n, dst_y, dst_x] = target[z, src_y, src_x]
    return images, tissues, targets


# --------------------------------------------------------------------------- augmentation


# Spread (HU) of the per-tissue intensity offsets by catalogue label: bone varies
# most between scanners and patients, fat next, soft tissue least; label 0 (other
# soft tissue and air) shifts like soft tissue, which clipping makes harmless in air.
_BONE = (4, 5, 7, 8, 9, 10, 11)


def tissue_sigmas(soft: float = 10.0, fat: float = 20.0, bone: float = 60.0) -> np.ndarray:
    sigmas = np.full(256, soft, np.float32)
    sigmas[13] = fat
    sigmas[list(_BONE)] = bone
    sigmas[[15, 16]] = 0.0  # metal and couch are what they are
    return sigmas


@dataclass
class AugmentSpec:
    tissue_probability: float = 0.8
    tissue_sigmas: tuple = (10.0, 20.0, 60.0)   # soft, fat, bone
    contrast: tuple = (0.9, 1.1)
    shift_hu: float = 10.0
    noise_hu: float = 12.0
    flip: bool = True
    rotate_deg: float = 10.0
    scale: tuple = (0.9, 1.1)
    spatial_probability: float = 0.5


def augment(images: np.ndarray, tissues: np.ndarray, targets: np.ndarray, spec: AugmentSpec,
            rng: np.random.Generator):
    """SynthSeg-style per-tissue intensity randomisation, contrast/shift/noise, left-right flip and a
    small in-plane rotation/scale. Works in HU; returns float32 HU and int64 targets (torch tensors)."""
    import torch
    from torch.nn import functional as F

    count = images.shape[0]
    hu = images.astype(np.float32)
    sigmas = tissue_sigmas(*spec.tissue_sigmas)
    for n in range(count):
        if rng.random() < spec.tissue_probability:
            offsets = rng.standard_normal(256).astype(np.float32) * sigmas
            hu[n] += offsets[tissues[n]]
    body = hu > -500  # keep air as air
    gain = rng.uniform(*spec.contrast, size=(count, 1, 1, 1)).astype(np.float32)
    shift = (rng.standard_normal((count, 1, 1, 1)) * spec.shift_hu).astype(np.float32)
    noise = rng.standard_normal(hu.shape).astype(np.float32) * rng.uniform(0, spec.noise_hu, (count, 1, 1, 1)).astype(np.float32)
    hu = np.where(body, hu * gain + shift, hu) + noise
    targets = targets.astype(np.int64)
    if spec.flip:
        flip = rng.random(count) < 0.5
        hu[flip] = hu[flip][..., ::-1]
        targets[flip] = targets[flip][..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(hu))
    y = torch.from_numpy(np.ascontiguousarray(targets))
    move = rng.random(count) < spec.spatial_probability
    if move.any():
        angle = np.deg2rad(rng.uniform(-spec.rotate_deg, spec.rotate_deg, count)) * move
        scale = np.where(move, rng.uniform(*spec.scale, count), 1.0)
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        theta = torch.tensor(np.stack([np.stack([cos, -sin, np.zeros(count)], 1),
                                       np.stack([sin, cos, np.zeros(count)], 1)], 1), dtype=torch.float32)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x + 1024.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1024.0
        y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[:, 0].long()
    return x, y
