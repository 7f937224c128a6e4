"""The digital pelvis phantom: labelled synthetic planning CTs of the male pelvis.

The anatomy is a set of analytic shapes (ellipsoids, capsules, boxes, shells)
defined in a patient frame of millimetres centred on the prostate: x to the
patient's left, y posterior, z superior (LPS). Each case draws its anatomy
(sizes, positions, bladder filling, rectal gas, body habitus, an optional hip
prosthesis) from its seed, then evaluates the shapes at the voxel centres of a
scanner grid that is drawn too (field of view, spacing, slice thickness,
storage orientation). Because the shapes are evaluated in physical space, the
label map is exact on any grid and orientation.

Realism: tissue HU levels, noise level and texture, organ sizes and positions
were matched against a real pelvic CT (`docs/make_phantom_vs_real.py` draws the
comparison). Edges are soft over one voxel (partial volume), the image is
blurred by a small point spread function, and noise is spatially correlated
like filtered back-projection noise.

Label values are fixed project-wide in `segcore.anatomy`.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from segcore import anatomy

L = {s.name: s.value for s in anatomy.STRUCTURES}

MIN_HU, MAX_HU = -1024, 3071

# Orientations a scanner or converter may store (index axis -> physical axis,
# with sign). LPS is DICOM's usual layout, RAS what many NIfTI converters write,
# "feet first" has the slices reversed, the last two are reformats.
ORIENTATIONS = {
    "LPS": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "RAS": ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),
    "LPI": ((1, 0, 0), (0, 1, 0), (0, 0, -1)),
    "coronal": ((1, 0, 0), (0, 0, -1), (0, 1, 0)),
    "sagittal": ((0, 1, 0), (0, 0, -1), (1, 0, 0)),
}


@dataclass
class PhantomCase:
    """One synthetic case: CT in HU (int16), label map (uint8) on the same grid,
    and the drawn parameters (JSON-serialisable)."""

    ct: sitk.Image
    labels: sitk.Image
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- shapes
# Each returns an (approximate) signed distance in mm: negative inside.


def _norm(*components):
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
    k0 = _norm(px / a, py / b, pz / c)
    k1 = _norm(px / (a * a), py / (b * b), pz / (c * c))
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
    return _norm(pax - ba[0] * h, pay - ba[1] * h, paz - ba[2] * h) - radius


def oriented_box(x, y, z, center, axes, half):
    px, py, pz = x - center[0], y - center[1], z - center[2]
    q = [np.abs(axes[0, i] * px + axes[1, i] * py + axes[2, i] * pz) - half[i] for i in range(3)]
    outside = _norm(*(np.maximum(qi, 0) for qi in q))
    return outside + np.minimum(np.maximum(np.maximum(q[0], q[1]), q[2]), 0)


def _rotation_from(first, second):
    """Orthonormal frame whose first axis is `first` and second lies towards `second`."""
    u = np.asarray(first, float)
    u /= np.linalg.norm(u)
    v = np.asarray(second, float) - u * (u @ second)
    v /= np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)], axis=1)


# --------------------------------------------------------------------------- canvas


class _Canvas:
    """A voxel grid with broadcastable patient-frame coordinates, an HU image and
    a label map; shapes are painted back to front inside their bounding boxes."""

    def __init__(self, size_ijk, spacing, origin, direction, patient_center, patient_rotation):
        self.size = tuple(int(s) for s in size_ijk)
        self.spacing = np.asarray(spacing, float)
        self.origin = np.asarray(origin, float)
        self.direction = np.asarray(direction, float)
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
        return np.clip(0.5 - sd / self.edge, 0.0, 1.0)

    def paint(self, box, sd, hu, label=None):
        """Composite tissue of value `hu` (scalar or array) with soft edges; label
        voxels more than half inside."""
        occ = self.occupancy(sd)
        region = self.hu[box]
        region += occ * (hu - region)
        if label is not None:
            mask = np.broadcast_to(occ > 0.5, region.shape)
            self.labels[box][mask] = label

    def shape(self, low, high, distance, hu, label=None, cortex=None):
        """Paint a shape given its patient-frame box and distance function; bones
        pass cortex=(thickness_mm, hu_cancellous) for a dense shell."""
        box = self.box(low, high)
        if box is None:
            return
        x, y, z = self.xyz(box)
        sd = distance(x, y, z)
        self.paint(box, sd, hu, label)
        if cortex is not None:
            thickness, inner_hu = cortex
            self.paint(box, sd + thickness, inner_hu)

    def texture(self, box, scale_mm, rng):
        """Smooth random field in [0, 1] over `box`, correlation length about scale_mm."""
        shape = tuple(s.stop - s.start for s in box)
        spacing_kji = self.spacing[::-1]
        coarse = [max(2, int(np.ceil(n * sp / scale_mm)) + 1) for n, sp in zip(shape, spacing_kji)]
        field_ = rng.random(coarse).astype(np.float32)
        zoomed = ndimage.zoom(field_, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=True, mode="nearest")
        return zoomed[: shape[0], : shape[1], : shape[2]]


# --------------------------------------------------------------------------- anatomy


def draw_anatomy(rng: np.random.Generator, implant: bool | None = None) -> dict:
    """Draw one patient: every size, position and tissue value, in the patient frame."""
    u = rng.uniform
    a = {}
    a["body_scale"] = u(0.85, 1.18)
    a["pelvis_scale"] = u(0.92, 1.08)
    a["fat_lateral"], a["fat_anterior"], a["fat_posterior"] = u(12, 45), u(12, 40), u(8, 25)
    a["yaw_deg"] = u(-5, 5)
    a["cavity_scale"] = u(0.85, 1.1)
    a["prostate_cc"] = u(15, 80)
    a["prostate_y"] = u(-4, 4)
    a["prostate_shift_x"] = u(-3, 3)
    a["bladder_cc"] = u(80, 550)
    a["bladder_wall_mm"] = u(2.5, 5)
    a["bladder_contrast"] = bool(rng.random() < 0.12)
    a["rectum_radius"] = u(11, 19)
    a["rectal_gas"] = u(0.0, 0.7)
    a["femoral_head_radius"] = u(21.5, 26)
    a["calcifications"] = int(rng.integers(0, 4)) if rng.random() < 0.35 else 0
    a["bowel_loops"] = int(rng.integers(2, 7))
    a["implant"] = bool(rng.random() < 0.15) if implant is None else bool(implant)
    a["implant_side"] = "left" if rng.random() < 0.5 else "right"
    a["noise_hu"] = u(12, 28)
    # Tissue HU: means drawn around published values (fat -100, muscle 50,
    # prostate 40, urine 10, cortical bone 1000+); the prostate stays 5-15 HU from
    # its neighbours, as on real CT.
    a["hu"] = {
        "fat": u(-110, -80),
        "muscle": u(42, 58),
        "skin": u(20, 45),
        "prostate": u(32, 45),
        "seminal_vesicles": u(25, 40),
        "urine": u(0, 18),
        "bladder_wall": u(30, 45),
        "rectal_wall": u(35, 50),
        "faeces": u(-80, 30),
        "cortical": u(700, 1200),
        "cancellous": u(90, 260),
        "marrow": u(0, 90),
        "bowel_content": u(5, 40),
        "contrast": u(200, 600),
    }
    a["bowel"] = [
        {
            "a": [u(-60, 60), u(-40, 40), u(60, 130)],
            "b": [u(-60, 60), u(-40, 40), u(60, 130)],
            "r": u(9, 17),
            "gas": bool(rng.random() < 0.4),
        }
        for _ in range(a["bowel_loops"])
    ]
    a["calcification_points"] = [[u(-0.5, 0.5), u(-0.5, 0.5), u(-0.5, 0.5), u(0.8, 2.0), u(250, 700)]
                                 for _ in range(a["calcifications"])]
    a["fat_planes"] = []
    for _ in range(10):
        angle = u(0, 2 * np.pi)
        radius = u(0.55, 0.9)
        a["fat_planes"].append([150 * radius * np.cos(angle), 20 + 105 * radius * np.sin(angle), u(-90, 130),
                                u(25, 60), u(1.5, 3.5), u(30, 70), np.cos(angle + np.pi / 2), np.sin(angle + np.pi / 2), 0.0])
    a["shape_seed"] = int(rng.integers(0, 2**31 - 1))
    return a


def _paint_anatomy(canvas: _Canvas, a: dict) -> None:
    """Paint one drawn patient (`draw_anatomy`) back to front: what is painted later wins.

    The order is part of the phantom (and of its random draws): table and body,
    fat, bowel, organs, then bones. Adds the prostate's radii to `a`."""
    _paint_table_and_body(canvas, a)
    _paint_pelvic_fat(canvas, a)
    _paint_bowel(canvas, a)
    _paint_organs(canvas, a)
    _paint_bones(canvas, a)


def _paint_table_and_body(canvas: _Canvas, a: dict) -> None:
    """Patient table below the back, then body: skin, subcutaneous fat, muscle."""
    sb, hu = a["body_scale"], a["hu"]
    body_cy, body_a0, body_b = 20.0 * sb, 178.0 * sb, 125.0 * sb
    back = body_cy + body_b * 0.93  # supine: the back is flattened on the table

    def couch(x, y, z):
        return np.abs(y - (back + 24)) - 20 + 0 * x + 0 * z

    canvas.shape((-400, back, -400), (400, back + 48, 400), couch, -880, L["couch"])
    for offset in (4.0, 40.0):
        canvas.shape((-400, back, -400), (400, back + 48, 400),
                     lambda x, y, z, o=offset: np.abs(y - (back + o)) - 1.5 + 0 * x + 0 * z, 250)

    def body(x, y, z, shrink=0.0, lateral=0.0, anterior=0.0, posterior=0.0):
        # The same cross-section on every slice: computed in 2-D (x and y do
        # not depend on the slice for an axial grid), broadcast when painted.
        width = body_a0 - lateral - shrink
        depth = np.where(y < body_cy, body_b - anterior, body_b - posterior) - shrink
        n = 2.6  # a superellipse: the pelvis is squarer than an ellipse
        r = (np.abs(x / width) ** n + np.abs((y - body_cy) / depth) ** n) ** (1 / n)
        sd = (r - 1) * np.minimum(width, depth)
        return np.maximum(sd, y - (back - posterior))

    big = ((-260, -200, -400), (260, 200, 400))
    canvas.shape(*big, body, hu["skin"], L["skin"])
    canvas.shape(*big, lambda x, y, z: body(x, y, z, shrink=2.5), hu["fat"], L["fat"])
    canvas.shape(*big, lambda x, y, z: body(x, y, z, lateral=a["fat_lateral"], anterior=a["fat_anterior"],
                                            posterior=a["fat_posterior"]), hu["muscle"], L["muscle"])


def _paint_pelvic_fat(canvas: _Canvas, a: dict) -> None:
    """Fat planes between the muscles, pelvic cavity fat (widening towards the inlet),
    ischiorectal fossae, levator ani."""
    s, sb, hu = a["pelvis_scale"], a["body_scale"], a["hu"]
    roomy = a["cavity_scale"]

    def cavity(x, y, z):
        width = s * roomy * (42 + 0.3 * np.clip(z, 0, 130))
        depth = s * roomy * 46
        r = _norm(x / width, (y - 16 * s) / depth)
        sd = (r - 1) * np.minimum(width, depth)
        return np.maximum(sd, np.maximum(-48 * s - z, z - 140))

    # fat planes between the muscles (gluteal, thigh and abdominal wall groups)
    for plane in a["fat_planes"]:
        centre, radii, axis = np.asarray(plane[:3]) * sb, plane[3:6], plane[6:9]
        frame = _rotation_from(axis, (0, 0, 1) if abs(axis[2]) < 0.9 else (1, 0, 0))
        canvas.shape(centre - max(radii), centre + max(radii),
                     lambda x, y, z, c=centre, r=radii, f=frame: ellipsoid(x, y, z, c, r, f), hu["fat"], L["fat"])
    canvas.shape((-110, -60, -60), (110, 90, 150), cavity, hu["fat"], L["fat"])
    for sx in (1, -1):
        canvas.shape((sx * 38 * s - 30, 5, -80), (sx * 38 * s + 30, 75, -5),
                     lambda x, y, z, sx=sx: ellipsoid(x, y, z, (sx * 38 * s, 38 * s, -42 * s), (22 * s, 30 * s, 32)),
                     hu["fat"], L["fat"])

    def levator(x, y, z):
        shell = np.abs(ellipsoid(x, y, z, (0, 22 * s, -8 * s), (44 * s, 46 * s, 42 * s))) - 2.5
        return np.maximum(shell, z + 4)

    canvas.shape((-60, -40, -60), (60, 80, 0), levator, hu["muscle"], L["muscle"])


def _paint_bowel(canvas: _Canvas, a: dict) -> None:
    """Bowel loops above the bladder (painted before it: the bladder pushes them away)."""
    s, hu = a["pelvis_scale"], a["hu"]
    bowel_rng = np.random.default_rng(a["shape_seed"])
    for loop in a["bowel"]:
        p0, p1, r = np.asarray(loop["a"]) * s, np.asarray(loop["b"]) * s, loop["r"]
        low, high = np.minimum(p0, p1) - r, np.maximum(p0, p1) + r
        box = canvas.box(low, high)
        if box is None:
            continue
        x, y, z = canvas.xyz(box)
        sd = capsule(x, y, z, p0, p1, r)
        canvas.paint(box, sd, hu["rectal_wall"], L["bowel"])
        content = np.full(sd.shape, hu["bowel_content"], np.float32)
        if loop["gas"]:
            t = canvas.texture(box, 12.0, bowel_rng)
            content = np.where(t + (y - y.min()) / 200.0 < 0.45, -950.0, content).astype(np.float32)
        canvas.paint(box, sd + 2.5, content)


# --------------------------------------------------------------------------- organs


@dataclass
class _Prostate:
    """Where the prostate is (x, y; z is 0 in the patient frame) and its semi-axes, mm."""

    x: float
    y: float
    a: float
    b: float
    c: float


def _paint_organs(canvas: _Canvas, a: dict) -> None:
    """Bladder, seminal vesicles, rectum and prostate, in that order. One random
    stream (from the shape seed) serves them all, drawn in this order."""
    shape_rng = np.random.default_rng(a["shape_seed"] + 1)
    k = (a["prostate_cc"] * 1000 / (4 / 3 * np.pi * 1.15 * 0.82 * 1.0)) ** (1 / 3)
    prostate = _Prostate(a["prostate_shift_x"], a["prostate_y"], 1.15 * k, 0.82 * k, 1.0 * k)
    a["prostate_radii_mm"] = [round(prostate.a, 2), round(prostate.b, 2), round(prostate.c, 2)]
    _paint_bladder(canvas, a, prostate, shape_rng)
    _paint_seminal_vesicles(canvas, a, prostate, shape_rng)
    _paint_rectum(canvas, a, prostate, shape_rng)
    _paint_prostate(canvas, a, prostate)


def _paint_bladder(canvas: _Canvas, a: dict, p: _Prostate, shape_rng: np.random.Generator) -> None:
    """A wobbly ellipsoid above the prostate: wall, urine, contrast sunk posteriorly if any."""
    hu = a["hu"]
    kb = (a["bladder_cc"] * 1000 / (4 / 3 * np.pi * 1.3 * 1.0 * 0.85)) ** (1 / 3)
    ba, bb, bc = 1.3 * kb, 1.0 * kb, 0.85 * kb
    bladder_center = np.array([p.x + shape_rng.uniform(-5, 5), p.y - 10 - 0.15 * bb, 0.7 * p.c + 0.92 * bc])
    bumps = shape_rng.uniform(0, 2 * np.pi, 3)

    def bladder(x, y, z):
        wobble = 0.06 * kb * np.sin(x / 17 + bumps[0]) * np.sin(y / 19 + bumps[1]) * np.sin(z / 23 + bumps[2])
        return ellipsoid(x, y, z, bladder_center, (ba, bb, bc)) + wobble

    low, high = bladder_center - [ba + 6, bb + 6, bc + 6], bladder_center + [ba + 6, bb + 6, bc + 6]
    box = canvas.box(low, high)
    if box is None:
        return
    x, y, z = canvas.xyz(box)
    sd = bladder(x, y, z)
    canvas.paint(box, sd, hu["bladder_wall"], L["bladder"])
    urine = hu["urine"]
    if a["bladder_contrast"]:
        # supine: contrast sinks to the posterior (dependent) part
        level = bladder_center[1] + bb * shape_rng.uniform(0.1, 0.7)
        urine = np.where(y > level, hu["contrast"], hu["urine"]).astype(np.float32)
    canvas.paint(box, sd + a["bladder_wall_mm"], urine)


def _paint_seminal_vesicles(canvas: _Canvas, a: dict, p: _Prostate, shape_rng: np.random.Generator) -> None:
    """Behind the bladder base, above the prostate, fanning out laterally."""
    for sx in (1, -1):
        center = np.array([p.x + sx * (0.55 * p.a + 6), p.y + 0.7 * p.b + 3, 0.75 * p.c + 7])
        frame = _rotation_from((sx * 0.85, 0.25, 0.5), (0, 1, 0))
        radii = (shape_rng.uniform(16, 24), shape_rng.uniform(5, 7.5), shape_rng.uniform(4.5, 6.5))
        canvas.shape(center - 26, center + 26,
                     lambda x, y, z, c=center, f=frame, r=radii: ellipsoid(x, y, z, c, r, f),
                     a["hu"]["seminal_vesicles"], L["seminal_vesicles"])


def _paint_rectum(canvas: _Canvas, a: dict, p: _Prostate, shape_rng: np.random.Generator) -> None:
    """A tube from the anal canal along the back of the prostate, then following the
    sacral curve; wall, faeces and gas (gas rises anteriorly)."""
    rr = a["rectum_radius"]
    yr = p.y + p.b + rr + 1.5
    path = np.array([[0, yr - 2, -62], [0, yr, -0.6 * p.c], [p.x, yr + 3, 28],
                     [p.x + 4, yr + 14, 72], [p.x + 12, yr + 10, 108]], float)
    radii = [7.0, rr * 0.9, rr, rr * 0.95, rr * 0.85]
    low, high = path.min(axis=0) - rr - 4, path.max(axis=0) + rr + 4
    box = canvas.box(low, high)
    if box is None:
        return
    x, y, z = canvas.xyz(box)
    sd = np.min([capsule(x, y, z, path[i], path[i + 1], radii[i], radii[i + 1]) for i in range(4)], axis=0)
    canvas.paint(box, sd, a["hu"]["rectal_wall"], L["rectum"])
    texture = canvas.texture(box, 6.0, shape_rng)
    content = np.where(texture > 0.75, -900.0, a["hu"]["faeces"] + 60 * (texture - 0.5)).astype(np.float32)
    gas_level = (y - yr) / rr  # -1 anterior .. +1 posterior
    content = np.where(gas_level < (a["rectal_gas"] * 2 - 1.2), -980.0, content).astype(np.float32)
    canvas.paint(box, sd + 3.0, content)


def _paint_prostate(canvas: _Canvas, a: dict, p: _Prostate) -> None:
    """An ellipsoid wider at the base, with optional calcifications."""
    px, py, pa, pb, pc = p.x, p.y, p.a, p.b, p.c
    prostate_center = np.array([px, py, 0.0])

    def prostate(x, y, z):
        taper = 1 + 0.12 * np.clip((z - prostate_center[2]) / pc, -1, 1)
        return ellipsoid((x - px) / taper + px, (y - py) / taper + py, z, prostate_center, (pa, pb, pc))

    canvas.shape(prostate_center - [pa * 1.2, pb * 1.2, pc], prostate_center + [pa * 1.2, pb * 1.2, pc],
                 prostate, a["hu"]["prostate"], L["prostate"])
    for cx, cy, cz, radius, value in a["calcification_points"]:
        c = prostate_center + np.array([cx * pa, cy * pb, cz * pc])
        canvas.shape(c - radius, c + radius, lambda x, y, z, c=c, r=radius: _norm(x - c[0], y - c[1], z - c[2]) - r,
                     value)


# --------------------------------------------------------------------------- bones


def _paint_bones(canvas: _Canvas, a: dict) -> None:
    """Sacrum, then each side's hip bone and femur, and the hip prosthesis if drawn
    (after the organs: soft tissue gives way to bone)."""
    s = a["pelvis_scale"]
    cortex = (a["hu"]["cortical"], (2.0, a["hu"]["cancellous"]))
    rh = a["femoral_head_radius"] * s
    _paint_sacrum(canvas, s, cortex)
    for name, sx in (("left", 1.0), ("right", -1.0)):
        head = np.array([sx * 88 * s, -8 * s, 18 * s])
        for low, high, dist in _hip_bone_pieces(head, rh, sx, s):
            canvas.shape(low, high, dist, cortex[0], L[f"hip_bone_{name}"], cortex=cortex[1])
        _paint_femur(canvas, a, name, head, rh, sx, cortex)
        if a["implant"] and name == a["implant_side"]:
            _paint_implant(canvas, a, head, rh, sx, s)


def _paint_sacrum(canvas: _Canvas, s: float, cortex) -> None:
    sacrum_c = np.array([0, -25 * s, 55 * s])
    radius_sacrum = 110 * s

    def sacrum(x, y, z):
        # a curved plate, concave forwards both in the sagittal plane (the arc)
        # and across (the wings bend forwards), thin and narrow at the coccyx
        rho = _norm(y + 0.004 * x * x - sacrum_c[1], z - sacrum_c[2])
        t = np.clip((z + 20 * s) / (135 * s), 0, 1)
        thickness = 7 + 26 * t * t
        width = 16 + 42 * t
        sd = np.abs(rho - radius_sacrum) - thickness / 2
        sd = np.maximum(sd, np.abs(x) - width)
        return np.maximum(sd, np.maximum(-20 * s - z, np.maximum(z - 118 * s, sacrum_c[1] - y)))

    canvas.shape((-60, 20, -30), (60, 110, 125), sacrum, cortex[0], L["sacrum"], cortex=cortex[1])


def _hip_bone_pieces(head, rh, sx, s):
    """(low, high, distance) of the hip bone's pieces on one side (sx +1 left, -1 right)."""
    return [
        # acetabular cup: a shell around the head, open laterally
        ((head - rh - 16), (head + rh + 16),
         lambda x, y, z, h=head, sx=sx: np.maximum(
             np.abs(_norm(x - h[0], y - h[1], z - h[2]) - (rh + 8.5)) - 6.0, sx * (x - h[0]) - 4)),
        # iliac body and wing: up, back and out towards the sacroiliac joint
        ((sx * 85 * s - 25, -25, 5), (sx * 85 * s + 25, 45, 75),
         lambda x, y, z, sx=sx: capsule(x, y, z, (sx * 82 * s, 2 * s, 22 * s), (sx * 78 * s, 30 * s, 62 * s), 17 * s)),
        ((sx * 90 * s - 80, -60, 10), (sx * 90 * s + 80, 100, 150),
         lambda x, y, z, sx=sx: oriented_box(x, y, z, np.array([sx * 88 * s, 22 * s, 85 * s]),
                                             _rotation_from((sx * 0.62, -0.78, 0.0), (sx * 0.25, 0, 1)),
                                             (62 * s, 55 * s, 5.5 * s))),
        # pubis: superior ramus to the symphysis, inferior ramus, symphyseal body
        ((sx * 40 * s - 45, -75, -5), (sx * 40 * s + 45, -10, 40),
         lambda x, y, z, sx=sx: capsule(x, y, z, (sx * 12 * s, -55 * s, 16 * s), (sx * 72 * s, -24 * s, 22 * s), 10 * s)),
        ((sx * 30 * s - 35, -70, -50), (sx * 30 * s + 35, 25, 5),
         lambda x, y, z, sx=sx: capsule(x, y, z, (sx * 12 * s, -52 * s, -8 * s), (sx * 48 * s, 6 * s, -34 * s), 8 * s)),
        ((sx * 10 * s - 15, -75, -25), (sx * 10 * s + 15, -35, 40),
         lambda x, y, z, sx=sx: ellipsoid(x, y, z, (sx * 10 * s, -55 * s, 6 * s), (7.5 * s, 12 * s, 22 * s))),
        # ischium down to the tuberosity
        ((sx * 65 * s - 35, -10, -60), (sx * 65 * s + 35, 45, 25),
         lambda x, y, z, sx=sx: capsule(x, y, z, (sx * 80 * s, 12 * s, 6 * s), (sx * 52 * s, 24 * s, -34 * s),
                                        13 * s, 16 * s)),
    ]


def _paint_femur(canvas: _Canvas, a: dict, name: str, head, rh, sx, cortex) -> None:
    """Neck, greater and lesser trochanters, the shaft (thick cortex around fatty marrow), the head."""
    s = a["pelvis_scale"]
    femur_label, head_label = L[f"femur_{name}"], L[f"femoral_head_{name}"]
    femur = [
        ((sx * 110 * s - 30, -40, -30), (sx * 110 * s + 40, 20, 40),
         lambda x, y, z, h=head, sx=sx: capsule(x, y, z, h, (sx * 130 * s, -10 * s, -12 * s), 15 * s)),
        ((sx * 135 * s - 25, -30, -40), (sx * 135 * s + 25, 35, 20),
         lambda x, y, z, sx=sx: ellipsoid(x, y, z, (sx * 136 * s, 4 * s, -12 * s), (13 * s, 20 * s, 22 * s))),
        ((sx * 105 * s - 15, -5, -60), (sx * 105 * s + 15, 25, -30),
         lambda x, y, z, sx=sx: _norm(x - sx * 106 * s, y - 10 * s, z + 46 * s) - 9 * s),
    ]
    for low, high, dist in femur:
        canvas.shape(low, high, dist, cortex[0], femur_label, cortex=cortex[1])
    # shaft: thick cortex around fatty marrow
    canvas.shape((sx * 122 * s - 25, -35, -400), (sx * 122 * s + 25, 25, -10),
                 lambda x, y, z, sx=sx: capsule(x, y, z, (sx * 128 * s, 0, -18 * s), (sx * 112 * s, -12 * s, -330), 15 * s),
                 cortex[0], femur_label, cortex=(5.5, a["hu"]["marrow"]))
    canvas.shape(head - rh - 4, head + rh + 4,
                 lambda x, y, z, h=head: _norm(x - h[0], y - h[1], z - h[2]) - rh,
                 cortex[0], head_label, cortex=cortex[1])


def _paint_implant(canvas, a, head, rh, sx, s):
    """Total hip replacement: metal ball in the head (still the femoral-head OAR),
    neck and stem (labelled implant), with streak artefacts in the axial planes."""
    metal = float(MAX_HU)
    canvas.shape(head - rh, head + rh, lambda x, y, z: _norm(x - head[0], y - head[1], z - head[2]) - (rh - 3), metal)
    neck_end = np.array([sx * 128 * s, -8 * s, -14 * s])
    stem_end = np.array([sx * 118 * s, -8 * s, -150 * s])
    for p0, p1, r in ((head, neck_end, 7.0), (neck_end, stem_end, 6.5)):
        canvas.shape(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r,
                     lambda x, y, z, p0=p0, p1=p1, r=r: capsule(x, y, z, p0, p1, r), metal, L["metal_implant"])
    # Streaks: alternating bright and dark rays from the metal, fading with
    # distance, in the axial slices that cross it.
    box = canvas.box((-400, -400, stem_end[2] - 5), (400, 400, head[2] + rh + 5), margin=0)
    if box is None:
        return
    x, y, z = canvas.xyz(box)
    rays = np.random.default_rng(a["shape_seed"] + 2)
    rays = [(rays.uniform(0, np.pi), rays.choice([-1.0, 1.0]), rays.uniform(60, 220)) for _ in range(7)]
    patterns = []
    for centre_x in (head[0], neck_end[0]):  # rays leave the ball above the neck, the stem below
        angle = np.arctan2(y - head[1], x - centre_x)
        distance = _norm(x - centre_x, y - head[1])
        streak = sum(sign * strength * np.exp(-((np.sin(angle - theta) / 0.04) ** 2)) for theta, sign, strength in rays)
        patterns.append((streak * np.exp(-distance / 70.0) * (distance > rh)).astype(np.float32))
    streak = np.where(z > neck_end[2], patterns[0], patterns[1])
    region = canvas.hu[box]
    region += np.where(canvas.labels[box] > 0, streak, np.float32(0))


# --------------------------------------------------------------------------- the scanner


def _draw_grid(rng, matrix, spacing, orientation, oblique, anatomy_):
    """Field of view, spacing, extent and storage orientation of one scan."""
    fov = rng.uniform(420, 520) * max(1.0, anatomy_["body_scale"])
    if spacing is None:
        in_plane = fov / matrix
        thickness = rng.choice([1.0, 1.5, 2.0, 2.5, 3.0]) if in_plane < 1.6 else in_plane * rng.uniform(0.9, 1.2)
        spacing = (in_plane, in_plane, float(thickness))
    spacing = tuple(float(v) for v in np.broadcast_to(np.asarray(spacing, float), (3,)))
    z_low, z_high = rng.uniform(-105, -70), rng.uniform(105, 150)
    center_shift = np.array([rng.uniform(-15, 15), rng.uniform(-25, 5), 0.0])
    size_lps = (int(matrix), int(matrix), int(np.ceil((z_high - z_low) / spacing[2])))
    drawn_orientation = str(rng.choice(list(ORIENTATIONS), p=[0.45, 0.35, 0.1, 0.05, 0.05]))
    angles = rng.uniform(-0.35, 0.35, 3)  # drawn always, used when oblique: same FOV either way
    if orientation == "random":
        orientation = drawn_orientation
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be 'random' or one of {list(ORIENTATIONS)}, not {orientation!r}")
    columns = np.asarray(ORIENTATIONS[orientation], float).T  # direction[:, index axis]
    if oblique:
        columns = euler_rotation(angles) @ columns
    # index axis m runs along physical axis phys[m]
    phys = [int(np.argmax(np.abs(columns[:, m]))) for m in range(3)]
    size = tuple(size_lps[phys[m]] for m in range(3))
    grid_spacing = tuple(spacing[phys[m]] for m in range(3))
    extent = columns @ (np.asarray(grid_spacing) * (np.asarray(size) - 1))
    center = center_shift + np.array([0, 0, (z_low + z_high) / 2])
    origin = center - extent / 2
    return size, grid_spacing, origin, columns, orientation


def euler_rotation(angles):
    """The rotation matrix Rz @ Ry @ Rx for angles (x, y, z) in radians, about the fixed axes."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_phantom(seed: int, matrix: int = 512, spacing=None, orientation: str = "random",
                 oblique: bool = False, implant: bool | None = None) -> PhantomCase:
    """Make one labelled synthetic pelvic CT, deterministic for a given seed.

    matrix: in-plane matrix size (512 as on scanners; 96-160 for quick tests);
    the field of view is drawn, so in-plane spacing is FOV / matrix and slices
    are 1-3 mm thick at 512 (about as thick as wide at small matrices).
    spacing: (x, y, z) mm to force a spacing (the field of view follows).
    orientation: 'random' or a key of ORIENTATIONS (how the voxels are stored);
    oblique: tilt the grid by up to 20 degrees about each axis.
    implant: True/False forces a hip prosthesis on/off; None draws it (15 %).
    """
    # Separate random streams for the patient and the scan, so that the same
    # seed gives the same patient at the same place whatever grid is asked for.
    rng = np.random.default_rng([seed, 0])
    a = draw_anatomy(rng, implant)
    # The patient's prostate sits at a drawn position in scanner space.
    patient_center = np.array([rng.uniform(-10, 10), rng.uniform(-60, -20), rng.uniform(-400, 400)])
    scan_rng = np.random.default_rng([seed, 1])
    size, grid_spacing, origin, direction, orientation = _draw_grid(scan_rng, matrix, spacing, orientation, oblique, a)
    yaw = np.deg2rad(a["yaw_deg"])
    patient_rotation = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    origin = origin + patient_center
    canvas = _Canvas(size, grid_spacing, origin, direction, patient_center, patient_rotation)
    _paint_anatomy(canvas, a)

    hu = canvas.hu
    noise_rng = np.random.default_rng([seed, 7])
    _add_scanner_effects(hu, canvas, a["noise_hu"], noise_rng)
    ct = sitk.GetImageFromArray(np.clip(np.rint(hu), MIN_HU, MAX_HU).astype(np.int16))
    labels = sitk.GetImageFromArray(canvas.labels)
    for image in (ct, labels):
        image.SetSpacing(grid_spacing)
        image.SetOrigin(tuple(float(v) for v in origin))
        image.SetDirection(tuple(float(v) for v in direction.ravel()))
    info = {
        "seed": int(seed),
        "matrix": int(matrix),
        "size": list(size),
        "spacing_mm": [round(v, 4) for v in grid_spacing],
        "orientation": orientation,
        "oblique": bool(oblique),
        "prostate_center_lps_mm": [round(float(v), 2) for v in patient_center],
        "anatomy": _jsonable({k: v for k, v in a.items() if k not in ("bowel", "calcification_points", "fat_planes")}),
    }
    return PhantomCase(ct=ct, labels=labels, info=info)


def _add_scanner_effects(hu, canvas, noise_hu, rng):
    """Point spread blur, correlated noise and the circular reconstruction field."""
    in_plane_axes = [n for n in range(3) if abs(canvas.direction[2, 2 - n]) < 0.7]  # numpy axis n = index 2-n
    sigma = [0.0, 0.0, 0.0]
    for n in in_plane_axes:
        sigma[n] = 0.6  # voxels: a mild scanner PSF across the reconstruction plane
    ndimage.gaussian_filter(hu, sigma, output=hu, truncate=2.5)
    # Filtered back-projection noise is correlated over about a voxel; filter
    # white noise and rescale so that its standard deviation is noise_hu.
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise_sigma = [s * 1.3 for s in sigma]
    ndimage.gaussian_filter(noise, noise_sigma, output=noise, truncate=2.5)
    gain = 1.0 / float(np.sqrt(np.prod([1 / (2 * np.sqrt(np.pi) * s) for s in noise_sigma if s > 0])))
    hu += noise * np.float32(noise_hu * gain)
    # Voxels outside the scanner's reconstruction circle hold a padding value.
    x, y, _ = canvas.xyz(tuple(slice(0, n) for n in hu.shape))
    radius = 0.5 * min(canvas.spacing[m] * canvas.size[m] for m in range(3) if abs(canvas.direction[2, m]) < 0.7)
    center_x, center_y = _grid_center_xy(canvas)
    outside = np.broadcast_to(_norm(x - center_x, y - center_y) > radius, hu.shape)
    hu[outside] = MIN_HU
    canvas.labels[outside] = 0  # nothing is seen, so nothing is labelled, outside the field


def _grid_center_xy(canvas):
    middle = (np.asarray(canvas.size) - 1) / 2
    u = canvas.matrix @ middle + canvas.offset
    return u[0], u[1]


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return round(float(value), 3)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# --------------------------------------------------------------------------- writing


def write_dicom_case(case: PhantomCase, folder, overwrite: bool = False) -> Path:
    """A case as a clinic's planning system exports it: `folder` holds its CT series (``CT0000.dcm``...)
    and ``RS.dcm``, an RT Structure Set of its six target organs (TG-263 names). The folder appears whole
    or not at all. A left-handed grid (a mirrored reformat) cannot be stored in DICOM, so the series holds
    the same voxels in the right-handed order that reading it gives."""
    import SimpleITK as sitk

    from segcore.dicom.ct import Algorithm, ct_series_for, write_ct_series
    from segcore.dicom.rtstruct import write_rtstruct
    from segcore.files import atomic_folder
    from segcore.image import read_image

    folder = Path(folder)
    name = folder.name.removesuffix("_dicom")
    organs = sitk.Mask(case.labels, sitk.LessEqual(case.labels, len(anatomy.TARGET_NAMES)))
    with atomic_folder(folder, overwrite=overwrite) as staging:
        write_ct_series(case.ct, staging, patient_name=f"Phantom^{name}", patient_id=name,
                        seed=f"phantom{case.info.get('seed')}{case.info.get('matrix')}")
        ct = read_image(staging)
        organs = sitk.Resample(organs, ct, sitk.Transform(), sitk.sitkNearestNeighbor)
        write_rtstruct(organs, [anatomy.BY_NAME[n] for n in anatomy.TARGET_NAMES], ct_series_for(ct, staging),
                       staging / "RS.dcm", algorithm=Algorithm("digital phantom", str(case.info.get("seed"))))
    return folder


def include_proximal_seminal_vesicles(labels: sitk.Image, mm: float) -> sitk.Image:
    """The label map under a common CTV convention: the prostate label also covers the seminal vesicles'
    proximal part, the voxels within `mm` of the prostate (straight-line distance in physical space, on
    any grid), which leave the seminal-vesicle label. The rest is unchanged."""
    prostate_value = anatomy.structure("prostate").value
    sv_value = anatomy.structure("seminal_vesicles").value
    prostate = sitk.Equal(labels, prostate_value)
    distance = sitk.SignedMaurerDistanceMap(prostate, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    out = sitk.GetArrayFromImage(labels)
    near = (out == sv_value) & (sitk.GetArrayViewFromImage(distance) <= mm)
    out[near] = prostate_value
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(labels)
    return result


def write_phantoms(outdir: str | Path, count: int, seed: int = 0, matrix: int = 512, overwrite: bool = False,
                   progress=None, dicom: bool = False, prostate_sv_mm: float = 0.0, **options) -> list[Path]:
    """Write `count` cases as caseNNN_ct.nii.gz / caseNNN_labels.nii.gz plus
    labels.json (and caseNNN_info.json with the drawn parameters); with `dicom`, also
    caseNNN_dicom/ (`write_dicom_case`). Case i uses seed + i, so any case can be
    remade alone. `prostate_sv_mm` > 0 contours the prostate under the CTV convention of
    `include_proximal_seminal_vesicles`."""
    from segcore.dataset import training_case_paths
    from segcore.files import atomic_output
    from segcore.image import write_image

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    labels_path = outdir / "labels.json"
    labels_text = json.dumps(anatomy.labels_json(), indent=1)
    if not labels_path.exists() or labels_path.read_text() != labels_text:
        with atomic_output(labels_path, overwrite=True) as tmp:
            tmp.write_text(labels_text)
    written = []
    for i in range(count):
        case = make_phantom(seed + i, matrix=matrix, **options)
        if prostate_sv_mm > 0:
            case.labels = include_proximal_seminal_vesicles(case.labels, prostate_sv_mm)
            case.info["prostate_includes_seminal_vesicles_mm"] = prostate_sv_mm
        ct_path, labels_path = training_case_paths(outdir, f"case{i:03d}")
        written.append(write_image(case.ct, ct_path, overwrite=overwrite))
        written.append(write_image(case.labels, labels_path, overwrite=overwrite))
        with atomic_output(outdir / f"case{i:03d}_info.json", overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(case.info, indent=1))
        if dicom:
            written.append(write_dicom_case(case, outdir / f"case{i:03d}_dicom", overwrite=overwrite))
        if progress is not None:
            progress(i + 1, count)
    return written
