"""ProstateSeg inference core: image I/O and geometry, phantoms, model packages,
networks and pipelines, metrics, surfaces and export.

Importing it does no work and loads neither torch nor a model: the pipelines
are imported on first use (``segcore.segment_prostate``, ``segcore.segment_organs``,
``segcore.refine``).
"""

__version__ = "0.1.0"

from segcore.errors import SegcoreError  # noqa: F401  (cheap, no heavy imports)

_LAZY = {"segment_prostate": "segcore.prostate", "ProstateSegmenter": "segcore.prostate",
         "segment_organs": "segcore.organs", "OrganSegmenter": "segcore.organs", "Result": "segcore.result",
         "refine": "segcore.refinement", "Refiner": "segcore.refinement"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'segcore' has no attribute {name!r}")
