"""Draw a phantom next to the real pelvic CT: same window, same anatomical levels.

    python docs/make_phantom_vs_real.py [--seed 3] [--out docs/phantom_vs_real.png]

Rows: the real CT (../shared/data/real/pelvis_ct) and a phantom. Columns: an
axial slice through the femoral heads, an axial slice 40 mm higher (bladder),
and a coronal slice through the femoral heads. Levels are found from each
image's own labels (femur / femoral head), so the comparison is anatomical, not
by slice number. Printed below: HU statistics per tissue in both images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from segcore import anatomy, image, metrics, phantom

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "data" / "real" / "pelvis_ct"
WINDOW = (40 - 200, 40 + 200)  # soft-tissue window W400 L40
# Real (TotalSegmentator v1) labels compared with phantom labels.
REAL_LABELS = {"bladder": [104], "femur_right": [89], "femur_left": [88], "hip bones": [90, 91], "sacrum": [92],
               "gluteal muscle": [94, 95, 96, 97]}
PHANTOM_LABELS = {"bladder": [2], "femur_right": [5, 11], "femur_left": [4, 10], "hip bones": [7, 8], "sacrum": [9],
                  "gluteal muscle": [12]}


def to_lps_axial(ct, labels):
    """Canonical orientation (i=L, j=P, k=S) so slices are comparable."""
    ct, _ = image.canonicalize(ct)
    labels, _ = image.canonicalize(labels)
    return ct, labels


def femoral_head_centre(labels, values):
    """Physical point of the centre of the femoral head: the centre of the
    largest inscribed ball in the top 50 mm of the femur label."""
    mask = np.isin(sitk.GetArrayViewFromImage(labels), values)
    k_top = np.nonzero(mask.any(axis=(1, 2)))[0].max()
    dz = labels.GetSpacing()[2]
    cut = mask.copy()
    cut[: max(0, k_top - int(50 / dz))] = False
    distance = ndimage.distance_transform_edt(cut, sampling=labels.GetSpacing()[::-1])
    k, j, i = np.unravel_index(np.argmax(distance), distance.shape)
    return np.asarray(labels.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))


def heads_centre(labels, groups):
    """The femoral heads' level and depth from the right femur, on the midline between both heads: the real
    patient's left hip is a prosthesis, and round a prosthesis the inscribed ball leaves the head (in a
    phantom with one it fell 18 mm lower, in the greater trochanter)."""
    right = femoral_head_centre(labels, groups["femur_right"])
    left = femoral_head_centre(labels, groups["femur_left"])
    return np.array([(right[0] + left[0]) / 2, right[1], right[2]])


def femoral_head_dome(labels, values, top_mm=15.0):
    """Centre (z, y, x mm from the array's first voxel) and radius of the sphere fitted (least squares) to the
    femur's outer surface in its top `top_mm`: the head's dome. The cut face at the bottom of that part is
    left out of the fit."""
    mask = np.isin(sitk.GetArrayViewFromImage(labels), values)
    sz, sy, sx = labels.GetSpacing()[::-1]
    slices = np.nonzero(mask.any(axis=(1, 2)))[0]
    first = max(slices.min(), slices.max() - round(top_mm / sz) + 1)   # a scan may end inside the head
    dome = mask.copy()
    dome[:first] = False
    surface = dome & ~ndimage.binary_erosion(dome)
    surface[first] = False
    return metrics.fit_sphere(np.argwhere(surface) * [sz, sy, sx])


def femoral_head_rim_contrast(ct, labels, values, dome, rim_mm=3.0):
    """Mean HU of the femoral head's outer `rim_mm` (its articular surface) minus that of its core more than
    twice as deep: a bright rim is a cortical shell. The head is the femur inside `dome` (centre, radius)
    from `femoral_head_dome`."""
    centre, radius = dome
    mask = np.isin(sitk.GetArrayViewFromImage(labels), values)
    zz, yy, xx = np.indices(mask.shape, sparse=True)
    sz, sy, sx = labels.GetSpacing()[::-1]
    depth = radius - np.sqrt((zz * sz - centre[0]) ** 2 + (yy * sy - centre[1]) ** 2 + (xx * sx - centre[2]) ** 2)
    values_hu = sitk.GetArrayViewFromImage(ct)
    rim = mask & (depth >= 0) & (depth < rim_mm)
    core = mask & (depth >= 2 * rim_mm)
    return float(values_hu[rim].mean() - values_hu[core].mean())


def realism(ct, labels, groups, centre):
    """The figures of the realism table, measured the same way on both images: on the axial slice through
    the femoral heads' centre, tissue by HU range inside the body (fat -200..-30, soft tissue 0..100, bone
    above 200) and muscle by label; mean and sd are over each region eroded by one voxel, so the sd is
    mostly noise and texture."""
    k = ct.TransformPhysicalPointToIndex(tuple(float(v) for v in centre))[2]
    values = sitk.GetArrayViewFromImage(ct)[k].astype(float)
    body = ndimage.binary_fill_holes(values > -400)
    parts, count = ndimage.label(body)
    body = parts == (1 + int(np.argmax(ndimage.sum(body, parts, range(1, count + 1)))))  # not the couch
    area = float(body.sum())
    fat = body & (values > -200) & (values < -30)
    soft = body & (values >= 0) & (values <= 100)
    bone = body & (values > 200)
    muscle = np.isin(sitk.GetArrayViewFromImage(labels)[k], groups["gluteal muscle"]) & soft
    columns = np.nonzero(body.any(axis=0))[0]
    dome = femoral_head_dome(labels, groups["femur_right"])   # the right: the real patient's left hip is a prosthesis
    out = {"body width (mm)": (columns.max() - columns.min() + 1) * ct.GetSpacing()[0],
           "right femoral head diameter (mm)": 2 * dome[1],
           "right femoral head rim minus core (HU)": femoral_head_rim_contrast(ct, labels, groups["femur_right"], dome),
           "bone fraction of body area": bone.sum() / area, "soft-tissue (0-100 HU) fraction": soft.sum() / area,
           "fat fraction": fat.sum() / area}
    for name, region in (("fat", fat), ("gluteal muscle", muscle)):
        inner = ndimage.binary_erosion(region, iterations=1)
        out[f"{name} HU mean"] = float(values[inner].mean())
        out[f"{name} HU sd"] = float(values[inner].std())
    out["hip bone front, 60-85 mm above the heads (mm in front of them)"] = reach_in_front(
        labels, groups["hip bones"], centre, (60, 85))
    out["bladder front (mm in front of the heads)"] = reach_in_front(labels, groups["bladder"], centre, (-100, 200))
    out["right ilium front to back, 40 mm above the heads (mm)"] = front_to_back(
        labels, groups["hip bones"][1:], centre[2] + 40)
    # Where the pelvic floor's organs sit against the hips: Seidel et al. (J Biomech 1995) put the hip joint
    # centre at 79 % of the ASIS-to-symphysis height below the ASIS, so the symphysis about 20 mm below it.
    out["pubic symphysis top (mm above the heads)"] = symphysis_top(labels, groups["hip bones"]) - centre[2]
    bladder = np.nonzero(np.isin(sitk.GetArrayViewFromImage(labels), groups["bladder"]).any(axis=(1, 2)))[0]
    out["bladder's lowest point (mm above the heads)"] = (
        labels.GetOrigin()[2] + labels.GetSpacing()[2] * bladder.min() - centre[2] if bladder.size else float("nan"))
    return out


def symphysis_top(labels, hip_bones, joint_mm=10.0):
    """Height (mm, scanner z) of the pubic symphysis's top: the highest slice on which the two hip bones
    (``hip_bones``: left, right) come within ``joint_mm`` of each other along a row; the labels axis-aligned
    LPS (`to_lps_axial`)."""
    array = sitk.GetArrayViewFromImage(labels)
    columns = np.arange(array.shape[2])
    reach = joint_mm / labels.GetSpacing()[0]
    # per (slice, row): each bone's column nearest the midline (LPS x, and the column, grow to the left)
    left = np.where(array == hip_bones[0], columns, array.shape[2] * 2).min(axis=2)
    right = np.where(array == hip_bones[1], columns, -array.shape[2]).max(axis=2)
    slices = np.nonzero(((left - right) <= reach).any(axis=1))[0]
    return labels.GetOrigin()[2] + labels.GetSpacing()[2] * slices.max() if slices.size else float("nan")


def reach_in_front(labels, values, centre, heights):
    """How far (mm) the labels ``values`` reach in front of ``centre`` on the slices ``heights`` (mm) above it;
    the labels axis-aligned LPS (`to_lps_axial`), so y grows backwards with the row."""
    mask = np.isin(sitk.GetArrayViewFromImage(labels), values)
    origin, spacing = np.asarray(labels.GetOrigin()), np.asarray(labels.GetSpacing())
    z = origin[2] + spacing[2] * np.arange(mask.shape[0])
    mask = mask & ((z >= centre[2] + heights[0]) & (z <= centre[2] + heights[1]))[:, None, None]
    rows = np.nonzero(mask.any(axis=(0, 2)))[0]
    return float(centre[1] - (origin[1] + spacing[1] * rows.min())) if rows.size else float("nan")


def front_to_back(labels, values, height):
    """Front-to-back extent (mm) of the labels ``values`` on the slice nearest ``height`` (mm, scanner z). Just
    above the acetabulum the ilium is its body alone, in front of the greater sciatic notch; a wing without
    the notch reaches back to the sacrum there. The labels axis-aligned LPS (`to_lps_axial`)."""
    k = round(float(height - labels.GetOrigin()[2]) / labels.GetSpacing()[2])
    rows = np.nonzero(np.isin(sitk.GetArrayViewFromImage(labels)[k], values).any(axis=1))[0]
    return float((rows.max() - rows.min() + 1) * labels.GetSpacing()[1]) if rows.size else float("nan")


def tissue_stats(ct, labels, groups):
    values, masks = sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(labels)
    stats = {}
    for name, group in groups.items():
        inner = ndimage.binary_erosion(np.isin(masks, group), iterations=1)
        if inner.any():
            v = values[inner]
            stats[name] = (float(np.median(v)), float(np.percentile(v, 75) - np.percentile(v, 25)),
                           float(inner.sum() * np.prod(ct.GetSpacing()) / 1000))
    fat = (values > -200) & (values < -30)
    stats["fat (-200..-30 HU)"] = (float(np.median(values[fat])), float(np.subtract(*np.percentile(values[fat], [75, 25]))), 0)
    return stats


def slice_at(ct, point, axis):
    index = ct.TransformPhysicalPointToIndex(tuple(float(v) for v in point))
    array = sitk.GetArrayViewFromImage(ct)
    sp, org, size = ct.GetSpacing(), ct.GetOrigin(), ct.GetSize()
    if axis == "axial":
        img = array[index[2]]
        extent = (org[0] - sp[0] / 2, org[0] + sp[0] * (size[0] - 0.5), org[1] + sp[1] * (size[1] - 0.5), org[1] - sp[1] / 2)
    else:  # coronal: rows are slices (S up)
        img = array[::-1, index[1], :]
        extent = (org[0] - sp[0] / 2, org[0] + sp[0] * (size[0] - 0.5), org[2] - sp[2] / 2, org[2] + sp[2] * (size[2] - 0.5))
    return img, extent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs" / "phantom_vs_real.png"))
    parser.add_argument("--more-seeds", type=int, nargs="*", default=[], metavar="SEED",
                        help="more phantoms for the realism table (columns)")
    args = parser.parse_args(argv)

    real_ct = image.read_image(REAL / "example_ct.nii.gz")
    real_labels = image.read_image(REAL / "example_seg_v1.nii.gz", kind="labels")
    case = phantom.make_phantom(args.seed, matrix=512, orientation="LPS", implant=True)
    rows = []
    for title, ct, labels, groups in (("real CT (3 mm)", real_ct, real_labels, REAL_LABELS),
                                      (f"phantom seed {args.seed}", case.ct, case.labels, PHANTOM_LABELS)):
        ct, labels = to_lps_axial(ct, labels)
        if ct.GetSpacing() != real_ct.GetSpacing():
            # Show the phantom as the real scan was stored (3 mm voxels), so that
            # noise texture and partial volume are compared like for like.
            ct = image.resample_to_spacing(ct, real_ct.GetSpacing(), "linear")
            labels = image.resample_like(labels, ct, "label")
            title += " at 3 mm"
        centre = heads_centre(labels, groups)
        rows.append((title, ct, labels, centre, tissue_stats(ct, labels, groups)))

    fig, axes = plt.subplots(2, 3, figsize=(15, 10), facecolor="black")
    for r, (title, ct, _, centre, _) in enumerate(rows):
        views = [("axial, femoral heads", centre, "axial"),
                 ("axial, 40 mm higher", centre + [0, 0, 40], "axial"),
                 ("coronal, femoral heads", centre, "coronal")]
        for c, (name, point, axis) in enumerate(views):
            img, extent = slice_at(ct, point, axis)
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], extent=extent, interpolation="nearest")
            # Same physical field around the femoral heads in both rows.
            ax.set_xlim(centre[0] - 200, centre[0] + 200)
            if axis == "axial":
                ax.set_ylim(centre[1] + 150, centre[1] - 170)
            else:
                ax.set_ylim(centre[2] - 110, centre[2] + 190)
            ax.set_title(f"{title}: {name}", color="white", fontsize=10)
            ax.axis("off")
    fig.suptitle("Phantom vs real CT, window W400/L40, same anatomical levels (image left = patient right)",
                 color="white")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80, facecolor="black")
    print(f"wrote {args.out}")
    print(f"{'tissue':22s} {'real median/IQR HU':>20s} {'phantom median/IQR HU':>22s}")
    for name in rows[0][4]:
        real = rows[0][4].get(name)
        synth = rows[1][4].get(name)
        fmt = lambda v: f"{v[0]:7.0f} / {v[1]:5.0f}" if v else "      -"
        print(f"{name:22s} {fmt(real):>20s} {fmt(synth):>22s}")
    print("\nrealism at the femoral heads' level (same method on both):")
    table = [realism(ct, labels, g, centre) for (_, ct, labels, centre, _), g in zip(rows, (REAL_LABELS, PHANTOM_LABELS))]
    for extra in args.more_seeds:
        made = phantom.make_phantom(extra, matrix=512, orientation="LPS")
        ct, labels = to_lps_axial(made.ct, made.labels)
        ct = image.resample_to_spacing(ct, real_ct.GetSpacing(), "linear")
        labels = image.resample_like(labels, ct, "label")
        table.append(realism(ct, labels, PHANTOM_LABELS, heads_centre(labels, PHANTOM_LABELS)))
    print(f"| | real CT | phantom seed {args.seed} |" + "".join(f" phantom {s} |" for s in args.more_seeds))
    print("|---|---|---|" + "---|" * len(args.more_seeds))
    for name in table[0]:
        print(f"| {name} | " + " | ".join(f"{t[name]:.2f}" if "fraction" in name else f"{t[name]:.0f}" for t in table)
              + " |")
    print("labels:", ", ".join(f"{s.value}={s.name}" for s in anatomy.STRUCTURES))


if __name__ == "__main__":
    main()
