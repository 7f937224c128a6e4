"""Simulated users for guided correction: where the next click goes, and the imperfect masks clicks start from.

The click protocol is the one interactive-segmentation papers evaluate with
(Xu et al. 2016, "Deep Interactive Object Selection"; Sofiiuk et al. 2022, RITM;
DeepEdit in MONAI Label): the next click goes to the point of the largest error
region that lies farthest from that region's border, as an include click when
it is a missed part of the structure and an exclude click when it is a false
one. Training, validation (`training.train_refine`) and the benchmark
(`bench/bench_refine.py`) all use these functions.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from segcore.refinement import EXCLUDE, INCLUDE


def next_click(mask: np.ndarray, truth: np.ndarray, spacing_zyx, rng: np.random.Generator | None = None,
               spread: float = 0.0):
    """The next click as ((z, y, x), kind) on the arrays' grid, or None when the mask is already the truth.

    ``spacing_zyx`` is the voxel size in mm in array order. With ``rng`` and ``spread`` > 0 the click falls
    at random among the points at least (1 - spread) times as deep in the error region as the deepest one
    (training uses this for variety; evaluation keeps the deepest point).
    """
    error = mask.astype(bool) != truth.astype(bool)
    if not error.any():
        return None
    labelled, count = ndimage.label(error)
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)[1:]
    biggest = int(np.argmax(sizes)) + 1
    box = ndimage.find_objects(labelled, max_label=biggest)[biggest - 1]
    region = np.pad(labelled[box] == biggest, 1)
    depth = ndimage.distance_transform_edt(region, sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
    if rng is not None and spread > 0:
        candidates = np.argwhere(depth >= (1.0 - spread) * depth.max())
        local = candidates[rng.integers(len(candidates))]
    else:
        local = np.unravel_index(int(np.argmax(depth)), depth.shape)
    point = tuple(int(v) + s.start for v, s in zip(local, box))
    return point, INCLUDE if truth[point] else EXCLUDE


def shifted(mask: np.ndarray, shift_mm, spacing_zyx) -> np.ndarray:
    """The mask moved by ``shift_mm`` (z, y, x) millimetres (what enters from outside is background)."""
    voxels = np.asarray(shift_mm, float) / np.asarray(spacing_zyx, float)
    return ndimage.shift(mask.astype(np.float32), voxels, order=1, mode="constant", cval=0.0) > 0.5


def grown(mask: np.ndarray, mm: float, spacing_zyx) -> np.ndarray:
    """The mask grown by ``mm`` (shrunk when negative), by the Euclidean distance to its border."""
    mask = mask.astype(bool)
    if mm == 0 or not mask.any():
        return mask.copy()
    if mm > 0:
        return ndimage.distance_transform_edt(~mask, sampling=spacing_zyx) <= mm
    return ndimage.distance_transform_edt(mask, sampling=spacing_zyx) > -mm


def poor_mask(truth: np.ndarray, spacing_zyx, rng: np.random.Generator, shift_mm: float = 5.0,
              erode_mm: float = 2.0) -> np.ndarray:
    """A deliberately poor mask: the truth shifted ``shift_mm`` in a random direction and eroded ``erode_mm``
    (what the benchmark and the training's validation start from)."""
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    return grown(shifted(truth, direction * shift_mm, spacing_zyx), -erode_mm, spacing_zyx)


def perturbed_mask(truth: np.ndarray, spacing_zyx, rng: np.random.Generator) -> np.ndarray:
    """A random imperfect mask for training: nothing at all (one in ten), or the truth shifted up to 6 mm,
    grown or shrunk by up to 3 mm, and missing a run of slices, each with probability one half (at least one
    of them)."""
    if rng.random() < 0.1:
        return np.zeros(truth.shape, bool)
    mask = truth.astype(bool)
    changes = rng.random(3) < 0.5
    if not changes.any():
        changes[rng.integers(3)] = True
    if changes[0]:
        direction = rng.standard_normal(3)
        mask = shifted(mask, direction / np.linalg.norm(direction) * rng.uniform(1.0, 6.0), spacing_zyx)
    if changes[1]:
        mask = grown(mask, rng.choice([-1, 1]) * rng.uniform(1.0, 3.0), spacing_zyx)
    if changes[2]:
        zs = np.nonzero(mask.any(axis=(1, 2)))[0]
        if len(zs):
            run = int(rng.integers(2, 11))
            start = int(rng.integers(zs.min() - run // 2, zs.max() + 1))
            mask[max(0, start):max(0, start + run)] = False
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """DSC of two masks; 1 when both are empty."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0
