"""The Slicer module's files outside Slicer: every widget the code uses exists in the .ui file, the
parameter-node bindings fit Slicer's widget connectors, the panel's defaults and method list are the
engine's, and nothing heavy is needed to load the module."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import tomllib

REPOSITORY = Path(__file__).resolve().parents[1]
MODULE = REPOSITORY / "SlicerEntropyMerge"
SOURCE = (MODULE / "SlicerEntropyMerge.py").read_text(encoding="utf-8")
GUI = MODULE / "SlicerEntropyMergeGui"  # the panel's parts that the module file uses
PANEL_SOURCES = [SOURCE, *(path.read_text(encoding="utf-8") for path in sorted(GUI.glob("*.py")))]
PARAMETERS = (GUI / "parameters.py").read_text(encoding="utf-8")
UI = ElementTree.parse(MODULE / "Resources" / "UI" / "SlicerEntropyMerge.ui")

# The widget classes Slicer's parameterNodeWrapper connects to each kind of parameter (guiConnectors.py).
CONNECTABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QLineEdit", "QTextEdit"},
    "enum": {"QComboBox"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}


def ui_widgets() -> dict[str, str]:
    return {widget.get("name"): widget.get("class") for widget in UI.iter("widget")}


def parameter_fields() -> dict[str, str]:
    """Each field of the parameter node class and its kind (bool, int, float, str, enum, node, list)."""
    tree = ast.parse(PARAMETERS)
    enums = {node.name for node in tree.body if isinstance(node, ast.ClassDef)
             and any(getattr(base, "attr", getattr(base, "id", "")) == "Enum" for base in node.bases)}
    enums |= {node.targets[0].id for node in tree.body if isinstance(node, ast.Assign)  # Name = enum.Enum(...)
              and isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "enum.Enum"}
    wrapper = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name.endswith("ParameterNode"))
    fields = {}
    for statement in wrapper.body:
        if isinstance(statement, ast.AnnAssign):
            annotation = ast.unparse(statement.annotation)
            base = re.sub(r"^Annotated\[(\w+),.*\]$", r"\1", annotation)
            if "vtkMRML" in annotation:
                kind = "node"
            elif base in enums:
                kind = "enum"
            elif base.startswith("list"):
                kind = "list"
            else:
                kind = base
            fields[statement.target.id] = kind
    return fields


def test_every_widget_the_module_uses_exists_in_the_ui_file():
    used = {name for source in PANEL_SOURCES for name in re.findall(r"\bui\.(\w+)", source)}
    assert {"applyButton", "modelsTable", "coefficientsTableView", "caseLabel"} <= used, "the module reads no widgets?"
    missing = sorted(used - set(ui_widgets()))
    assert not missing, f"widgets used in the module (or SlicerEntropyMergeGui) but absent from the .ui file: {missing}"


def test_parameter_bindings_name_fields_and_fit_the_widget_connectors():
    fields = parameter_fields()
    widgets = ui_widgets()
    bound = {}
    for widget in UI.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    assert set(bound) <= set(fields), f"bound to no parameter: {sorted(set(bound) - set(fields))}"
    for name, widget_class in bound.items():
        assert widget_class in CONNECTABLE[fields[name]], f"{name} ({fields[name]}) cannot be shown by a {widget_class}"
    assert {"inputVolume", "method", "temperature", "device", "outputSegmentation", "referenceLabels"} <= set(bound)
    assert widgets["applyButton"] == "QPushButton" and widgets["progressBar"] == "QProgressBar"


def test_ui_sections_are_collapsible():
    widgets = ui_widgets()
    for section in ("inputsCollapsibleButton", "methodCollapsibleButton", "outputsCollapsibleButton",
                    "resultsCollapsibleButton", "casesCollapsibleButton"):
        assert widgets[section] == "ctkCollapsibleButton"
    assert widgets["logCollapsibleGroupBox"] == widgets["advancedCollapsibleGroupBox"] == "ctkCollapsibleGroupBox"


def test_requirements_match_the_engine_dependencies():
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text(encoding="utf-8"))
    requirements = [line.strip() for line in (MODULE / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.startswith("#")]
    assert requirements == pyproject["project"]["dependencies"]


# Stand-ins for what only the Slicer application has (the slicer-core wheel has the MRML nodes and slicer.util):
# Qt, the translator, and the parameter-node decorator, which here leaves the class as it is (its defaults are
# plain class attributes). Run with ``modules`` bound to the module table to fill.
SLICER_APP_STANDINS = """
import types
qt = types.ModuleType("qt")
i18n = types.ModuleType("slicer.i18n")
i18n.tr = lambda text: text
wrapper = types.ModuleType("slicer.parameterNodeWrapper")
wrapper.parameterNodeWrapper = lambda cls: cls
wrapper.WithinRange = lambda low, high: None
modules.update({"qt": qt, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper})
"""


def run_without(blocked: tuple[str, ...], code: str, slicer_app_standins: bool = False) -> list[str]:
    """Run ``code`` in a fresh Python whose ``blocked`` modules cannot be imported (and, with
    ``slicer_app_standins``, with ``SLICER_APP_STANDINS``); returns its printed words."""
    setup = f"import sys; sys.modules.update(dict.fromkeys({blocked!r}));"
    if slicer_app_standins:
        setup += "modules = sys.modules\n" + SLICER_APP_STANDINS
    result = subprocess.run([sys.executable, "-c", setup + "\n" + code], capture_output=True, text=True, cwd=MODULE, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_module_load_needs_none_of_the_packages_it_installs_later():
    # What Slicer imports at start-up (the Lib; the engine's sample list for Sample Data) must not need
    # torch, MONAI, nibabel or the other packages that the module installs on first use.
    blocked = ("torch", "monai", "nibabel", "safetensors", "yaml", "matplotlib", "tqdm")
    printed = run_without(blocked, "import SlicerEntropyMergeLib.job, SlicerEntropyMergeLib.cases, SlicerEntropyMergeLib.engine;"
                                   "from entropymerge.sampledata import bundled_targets, bundled_models;"
                                   "from entropymerge.methods import METHODS;"
                                   "print(len(bundled_targets()), bundled_models().name, len(METHODS))")
    assert printed == ["2", "dropgen", "6"]


def test_the_panel_parts_load_without_the_packages_installed_later():
    # The module file imports every part of SlicerEntropyMergeGui when Slicer loads it.
    pytest.importorskip("slicer", reason="the slicer-core wheel (test extra) provides the MRML node classes")
    blocked = ("torch", "monai", "nibabel", "safetensors", "yaml", "matplotlib", "tqdm")
    parts = sorted(path.stem for path in GUI.glob("*.py") if path.stem != "__init__")
    assert parts == ["logic", "parameters", "samples", "selftest", "sitemodels", "views"]
    printed = run_without(blocked, f"import importlib\nfor part in {parts!r}: importlib.import_module('SlicerEntropyMergeGui.' + part)\n"
                                   "print('loaded')", slicer_app_standins=True)
    assert printed == ["loaded"]


def test_sample_registration_at_slicer_start_imports_only_the_standard_library():
    # Finding 12: registerSampleData runs at every Slicer start; it lists two files and must not import numpy,
    # scipy or SimpleITK (nor anything the module installs later) to do it.
    assert 'slicer.app.connect("startupCompleted()", register_sample_data)' in SOURCE
    tree = ast.parse((GUI / "samples.py").read_text(encoding="utf-8"))
    register = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "register_sample_data")
    imported = {node.module for node in ast.walk(register) if isinstance(node, ast.ImportFrom)}
    assert imported == {"entropymerge.samplefiles"}
    blocked = ("numpy", "scipy", "SimpleITK", "torch", "monai", "nibabel", "safetensors", "yaml", "matplotlib", "tqdm")
    printed = run_without(blocked, "from entropymerge.samplefiles import bundled_targets, bundled_models;"
                                   "print(*[t.name for t in bundled_targets()], bundled_models().name)")
    assert printed == ["lowfield-t1", "t2-fatsat", "dropgen"]


def test_the_help_links_to_the_extension_documentation_and_the_self_test_is_registered():
    # Finding 11 (the default link points to a core-module page that does not exist) and finding 9.
    assert "getDefaultModuleDocumentationLink" not in SOURCE
    assert 'DOCUMENTATION_URL = "https://github.com/SlicerEntropyMerge/SlicerEntropyMerge#use-in-3d-slicer"' in SOURCE
    readme = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    assert "\n## Use in 3D Slicer\n" in readme
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"if\(BUILD_TESTING\)\s*(#[^\n]*\n\s*)*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)\s*endif\(\)", cmake)
    extension = (REPOSITORY / "CMakeLists.txt").read_text(encoding="utf-8")
    screenshot = re.search(r'set\(EXTENSION_SCREENSHOTURLS "(.+?)"\)', extension).group(1)
    assert screenshot.endswith("/main/Resources/Screenshots/report.png") and (REPOSITORY / "Resources/Screenshots/report.png").is_file()


@pytest.fixture
def panel_parameters(monkeypatch):
    """A function that imports ``SlicerEntropyMergeGui.parameters`` anew (its ``Method`` enum reads the method
    registry at import), with ``SLICER_APP_STANDINS``."""
    pytest.importorskip("slicer", reason="the slicer-core wheel (test extra) provides the MRML node classes")
    standins = {}
    exec(SLICER_APP_STANDINS, {"modules": standins})
    for name, module in standins.items():
        monkeypatch.setitem(sys.modules, name, module)

    def load():
        sys.modules.pop("SlicerEntropyMergeGui.parameters", None)
        return importlib.import_module("SlicerEntropyMergeGui.parameters")

    yield load
    sys.modules.pop("SlicerEntropyMergeGui.parameters", None)


def default_panel(parameters, **choices):
    """The parameter node's values as a new scene starts them (the class defaults), with some site models."""
    node = parameters.SlicerEntropyMergeParameterNode
    values = {name: getattr(node, name) for name in node.__annotations__ if hasattr(node, name)}
    return type("Panel", (), {**values, "modelPaths": ["north.json", "south.json"], **choices})()


def engine_arguments(argv: list[str]):
    """``argv`` (an ``entropymerge`` command line) as the engine's own parser reads it."""
    from entropymerge.cli import build_parser

    return build_parser().parse_args(argv)


def test_every_slicer_default_is_the_engines(panel_parameters):
    from entropymerge.settings import RunOptions
    from SlicerEntropyMergeLib.engine import RunRequest

    parameters = panel_parameters()
    request = parameters.run_request(default_panel(parameters))
    assert request == RunRequest(models=["north.json", "south.json"])  # the panel's defaults are the Lib's
    run = engine_arguments(["run", "--volume", "case.nrrd", "--out", "out", *request.option_arguments()])
    defaults = RunOptions(volume=Path("case.nrrd"), models=[])
    for name in ("method", "single_model", "temperature", "decouple_head", "device", "roi_size", "overlap", "probe_patches",
                 "adapt", "adapt_steps", "adapt_lr", "per_model", "rank", "unlabelled_value"):
        assert getattr(run, name) == getattr(defaults, name), name
    node = parameters.SlicerEntropyMergeParameterNode
    assert (node.temperature, node.probePatches, node.method.value) == (defaults.temperature, defaults.probe_patches, defaults.method)
    from SlicerEntropyMergeLib.scene import UNLABELLED

    assert UNLABELLED == defaults.unlabelled_value  # what unpainted scribble voxels are written as
    from entropymerge.settings import ADAPT_METHODS

    assert [a.value for a in parameters.Adaptation] == list(ADAPT_METHODS)  # the engine's list, not a copy
    assert [a.label() for a in parameters.Adaptation] == ["none", "TENT", "DSBR (collapse-safe)"]


def test_a_registered_merge_method_reaches_the_panel_and_the_engine_command_line(panel_parameters):
    from entropymerge.methods import METHODS, MergeMethod, register, unregister
    from SlicerEntropyMergeLib.engine import run_process

    parameters = panel_parameters()
    assert [m.value for m in parameters.Method] == [m.name for m in METHODS.values() if not m.needs_reference]
    assert [m.value for m in parameters.Method] == ["adaptive", "mean", "ensemble", "single", "select"]
    assert parameters.Method.adaptive.label() == "entropy-adaptive merge"
    register(MergeMethod("registry-test", "registry test method", "test", combine="average"))
    try:
        parameters = panel_parameters()
        method = parameters.Method["registry-test"]
        assert method.label() == "registry test method"
        request = parameters.run_request(default_panel(parameters, method=method))
        argv = run_process(request, "case.nrrd", "out", python="python").arguments
        assert argv[argv.index("--method") + 1] == "registry-test"
        assert engine_arguments(argv[3:]).method == "registry-test"
    finally:
        unregister("registry-test")
    assert "registry-test" not in [m.value for m in panel_parameters().Method]
