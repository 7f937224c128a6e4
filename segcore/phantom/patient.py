"""One drawn patient: every size, position, tissue value and device of a phantom case.

Values are drawn from the case's seed at the rates given here; `OPTIONS` lists what a caller may force
instead (`make_phantom(..., options={...})`). Every value is drawn whether or not it is forced, in a fixed
order, so forcing one option leaves the rest of the patient as it was.
"""

from __future__ import annotations

import numpy as np

# What a caller may force, with the values allowed. The defaults are drawn at the rates in `draw_patient`.
OPTIONS = {
    "implant": ("none", "left", "right", "both"),
    "fiducials": (False, True),
    "catheter": (False, True),
    "spacer": (False, True),
    "bladder_contrast": (False, True),
    "enlarged_prostate": (False, True),
    "calcifications": (False, True),
    "immobilisation": ("none", "vacuum_bag", "thermoplastic"),
    "knee_support": (False, True),
    "couch": ("flat", "curved"),
}


def _choice(rng, values, p):
    return values[int(rng.choice(len(values), p=p))]


def draw_patient(rng: np.random.Generator, options: dict | None = None) -> dict:
    """Draw one patient in the patient frame (mm, centred on the prostate, LPS). `options` forces values of
    `OPTIONS`."""
    a = _draw_body(rng)
    a.update(_draw_organs(rng))
    a.update(_draw_devices(rng))
    a["hu"] = _draw_tissue_hu(rng)
    a["shape_seed"] = int(rng.integers(0, 2**31 - 1))
    # drawn after the rest so that every patient drawn before it was added stays as it was: how far a
    # filling bladder rises forward towards the abdominal wall (`organs._forward_rise`)
    a["bladder_rise"] = rng.uniform(0.6, 1.0)
    a["hip_lift_mm"] = _draw_hip_lift(rng)
    for name, value in (options or {}).items():
        if name not in OPTIONS:
            raise ValueError(f"unknown patient option {name!r}; known: {sorted(OPTIONS)}")
        a[name] = value
    resolve(a)
    return a


def _draw_hip_lift(rng) -> float:
    """How far the hip joints sit above the pelvic floor's frame, mm. Seidel et al. (J Biomech 1995) put the
    hip joint centre 79 % of the ASIS-to-symphysis height below the ASIS; with the ASIS 73 mm above the
    joint (`bones.iliac_wing`) the top of the pubic symphysis lies about 19 mm below the joint centres,
    where the unlifted phantom put it level with them (the real pelvic CT: 9 mm below). Drawn last, so every
    other value of a patient stays as it was."""
    return float(rng.uniform(9, 29))


def _draw_body(rng) -> dict:
    u = rng.uniform
    return {
        "body_scale": u(0.85, 1.18),
        "pelvis_scale": u(0.92, 1.08),
        # subcutaneous fat, mm: lean to obese planning patients
        "fat_lateral": u(12, 45), "fat_anterior": u(12, 40), "fat_posterior": u(8, 25),
        # fat between neighbouring muscles: thin in lean patients, wider with more fat
        "fat_plane_mm": u(1.5, 4.0),
        "yaw_deg": u(-5, 5),
        "cavity_scale": u(0.85, 1.1),
        # where the thighs part below the perineum, mm below the prostate's centre (the apex is 15-25 mm
        # below it and the perineal skin 40-60 mm below the apex)
        "crotch_z": u(-80, -58),
        # femoral head diameter 45-55 mm in men (adult male means about 48-50 mm in anatomical series)
        "femoral_head_radius": u(22.5, 27.5),
        "muscle_offsets": [float(v) for v in u(-5, 5, 16)],
    }


def _draw_organs(rng) -> dict:
    u = rng.uniform
    # Bladder filling: planning protocols ask for a comfortably full bladder, but patients range from
    # nearly empty to over-full (about 40-750 cc); 15 % each below 120 cc and above 450 cc.
    filling = rng.random()
    return {
        "prostate_normal_cc": u(18, 60),
        "prostate_enlarged_cc": u(60, 150),   # benign hyperplasia: glands up to 150 cc
        "enlarged_prostate": bool(rng.random() < 0.15),
        "median_lobe": u(0.0, 0.35),
        "prostate_y": u(-4, 4),
        "prostate_shift_x": u(-3, 3),
        "bladder_cc": float(np.interp(filling, [0, 0.15, 0.85, 1], [40, 120, 450, 750])),
        "bladder_wall_mm": u(2.5, 5),
        "bladder_tilt": u(-0.15, 0.15),
        "rectum_radius": u(10, 21),
        "rectal_gas": u(0.0, 0.7),
        "bowel_loops": int(rng.integers(2, 7)),
        # small bowel and sigmoid loops above the bladder, forward to the abdominal wall
        "bowel": [{"a": [u(-60, 60), u(-55, 40), u(60, 130)], "b": [u(-60, 60), u(-55, 40), u(60, 130)],
                   "r": u(9, 17), "gas": bool(rng.random() < 0.4)} for _ in range(6)],
        # calcifications are common in older men's prostates: 1-4 bright foci of 1-4 mm
        "calcifications": bool(rng.random() < 0.4),
        "calcification_points": [[u(-0.6, 0.6), u(-0.6, 0.6), u(-0.6, 0.6), u(0.5, 2.0), u(250, 1200)]
                                 for _ in range(int(rng.integers(1, 5)))],
    }


def _draw_devices(rng) -> dict:
    u = rng.uniform
    return {
        # Implanted gold markers for image guidance, three per gland (about 1 x 3 mm): common, not universal.
        "fiducials": bool(rng.random() < 0.3),
        "fiducial_points": [[u(-0.45, 0.45), u(-0.4, 0.4), u(-0.5, 0.5), u(0, np.pi), u(0, np.pi)]
                            for _ in range(3)],
        "catheter": bool(rng.random() < 0.05),      # a Foley catheter, 16-18 Fr, balloon in the bladder
        "catheter_balloon_hu": u(0, 60),
        # Hydrogel rectal spacer, 8-14 mm between prostate and rectum, water-like on CT
        "spacer": bool(rng.random() < 0.15),
        "spacer_mm": u(8, 14),
        "spacer_hu": u(0, 25),
        "bladder_contrast": bool(rng.random() < 0.1),
        "contrast_level": u(0.1, 0.7),
        # Hip prostheses: about one planning patient in ten, now and then both sides.
        "implant": _choice(rng, ("none", "left", "right", "both"), [0.85, 0.065, 0.065, 0.02]),
        "immobilisation": _choice(rng, ("none", "vacuum_bag", "thermoplastic"), [0.5, 0.3, 0.2]),
        "knee_support": bool(rng.random() < 0.6),   # seen only in scans that reach the thighs
        "knee_support_z": u(-200, -150),
        "couch": _choice(rng, ("flat", "curved"), [0.8, 0.2]),  # radiotherapy flat top or diagnostic
        "mattress_mm": u(4, 10) if rng.random() < 0.3 else 0.0,
    }


def _draw_tissue_hu(rng) -> dict:
    """Tissue HU at 120 kVp, drawn around published values (fat -100, muscle 40-60 and lower in older men
    whose muscle holds more fat, prostate 40, urine 10, cortical bone over 1000, trabecular bone 80-240);
    the prostate stays within about 15 HU of muscle, as on real CT. The scanner's kVp shifts them
    (`scanner.hu_at_kvp`)."""
    u = rng.uniform
    return {
        "fat": u(-110, -80),
        "muscle": u(30, 58),
        "skin": u(20, 45),
        "prostate": u(32, 45),
        "seminal_vesicles": u(25, 40),
        "urine": u(0, 18),
        "bladder_wall": u(30, 45),
        "rectal_wall": u(35, 50),
        "faeces": u(-80, 30),
        "cortical": u(900, 1500),
        # trabecular bone of older men's pelvis and proximal femur: 80-240 HU, grainy
        "cancellous": u(80, 240),
        "trabecular_sd": u(50, 110),
        "head_extra": u(80, 200),   # the femoral head's trabeculae are denser than the pelvis's
        "marrow": u(-20, 80),
        "bowel_content": u(5, 40),
        "contrast": u(200, 600),
    }


def resolve(a: dict) -> None:
    """Derived values after any forcing: prostate volume, which side has a prosthesis."""
    for name, allowed in OPTIONS.items():
        if a[name] not in allowed:
            raise ValueError(f"phantom option {name} must be one of {list(allowed)}, not {a[name]!r}")
    a["prostate_cc"] = a["prostate_enlarged_cc"] if a["enlarged_prostate"] else a["prostate_normal_cc"]
    a["implant_sides"] = {"none": [], "left": ["left"], "right": ["right"], "both": ["left", "right"]}[a["implant"]]
    a["bowel"] = a["bowel"][: a["bowel_loops"]]
