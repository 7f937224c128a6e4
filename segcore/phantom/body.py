"""The body of the phantom: couch and positioning devices, the outline (skin, subcutaneous fat, thighs
parting below the perineum, the natal cleft), the muscles as separate compartments with fat planes between
them, the pelvic cavity's fat and the bowel."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from segcore.phantom.bones import iliac_wing
from segcore.phantom.shapes import Canvas, L, capsule, ellipsoid, in_slabs, norm, rows_of

# The rectus abdominis, mm: its centre behind the envelope's front and its half thickness (about 10 mm
# thick in adults, thinner in older men; up to 18 mm here with its sheath), the height of its middle and
# half its length (from the pubis to the ribs).
RECTUS_CENTRE_MM, RECTUS_HALF_MM = 8.0, 9.0
RECTUS_Z_MM, RECTUS_HALF_HEIGHT_MM = 200.0, 185.0


@dataclass
class Outline:
    """The body's cross-section, mm in the patient frame: centre depth, half width, half depth, the back
    (flattened on the couch), and how deep the fat is."""

    cy: float
    half_width: float
    half_depth: float
    back: float
    fat_lateral: float
    fat_anterior: float
    fat_posterior: float

    def distance(self, x, y, lateral=0.0, anterior=0.0, posterior=0.0):
        """Signed distance to the outline shrunk by the given depths; x and y only, so on an axial grid it
        is computed once for every slice."""
        width = self.half_width - lateral
        depth = np.where(y < self.cy, self.half_depth - anterior, self.half_depth - posterior)
        n = 2.6  # a superellipse: the pelvis is squarer than an ellipse
        r = (np.abs(x / width) ** n + np.abs((y - self.cy) / depth) ** n) ** (1 / n)
        return np.maximum((r - 1) * np.minimum(width, depth), y - (self.back - posterior))

    def envelope(self, x, y):
        """Inside the subcutaneous fat: where the muscles lie."""
        return self.distance(x, y, self.fat_lateral, self.fat_anterior, self.fat_posterior)

    @property
    def front(self) -> float:
        """The envelope's front at the midline: where the abdominal wall's muscles begin."""
        return self.cy - self.half_depth + self.fat_anterior

    def abdominal_wall_back(self, z):
        """y of the back of the rectus abdominis at height z (what a full bladder rises against); the
        muscle thins towards its ends."""
        along = np.clip((z - RECTUS_Z_MM) / RECTUS_HALF_HEIGHT_MM, -1, 1)
        return self.front + RECTUS_CENTRE_MM + RECTUS_HALF_MM * np.sqrt(1 - along * along)


def outline(a: dict) -> Outline:
    sb = a["body_scale"]
    cy, half_depth = 20.0 * sb, 125.0 * sb
    return Outline(cy, 178.0 * sb, half_depth, cy + half_depth * 0.93, a["fat_lateral"], a["fat_anterior"],
                   a["fat_posterior"])


def paint_body(canvas: Canvas, a: dict, hu: dict) -> Outline:
    """Couch, positioning devices, then the body with its muscles; returns the outline."""
    body = outline(a)
    big = canvas.box((-260, -200, -1000), (260, 200, 1000))
    sd = _body_distance(canvas, a, body, big)
    canvas.paint(big, sd, hu["skin"], L["skin"])
    # inside the skin: muscle, cut into compartments by fat planes; the fat (subcutaneous, pelvic,
    # intermuscular) is painted over it
    canvas.paint(big, lambda rows: sd[rows] + np.float32(2.5), hu["muscle"], L["muscle"])
    _paint_muscles(canvas, a, hu, body)
    # the subcutaneous fat covers whatever muscle reached past the envelope
    x, y, _ = canvas.xyz(big)
    envelope = body.envelope(x, y)
    canvas.paint(big, lambda rows: np.maximum(sd[rows] + 2.5, -rows_of(envelope, rows)), hu["fat"], L["fat"])
    canvas.paint(big, lambda rows: -sd[rows], -1000.0, 0)   # muscles end at the skin: air between the thighs
    _paint_couch(canvas, a, body)
    _paint_immobilisation(canvas, a, body, sd, big)
    return body


def _body_distance(canvas: Canvas, a: dict, body: Outline, box):
    """The outline over `box`, with the thighs parting below the crotch, the natal cleft between the
    buttocks, and the thighs lifted off the couch by a knee support. On an axial grid the outline is the
    same on every slice down to where those begin, so it is computed once for them."""
    x, y, z = canvas.xyz(box)
    shape = canvas.hu[box].shape
    sd = body.distance(x, y).astype(np.float32)
    lowest = max(a["crotch_z"] + 45, a["knee_support_z"] if a["knee_support"] else -np.inf)
    out = np.empty(shape, np.float32)
    rows = slice(0, shape[0])
    if x.shape[0] == 1 and y.shape[0] == 1 and z.shape[1:] == (1, 1):
        out[...] = sd
        low = np.nonzero(z.ravel() < lowest)[0]
        rows = slice(low.min(), low.max() + 1) if low.size else slice(0, 0)

    def lower(part):
        part = slice(rows.start + part.start, rows.start + part.stop)
        out[part] = _lower_body(rows_of(sd, part), rows_of(x, part), rows_of(y, part), rows_of(z, part), a, body)

    in_slabs(out[rows].shape, lower)
    return out


def _lower_body(sd, x, y, z, a: dict, body: Outline):
    below = np.clip(a["crotch_z"] - z, 0, None)
    # between the thighs: a gap that opens below the crotch (rounded by the partial-volume edge)
    gap = np.abs(x) - np.clip(0.45 * below, 0, 28)
    sd = np.maximum(sd, np.where(below > 0, -gap, -np.inf))
    # natal cleft: a posterior midline fold from below the coccyx, deepening towards the crotch
    depth = np.clip((a["crotch_z"] + 45 - z) * 1.2, 0, 80)
    cleft = np.maximum(np.abs(x) - 3.0, body.back - depth - y)
    sd = np.maximum(sd, np.where(depth > 0, -cleft, -np.inf))
    if a["knee_support"]:
        lift = np.clip(0.35 * (a["knee_support_z"] - z), 0, 60)
        sd = np.maximum(sd, y - (body.back - lift))
    return sd


def _scanner_xy(canvas: Canvas, x, y):
    """Patient-frame (x, y) -> scanner-frame (x, y) about the patient's centre: the patient's roll
    (`yaw_deg`) turns the patient, not the table."""
    r = canvas.rotation.astype(np.float32)
    return r[0, 0] * x + r[0, 1] * y, r[1, 0] * x + r[1, 1] * y


def _lowest_point(canvas: Canvas, body: Outline) -> float:
    """Scanner y of the rolled body's lowest point, where a level couch touches it (one side of a rolled
    patient's back lifts off the couch)."""
    x, y = np.meshgrid(np.linspace(-body.half_width, body.half_width, 721), np.linspace(body.cy, body.back, 241))
    inside = body.distance(x, y) <= 0
    return float(np.max(_scanner_xy(canvas, x[inside], y[inside])[1]))


def _paint_couch(canvas: Canvas, a: dict, body: Outline) -> None:
    """A radiotherapy flat-top couch (carbon-fibre skins around a foam core) or a curved diagnostic one and
    an optional mattress, level in the scanner; the knee support's foam wedge, under the thighs."""
    back, mattress = body.back, a["mattress_mm"]
    lowest = _lowest_point(canvas, body)
    top = lowest + mattress

    def flat(x, y, half=20.0, at=24.0):
        return np.abs(y - (top + at)) - half

    def trough(x, y, thick=10.0):
        surface = top + 20 - 20 * np.sqrt(np.clip(1 - (x / 260) ** 2, 0, 1))
        return np.maximum(np.abs(y - surface - thick) - thick, np.abs(x) - 250)

    if a["couch"] == "flat":
        _paint_level(canvas, (top, top + 48), flat, -880, L["couch"])
        for offset in (4.0, 40.0):
            _paint_level(canvas, (top, top + 48), lambda x, y, o=offset: flat(x, y, 1.5, o), 250)
    else:  # concave: a shallow trough under the back
        _paint_level(canvas, (top - 5, top + 45), trough, -700, L["couch"])
        _paint_level(canvas, (top - 5, top + 45), lambda x, y: trough(x, y, 1.5), 300)
    if mattress > 0:
        _paint_level(canvas, (lowest - 30, top + 2),
                     lambda x, y: np.maximum(np.abs(y - (lowest + mattress / 2)) - mattress / 2, np.abs(x) - 240),
                     -600, L["couch"])
    if a["knee_support"]:
        z0 = a["knee_support_z"]

        def wedge(x, y, z):
            rise = np.clip(0.35 * (z0 - z), 0, 60)
            # under the thighs, in the patient's frame, but not through the level couch
            under = np.maximum(y - back, _scanner_xy(canvas, x, y)[1] - top)
            return np.maximum(np.maximum(np.abs(x) - 190, (back - rise) - y), np.maximum(under, z - z0))

        canvas.shape((-200, back - 62, -1000), (200, back + 2, z0 + 2), wedge, -850, L["couch"])


def _paint_level(canvas: Canvas, y_range, distance, hu, label=None) -> None:
    """Paint a shape level in the scanner: `distance` of scanner-frame (x, y), between scanner y_range; its
    patient-frame box widened by how far the roll tilts 400 mm."""
    tilt = 400 * abs(canvas.rotation[1, 0]) + 5
    canvas.shape((-400, y_range[0] - tilt, -1000), (400, y_range[1] + tilt, 1000),
                 lambda x, y, z: distance(*_scanner_xy(canvas, x, y)) + 0 * z, hu, label)


def _paint_immobilisation(canvas: Canvas, a: dict, body: Outline, sd, big) -> None:
    """A vacuum bag moulded around the back and sides, or a thermoplastic shell over the front."""
    if a["immobilisation"] == "none":
        return
    x, y, z = canvas.xyz(big)
    if a["immobilisation"] == "vacuum_bag":  # polystyrene beads in a bag: -800 HU, 30 mm round the back
        def bag(rows):
            part, y_ = sd[rows], rows_of(y, rows)
            return np.maximum(np.maximum(-part, part - 30), np.maximum(body.cy + 20 - y_, y_ - body.back))

        canvas.paint(big, bag, -800, L["couch"])
    else:  # 2 mm thermoplastic, 4-6 mm off the skin, over the front and sides, perforated every 6 mm
        def perforated_shell(rows):
            holes = np.sin(rows_of(x, rows) * 1.05) * np.sin(rows_of(z, rows) * 1.05) > 0.35
            shell = np.maximum(np.abs(sd[rows] - 5.0) - 1.0, rows_of(y, rows) - body.cy)
            return np.where(holes, np.float32(10), shell)

        canvas.paint(big, perforated_shell, 120, L["couch"])


# --------------------------------------------------------------------------- muscles


def _paint_muscles(canvas: Canvas, a: dict, hu: dict, body: Outline) -> None:
    """Each muscle a compartment (see Canvas.compartment): gluteal, hip and thigh muscles, the abdominal
    wall and the back. Shapes follow standard anatomy atlases; mm in the patient frame, left side, mirrored."""
    s, rim = a["pelvis_scale"], a["fat_plane_mm"]
    offsets = itertools.cycle(a["muscle_offsets"])   # each muscle a little different
    front = body.front   # the envelope's front and back at the midline
    back = body.back - body.fat_posterior
    side = body.half_width - body.fat_lateral
    muscle = L["muscle"]

    def paint(low, high, distance):
        canvas.compartment(low, high, distance, hu["muscle"] + next(offsets), muscle, hu["fat"], rim)

    # the back (erector spinae and multifidus above the sacrum) and the abdominal wall
    for sx in (1, -1):
        paint((sx * 32 - 35, back - 60, 40), (sx * 32 + 35, back + 5, 400),
              lambda x, y, z, sx=sx: ellipsoid(x, y, z, (sx * 32, back - 24, 190), (30, 26, 150)))
        paint((sx * 40 - 40, front - 5, 20), (sx * 40 + 40, front + 25, 400),
              lambda x, y, z, sx=sx: ellipsoid(x, y, z, (sx * 42, front + RECTUS_CENTRE_MM, RECTUS_Z_MM),
                                               (34, RECTUS_HALF_MM, RECTUS_HALF_HEIGHT_MM)))
        paint((sx * side - 40, -90, 60), (sx * side + 20, 60, 400),
              lambda x, y, z, sx=sx: ellipsoid(x, y, z, (sx * (side - 12), -20, 200), (14, 75, 140)))
    up = np.array([0.0, 0.0, a["hip_lift_mm"]])   # the muscles about the hip rise with the joint
    for sx in (1, -1):
        for p0, p1, r in _limb_muscles(sx, s):
            p0, p1 = np.asarray(p0, float) + up, np.asarray(p1, float) + up
            paint(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r,
                  lambda x, y, z, p0=p0, p1=p1, r=r: capsule(x, y, z, p0, p1, r))
        _paint_gluteal(paint, sx, s, a["hip_lift_mm"],
                       ((26 * s, (64 * s, 56 * s, 18 * s)), (10 * s, (52 * s, 44 * s, 8 * s))))


def _limb_muscles(sx, s):
    """(start, end, radius) of the muscles about the hip and in the thigh, as capsules. They overlap on
    purpose: each later one cuts a fat plane into the earlier ones, and the pelvic cavity, bones and organs
    painted afterwards take their own places."""
    k = s
    return [
        # gluteus maximus: a thick sheet from the sacrum and coccyx down and out to the femur
        ((sx * 40 * k, 104 * k, 85 * k), (sx * 118 * k, 70 * k, -80 * k), 40 * k),
        ((sx * 22 * k, 112 * k, 30 * k), (sx * 90 * k, 100 * k, -75 * k), 30 * k),
        # thigh: vastus, adductors, hamstrings, rectus femoris, sartorius, tensor fasciae latae, pectineus
        ((sx * 140 * k, -8 * k, -35 * k), (sx * 126 * k, -22 * k, -330), 34 * k),
        ((sx * 30 * k, -40 * k, -25 * k), (sx * 86 * k, 4 * k, -300), 40 * k),
        ((sx * 62 * k, 40 * k, -46 * k), (sx * 96 * k, 48 * k, -320), 30 * k),
        ((sx * 106 * k, -46 * k, 12 * k), (sx * 112 * k, -62 * k, -320), 19 * k),
        ((sx * 124 * k, -62 * k, 62 * k), (sx * 72 * k, -52 * k, -320), 11 * k),
        ((sx * 145 * k, -42 * k, 50 * k), (sx * 152 * k, -20 * k, -100 * k), 14 * k),
        ((sx * 36 * k, -50 * k, 2 * k), (sx * 92 * k, -16 * k, -56 * k), 14 * k),
        # quadratus femoris and obturator externus between the ischium and the femur
        ((sx * 70 * k, 24 * k, -36 * k), (sx * 118 * k, 16 * k, -44 * k), 11 * k),
    ]


def _paint_gluteal(paint, sx, s, lift, layers) -> None:
    """Muscles lying on the iliac wing: (offset along its lateral normal, half sizes) each. Gluteus medius
    and minimus lie on its outer face (positive offsets), the iliacus on its inner face."""
    centre, frame, _ = iliac_wing(sx, s, lift)
    normal = frame[:, 2] * np.sign(frame[0, 2] * sx)   # points laterally, away from the pelvis
    for offset, half in layers:
        c = centre + offset * normal - np.array([0, 0, 12 * s if offset > 0 else 0])
        reach = max(half) + 2
        paint(c - reach, c + reach, lambda x, y, z, c=c, h=half: ellipsoid(x, y, z, c, h, frame))


# --------------------------------------------------------------------------- pelvic fat and bowel


def paint_pelvic_fat(canvas: Canvas, a: dict, hu: dict, body: Outline) -> None:
    """The pelvic cavity's fat (widening towards the inlet) and, above the pubis, the space behind the
    abdominal wall; the ischiorectal fossae; then the muscles of the pelvic walls: iliopsoas, obturator
    internus and the levator ani below."""
    s, roomy, lift = a["pelvis_scale"], a["cavity_scale"], a["hip_lift_mm"]
    wall_back = body.abdominal_wall_back

    def paint(low, high, distance):
        canvas.compartment(low, high, distance, hu["muscle"], L["muscle"], hu["fat"], a["fat_plane_mm"])

    def cavity(x, y, z):
        # the true pelvis, widening through the inlet into the abdomen's lower part
        width = s * roomy * (42 + 0.3 * np.clip(z, 0, 130) + 0.3 * np.clip(z - 130, 0, 100))
        depth = s * roomy * (46 + 0.25 * np.clip(z - 90, 0, 100))
        r = norm(x / width, (y - 16 * s) / depth)
        sd = np.maximum((r - 1) * np.minimum(width, depth), -48 * s - z)
        # above the pubic symphysis nothing but the thin abdominal wall lies in front of the bladder and
        # the bowel: the prevesical space and the lower peritoneal cavity reach forward to the wall's back,
        # between the iliopsoas muscles on either side
        front_width = s * (50 + 0.4 * np.clip(z - 30 * s, 0, 100))
        front = np.maximum(np.maximum(np.abs(x) - front_width, wall_back(z) - y), 30 * s - z)
        return np.minimum(sd, np.maximum(front, y - 16 * s))

    canvas.shape((-150, -100, -60), (150, 120, 1000), cavity, hu["fat"], L["fat"])
    for sx in (1, -1):
        canvas.shape((sx * 38 * s - 30, 5, -80), (sx * 38 * s + 30, 75, -5),
                     lambda x, y, z, sx=sx: ellipsoid(x, y, z, (sx * 38 * s, 38 * s, -42 * s), (22 * s, 30 * s, 32)),
                     hu["fat"], L["fat"])
        # the femoral triangle's fat, with the femoral artery and vein, in front of the hip
        triangle = np.array([sx * 58 * s, -52 * s, -5 * s + lift])
        canvas.shape(triangle - 40, triangle + 40,
                     lambda x, y, z, c=triangle: ellipsoid(x, y, z, c, (16 * s, 12 * s, 38)), hu["fat"], L["fat"])
        for dx, r in ((10, 4.5), (-3, 5.5)):
            c0, c1 = triangle + [sx * dx, -2, 40], triangle + [sx * dx, 2, -40]
            canvas.shape(np.minimum(c0, c1) - r, np.maximum(c0, c1) + r,
                         lambda x, y, z, c0=c0, c1=c1, r=r: capsule(x, y, z, c0, c1, r), hu["muscle"] - 10)
        wall = s * roomy * 42
        paint((sx * wall - 12, -40, -45), (sx * wall + 12, 50, 30),
              lambda x, y, z, sx=sx, w=wall: ellipsoid(x, y, z, (sx * (w + 3), 6 * s, -8 * s), (8 * s, 34 * s, 28 * s)))
        # psoas down to the iliopsoas in front of the hip and on to the lesser trochanter (these two rise
        # with the hip joint)
        for p0, p1, r in (((sx * 42 * s, 30 * s, 260), (sx * 64 * s, 12 * s, 95 * s + lift), 21 * s),
                          ((sx * 64 * s, 12 * s, 95 * s + lift), (sx * 76 * s, -48 * s, 22 * s + lift), 16 * s),
                          ((sx * 76 * s, -48 * s, 22 * s + lift), (sx * 104 * s, 4 * s, -48 * s + lift), 12 * s)):
            p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
            paint(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r,
                  lambda x, y, z, p0=p0, p1=p1, r=r: capsule(x, y, z, p0, p1, r))
        _paint_gluteal(paint, sx, s, lift, ((-17 * s, (52 * s, 46 * s, 10 * s)),))

    def levator(x, y, z):
        shell = np.abs(ellipsoid(x, y, z, (0, 22 * s, -8 * s), (44 * s, 46 * s, 42 * s))) - 2.5
        return np.maximum(shell, z + 4)

    canvas.shape((-60, -40, -60), (60, 80, 0), levator, hu["muscle"], L["muscle"])


def paint_bowel(canvas: Canvas, a: dict, hu: dict) -> None:
    """Bowel loops above the bladder (painted before it: the bladder pushes them away)."""
    s = a["pelvis_scale"]
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
