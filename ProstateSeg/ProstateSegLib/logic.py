"""What a ProstateSeg module does, without any GUI: Slicer's Python-console API.

Works on the current scene (``slicer.mrmlScene``) through `segcore.mrml`, the
only MRML bridge. Models are loaded once per (model, device) and reused, so a
batch pays the loading cost once.
"""

import logging
from pathlib import Path

from segcore.errors import Cancelled, SegcoreError

logger = logging.getLogger(__name__)


class SegmentationLogicBase:
    """Models, segmentation of volume nodes and files, training cases: shared by the modules.

    A subclass names its model `task` and says how to load a model (`makeSegmenter`).
    """

    task = ""

    def __init__(self):
        self._segmenters = {}
        self.cancelRequested = False
        self.lastResult = None  # the segcore Result of the latest segmentVolume

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
        return mrml.result_to_segmentation_node(result, volumeNode, segmentationNode,
                                                show_3d=show3D, smoothing=smoothing)

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
