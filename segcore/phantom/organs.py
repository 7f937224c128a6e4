"""The pelvic organs of the phantom and what planning CTs show in and around them: bladder (nearly empty
to full, with contrast or a catheter balloon), seminal vesicles, rectum (gas and faeces, pushed back by a
spacer gel), prostate (normal or enlarged with a median lobe, calcifications, gold fiducial markers, the
catheter through the urethra)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segcore.phantom.shapes import Canvas, L, capsule, ellipsoid, norm, rotation_from

# Gold and steel attenuate far beyond the 12-bit range: painted at their own values, blurred by the
# scanner, then clipped at 3071 HU like every CT, they saturate and bloom as on real scans.
GOLD_HU = 20000.0


@dataclass
class Prostate:
    """Where the prostate is (x, y; z is 0 in the patient frame) and its semi-axes, mm."""

    x: float
    y: float
    a: float
    b: float
    c: float


def paint_organs(canvas: Canvas, a: dict, hu: dict, wall_back) -> Prostate:
    """Bladder, seminal vesicles, spacer and rectum, prostate, then the devices in them. One random stream
    (from the shape seed) serves them all, drawn in this order. ``wall_back(z)``: the y of the abdominal
    wall's back at height z, which a full bladder rises against."""
    shape_rng = np.random.default_rng(a["shape_seed"] + 1)
    k = (a["prostate_cc"] * 1000 / (4 / 3 * np.pi * 1.15 * 0.82 * 1.0)) ** (1 / 3)
    prostate = Prostate(a["prostate_shift_x"], a["prostate_y"], 1.15 * k, 0.82 * k, 1.0 * k)
    a["prostate_radii_mm"] = [round(prostate.a, 2), round(prostate.b, 2), round(prostate.c, 2)]
    bladder_centre = _paint_bladder(canvas, a, hu, prostate, shape_rng, wall_back)
    _paint_seminal_vesicles(canvas, a, hu, prostate, shape_rng)
    if a["spacer"]:
        _paint_spacer(canvas, a, prostate)
    _paint_rectum(canvas, a, hu, prostate, shape_rng)
    _paint_prostate(canvas, a, hu, prostate)
    if a["catheter"]:
        _paint_catheter(canvas, a, prostate, bladder_centre)
    if a["fiducials"]:
        paint_fiducials(canvas, a, prostate)
    return prostate


def _bladder_radii(cc: float):
    """Semi-axes (x, y, z) for a filling: an empty bladder is a flat, wide dish on the prostate; filling
    it rounds it and raises its dome."""
    full = float(np.clip((cc - 40) / 450, 0, 1))
    ratio = np.array([1.45 - 0.2 * full, 1.05, 0.5 + 0.4 * full])
    scale = (cc * 1000 / (4 / 3 * np.pi * np.prod(ratio))) ** (1 / 3)
    return ratio * scale, full


def _forward_rise(a: dict, full: float, front: float, wall_back: float) -> float:
    """How far (mm) a filling bladder's upper part moves forward. Filling, the bladder rises out of the
    pelvis along the anterior abdominal wall: a distended bladder lies against the wall above the pubis,
    with no peritoneum between them (the anatomy that suprapubic catheterisation relies on). Half full and
    more, it goes most of the way to the wall (drawn per patient, ``bladder_rise``); a few mm of
    prevesical fat stay."""
    room = max(0.0, front - (wall_back + 3.0))
    return a["bladder_rise"] * min(1.0, 2.0 * full) * room


def _paint_bladder(canvas: Canvas, a: dict, hu: dict, p: Prostate, shape_rng, wall_back) -> np.ndarray:
    """Wall, urine, and contrast sunk posteriorly if any; the dome is dented by the bowel when the bladder
    is not full; the upper half sheared forward towards the abdominal wall (`_forward_rise`), the base
    kept on the prostate. Returns the centre."""
    (ba, bb, bc), full = _bladder_radii(a["bladder_cc"])
    centre = np.array([p.x + shape_rng.uniform(-5, 5), p.y - 10 - 0.15 * bb, 0.7 * p.c + 0.92 * bc])
    rise = _forward_rise(a, full, centre[1] - bb, float(wall_back(centre[2])))
    a["bladder_rise_mm"] = round(rise, 2)
    bumps = shape_rng.uniform(0, 2 * np.pi, 3)
    # the semi-axes along x, y (front-back) and z (up), tipped forward or back about x by the tilt
    frame = rotation_from((1, 0, 0), (0, np.cos(a["bladder_tilt"]), -np.sin(a["bladder_tilt"])))
    dent = centre + np.array([shape_rng.uniform(-0.3, 0.3) * ba, 0, bc * (1.6 - 0.3 * (1 - full))])
    dent_radius = bc * (0.9 - 0.5 * full)

    def bladder(x, y, z):
        # the shear: nothing at the base, all of ``rise`` from the centre's height up
        y = y + rise * np.clip((z - (centre[2] - bc)) / bc, 0, 1)
        k = (ba * bb * bc) ** (1 / 3)
        wobble = 0.06 * k * np.sin(x / 17 + bumps[0]) * np.sin(y / 19 + bumps[1]) * np.sin(z / 23 + bumps[2])
        sd = ellipsoid(x, y, z, centre, (ba, bb, bc), frame) + wobble
        return np.maximum(sd, dent_radius - norm(x - dent[0], (y - dent[1]) * 1.3, z - dent[2]))

    reach = np.array([ba, bb, bc]) * 1.2 + 6
    box = canvas.box(centre - reach - [0, rise, 0], centre + reach)
    if box is None:
        return centre
    x, y, z = canvas.xyz(box)
    sd = bladder(x, y, z)
    canvas.paint(box, sd, hu["bladder_wall"], L["bladder"])
    urine = hu["urine"]
    if a["bladder_contrast"]:   # supine: contrast sinks to the posterior (dependent) part
        level = centre[1] + bb * a["contrast_level"]
        urine = np.where(y > level, hu["contrast"], hu["urine"]).astype(np.float32)
    canvas.paint(box, sd + a["bladder_wall_mm"], urine)
    return centre


def _paint_seminal_vesicles(canvas: Canvas, a: dict, hu: dict, p: Prostate, shape_rng) -> None:
    """Behind the bladder base, above the prostate, fanning out laterally."""
    for sx in (1, -1):
        center = np.array([p.x + sx * (0.55 * p.a + 6), p.y + 0.7 * p.b + 3, 0.75 * p.c + 7])
        frame = rotation_from((sx * 0.85, 0.25, 0.5), (0, 1, 0))
        radii = (shape_rng.uniform(16, 24), shape_rng.uniform(5, 7.5), shape_rng.uniform(4.5, 6.5))
        canvas.shape(center - 26, center + 26,
                     lambda x, y, z, c=center, f=frame, r=radii: ellipsoid(x, y, z, c, r, f),
                     hu["seminal_vesicles"], L["seminal_vesicles"])


def _rectum_front(a: dict, p: Prostate) -> float:
    """y of the rectum's axis behind the prostate (and behind the spacer, if any)."""
    spacer = a["spacer_mm"] if a["spacer"] else 0.0
    return p.y + p.b + a["rectum_radius"] + 1.5 + spacer


def _paint_spacer(canvas: Canvas, a: dict, p: Prostate) -> None:
    """Hydrogel between the prostate's back and the rectum's front wall, as long as the gland."""
    t = a["spacer_mm"]
    centre = np.array([p.x, p.y + p.b + t / 2 + 0.5, -0.1 * p.c])
    radii = (0.75 * p.a + 4, t / 2 + 1.0, 1.1 * p.c)
    canvas.shape(centre - radii, centre + radii, lambda x, y, z: ellipsoid(x, y, z, centre, radii), a["spacer_hu"])


def _paint_rectum(canvas: Canvas, a: dict, hu: dict, p: Prostate, shape_rng) -> None:
    """A tube from the anal canal along the back of the prostate, then following the sacral curve; wall,
    faeces and gas (gas rises anteriorly)."""
    rr = a["rectum_radius"]
    yr = _rectum_front(a, p)
    path = np.array([[0, yr - 2, -62], [0, yr, -0.6 * p.c], [p.x, yr + 3, 28],
                     [p.x + 4, yr + 14, 72], [p.x + 12, yr + 10, 108]], float)
    radii = [7.0, rr * 0.9, rr, rr * 0.95, rr * 0.85]
    low, high = path.min(axis=0) - rr - 4, path.max(axis=0) + rr + 4
    box = canvas.box(low, high)
    if box is None:
        return
    x, y, z = canvas.xyz(box)
    sd = np.min([capsule(x, y, z, path[i], path[i + 1], radii[i], radii[i + 1]) for i in range(4)], axis=0)
    canvas.paint(box, sd, hu["rectal_wall"], L["rectum"])
    texture = canvas.texture(box, 6.0, shape_rng)
    content = np.where(texture > 0.75, -900.0, hu["faeces"] + 60 * (texture - 0.5)).astype(np.float32)
    gas_level = (y - yr) / rr  # -1 anterior .. +1 posterior
    content = np.where(gas_level < (a["rectal_gas"] * 2 - 1.2), -980.0, content).astype(np.float32)
    canvas.paint(box, sd + 3.0, content)


def _paint_prostate(canvas: Canvas, a: dict, hu: dict, p: Prostate) -> None:
    """An ellipsoid wider at the base; an enlarged gland pushes a median lobe up into the bladder base.
    Optional calcifications."""
    centre = np.array([p.x, p.y, 0.0])
    lobe = a["median_lobe"] if a["enlarged_prostate"] else 0.0
    lobe_centre = centre + np.array([0, -0.1 * p.b, 0.75 * p.c])

    def prostate(x, y, z):
        taper = 1 + 0.12 * np.clip(z / p.c, -1, 1)
        sd = ellipsoid((x - p.x) / taper + p.x, (y - p.y) / taper + p.y, z, centre, (p.a, p.b, p.c))
        if lobe > 0:
            sd = np.minimum(sd, ellipsoid(x, y, z, lobe_centre, (0.45 * p.a, 0.5 * p.b, (0.3 + lobe) * p.c)))
        return sd

    top = p.c * (1.1 + lobe)
    canvas.shape(centre - [p.a * 1.2, p.b * 1.2, p.c], centre + [p.a * 1.2, p.b * 1.2, top], prostate, hu["prostate"],
                 L["prostate"])
    if a["calcifications"]:
        for cx, cy, cz, radius, value in a["calcification_points"]:
            c = centre + np.array([cx * p.a, cy * p.b, cz * p.c])
            canvas.shape(c - radius, c + radius, lambda x, y, z, c=c, r=radius: norm(x - c[0], y - c[1], z - c[2]) - r,
                         value)


def _paint_catheter(canvas: Canvas, a: dict, p: Prostate, bladder_centre) -> None:
    """A Foley catheter (6 mm, 18 Fr) up the urethra through the prostate, its balloon (about 10 ml of water
    or dilute contrast) at the bladder neck. The organs keep their labels, as clinical contours do."""
    neck = np.array([p.x, p.y - 0.15 * p.b, 0.95 * p.c])
    start = np.array([p.x, p.y - 1.2 * p.b - 25, -p.c - 45])   # the urethra bends forwards below the apex
    apex = np.array([p.x, p.y - 0.1 * p.b, -p.c - 8])
    for p0, p1 in ((start, apex), (apex, neck + [0, 0, 6])):
        canvas.shape(np.minimum(p0, p1) - 4, np.maximum(p0, p1) + 4,
                     lambda x, y, z, p0=p0, p1=p1: capsule(x, y, z, p0, p1, 3.0), 120)
        canvas.shape(np.minimum(p0, p1) - 4, np.maximum(p0, p1) + 4,
                     lambda x, y, z, p0=p0, p1=p1: capsule(x, y, z, p0, p1, 1.2), -500)
    balloon = neck + np.array([0, 0, 13.0])
    canvas.shape(balloon - 14, balloon + 14, lambda x, y, z: norm(x - balloon[0], y - balloon[1], z - balloon[2]) - 13,
                 120)
    canvas.shape(balloon - 14, balloon + 14, lambda x, y, z: norm(x - balloon[0], y - balloon[1], z - balloon[2]) - 12,
                 a["catheter_balloon_hu"])


def paint_fiducials(canvas: Canvas, a: dict, p: Prostate) -> None:
    """Three gold markers (1.2 x 3 mm cylinders) inside the gland, saturated, with short streaks in their
    axial plane; they stay labelled prostate."""
    centres = []
    for fx, fy, fz, theta, phi in a["fiducial_points"]:
        c = np.array([p.x + fx * p.a, p.y + fy * p.b, fz * p.c])
        axis = 1.5 * np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
        canvas.shape(c - 4, c + 4, lambda x, y, z, c=c, d=axis: capsule(x, y, z, c - d, c + d, 0.7), GOLD_HU)
        centres.append(c)
    rng = np.random.default_rng(a["shape_seed"] + 3)
    for c in centres:
        metal_streaks(canvas, c[:2], (c[2] - 2.5, c[2] + 2.5), 1.5, rng, rays=4, strength=(150, 500), reach_mm=25,
                      box_xy=100.0)


def metal_streaks(canvas: Canvas, centre_xy, z_range, radius, rng, rays=7, strength=(60, 220), reach_mm=70.0,
                  box_xy=400.0) -> None:
    """Streak artefacts from metal: alternating bright and dark rays from `centre_xy` in the axial slices
    of `z_range`, fading with distance, added to tissue (not to air)."""
    low = (centre_xy[0] - box_xy, centre_xy[1] - box_xy, z_range[0])
    high = (centre_xy[0] + box_xy, centre_xy[1] + box_xy, z_range[1])
    box = canvas.box(low, high, margin=0)
    if box is None:
        return
    x, y, _ = canvas.xyz(box)
    spokes = [(rng.uniform(0, np.pi), rng.choice([-1.0, 1.0]), rng.uniform(*strength)) for _ in range(rays)]
    angle = np.arctan2(y - centre_xy[1], x - centre_xy[0])
    distance = norm(x - centre_xy[0], y - centre_xy[1])
    streak = sum(sign * size * np.exp(-((np.sin(angle - theta) / 0.04) ** 2)) for theta, sign, size in spokes)
    streak = (streak * np.exp(-distance / reach_mm) * (distance > radius)).astype(np.float32)
    region = canvas.hu[box]
    region += np.where(canvas.labels[box] > 0, streak, np.float32(0))
