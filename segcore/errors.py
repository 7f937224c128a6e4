"""One hierarchy for every error a user can cause.

Each message says what is wrong and what to do about it; the CLI prints the
message alone (no traceback) and exits with a non-zero code.
"""


class SegcoreError(Exception):
    """Base class: a problem with the user's input, files or models."""


class InputNotFoundError(SegcoreError):
    """A path given by the user does not exist."""


class UnreadableImageError(SegcoreError):
    """A file or folder exists but holds no image we can read."""


class UnsupportedImageError(SegcoreError):
    """The image was read but is not a 3-D scalar volume (2-D, 4-D, vector...)."""


class NotCTError(SegcoreError):
    """The intensities do not look like CT Hounsfield units (e.g. MR)."""


class GeometryError(SegcoreError):
    """Absurd spacing or size, or grids that do not match."""


class OutputExistsError(SegcoreError):
    """An output file exists and overwriting was not asked for."""


class OutputWriteError(SegcoreError):
    """An output could not be written: full disk, read-only file system, no permission, a file in the way."""


class ModelPackageError(SegcoreError):
    """A model package is missing, damaged, of another schema or unsafe."""


class ChecksumError(ModelPackageError):
    """A download or archive does not have the sha256 it was promised to have."""


class Cancelled(Exception):
    """The user stopped the work (e.g. Cancel in Slicer). Not a failure of the input: a batch stops."""
