"""Slicer 5.8 runs Python 3.9: the module, its Gui and Lib packages and the engine (which runs in Slicer's own Python) must load there.

Always: every file parses with Python 3.9's grammar, and nothing newer is evaluated at run time (``X | Y``
outside postponed annotations, ``zip(strict=)``, ``dataclass(slots=, kw_only=)``, typing names of 3.10+).
Where a Python 3.9 interpreter is installed: the files compile and the standard-library-only modules import.
"""

from __future__ import annotations

import ast
import glob
import shutil
import subprocess
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1] / "SlicerEntropyMerge"
FILES = sorted([MODULE / "SlicerEntropyMerge.py", *(MODULE / "SlicerEntropyMergeGui").glob("*.py"),
                *(MODULE / "SlicerEntropyMergeLib").glob("*.py"), *(MODULE / "entropymerge").glob("*.py")])
NEWER_TYPING = {"TypeAlias", "ParamSpec", "Concatenate", "TypeGuard", "Self", "Never", "LiteralString", "Required", "NotRequired",
                "TypeVarTuple", "Unpack", "assert_never", "reveal_type", "dataclass_transform", "override"}
# Modules that need only the standard library: what Slicer imports before the engine's packages are installed.
STDLIB_ONLY = ["SlicerEntropyMergeLib.binding", "SlicerEntropyMergeLib.cases", "SlicerEntropyMergeLib.dependencies",
               "SlicerEntropyMergeLib.engine", "SlicerEntropyMergeLib.modelcheck", "SlicerEntropyMergeLib.process",
               "entropymerge.samplefiles", "entropymerge.errors", "entropymerge.summary"]


def python39() -> str | None:
    candidates = [shutil.which("python3.9"), *sorted(glob.glob(str(Path.home() / ".pyenv" / "versions" / "3.9*" / "bin" / "python3.9")))]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 9)"], capture_output=True).returncode == 0:
            return candidate
    return None


def looks_like_a_type(name: str) -> bool:
    """A builtin type or a CamelCase class name (not an UPPER_CASE constant, whose ``|`` is a set or flag union)."""
    return name in {"int", "float", "str", "bool", "bytes", "list", "dict", "tuple", "set", "frozenset", "type", "object"} or (
        name[:1].isupper() and not name.isupper())


def newer_than_39(tree: ast.Module) -> list[str]:
    """Constructs that parse on 3.9 but fail when run there, with their line numbers."""
    postponed = any(isinstance(node, ast.ImportFrom) and node.module == "__future__" and any(a.name == "annotations" for a in node.names)
                    for node in tree.body)
    annotations = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign):
            annotations.add(id(node.annotation))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs + [node.args.vararg, node.args.kwarg]
            annotations.update(id(a.annotation) for a in arguments if a is not None and a.annotation is not None)
            if node.returns is not None:
                annotations.add(id(node.returns))
    inside_annotation = set()
    for node in ast.walk(tree):
        if id(node) in annotations:
            inside_annotation.update(id(child) for child in ast.walk(node))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            typeish = [side for side in (node.left, node.right) if isinstance(side, ast.Constant) and side.value is None
                       or isinstance(side, ast.Subscript) or isinstance(side, ast.Name) and looks_like_a_type(side.id)]
            if typeish and (id(node) not in inside_annotation or not postponed):
                problems.append(f"line {node.lineno}: a type union evaluated at run time")
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            keywords = {keyword.arg for keyword in node.keywords}
            if name == "zip" and "strict" in keywords or name == "dataclass" and keywords & {"slots", "kw_only"}:
                problems.append(f"line {node.lineno}: {name}({', '.join(sorted(filter(None, keywords)))}) is 3.10+")
        elif isinstance(node, ast.ImportFrom) and node.module in ("typing", "itertools", "types"):
            newer = {alias.name for alias in node.names} & (NEWER_TYPING | {"pairwise", "UnionType", "NoneType", "EllipsisType"})
            if newer:
                problems.append(f"line {node.lineno}: {node.module}.{', '.join(sorted(newer))} is 3.10+")
    return sorted(problems, key=lambda problem: int(problem.split(":")[0].split()[1]))


@pytest.mark.parametrize("path", FILES, ids=lambda path: str(path.relative_to(MODULE)))
def test_parses_with_the_python39_grammar_and_uses_nothing_newer_at_run_time(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    assert newer_than_39(tree) == []


def test_the_checker_finds_what_python39_cannot_run():
    source = ("from typing import TypeAlias\nx: int | None = None\nisinstance(x, int | str)\nzip([], [], strict=True)\n"
              "def f(a: list[int] | None) -> None: pass\n")
    assert newer_than_39(ast.parse(source)) == ["line 1: typing.TypeAlias is 3.10+", "line 2: a type union evaluated at run time",
                                                "line 3: a type union evaluated at run time", "line 4: zip(strict) is 3.10+",
                                                "line 5: a type union evaluated at run time"]
    postponed = "from __future__ import annotations\ndef f(a: int | None) -> str | None: pass\nflags = 1 | 2\nNAMES = A_SET | B_SET\n"
    assert newer_than_39(ast.parse(postponed)) == []
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1: pass\n", feature_version=(3, 9))


def test_python39_compiles_every_file_and_imports_the_stdlib_only_modules():
    interpreter = python39()
    if interpreter is None:
        pytest.skip("no Python 3.9 interpreter here (Slicer 5.8's version); the grammar checks above still ran")
    code = "import sys\nfor name in sys.argv[1:]: compile(open(name, encoding='utf-8').read(), name, 'exec')"
    compiled = subprocess.run([interpreter, "-c", code, *map(str, FILES)], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr
    code = "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module(name)\nprint('ok')"
    imported = subprocess.run([interpreter, "-c", code, *STDLIB_ONLY], capture_output=True, text=True, cwd=MODULE)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "ok"
