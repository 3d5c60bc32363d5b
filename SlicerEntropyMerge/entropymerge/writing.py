"""What a run writes: the segmentation volumes and the summary (summary.json) of the run."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .case import Case, Timings
from .inference import Segmentation
from .merging import MergePlan
from .models import SiteModel
from .outputs import OutputFolder, safe_file_stem
from .progress import Progress
from .ranking import Ranking
from .summary import (
    Coefficients,
    Evaluation,
    FeatureRecord,
    InferenceRecord,
    LabelRecord,
    ModelRecord,
    ModelResult,
    RunSummary,
    VolumeRecord,
    output_key,
    probability_key,
)


def write_segmentation(output: OutputFolder, model_name: str, segmentation: Segmentation, case: Case) -> None:
    """Labels, entropy and (when kept) probabilities on the input grid; per-model files get the model's name.

    Args:
        output: the run's output folder.
        model_name: "" for the run's own result; a site model's name for its per-model files.
        segmentation: labels and entropy (X, Y, Z) on the input grid, optionally probabilities (C, X, Y, Z).
        case: the loaded case (the input grid and the label names).
    """
    suffix = f"_{safe_file_stem(model_name)}" if model_name else ""
    geometry = case.volume.geometry
    output.volume(output_key("segmentation", model_name), f"segmentation{suffix}", segmentation.labels, geometry)
    output.volume(output_key("entropy", model_name), f"entropy{suffix}", segmentation.entropy, geometry)
    if segmentation.probabilities is not None:
        for label, probability in zip(case.labels, segmentation.probabilities):
            output.volume(probability_key(label.name, model_name), f"probability_{safe_file_stem(label.name)}{suffix}", probability, geometry)


def write_result(output: OutputFolder, case: Case, segmentation: Segmentation | None, progress: Progress,
                 timings: Timings) -> None:
    """The write stage: the run's segmentation and entropy map (and probabilities) on the input grid.

    Args:
        output: the run's output folder.
        case: the loaded case.
        segmentation: the run's segmentation; None: nothing to write (rank only).
        progress: reports the write stage.
        timings: receives its wall time.
    """
    progress.stage("write", "writing the outputs")
    with timings.measure("write"):
        if segmentation is not None:
            write_segmentation(output, "", segmentation, case)


def write_ranking(output: OutputFolder, ranking: Ranking) -> None:
    """ranking.json and ranking.csv of the run's transferability ranking."""
    output.json("ranking", "ranking.json", ranking.to_json())
    output.text("ranking_csv", "ranking.csv", ranking.to_csv())


def _named(models, values) -> dict[str, float] | None:
    if values is None:
        return None
    return {m.name: round(float(v), 6) for m, v in zip(models, values)}


def build_summary(volume: Path, case: Case, plan: MergePlan, timings: Timings, progress: Progress,
                  evaluation: dict | None, per_model: dict) -> RunSummary:
    """The run's summary, without the ranking, adaptation and saved model (``run`` adds those).

    Args:
        volume: the target volume's path as the user gave it.
        case: the loaded case (volume, models, inference settings).
        plan: the merge plan (coefficients per model, in model order; method details).
        timings: wall seconds per stage, filled while the run goes on.
        progress: its notes become the summary's notes.
        evaluation: the run's segmentation against the reference (``metrics.evaluate``), or None.
        per_model: model name -> ``{"evaluation": ...}`` or ``{}`` for each site model that ran in full.

    Returns:
        The summary; ``timings_s`` and ``notes`` are the live objects, so later stages still show.
    """
    models = case.models
    details = dict(plan.details)
    stats = details.pop("statistics", None)
    settings = case.settings
    return RunSummary(
        entropymerge_version=__version__,
        created=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        volume=VolumeRecord(str(volume), case.volume.geometry.describe()),
        models=[ModelRecord(model.name, model.card.site, str(model.source), model.kind,
                            int(sum(p.numel() for p in model.network.parameters()))) for model in models],
        labels=[LabelRecord(label.value, label.name, label.color) for label in case.labels],
        method=plan.method,
        coefficients=Coefficients(_named(models, plan.body), _named(models, plan.head if plan.head is not None else plan.body)),
        decoupled_head=plan.head is not None,
        probe_statistics={key: _named(models, values) for key, values in stats.items()} if stats else None,
        merge_details={k: (_named(models, v) if k in ("scores", "head_scores") else v) for k, v in details.items()},
        features=FeatureRecord(_feature_summary(models[0]), case.features_cached),
        device=case.report.device,
        inference=InferenceRecord(settings.inferer, list(settings.roi_size), settings.overlap, settings.sw_batch_size,
                                  settings.blend_mode, settings.padding_mode),
        evaluation=Evaluation.from_json(evaluation) if evaluation else None,
        per_model={name: ModelResult.from_json(entry, f"per_model.{name}") for name, entry in per_model.items()} or None,
        timings_s=timings,
        notes=progress.notes,
        versions=_versions(),
    )


def _feature_summary(model: SiteModel) -> dict | None:
    spec = model.card.features
    return {"extractor": spec.extractor, "version": spec.version, "channels": spec.channels} if spec else None


def _versions() -> dict:
    import monai
    import SimpleITK

    return {
        "entropymerge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
    }
