"""Clean-up of predicted masks: keep the largest connected piece, fill holes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    labelled, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if count <= 1:
        return labelled > 0
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed cavities in 3-D and then in every slice along the first array axis (the stored
    slices: axial for an axial CT), which also closes 2-D holes that open into another slice."""
    filled = ndimage.binary_fill_holes(mask)
    for k in np.flatnonzero(filled.any(axis=tuple(range(1, mask.ndim)))):
        filled[k] = ndimage.binary_fill_holes(filled[k])
    return filled


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Largest component, then holes filled."""
    return fill_holes(largest_component(mask))


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices around the True voxels (grown by ``margin``, clipped to the array); None if empty."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(0, hit[0] - margin), min(mask.shape[axis], hit[-1] + 1 + margin)))
    return tuple(box)
