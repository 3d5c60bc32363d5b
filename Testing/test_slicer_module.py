"""The Slicer module's files outside Slicer: every widget the code uses exists in the .ui file, the
parameter-node bindings fit Slicer's widget connectors, and nothing heavy is needed to load the module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import tomllib

REPOSITORY = Path(__file__).resolve().parents[1]
MODULE = REPOSITORY / "SlicerEntropyMerge"
SOURCE = (MODULE / "SlicerEntropyMerge.py").read_text(encoding="utf-8")
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
    tree = ast.parse(SOURCE)
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
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert used, "the module reads no widgets?"
    missing = sorted(used - set(ui_widgets()))
    assert not missing, f"widgets used in SlicerEntropyMerge.py but absent from the .ui file: {missing}"


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


def run_without(blocked: tuple[str, ...], code: str) -> list[str]:
    """Run ``code`` in a fresh Python whose ``blocked`` modules cannot be imported; returns its printed words."""
    setup = f"import sys; sys.modules.update(dict.fromkeys({blocked!r}));"
    result = subprocess.run([sys.executable, "-c", setup + code], capture_output=True, text=True, cwd=MODULE, timeout=300)
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


def test_sample_registration_at_slicer_start_imports_only_the_standard_library():
    # Finding 12: registerSampleData runs at every Slicer start; it lists two files and must not import numpy,
    # scipy or SimpleITK (nor anything the module installs later) to do it.
    tree = ast.parse(SOURCE)
    register = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "registerSampleData")
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


def module_method_enum(methods: dict):
    """The module's ``Method`` enum, built by the module's own statements (its label mixin and the enum line)
    against ``methods``; ``_`` (Slicer's translation) is the identity here."""
    import enum

    tree = ast.parse(SOURCE)
    wanted = [node for node in tree.body if (isinstance(node, ast.ClassDef) and node.name == "MethodLabel")
              or (isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "Method")]
    assert len(wanted) == 2, "the module builds its Method enum from the registry with a MethodLabel mixin"
    namespace = {"enum": enum, "METHODS": methods, "_": lambda text: text}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "SlicerEntropyMerge.py", "exec"), namespace)
    return namespace["Method"]


def test_the_module_method_list_is_the_engine_registry():
    from entropymerge.methods import METHODS, MergeMethod, register, unregister

    method = module_method_enum(METHODS)
    assert [m.value for m in method] == [m.name for m in METHODS.values() if not m.needs_reference]
    assert [m.value for m in method] == ["adaptive", "mean", "ensemble", "single", "select"]
    assert method.adaptive.label() == "entropy-adaptive merge"
    register(MergeMethod("registry-test", "registry test method", "test", combine="average"))
    try:
        assert module_method_enum(METHODS)["registry-test"].label() == "registry test method"
    finally:
        unregister("registry-test")
    assert "from entropymerge.methods import METHODS" in SOURCE
