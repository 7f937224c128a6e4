"""Model packages: the on-disk format, the registry of installed packages, and
install / verify / remove.

A model package is a folder (shipped as a ``.zip``) holding ``model.json`` and
the network weights as ``.safetensors`` files. Nothing in a package can run
code: weights are never unpickled, and a package that references or carries a
pickle or code file is refused.

- `manifest`: ``model.json``, its JSON Schema (``model_package.schema.json``) and validation;
- `registry`: the search path (bundled ``Resources/Models/``, in a wheel ``segcore/models/``, first, then
  ``<PROSTATESEG_HOME>/models/``), listing, opening, verifying, loading weights.
  `verify_package` is the one judge: manifest and setting ranges, sha256, no unlisted
  files, and each network built (arguments bounded first), loaded strictly (finite
  weights) and test-run on a small zero image. `list_packages` and `open_package` give
  the same verdict (remembered per state of the files), so a damaged package is never
  listed as ok and never reaches segmentation;
- `install`: install from a ``.zip`` or an ``https://`` URL (sha256, safe extraction, the
  package verified before it is moved into place), remove; both work in locked staging
  folders that are cleaned up on errors and signals, and stale ones are cleared later;
- `build`: create a package from weights, zip it reproducibly.

Everything public is available from ``segcore.packages`` itself; the search
path is decided in `registry` alone (tests move the bundled folder by replacing
`registry.bundled_models_dir`). Importing it is cheap: torch,
safetensors, tqdm, urllib and jsonschema are imported inside the functions that
need them, and nothing touches the network unless an install from a URL is asked for.
"""

from segcore.packages import build, install, manifest, registry
from segcore.packages.build import create_package, zip_package
from segcore.packages.install import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TIMEOUT_S,
    MAX_ARCHIVE_ENTRIES,
    install_package,
    normalise_sha256,
    remove_package,
)
from segcore.packages.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    NAME_PATTERN,
    SCHEMA_FILE,
    SCHEMA_VERSION,
    TASKS,
    UNSAFE_SUFFIXES,
    WEIGHTS_SUFFIX,
    InputSpec,
    Stage,
    manifest_problems,
    manifest_schema,
    read_manifest,
    validate_manifest,
)
from segcore.packages.registry import (
    HOME_ENV,
    ModelPackage,
    PackageEntry,
    VerifyReport,
    bundled_models_dir,
    clear_stale_staging,
    default_home,
    find_package,
    list_packages,
    load_stage_weights,
    open_package,
    prostateseg_home,
    search_path,
    sha256_file,
    user_models_dir,
    verify_package,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEOUT_S",
    "HOME_ENV",
    "MANIFEST_NAME",
    "MAX_ARCHIVE_ENTRIES",
    "MAX_MANIFEST_BYTES",
    "NAME_PATTERN",
    "SCHEMA_FILE",
    "SCHEMA_VERSION",
    "TASKS",
    "UNSAFE_SUFFIXES",
    "WEIGHTS_SUFFIX",
    "InputSpec",
    "ModelPackage",
    "PackageEntry",
    "Stage",
    "VerifyReport",
    "build",
    "bundled_models_dir",
    "clear_stale_staging",
    "create_package",
    "default_home",
    "find_package",
    "install",
    "install_package",
    "list_packages",
    "load_stage_weights",
    "manifest",
    "manifest_problems",
    "manifest_schema",
    "normalise_sha256",
    "open_package",
    "prostateseg_home",
    "read_manifest",
    "registry",
    "remove_package",
    "search_path",
    "sha256_file",
    "user_models_dir",
    "validate_manifest",
    "verify_package",
    "zip_package",
]
