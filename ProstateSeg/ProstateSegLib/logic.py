"""What a ProstateSeg module does, without any GUI: Slicer's Python-console API.

Works on the current scene (``slicer.mrmlScene``) through `segcore.mrml`, the
only MRML bridge. Models are loaded once per (model, device) and reused, so a
batch pays the loading cost once.
"""

import logging
import re
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

from segcore.errors import Cancelled, SegcoreError

logger = logging.getLogger(__name__)

# `python -m training.finetune` reports "[ 42%] training: iteration 120/600" on stderr, a failure as "error: ...".
FINETUNE_PROGRESS = re.compile(r"\[\s*(\d+)%\]\s*(.*)")
FINETUNE_ERROR = "error: "
FINETUNE_METRICS = (("dsc", "DSC"), ("asd", "ASD (mm)"), ("hd95", "HD95 (mm)"),
                    ("sdsc_2mm", "surface Dice 2 mm"))
REFINE_UNDO_STEPS = 20  # refinements undoRefine can take back, newest first


class RefineStep:
    """What undoRefine needs to take one refinement back: the segment and its content before (packed bits
    on the volume's grid, an eighth of a byte a voxel)."""

    def __init__(self, segmentationNode, segmentId, volumeNode, before):
        import numpy as np

        self.segmentationNode = segmentationNode
        self.segmentId = segmentId
        self.volumeNode = volumeNode
        self.shape = before.shape
        self.packed = np.packbits(before, axis=None)

    def before(self):
        import numpy as np

        count = int(np.prod(self.shape))
        return np.unpackbits(self.packed, count=count).reshape(self.shape).astype(bool)


class SegmentationLogicBase:
    """Models, segmentation of volume nodes and files, training cases: shared by the modules.

    A subclass names its model `task` and says how to load a model (`makeSegmenter`).
    """

    task = ""

    def __init__(self):
        self._segmenters = {}
        self.cancelRequested = False
        self.lastResult = None  # the segcore Result of the latest segmentVolume
        # The (volume, segmentation) nodes of lastResult; the nodes themselves, not their IDs, which a new
        # scene gives out again.
        self._lastNodes = (None, None)
        self.lastExportNotes = []  # what the latest exportDicom left out, and why
        self._refiner, self._refinerKey = None, None  # the loaded refinement model, kept between clicks
        self._refineSteps = []  # RefineStep of each refinement undoRefine can take back, oldest first
        self.lastRefineResult = None  # the segcore Result of the latest refineSegment

    # ------------------------------------------------------------------ models

    def modelEntries(self):
        """Usable packages for this task as segcore PackageEntry: the default model first, then the
        search path's order (bundled before installed)."""
        from segcore import packages

        default = self.defaultModel()
        usable = [e for e in packages.list_packages() if e.task == self.task and e.ok and not e.shadowed]
        return sorted(usable, key=lambda entry: entry.name != default)  # stable: keeps the rest in order

    def modelNames(self):
        return [entry.name for entry in self.modelEntries()]

    def defaultModel(self):
        raise NotImplementedError

    def modelsFolder(self):
        """Where installed (not bundled) models are kept; removing a model frees its space there."""
        from segcore import packages

        return packages.user_models_dir()

    def installModel(self, source, sha256):
        """Install a model package from a .zip file or an https URL; `sha256` is the archive's published hash."""
        from segcore import packages

        package = packages.install_package(source, sha256, progress=False)
        if package.task != self.task:
            packages.remove_package(package.name)
            raise SegcoreError(f"model package {package.name!r} is for the {package.task!r} task, "
                               f"not {self.task!r}: it was not kept.")
        self._segmenters.clear()
        return package.name

    def removeModel(self, name):
        """Delete an installed model (bundled models stay)."""
        from segcore import packages

        self._segmenters = {key: value for key, value in self._segmenters.items() if key[0] != name}
        return packages.remove_package(name)

    # ----------------------------------------------------------------- running

    def makeSegmenter(self, model, device):
        """A callable ``segmenter(image_or_path, progress) -> Result`` with the model loaded and a
        ``structures`` list (what its label maps can hold)."""
        raise NotImplementedError

    def segmenter(self, model=None, device="auto"):
        key = (model or self.defaultModel(), device)
        if key not in self._segmenters:
            self._segmenters.clear()  # one loaded model at a time keeps memory low
            self._segmenters[key] = self.makeSegmenter(*key)
        return self._segmenters[key]

    def cancel(self):
        """Ask the running segmentation to stop at its next progress report."""
        self.cancelRequested = True

    def _watched(self, progress):
        def report(fraction, message):
            if progress is not None:
                progress(fraction, message)
            if self.cancelRequested:
                raise Cancelled("cancelled by the user")
        return report

    def segmentVolume(self, volumeNode, model=None, device="auto", segmentationNode=None,
                      show3D=True, smoothing=0.5, progress=None):
        """Segment a CT volume node; returns the segmentation node, or None when nothing was found.

        Without `segmentationNode` a new one is made beside the volume; given one,
        only its segments of the same names are replaced. `progress(fraction, message)`
        is called as the work goes on; `cancel()` stops it (raises `Cancelled`)
        and nothing is added to the scene. The full result (volumes, confidence,
        messages) is in `lastResult`.
        """
        from segcore import mrml

        self.cancelRequested = False
        self.lastResult = None
        self._lastNodes = (None, None)
        image = mrml.volume_node_to_image(volumeNode)
        report = self._watched(progress)
        report(0.0, "loading the model")
        segmenter = self.segmenter(model, device)
        result = segmenter(image, report)
        self.lastResult = result
        for message in result.messages:
            logger.info("%s: %s", volumeNode.GetName(), message)
        if not result.found:
            return None
        report(1.0, "showing the result")
        node = mrml.result_to_segmentation_node(result, volumeNode, segmentationNode,
                                                show_3d=show3D, smoothing=smoothing)
        self._lastNodes = (volumeNode, node)
        return node

    def segmentFiles(self, paths, outputDir, model=None, device="auto", formats=("seg.nrrd",),
                     overwrite=False, progress=None):
        """Segment image files or DICOM folders into `outputDir`, as `prostateseg segment` does.

        Returns one segcore BatchItem per input (its outputs, or its error); a bad
        input does not stop the batch. What can be checked before any work is, before
        the model is loaded: the formats, the output folder, and (without `overwrite`)
        outputs already there, each a SegcoreError. A failure to write (full disk)
        stops the batch. `progress(fraction, message)` covers the whole batch.
        """
        from segcore.batch import plan_batch, segment_files

        self.cancelRequested = False
        plan_batch(paths, outputDir, formats, overwrite=overwrite)
        segmenter = self.segmenter(model, device)
        report = self._watched(progress)

        def batchProgress(done, total, name, message):
            report(done / max(total, 1), f"{name}: {message}")

        items = segment_files(segmenter, segmenter.structures, paths, outputDir, formats,
                              overwrite=overwrite, progress=batchProgress)
        for item in items:
            (logger.info if item.ok else logger.error)(item.summary())
        return items

    def saveTrainingCase(self, volumeNode, segmentationNode, datasetFolder, caseName, segmentNames=None,
                         overwrite=False):
        """Write the volume and the (possibly hand-corrected) segments as a training case.

        Files: ``<caseName>_ct.nii.gz`` and ``<caseName>_labels.nii.gz`` in `datasetFolder`,
        the layout `training/` reads; labels use ProstateSeg's values (prostate 1, ...).
        Returns the two paths.
        """
        from segcore import mrml
        from segcore.dataset import write_training_case

        ct = mrml.volume_node_to_image(volumeNode)
        labels = mrml.segmentation_node_to_labelmap(segmentationNode, volumeNode, segmentNames)
        return write_training_case(ct, labels, Path(datasetFolder), caseName, overwrite=overwrite)

    # ------------------------------------------------------- refine (guided correction)

    def refiner(self, model=None, device="auto"):
        """The refinement model (a segcore Refiner; default: the bundled refine-demo), loaded on first use and
        kept, so that each click pays only the refinement itself."""
        from segcore.refinement import Refiner

        key = (model, device)
        if self._refinerKey != key:
            self._refiner, self._refinerKey = None, None  # let the old one go before loading the next
            self._refiner = Refiner(model, device)
            self._refinerKey = key
        return self._refiner

    @staticmethod
    def rasToLps(points, what="include"):
        """(x, y, z) points in RAS millimetres (what Slicer shows and markups' GetNthControlPointPositionWorld
        gives) as a list of (x, y, z) in LPS millimetres (what segcore takes): x and y change sign."""
        import numpy as np

        try:
            array = np.asarray([tuple(p) for p in (points or [])], dtype=float).reshape(-1, 3)
        except (TypeError, ValueError):
            raise SegcoreError(f"{what} points must be (x, y, z) positions in RAS millimetres, as Slicer shows "
                               f"them, e.g. [(-12.5, 30.0, 4.0)]; got {points!r}") from None
        return [tuple(p) for p in (array * np.array([-1.0, -1.0, 1.0])).tolist()]

    @staticmethod
    def _refinedSegment(segmentationNode, segmentId):
        """The segment's name, after checking that the node holds the segment and that its name is its own
        (segments are read back by name)."""
        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise SegcoreError("no segmentation selected: choose the segmentation whose segment to refine.")
        segmentation = segmentationNode.GetSegmentation()
        segment = segmentation.GetSegment(segmentId or "")
        if segment is None:
            present = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
            raise SegcoreError(f"segmentation {segmentationNode.GetName()!r} has no segment {segmentId!r}; it has: "
                               f"{', '.join(present) or 'no segments'}. Choose the segment to refine.")
        name = segment.GetName()
        if segmentation.GetSegmentIdBySegmentName(name) != segmentId:
            raise SegcoreError(f"segmentation {segmentationNode.GetName()!r} has more than one segment named "
                               f"{name!r}: rename one of them, then refine.")
        return name

    def refineSegment(self, segmentationNode, segmentId, volumeNode, include=(), exclude=(), model=None,
                      device="auto"):
        """Refine one segment with include and exclude points (guided correction, segcore.refine).

        `include` and `exclude` are lists of (x, y, z) points in Slicer's world RAS millimetres, as Slicer
        shows them and as a markups node gives them (``GetNthControlPointPositionWorld``); they are turned
        into LPS (x and y change sign) for segcore. The segment's current content (also after corrections by
        hand) is read as a binary label map on the volume's grid, refined near the points by the refinement
        model (loaded once, `refiner`), and written back into that same segment in one step: its name,
        colour and terminology and every other segment stay as they are. `undoRefine` takes it back.

        Returns the segcore Result (`result.details` holds added_voxels and removed_voxels; it is also in
        `lastRefineResult`). Bad input (a point outside the image or far from the segment, more than 100
        points, an empty segment with no include point) raises SegcoreError with segcore's message, and the
        segment is not changed. A segmentation whose geometry differs from the volume's gets the segment back
        resampled from the volume's grid.
        """
        import numpy as np
        import SimpleITK as sitk

        from segcore import mrml

        name = self._refinedSegment(segmentationNode, segmentId)
        if volumeNode is None:
            raise SegcoreError("no volume selected: choose the CT the segmentation was made on.")
        includeLps, excludeLps = self.rasToLps(include, "include"), self.rasToLps(exclude, "exclude")
        image = mrml.volume_node_to_image(volumeNode)
        labels, value = self._refineLabels(segmentationNode, volumeNode, name)
        result = self.refiner(model, device)(image, labels, includeLps, excludeLps, value)
        before = sitk.GetArrayViewFromImage(labels) == value
        after = sitk.GetArrayViewFromImage(result.labelmap) == value
        step = RefineStep(segmentationNode, segmentId, volumeNode, before)
        if not np.array_equal(before, after):
            self._writeSegment(segmentationNode, segmentId, volumeNode, after)
        self._refineSteps.append(step)  # also an unchanged segment: one step per refinement
        del self._refineSteps[:-REFINE_UNDO_STEPS]
        self.lastRefineResult = result
        details = result.details
        logger.info("%s: refined with %d include and %d exclude points: %d voxels added, %d removed",
                    name, details["include"], details["exclude"], details["added_voxels"], details["removed_voxels"])
        return result

    @staticmethod
    def _refineLabels(segmentationNode, volumeNode, name):
        """The label map refine works on, on the volume's grid, and the segment's value in it: the segment
        with its catalogue value (prostate 1, ...; `mrml.label_values`), every other segment as OTHER, which
        refine leaves alone: the segment does not grow into its neighbours, and they keep every voxel."""
        import numpy as np
        import SimpleITK as sitk

        from segcore import mrml

        (value,) = mrml.label_values([name])
        other = 255 if value != 255 else 254
        segmentation = segmentationNode.GetSegmentation()
        others = list(dict.fromkeys(segmentation.GetNthSegment(n).GetName()
                                    for n in range(segmentation.GetNumberOfSegments())))
        others.remove(name)
        labels = mrml.segmentation_node_to_labelmap(segmentationNode, volumeNode, [name])
        if others:
            voxels = sitk.GetArrayFromImage(labels).astype(np.uint8)
            taken = sitk.GetArrayFromImage(mrml.segmentation_node_to_labelmap(segmentationNode, volumeNode, others))
            voxels[(taken != 0) & (voxels == 0)] = other
            combined = sitk.GetImageFromArray(voxels)
            combined.CopyInformation(labels)
            labels = combined
        return labels, value

    def canUndoRefine(self):
        """Whether undoRefine has a refinement to take back."""
        return bool(self._refineSteps)

    def undoRefine(self):
        """Take the latest refineSegment back: its segment gets exactly the content it had before (other
        segments are not touched). Returns the segment's ID, or None when there is nothing to undo; raises
        SegcoreError when that segment is gone."""
        if not self._refineSteps:
            return None
        step = self._refineSteps.pop()
        node = step.segmentationNode
        if node.GetScene() is None or node.GetSegmentation().GetSegment(step.segmentId) is None:
            raise SegcoreError(f"the refined segment {step.segmentId!r} is no longer in the scene: nothing to undo.")
        self._writeSegment(node, step.segmentId, step.volumeNode, step.before())
        return step.segmentId

    def clearRefineHistory(self):
        """Forget what undoRefine could take back (e.g. when the scene is closed)."""
        self._refineSteps.clear()

    @staticmethod
    def _writeSegment(segmentationNode, segmentId, volumeNode, mask):
        """Replace one segment's content by a 0/1 array on the volume's grid, in one modification."""
        import numpy as np
        import slicer
        import vtk

        from segcore import mrml

        scene = segmentationNode.GetScene()
        labelmapNode = mrml.temporary_labelmap_node(scene, np.asarray(mask, np.uint8), volumeNode)
        wasModifying = segmentationNode.StartModify()
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                    labelmapNode, segmentationNode, ids):
                raise SegcoreError(f"Slicer could not write the refined segment into {segmentationNode.GetName()!r}.")
        finally:
            segmentationNode.EndModify(wasModifying)
            mrml.remove_nodes(scene, labelmapNode)

    # ------------------------------------------------------------- fine-tuning

    def trainingCaseCount(self, folder):
        """(number of training cases in `folder`, a sentence saying so or what is wrong with the folder)."""
        from segcore.dataset import find_training_cases

        if not folder:
            return 0, "Choose the dataset folder (the one Save as training case writes)."
        try:
            count = len(find_training_cases(folder))
        except (SegcoreError, OSError) as error:
            text = str(error)
            return 0, text[:1].upper() + text[1:] + "."
        return count, f"{count} case{'' if count == 1 else 's'} found."

    def tunedModelName(self, model=None, name=None):
        """The name a fine-tune of `model` is installed under: `name`, else the command's default."""
        from training.finetune import tuned_name

        return name or tuned_name(Path(str(model or self.defaultModel())).name)

    @staticmethod
    def fineTuneFolder(name):
        """Where a fine-tune called `name` keeps its run folder (``run``) and exported package (``package``)."""
        from segcore import packages

        return packages.prostateseg_home() / "finetune" / name

    @staticmethod
    def pythonExecutable():
        """Slicer's Python launcher when there is one (inside Slicer), else this interpreter."""
        return shutil.which("PythonSlicer") or sys.executable

    def fineTuneCommand(self, datasetFolder, model=None, *, iterations=None, stages=None, device=None,
                        validation=None, name=None, export=None, output=None, overwrite=False, resume=False):
        """(argv, working directory, run folder) of ``python -m training.finetune`` tuning `model` (default:
        the module's default model) on the training cases in `datasetFolder` and installing the result.
        The package and run folder default to ``fineTuneFolder(name) / "package"`` and ``/ "run"``."""
        import segcore
        from segcore.packages.manifest import NAME_PATTERN

        def absolute(path):  # the process runs in another folder
            return str(Path(path).expanduser().resolve())

        model = model or self.defaultModel()
        name = self.tunedModelName(model, name)
        model = model if isinstance(model, str) and NAME_PATTERN.fullmatch(model) else absolute(model)
        runFolder = Path(absolute(output or self.fineTuneFolder(name) / "run"))
        export = absolute(export or self.fineTuneFolder(name) / "package")
        argv = [self.pythonExecutable(), "-u", "-m", "training.finetune", "--model", model,
                "--data", absolute(datasetFolder), "--export", export, "--output", str(runFolder),
                "--name", name, "--install"]
        for option, value in (("iterations", iterations), ("stages", stages), ("device", device),
                              ("validation", validation and absolute(validation))):
            if value is not None:
                argv += [f"--{option}", str(value)]
        argv += [flag for flag, wanted in (("--overwrite", overwrite), ("--resume", resume)) if wanted]
        return argv, Path(segcore.__file__).resolve().parents[1], runFolder

    def prepareFineTune(self, datasetFolder, model=None, **options):
        """fineTuneCommand's (argv, working directory, run folder), after the checks a new run needs: the
        tuned model's name is free (or `overwrite`), and the fine-tune folder of an earlier run of that
        name is cleared (kept with `resume`)."""
        name = self.tunedModelName(model, options.get("name"))
        resume, overwrite = options.get("resume", False), options.get("overwrite", False)
        if not resume and not overwrite and (self.modelsFolder() / name).exists():
            raise SegcoreError(f"a model called {name!r} is installed already: give the tuned model another "
                               "name (name=...), or replace it (overwrite=True).")
        command = self.fineTuneCommand(datasetFolder, model, **options)
        if not resume and self.fineTuneFolder(name).exists():
            shutil.rmtree(self.fineTuneFolder(name))
        return command

    def fineTune(self, datasetFolder, model=None, progress=None, **options):
        """Fine-tune `model` (default: the module's default model) on the training cases in `datasetFolder`
        (the folder Save as training case writes) in a separate process, and install the tuned model.

        `options`: iterations, stages ("stage2" or "all"), device, validation (a folder of held-out cases),
        name (default: the base's name + "-ft"), overwrite (replace an installed model of that name),
        resume (continue a run that was stopped), export and output (package and run folder, by default
        in `fineTuneFolder(name)`). `progress(fraction, message)` follows the run; `cancel()` stops the
        process (raises `Cancelled`; nothing is installed). Returns the run's summary (summary.json:
        package, version, installed path, base, held-out means and per-case rows of base and tuned model);
        a refused or failed run raises SegcoreError with the reason.
        """
        argv, workingDirectory, runFolder = self.prepareFineTune(datasetFolder, model, **options)
        self.cancelRequested = False
        report = self._watched(progress)
        lines = deque(maxlen=200)
        process = subprocess.Popen(argv, cwd=workingDirectory, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
        try:
            report(0.0, "starting the fine-tuning process")
            for line in process.stdout:
                self._fineTuneLine(line.rstrip(), lines, report)
        except BaseException:
            self.stopProcess(process)
            raise
        finally:
            process.stdout.close()
        return self.fineTuneOutcome(process.wait(), lines, runFolder)

    def _fineTuneLine(self, line, lines, report):
        lines.append(line)
        parsed = self.fineTuneProgress(line)
        if parsed:
            report(*parsed)
        elif line:
            logger.info("fine-tune: %s", line)

    @staticmethod
    def stopProcess(process, wait=5.0):
        """Terminate a subprocess.Popen, killing it when it has not stopped after `wait` seconds."""
        process.terminate()
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @staticmethod
    def fineTuneProgress(line):
        """(fraction, message) of a ``[ NN%] message`` line of the fine-tuning process, else None."""
        match = FINETUNE_PROGRESS.match(line)
        return (int(match.group(1)) / 100, match.group(2)) if match else None

    def fineTuneOutcome(self, returncode, lines, runFolder):
        """The summary of a finished fine-tuning process (exit status and output lines); a failure raises
        SegcoreError with its ``error:`` line, or the last line of its output."""
        import json

        if returncode != 0:
            errors = [line[len(FINETUNE_ERROR):] for line in lines if line.startswith(FINETUNE_ERROR)]
            if errors:
                raise SegcoreError(errors[-1])
            logger.error("fine-tuning failed:\n%s", "\n".join(lines))
            last = next((line for line in reversed(lines) if line.strip()), "no output")
            raise SegcoreError(f"fine-tuning stopped (exit status {returncode}): {last}")
        self._segmenters.clear()  # an overwritten model must be loaded again
        return json.loads((Path(runFolder) / "summary.json").read_text(encoding="utf-8"))

    @staticmethod
    def fineTuneTable(summary):
        """Rows (cases, structure, metric, base, tuned) as text comparing the models on the held-out cases:
        each metric's mean, then each case's DSC."""
        import math

        def number(value):
            return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"

        heldOut = summary["held_out"]
        meanOf = f"mean of {heldOut['cases']}"
        rows = []
        for structure, tuned in heldOut["tuned"].items():
            base = heldOut["base"].get(structure, {})
            for key, label in FINETUNE_METRICS:
                rows.append((meanOf, structure, label, number(base.get(key, {}).get("mean")),
                             number(tuned.get(key, {}).get("mean"))))
        scores = {(r["case"], r["structure"], r["model"]): r["dsc"] for r in summary["rows"]}
        for case, structure in sorted({(case, structure) for case, structure, _ in scores}):
            rows.append((case, structure, "DSC", number(scores.get((case, structure, "base"))),
                         number(scores.get((case, structure, "tuned")))))
        return [(cases, structure.replace("_", " "), *rest) for cases, structure, *rest in rows]

    # ------------------------------------------------------------- DICOM export

    def exportDicom(self, segmentationNode, volumeNode, folder, formats=("rtstruct", "dicom-seg"),
                    overwrite=False, source=None, roiNames=None):
        """Write a segmentation as a DICOM RT Structure Set and/or DICOM SEG of the CT it lies on.

        Files: ``<volume name>_rtstruct.dcm`` and ``<volume name>_seg.dcm`` in `folder`
        (`formats`: "rtstruct", "dicom-seg"), both referencing the CT's series, study, patient and
        frame of reference, each contour and frame its slice's CT instance; returns the paths.
        The CT's DICOM files are found as `dicomSeries` says (`source`, a DICOM folder, a file of the
        series or a list of its files, is only needed for a CT that did not come through Slicer's
        DICOM database or from a DICOM file). Segments are matched to ProstateSeg's structures by
        name (ours, TG-263's or a synonym: "prostate", "Prostate", "Femur_Head_L"...); other
        segments are left out and listed in `lastExportNotes`. `roiNames` maps structures to the
        clinic's ROI names (as the CLI's --names file). Nothing is replaced without `overwrite`,
        and a failed export leaves no partial set.
        """
        from segcore.export import DICOM_FORMATS, export_labelmap, normalise_formats

        fmts = normalise_formats(formats)
        others = [fmt for fmt in fmts if fmt not in DICOM_FORMATS]
        if others:
            raise SegcoreError(f"exportDicom writes {' and '.join(DICOM_FORMATS)}, not {', '.join(others)}: "
                               "use segmentFiles or Slicer's Save for other formats.")
        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise SegcoreError("no segmentation selected: choose the segmentation to export.")
        if volumeNode is None:
            raise SegcoreError("no volume selected: choose the CT the segmentation was made on.")
        self._checkExportTransform(volumeNode)
        if not folder:
            raise SegcoreError("no output folder given: choose where the DICOM files go.")

        structures, labelmap = self._exportedLabels(segmentationNode, volumeNode)
        series = self.dicomSeries(volumeNode, source, grid=labelmap)
        algorithm = self._exportAlgorithm(segmentationNode, volumeNode, structures, labelmap)
        # staged and moved in together; an existing file is refused unless `overwrite`
        written = export_labelmap(labelmap, structures, folder, self._exportStem(volumeNode), fmts,
                                  overwrite=overwrite, source=series, roi_names=roiNames, algorithm=algorithm)
        for path in written:
            logger.info("%s: wrote %s", volumeNode.GetName(), path)
        return written

    @staticmethod
    def _checkExportTransform(volumeNode):
        transform = volumeNode.GetParentTransformNode()
        if transform is not None and not transform.IsTransformToWorldLinear():
            raise SegcoreError(
                f"volume {volumeNode.GetName()!r} is under the non-linear transform {transform.GetName()!r} "
                "(Slicer adds one to a CT with unequal slice spacing or gantry tilt): its DICOM slices are not "
                "a regular grid, which DICOM export needs. Remove the transform from the CT (Data module) "
                "and segment again.")

    @staticmethod
    def _exportStem(volumeNode):
        """A file name stem from the volume's name ("2: CT pelvis" -> "2_CT_pelvis")."""
        stem = re.sub(r"[^A-Za-z0-9.+-]+", "_", volumeNode.GetName() or "").strip("._")
        return stem or "segmentation"

    def _exportedLabels(self, segmentationNode, volumeNode):
        """The catalogue structures of the node's segments, and their label map on the volume's own grid
        (the grid of its files: a linear parent transform is not applied). Notes what is left out."""
        import numpy as np
        import SimpleITK as sitk

        from segcore import anatomy, mrml
        from segcore.dicom.names import SynonymTable
        from segcore.image import image_from_ijk_to_lps

        segmentation = segmentationNode.GetSegmentation()
        segmentNames = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
        synonyms = SynonymTable()
        chosen = {}  # structure name -> (segment name, structure)
        self.lastExportNotes = []
        for name in segmentNames:
            structure = anatomy.BY_NAME.get(name)
            if structure is None:
                match = synonyms.match(name)
                structure = match.structure
                if structure is None:
                    why = (match.reason if "target" in match.reason else "not a structure ProstateSeg knows; "
                           "name it after one (e.g. 'prostate' or 'Prostate') to export it")
                    self.lastExportNotes.append(f"segment {name!r} left out: {why}")
                    continue
            if structure.name in chosen:
                raise SegcoreError(f"segments {chosen[structure.name][0]!r} and {name!r} both name the "
                                   f"{structure.name.replace('_', ' ')}: rename or remove one of them, then export.")
            chosen[structure.name] = (name, structure)
        for note in self.lastExportNotes:
            logger.warning("%s: %s", segmentationNode.GetName(), note)
        if not chosen:
            raise SegcoreError(f"segmentation {segmentationNode.GetName()!r} has no segment named after a "
                               f"structure ProstateSeg knows ({', '.join(anatomy.TARGET_NAMES)}, or their TG-263 "
                               f"names); it has: {', '.join(segmentNames) or 'no segments'}.")
        picked = list(chosen.values())
        labels = mrml.segmentation_node_to_labelmap(segmentationNode, volumeNode, [name for name, _ in picked])
        values = mrml.label_values([name for name, _ in picked])
        table = np.zeros(max(values) + 1, np.uint8)
        for value, (_, structure) in zip(values, picked):
            table[value] = structure.value
        voxels = table[sitk.GetArrayViewFromImage(labels)]
        image = image_from_ijk_to_lps(voxels, mrml.volume_ijk_to_lps(volumeNode), volumeNode.GetName())
        return sorted((s for _, s in picked), key=lambda s: s.value), image

    def _exportAlgorithm(self, segmentationNode, volumeNode, structures, labelmap):
        """Who made the segmentation: the model of `lastResult` (AUTOMATIC) when the node still holds exactly
        that result; that model's result corrected by hand (SEMIAUTOMATIC); else a segmentation the module
        did not make (MANUAL)."""
        import numpy as np
        import SimpleITK as sitk

        from segcore.dicom.ct import Algorithm

        result = self.lastResult
        fromModule = (result is not None and self._lastNodes[0] is volumeNode
                      and self._lastNodes[1] is segmentationNode)
        if fromModule:
            made = sitk.GetArrayViewFromImage(result.labelmap)
            madeValues = [s.structure.value for s in result.segments]
            unchanged = ([s.value for s in structures] == sorted(madeValues)
                         and np.array_equal(np.where(np.isin(made, madeValues), made, 0),
                                            sitk.GetArrayViewFromImage(labelmap)))
            if unchanged:
                return Algorithm(result.model, result.model_version)
            return Algorithm(result.model, result.model_version, "SEMIAUTOMATIC")
        return Algorithm("manual", "", "MANUAL")

    # ----------------------------------------------------------- the CT's DICOM files

    def dicomSeries(self, volumeNode, source=None, grid=None):
        """The DICOM CT series a volume node was loaded from, matched slice by slice to its grid
        (a segcore CtSeries).

        Where the files are looked for, in order:
        1. `source`, when given: a DICOM folder, a file of the series, or a list of its files;
        2. Slicer's DICOM database (``slicer.dicomDatabase``), for a volume loaded through the DICOM
           module: the SOP Instance UIDs its scalar-volume plugin stores in the node attribute
           ``DICOM.instanceUIDs`` (or on the volume's subject hierarchy item), each found with
           ``fileForInstance``;
        3. the file the volume was read from (its storage node), when that is a DICOM file: the
           series is then found by geometry in that file's folder (a CT read with Add Data, or in
           plain MRML without the DICOM database).
        A volume with none of these was not loaded from DICOM, and is refused with what to do.
        `grid` is the image to match (default: the volume's own grid).
        """
        from segcore import mrml
        from segcore.dicom.ct import ct_series_for, match_series, read_header
        from segcore.errors import GeometryError, InputNotFoundError
        from segcore.image import image_from_ijk_to_lps, is_dicom_file

        if grid is None:
            mrml.volume_node_to_image(volumeNode)  # the checks: a scalar volume with voxels
            dims = volumeNode.GetImageData().GetDimensions()
            import numpy as np

            grid = image_from_ijk_to_lps(np.zeros(dims[::-1], np.uint8), mrml.volume_ijk_to_lps(volumeNode),
                                         volumeNode.GetName())
        name = volumeNode.GetName()
        where = f"volume {name!r}"

        def matched(match):
            try:
                return match()
            except GeometryError as error:
                raise GeometryError(
                    f"{error} The volume no longer lies on the grid of the DICOM files it came from (was it "
                    "cropped, resampled or its geometry changed?): export from the CT as loaded from "
                    "DICOM.") from None

        if source is not None:
            if isinstance(source, (str, Path)):
                return matched(lambda: ct_series_for(grid, source))
            files = [Path(f) for f in source]
            self._checkOnDisk(files, where, "given")
            return matched(lambda: match_series(grid, [(f, read_header(f)) for f in files], where))

        uids = self._instanceUIDs(volumeNode)
        database = self._dicomDatabase()
        if uids and database is not None:
            files = [database.fileForInstance(uid) for uid in uids]
            unknown = [uid for uid, f in zip(uids, files) if not f]
            if unknown:
                raise InputNotFoundError(
                    f"{len(unknown)} of the {len(uids)} DICOM instances of {where} are no longer in Slicer's DICOM "
                    f"database (first: {unknown[0]}): import the CT series into the DICOM database again (DICOM "
                    "module), load it from there, and export.")
            files = [Path(f) for f in files]
            self._checkOnDisk(files, where, "in Slicer's DICOM database")
            return matched(lambda: match_series(grid, [(f, read_header(f)) for f in files], where))

        storageNode = volumeNode.GetStorageNode() if volumeNode.IsA("vtkMRMLStorableNode") else None
        fileName = storageNode.GetFileName() if storageNode is not None else None
        if fileName and Path(fileName).is_file() and is_dicom_file(Path(fileName)):
            return matched(lambda: ct_series_for(grid, fileName))

        if uids:
            raise SegcoreError(
                f"{where} came from DICOM, but its files cannot be found: Slicer's DICOM database is not "
                "available here and the volume was not read from a DICOM file that is still on disk. Give "
                "the CT's DICOM folder (source=...).")
        raise SegcoreError(
            f"{where} was not loaded from DICOM (it was read from "
            f"{Path(fileName).name if fileName else 'no file'}), so there is no CT series for an RTSTRUCT or "
            "DICOM SEG to reference. Load the CT through the DICOM module (DICOM database: Import the folder, "
            "then Load), segment it there and export; or give its DICOM folder (source=...).")

    @staticmethod
    def _dicomDatabase():
        """Slicer's DICOM database when there is one (the application with the DICOM module), else None."""
        import slicer

        database = getattr(slicer, "dicomDatabase", None)
        if database is None or (hasattr(database, "isOpen") and not database.isOpen):
            return None
        return database

    @staticmethod
    def _instanceUIDs(volumeNode):
        """The SOP Instance UIDs Slicer's DICOM scalar-volume plugin stored for the volume's slices."""
        import slicer

        text = volumeNode.GetAttribute("DICOM.instanceUIDs") or ""
        if not text.strip():
            hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volumeNode.GetScene())
            item = hierarchy.GetItemByDataNode(volumeNode) if hierarchy is not None else 0
            if item:
                text = hierarchy.GetItemUID(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMInstanceUIDName())
        return [uid for uid in (text or "").split() if uid != "Unknown"]

    @staticmethod
    def _checkOnDisk(files, where, how):
        from segcore.errors import InputNotFoundError

        missing = [f for f in files if not f.is_file()]
        if missing:
            raise InputNotFoundError(
                f"{len(missing)} of the {len(files)} DICOM files of {where} ({how}) are not on disk any more "
                f"(first: {missing[0]}): were they moved or deleted? Put them back, or import the CT series "
                "into the DICOM database again and load it from there.")


class ProstateSegmentationLogic(SegmentationLogicBase):
    """The two-stage prostate pipeline (ProstateSeg module)."""

    task = "prostate"

    def defaultModel(self):
        from segcore.prostate import DEFAULT_MODEL

        return DEFAULT_MODEL

    def makeSegmenter(self, model, device):
        from segcore.prostate import ProstateSegmenter

        return ProstateSegmenter(model, device)


class OrganSegmentationLogic(SegmentationLogicBase):
    """The HMR-Net multi-organ pipeline (HMRNetOrgans module). `organs` (names, None for all the model
    offers) chooses what segmentVolume and segmentFiles deliver."""

    task = "organs"

    def defaultModel(self):
        from segcore.organs import DEFAULT_MODEL

        return DEFAULT_MODEL

    def makeSegmenter(self, model, device):
        from segcore.organs import OrganSegmenter

        return OrganSegmenter(model, device)

    def organNames(self, model=None):
        """The organs a model offers, in its order, read from its package (the network is not loaded)."""
        from segcore.organs import offered_organs

        return offered_organs(model or self.defaultModel())

    def _chosen(self, model, device, organs):
        from segcore.organs import choose_organs

        segmenter = self.segmenter(model, device)
        segmenter.organs = choose_organs(segmenter.offered, organs)
        return segmenter

    def segmentVolume(self, volumeNode, model=None, device="auto", segmentationNode=None, show3D=True,
                      smoothing=0.5, progress=None, organs=None):
        """As for the prostate (see SegmentationLogicBase.segmentVolume), for the chosen `organs`."""
        self._chosen(model, device, organs)
        return super().segmentVolume(volumeNode, model, device, segmentationNode, show3D, smoothing, progress)

    def segmentFiles(self, paths, outputDir, model=None, device="auto", formats=("seg.nrrd",), overwrite=False,
                     progress=None, organs=None):
        """As `prostateseg organs` does, for the chosen `organs`."""
        self._chosen(model, device, organs)
        return super().segmentFiles(paths, outputDir, model, device, formats, overwrite, progress)
