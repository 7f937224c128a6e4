"""What a segmentation pipeline returns: a label map on the input's grid plus what each label is."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .anatomy import Structure


@dataclass(frozen=True)
class SegmentResult:
    """One segmented structure: its catalogue entry, volume and how sure the pipeline is."""

    structure: Structure
    volume_cc: float
    confidence: float

    @property
    def name(self) -> str:
        return self.structure.name

    @property
    def value(self) -> int:
        return self.structure.value

    @property
    def color(self) -> tuple[int, int, int]:
        return tuple(self.structure.color)

    def to_json(self) -> dict:
        return {"value": self.value, "name": self.name, "color": list(self.color),
                "volume_cc": round(self.volume_cc, 3), "confidence": round(self.confidence, 3),
                "terminology": {k: v for k, v in self.structure.to_json().items() if k in ("category", "type", "modifier")}}


@dataclass
class Result:
    """A label map on the input's own grid and the structures in it.

    ``segments`` lists the structures found (empty when nothing was found);
    ``confidence`` (0-1) is the pipeline's overall certainty; ``messages`` say
    in words what a user should know (e.g. "no prostate found"); ``timings``
    gives seconds per stage. ``contours`` holds, for pipelines that predict
    contours natively (HMR-Net), each structure's closed planar contours as
    (n, 3) arrays of LPS points in mm: what an RT Structure Set stores.
    """

    labelmap: sitk.Image
    segments: list[SegmentResult]
    confidence: float
    model: str
    messages: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    contours: dict[str, list[np.ndarray]] = field(default_factory=dict)
    model_version: str = ""

    @property
    def found(self) -> bool:
        return bool(self.segments)

    def segment(self, name: str) -> SegmentResult | None:
        return next((s for s in self.segments if s.name == name), None)

    def to_json(self) -> dict:
        return {"model": self.model, "model_version": self.model_version, "confidence": round(self.confidence, 3), "found": self.found,
                "segments": [s.to_json() for s in self.segments], "messages": list(self.messages),
                "timings_s": {k: round(v, 3) for k, v in self.timings.items()}, "details": self.details}


def label_volume_cc(labelmap: sitk.Image, value: int) -> float:
    """Volume of one label in cubic centimetres."""
    count = int(np.count_nonzero(sitk.GetArrayViewFromImage(labelmap) == value))
    return count * float(np.prod(labelmap.GetSpacing())) / 1000.0
