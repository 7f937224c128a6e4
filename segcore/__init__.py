"""ProstateSeg inference core: image I/O and geometry, phantoms, model packages,
metrics, surfaces and export. Importing it does no work and loads no model."""

__version__ = "0.1.0"

from segcore.errors import SegcoreError  # noqa: F401  (cheap, no heavy imports)
