"""Clean-up of predicted masks (keep the largest connected piece, fill holes) and polygon rasterising."""

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


def polygon_mask(points_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (rows, columns) mask of the pixels whose centres lie inside a closed polygon.

    ``points_xy`` is (n, 2) as (x, y) in pixel coordinates, where pixel (row i,
    column j) spans [j, j + 1) x [i, i + 1) and has its centre at (j + 0.5, i + 0.5).
    Even-odd rule, evaluated only inside the polygon's bounding box."""
    mask = np.zeros(shape, bool)
    points = np.asarray(points_xy, float)
    if len(points) < 3 or not np.all(np.isfinite(points)):
        return mask
    low = np.clip(np.floor(points.min(axis=0) - 0.5).astype(int), 0, [shape[1], shape[0]])
    high = np.clip(np.ceil(points.max(axis=0) + 0.5).astype(int), 0, [shape[1], shape[0]])
    if np.any(high <= low):
        return mask
    ys = np.arange(low[1], high[1]) + 0.5
    xs = np.arange(low[0], high[0]) + 0.5
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    # For each pixel row and each edge that crosses it, where the edge meets the row.
    crosses = (y0[None, :] <= ys[:, None]) != (y1[None, :] <= ys[:, None])            # (rows, edges)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (ys[:, None] - y0[None, :]) / (y1 - y0)[None, :]
    x_at = x0[None, :] + t * (x1 - x0)[None, :]
    inside = ((xs[None, :, None] < x_at[:, None, :]) & crosses[:, None, :]).sum(axis=2) % 2 == 1
    mask[low[1]:high[1], low[0]:high[0]] = inside
    return mask
