"""Command lines of the tiny training runs the training tests start, and using what they make."""

import SimpleITK as sitk


def run_args(tmp_path, settings, options=()) -> list[str]:
    """A training script's arguments: the run folder ``tmp_path/run``, a cache of prepared cases shared by
    the tests (beside ``tmp_path``), each of ``settings`` as ``--set KEY=VALUE``, then ``options``."""
    args = ["--output", str(tmp_path / "run"), "--set", f"cache={tmp_path.parent / 'training-cache'}"]
    for item in settings:
        args += ["--set", item]
    return args + list(options)


def install_and_segment(package, folder, command: str):
    """Zip a trained package, install it as a user would (sha256 checked), segment a 96-matrix phantom with
    it by `prostateseg COMMAND`; the phantom and the output folder."""
    from segcore import packages
    from segcore.cli import main as cli
    from segcore.phantom import make_phantom

    archive = packages.zip_package(package.path, folder / "tiny.zip")
    assert cli(["models", "install", str(archive), "--sha256", packages.sha256_file(archive)]) == 0
    case = make_phantom(21, matrix=96, orientation="RAS")
    sitk.WriteImage(case.ct, str(folder / "p_ct.nii.gz"))
    out = folder / "seg"
    assert cli(["-q", command, str(folder / "p_ct.nii.gz"), "-o", str(out), "--model", package.name]) == 0
    return case, out
