"""Installing what segcore needs inside Slicer, on first use and only after asking.

torch comes through the PyTorch extension (PyTorchUtils), which picks a CUDA or
CPU build for the machine; the other packages (Resources/requirements.txt) go
through Slicer's own pip. Packages Slicer ships are never touched.
"""

import importlib.metadata
from pathlib import Path

from segcore.errors import SegcoreError

TORCH_REQUIREMENT = ">=2.3"
REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"


class DependencyError(SegcoreError):
    """A package segcore needs is missing and was not installed."""


def requirements(path=REQUIREMENTS_FILE):
    """The requirement lines of a requirements.txt (comments and blanks dropped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def missingRequirements(path=REQUIREMENTS_FILE):
    """The requirements not satisfied by what is installed."""
    from packaging.requirements import Requirement  # ships with Slicer

    missing = []
    for line in requirements(path):
        requirement = Requirement(line)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def installedPins():
    """`name==version` for every installed distribution: as pip constraints they let pip add packages but
    never upgrade or downgrade one Slicer already has (a new highdicom may not pull a newer pydicom)."""
    pins = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            pins[name.lower()] = f"{name}=={distribution.version}"
    return sorted(pins.values())


def pipInstallKeepingInstalled(packages):
    """Install `packages` with Slicer's pip, every installed distribution pinned (`installedPins`)."""
    import tempfile

    import slicer

    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "installed.txt"
        constraints.write_text("\n".join(installedPins()) + "\n", encoding="utf-8")
        slicer.util.pip_install(["--constraint", str(constraints), *packages])


def _installFailed(still):
    return DependencyError("installing failed for: " + ", ".join(still) + ". Slicer's own packages are kept as "
                           "they are, so a package that needs newer versions of them cannot be added; see the "
                           "Python console for pip's messages.")


def torchLogic():
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise DependencyError(
            "ProstateSeg needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
            "restart Slicer and try again.") from None
    return PyTorchUtils.PyTorchUtilsLogic()


def torchInstalled():
    try:
        return torchLogic().torchInstalled()
    except DependencyError:
        return False


def cudaAvailable():
    """True when an installed torch sees a CUDA GPU (never installs anything)."""
    if not torchInstalled():
        return False
    import torch

    return bool(torch.backends.cuda.is_built() and torch.cuda.is_available())


def ensureDependencies(askConfirmation=True):
    """Install torch and the missing packages, after asking; raise DependencyError if declined or failed."""
    import slicer

    missing = missingRequirements()
    needTorch = not torchInstalled()
    if not missing and not needTorch:
        return
    logic = torchLogic() if needTorch else None
    wanted = (["torch (through the PyTorch extension)"] if needTorch else []) + missing
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "ProstateSeg needs these Python packages, which are not installed yet:\n\n  "
            + "\n  ".join(wanted) + "\n\nInstall them now? This downloads about 200 MB-2 GB and may take "
            "several minutes; Slicer's own packages are not changed.",
            windowTitle="ProstateSeg: install packages"):
        raise DependencyError("the packages ProstateSeg needs were not installed: " + ", ".join(wanted))
    if needTorch:
        torch = logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise DependencyError("PyTorch was not installed; ProstateSeg cannot run without it.")
    if missing:
        pipInstallKeepingInstalled(missing)
    still = missingRequirements()
    if still:
        raise _installFailed(still)


def ensureRequirements(askConfirmation=True):
    """Install the small packages of requirements.txt (not torch), after asking; raise DependencyError if
    declined or failed. Offered when a panel opens: reading and checking model packages needs them
    (jsonschema), running a model also needs torch, which the first Segment installs."""
    import slicer

    missing = missingRequirements()
    if not missing:
        return
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "ProstateSeg reads and checks its model packages with these Python packages, which are not "
            "installed yet:\n\n  " + "\n  ".join(missing) + "\n\nInstall them now? This downloads a few MB; "
            "Slicer's own packages are not changed. (PyTorch is installed on the first Segment.)",
            windowTitle="ProstateSeg: install packages"):
        raise DependencyError("the packages ProstateSeg needs were not installed: " + ", ".join(missing))
    pipInstallKeepingInstalled(missing)
    still = missingRequirements()
    if still:
        raise _installFailed(still)

