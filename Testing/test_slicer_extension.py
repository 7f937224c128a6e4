"""Static checks of the Slicer extension tree (the Slicer application cannot run here).

- every widget name the module code uses exists in its .ui, and every bound
  parameter name is a field of the module's parameter node;
- CMake lists every shipped file, and every listed file exists;
- module files import nothing non-standard at module scope, and importing the
  console logic loads neither torch nor numpy (nothing runs at import time);
- the Slicer-side requirements agree with pyproject.toml.
"""

import ast
import re
import subprocess
import sys
from xml.etree import ElementTree

import pytest
import tomllib
from conftest import ROOT

MODULES = ["ProstateSeg", "HMRNetOrgans"]
SHARED_LIB = ROOT / "ProstateSeg" / "ProstateSegLib"   # the panel and logic every module uses
# What a module file may import at module scope: the standard library, what Slicer
# provides, the extension's own shared library and segcore's error classes.
ALLOWED_ROOTS = set(sys.stdlib_module_names) | {"vtk", "qt", "ctk", "slicer", "ProstateSegLib"}
ALLOWED_SEGCORE = {"segcore.errors"}


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.DOTALL)
    assert match, f"{variable} not set"
    return match.group(1).split()


def module_python_files(module: str) -> list[str]:
    folder = ROOT / module
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py")
                  if "Testing" not in p.relative_to(folder).parts and "__pycache__" not in p.parts)


@pytest.mark.parametrize("module", MODULES)
def test_widget_names_used_in_code_exist_in_the_ui(module):
    ui = ElementTree.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    names = {w.get("name") for w in ui.iter("widget")}
    used = set()
    for path in [ROOT / module / f"{module}.py", *SHARED_LIB.glob("*.py")]:
        used |= set(re.findall(r"(?:self|widget)\.ui\.(\w+)", path.read_text()))  # panel code and self-tests
    from_lists = set(re.findall(r'"(\w+)"', (SHARED_LIB / "widgets.py").read_text()
                                .split("REQUIRED_WIDGETS = (")[1].split(")")[0]))
    assert used, "no widget use found: the check is broken"
    assert not (used | from_lists) - names, f"used in code but missing from {module}.ui"

    fields = set()
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == f"{module}ParameterNode":
            fields = {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    bound = {p.find("string").text for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and not bound - fields, f"{module}.ui binds parameters the parameter node lacks"


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_every_shipped_file(module):
    text = (ROOT / module / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", module)
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert sorted(scripts) == module_python_files(module)
    shipped = sorted(str(p.relative_to(ROOT / module)) for p in (ROOT / module / "Resources").rglob("*") if p.is_file())
    assert sorted(resources) == shipped
    assert f"slicer_add_python_unittest(SCRIPT {module}.py)" in text
    for tests_cmake in (ROOT / module / "Testing").rglob("CMakeLists.txt"):
        for script in re.findall(r"SCRIPT (\S+)\)", tests_cmake.read_text()):
            assert (tests_cmake.parent / script).is_file(), script


def test_top_level_cmake_is_an_extension_shipping_segcore_training_and_models():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "project(ProstateSeg)" in text and 'set(EXTENSION_DEPENDS "PyTorch")' in text
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert f"set(EXTENSION_{key} " in text
    assert re.findall(r"add_subdirectory\((\w+)\)", text) == MODULES
    segcore = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "segcore").rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(cmake_list(text, "SEGCORE_PYTHON_SCRIPTS")) == segcore
    # Improve the model runs `python -m training.finetune` beside segcore in the installed extension
    training = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "training").rglob("*.py")
                      if "__pycache__" not in p.parts)
    assert "training/finetune.py" in training and "training/losses/__init__.py" in training
    assert sorted(cmake_list(text, "TRAINING_PYTHON_SCRIPTS")) == training
    assert 'SCRIPTS "${TRAINING_PYTHON_SCRIPTS}"' in text
    models = [str(p.relative_to(ROOT)) for p in (ROOT / "Resources" / "Models").rglob("*") if p.is_file()]
    schema = "segcore/packages/model_package.schema.json"
    names = "segcore/dicom/structure_names.yaml"  # the ROI-name synonyms, read by Export to DICOM
    assert (ROOT / schema).is_file() and (ROOT / names).is_file()
    assert sorted(cmake_list(text, "SEGCORE_DATA_FILES")) == sorted([*models, schema, names])
    assert (ROOT / "Resources" / "Icons" / "ProstateSegExtension.png").is_file()
    assert (ROOT / "LICENSE").is_file()


def module_scope_imports(path):
    """(module name, line) of every import executed when the file is imported."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(("." * node.level + (node.module or ""), node.lineno))
    return found


@pytest.mark.parametrize("module", MODULES)
def test_module_files_import_nothing_heavy_at_module_scope(module):
    files = [ROOT / module / f"{module}.py", *sorted(SHARED_LIB.glob("*.py")),
             *sorted((ROOT / module / "Testing" / "Python").glob("*.py"))]
    for path in files:
        for name, line in module_scope_imports(path):
            if name.startswith("segcore"):
                assert name in ALLOWED_SEGCORE, f"{path.name}:{line} imports {name} at module scope"
            else:
                assert name.split(".")[0] in ALLOWED_ROOTS, f"{path.name}:{line} imports {name} at module scope"


def test_importing_the_console_logic_loads_nothing_heavy():
    code = ("import sys; sys.path.insert(0, 'ProstateSeg'); "
            "import ProstateSegLib.logic, ProstateSegLib.dependencies, ProstateSegLib.sampledata; "
            "print(sorted({'torch', 'numpy', 'SimpleITK', 'vtk', 'slicer'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def class_methods(tree, name):
    """The names of the methods a class defines, and the class node (None when absent)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {item.name for item in node.body if isinstance(item, ast.FunctionDef)}, node
    return set(), None


@pytest.mark.parametrize("module", MODULES)
def test_self_tests_use_the_shared_mixin_and_run_every_test(module):
    """The self-tests cannot run here: check that each module's test class takes the shared helpers
    and tests from SelfTestMixin, and that runTest's list names every test, each once."""
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    own, test_class = class_methods(tree, f"{module}Test")
    assert test_class is not None
    assert [ast.unparse(base) for base in test_class.bases] == ["SelfTestMixin", "ScriptedLoadableModuleTest"]
    shared, mixin = class_methods(ast.parse((SHARED_LIB / "selftest.py").read_text()), "SelfTestMixin")
    assert mixin is not None and "runTest" in shared and "runTest" not in own
    settings = {item.targets[0].id: ast.literal_eval(item.value) for item in test_class.body
                if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name)}
    assert settings["moduleName"] == module
    listed = list(settings["selfTests"])
    defined = {name for name in own | shared if name.startswith("test_")}
    assert len(listed) == len(set(listed)) and set(listed) == defined


def test_sample_data_is_registered_once_after_startup():
    """ProstateSeg registers the phantom when Slicer has started (nothing at import); HMRNetOrgans does not
    register it again."""
    source = (ROOT / "ProstateSeg" / "ProstateSeg.py").read_text()
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in source
    assert "from ProstateSegLib.sampledata import registerSampleData" in source
    assert "registerSampleData" not in (ROOT / "HMRNetOrgans" / "HMRNetOrgans.py").read_text()
    for module in MODULES:  # nothing but definitions, imports and the docstring at module scope
        for node in ast.parse((ROOT / module / f"{module}.py").read_text()).body:
            assert isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)) or (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)), f"{module}.py:{node.lineno}"


def test_slicer_requirements_match_pyproject():
    sys.path.insert(0, str(ROOT / "ProstateSeg"))
    from ProstateSegLib import dependencies

    declared = {re.split(r"[<>=!~ ]", r, maxsplit=1)[0]: r for r in
                tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for requirement in dependencies.requirements():
        name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0]
        assert declared.get(name, "").replace(" ", "") == requirement, requirement
    # every other run-time dependency is shipped by Slicer or comes through the PyTorch extension, or
    # serves only the command line (the DICOM node, `prostateseg serve`, does not run inside Slicer)
    provided = {"torch", "numpy", "SimpleITK", "vtk", "scipy"}
    command_line_only = {"pynetdicom"}
    assert set(declared) - provided - command_line_only == {
        re.split(r"[<>=]", r)[0] for r in dependencies.requirements()}


def test_missing_requirements_are_found(tmp_path):
    sys.path.insert(0, str(ROOT / "ProstateSeg"))
    from ProstateSegLib import dependencies

    listed = tmp_path / "requirements.txt"
    listed.write_text("# comment\nsafetensors>=0.1\nno-such-package-xyz>=1\nslicerio>=999\n")
    assert dependencies.missingRequirements(listed) == ["no-such-package-xyz>=1", "slicerio>=999"]


def test_installs_pin_what_is_installed():
    """pip gets every installed distribution as a constraint, so installing highdicom (say) can never
    upgrade Slicer's own pydicom or numpy."""
    import importlib.metadata

    sys.path.insert(0, str(ROOT / "ProstateSeg"))
    from ProstateSegLib import dependencies

    pins = dependencies.installedPins()
    assert f"numpy=={importlib.metadata.version('numpy')}" in pins
    assert f"pydicom=={importlib.metadata.version('pydicom')}" in pins
    names = [p.split("==")[0].lower() for p in pins]
    assert len(names) == len(set(names)) and all("==" in p for p in pins)


@pytest.mark.parametrize("module", MODULES)
def test_export_to_dicom_is_in_the_outputs_section(module):
    """Both panels offer Export to DICOM in Outputs: RTSTRUCT and DICOM SEG boxes (ticked), an output
    folder and the button, which the shared panel code connects to the logic's exportDicom."""
    ui = ElementTree.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    (outputs,) = [w for w in ui.iter("widget") if w.get("name") == "outputsCollapsibleButton"]
    inside = {w.get("name"): w for w in outputs.iter("widget")}
    for name, kind in (("rtstructCheckBox", "QCheckBox"), ("dicomSegCheckBox", "QCheckBox"),
                       ("dicomFolderPathLineEdit", "ctkPathLineEdit"), ("exportDicomButton", "QPushButton")):
        assert name in inside and inside[name].get("class") == kind, name

    def prop(widget, key):
        for p in widget.findall("property"):
            if p.get("name") == key:
                return "".join(p.itertext()).strip()
        return None

    assert prop(inside["exportDicomButton"], "text") == "Export to DICOM"
    assert [prop(inside[n], "text") for n in ("rtstructCheckBox", "dicomSegCheckBox")] == ["RTSTRUCT", "DICOM SEG"]
    assert all(prop(inside[n], "checked") == "true" for n in ("rtstructCheckBox", "dicomSegCheckBox"))
    assert "ctkPathLineEdit::Dirs" in prop(inside["dicomFolderPathLineEdit"], "filters")

    widgets = (SHARED_LIB / "widgets.py").read_text()
    assert 'self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicom)' in widgets
    assert "self.logic.exportDicom(segmentation, volume, folder, formats=formats" in widgets
    _, logic_class = class_methods(ast.parse((SHARED_LIB / "logic.py").read_text()), "SegmentationLogicBase")
    (export,) = [f for f in logic_class.body if isinstance(f, ast.FunctionDef) and f.name == "exportDicom"]
    arguments = [a.arg for a in export.args.args]
    assert arguments[:5] == ["self", "segmentationNode", "volumeNode", "folder", "formats"]
    assert ast.literal_eval(export.args.defaults[0]) == ("rtstruct", "dicom-seg")
