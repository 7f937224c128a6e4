"""segcore.phantom: anatomy in the right places, realistic values, any grid, deterministic."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from segcore import anatomy
from segcore.image import canonicalize, check_ct_like, check_volume, same_grid
from segcore.metrics import centroids
from segcore.phantom import ORIENTATIONS, make_phantom, write_phantoms

L = {s.name: s.value for s in anatomy.STRUCTURES}


def volume_cc(labels, value):
    return float((sitk.GetArrayViewFromImage(labels) == value).sum() * np.prod(labels.GetSpacing()) / 1000)


def test_same_seed_same_case_other_seed_other_case():
    a, b, c = make_phantom(5, matrix=64), make_phantom(5, matrix=64), make_phantom(6, matrix=64)
    assert np.array_equal(sitk.GetArrayViewFromImage(a.ct), sitk.GetArrayViewFromImage(b.ct))
    assert np.array_equal(sitk.GetArrayViewFromImage(a.labels), sitk.GetArrayViewFromImage(b.labels))
    assert a.info == b.info
    assert a.info["anatomy"]["prostate_cc"] != c.info["anatomy"]["prostate_cc"]


def test_target_organs_are_present_with_plausible_volumes(small_phantom):
    labels, info = small_phantom.labels, small_phantom.info["anatomy"]
    present = set(np.unique(sitk.GetArrayViewFromImage(labels)))
    for name in anatomy.TARGET_NAMES + ("hip_bone_left", "sacrum", "muscle", "fat", "skin"):
        assert L[name] in present, name
    # label volumes follow the drawn volumes (partial volume and bone give a little)
    assert volume_cc(labels, L["prostate"]) == pytest.approx(info["prostate_cc"], rel=0.25)
    assert volume_cc(labels, L["bladder"]) == pytest.approx(info["bladder_cc"], rel=0.25)
    assert 15 <= info["prostate_cc"] <= 150


def test_anatomical_relations_in_patient_space():
    """LPS: x to the patient's left, y posterior, z superior."""
    for seed in (1, 2, 3):
        case = make_phantom(seed, matrix=96)
        c = centroids(case.labels)
        prostate, bladder, rectum = c[L["prostate"]], c[L["bladder"]], c[L["rectum"]]
        assert bladder[2] > prostate[2] + 15  # bladder above the prostate
        assert rectum[1] > prostate[1] + 10  # rectum behind it
        assert c[L["femoral_head_left"]][0] > prostate[0] + 60 > c[L["femoral_head_right"]][0] + 120
        assert abs(c[L["femoral_head_left"]][2] - c[L["femoral_head_right"]][2]) < 1
        assert c[L["sacrum"]][1] > rectum[1]  # sacrum behind the rectum
        sv = c[L["seminal_vesicles"]]
        assert sv[2] > prostate[2] and sv[1] > prostate[1]  # above and behind the prostate


def test_hounsfield_units_per_tissue(small_phantom):
    ct, labels = sitk.GetArrayViewFromImage(small_phantom.ct), sitk.GetArrayViewFromImage(small_phantom.labels)
    hu = small_phantom.info["hu"]

    def inner_median(value):
        mask = ndimage.binary_erosion(labels == value, iterations=1)
        return float(np.median(ct[mask]))

    assert inner_median(L["fat"]) == pytest.approx(hu["fat"], abs=15)
    assert inner_median(L["muscle"]) == pytest.approx(hu["muscle"], abs=15)
    assert inner_median(L["prostate"]) == pytest.approx(hu["prostate"], abs=15)
    assert inner_median(L["femoral_head_left"]) > 80
    assert np.median(ct[labels == 0]) < -900  # air around the patient
    # the prostate is only a little brighter or darker than muscle, as on real CT
    assert abs(hu["prostate"] - hu["muscle"]) < 30
    check_ct_like(small_phantom.ct)


def test_noise_level_matches_the_drawn_sigma():
    case = make_phantom(21, matrix=256, spacing=(1.8, 1.8, 2.0), orientation="LPS", implant=False)
    ct, labels = sitk.GetArrayViewFromImage(case.ct), sitk.GetArrayViewFromImage(case.labels)
    muscle = ndimage.binary_erosion(labels == L["muscle"], iterations=3)
    assert float(ct[muscle].std()) == pytest.approx(case.info["scan"]["noise_hu"], rel=0.35)


def test_implant_adds_metal_and_streaks():
    with_metal = make_phantom(4, matrix=128, implant=True, orientation="LPS")
    without = make_phantom(4, matrix=128, implant=False, orientation="LPS")
    assert (sitk.GetArrayViewFromImage(with_metal.labels) == L["metal_implant"]).any()
    assert sitk.GetArrayViewFromImage(with_metal.ct).max() == 3071
    assert not (sitk.GetArrayViewFromImage(without.labels) == L["metal_implant"]).any()
    soft = sitk.GetArrayViewFromImage(without.labels) == L["muscle"]
    diff = np.abs(sitk.GetArrayViewFromImage(with_metal.ct).astype(float) - sitk.GetArrayViewFromImage(without.ct))
    assert np.percentile(diff[soft], 99.9) > 50  # streaks change soft tissue near the metal


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_every_orientation_is_the_same_patient(orientation):
    """Stored in any orientation (or obliquely), the same seed puts the same
    organs at the same physical places."""
    reference = centroids(make_phantom(8, matrix=96, orientation="LPS").labels)
    for oblique in (False, True):
        case = make_phantom(8, matrix=96, orientation=orientation, oblique=oblique)
        check_volume(case.ct)
        assert same_grid(case.ct, case.labels)
        c = centroids(case.labels)
        voxel = max(case.ct.GetSpacing())
        for name in ("prostate", "bladder", "rectum", "femoral_head_left"):
            assert np.linalg.norm(np.subtract(c[L[name]], reference[L[name]])) < voxel, (name, oblique)
    direction = np.asarray(case.ct.GetDirection()).reshape(3, 3)
    if orientation != "LPS":
        assert not np.allclose(direction, np.eye(3))
    canonical, _ = canonicalize(case.ct)
    assert np.all(np.diag(np.asarray(canonical.GetDirection()).reshape(3, 3)) > 0.8)


def test_full_size_case_is_scanner_like():
    case = make_phantom(2, matrix=512)
    size, spacing = case.ct.GetSize(), case.ct.GetSpacing()
    in_plane = sorted(size)[-2:]
    assert in_plane == [512, 512]
    assert 0.75 <= min(spacing) <= 1.1 and max(spacing) <= 3.0
    assert 50 <= min(size) <= 300


def test_write_phantoms_layout(tmp_path):
    written = write_phantoms(tmp_path, 2, seed=3, matrix=64)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["case000_ct.nii.gz", "case000_info.json", "case000_labels.nii.gz",
                     "case001_ct.nii.gz", "case001_info.json", "case001_labels.nii.gz", "labels.json"]
    assert len(written) == 4
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert anatomy.structures_from_labels_json(labels) == list(anatomy.STRUCTURES)
    assert json.loads((tmp_path / "case001_info.json").read_text())["seed"] == 4
    ct = sitk.ReadImage(str(tmp_path / "case001_ct.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(make_phantom(4, matrix=64).ct))
    from segcore.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        write_phantoms(tmp_path, 1, seed=3, matrix=64)


# --------------------------------------------------------------------------- phantom v2: anatomy, devices, scanners


def arrays(case):
    return sitk.GetArrayFromImage(case.ct).astype(np.float32), sitk.GetArrayFromImage(case.labels)


def test_forcing_an_option_changes_only_that():
    plain = make_phantom(31, matrix=96, orientation="LPS", options={"fiducials": False, "spacer": False})
    marked = make_phantom(31, matrix=96, orientation="LPS", options={"fiducials": True, "spacer": False})
    assert plain.info["anatomy"]["prostate_cc"] == marked.info["anatomy"]["prostate_cc"]
    assert marked.info["anatomy"]["fiducials"] and not plain.info["anatomy"]["fiducials"]
    assert np.array_equal(sitk.GetArrayViewFromImage(plain.labels), sitk.GetArrayViewFromImage(marked.labels))
    with pytest.raises(ValueError, match="unknown phantom option"):
        make_phantom(31, matrix=64, options={"fiducial": True})
    with pytest.raises(ValueError, match="kernel must be one of"):
        make_phantom(31, matrix=64, options={"kernel": "bone"})


def test_gold_fiducials_lie_in_the_prostate():
    case = make_phantom(32, matrix=256, spacing=(0.9, 0.9, 1.0), orientation="LPS",
                        options={"fiducials": True, "calcifications": False, "implant": "none"})
    ct, labels = arrays(case)
    gold = ct > 2500
    components, count = ndimage.label(gold)
    assert count >= 3
    inside = [labels[components == n] for n in range(1, count + 1)]
    assert sum(np.mean(v == L["prostate"]) > 0.5 for v in inside) >= 3


def test_catheter_and_spacer_sit_where_they_belong():
    def distance_prostate_to_rectum(case):
        c = centroids(case.labels)
        return c[L["rectum"]][1] - c[L["prostate"]][1]

    base = {"matrix": 160, "spacing": (1.2, 1.2, 1.5), "orientation": "LPS"}
    without = make_phantom(33, options={"spacer": False, "catheter": False}, **base)
    spaced = make_phantom(33, options={"spacer": True, "catheter": True}, **base)
    grown = distance_prostate_to_rectum(spaced) - distance_prostate_to_rectum(without)
    assert grown == pytest.approx(spaced.info["anatomy"]["spacer_mm"], abs=3)
    ct, labels = arrays(spaced)
    ct0, _ = arrays(without)
    # the catheter's dark lumen runs through the prostate: voxels there drop well below soft tissue
    prostate = labels == L["prostate"]
    assert (ct[prostate] < -100).sum() > (ct0[prostate] < -100).sum()


def test_prostheses_on_both_sides():
    case = make_phantom(34, matrix=128, orientation="LPS", options={"implant": "both"})
    _, labels = arrays(case)
    metal = np.argwhere(labels == L["metal_implant"])
    x = np.array([case.labels.TransformIndexToPhysicalPoint([int(i), int(j), int(k)])[0] for k, j, i in metal[::50]])
    prostate_x = centroids(case.labels)[L["prostate"]][0]
    assert (x > prostate_x + 50).any() and (x < prostate_x - 50).any()
    assert case.info["anatomy"]["implant_sides"] == ["left", "right"]


def test_femoral_heads_are_45_to_55_mm_across():
    for seed in (35, 36, 37):
        case = make_phantom(seed, matrix=256, spacing=(1.0, 1.0, 1.0), orientation="LPS", implant=False)
        volume = volume_cc(case.labels, L["femoral_head_left"]) * 1000
        diameter = (6 * volume / np.pi) ** (1 / 3)
        assert 43 <= diameter <= 56, diameter


def test_femoral_heads_have_no_bright_cortical_rim():
    """Real femoral heads show in CT as a trabecular ball inside the dark joint line, without a cortex line
    (their subchondral plate is about a millimetre); with a 0.8 mm cortical shell the phantom's head rim was
    260-620 HU brighter than its core."""
    for seed in (35, 36):
        case = make_phantom(seed, matrix=256, spacing=(1.0, 1.0, 1.0), orientation="LPS", implant=False)
        ct, labels = arrays(case)
        for side in ("left", "right"):
            head = labels == L[f"femoral_head_{side}"]
            rim = head & ~ndimage.binary_erosion(head)
            core = ndimage.binary_erosion(head, iterations=5)
            assert abs(ct[rim].mean() - ct[core].mean()) < 80, (seed, side)


def test_hip_joint_space_and_the_ilium_above_the_acetabulum():
    """The hip bone keeps out of the head's joint space, and above the acetabular roof the ilium is its body
    alone, in front of the greater sciatic notch; higher up the wing reaches back to the sacroiliac joint.
    The phantom's round iliac body used to reach into the socket, and its wing ran 80 mm behind the joint at
    every height."""
    case = make_phantom(35, matrix=256, spacing=(1.0, 1.0, 1.0), orientation="LPS", implant=False)
    labels = sitk.GetArrayFromImage(case.labels)
    radius = case.info["anatomy"]["femoral_head_radius"]
    for side in ("left", "right"):
        head = np.asarray(centroids(case.labels)[L[f"femoral_head_{side}"]])
        hip = np.argwhere(labels == L[f"hip_bone_{side}"])[:, ::-1]   # i, j, k
        direction = np.reshape(case.labels.GetDirection(), (3, 3))
        points = np.asarray(case.labels.GetOrigin()) + (hip * case.labels.GetSpacing()) @ direction.T
        assert np.linalg.norm(points - head, axis=1).min() >= radius + 2.0, side
        # how far behind the head's centre the hip bone reaches 40 and 60 mm above it
        behind = [points[np.abs(points[:, 2] - head[2] - height) < 0.5, 1].max() - head[1] for height in (40, 60)]
        assert behind[0] < 35 and behind[1] > 50, (side, behind)


def test_thighs_part_below_the_perineum_and_muscles_have_fat_planes():
    case = make_phantom(38, matrix=256, spacing=(1.6, 1.6, 2.0), orientation="LPS", implant=False)
    _ct, labels = arrays(case)
    prostate = centroids(case.labels)[L["prostate"]]
    body = labels > 0
    body[labels == L["couch"]] = False

    def row(z_mm):
        k = case.ct.TransformPhysicalPointToIndex((prostate[0], prostate[1], prostate[2] + z_mm))[2]
        i = case.ct.TransformPhysicalPointToIndex((prostate[0], prostate[1], prostate[2]))[0]
        return k, i

    k_low, i_mid = row(case.info["anatomy"]["crotch_z"] - 35)
    k_high, _ = row(0)
    middle = slice(i_mid - 3, i_mid + 4)
    # at the prostate the body is whole across the midline; 35 mm below the crotch the thighs are apart
    assert body[k_high][:, middle].any(axis=1).sum() > 100
    assert not body[k_low][:, middle].any() and body[k_low].sum() > 0.3 * body[k_high].sum()
    # separate muscles: the muscle label splits into many compartments with fat between them
    _, compartments = ndimage.label(labels[k_high] == L["muscle"])
    assert compartments >= 3


def test_scanner_kernel_kvp_and_field_of_view():
    base = {"matrix": 128, "spacing": (1.5, 1.5, 2.0), "orientation": "LPS", "implant": False}
    soft = make_phantom(39, options={"kernel": "soft"}, **base)
    sharp = make_phantom(39, options={"kernel": "sharp"}, **base)

    def roughness(case):
        ct, labels = arrays(case)
        fat = ndimage.binary_erosion(labels == L["fat"], iterations=2)
        return float(np.abs(np.diff(ct, axis=2))[fat[:, :, 1:]].mean())

    assert roughness(sharp) > 1.5 * roughness(soft)
    low, high = (make_phantom(39, options={"kvp": v}, **base) for v in (100, 140))
    assert low.info["hu"]["cortical"] > high.info["hu"]["cortical"] * 1.1
    assert low.info["hu"]["fat"] < high.info["hu"]["fat"]
    cut = make_phantom(39, matrix=256, orientation="LPS", options={"truncated_fov": True})
    whole = make_phantom(39, matrix=256, orientation="LPS", options={"truncated_fov": False})
    assert cut.ct.GetSpacing()[0] < whole.ct.GetSpacing()[0]   # a smaller field on the same matrix
    _, labels = arrays(cut)
    skin_cut = (labels == L["skin"]).sum()
    assert skin_cut < 0.9 * (sitk.GetArrayViewFromImage(whole.labels) == L["skin"]).sum()


def test_drawn_scans_cover_1_to_5_mm_slices():
    from segcore.phantom import patient, scanner

    slices = set()
    for seed in range(300):
        a = patient.draw_patient(np.random.default_rng([seed, 0]))
        scan = scanner.draw_scan(np.random.default_rng([seed, 1]), 512, None, "LPS", False, a, {})
        slices.add(scan.spacing[2])
    assert min(slices) == 1.0 and max(slices) == 5.0 and len(slices) >= 6


def test_training_caches_are_keyed_on_the_phantom_source(monkeypatch):
    """A changed phantom must be made again, not read back from a training cache made by the old one."""
    import segcore.phantom
    from training import data

    source = data.CaseSource("phantom00001", phantom_seed=1)
    before = source.describe()
    monkeypatch.setattr(segcore.phantom, "source_digest", lambda: "changed")
    assert len(before["phantom_source"]) == 12
    assert source.describe() != before and source.describe()["phantom_source"] == "changed"
    assert data.CaseSource("ct", ct_path="a.nii.gz", labels_path="b.nii.gz").describe().get("phantom_source") is None


@pytest.mark.parametrize("kind", [{"orientation": "LPS"}, {"orientation": "coronal"}, {"oblique": True}])
def test_painting_slab_by_slab_gives_the_same_case_as_in_one_piece(monkeypatch, kind):
    """The canvas works on whole-volume arrays in slabs, in threads (for speed): the case must not depend on
    how it is cut. One-row slabs against one slab for the whole volume, every tissue, device and scanner
    effect included (a hip prosthesis, markers, a catheter, a vacuum bag, a truncated field of view)."""
    from segcore.phantom import shapes

    options = {"fiducials": True, "catheter": True, "immobilisation": "vacuum_bag", "truncated_fov": True,
               "kernel": "sharp", "knee_support": True}
    cases = []
    for voxels in (10**9, 1):
        monkeypatch.setattr(shapes, "SLAB_VOXELS", voxels)
        case = make_phantom(7, matrix=64, implant="left", options=options, **kind)
        cases.append((sitk.GetArrayFromImage(case.ct), sitk.GetArrayFromImage(case.labels)))
    (ct_whole, labels_whole), (ct_slabs, labels_slabs) = cases
    assert np.array_equal(ct_whole, ct_slabs)
    assert np.array_equal(labels_whole, labels_slabs)
    assert (labels_whole == L["prostate"]).any() and (labels_whole == L["metal_implant"]).any()


def _reach_forward(points, centre, low, high):
    """How far (mm) the points at heights low..high above ``centre`` reach in front of it, and the point."""
    at = points[(points[:, 2] >= centre[2] + low) & (points[:, 2] <= centre[2] + high)]
    return centre[1] - at[:, 1].min(), at[np.argmin(at[:, 1])]


def test_iliac_wing_reaches_forward_to_the_anterior_superior_spine():
    """Bell, Pedersen and Brand (1990): the hip joint centre lies 30 % of the inter-ASIS width below the
    ASIS and 19 % behind it; with 230-260 mm between the spines the ASIS is 45-50 mm in front of the
    joint centre and about 70 mm above it. The phantom's hip bone reaches that far forward there, and not
    below it (the notch above the acetabulum)."""
    for seed in (40, 41):
        case = make_phantom(seed, matrix=192, spacing=(2.0, 2.0, 2.0), orientation="LPS", implant=False)
        _ct, labels = arrays(case)
        heads = [centroids(case.labels)[L[f"femoral_head_{side}"]] for side in ("left", "right")]
        centre = np.mean(heads, axis=0)
        k, j, i = np.nonzero(np.isin(labels, [L["hip_bone_left"], L["hip_bone_right"]]))
        points = np.array([case.labels.TransformIndexToPhysicalPoint((int(a), int(b), int(c)))
                           for a, b, c in zip(i, j, k)])

        forward, spine = _reach_forward(points, centre, 60, 85)
        assert 38 <= forward <= 62, forward
        assert 100 <= abs(spine[0] - centre[0]) <= 140, spine   # inter-ASIS width 200-280 mm
        # the front edge runs back down to the acetabulum
        assert _reach_forward(points, centre, 15, 30)[0] < forward - 5


def test_a_filling_bladder_rises_forward_against_the_abdominal_wall_with_its_base_kept(monkeypatch):
    from segcore.phantom import organs

    def bladder_fronts(case):
        """The bladder's most anterior y (mm) over its top half and over its lowest 2 mm, and the narrowest
        gap (mm) between its foremost point and the abdominal wall's muscle in front of it."""
        _ct, labels = arrays(case)
        k, j, i = np.nonzero(labels == L["bladder"])
        z = np.array([case.labels.TransformIndexToPhysicalPoint((0, 0, int(v)))[2] for v in range(labels.shape[0])])
        y = np.array([case.labels.TransformIndexToPhysicalPoint((0, int(v), 0))[1] for v in range(labels.shape[1])])
        zb = z[k]
        top, base = zb >= (zb.min() + zb.max()) / 2, zb <= zb.min() + 2
        foremost = np.argmin(y[j[top]])
        k_front, i_front = k[top][foremost], i[top][foremost]
        gaps = []
        for column in labels[k_front, :, i_front - 5:i_front + 6].T:   # rows run posterior: y grows with j
            front = np.flatnonzero(column == L["bladder"])
            muscle = np.flatnonzero(column[:front.min()] == L["muscle"]) if front.size else []
            if len(muscle):
                gaps.append((front.min() - muscle.max() - 1) * case.labels.GetSpacing()[1])
        return y[j[top]].min(), y[j[base]].min(), min(gaps)

    make = lambda: make_phantom(40, matrix=192, spacing=(2.0, 2.0, 2.0), orientation="LPS", implant=False)
    risen = make()
    rise = risen.info["anatomy"]["bladder_rise_mm"]
    assert rise > 10
    monkeypatch.setattr(organs, "_forward_rise", lambda *args: 0.0)
    upright = make()
    top, base, gap = bladder_fronts(risen)
    top0, base0, gap0 = bladder_fronts(upright)
    assert top0 - top == pytest.approx(rise, abs=4)   # the upper part moved forward by the rise
    assert gap0 - gap == pytest.approx(rise, abs=4)   # towards the abdominal wall
    assert gap >= 1                                   # and not into it: some prevesical fat stays
    assert abs(base - base0) <= 0.25 * rise           # the base stays (nearly) where it was, on the prostate


def test_the_couch_lies_level_whatever_the_patients_roll():
    """yaw_deg rolls the patient, not the table: the couch's top (with its mattress, if any) is one row
    across the image and meets the body's lowest point. (Its underside is cut by the scanner's round field
    of view at the image's corners.)"""
    from segcore.phantom import patient

    seed = next(s for s in range(200) if abs(patient.draw_patient(np.random.default_rng([s, 0]))["yaw_deg"]) > 4)
    case = make_phantom(seed, matrix=128, orientation="LPS",
                        options={"couch": "flat", "immobilisation": "none", "knee_support": False})
    assert abs(case.info["anatomy"]["yaw_deg"]) > 4
    labels = sitk.GetArrayFromImage(case.labels)   # (k, j, i); LPS: j runs front to back
    couch = labels == anatomy.structure("couch").value
    body = (labels != 0) & ~couch
    k = labels.shape[0] // 2
    columns = np.flatnonzero(couch[k].any(axis=0) & body[k].any(axis=0))
    assert len(columns) > 40
    tops = [np.flatnonzero(couch[k][:, i]).min() for i in columns]
    assert max(tops) - min(tops) <= 1, tops   # rolled with the patient it would climb 7 rows across
    lowest = max(np.flatnonzero(body[k][:, i]).max() for i in columns)
    assert 0 <= min(tops) - lowest <= 2, (tops, lowest)


def test_the_pubic_symphysis_lies_below_the_femoral_heads_by_the_drawn_hip_lift():
    """The top of the symphysis (the highest slice where the two hip bones come within 10 mm of each other)
    lies about `hip_lift_mm` below the femoral heads' centre, as in real pelves (about 19 mm, Seidel 1995);
    the unlifted phantom had it level with them."""
    for seed in (40, 41):
        case = make_phantom(seed, matrix=128, spacing=(2.0, 2.0, 2.0), orientation="LPS", implant=False)
        lift = case.info["anatomy"]["hip_lift_mm"]
        assert 9 <= lift <= 29
        points = centroids(case.labels)
        heads_z = (points[L["femoral_head_left"]][2] + points[L["femoral_head_right"]][2]) / 2
        _ct, labels = arrays(case)
        x = case.ct.GetOrigin()[0] + case.ct.GetSpacing()[0] * np.arange(labels.shape[2])
        tops = [k for k in range(labels.shape[0])
                if (labels[k] == L["hip_bone_left"]).any() and (labels[k] == L["hip_bone_right"]).any()
                and x[(labels[k] == L["hip_bone_left"]).any(0)].min()
                - x[(labels[k] == L["hip_bone_right"]).any(0)].max() < 10]
        top_z = case.ct.TransformIndexToPhysicalPoint((0, 0, max(tops)))[2]
        assert lift - 8 <= heads_z - top_z <= lift + 6, (seed, lift, heads_z - top_z)
