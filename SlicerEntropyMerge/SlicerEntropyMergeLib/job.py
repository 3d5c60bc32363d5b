"""One Apply from start to finish: inputs written out, the engine started in the background, and
then either its results imported or, when cancelled or failed, everything it made removed.

No node is made before the engine has finished successfully, so a cancelled or failed run leaves
the scene as it was.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from . import cases
from .engine import RunRequest, run_process
from .process import SUCCEEDED, EngineProcess
from .results import ImportedResults, import_results
from .scene import write_label_map, write_volume_node


@dataclass
class RunJob:
    """A run under way (or a case whose earlier results are reused: ``process`` is ``None``)."""

    volume: object
    out: Path
    work: Path
    case: Path | None = None
    options: list[str] | None = None
    process: EngineProcess | None = None
    model: Path | None = None  # where the engine writes the merged network (kept after the run for "Save merged model...")

    @property
    def finished(self) -> bool:
        return self.process is None or self.process.finished

    @property
    def succeeded(self) -> bool:
        return self.process is None or self.process.state == SUCCEEDED


def start_run(scene, volume, request: RunRequest, labels=None, label_values: dict[str, int] | None = None,
              scribbles: bool = False, case: Path | None = None, work_root: str | None = None) -> RunJob:
    """Write the inputs and start the engine on ``volume`` (or on the ``case`` file it was loaded from).

    ``labels`` (a label map or segmentation node) is written on the volume's grid as the reference
    or, with ``scribbles``, as the ranking's scribbles; segments map to ``label_values`` by name.
    A case is segmented into its results folder, and earlier results made with the same options
    are reused without running the engine.
    """
    work = Path(tempfile.mkdtemp(prefix="EntropyMerge-", dir=work_root))
    try:
        labels_path = None
        if labels is not None:
            labels_path = write_label_map(scene, labels, volume, work / "labels.nrrd", label_values or {}, scribbles)
            request = replace(request, **({"scribbles": str(labels_path), "rank": True} if scribbles else {"reference": str(labels_path)}))
        options = remembered_options(request.option_arguments(), labels_path)
        # beside the work folder, which finish_run removes; the ensemble has no single network to keep
        model = None if request.method == "ensemble" else Path(f"{work}-model")
        if case is not None:
            job = RunJob(volume, cases.results_folder(case), work, case, options)
            if cases.has_reusable_results(case, options):
                return job
            cases.discard_results(case)
            job.model = model
            job.process = run_process(request, case, job.out, save_model=model)
        else:
            job = RunJob(volume, work / "out", work, options=options, model=model)
            job.process = run_process(request, write_volume_node(volume, work / "volume.nrrd"), job.out, save_model=model)
        job.process.start()
        return job
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def remembered_options(options: list[str], labels_path: Path | None) -> list[str]:
    """The options as a case remembers them: the labels file (in a new temporary folder each run) by its content."""
    if labels_path is None:
        return options
    digest = "sha256:" + hashlib.sha256(labels_path.read_bytes()).hexdigest()
    return [digest if option == str(labels_path) else option for option in options]


def finish_run(scene, job: RunJob, segmentation=None, entropy: bool = True) -> ImportedResults:
    """Import the results of a run that succeeded; a case remembers the options its results were made with."""
    try:
        results = import_results(scene, job.volume, job.out, segmentation, entropy)
        if job.case is not None and job.process is not None:
            cases.remember_options(job.case, job.options)
        return results
    finally:
        shutil.rmtree(job.work, ignore_errors=True)


def abandon_run(job: RunJob) -> None:
    """Cancel the engine if it still runs and remove what the run wrote (a case's partial results too)."""
    if job.process is not None:
        job.process.cancel()
        if job.case is not None:
            cases.discard_results(job.case)
    shutil.rmtree(job.work, ignore_errors=True)
    discard_model(job.model)


def discard_model(folder: Path | None) -> None:
    """Remove a run's kept merged model (when a newer run replaces it, or the run failed)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def save_merged_model(model: Path, destination: str | Path) -> Path:
    """Copy the merged model a run kept (``<name>.safetensors`` + ``<name>.json``) into ``destination``.

    Returns the model card's new path. Raises ``ValueError`` when the run kept no model, or when
    ``destination`` already holds a file of that name (nothing is overwritten).
    """
    cards = sorted(Path(model).glob("*.json")) if model else []
    if not cards:
        raise ValueError("This run kept no merged model (the ensemble has none; reused results of a case neither).")
    card = cards[0]
    files = [card.with_suffix(".safetensors"), card]  # the card last: it names the weights
    destination = Path(destination)
    existing = [str(destination / f.name) for f in files if (destination / f.name).exists()]
    if existing:
        raise ValueError(f"Not saved: {', '.join(existing)} already exists; choose another folder.")
    destination.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, destination / file.name)
    return destination / card.name
