"""The bones of the phantom: sacrum and coccyx, hip bones (ilium, acetabulum, pubis, ischium), femora
(head, neck, trochanters, shaft), each a cortical shell around trabecular bone with its grainy texture,
and hip prostheses with their streaks."""

from __future__ import annotations

import numpy as np

from segcore.phantom.organs import metal_streaks
from segcore.phantom.shapes import Canvas, L, capsule, ellipsoid, norm, oriented_box, rotation_from

METAL_HU = 8000.0   # cobalt-chrome or steel, saturated after clipping (see organs.GOLD_HU)
BONE_LABELS = ("hip_bone_left", "hip_bone_right", "sacrum", "femur_left", "femur_right", "femoral_head_left",
               "femoral_head_right")


def head_centre(a: dict, sx: float) -> np.ndarray:
    """The femoral head's centre: heads 170-190 mm apart in men, `hip_lift_mm` above where the pelvic floor
    alone would put them (`patient._draw_hip_lift`)."""
    s = a["pelvis_scale"]
    return np.array([sx * 88 * s, -8 * s, 18 * s + a["hip_lift_mm"]])


def raised(piece, lift: float):
    """A (low, high, distance, ...) piece moved `lift` mm up (the patient's head end)."""
    low, high, distance, *rest = piece
    up = np.array([0.0, 0.0, lift])
    return (np.asarray(low, float) + up, np.asarray(high, float) + up,
            lambda x, y, z: distance(x, y, z - np.float32(lift)), *rest)


def paint_bones(canvas: Canvas, a: dict, hu: dict) -> None:
    """Sacrum and coccyx, each side's hip bone and femur, the trabecular texture, then the prostheses
    (after the organs: soft tissue gives way to bone). All pieces' outer surfaces are painted before any
    interior, so where pieces of one bone overlap no cortex line runs through the bone; a piece with a 0 mm
    shell has no cortex, and a hip-bone piece cut by the socket has none on the cut (`_hip_bone_pieces`)."""
    s = a["pelvis_scale"]
    rh = a["femoral_head_radius"]
    shell = (1.5, hu["cancellous"])
    pieces = [(*piece, L["sacrum"], *shell, None) for piece in _sacrum_pieces(s)]
    for name, sx in (("left", 1.0), ("right", -1.0)):
        head = head_centre(a, sx)
        pieces += [(low, high, distance, L[f"hip_bone_{name}"], *shell, cut)
                   for low, high, distance, cut in _hip_bone_pieces(head, rh, sx, s, a["hip_lift_mm"])]
        pieces += [(*piece, None) for piece in _femur_pieces(a, hu, name, head, rh, sx, shell)]
    painted = []
    for low, high, distance, label, thickness, inner, cut in pieces:
        box = canvas.box(low, high)
        if box is not None:
            xyz = canvas.xyz(box)
            sd = distance(*xyz)
            inner_sd = sd + np.float32(thickness)
            if cut is not None:
                cut_sd = cut(*xyz)
                sd, inner_sd = np.maximum(sd, cut_sd), np.maximum(inner_sd, cut_sd)
            canvas.paint(box, sd, hu["cortical"] if thickness > 0 else inner, label)
            painted.append((box, inner_sd, inner))
    for box, inner_sd, inner in painted:
        canvas.paint(box, inner_sd, inner)
    if painted:   # the texture only where bone can be: the pieces' boxes together
        around = tuple(slice(min(box[m].start for box, _, _ in painted), max(box[m].stop for box, _, _ in painted))
                       for m in range(3))
        _add_trabecular_texture(canvas, around, hu, np.random.default_rng(a["shape_seed"] + 4))
    for name in a["implant_sides"]:
        sx = 1.0 if name == "left" else -1.0
        _paint_implant(canvas, a, head_centre(a, sx), rh, sx, s)


def _sacrum_pieces(s: float):
    """(low, high, distance) of the sacrum and the coccyx's segments."""
    sacrum_c = np.array([0, -25 * s, 55 * s])
    radius_sacrum = 110 * s

    def sacrum(x, y, z):
        # a curved plate, concave forwards both in the sagittal plane (the arc) and across (the wings bend
        # forwards), narrowing to its apex
        rho = norm(y + 0.004 * x * x - sacrum_c[1], z - sacrum_c[2])
        t = np.clip((z - 5 * s) / (113 * s), 0, 1)
        thickness = 9 + 24 * t * t
        width = 18 + 40 * t
        sd = np.abs(rho - radius_sacrum) - thickness / 2
        sd = np.maximum(sd, np.abs(x) - width)
        return np.maximum(sd, np.maximum(5 * s - z, np.maximum(z - 118 * s, sacrum_c[1] - y)))

    pieces = [((-60, 20, -10), (60, 110, 125), sacrum)]
    # coccyx: four small segments below the sacral apex, curving forwards less than the sacrum, with
    # joint spaces between them (labelled with the sacrum)
    points = np.array([[0, 72, 3], [0, 69, -6], [0, 65, -14], [0, 61, -21], [0, 57, -27]], float) * s
    for i, radius in enumerate((6.5, 5.5, 4.5, 3.5)):
        p0, p1 = points[i] + 0.15 * (points[i + 1] - points[i]), points[i + 1] - 0.15 * (points[i + 1] - points[i])
        pieces.append((np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius,
                       lambda x, y, z, p0=p0, p1=p1, r=radius: capsule(x, y, z, p0, p1, r)))
    return pieces


JOINT_SPACE_MM = 2.5


def _socket_cut(piece, head, rh):
    """(low, high, distance, cut): the piece and, where its box reaches the socket (the head and its joint
    space), the distance to the socket's outside, which takes the socket out of the piece. Every hip-bone
    piece is cut so, so the head is ringed by joint space wherever bone is near; the cut face gets no
    cortex, as the acetabulum's subchondral plate, like the head's, merges into the trabeculae."""
    low, high, distance = piece
    reach = rh + JOINT_SPACE_MM
    if np.any(np.asarray(low) > head + reach) or np.any(np.asarray(high) < head - reach):
        return low, high, distance, None
    return low, high, distance, lambda x, y, z: reach - norm(x - head[0], y - head[1], z - head[2])


def _acetabulum(head, rh, sx):
    """The acetabular walls: a shell about 9 mm thick (the lunate surface's bone and the medial wall over
    the fossa) round the head's upper, inner and back part, open laterally, forwards and
    down (the acetabulum faces about 45 degrees down and 15-20 degrees forwards). The thick roof is the
    iliac body's lower end (`_iliac_body`); the anterior and posterior columns are the pubic and ischial
    pieces where they meet the socket."""
    opening = np.array([sx * 0.68, -0.28, -0.68])

    def cup(x, y, z):
        outer = norm(x - head[0], y - head[1], z - head[2]) - (rh + JOINT_SPACE_MM + 9)
        facing = opening[0] * (x - head[0]) + opening[1] * (y - head[1]) + opening[2] * (z - head[2]) - 2
        return np.maximum(outer, facing)

    return head - rh - 10, head + rh + 10, cup


def _iliac_body(head, sx, s, lift):
    """The ilium's body between the acetabular roof and the wing: solid trabecular bone about 22 mm thick
    (the supra-acetabular bone that takes the pelvis's long screws), in axial section an oval about 50 mm
    long in the wing's direction, not a round column. Drawn as a rounded plate in the wing's frame
    (`iliac_wing`) standing over the head, a little behind and medial of it, as the body leads back to the
    sciatic notch; its lower end, cut by the socket, is the acetabular roof, so no round ball of bone sits
    over the head."""
    _, frame, _ = iliac_wing(sx, s, lift)
    centre = head + np.array([-sx * 4, 8, 38]) * s
    half = np.array([14, 22, 0]) * s
    radius = 11 * s
    reach = np.abs(frame) @ half + radius + 2
    return centre - reach, centre + reach, lambda x, y, z: oriented_box(x, y, z, centre, frame, half) - radius


def iliac_wing(sx: float, s: float, lift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The iliac wing as a plate: centre, frame (length, height, thickness axes) and half sizes, mm. Its back
    end is at the sacroiliac joint; its front end is the anterior superior iliac spine, placed from the hip
    joint centre by Bell, Pedersen and Brand (J Biomech 1990): the joint centre lies 30 % of the inter-ASIS
    width below the ASIS, 19 % behind and 14 % medial of it. With the heads 176 mm apart (`head_centre`)
    that puts the ASIS 122 mm from the midline, 46 mm in front of the joint centre and 73 mm above it, in the
    coronal plane of the pubic symphysis (Lewinnek's anterior pelvic plane). The wing rises with the hip
    joint (`lift`, mm)."""
    back = np.array([sx * 49, 71, 91]) * s + [0, 0, lift]
    asis = np.array([sx * 122, -54, 91]) * s + [0, 0, lift]
    length, height = np.linalg.norm(asis - back), 110 * s
    frame = rotation_from(asis - back, (sx * 0.25, 0, 1))
    # turned 20 degrees in its own plane so that its front edge runs down and back from the ASIS to the
    # acetabulum (the notch below the anterior inferior spine) while its back edge leans back over the
    # sacroiliac joint
    turn = np.deg2rad(-20)
    u, v = frame[:, 0], frame[:, 1]
    frame = np.stack([np.cos(turn) * u + np.sin(turn) * v, np.cos(turn) * v - np.sin(turn) * u, frame[:, 2]], 1)
    # the ASIS is the front edge's point 30 mm below its top
    centre = asis - length / 2 * frame[:, 0] - (height / 2 - 30 * s) * frame[:, 1]
    return centre, frame, np.array([length / 2, height / 2, 5.5 * s])


def _iliac_wing_piece(head, sx, s, lift):
    """The wing less the greater sciatic notch: no bone behind and below the notch's apex, which we place
    45 mm above and 30 mm behind the hip joint's centre (our reading of pelvic atlases, not a measurement).
    Above the acetabulum the ilium is then its body alone, about 5 cm from front to back."""
    centre, frame, half = iliac_wing(sx, s, lift)
    reach = np.abs(frame) @ half + 2
    notch = head + np.array([0, 30, 45]) * s

    def wing(x, y, z):
        in_notch = np.maximum(notch[1] - y, z - notch[2])
        return np.maximum(oriented_box(x, y, z, centre, frame, half), -in_notch)

    return centre - reach, centre + reach, wing


def _hip_bone_pieces(head, rh, sx, s, lift):
    """(low, high, distance, cut) of the hip bone's pieces on one side (sx +1 left, -1 right), `cut` the
    socket where a piece reaches it (`_socket_cut`). Acetabulum, ilium
    and ischium rise with the hip joint (`lift`, mm); the symphysis stays with the pelvic floor, and the pubic
    rami run from it up to the acetabulum."""
    up = np.array([0.0, 0.0, lift])
    superior = (np.array([sx * 12 * s, -55 * s, 16 * s]), np.array([sx * 72 * s, -24 * s, 22 * s]) + up)
    inferior = (np.array([sx * 12 * s, -52 * s, -8 * s]), np.array([sx * 48 * s, 6 * s, -34 * s]) + up)
    pieces = [
        _acetabulum(head, rh, sx),
        _iliac_body(head, sx, s, lift),
        _iliac_wing_piece(head, sx, s, lift),
        # pubis: superior ramus to the symphysis, inferior ramus, symphyseal body (the obturator foramen is
        # the gap these leave with the ischium)
        (np.minimum(*superior) - 12, np.maximum(*superior) + 12,
         lambda x, y, z: capsule(x, y, z, *superior, 10 * s)),
        (np.minimum(*inferior) - 10, np.maximum(*inferior) + 10,
         lambda x, y, z: capsule(x, y, z, *inferior, 8 * s)),
        ((sx * 10 * s - 15, -75, -25), (sx * 10 * s + 15, -35, 40),
         lambda x, y, z: ellipsoid(x, y, z, (sx * 10 * s, -55 * s, 6 * s), (7.5 * s, 12 * s, 22 * s))),
        # ischium down to the tuberosity
        raised(((sx * 65 * s - 35, -10, -60), (sx * 65 * s + 35, 45, 25),
                lambda x, y, z: capsule(x, y, z, (sx * 80 * s, 12 * s, 6 * s), (sx * 52 * s, 24 * s, -34 * s),
                                        13 * s, 16 * s)),
               lift),
    ]
    return [_socket_cut(piece, head, rh) for piece in pieces]


def _femur_pieces(a: dict, hu: dict, name: str, head, rh, sx, shell):
    """(low, high, distance, label, shell mm, interior HU) of the femur, `shell` for the usual cortex: neck (about 130 degrees to the
    shaft, 10-15 degrees of anteversion), greater and lesser trochanters, the shaft (thick cortex around
    fatty marrow), and last the head: dense trabecular bone (its compressive trabeculae) with no cortex of
    its own (shell 0): its subchondral plate is about a millimetre thick and merges into the trabeculae,
    so CT shows the head as a trabecular ball ringed by the darker joint space, not by a bright line. Drawn
    with the hip joint at the pelvic floor's height, then raised by `hip_lift_mm`."""
    s, lift = a["pelvis_scale"], a["hip_lift_mm"]
    femur_label, head_label = L[f"femur_{name}"], L[f"femoral_head_{name}"]
    head = head - np.array([0.0, 0.0, lift])
    neck_end = (sx * 128 * s, 2 * s, -14 * s)
    pieces = [
        ((sx * 110 * s - 30, -40, -30), (sx * 110 * s + 40, 20, 40),
         lambda x, y, z, h=head: capsule(x, y, z, h, neck_end, 14 * s), femur_label, *shell),
        ((sx * 135 * s - 25, -30, -40), (sx * 135 * s + 25, 35, 20),
         lambda x, y, z: ellipsoid(x, y, z, (sx * 136 * s, 4 * s, -12 * s), (13 * s, 20 * s, 22 * s)), femur_label, *shell),
        ((sx * 105 * s - 15, -5, -60), (sx * 105 * s + 15, 25, -30),
         lambda x, y, z: norm(x - sx * 106 * s, y - 10 * s, z + 46 * s) - 9 * s, femur_label, *shell),
        ((sx * 122 * s - 25, -35, -1000), (sx * 122 * s + 25, 25, -10),
         lambda x, y, z: capsule(x, y, z, (sx * 128 * s, 0, -18 * s), (sx * 112 * s, -12 * s, -330), 15 * s),
         femur_label, 5.5, hu["marrow"]),
        (head - rh - 4, head + rh + 4, lambda x, y, z, h=head: norm(x - h[0], y - h[1], z - h[2]) - rh,
         head_label, 0.0, hu["cancellous"] + hu["head_extra"]),
    ]
    return [raised(piece, lift) for piece in pieces]


def _add_trabecular_texture(canvas: Canvas, box, hu: dict, rng) -> None:
    """Grainy trabecular bone: voxel noise inside the bones' cancellous part (below the cortex's HU) within
    `box`, which the scanner's blur turns into the coarse texture of trabeculae and marrow spaces."""
    is_bone = np.zeros(256, bool)
    is_bone[[L[n] for n in BONE_LABELS]] = True
    region = canvas.hu[box]
    inner = is_bone[canvas.labels[box]] & (region < 0.5 * (hu["cortical"] + hu["cancellous"]))
    region[inner] += rng.standard_normal(int(inner.sum()), dtype=np.float32) * np.float32(hu["trabecular_sd"])


def _paint_implant(canvas: Canvas, a: dict, head, rh, sx, s) -> None:
    """Total hip replacement: metal ball in the head (still the femoral-head OAR), neck and stem (labelled
    implant), with streak artefacts in the axial planes."""
    canvas.shape(head - rh, head + rh, lambda x, y, z: norm(x - head[0], y - head[1], z - head[2]) - (rh - 3), METAL_HU)
    neck_end = np.array([sx * 128 * s, -8 * s, -14 * s + a["hip_lift_mm"]])
    stem_end = np.array([sx * 118 * s, -8 * s, -150 * s + a["hip_lift_mm"]])
    for p0, p1, r in ((head, neck_end, 7.0), (neck_end, stem_end, 6.5)):
        canvas.shape(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r,
                     lambda x, y, z, p0=p0, p1=p1, r=r: capsule(x, y, z, p0, p1, r), METAL_HU, L["metal_implant"])
    rng = np.random.default_rng(a["shape_seed"] + 2 + (sx > 0))
    # rays leave the ball above the neck, the stem below
    metal_streaks(canvas, head[:2], (neck_end[2], head[2] + rh + 5), rh, rng)
    metal_streaks(canvas, neck_end[:2], (stem_end[2] - 5, neck_end[2]), 7.0, rng)
