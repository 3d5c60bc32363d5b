"""An output folder that receives a run's files all at once, or not at all.

Files are written into a hidden staging folder inside the output folder and moved into place
when the run completes; ``summary.json`` is moved last, so its presence marks a complete run. A
failed or cancelled run leaves no partial files behind and never touches existing inputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from .errors import UserInputError
from .volume import Geometry, write_volume

SUMMARY_NAME = "summary.json"
VOLUME_FORMATS = ("nii.gz", "nrrd", "mha")


def safe_file_stem(name: str) -> str:
    """A file-name-safe version of a model or label name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


class OutputFolder:
    def __init__(self, folder: str | os.PathLike, overwrite: bool = False, protected: tuple[Path, ...] = (), volume_format: str = "nii.gz"):
        self.folder = Path(folder)
        if volume_format not in VOLUME_FORMATS:
            raise UserInputError(f"unknown output format {volume_format!r}; choose one of {', '.join(VOLUME_FORMATS)}")
        self.volume_format = volume_format
        self.protected = {p.resolve() for p in protected}
        if self.folder.exists() and not self.folder.is_dir():
            raise UserInputError(f"output path {self.folder} is a file, not a folder")
        if (self.folder / SUMMARY_NAME).exists() and not overwrite:
            raise UserInputError(
                f"output folder {self.folder} already holds the results of a run; choose another --out or add --overwrite"
            )
        existing = next(p for p in (self.folder, *self.folder.absolute().parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserInputError(f"cannot write to output folder {self.folder}: {existing} is not writable")
        self._staging: Path | None = None
        self.files: dict[str, str] = {}

    @property
    def staging(self) -> Path:
        """The hidden folder that collects this run's files; made at the first write."""
        if self._staging is None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._staging = Path(tempfile.mkdtemp(prefix=".entropymerge-partial-", dir=self.folder))
            except OSError as error:
                raise UserInputError(f"cannot write to output folder {self.folder}: {error.strerror or error}") from None
        return self._staging

    def _target(self, file_name: str) -> Path:
        final = self.folder / file_name
        if final.resolve() in self.protected:
            raise UserInputError(f"output {final} would overwrite an input file; choose another --out")
        return self.staging / file_name

    def volume(self, key: str, stem: str, array: np.ndarray, geometry: Geometry) -> None:
        file_name = f"{stem}.{self.volume_format}"
        path = self._target(file_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_volume(array, geometry, path)
        self.files[key] = file_name

    def text(self, key: str, file_name: str, text: str) -> None:
        path = self._target(file_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.files[key] = file_name

    def json(self, key: str, file_name: str, data) -> None:
        self.text(key, file_name, json.dumps(data, indent=2, default=_json_default) + "\n")

    def commit(self, summary: dict) -> dict[str, str]:
        """Move every staged file into the output folder, then write the summary; returns key -> path."""
        summary = dict(summary, outputs=dict(self.files, summary=SUMMARY_NAME))
        (self.folder / SUMMARY_NAME).unlink(missing_ok=True)  # the folder is incomplete until the new one lands
        (self.staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
        for file_name in [*self.files.values(), SUMMARY_NAME]:
            final = self.folder / file_name
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / file_name, final)
        shutil.rmtree(self.staging, ignore_errors=True)
        return {key: str(self.folder / name) for key, name in summary["outputs"].items()}

    def abort(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_text_atomically(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` under a temporary name, then move it into place (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")  # plain open(): the user's umask applies
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
