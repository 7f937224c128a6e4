"""The wheel is a working install on its own: it carries the bundled models and the
manifest schema, and the installed code finds them inside itself, not in the checkout.

Built without network (no build isolation: setuptools comes from the dev extras) from a
copy of the package sources, so the checkout gets no build/ folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT

import segcore

BUNDLED = ["organs-hmrnet-demo", "prostate-hfunet-demo", "prostate-hmedn-demo", "prostate-metricunet-demo", "refine-demo"]
SCHEMA = "segcore/packages/model_package.schema.json"


def pip(*args, cwd):
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *map(str, args)]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_wheel_carries_the_models_and_runs_from_its_install(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "segcore", source / "segcore", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(ROOT / "Resources" / "Models", source / "Resources" / "Models")  # -> segcore/models

    pip("wheel", source, "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("prostateseg-*.whl")
    assert wheel.name.startswith(f"prostateseg-{segcore.__version__}-")  # the version is segcore's
    models = ROOT / "Resources" / "Models"
    expected = {f"segcore/models/{p.relative_to(models).as_posix()}" for p in models.rglob("*") if p.is_file()}
    assert {f"segcore/models/{name}/model.json" for name in BUNDLED} <= expected
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert expected <= names, sorted(expected - names)
    assert SCHEMA in names

    site = tmp_path / "site"
    pip("install", "--no-deps", "--no-index", "--target", site, wheel, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PROSTATESEG_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "segcore.cli", "models", "list"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}
    for name in BUNDLED:
        assert listed[name][-2:] == ["bundled", "ok"], out.stdout
    assert f"bundled: {site / 'segcore' / 'models'}" in out.stdout, out.stdout
    assert str(ROOT) not in out.stdout
