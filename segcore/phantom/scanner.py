"""The scanner of the phantom: the grid (field of view, spacing, 1-5 mm slices, storage orientation), the
tube voltage's HU shifts, and the image's flaws: beam hardening (cupping, the dark band between the hips),
the reconstruction kernel (blur, edge overshoot, noise texture), dose-dependent noise, a truncated field of
view."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from segcore.phantom.shapes import Canvas, in_slabs, norm, rows_of, threads

MIN_HU = -1024

# Orientations a scanner or converter may store (index axis -> physical axis, with sign). LPS is DICOM's
# usual layout, RAS what many NIfTI converters write, "feet first" has the slices reversed, the last two
# are reformats.
ORIENTATIONS = {
    "LPS": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "RAS": ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),
    "LPI": ((1, 0, 0), (0, 1, 0), (0, 0, -1)),
    "coronal": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1), (1, 0, 0)),
}

# What a caller may force, with the values allowed (see make_phantom's `options`).
OPTIONS = {
    "kernel": ("soft", "standard", "sharp"),
    "kvp": (100, 120, 140),
    "truncated_fov": (False, True),
}

# Reconstruction kernels: in-plane blur (voxels), edge overshoot, noise correlation (voxels) and the noise
# they give at the same dose, relative to a standard kernel. Soft kernels smooth edges and noise into
# blotches; sharp (bone) kernels keep edges with an overshoot and give fine-grained, stronger noise.
KERNELS = {
    "soft": (0.9, 0.0, 1.2, 0.75),
    "standard": (0.6, 0.25, 0.8, 1.0),
    "sharp": (0.45, 0.8, 0.55, 1.6),
}

# HU at 100 and 140 kVp relative to 120 kVp: bone and iodine attenuate more at lower energy; fat reads a
# little lower and water-like tissue hardly moves (energy dependence of photoelectric absorption).
_KVP_SCALE = {100: {"cortical": 1.12, "cancellous": 1.08, "contrast": 1.3},
              140: {"cortical": 0.93, "cancellous": 0.95, "contrast": 0.85}}
_KVP_SHIFT = {100: {"fat": -8.0, "soft": 2.0}, 140: {"fat": 5.0, "soft": -1.0}}
_SOFT = ("muscle", "skin", "prostate", "seminal_vesicles", "bladder_wall", "rectal_wall")


@dataclass
class Scan:
    size: tuple
    spacing: tuple
    origin: np.ndarray       # relative to the patient's position in the scanner
    direction: np.ndarray
    orientation: str
    kernel: str
    kvp: int
    noise_hu: float
    truncated_fov: bool
    cupping_hu: float
    hardening_hu: float

    def info(self) -> dict:
        return {"kernel": self.kernel, "kvp": self.kvp, "noise_hu": round(self.noise_hu, 2),
                "slice_mm": round(float(self.spacing[int(np.argmax(np.abs(self.direction[2])))]), 3),
                "truncated_fov": self.truncated_fov, "cupping_hu": round(self.cupping_hu, 1),
                "hardening_hu": round(self.hardening_hu, 1)}


def draw_scan(rng, matrix, spacing, orientation, oblique, patient: dict, options: dict) -> Scan:
    """Field of view, spacing, extent, storage orientation, kernel, tube voltage and dose of one scan."""
    u = rng.uniform
    kernel = str(rng.choice(list(KERNELS), p=[0.3, 0.55, 0.15]))
    kvp = int(rng.choice([100, 120, 140], p=[0.15, 0.7, 0.15]))
    truncated = bool(rng.random() < 0.06)
    # the scan's own field: round the body, or cut short of it (a bariatric patient, a small field)
    body_width = 2 * 178 * patient["body_scale"]
    fov_full, fov_cut = u(420, 520) * max(1.0, patient["body_scale"]), body_width * u(0.82, 0.95)
    # 1-5 mm slices; planning CTs are mostly 1-3 mm
    thickness = float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
                                 p=[0.15, 0.05, 0.1, 0.25, 0.15, 0.2, 0.05, 0.05]))
    z_low = u(-105, -70) if rng.random() > 0.1 else u(-230, -150)   # some scans reach down the thighs
    z_high = u(105, 150)
    center_shift = np.array([u(-15, 15), u(-25, 5), 0.0])
    drawn_orientation = str(rng.choice(list(ORIENTATIONS), p=[0.45, 0.35, 0.1, 0.05, 0.05]))
    angles = u(-0.35, 0.35, 3)  # drawn always, used when oblique: same field either way
    base_noise, cupping, hardening = u(10, 30), u(0, 10), u(0, 35)
    kernel, kvp, truncated = options.get("kernel", kernel), options.get("kvp", kvp), options.get("truncated_fov", truncated)
    for name, value in (("kernel", kernel), ("kvp", kvp), ("truncated_fov", truncated)):
        if value not in OPTIONS[name]:
            raise ValueError(f"phantom option {name} must be one of {list(OPTIONS[name])}, not {value!r}")
    fov = fov_cut if truncated else fov_full
    if spacing is None:
        in_plane = fov / matrix
        thickness = thickness if in_plane < 1.6 else in_plane * u(0.9, 1.2)
        spacing = (in_plane, in_plane, thickness)
    spacing = tuple(float(v) for v in np.broadcast_to(np.asarray(spacing, float), (3,)))
    size_lps = (int(matrix), int(matrix), int(np.ceil((z_high - z_low) / spacing[2])))
    if orientation == "random":
        orientation = drawn_orientation
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be 'random' or one of {list(ORIENTATIONS)}, not {orientation!r}")
    columns = np.asarray(ORIENTATIONS[orientation], float).T  # direction[:, index axis]
    if oblique:
        columns = euler_rotation(angles) @ columns
    phys = [int(np.argmax(np.abs(columns[:, m]))) for m in range(3)]  # index axis m runs along phys[m]
    size = tuple(size_lps[phys[m]] for m in range(3))
    grid_spacing = tuple(spacing[phys[m]] for m in range(3))
    extent = columns @ (np.asarray(grid_spacing) * (np.asarray(size) - 1))
    origin = center_shift + np.array([0, 0, (z_low + z_high) / 2]) - extent / 2
    # noise grows with the patient's size at a given dose, and with the kernel's sharpness
    noise = float(np.clip(base_noise * patient["body_scale"] ** 1.5 * KERNELS[kernel][3], 6, 70))
    return Scan(size, grid_spacing, origin, columns, orientation, kernel, kvp, noise, truncated, cupping, hardening)


def euler_rotation(angles):
    """The rotation matrix Rz @ Ry @ Rx for angles (x, y, z) in radians, about the fixed axes."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def hu_at_kvp(hu: dict, kvp: int) -> dict:
    """The tissue HU table (drawn at 120 kVp) as a scan at `kvp` shows it."""
    if kvp == 120:
        return dict(hu)
    out = {name: value * _KVP_SCALE[kvp].get(name, 1.0) for name, value in hu.items()}
    out["fat"] += _KVP_SHIFT[kvp]["fat"]
    for name in _SOFT:
        out[name] += _KVP_SHIFT[kvp]["soft"]
    return out


def add_beam_hardening(canvas: Canvas, scan: Scan, heads, radius) -> None:
    """Cupping (the body's centre reads low) and the dark band between the femoral heads where the beam
    crosses both, in the axial slices through them; added to the body only."""
    x, y, z = canvas.xyz(tuple(slice(0, n) for n in canvas.hu.shape))
    left, right = heads

    # in-plane parts once (on an axial grid one slice's worth), then slab by slab
    across = np.clip(1 - ((x - 0.5 * (left[0] + right[0])) / (0.5 * abs(left[0] - right[0]))) ** 2, 0, 1)
    band = scan.hardening_hu * (across * np.exp(-(((y - 0.5 * (left[1] + right[1])) / 9.0) ** 2)))
    cupping = scan.cupping_hu * np.clip(1 - (norm(x, y - 20) / 180.0) ** 2, 0, 1)

    def work(rows):
        change = rows_of(band, rows) * np.exp(-(((rows_of(z, rows) - left[2]) / radius) ** 2))
        change = change + rows_of(cupping, rows)
        part = canvas.hu[rows]
        np.subtract(part, np.broadcast_to(change.astype(np.float32), part.shape), out=part,
                    where=canvas.labels[rows] > 0)

    in_slabs(canvas.hu.shape, work)


def add_scanner_effects(canvas: Canvas, scan: Scan, seed: int) -> None:
    """The kernel's blur and edge overshoot, the slice profile, correlated noise scaled to the scan's noise
    level (higher in the body's centre, where fewer photons get through), and the reconstruction circle."""
    hu = canvas.hu
    blur, overshoot, grain, _ = KERNELS[scan.kernel]
    plane = [n for n in range(3) if abs(canvas.direction[2, 2 - n]) < 0.7]  # numpy axis n = index 2-n
    thick = max(canvas.spacing) / min(canvas.spacing) > 1.5
    sigma = [blur if n in plane else (0.35 if thick else 0.0) for n in range(3)]
    if overshoot > 0:
        wide = blurred(hu, [2.2 * s if n in plane else 0 for n, s in enumerate(sigma)], truncate=2.0)
    blurred(hu, sigma, in_place=True)
    if overshoot > 0:
        def sharpen(rows):
            part = hu[rows]
            part += np.float32(overshoot) * (part - wide[rows])

        in_slabs(hu.shape, sharpen)
        del wide
    noise_sigma = [grain if n in plane else 0.0 for n in range(3)]
    noise = blurred(_white_noise(hu.shape, seed), noise_sigma, in_place=True)
    gain = 1.0 / float(np.sqrt(np.prod([1 / (2 * np.sqrt(np.pi) * s) for s in noise_sigma if s > 0])))
    x, y, _ = canvas.xyz(tuple(slice(0, n) for n in hu.shape))
    weight = 1.0 + 0.3 * np.clip(1 - (norm(x, y - 20) / 170.0) ** 2, 0, 1)
    weight = (np.float32(scan.noise_hu * gain) * weight).astype(np.float32)

    def add_noise(rows):
        part = noise[rows]
        part *= rows_of(weight, rows)
        hu[rows] += part

    in_slabs(hu.shape, add_noise)
    # the reconstruction circle: nothing is seen, so nothing is labelled, outside it; when it cuts the
    # body short, the body's edge inside it reads bright (the missing projections)
    radius = 0.5 * min(canvas.spacing[m] * canvas.size[m] for m in range(3) if abs(canvas.direction[2, m]) < 0.7)
    centre_x, centre_y = _grid_center_xy(canvas)
    r = norm(x - centre_x, y - centre_y)
    if scan.truncated_fov:
        rim = (250.0 * np.exp(-(radius - r) / 8.0)).astype(np.float32)
        np.add(hu, rim, out=hu, where=canvas.labels > 0)
    outside = np.broadcast_to(r > radius, hu.shape)
    np.copyto(hu, np.float32(MIN_HU), where=outside)
    np.copyto(canvas.labels, np.uint8(0), where=outside)


def blurred(array: np.ndarray, sigma, truncate: float = 2.5, in_place: bool = False) -> np.ndarray:
    """A Gaussian blur (sigma in voxels per numpy axis), one axis at a time, each pass split into slabs
    along another axis and run in threads (scipy's filters release the GIL). `in_place` blurs `array`
    itself instead of a copy."""
    out = array if in_place else array.copy()
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        other = max((n for n in range(3) if n != axis), key=lambda n: out.shape[n])
        edges = np.linspace(0, out.shape[other], threads() + 1).astype(int)

        def run(lo_hi, axis=axis, s=s, other=other):
            index = [slice(None)] * 3
            index[other] = slice(*lo_hi)
            part = out[tuple(index)]
            ndimage.gaussian_filter1d(part, s, axis=axis, output=part, truncate=truncate)

        with ThreadPoolExecutor(threads()) as pool:
            list(pool.map(run, itertools.pairwise(edges)))
    return out


def _white_noise(shape, seed: int, slab: int = 16) -> np.ndarray:
    """Standard normal noise, float32, made in slabs of `slab` first-axis planes from their own streams
    (so it is the same whatever the number of threads)."""
    noise = np.empty(shape, np.float32)
    starts = range(0, shape[0], slab)

    def fill(start):
        rng = np.random.default_rng([seed, 7, start])
        noise[start:start + slab] = rng.standard_normal(noise[start:start + slab].shape, dtype=np.float32)

    with ThreadPoolExecutor(threads()) as pool:
        list(pool.map(fill, starts))
    return noise


def _grid_center_xy(canvas: Canvas):
    middle = (np.asarray(canvas.size) - 1) / 2
    u = canvas.matrix @ middle + canvas.offset
    return u[0], u[1]
