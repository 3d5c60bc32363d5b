"""A folder of cases: which files are cases, and where each case's results are kept and reused.

A case's results live next to it, in ``<case stem>.entropymerge/`` (the engine's output folder,
``summary.json`` written last). They are reused when that folder holds a complete run made with
the same options (kept in ``request.json`` beside the engine's files).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

RESULTS_SUFFIX = ".entropymerge"
REQUEST_NAME = "request.json"
# Files ending so (before the extension) are label maps that sit beside the images, not cases.
LABEL_MAP_ENDINGS = ("_labels", "_label", "_seg", "_segmentation", "_mask")


def volume_stem(path: Path) -> str:
    """The file name without its volume extension (``case1.nii.gz`` -> ``case1``)."""
    from entropymerge.volume import FILE_SUFFIXES

    name = path.name
    suffix = next((s for s in FILE_SUFFIXES if name.lower().endswith(s)), path.suffix)
    return name[: len(name) - len(suffix)]


def find_cases(folder: str | Path) -> list[Path]:
    """The volume files in ``folder`` (not its subfolders), sorted by name, label maps left out."""
    from entropymerge.volume import FILE_SUFFIXES

    files = [p for p in Path(folder).iterdir() if p.is_file() and p.name.lower().endswith(FILE_SUFFIXES)]
    return sorted((p for p in files if not volume_stem(p).lower().endswith(LABEL_MAP_ENDINGS)), key=lambda p: p.name)


def results_folder(case: Path) -> Path:
    return case.parent / f"{volume_stem(case)}{RESULTS_SUFFIX}"


def has_reusable_results(case: Path, options: list[str]) -> bool:
    """True when the case's results folder holds a complete run made with ``options``."""
    from entropymerge.outputs import SUMMARY_NAME

    folder = results_folder(case)
    request = folder / REQUEST_NAME
    if not (folder / SUMMARY_NAME).is_file() or not request.is_file():
        return False
    try:
        return json.loads(request.read_text()) == options
    except ValueError:
        return False


def remember_options(case: Path, options: list[str]) -> None:
    """Record the options of the complete run now in the case's results folder."""
    (results_folder(case) / REQUEST_NAME).write_text(json.dumps(options) + "\n")


def discard_results(case: Path) -> None:
    """Remove the case's results folder (a stale or cancelled run); it is this module's own folder."""
    shutil.rmtree(results_folder(case), ignore_errors=True)
