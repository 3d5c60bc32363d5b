"""The repository keeps its promises: README commands, CI, and the Slicer module's file list."""

import re
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
MODULE = REPOSITORY / "SlicerEntropyMerge"


def readme_commands() -> list[str]:
    text = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(.+?)\n```", text.split("## Command line")[0])


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = readme_commands()[:2]
    assert demo.endswith("entropymerge demo") and "-c constraints.txt" in demo
    assert "pytest" in tests and "-c constraints.txt" in tests


def test_ci_runs_the_readme_test_command():
    ci = (REPOSITORY / ".ci" / "run").read_text(encoding="utf-8")
    assert readme_commands()[1] in ci.splitlines()


def test_constraints_pin_the_cpu_torch():
    assert "torch==2.13.0" in (REPOSITORY / "constraints.txt").read_text(encoding="utf-8").splitlines()


def listed_in_cmake() -> set[str]:
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "SlicerEntropyMerge")
    blocks = re.findall(r"set\(MODULE_PYTHON_(?:SCRIPTS|RESOURCES)\n(.*?)\n\s*\)", text, re.S)
    return {line.strip() for block in blocks for line in block.splitlines() if line.strip()}


def module_files() -> set[str]:
    """Files of the module folder that belong to the source (tracked or not ignored by git)."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "."],
        cwd=MODULE, capture_output=True, text=True, check=True,
    ).stdout.split()
    return {name for name in listing if (MODULE / name).is_file()}


def test_cmake_lists_every_module_file():
    wanted = {".py", ".ui", ".json", ".png", ".svg", ".txt", ".md", ".safetensors", ".gz", ".css", ".js"}
    on_disk = {name for name in module_files() if Path(name).suffix in wanted and name != "CMakeLists.txt"}
    listed = listed_in_cmake()
    assert not sorted(on_disk - listed), f"add to SlicerEntropyMerge/CMakeLists.txt: {sorted(on_disk - listed)}"
    assert not sorted(listed - on_disk), f"listed but missing: {sorted(listed - on_disk)}"


def test_code_passes_the_linter():
    """pyflakes errors, pycodestyle errors and import order (settings in pyproject.toml) over all Python code."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "SlicerEntropyMerge", "Testing", "benchmarks"],
                            cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_source_file_is_over_400_lines():
    """Files stay small enough to read in one sitting (issue 17); split by what the code does, not by line count."""
    sources = [path for folder in ("SlicerEntropyMerge", "Testing", "benchmarks") for path in (REPOSITORY / folder).rglob("*.py")
               if ".venv" not in path.parts]
    too_long = {str(path.relative_to(REPOSITORY)): n for path in sources
                if (n := len(path.read_text(encoding="utf-8").splitlines())) > 400}
    assert not too_long, f"over 400 lines: {too_long}"
