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


def volume_stem(path: Path) -> str:
    """The file name without its volume extension (``case1.nii.gz`` -> ``case1``)."""
    from entropymerge.volume import split_volume_name

    parts = split_volume_name(path.name)
    return parts[0] if parts else path.stem


def find_cases(folder: str | Path) -> list[Path]:
    """The volume files in ``folder`` (not its subfolders), sorted by name, label maps left out."""
    from entropymerge.volume import is_label_map_name, split_volume_name

    files = [p for p in Path(folder).iterdir() if p.is_file() and split_volume_name(p.name)]
    return sorted((p for p in files if not is_label_map_name(p.name)), key=lambda p: p.name)


def results_folder(case: Path) -> Path:
    return case.parent / f"{volume_stem(case)}{RESULTS_SUFFIX}"


def has_reusable_results(case: Path, options: list[str]) -> bool:
    """True when the case's results folder holds a complete run made with ``options``."""
    from entropymerge.summary import SUMMARY_NAME

    folder = results_folder(case)
    request = folder / REQUEST_NAME
    if not (folder / SUMMARY_NAME).is_file() or not request.is_file():
        return False
    try:
        return json.loads(request.read_text(encoding="utf-8")) == options
    except ValueError:
        return False


def remember_options(case: Path, options: list[str]) -> None:
    """Record the options of the complete run now in the case's results folder."""
    (results_folder(case) / REQUEST_NAME).write_text(json.dumps(options) + "\n", encoding="utf-8")


def discard_results(case: Path) -> None:
    """Remove the case's results folder (a stale or cancelled run); it is this module's own folder."""
    shutil.rmtree(results_folder(case), ignore_errors=True)
