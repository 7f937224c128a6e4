"""`prostateseg dataset import` and `evaluate` with an RTSTRUCT reference, on DICOM trees written here:
phantom CTs (random file names, several patients), our RT Structure Sets, plastimatch's, and broken input."""

import csv
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_tools import organ_labels, require_tool

from segcore import anatomy, metrics
from segcore.cli import main
from segcore.dicom.ct import ct_series_for, write_ct_series
from segcore.dicom.importer import LABEL_PRIORITY, case_name, import_dicom, rtstruct_labelmap
from segcore.dicom.names import roi_names
from segcore.dicom.rtstruct import structure_set, write_rtstruct
from segcore.errors import SegcoreError
from segcore.image import read_image
from segcore.phantom import make_phantom

ORGANS = [anatomy.BY_NAME[n] for n in anatomy.TARGET_NAMES]
PATIENT = "Doe^Johnny"


def write_patient(folder: Path, seed: int, rng, patient_id: str):
    """A phantom CT series with random file names; (organ labels, CtSeries, CT image as read back)."""
    case = make_phantom(seed, matrix=96, orientation="LPS")
    names = [f"{rng.integers(1 << 30):x}" for _ in range(case.ct.GetSize()[2])]
    write_ct_series(case.ct, folder, patient_name=PATIENT, patient_id=patient_id, seed=f"p{seed}",
                    file_names=lambda k: names[k])
    image = read_image(folder)
    return organ_labels(case.labels), ct_series_for(image, folder), image


def add_copy_of_roi(ds, source_name: str, new_name: str) -> None:
    """A new ROI in a structure set: the contours of `source_name` under another name."""
    import copy

    source = next(r for r in ds.StructureSetROISequence if r.ROIName == source_name)
    number = max(int(r.ROINumber) for r in ds.StructureSetROISequence) + 1
    roi = copy.deepcopy(source)
    roi.ROINumber, roi.ROIName = number, new_name
    ds.StructureSetROISequence.append(roi)
    contour = copy.deepcopy(next(c for c in ds.ROIContourSequence
                                 if int(c.ReferencedROINumber) == int(source.ROINumber)))
    contour.ReferencedROINumber = number
    ds.ROIContourSequence.append(contour)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def read_report(outdir: Path, newest=True) -> list[dict]:
    reports = sorted(outdir.glob("import_report_*.csv"), key=lambda p: p.stat().st_mtime_ns)
    with open(reports[-1 if newest else 0], newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """DICOM_ROOT with: A (TG-263 names + CTV_Prostate + PTV), B (a local bladder name, --map), C (CT, no
    RTSTRUCT), F (a CT slice missing), an RTSTRUCT whose CT is not there, a truncated RTSTRUCT."""
    base = tmp_path_factory.mktemp("dicom")
    root, rng, info = base / "root", np.random.default_rng(5), {}
    labels, series, image = write_patient(root / "Doe_Johnny" / "study1" / "ct", 1, rng, "PAT001")
    ds = structure_set(labels, ORGANS, series)
    add_copy_of_roi(ds, "Prostate", "CTV_Prostate")
    add_copy_of_roi(ds, "Bladder", "PTV")
    ds.save_as(root / "Doe_Johnny" / "study1" / "rs_a.dcm", enforce_file_format=True)
    info["A"] = (labels, series, image)
    labels, series, image = write_patient(root / "Roe_Jane" / "x" / "y", 2, rng, "PAT002")
    write_rtstruct(labels, ORGANS, series, root / "Roe_Jane" / f"{rng.integers(1 << 30):x}",
                   names=roi_names(ORGANS, {"bladder": "BL_full_local"}))
    info["B"] = (labels, series, image)
    _, series, _ = write_patient(root / "Poe_Edgar" / "ct", 3, rng, "PAT003")
    info["C"] = series.series_uid
    labels, series, image = write_patient(root / "Gap_Case" / "ct", 4, rng, "PAT004")
    write_rtstruct(labels, ORGANS, series, root / "Gap_Case" / "rs.dcm")
    series.files[len(series.files) // 2].unlink()
    info["F"] = series.series_uid
    labels, series, _ = write_patient(base / "elsewhere", 5, rng, "PAT005")  # its CT is not under root
    write_rtstruct(labels, ORGANS, series, root / "Lost" / "rs_lost.dcm")
    info["lost"] = series.series_uid
    whole = (root / "Doe_Johnny" / "study1" / "rs_a.dcm").read_bytes()
    (root / "Truncated").mkdir()
    (root / "Truncated" / "rs_cut.dcm").write_bytes(whole[: len(whole) // 2])
    mapping = base / "names.yaml"
    mapping.write_text("bladder: [BL_full_local]\n")
    return root, mapping, info


@pytest.fixture(scope="module")
def imported(tree, tmp_path_factory):
    root, mapping, _ = tree
    outdir = tmp_path_factory.mktemp("out") / "training"
    before = tree_hashes(root)
    code = main(["-q", "dataset", "import", str(root), str(outdir), "--map", str(mapping)])
    assert tree_hashes(root) == before, "the DICOM tree was modified"
    return outdir, code


def rows_by_case(rows):
    return {row["case"]: row for row in rows if row["case"]}


def test_import_writes_the_training_layout_with_the_phantoms_labels(tree, imported):
    from segcore.dataset import find_training_cases

    _, _, info = tree
    outdir, code = imported
    assert code == 0
    cases = {name: (ct, labels) for name, ct, labels in find_training_cases(outdir)}
    for key in ("A", "B"):
        labels, series, image = info[key]
        name = case_name(series.series_uid)
        assert set(cases) == {case_name(info["A"][1].series_uid), case_name(info["B"][1].series_uid)}
        got = sitk.ReadImage(str(cases[name][1]))
        assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(labels)), key
        ct = sitk.ReadImage(str(cases[name][0]))
        assert np.array_equal(sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(image))
    labels_json = json.loads((outdir / "labels.json").read_text())
    assert [(e["value"], e["name"]) for e in labels_json["labels"]] == [(s.value, s.name) for s in ORGANS]


def test_the_report_says_what_was_mapped_ignored_and_skipped(tree, imported):
    _, _, info = tree
    outdir, _ = imported
    rows = read_report(outdir)
    by_case = rows_by_case(rows)
    a = by_case[case_name(info["A"][1].series_uid)]
    assert a["status"] == "imported" and a["slices"] == str(len(info["A"][1].instances))
    assert "CTV_Prostate: a target or planning volume" in a["ignored"] and "PTV: a target" in a["ignored"]
    assert "Prostate -> 1 prostate" in a["mapped"] and "CTV_Prostate ->" not in a["mapped"]
    assert a["overlaps"] == ""
    b = by_case[case_name(info["B"][1].series_uid)]
    assert "BL_full_local -> 2 bladder" in b["mapped"]
    c = by_case[case_name(info["C"])]
    assert (c["status"], c["reason"]) == ("skipped", "no RTSTRUCT references this CT series")
    f = by_case[case_name(info["F"])]
    assert f["status"] == "failed" and "slice" in f["reason"] and "Gap_Case" not in f["reason"]
    lost = [r for r in rows if r["ct_series_uid"] == info["lost"]]
    assert len(lost) == 1 and lost[0]["status"] == "failed" and "not under DICOM_ROOT" in lost[0]["reason"]
    damaged = [r for r in rows if r["status"] == "failed" and r is not f and r not in lost]
    assert len(damaged) == 1 and ("damaged" in damaged[0]["reason"] or "unreadable" in damaged[0]["reason"])


def test_no_patient_name_reaches_the_output(tree, imported):
    outdir, _ = imported
    for path in outdir.rglob("*"):
        for word in ("Doe", "Johnny", "PAT00", "Roe", "Gap_Case", "Truncated", "rs_cut"):
            assert word not in path.name
    report = "".join(p.read_text() for p in outdir.glob("import_report_*.csv"))
    for word in ("Doe", "Johnny", "PAT00", "Roe_Jane", "Gap_Case", "rs_cut", str(tree[0])):
        assert word not in report


def test_a_rerun_imports_nothing_new_and_writes_only_its_report(tree, imported, capsys):
    root, mapping, _ = tree
    outdir, _ = imported
    before = {p.name: p.stat().st_mtime_ns for p in outdir.iterdir()}
    code, out, _ = run(capsys, "-q", "dataset", "import", root, outdir, "--map", mapping)
    assert code == 0 and "0 imported, 2 already imported" in out
    after = {p.name: p.stat().st_mtime_ns for p in outdir.iterdir()}
    new = set(after) - set(before)
    assert len(new) == 1 and next(iter(new)).startswith("import_report_")
    assert all(after[name] == when for name, when in before.items())
    statuses = [r["status"] for r in read_report(outdir) if r["case"]]
    assert statuses.count("already imported") == 2


def test_output_inside_the_dicom_tree_is_refused(tree, capsys):
    root = tree[0]
    code, _, err = run(capsys, "dataset", "import", root, root / "out")
    assert code == 1 and "inside the DICOM folder" in err and len(err.strip().splitlines()) == 1
    assert not (root / "out").exists()


def test_newest_structure_set_wins_ambiguous_names_skip_a_label_and_overlaps_follow_the_priority(tmp_path):
    root = tmp_path / "root"
    labels, series, _ = write_patient(root / "ct", 7, np.random.default_rng(1), "X")
    old = structure_set(labels, ORGANS, series)
    old.StructureSetDate, old.StructureSetTime = "20200101", "120000"
    old.save_as(root / "old.dcm", enforce_file_format=True)
    grown = sitk.GetArrayFromImage(labels)
    prostate = sitk.GetArrayFromImage(sitk.BinaryDilate(labels == 1, [2, 2, 1])).astype(bool)
    grown[prostate] = 1
    grown_image = sitk.GetImageFromArray(grown)
    grown_image.CopyInformation(labels)
    new = structure_set(grown_image, ORGANS[:2], series)  # Prostate (grown), Bladder
    new.StructureSetDate, new.StructureSetTime = "20240101", "120000"
    add_copy_of_roi(new, "Bladder", "bladder")
    new.save_as(root / "new.dcm", enforce_file_format=True)
    result = import_dicom(root, tmp_path / "out")
    row = result.rows[0]
    assert row.status == "imported" and len(row.structure_sets) == 2
    assert any("ambiguous" in i and "bladder" in i for i in row.ignored)
    assert any(i.startswith("Bladder: superseded") for i in row.ignored)
    assert any(i.startswith("Prostate: superseded") for i in row.ignored)  # the old set's prostate
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{row.case}_labels.nii.gz")))
    assert 2 not in np.unique(out)
    assert np.array_equal(out == 1, prostate)  # the grown gland wins over rectum and vesicles
    assert row.overlaps and all(o.split(" over ")[0] in LABEL_PRIORITY for o in row.overlaps)
    assert any(o.startswith("prostate over ") for o in row.overlaps)


def test_bad_contours_are_reported_per_case(tmp_path):
    root = tmp_path / "root"
    labels, series, _ = write_patient(root / "ct", 8, np.random.default_rng(2), "Y")
    ds = structure_set(labels, ORGANS, series)
    rois = {int(r.ROINumber): r.ROIName for r in ds.StructureSetROISequence}
    contours = {rois[int(c.ReferencedROINumber)]: c for c in ds.ROIContourSequence}
    first = contours["Rectum"].ContourSequence[0]
    first.ContourData, first.NumberOfContourPoints = list(first.ContourData)[:6], 2  # fewer than 3 points
    spacing = series.first.SliceThickness
    for item in contours["Femur_Head_L"].ContourSequence:  # every contour half-way between slice planes
        data = np.asarray(item.ContourData, float).reshape(-1, 3)
        data[:, 2] += float(spacing) / 2
        item.ContourData = [f"{v:.3f}" for v in data.ravel()]
    bow = contours["Bladder"].ContourSequence[0]
    z = float(bow.ContourData[2])
    bow.ContourData = [f"{v:.3f}" for v in (0, 0, z, 40, 40, z, 40, 0, z, 0, 40, z)]  # a bow tie
    bow.NumberOfContourPoints = 4
    ds.save_as(root / "rs.dcm", enforce_file_format=True)
    row = import_dicom(root, tmp_path / "out").rows[0]
    problems = " | ".join(row.problems)
    assert "'Rectum', contour 1: 2 point(s)" in problems
    assert "'Femur_Head_L'" in problems and "not in a slice plane" in problems
    assert "crosses itself" in problems
    assert any(i.startswith("Femur_Head_L: empty") for i in row.ignored)
    assert row.status == "imported"


def test_evaluate_against_our_own_rtstruct(tree, tmp_path, capsys):
    root, _, info = tree
    labels, series, _ = info["A"]
    pred = tmp_path / "pred.nii.gz"
    sitk.WriteImage(labels, str(pred))
    rtstruct = root / "Doe_Johnny" / "study1" / "rs_a.dcm"
    code, _, err = run(capsys, "evaluate", pred, rtstruct, "--ct", series.files[0].parent,
                         "--json", tmp_path / "m.json")
    assert code == 0, err
    results = metrics.read_json(tmp_path / "m.json")
    assert sorted(r.label for r in results) == [1, 2, 3, 4, 5, 6]
    assert all(r.dsc == pytest.approx(1.0) for r in results)
    code, _, err = run(capsys, "evaluate", rtstruct, rtstruct, "--ct", series.files[0])  # PRED an RTSTRUCT too
    assert code == 0, err
    code, _, err = run(capsys, "evaluate", pred, rtstruct)
    assert code == 1 and "--ct" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "evaluate", pred, rtstruct, "--ct", info["B"][1].files[0].parent)
    assert code == 1 and "references the CT series" in err and len(err.strip().splitlines()) == 1


def test_rtstruct_on_another_frame_of_reference_is_refused(tree, tmp_path):
    _, series, _ = tree[2]["A"]
    ds = pydicom.dcmread(tree[0] / "Doe_Johnny" / "study1" / "rs_a.dcm")
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.4"
    ds.save_as(tmp_path / "rs.dcm", enforce_file_format=True)
    with pytest.raises(SegcoreError, match="frame of reference"):
        rtstruct_labelmap(tmp_path / "rs.dcm", series.files[0].parent)


def test_a_plastimatch_rtstruct_imports_and_evaluates(tree, tmp_path, capsys):
    plastimatch = require_tool("plastimatch")
    labels, series, _ = tree[2]["A"]
    masks = tmp_path / "masks"
    masks.mkdir()
    for s in ORGANS:
        sitk.WriteImage(sitk.Cast(labels == s.value, sitk.sitkUInt8), str(masks / f"{roi_names([s])[s.value]}.nii.gz"))
    root = tmp_path / "root"
    shutil.copytree(series.files[0].parent, root / "ct")
    subprocess.run([plastimatch, "convert", "--input-prefix", str(masks), "--referenced-ct", str(root / "ct"),
                    "--output-dicom", str(root / "rs")], check=True, capture_output=True)
    rtstruct = next((root / "rs").glob("*.dcm"))
    assert pydicom.dcmread(rtstruct).Manufacturer.lower().startswith("plastimatch")
    result = import_dicom(root, tmp_path / "out")
    assert [r.status for r in result.rows] == ["imported"], result.rows
    got = sitk.ReadImage(str(tmp_path / "out" / f"{result.rows[0].case}_labels.nii.gz"))
    for r in metrics.evaluate(got, labels, [1, 2, 3, 4, 5, 6]):
        assert r.dsc >= 0.97, (r.label, r.dsc)
    sitk.WriteImage(labels, str(tmp_path / "pred.nii.gz"))
    code, _, err = run(capsys, "evaluate", tmp_path / "pred.nii.gz", rtstruct, "--ct", root / "ct",
                       "--json", tmp_path / "m.json")
    assert code == 0, err
    assert min(r.dsc for r in metrics.read_json(tmp_path / "m.json")) >= 0.97


def test_our_rtstruct_passes_dciodvfy(tree):
    dciodvfy = require_tool("dciodvfy")
    rtstruct = tree[0] / "Doe_Johnny" / "study1" / "rs_a.dcm"
    done = subprocess.run([dciodvfy, str(rtstruct)], capture_output=True, text=True, check=False)
    assert "Error" not in done.stdout + done.stderr, done.stderr[-2000:]


def test_require_tool_fails_when_tools_are_required(monkeypatch):
    monkeypatch.setenv("PROSTATESEG_REQUIRE_DICOM_TOOLS", "1")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-xyz"):
        require_tool("no-such-tool-xyz")
    monkeypatch.setenv("PROSTATESEG_REQUIRE_DICOM_TOOLS", "0")
    with pytest.raises(pytest.skip.Exception):
        require_tool("no-such-tool-xyz")


def test_a_series_split_over_folders_and_exported_twice_imports_once(tmp_path):
    """Clinics' exports: one series' files spread over two folders, and the same files again in a third
    (a second export). One case, with the labels exactly."""
    import shutil

    root = tmp_path / "root"
    labels, series, _ = write_patient(tmp_path / "ct", 8, np.random.default_rng(2), "Y")
    files = sorted(series.files)
    for n, path in enumerate(files):
        target = root / ("part1" if n % 2 else "part2")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    shutil.copytree(tmp_path / "ct", root / "second_export")
    write_rtstruct(labels, ORGANS, series, root / "rs.dcm")
    result = import_dicom(root, tmp_path / "out")
    assert [row.status for row in result.rows] == ["imported"], [(r.status, r.reason) for r in result.rows]
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{result.rows[0].case}_labels.nii.gz")))
    assert np.array_equal(out, sitk.GetArrayFromImage(labels))
