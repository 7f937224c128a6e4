"""Installing a package from a ``.zip`` file or an ``https://`` URL, and removing one.

Installing a package whose name is bundled is refused (the bundled one would
always win); replacing a user package needs ``force=True``. The archive's sha256
is checked before anything is extracted, every entry is checked before it is
written, and nothing is left behind when anything fails: the work happens in a
locked staging folder that is removed on errors, Ctrl-C, SIGTERM and SIGHUP alike,
and one left by a killed process is removed by the next install, remove or list.
A package is installed only if `verify_package` finds nothing wrong with it (which
includes building and test-running its networks, and no unlisted files). Nothing
touches the network unless an install from a URL is asked for; urllib and tqdm
are imported only then.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import sys
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from segcore.errors import ChecksumError, InputNotFoundError, ModelPackageError
from segcore.files import move_into_place
from segcore.packages import registry
from segcore.packages.manifest import _SHA256_PATTERN, MANIFEST_NAME
from segcore.packages.registry import (
    _CHUNK,
    HOME_ENV,
    ModelPackage,
    _available,
    _check_name,
    _load_registered,
    _manifest_or_empty,
    clear_stale_staging,
    remember_verified,
    sha256_file,
    signals_interrupt,
    staging_folder,
    user_models_dir,
)

# Archives and downloads are capped so a hostile or broken source cannot fill the disk.
DEFAULT_MAX_BYTES = 4 << 30
MAX_ARCHIVE_ENTRIES = 10_000
DEFAULT_TIMEOUT_S = 60.0

# Clutter that archivers add; silently skipped on extraction.
_ARCHIVE_JUNK = ("__MACOSX", *registry.OS_JUNK_NAMES)


def normalise_sha256(value) -> str:
    """Accept 'ABC...', 'sha256:abc...' or ' abc... '; return 64 lower-case hex digits or raise."""
    text = str(value or "").strip().lower()
    text = text.removeprefix("sha256:")
    if not _SHA256_PATTERN.fullmatch(text):
        raise ModelPackageError(
            f"the sha256 {value!r} is not 64 hexadecimal digits. A package archive can only be installed "
            "together with the sha256 published by its maker (compute it with `sha256sum` if you made it)."
        )
    return text


def install_package(
    source: str | Path,
    sha256: str,
    *,
    force: bool = False,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ModelPackage:
    """Install a package from a ``.zip`` file or an ``https://`` URL into the user's models folder.

    ``sha256`` is the archive's published hash and is required; it is checked
    before anything is extracted. A name that is bundled is refused; an
    installed user package of the same name is replaced only with ``force``.
    Nothing is left behind when anything fails.
    """
    expected = normalise_sha256(sha256)
    with signals_interrupt():
        text = str(source)
        if "://" in text:
            return _install_from_url(text, expected, force=force, progress=progress, timeout=timeout,
                                     max_bytes=max_bytes)
        return _install_from_file(Path(text).expanduser(), expected, force=force, max_bytes=max_bytes)


def _install_from_file(archive: Path, expected: str, *, force: bool, max_bytes: int) -> ModelPackage:
    if not archive.exists():
        raise InputNotFoundError(f"model package archive {archive} does not exist.")
    if not archive.is_file():
        raise ModelPackageError(f"{archive} is not a file: give the package's .zip archive.")
    try:
        got = sha256_file(archive)
    except OSError as error:
        raise ModelPackageError(f"cannot read {archive} ({error.strerror or error}): check its permissions.") \
            from None
    if got != expected:
        raise ChecksumError(
            f"{archive} does not have the promised sha256: expected {expected}, got {got}. "
            "The archive is damaged, incomplete or not the one published; download it again."
        )
    models = _models_folder()
    with staging_folder(models, "install") as staging:
        return _install_verified_zip(archive, staging, force=force, max_bytes=max_bytes)


def _models_folder() -> Path:
    """The user's models folder, created if needed and cleared of stale staging folders (clear errors)."""
    models = user_models_dir()
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelPackageError(
            f"cannot create the model folder {models} ({error.strerror or error}): set {HOME_ENV} to a folder "
            "you can write to."
        ) from None
    if not models.is_dir():
        raise ModelPackageError(f"the model folder {models} is not a folder: set {HOME_ENV} to a folder you can "
                                "write to.")
    clear_stale_staging(models)
    return models


def remove_package(name: str) -> Path:
    """Delete an installed user package; bundled packages cannot be removed. Returns the removed folder."""
    _check_name(name)
    folder = user_models_dir() / name
    if not folder.is_dir():
        if (registry.bundled_models_dir() / name).is_dir():
            raise ModelPackageError(
                f"model package {name!r} is bundled with ProstateSeg and cannot be removed; "
                "only packages you installed can be."
            )
        raise ModelPackageError(f"no installed model package named {name!r} ({_available()}).")
    # Rename first so a failed delete never leaves something that looks like a package.
    with signals_interrupt(), staging_folder(_models_folder(), "remove") as graveyard:
        try:
            os.rename(folder, graveyard / name)
        except OSError as error:
            raise ModelPackageError(f"cannot remove {folder} ({error.strerror or error}): check the permissions of "
                                    f"{folder.parent}.") from None
    return folder


def _install_verified_zip(archive: Path, staging: Path, *, force: bool, max_bytes: int) -> ModelPackage:
    """Extract, verify and move a package into place; `staging` is removed by the caller."""
    models = staging.parent
    root = _safe_extract(archive, staging / "x", max_bytes=max_bytes)
    report = registry._verify(root, "path", remember=False)
    if not report.ok:
        raise ModelPackageError(f"the archive {archive.name} holds a damaged or unsafe package, so nothing was "
                                f"installed: {'; '.join(p.rstrip('.') for p in report.problems)}. Ask its maker "
                                "for a sound one.")
    package = ModelPackage.load(root)
    if (registry.bundled_models_dir() / package.name).exists():
        raise ModelPackageError(
            f"a model package named {package.name!r} is bundled with ProstateSeg, and a user package "
            "of that name would never be used. Give the package another name in model.json and re-export it."
        )
    target = models / package.name
    if target.exists() and not force:
        installed = _manifest_or_empty(target).get("version", "?")
        raise ModelPackageError(
            f"model package {package.name!r} (version {installed}) is already installed at {target}; "
            "remove it first or install with --force to replace it."
        )
    try:
        move_into_place(root, target, replace=force)
    except OSError as error:  # e.g. another install of the same name finished first
        raise ModelPackageError(f"could not move the package into {target}: {error}. Try again.") from None
    remember_verified(target)
    return _load_registered(target, "user")


def _safe_extract(archive: Path, dest: Path, *, max_bytes: int) -> Path:
    """Extract a package archive into ``dest`` after checking every entry; return the package root.

    Refused: absolute names, drive letters, backslashes, ``..``, symbolic links
    and other special files, names differing only by case, too many entries or
    bytes. The package may sit at the archive root or in one top-level folder.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelPackageError(f"{archive} is not a readable zip archive ({error}).") from None
    with zf:
        members = []
        for info in zf.infolist():
            _check_member(info, archive)
            parts = PurePosixPath(info.filename).parts
            if any(part in _ARCHIVE_JUNK for part in parts) or any(p.startswith("._") for p in parts):
                continue
            members.append((info, parts))
        if len(members) > MAX_ARCHIVE_ENTRIES:
            raise ModelPackageError(f"{archive} has more than {MAX_ARCHIVE_ENTRIES} entries: not a model package.")
        total = sum(info.file_size for info, _ in members)
        if total > max_bytes:
            raise ModelPackageError(f"{archive} would unpack to {total} bytes, more than the limit of {max_bytes}.")
        lowered = [PurePosixPath(*parts).as_posix().lower() for _, parts in members]
        if len(set(lowered)) != len(lowered):
            raise ModelPackageError(f"{archive} has entries whose names differ only by case: refused.")

        files = {parts for info, parts in members if not info.is_dir()}
        if (MANIFEST_NAME,) in files:
            prefix = 0
        else:
            tops = {parts[0] for _, parts in members}
            if len(tops) != 1 or (next(iter(tops)), MANIFEST_NAME) not in files:
                raise ModelPackageError(
                    f"{archive} holds no {MANIFEST_NAME} at its root or in a single top-level folder: "
                    "it is not a model package."
                )
            prefix = 1

        dest.mkdir(parents=True)
        base = dest.resolve()
        for info, parts in members:
            rel = parts[prefix:]
            if not rel:
                continue
            target = dest.joinpath(*rel)
            if not target.resolve().is_relative_to(base):  # belt and braces after the name checks
                raise ModelPackageError(f"{archive}: entry {info.filename!r} would leave the package folder.")
            try:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            except (OSError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error) as error:
                raise ModelPackageError(f"{archive}: cannot extract {info.filename!r} ({error}).") from None
    return dest


def _check_member(info: zipfile.ZipInfo, archive: Path) -> None:
    name = info.filename
    refused = None
    if not name or "\x00" in name:
        refused = "has an empty or invalid name"
    elif info.flag_bits & 0x1:
        refused = "is encrypted"
    elif "\\" in name:
        refused = "contains a backslash"
    elif name.startswith("/"):
        refused = "is an absolute path"
    elif re.match(r"[A-Za-z]:", name):
        refused = "starts with a drive letter"
    elif ".." in PurePosixPath(name).parts:
        refused = "climbs out with '..'"
    else:
        mode = info.external_attr >> 16
        file_type = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            refused = "is a symbolic link"
        elif file_type and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            refused = "is not a plain file or folder"
    if refused:
        raise ModelPackageError(
            f"{archive}: entry {name!r} {refused}; an archive may only hold files inside the package "
            "folder. Refused: nothing was installed."
        )


def _install_from_url(url: str, expected: str, *, force: bool, progress: bool, timeout: float,
                      max_bytes: int) -> ModelPackage:
    from urllib.parse import urlsplit

    scheme = urlsplit(url).scheme.lower()
    if scheme != "https":
        raise ModelPackageError(
            f"only https:// URLs can be installed from, not {scheme}:// ({url}). "
            "Use the https address, or download the .zip yourself and install the file."
        )
    # The download goes into the staging folder, removed whatever happens: the archive itself is never kept.
    with staging_folder(_models_folder(), "install") as staging:
        download = staging / "download.zip"
        try:
            with open(download, "xb") as stream:
                got = _download(url, stream, timeout=timeout, max_bytes=max_bytes, progress=progress)
        except OSError as error:
            raise ModelPackageError(f"cannot save the download from {url} in {staging.parent} "
                                    f"({error.strerror or error}): free some space and try again.") from None
        if got != expected:
            raise ChecksumError(
                f"the download from {url} does not have the promised sha256: expected {expected}, got {got}. "
                "Check the sha256 and the URL with the package's publisher."
            )
        return _install_verified_zip(download, staging, force=force, max_bytes=max_bytes)


def _download(url: str, stream, *, timeout: float, max_bytes: int, progress: bool) -> str:
    """Stream ``url`` into ``stream``; return the sha256 of what was received."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    class HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
        # A redirect must not downgrade to plain http or another scheme.
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if not newurl.lower().startswith("https://"):
                raise ModelPackageError(f"{url} redirects to {newurl}, which is not https: refused.")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    # create_default_context honours SSL_CERT_FILE / SSL_CERT_DIR (institutional CAs).
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl.create_default_context()), HttpsOnlyRedirects()
    )
    digest = hashlib.sha256()
    received = 0
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "prostateseg"}), timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                raise ModelPackageError(f"{url} is {total} bytes, more than the limit of {max_bytes}.")
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", file=sys.stderr,
                      disable=not progress, leave=False) as bar:
                while chunk := resp.read(_CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        raise ModelPackageError(f"{url} sends more than the limit of {max_bytes} bytes: stopped.")
                    digest.update(chunk)
                    stream.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        raise ModelPackageError(f"download of {url} failed: HTTP {error.code} {error.reason}.") from None
    except urllib.error.URLError as error:
        raise ModelPackageError(
            f"could not download {url}: {error.reason}. Check the address and the network; behind an "
            "institutional proxy or TLS inspection, point SSL_CERT_FILE at its CA certificate."
        ) from None
    except TimeoutError:
        raise ModelPackageError(f"download of {url} timed out after {timeout:g} s without data.") from None
    except (OSError, http.client.HTTPException) as error:
        raise ModelPackageError(f"download of {url} failed: {error}.") from None
    return digest.hexdigest()
