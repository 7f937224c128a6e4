"""Shapes and the canvas of the digital pelvis phantom.

Each shape returns an (approximate) signed distance in mm, negative inside, in the patient frame
(millimetres centred on the prostate: x to the patient's left, y posterior, z superior). The canvas
evaluates them at the voxel centres of a scanner grid and composites tissues back to front with soft
edges (partial volume).
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from segcore import anatomy

L = {s.name: s.value for s in anatomy.STRUCTURES}

# Whole-volume arrays are worked on in slabs of about this many voxels: one 512 x 512 slice, so that a
# slab's float32 temporaries (1 MB each) stay in the CPU's cache instead of streaming through memory.
SLAB_VOXELS = 512 * 512


def threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def in_slabs(shape, work) -> None:
    """Call `work(rows)` for slabs of rows (first axis) of an array of `shape`, in threads (numpy's
    element-wise functions release the GIL). Only for element-wise work, which then gives the same result,
    bit for bit, as in one piece."""
    rows = max(1, SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
    slabs = [slice(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]
    if len(slabs) <= 1:
        for slab in slabs:
            work(slab)
        return
    with ThreadPoolExecutor(threads()) as pool:
        list(pool.map(work, slabs))


def rows_of(array, rows):
    """`array[rows]`, or the whole of a scalar or of an array broadcast along the first axis."""
    return array if np.ndim(array) == 0 or array.shape[0] == 1 else array[rows]


def norm(*components):
    return np.sqrt(sum(c * c for c in components))


def ellipsoid(x, y, z, center, radii, rotation=None):
    px, py, pz = x - center[0], y - center[1], z - center[2]
    if rotation is not None:  # rotation columns are the ellipsoid's axes
        r = rotation
        px, py, pz = (
            r[0, 0] * px + r[1, 0] * py + r[2, 0] * pz,
            r[0, 1] * px + r[1, 1] * py + r[2, 1] * pz,
            r[0, 2] * px + r[1, 2] * py + r[2, 2] * pz,
        )
    a, b, c = radii
    k0 = norm(px / a, py / b, pz / c)
    k1 = norm(px / (a * a), py / (b * b), pz / (c * c))
    # k0 (k0 - 1) / k1 is a good distance estimate near the surface and never 0/0
    # away from the centre; at the exact centre use -min radius.
    return np.where(k1 > 1e-9, k0 * (k0 - 1) / np.maximum(k1, 1e-9), -min(radii)).astype(np.float32)


def capsule(x, y, z, a, b, r0, r1=None):
    """Distance to a segment a-b with radius going from r0 (at a) to r1 (at b)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    ba = b - a
    pax, pay, paz = x - a[0], y - a[1], z - a[2]
    h = np.clip((pax * ba[0] + pay * ba[1] + paz * ba[2]) / float(ba @ ba), 0, 1)
    radius = r0 if r1 is None else r0 + (r1 - r0) * h
    return norm(pax - ba[0] * h, pay - ba[1] * h, paz - ba[2] * h) - radius


def oriented_box(x, y, z, center, axes, half):
    px, py, pz = x - center[0], y - center[1], z - center[2]
    q = [np.abs(axes[0, i] * px + axes[1, i] * py + axes[2, i] * pz) - half[i] for i in range(3)]
    outside = norm(*(np.maximum(qi, 0) for qi in q))
    return outside + np.minimum(np.maximum(np.maximum(q[0], q[1]), q[2]), 0)


def rotation_from(first, second):
    """Orthonormal frame whose first axis is `first` and second lies towards `second`."""
    u = np.asarray(first, float)
    u /= np.linalg.norm(u)
    v = np.asarray(second, float) - u * (u @ second)
    v /= np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)], axis=1)


# --------------------------------------------------------------------------- canvas


class Canvas:
    """A voxel grid with broadcastable patient-frame coordinates, an HU image and
    a label map; shapes are painted back to front inside their bounding boxes."""

    def __init__(self, size_ijk, spacing, origin, direction, patient_center, patient_rotation):
        self.size = tuple(int(s) for s in size_ijk)
        self.spacing = np.asarray(spacing, float)
        self.origin = np.asarray(origin, float)
        self.direction = np.asarray(direction, float)
        self.rotation = np.asarray(patient_rotation, float)   # scanner offset from the centre = R u
        # patient-frame u = R^T (p - c) with p = origin + D diag(spacing) idx
        self.matrix = patient_rotation.T @ self.direction @ np.diag(self.spacing)
        self.offset = patient_rotation.T @ (self.origin - patient_center)
        index = [np.arange(n, dtype=np.float32) for n in self.size]
        shapes = [(1, 1, -1), (1, -1, 1), (-1, 1, 1)]  # numpy order is (k, j, i)
        self.coords = []
        for a in range(3):
            value = np.full((1, 1, 1), self.offset[a], np.float32)
            for m in range(3):
                if abs(self.matrix[a, m]) > 1e-9:
                    value = value + np.float32(self.matrix[a, m]) * index[m].reshape(shapes[m])
            self.coords.append(value)
        shape_kji = self.size[::-1]
        self.hu = np.full(shape_kji, -1000.0, np.float32)
        self.labels = np.zeros(shape_kji, np.uint8)
        self.edge = float(np.mean(self.spacing))  # partial-volume width
        self._inverse = np.linalg.inv(self.matrix)

    def box(self, low, high, margin=3.0):
        """numpy slices of the voxels whose patient coordinates may lie in [low, high]."""
        low, high = np.asarray(low, float) - margin, np.asarray(high, float) + margin
        corners = np.array(list(itertools.product(*zip(low, high))))
        index = (corners - self.offset) @ self._inverse.T
        lo = np.floor(index.min(axis=0)).astype(int)
        hi = np.ceil(index.max(axis=0)).astype(int) + 1
        lo = np.clip(lo, 0, self.size)
        hi = np.clip(hi, 0, self.size)
        if np.any(hi <= lo):
            return None
        return tuple(slice(lo[m], hi[m]) for m in (2, 1, 0))

    def xyz(self, box):
        out = []
        for c in self.coords:
            out.append(c[tuple(s if n > 1 else slice(None) for s, n in zip(box, c.shape))])
        return out

    def occupancy(self, sd):
        """The fraction of each voxel inside: 1 deep inside, 0 outside, linear over one voxel's width."""
        occ = np.multiply(sd, np.float32(-1.0 / self.edge), dtype=np.float32)
        occ += np.float32(0.5)
        return np.clip(occ, 0.0, 1.0, out=occ)

    def paint(self, box, sd, hu, label=None):
        """Composite tissue of value `hu` (scalar or array) with soft edges; label voxels more than half
        inside. `sd` is the signed distance over `box`, or a function giving it over some rows of `box`
        (then no whole-box temporary is made)."""
        self._composite(box, sd if callable(sd) else (lambda rows: rows_of(sd, rows)), hu, label)

    def shape(self, low, high, distance, hu, label=None):
        """Paint a shape given its patient-frame box and (element-wise) distance function."""
        box = self.box(low, high)
        if box is None:
            return
        self._composite(box, self._distance_in_rows(box, distance), hu, label)

    def _distance_in_rows(self, box, distance):
        """`distance` as a function of some rows of `box`."""
        x, y, z = self.xyz(box)
        return lambda rows: distance(rows_of(x, rows), rows_of(y, rows), rows_of(z, rows))

    def _composite(self, box, sd_of, hu, label) -> None:
        """`paint` slab by slab: `sd_of(rows)` is the signed distance over those rows of `box`."""
        region, labels = self.hu[box], self.labels[box]
        hu = np.float32(hu) if np.isscalar(hu) else hu

        def work(rows):
            sd, part = sd_of(rows), region[rows]
            change = np.subtract(rows_of(hu, rows), part, dtype=np.float32)
            change *= self.occupancy(sd)
            part += change
            if label is not None:
                np.copyto(labels[rows], np.uint8(label), where=np.broadcast_to(sd < 0, part.shape))

        in_slabs(region.shape, work)

    def compartment(self, low, high, distance, hu, label, rim_hu, rim_mm):
        """A muscle compartment: the shape of value `hu`, its outer `rim_mm` a fat plane (`rim_hu`) that
        separates it from the neighbours it overlaps. One compositing pass."""
        box = self.box(low, high)
        if box is None:
            return
        sd_of = self._distance_in_rows(box, distance)
        region, labels = self.hu[box], self.labels[box]

        def work(rows):
            sd = sd_of(rows)
            part, part_labels = region[rows], labels[rows]
            rim = 1.0 - self.occupancy(sd + np.float32(rim_mm))
            target = rim * np.float32(rim_hu - hu)
            target += np.float32(hu)
            target -= part
            target *= self.occupancy(sd)
            part += target
            np.copyto(part_labels, np.uint8(label), where=sd < -rim_mm)
            np.copyto(part_labels, np.uint8(L["fat"]), where=(sd < 0) & (sd >= -rim_mm))

        in_slabs(region.shape, work)

    def texture(self, box, scale_mm, rng):
        """Smooth random field in [0, 1] over `box`, correlation length about scale_mm."""
        shape = tuple(s.stop - s.start for s in box)
        spacing_kji = self.spacing[::-1]
        coarse = [max(2, int(np.ceil(n * sp / scale_mm)) + 1) for n, sp in zip(shape, spacing_kji)]
        field_ = rng.random(coarse).astype(np.float32)
        zoomed = ndimage.zoom(field_, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=True, mode="nearest")
        return zoomed[: shape[0], : shape[1], : shape[2]]
