"""The engine's command line as the Slicer module calls it, and what the model check reports.

Nothing here re-implements the engine: a run is ``python -m entropymerge run ... --progress json``
in a background process (``process.EngineProcess``) and model checks are ``entropymerge models --json``;
the run's summary is read through ``entropymerge.summary``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from entropymerge.settings import AdaptationSettings, InferenceOverrides, MergeSettings, OutputSettings, ProbeSettings, RankingSettings

from . import tr as _
from .process import EngineProcess

ENGINE_FOLDER = Path(__file__).resolve().parents[1]  # the folder that holds the entropymerge package


@dataclass
class RunRequest:
    """What the user chose in the panel; ``None`` means the engine's (or the model card's) default, and
    the other defaults are the engine's (``entropymerge.settings``)."""

    models: list[str]
    method: str = MergeSettings.method
    single_model: str | None = MergeSettings.single_model
    temperature: float = MergeSettings.temperature
    decouple_head: bool = MergeSettings.decouple_head
    device: str = InferenceOverrides.device
    roi_size: tuple[int, int, int] | None = None
    overlap: float | None = None
    probe_patches: int = ProbeSettings.patches
    adapt: str = AdaptationSettings.method
    adapt_steps: int | None = None
    adapt_lr: float | None = None
    per_model: bool = OutputSettings.per_model
    rank: bool = RankingSettings.rank
    reference: str | None = None
    scribbles: str | None = None

    def option_arguments(self) -> list[str]:
        """``entropymerge run`` options for this request (everything but the volume and the output folder)."""
        arguments: list[str] = []
        for model in self.models:
            arguments += ["--model", str(model)]
        arguments += ["--method", self.method, "--temperature", repr(float(self.temperature)),
                      "--probe-patches", str(int(self.probe_patches)), "--device", self.device]
        if self.method == "single" and self.single_model:
            arguments += ["--single-model", self.single_model]
        if not self.decouple_head:
            arguments.append("--no-decouple-head")
        if self.roi_size:
            arguments += ["--roi-size", *(str(int(size)) for size in self.roi_size)]
        if self.overlap is not None:
            arguments += ["--overlap", repr(float(self.overlap))]
        if self.adapt != "none":
            arguments += ["--adapt", self.adapt]
            if self.adapt_steps:
                arguments += ["--adapt-steps", str(int(self.adapt_steps))]
            if self.adapt_lr:
                arguments += ["--adapt-lr", repr(float(self.adapt_lr))]
        if self.per_model:
            arguments.append("--per-model")
        if self.rank:
            arguments.append("--rank")
        if self.reference:
            arguments += ["--reference", str(self.reference)]
        if self.scribbles and self.rank:
            arguments += ["--scribbles", str(self.scribbles)]
        return arguments


def models_needed(rank: bool) -> int:
    """How many site models a run needs: two to rank; otherwise one (with one model every method is that model)."""
    return 2 if rank else 1


def parse_roi_size(text: str) -> tuple[int, int, int] | None:
    """``"96 96 64"`` (or with commas or x) as a sliding-window size; empty means the model card's.

    Raises ``ValueError`` with the reason for anything else.
    """
    parts = text.replace(",", " ").replace("x", " ").split()
    if not parts:
        return None
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(_("The ROI size needs three positive whole numbers (X Y Z), not '{text}'.").format(text=text))
    return tuple(int(part) for part in parts)


def python_executable() -> str:
    """Slicer's own Python (``PythonSlicer``) inside Slicer; the current interpreter elsewhere."""
    return shutil.which("PythonSlicer") or sys.executable


def engine_environment(base: dict | None = None) -> dict:
    """The environment of an engine process: ``entropymerge`` importable from the module folder."""
    environment = dict(os.environ if base is None else base)
    paths = [str(ENGINE_FOLDER)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment["PYTHONUNBUFFERED"] = "1"
    # UTF-8 on every platform (Windows' console code page would garble non-ASCII names in the progress lines we read).
    environment["PYTHONUTF8"] = "1"
    environment["PYTHONIOENCODING"] = "utf-8"
    return environment


def run_process(request: RunRequest, volume: str | Path, out: str | Path, python: str | None = None,
                save_model: str | Path | None = None) -> EngineProcess:
    """An ``entropymerge run`` process (not yet started) that segments ``volume`` into ``out``
    (and, with ``save_model``, writes the network that segmented it into that folder)."""
    arguments = [python or python_executable(), "-m", "entropymerge", "run", "--volume", str(volume), "--out", str(out),
                 "--progress", "json", *request.option_arguments()]
    if save_model is not None:
        arguments += ["--save-model", str(save_model)]
    return EngineProcess(arguments, engine_environment())


def models_process(paths: list[str], python: str | None = None) -> EngineProcess:
    """An ``entropymerge models --json`` process (not yet started) that describes ``paths``."""
    arguments = [python or python_executable(), "-m", "entropymerge", "models", "--json", *map(str, paths)]
    return EngineProcess(arguments, engine_environment())


@dataclass
class ModelReport:
    """What ``entropymerge models --json`` said: one entry per model, and the device ``auto`` picks."""

    models: list[dict] = field(default_factory=list)
    auto_device: str = ""

    @classmethod
    def from_text(cls, lines: list[str]) -> "ModelReport":
        data = json.loads("\n".join(lines))
        return cls(data["models"], data["auto_device"])

    @property
    def compatible(self) -> bool:
        return all(entry["compatible"] for entry in self.models)

    @property
    def labels(self) -> list[dict]:
        """The labels of the (first) usable model: what reference segments must be named after."""
        return next((entry["labels"] for entry in self.models if entry["compatible"]), [])
