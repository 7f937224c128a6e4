"""Making packages: writing a package folder from weights and a manifest, and zipping it
reproducibly for publication. torch and safetensors are imported only when a package is made.
"""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path

from segcore import anatomy
from segcore.errors import ModelPackageError, OutputExistsError
from segcore.files import atomic_folder, atomic_output, write_json
from segcore.packages.manifest import MANIFEST_NAME, SCHEMA_VERSION, _file_name_problems, validate_manifest
from segcore.packages.registry import _CHUNK, ModelPackage, sha256_file, verify_package


def create_package(folder: str | Path, manifest: dict, weights: dict, *, overwrite: bool = False) -> ModelPackage:
    """Write a new package folder: one safetensors file per ``weights`` entry plus model.json.

    ``weights`` maps file names (``*.safetensors``) to ``{tensor name: torch.Tensor}``.
    ``manifest`` is model.json without ``files`` (computed here); ``schema_version``
    defaults to the current one and labels may be given as `anatomy.Structure`.
    The folder is assembled beside its final place and renamed in, so it is
    either complete or absent.
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:  # worded for API and Slicer users, who have no --overwrite
        raise OutputExistsError(f"{folder} exists; choose another folder or ask to overwrite it.")
    data = dict(manifest)
    data.setdefault("schema_version", SCHEMA_VERSION)
    data["labels"] = [s.to_json() if isinstance(s, anatomy.Structure) else s for s in data.get("labels", [])]
    try:  # a JSON round trip turns tuples into lists and finds values JSON cannot hold
        data = json.loads(json.dumps(data, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ModelPackageError(f"the manifest for {folder} cannot be written as JSON: {error}") from None
    problems = []
    for fname, tensors in weights.items():
        problems += _file_name_problems(fname, "weights")
        if not isinstance(tensors, dict) or not tensors:
            problems.append(f"weights[{fname!r}] must be a non-empty dict of tensors")
        elif not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            problems.append(f"weights[{fname!r}] must map tensor names (texts) to torch tensors")
    if problems:
        raise ModelPackageError(f"cannot create the model package: {'; '.join(problems)}.")
    # Placeholder hashes let the manifest be checked before anything is written.
    data["files"] = {fname: "0" * 64 for fname in weights}
    validate_manifest(data, source=f"manifest for {folder}")

    with atomic_folder(folder, overwrite=overwrite) as staging:
        for fname, tensors in weights.items():
            # save_file needs contiguous CPU tensors that share no memory (tied weights do).
            plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
            save_file(plain, str(staging / fname), metadata={"format": "pt"})
            data["files"][fname] = sha256_file(staging / fname)
        write_json(staging / MANIFEST_NAME, data, sync=True)
        ModelPackage.load(staging)
    return ModelPackage.load(folder)


def zip_package(folder: str | Path, archive: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Verify a package folder and pack it as ``<archive>`` (default ``<name>-<version>.zip`` beside it).

    Entries sit under one top-level folder named after the package, in a fixed
    order with fixed timestamps, so the same package always gives the same
    archive and the same sha256 (publish it with `sha256_file`).
    """
    report = verify_package(folder)
    if not report.ok:
        raise ModelPackageError(f"refusing to zip the damaged package {report.path}: {'; '.join(report.problems)}")
    package = ModelPackage.load(folder)
    archive = Path(archive) if archive is not None else package.path.parent / f"{package.name}-{package.version}.zip"
    if archive.exists() and not overwrite:
        raise OutputExistsError(f"{archive} exists; choose another name or ask to overwrite it.")
    with atomic_output(archive, overwrite=overwrite) as tmp, \
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for fname in [MANIFEST_NAME, *sorted(package.files)]:
            info = zipfile.ZipInfo(f"{package.name}/{fname}", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(package.path / fname, "rb") as src, zf.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    return archive
