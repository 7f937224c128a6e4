"""The `prostateseg` command.

Errors the user can fix are reported as one line on stderr ("error: ...") with
exit code 1, never as a traceback; argument mistakes exit with 2 (argparse).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from segcore import __version__
from segcore.errors import SegcoreError

EPILOG = """\
examples:
  prostateseg segment ct.nii.gz -o results/         segment the prostate (bundled demo model)
  prostateseg segment scans/*.nii.gz dicom_dir/ -o results/ --formats seg.nrrd,stl
  prostateseg organs ct_series/ -o results/ --formats rtstruct,dicom-seg    DICOM RT for the planning system
  prostateseg segment ct.nii.gz -o results/ --model prostate-hmedn-demo   HMEDN: + bladder, rectum
  prostateseg organs ct.nii.gz -o results/          bladder, rectum, femoral heads, prostate, vesicles
  prostateseg organs ct.nii.gz -o results/ --organs bladder,rectum
  prostateseg segment archive/ -o results/ --workers 2 --resume    two processes; skip what is done
  prostateseg phantom cases/ -n 3 --seed 1          three synthetic pelvic CTs with labels
  prostateseg evaluate pred.nii.gz ref.nii.gz       DSC, ASD, HD, HD95, SEN, PPV, volumes
  prostateseg evaluate pred.nii.gz rtstruct.dcm --ct ct_series/    against clinical contours
  prostateseg dataset import dicom_export/ training_data/ --map names.yaml   contoured cases -> training
  prostateseg serve --spool spool/ --destination PLANNING@10.0.0.5:104    a DICOM node for the planning system
  prostateseg models list                           installed model packages
  prostateseg models install pkg.zip --sha256 HEX   add a model package (zip or https URL)

Run `prostateseg COMMAND --help` for the options of each command.
"""


def _phantom(args) -> int:
    from tqdm import tqdm

    from segcore.files import check_output_folder
    from segcore.phantom import ORIENTATIONS, write_phantoms

    if args.orientation not in ("random", *ORIENTATIONS):
        raise SegcoreError(f"--orientation must be 'random' or one of {', '.join(ORIENTATIONS)}")
    if args.prostate_sv_mm < 0:
        raise SegcoreError(f"--prostate-sv-mm must be 0 or more millimetres, not {args.prostate_sv_mm:g}")
    check_output_folder(args.outdir)
    implant = {"random": None, "yes": True, "no": False}.get(args.implant, args.implant)
    options = _phantom_options(args)
    with tqdm(total=args.n, desc="phantoms", unit="case", file=sys.stderr, disable=args.quiet) as bar:
        write_phantoms(
            args.outdir, args.n, seed=args.seed, matrix=args.size, overwrite=args.overwrite,
            progress=lambda done, total: bar.update(1), orientation=args.orientation,
            oblique=args.oblique, implant=implant, dicom=args.dicom, prostate_sv_mm=args.prostate_sv_mm,
            options=options,
        )
    if not args.quiet:
        print(f"wrote {args.n} case(s) and labels.json to {args.outdir}")
    return 0


# `prostateseg phantom --with/--without` names and the phantom options they force
PHANTOM_SWITCHES = {"fiducials": "fiducials", "catheter": "catheter", "spacer": "spacer",
                    "contrast": "bladder_contrast", "enlarged-prostate": "enlarged_prostate",
                    "calcifications": "calcifications", "knee-support": "knee_support",
                    "truncated-fov": "truncated_fov"}


def _phantom_options(args) -> dict:
    """The phantom options the command line forces (`--with`, `--without`, `--kernel`, ...)."""
    options = {}
    for value, names in ((True, args.with_), (False, args.without)):
        for name in filter(None, (n.strip() for n in (names or "").split(","))):
            if name not in PHANTOM_SWITCHES:
                raise SegcoreError(f"unknown phantom feature {name!r} in --with/--without; known: "
                                   f"{', '.join(PHANTOM_SWITCHES)}")
            if options.get(PHANTOM_SWITCHES[name], value) != value:
                raise SegcoreError(f"{name} is in both --with and --without")
            options[PHANTOM_SWITCHES[name]] = value
    for name in ("kernel", "kvp", "couch", "immobilisation"):
        value = getattr(args, name)
        if value != "random":
            options[name] = int(value) if name == "kvp" else value
    return options


def _evaluate(args) -> int:
    from segcore import metrics

    labels = None
    if args.labels:
        try:
            labels = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            raise SegcoreError(f"--labels takes label values separated by commas (e.g. 1,2), not {args.labels!r}")
    from segcore.files import check_output_file

    for target in (args.json, args.csv):  # before the work: a folder, a file in the way, an existing file
        if target:
            check_output_file(target, overwrite=args.overwrite)
    pred, ref, labels = _evaluation_images(args, labels)
    results = metrics.evaluate(pred, ref, labels)
    print(metrics.format_table(results))
    meta = {"prediction": str(args.pred), "reference": str(args.ref)}
    if args.json:
        metrics.write_json(results, args.json, meta=meta, overwrite=args.overwrite)
    if args.csv:
        metrics.write_csv(results, args.csv, overwrite=args.overwrite)
    return 0


def _evaluation_image(path: Path, args, what: str):
    """A label map, or an RT Structure Set or DICOM SEG placed on the --ct series (mapped as `dataset
    import` does)."""
    from segcore.dicom.importer import is_rtstruct, rtstruct_labelmap
    from segcore.dicom.seg import is_dicom_seg
    from segcore.image import read_image

    rtstruct, seg = is_rtstruct(path), is_dicom_seg(path)
    if not (rtstruct or seg):
        return read_image(path, kind="labels"), None
    kind = "an RT Structure Set" if rtstruct else "a DICOM SEG"
    if args.ct is None:
        raise SegcoreError(f"the {what} {path} is {kind}: give the CT series it was drawn on with --ct SERIES")
    if seg:
        return _seg_image(path, args, what)
    image, row = rtstruct_labelmap(path, args.ct, args.map)
    if not args.quiet:
        print(f"{what} {path.name}: " + "; ".join(row.mapped or ["no mapped structure"]), file=sys.stderr)
        for note in row.ignored + row.overlaps + row.problems:
            print(f"  {note}", file=sys.stderr)
    return image, sorted(row.label_values)


def _seg_image(path: Path, args, what: str):
    import numpy as np
    import SimpleITK as sitk

    from segcore.dicom.seg import seg_file_labelmap

    image, notes = seg_file_labelmap(path, args.ct, args.map)
    if not args.quiet:
        print(f"{what} {path.name}: " + "; ".join(notes), file=sys.stderr)
    return image, sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(image)) if v)


def _evaluation_images(args, labels):
    """PRED and REF as label maps; with an RTSTRUCT reference and no --labels, the labels it has."""
    if args.ct is not None and not args.ct.exists():
        raise SegcoreError(f"--ct {args.ct}: no such file or folder (give the DICOM CT series)")
    pred, _ = _evaluation_image(args.pred, args, "prediction")
    ref, ref_labels = _evaluation_image(args.ref, args, "reference")
    if labels is None and ref_labels is not None:
        if not ref_labels:
            raise SegcoreError(f"the reference {args.ref} has no structure that maps to our labels (see above; "
                               "add your names with --map FILE)")
        labels = ref_labels
    return pred, ref, labels


def _dataset(args) -> int:
    from tqdm import tqdm

    from segcore.dicom.importer import ALREADY, FAILED, IMPORTED, check_folders, import_dicom

    check_folders(args.root, args.outdir)  # before the progress bar: a refusal is one line
    stages: list[str] = []
    with tqdm(file=sys.stderr, disable=args.quiet, unit="file") as bar:
        def progress(stage, done, total):
            if not stages or stages[-1] != stage:  # a new stage: reading files, then importing CT series
                stages.append(stage)
                bar.set_description_str(stage)
                bar.unit = "file" if stage == "reading" else "series"
                bar.reset(total)
            bar.n = done
            bar.refresh()

        result = import_dicom(args.root, args.outdir, args.map, progress)
    for row in result.rows:
        if row.status == FAILED:
            print(f"{row.case or row.ct_series_uid or 'file'}: {row.reason}", file=sys.stderr)
    print(result.summary())
    return 1 if result.count(FAILED) and not (result.count(IMPORTED) or result.count(ALREADY)) else 0


def _segment(args) -> int:
    return _run_batch("prostate", args)


def _organs(args) -> int:
    return _run_batch("organs", args)


def _segmenter_class(task: str):
    if task == "prostate":
        from segcore.prostate import ProstateSegmenter

        return ProstateSegmenter
    from segcore.organs import OrganSegmenter

    return OrganSegmenter


def _model_id(segmenter_class, args) -> tuple[str, str]:
    """The chosen package's name and version, read from its model.json (no weights loaded)."""
    from segcore.pipeline import open_model

    c = segmenter_class
    package = open_model(args.model, c.TASK, c.DEFAULT_MODEL, c.STAGES, c.KIND)
    return package.name, package.version


def _formats(args) -> list[str]:
    return [f.strip().lower().lstrip(".") for f in args.formats.split(",") if f.strip()]


def _roi_names(args) -> dict[str, str] | None:
    if not args.names:
        return None
    from segcore.dicom.names import read_mapping_file

    return {str(k): str(v) for k, v in read_mapping_file(args.names, "name map").items()}


def _check_batch(args, resume: tuple[str, str] | None = None):
    """Formats, the output folder and existing outputs, before a model is loaded or anything segmented;
    with `resume` (the model's name and version), also what --resume skips. Without it, a --resume run's
    earlier outputs are not refused yet: the model's version tells which are its own."""
    from segcore.batch import plan_batch

    return plan_batch(args.inputs, args.output, _formats(args), overwrite=args.overwrite or (args.resume and resume is None),
                      roi_names=_roi_names(args), resume=resume)


# Library warnings about things we handle (they would only break into the progress on stderr); any other
# warning still shows.
KNOWN_LIBRARY_WARNINGS = (
    # torch.from_numpy on a read-only view of an image: the tensor is only read
    (UserWarning, r"The given NumPy array is not writ"),
    # a GPU driver torch cannot use: --device auto then runs on the CPU, --device cuda says so itself
    (UserWarning, r"CUDA initialization"),
    (UserWarning, r"Can't initialize NVML"),
)


@contextmanager
def _known_warnings_silenced():
    with warnings.catch_warnings():
        for category, message in KNOWN_LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def _run_batch(task: str, args) -> int:
    """Segment every input with one loaded model (or one per Dask worker), a progress bar on stderr and a
    line per input."""
    from segcore.batch import model_of, segment_files

    kind = _segmenter_class(task)
    distributed = args.workers is not None or args.scheduler is not None
    if distributed:
        from segcore.cluster import import_distributed

        import_distributed()  # says how to install Dask before anything else
    plan = _check_batch(args)  # before the model package is even opened
    model = _model_id(kind, args)
    if args.resume:
        plan = _check_batch(args, model)
    if plan.skipped:
        logging.getLogger("segcore").info(
            f"{len(plan.skipped)} input(s) already done by {model[0]} {model[1]} (manifest.jsonl): skipped")
    extra = (args.organs,) if task == "organs" else ()
    options = {"overwrite": args.overwrite, "roi_names": _roi_names(args), "resume": args.resume}
    with _known_warnings_silenced(), _BatchBar(len(plan.inputs), args.quiet) as bar:
        if distributed:
            from segcore.cluster import segment_files_on_cluster

            structures = kind(args.model, "cpu", *extra).structures  # checks the package here first
            factory = partial(kind, _model_for_workers(args.model), args.device, *extra)
            items = segment_files_on_cluster(factory, structures, args.inputs, args.output, _formats(args),
                                             model=model, workers=args.workers, scheduler=args.scheduler,
                                             progress=bar.progress, on_item=bar.show, **options)
        else:
            segmenter = kind(args.model, args.device, *extra)
            items = segment_files(segmenter, segmenter.structures, args.inputs, args.output, _formats(args),
                                  model=model_of(segmenter), progress=bar.progress, on_item=bar.show, **options)
    failures = [item for item in items if not item.ok]
    if failures and len(items) == 1:
        return 1  # its one error line has been shown
    if failures:
        print(f"{len(failures)} of {len(items)} input(s) failed:", file=sys.stderr)
        for item in failures:
            print(f"  {item.input}: {item.error}", file=sys.stderr)
        return 1
    return 0


def _model_for_workers(model: str | None) -> str | None:
    """A package folder given by a relative path, made absolute: workers may run elsewhere."""
    return str(Path(model).resolve()) if model and Path(model).exists() else model


class _BatchBar:
    """The batch's one progress bar on stderr: cases done of total (and how far the current one is, in a
    serial run), failures, time left; each finished input's line printed above it."""

    def __init__(self, total: int, quiet: bool):
        from tqdm import tqdm

        self.failed = 0
        self.bar = tqdm(total=max(total, 1), file=sys.stderr, disable=quiet, unit="case",
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def progress(self, done: float, total: int, name: str, message: str) -> None:
        case = int(done) if message in ("done", "failed") else min(int(done) + 1, total)
        self.bar.set_description_str(f"[{case}/{total}] {name}: {message}", refresh=False)
        self.bar.n = done
        self.bar.refresh()

    def show(self, item) -> None:
        self.bar.write(item.summary(), file=sys.stdout if item.ok else sys.stderr)
        if not item.ok:
            self.failed += 1
            self.bar.set_postfix_str(f"{self.failed} failed")


def _node_config(args):
    from segcore import anatomy
    from segcore.dicom.names import roi_names
    from segcore.node.config import NodeConfig, parse_peer

    names = _roi_names(args)
    if names:
        roi_names(anatomy.STRUCTURES, names)  # a mistake in the name map: now, not after every series
    return NodeConfig(
        spool=args.spool, destination=parse_peer(args.destination, "--destination", with_port=True),
        port=args.port, ae_title=args.ae_title, bind=args.bind, task=args.task, model=args.model, device=args.device,
        formats=tuple(f.strip().lower() for f in args.formats.split(",") if f.strip()), roi_names=_roi_names(args),
        allow=[parse_peer(text, "--allow", with_port=False) for text in args.allow or []],
        quiet_seconds=args.quiet_seconds, max_associations=args.max_associations,
        max_instance_bytes=int(args.max_instance_mb * (1 << 20)), max_spool_bytes=int(args.max_spool_gb * (1 << 30)),
        log_patient_names=args.log_patient_names, tls_certificate=args.tls_cert, tls_key=args.tls_key,
        tls_ca=args.tls_ca, tls_destination=args.tls_destination)


def _serve(args) -> int:
    from segcore.node.server import Node, check

    config = _node_config(args)
    handler = logging.StreamHandler(sys.stderr)  # a service's log: every line with its time
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    node_log = logging.getLogger("segcore.node")
    node_log.addHandler(handler)
    node_log.propagate = False
    try:
        if args.check:
            return check(config, print)
        return Node(config).run()
    finally:
        node_log.removeHandler(handler)
        node_log.propagate = True


def _models(args) -> int:
    from segcore import packages

    if args.action == "list":
        entries = packages.list_packages(check_hashes=args.verify)
        if not entries:
            print("no model packages installed")
        for e in entries:
            state = "ok" if e.ok else f"DAMAGED: {e.problem}"
            if e.shadowed:
                state += " (hidden by the bundled package of the same name)"
            print(f"{e.name:28s} {e.version or '?':10s} {e.task or '?':9s} {e.where:8s} {state}")
        (bundled, bundled_dir), (user, user_dir) = packages.search_path()
        print(f"\n{bundled}: {bundled_dir}\n{user}:    {user_dir}  (set {packages.HOME_ENV} to move it)")
        return 0 if all(e.ok for e in entries) else 1
    if args.action == "info":
        print(packages.open_package(args.name).describe())
        return 0
    if args.action == "verify":
        report = packages.verify_package(args.name)
        print(report)
        return 0 if report.ok else 1
    if args.action == "install":
        package = packages.install_package(args.source, args.sha256, force=args.force, progress=not args.quiet)
        print(f"installed {package.name} {package.version} into {package.path}")
        return 0
    if args.action == "remove":
        path = packages.remove_package(args.name)
        print(f"removed {args.name} ({path})")
        return 0
    raise AssertionError(args.action)


def _batch_arguments(p: argparse.ArgumentParser, default_model: str) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="CT image file (NIfTI, NRRD, MHA, a DICOM file), DICOM series folder, or a folder of images")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument("--model", help=f"model package name or folder (default: {default_model})")
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu or cuda (default auto)")
    p.add_argument("--formats", default="seg.nrrd,nii.gz",
                   help="comma-separated outputs: seg.nrrd, nii.gz, nii, nrrd (label maps), stl, obj, vtp, ply "
                   "(surfaces), rtstruct (RT Structure Set, INPUT_rtstruct.dcm) and dicom-seg (DICOM SEG, "
                   "INPUT_seg.dcm), these two for DICOM CT inputs; default seg.nrrd,nii.gz")
    p.add_argument("--names", type=Path, metavar="FILE",
                   help="RT Structure Set ROI names: a YAML/JSON file mapping our or TG-263 names to yours, e.g. "
                   "'Prostate: CTV_Prostate_AI' (default: TG-263 names: Prostate, Bladder, Rectum, Femur_Head_L, "
                   "Femur_Head_R, SeminalVes)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never done otherwise)")
    p.add_argument("--resume", action="store_true",
                   help="skip the inputs that OUTPUT/manifest.jsonl says this model version has done (outputs "
                   "all there) and do the rest, replacing their earlier results")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N",
                       help="segment on a local Dask cluster of N worker processes (each loads the model "
                       "once and gets its share of the cores); needs the cluster extra: "
                       'pip install "prostateseg[cluster]"')
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="segment on an existing Dask cluster, e.g. tcp://10.0.0.5:8786 (started with "
                       "`dask scheduler` and `dask worker ADDRESS`): every worker needs prostateseg, the "
                       "model package, and the inputs and output folder at the same paths")


def _add_segment(commands) -> None:
    p = commands.add_parser(
        "segment", help="segment the prostate in CT images (files, DICOM folders or folders of images)",
        description="Two-stage prostate segmentation: a coarse localiser finds the prostate, a 1 mm network "
        "segments it, and the result is placed on each input's own voxel grid. For each input INPUT the "
        "output folder gets INPUT_seg.<format> for each label-map format, INPUT_seg_prostate.<format> for "
        "each surface format (stl, obj, vtp, ply) and INPUT_seg.json (volume, confidence, notes, timings). "
        "OUTDIR/manifest.jsonl gets one line per input as it finishes (see --resume). "
        "A batch goes on past a bad input; the exit code is 1 if any input failed.",
        epilog="Stage-2 networks, chosen with --model: prostate-metricunet-demo (MetricUNet, the default), "
        "prostate-hfunet-demo (HF-UNet) and prostate-hmedn-demo (HMEDN, which also segments the bladder "
        "and rectum around the prostate). Model packages: `prostateseg models list`. The bundled models are "
        "demo weights trained on synthetic phantoms, not validated on patient data.",
    )
    _batch_arguments(p, "the bundled prostate demo model")
    p.set_defaults(run=_segment)


def _add_organs(commands) -> None:
    p = commands.add_parser(
        "organs", help="segment the pelvic organs (bladder, rectum, femoral heads, prostate, seminal vesicles)",
        description="HMR-Net multi-organ segmentation: on every axial slice the network detects each organ and "
        "regresses its contour; the contours are made consistent from slice to slice, filled, and placed on "
        "each input's own voxel grid. Outputs are named as for `prostateseg segment`: INPUT_seg.<format> "
        "(one label per organ), INPUT_seg_<organ>.<format> for surfaces, INPUT_seg.json. "
        "OUTDIR/manifest.jsonl gets one line per input as it finishes (see --resume). "
        "A batch goes on past a bad input; the exit code is 1 if any input failed.",
        epilog="The bundled default is demo weights trained on synthetic phantoms, not validated on patient "
        "data. Organ names: prostate, bladder, rectum, femoral_head_left, femoral_head_right, "
        "seminal_vesicles (what a model offers: `prostateseg models info NAME`).",
    )
    _batch_arguments(p, "the bundled multi-organ demo model")
    p.add_argument("--organs", help="comma-separated organs to segment, e.g. bladder,rectum (default: all the "
                   "model offers)")
    p.set_defaults(run=_organs)


def _add_phantom(commands) -> None:
    p = commands.add_parser(
        "phantom", help="write synthetic labelled pelvic CTs (the digital phantom)",
        description="Write N synthetic pelvic CTs with their label maps: OUTDIR/caseNNN_ct.nii.gz, "
        "caseNNN_labels.nii.gz, caseNNN_info.json (drawn parameters) and labels.json (label values, names, "
        "colours, SNOMED CT codes). Case i is made from seed S+i, so the same command gives the same files.",
    )
    p.add_argument("outdir", type=Path, help="output folder (created if missing)")
    p.add_argument("-n", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    p.add_argument("--size", type=int, default=512,
                   help="in-plane matrix (default 512 as on scanners, ~1 mm; 96-160 for quick experiments)")
    p.add_argument("--orientation", default="random",
                   help="voxel storage order: random (default), LPS, RAS, LPI, coronal, sagittal")
    p.add_argument("--oblique", action="store_true", help="tilt the voxel grid (oblique acquisition)")
    p.add_argument("--implant", choices=("random", "yes", "no", "left", "right", "both"), default="random",
                   help="metal hip prosthesis with streak artefacts: yes (either side), left, right, both or no "
                   "(default: random, about one case in seven)")
    p.add_argument("--with", dest="with_", metavar="FEATURES",
                   help="comma-separated features every case gets: " + ", ".join(PHANTOM_SWITCHES)
                   + " (default: each drawn at its usual rate, e.g. gold fiducials in 30%% of cases)")
    p.add_argument("--without", metavar="FEATURES", help="comma-separated features no case gets (as for --with)")
    p.add_argument("--kernel", choices=("random", "soft", "standard", "sharp"), default="random",
                   help="reconstruction kernel: noise texture and edges (default: random)")
    p.add_argument("--kvp", choices=("random", "100", "120", "140"), default="random",
                   help="tube voltage: bone and contrast read higher at 100 kVp (default: random, mostly 120)")
    p.add_argument("--couch", choices=("random", "flat", "curved"), default="random",
                   help="radiotherapy flat-top or curved diagnostic couch (default: random, mostly flat)")
    p.add_argument("--immobilisation", choices=("random", "none", "vacuum_bag", "thermoplastic"), default="random",
                   help="positioning aid around the pelvis (default: random)")
    p.add_argument("--dicom", action="store_true",
                   help="also write each case as a clinic's planning system would send it: caseNNN_dicom/ with the "
                   "CT series and RS.dcm, an RT Structure Set of the six organs (for --formats rtstruct, "
                   "`dataset import` and DICOM nodes)")
    p.add_argument("--prostate-sv-mm", type=float, default=0.0, metavar="MM",
                   help="contour the prostate as many clinics contour the CTV: the prostate label also covers the "
                   "seminal vesicles within MM of it, e.g. 10 (default 0: the anatomical prostate); a "
                   "contouring convention to fine-tune a model to")
    p.add_argument("--overwrite", action="store_true", help="replace existing case files")
    p.set_defaults(run=_phantom)


def _add_evaluate(commands) -> None:
    p = commands.add_parser(
        "evaluate", help="compare a label map with a reference (DSC, ASD, HD95, surface Dice, APL, volume...)",
        description="Compare a predicted label map with a reference on the same grid, per label: Dice (DSC), "
        "average symmetric surface distance (ASD, mm), Hausdorff distance (HD, mm) and its 95th percentile "
        "(HD95, mm), surface Dice at 1, 2 and 3 mm, added path length (APL, mm of reference contour to draw), "
        "sensitivity (SEN), positive predictive value (PPV) and volumes (cc); definitions in the README. "
        "Empty masks are flagged, never NaN. REF (or PRED) may be an RT Structure Set or a DICOM SEG with "
        "--ct SERIES: its structures are mapped to our labels (synonym table, --map) and placed on that CT "
        "series; without --labels only the labels such a reference has are compared.",
    )
    p.add_argument("pred", type=Path, help="predicted label map (NIfTI, NRRD, MHA, DICOM...), RTSTRUCT or DICOM "
                   "SEG file")
    p.add_argument("ref", type=Path, help="reference label map on the same grid, or an RTSTRUCT or DICOM SEG file "
                   "(clinical contours; then --ct is needed)")
    p.add_argument("--ct", type=Path, metavar="SERIES",
                   help="the DICOM CT series (folder, or one file of it) an RTSTRUCT or DICOM SEG PRED/REF was "
                   "made on: its structures are placed on this grid (SEG segments by their SNOMED CT codes, "
                   "else by name; overlapping segments are refused)")
    p.add_argument("--map", type=Path, metavar="FILE",
                   help="ROI names of your clinic added to the synonym table (YAML, as for `dataset import`)")
    p.add_argument("--labels", help="label values to compare, e.g. 1,2 (default: all present)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--csv", type=Path, help="also write the results as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--csv files")
    p.set_defaults(run=_evaluate)


def _add_dataset(commands) -> None:
    p = commands.add_parser(
        "dataset", help="build training datasets (import a clinic's contoured DICOM cases)",
        description="Training datasets in the layout training/ reads (NAME_ct.nii.gz + NAME_labels.nii.gz, "
        "labels.json).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    a = actions.add_parser(
        "import", help="import CT series with their RT Structure Sets from a DICOM folder tree",
        description="Walk DICOM_ROOT (any file names; several patients, studies, series), pair every CT series "
        "with the RTSTRUCT(s) referencing it, map the ROI names to our labels (synonym table: TG-263 names and "
        "common variants, plus --map FILE; a CTV/PTV is never taken for an organ), rasterise them on the CT "
        "grid and write OUTDIR/dcm_<hash>_ct.nii.gz + _labels.nii.gz (1 prostate, 2 bladder, 3 rectum, "
        "4/5 femoral head L/R, 6 seminal vesicles) and labels.json. Case names are a hash of the CT series "
        "UID (no patient names): a re-run skips the cases already imported. Every run writes "
        "OUTDIR/import_report_<UTC time>.csv: per case the structures found, mapped, ignored (and why), "
        "overlaps (prostate > seminal vesicles > rectum > bladder > femoral heads decides) and problems. "
        "Nothing is written under DICOM_ROOT.",
        epilog="Exit code 1 when at least one case failed and no case of DICOM_ROOT is in OUTDIR (imported by "
        "this run or an earlier one), or on an error such as OUTDIR inside DICOM_ROOT; 0 otherwise (failed "
        "and skipped cases are in the report and on stderr). "
        "The synonym table to copy and edit: segcore/dicom/structure_names.yaml.",
    )
    a.add_argument("root", type=Path, metavar="DICOM_ROOT", help="folder tree holding the DICOM files (only read)")
    a.add_argument("outdir", type=Path, metavar="OUTDIR", help="training data folder (created if missing)")
    a.add_argument("--map", type=Path, metavar="FILE",
                   help="YAML file adding your ROI names, e.g. 'prostate: [Prostata_MR, PROST]'")
    p.set_defaults(run=_dataset)


def _add_models(commands) -> None:
    p = commands.add_parser(
        "models", help="list, inspect, verify, install or remove model packages",
        description="Model packages live in the bundled model folder and in the user's model "
        "folder (PROSTATESEG_HOME/models). Weights are .safetensors files whose sha256 is checked.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    a = actions.add_parser("list", help="list the packages found")
    a.add_argument("--verify", action="store_true", help="also check every weights file's sha256")
    a = actions.add_parser("info", help="show a package's description, labels, training and validation")
    a.add_argument("name", help="package name (or folder)")
    a = actions.add_parser("verify", help="re-check a package's manifest and every sha256")
    a.add_argument("name", help="package name (or folder)")
    a = actions.add_parser("install", help="install a package from a .zip file or an https URL",
                           description="Install a model package. The archive's sha256 is required and "
                           "checked before anything is unpacked; nothing is left behind on failure.")
    a.add_argument("source", help="path of a .zip, or an https:// URL")
    a.add_argument("--sha256", required=True, help="expected sha256 of the archive (from its publisher)")
    a.add_argument("--force", action="store_true", help="replace an installed user package of the same name")
    a = actions.add_parser("remove", help="remove a user-installed package (bundled ones stay)")
    a.add_argument("name", help="package name")
    p.set_defaults(run=_models)


def _add_serve(commands) -> None:
    p = commands.add_parser(
        "serve", help="run a DICOM node: receive CT series, send back RT Structure Sets",
        description="A DICOM node for auto-contouring. A planning system or PACS sends a CT series (C-STORE) "
        "to this AE title; each instance is written to the spool and synced to disk before it is "
        "acknowledged. When no instance of a series has arrived for --quiet-seconds, the series is "
        "segmented and its RT Structure Set (and DICOM SEG) sent to --destination, retried with back-off "
        "until delivered. A restart (even after kill -9) carries on with what the spool holds; SIGTERM "
        "finishes the case in hand and stops. Only callers on the allow list are accepted (default: the "
        "destination's AE title and host). SPOOL/status.json says what is queued, running, sent and failed.",
        epilog="example: prostateseg serve --port 11112 --ae-title PROSTATESEG --spool /var/spool/prostateseg "
        "--destination PLANNING@10.0.0.5:104 --allow PLANNING@10.0.0.5 --task organs",
    )
    p.add_argument("--port", type=int, default=11112, help="port to listen on (default 11112)")
    p.add_argument("--ae-title", default="PROSTATESEG", help="this node's AE title (default PROSTATESEG)")
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on (default all; 127.0.0.1 for local only)")
    p.add_argument("--spool", type=Path, required=True, help="folder for received series, jobs and results")
    p.add_argument("--destination", required=True, metavar="AET@HOST:PORT",
                   help="where results are sent (the planning system or PACS)")
    p.add_argument("--task", choices=("prostate", "organs"), default="prostate",
                   help="prostate (two-stage prostate pipeline) or organs (HMR-Net); default prostate")
    p.add_argument("--model", help="model package name or folder (default: the task's bundled model)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--formats", default="rtstruct", help="rtstruct and/or dicom-seg, comma-separated (default rtstruct)")
    p.add_argument("--names", type=Path, metavar="FILE", help="ROI names for the RT Structure Set (as for segment)")
    p.add_argument("--allow", action="append", metavar="AET@HOST",
                   help="a calling AE title and host that may send (repeat for several; HOST may be *); "
                   "default: the destination's AE title and host")
    p.add_argument("--quiet-seconds", type=float, default=10.0,
                   help="a series is complete when no instance of it arrived for this long (default 10)")
    p.add_argument("--max-associations", type=int, default=10, help="simultaneous associations (default 10)")
    p.add_argument("--max-instance-mb", type=float, default=64.0, help="largest instance accepted (default 64)")
    p.add_argument("--max-spool-gb", type=float, default=20.0,
                   help="instances are refused (out of resources) while the spool holds this much (default 20)")
    p.add_argument("--tls-cert", type=Path, help="TLS: this node's certificate (PEM); with --tls-key")
    p.add_argument("--tls-key", type=Path, help="TLS: this node's private key (PEM)")
    p.add_argument("--tls-ca", type=Path, help="TLS: accept only callers with a certificate signed by this CA")
    p.add_argument("--tls-destination", action="store_true",
                   help="TLS: send results over TLS too, with this node's certificate (the destination's is "
                   "checked against --tls-ca when given)")
    p.add_argument("--log-patient-names", action="store_true",
                   help="also log patient name and ID when a series is complete (default: UIDs only)")
    p.add_argument("--check", action="store_true",
                   help="check the configuration (spool, model, TLS files) and reach the destination with C-ECHO, "
                   "then exit: 0 when all is well")
    p.set_defaults(run=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prostateseg",
        description="Segment the prostate and pelvic organs in planning CT; make phantoms, evaluate results, "
        "manage model packages.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"prostateseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for add in (_add_segment, _add_organs, _add_phantom, _add_evaluate, _add_dataset, _add_models, _add_serve):
        add(commands)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: partial outputs are cleaned up on the way out."""


_received: list[int] = []  # the stop signals that arrived while the current command ran


def _stop(number, frame):
    _received.append(number)
    if number == getattr(signal, "SIGTERM", None):
        raise Terminated()
    raise KeyboardInterrupt()


@contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM into `Terminated` (and keep SIGINT a KeyboardInterrupt) while a command runs (main
    thread only), so that `finally` clauses remove staging folders and temporary files, and remember
    that a stop was asked for."""
    _received.clear()
    previous = {}
    for name in ("SIGTERM", "SIGINT"):
        if hasattr(signal, name):
            try:
                previous[name] = signal.signal(getattr(signal, name), _stop)
            except ValueError:  # not the main thread
                pass
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def _stopped() -> int:
    terminated = getattr(signal, "SIGTERM", None) in _received
    print("terminated" if terminated else "interrupted", file=sys.stderr)
    return 143 if terminated else 130


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("segcore")
    log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        with _sigterm_as_interrupt():
            return args.run(args)
    except SegcoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the file system said no (full, read-only, gone): its words, on one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        # An interrupt that lands inside a library can surface as that library's own error (tqdm's
        # "cannot release un-acquired lock"): the stop asked for is what happened, not a bug to show.
        if not _received:
            raise
        return _stopped()
    finally:
        log.removeHandler(handler)


def run(argv=None) -> int:
    """The `prostateseg` program. `main` takes SIGINT and SIGTERM while a command runs; before and after,
    they are ignored, so that a Ctrl-C landing once the results are written (the interpreter shutting down,
    when Python's own handlers are gone) neither kills the process nor prints a traceback."""
    for name in ("SIGTERM", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    return main(argv)


if __name__ == "__main__":
    sys.exit(run())
