"""What every segmentation pipeline shares: reading and checking the CT,
intensity normalisation, devices and CPU threads, opening a model package and
its networks, settings from a package, and the run that times each stage.

A pipeline (`segcore.prostate`, `segcore.organs`, a third one) subclasses
`Segmenter`, names its task, default package, stages and settings class, and
implements `segment(ct, report, timings)`. Nothing here imports torch until a
device or a network is asked for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import anatomy
from . import image as imageio
from .errors import ModelPackageError, SegcoreError
from .result import Result

# progress(fraction 0..1, message): how a pipeline reports its advance (CLI bar, Slicer progress).
Progress = Callable[[float, str], None]


def _silent(fraction: float, message: str) -> None:
    return None


# --------------------------------------------------------------------------- input


def read_input(image_or_path) -> sitk.Image:
    """A CT from a path (file, DICOM file or folder) or an image, checked to be a CT volume."""
    if isinstance(image_or_path, (str, Path)):
        image = imageio.read_image(image_or_path, kind="ct")
    elif isinstance(image_or_path, sitk.Image):
        image = image_or_path
        imageio.check_volume(image)
        imageio.check_not_tiny(image)
        imageio.check_finite(image)
        imageio.check_not_blank(image)
        imageio.check_ct_like(image)
    else:
        raise SegcoreError(f"expected a path or a SimpleITK image, got {type(image_or_path).__name__}")
    return image


def normalise(hu: np.ndarray, window) -> np.ndarray:
    """HU clipped to the window and scaled to [0, 1] (float32); air and anything below the window is 0."""
    low, high = float(window[0]), float(window[1])
    out = np.clip(np.asarray(hu, dtype=np.float32), low, high)
    out -= low
    out *= 1.0 / (high - low)
    return out


# --------------------------------------------------------------------------- devices


def resolve_device(device: str = "auto"):
    """'auto' (CUDA when torch sees it, else CPU), 'cpu' or 'cuda[:n]' as a torch.device."""
    import torch

    name = (device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SegcoreError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU here "
                           "(a CPU-only PyTorch, or no GPU driver). Use --device cpu or auto.")
    if name.startswith("cuda:") and name[5:].isdigit() and int(name[5:]) >= torch.cuda.device_count():
        raise SegcoreError(f"device {name!r} was asked for, but PyTorch sees {torch.cuda.device_count()} GPU(s) "
                           "(numbered from 0).")
    if name != "cpu" and not name.startswith("cuda"):
        raise SegcoreError(f"unknown device {device!r}: use auto, cpu or cuda")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise SegcoreError(f"unknown device {device!r}: {error}") from None


def available_cores() -> int:
    """The cores this process may use (containers and batch systems limit them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_available_cores() -> None:
    """Never run more CPU threads than this process may use."""
    import torch

    if torch.get_num_threads() > available_cores():
        torch.set_num_threads(available_cores())


# --------------------------------------------------------------------------- packages


def open_model(model, task: str, default: str, stages, kind: str):
    """A model package for `task`: by name, by folder path, an open package, or `default`.

    Every stage in `stages` must be listed in it; `kind` names the task in the
    error for a package of another task ("prostate model", "multi-organ model").
    """
    from . import packages

    package = model if isinstance(model, packages.ModelPackage) else packages.open_package(model or default)
    if package.task != task:
        raise ModelPackageError(f"model package {package.name!r} is for task {package.task!r}, not {task!r}; "
                                f"choose a {kind} (prostateseg models list).")
    for stage in stages:
        package.stage(stage)
    return package


def settings_from_package(settings_class, package, **from_input):
    """A pipeline's settings: the dataclass defaults, overridden by the package's ``pipeline`` block and
    then by `from_input` (values the package states in its ``input`` block).

    The block was checked when the package was opened: its JSON Schema lists each
    task's settings and their kinds, and refuses a key this version does not know
    (a package made for a newer ProstateSeg may rely on a setting this one would
    otherwise ignore). `Testing/test_pipeline.py` keeps the schema and the
    settings classes in step.
    """
    given = {**package.manifest.get("pipeline", {}), **from_input}
    return settings_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})


def settings_to_json(settings) -> dict:
    """A settings dataclass as JSON (tuples as lists), as a package's ``pipeline`` block stores it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def load_network(package, stage: str, device):
    """Build one stage's network from the package and load its checked weights."""
    from . import networks

    spec = package.stage(stage)
    network = networks.build(spec.architecture, spec.arguments)
    networks.load_state(network, package.load_weights(stage), f"model package {package.name!r} {stage}")
    return network.to(device).eval()


# --------------------------------------------------------------------------- the segmenter


class Segmenter:
    """A loaded model package, ready to segment many images (what a batch should use).

    Subclasses set TASK, DEFAULT_MODEL, STAGES, KIND and SETTINGS (a dataclass)
    and implement `segment`; `input_settings` maps the package's ``input`` block
    onto settings fields.
    """

    TASK: str
    DEFAULT_MODEL: str
    STAGES: tuple[str, ...]
    KIND: str
    SETTINGS: type

    def __init__(self, model=None, device: str = "auto"):
        self.package = open_model(model, self.TASK, self.DEFAULT_MODEL, self.STAGES, self.KIND)
        self.settings = settings_from_package(self.SETTINGS, self.package, **self.input_settings(self.package))
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            use_available_cores()

    @staticmethod
    def input_settings(package) -> dict:
        return {"window": tuple(package.input.intensity_window)}

    @property
    def structures(self) -> list[anatomy.Structure]:
        """What this pipeline's label maps can hold (written to every output, found or not)."""
        return list(self.organs)

    def load_stage(self, stage: str):
        """One stage's network from the package, on this segmenter's device."""
        return load_network(self.package, stage, self.device)

    def __call__(self, image_or_path, progress: Progress | None = None) -> Result:
        report = progress or _silent
        timings: dict[str, float] = {}
        started = time.perf_counter()
        report(0.0, "reading")
        ct = read_input(image_or_path)
        timings["read"] = time.perf_counter() - started
        result = self.segment(ct, report, timings)
        result.model_version = self.package.version
        note = imageio.left_handed_note(ct)
        if note:  # in the result, so that the report (and a DICOM node's log) keeps it beside the contours
            result.messages.append(note)
        timings["total"] = time.perf_counter() - started
        report(1.0, "done")
        return result

    def segment(self, ct: sitk.Image, report: Progress, timings: dict[str, float]) -> Result:
        """Segment a checked CT; add each stage's seconds to `timings`."""
        raise NotImplementedError


def empty_labelmap(ct: sitk.Image) -> sitk.Image:
    """A UInt8 label map of zeros on the CT's grid."""
    labelmap = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    labelmap.CopyInformation(ct)
    return labelmap


def labelmap_like(labels: np.ndarray, ct: sitk.Image) -> sitk.Image:
    """A (z, y, x) label array as an image on the CT's grid."""
    labelmap = sitk.GetImageFromArray(labels)
    labelmap.CopyInformation(ct)
    return labelmap
