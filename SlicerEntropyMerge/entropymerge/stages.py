"""The stages of a run after the case is loaded: probe passes, merge plan, full runs of the site
models, test-time adaptation, ranking and the saved model.

Each stage takes the case and the settings it needs (``settings.MergeSettings``,
``ProbeSettings``, ...), reports progress and adds its wall time to the run's ``Timings``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .adaptation import adapt
from .artefact import merged_model_card, write_model_artefact
from .case import Case, Timings, inference_settings
from .entropy import predicted_labels
from .errors import UserInputError
from .inference import Segmentation, describe_device
from .merging import MergePlan, one_hot, plan_statistics, site_scores, statistic_coefficients
from .methods import PlanContext, get_method
from .outputs import OutputFolder
from .preprocessing import labels_to_model_space
from .probe import Probe, probe_batch_size, probe_probabilities
from .progress import Progress
from .ranking import LabelSource, Ranking, rank_models
from .settings import AdaptationSettings, InferenceOverrides, MergeSettings, ProbeSettings, RankingSettings
from .taps import Taps, find_taps, tapped_pass
from .writing import write_segmentation


def site_probe_outputs(case: Case, probe: Probe, progress: Progress, taps: Taps | None = None):
    """Forward passes of every site model on the probe (the only passes the K models make).

    Args:
        case: the loaded case (its models, device and ROI).
        probe: the probe patches (P, C_in, X, Y, Z).
        progress: reports which model runs.
        taps: the layers whose features the ranking reads; None: softmax outputs only.

    Returns:
        The softmax outputs, K x (P, C, X, Y, Z), and with ``taps`` also each model's tapped
        features (else None).
    """
    outputs, tapped = [], []
    batch = probe_batch_size(probe, case.settings.roi_size)
    for index, model in enumerate(case.models):
        progress.update(index / len(case.models), f"probe pass: {model.name}")
        if taps is None:
            outputs.append(probe_probabilities(model.network, probe, case.device, batch))
        else:
            tapped.append(tapped_pass(model.network, probe.patches, taps, case.device, batch))
            outputs.append(tapped[-1].probabilities)
    return outputs, (tapped if taps is not None else None)


@dataclass
class ProbeRun:
    """The probe and the site models' passes over it, shared by merging and ranking."""

    probe: Probe
    outputs: list[torch.Tensor]  # K x (P, C, X, Y, Z) softmax outputs
    tapped: list | None = None  # K tapped passes, when the run ranks


def run_probe(case: Case, probe: ProbeSettings, rank: bool, progress: Progress, timings: Timings) -> ProbeRun:
    """The probe stage: select the probe patches and run every site model on them.

    Args:
        case: the loaded case.
        probe: mode, patch count and size of the probe.
        rank: also tap the features the ranking needs.
        progress: reports the probe stage.
        timings: receives its wall time.

    Returns:
        The probe and the site models' outputs on it.
    """
    progress.stage("probe", f"probe passes of {len(case.models)} site models")
    with timings.measure("probe"):
        selected = case.select_probe(probe.size, probe.patches, probe.mode)
        for note in selected.notes:
            progress.note(note)
        taps = find_taps(case.models[0], selected.patches[:1]) if rank else None
        outputs, tapped = site_probe_outputs(case, selected, progress, taps)
    return ProbeRun(selected, outputs, tapped)


def plan_merge(case: Case, merge: MergeSettings, probe: ProbeSettings = ProbeSettings(), rank: bool = False,
               progress: Progress | None = None, timings: Timings | None = None) -> tuple[MergePlan, ProbeRun | None]:
    """The merge coefficients of ``merge.method`` (from the method registry).

    With one site model every method is that model: no probe, no merge.

    Args:
        case: the loaded case.
        merge: the method and its parameters.
        probe: the probe, when the method or the ranking needs one.
        rank: the run ranks the models (the probe runs, with taps, whatever the method).
        progress: reports the probe and merge stages.
        timings: receives their wall times.

    Returns:
        The plan (coefficients; ``body`` None when the method runs every model) and the probe passes,
        or None when nothing needed them.
    """
    progress = progress or Progress()
    timings = timings if timings is not None else Timings()
    models = case.models
    method = get_method(merge.method)
    if len(models) == 1:
        progress.stage("merge", f"one site model: {models[0].name}")
        if method.name != "single":
            progress.note(f"one site model: the {method.label} is that model itself; no probe and no merge")
        return MergePlan(method.name, one_hot(0, 1)), None
    probe_run = run_probe(case, probe, rank, progress, timings) if method.uses_probe or rank else None
    if method.runs_every_model:
        progress.stage("merge", f"{method.label}: every site model runs on the whole volume")
        return MergePlan(method.name, None), probe_run
    progress.stage("merge", f"{method.label} of {len(models)} site models")
    context = PlanContext(models, merge, case.device)
    if probe_run is not None:
        context.probe, context.outputs = probe_run.probe, probe_run.outputs
        context.batch_size = probe_batch_size(probe_run.probe, case.settings.roi_size)
    with timings.measure("merge") if method.uses_probe else contextlib.nullcontext():
        return method.plan(context), probe_run


def run_every_model(case: Case, plan: MergePlan, per_model: dict, progress: Progress, timings: Timings,
                    output: OutputFolder | None = None) -> tuple[MergePlan, torch.Tensor | None]:
    """Full inference of each site model (per-model outputs, ensemble, oracle), one at a time in memory.

    Args:
        case: the loaded case.
        plan: the merge plan; ``body`` None: the method combines full runs of every model.
        per_model: filled with each model's entry (its evaluation, with a reference), by model name.
        progress: reports the site-models stage.
        timings: receives its wall time.
        output: write each model's segmentation and entropy here (--per-model); None: write nothing.

    Returns:
        The plan (for the oracle: the best model by Dice as a one-hot plan; for the ensemble: with its
        members) and, for the ensemble, the sum of the models' softmax outputs (C, X, Y, Z), else None.
    """
    method = get_method(plan.method) if plan.body is None else None
    average = method is not None and method.combine == "average"
    progress.stage("site models", "running every site model in full")
    ensemble_sum = None
    best, best_dice = 0, -1.0
    with timings.measure("site models"):
        for index, model in enumerate(case.models):
            def report(fraction, index=index, name=model.name):
                progress.update((index + fraction) / len(case.models), f"site model {name}")

            probabilities = case.probabilities(model.network, report)
            if average:
                ensemble_sum = probabilities if ensemble_sum is None else ensemble_sum + probabilities
            segmentation = case.segment(probabilities)
            del probabilities
            entry: dict = {}
            evaluation = case.evaluate(segmentation.labels)
            if evaluation is not None:
                entry["evaluation"] = evaluation
                if (evaluation["mean_dice"] or 0.0) > best_dice:
                    best, best_dice = index, evaluation["mean_dice"] or 0.0
            if output is not None:
                write_segmentation(output, model.name, segmentation, case)
            per_model[model.name] = entry
    if average:
        plan.details["members"] = [m.name for m in case.models]
    elif method is not None:
        plan = MergePlan(method.name, one_hot(best, len(case.models)), details={"selected": case.models[best].name})
    return plan, ensemble_sum


def segment_volume(case: Case, plan: MergePlan, adapted: torch.nn.Module | None, ensemble_sum: torch.Tensor | None,
                   keep_probabilities: bool, pseudo_labels: bool, progress: Progress,
                   timings: Timings) -> tuple[Segmentation, np.ndarray | None, torch.nn.Module | None]:
    """The inference stage: one full-volume pass of the merged (or adapted) network, or the ensemble's mean.

    Args:
        case: the loaded case.
        plan: the merge plan; ``body`` None: the ensemble (``ensemble_sum`` holds its summed outputs).
        adapted: the adapted network, or None for the plan's merged network.
        ensemble_sum: the ensemble's summed softmax outputs (C, X, Y, Z), or None.
        keep_probabilities: keep the class probabilities on the input grid (--probabilities).
        pseudo_labels: also return the predicted labels on the model grid (for the ranking).
        progress: reports the inference stage.
        timings: receives its wall time.

    Returns:
        The segmentation on the input grid, the labels (X, Y, Z) on the model grid or None, and the
        network that segmented the volume (None for the ensemble).
    """
    progress.stage("inference", f"segmenting on {describe_device(case.device)}")
    network = None
    with timings.measure("inference"):
        if plan.body is None:
            probabilities = ensemble_sum / len(case.models)
        else:
            network = adapted if adapted is not None else plan.network(case.models)
            probabilities = case.probabilities(network, lambda f: progress.update(f, "segmenting"))
        segmentation = case.segment(probabilities, keep_probabilities)
        labels = predicted_labels(probabilities, dim=0).numpy() if pseudo_labels else None
        del probabilities
    for note in case.report.notes:
        progress.note(note)
    return segmentation, labels, network


def evaluate_segmentation(case: Case, segmentation: Segmentation | None, progress: Progress, timings: Timings) -> dict | None:
    """The evaluate stage: Dice and HD95 (mm) of the run's segmentation against the reference.

    Returns:
        The evaluation, or None without a reference or a segmentation (the stage does not run).
    """
    if case.reference is None or segmentation is None:
        return None
    progress.stage("evaluate", "comparing with the reference segmentation")
    with timings.measure("evaluate"):
        return case.evaluate(segmentation.labels)


def adapt_merged(case: Case, plan: MergePlan, adaptation: AdaptationSettings, probe: ProbeSettings,
                 probe_run: ProbeRun | None, progress: Progress, timings: Timings) -> tuple[torch.nn.Module | None, dict | None]:
    """--adapt: the merged network after collapse-safe test-time adaptation on the run's probe.

    Args:
        case: the loaded case.
        plan: the merge plan (with a single merged network).
        adaptation: the method, steps and learning rate ("none": no adaptation).
        probe: the probe to select when the run has no probe passes yet.
        probe_run: the run's probe passes, or None.
        progress: reports the adapt stage.
        timings: receives its wall time.

    Returns:
        The adapted network and its record for summary.json, or (None, None) without adaptation.
    """
    if adaptation.method == "none":
        return None, None
    probe_run = probe_run or run_probe(case, probe, False, progress, timings)
    progress.stage("adapt", f"test-time adaptation: {adaptation.method.upper()}, {adaptation.steps} steps")
    with timings.measure("adapt"):
        names = [label.name for label in case.labels]
        network, result = adapt(plan.network(case.models), probe_run.probe, adaptation, case.device,
                                probe_batch_size(probe_run.probe, case.settings.roi_size), names, progress)
    return network, result.describe(names, adaptation)


def save_run_model(case: Case, plan: MergePlan, network: torch.nn.Module, adaptation: dict | None, volume: Path,
                   overrides: InferenceOverrides, folder: Path) -> dict:
    """--save-model: write the network that segmented the volume as a site model (weights + card).

    Args:
        case: the loaded case.
        plan: the merge plan behind ``network``.
        network: the merged (or merged and adapted) network.
        adaptation: the adaptation record, or None.
        volume: the target volume's path (names the model).
        overrides: the user's inference overrides (written into the card).
        folder: where the safetensors file and the card go.

    Returns:
        The written files by key (``model_weights``, ``model_card``).
    """
    adapted = None if adaptation is None else {key: adaptation[key] for key in (
        "method", "steps", "steps_run", "learning_rate", "seed", "reliable_below", "guard_fired", "restored")}
    name = Path(volume).name
    card = merged_model_card(case.models, network, name=f"merged-{name.split('.')[0]}", method=plan.method,
                             body=plan.body, head=plan.head, head_keys=plan.head_keys,
                             volume=name, inference=inference_settings(case.models[0], overrides), adaptation=adapted)
    return write_model_artefact(network, card, folder)


def label_source(case: Case, ranking: RankingSettings, reference: Path | None, pseudo_labels: np.ndarray | None) -> LabelSource:
    """The labels the ranking trusts most: reference, then scribbles, then the merged prediction.

    Args:
        case: the loaded case (its reference and scribbles).
        ranking: the scribbles' path and unlabelled value (for the description).
        reference: the reference's path (for the description).
        pseudo_labels: the merged model's labels (X, Y, Z) on the model grid, or None.

    Returns:
        The label source: its kind, labels (X, Y, Z) on the model grid and a description.
    """
    if case.scribbles is not None:
        in_model_space = labels_to_model_space(case.scribbles, case.image).numpy()
        return LabelSource("scribbles", in_model_space, f"scribbles {ranking.scribbles} (unlabelled = {ranking.unlabelled_value})")
    if case.reference is not None:
        return LabelSource("reference", labels_to_model_space(case.reference, case.image).numpy(), f"reference {reference}")
    if pseudo_labels is None:
        raise UserInputError("ranking needs labels: a reference, scribbles, or the merged prediction")
    return LabelSource("pseudo-label", pseudo_labels.astype(np.int64), "the merged model's own prediction (pseudo-label)")


def rank_case(case: Case, merge: MergeSettings, ranking: RankingSettings, reference: Path | None, probe_run: ProbeRun,
              plan: MergePlan, pseudo_labels, per_model: dict, progress: Progress, timings: Timings) -> Ranking:
    """The rank stage: rank the site models on this case, reusing the run's probe passes and per-model results.

    Args:
        case: the loaded case.
        merge: the merge's statistic and temperature (the label-free as-is score and alpha).
        ranking: the scribbles and the sampling seed.
        reference: the reference's path, or None.
        probe_run: the run's probe passes with the tapped features.
        plan: the merge plan (its statistics and scores are reused).
        pseudo_labels: the merged model's labels (X, Y, Z) on the model grid, or None.
        per_model: each model's entry; the evaluations computed here are added to it.
        progress: reports the rank stage.
        timings: receives its wall time.

    Returns:
        The ranking.
    """
    progress.stage("rank", "ranking the site models")
    with timings.measure("rank"):
        return _ranking(case, merge, ranking, reference, probe_run, plan, pseudo_labels, per_model)


def _ranking(case: Case, merge: MergeSettings, ranking: RankingSettings, reference: Path | None, probe_run: ProbeRun,
             plan: MergePlan, pseudo_labels, per_model: dict) -> Ranking:
    source = label_source(case, ranking, reference, pseudo_labels)
    # the adaptive and select plans computed these on the same probe passes already
    stats = plan.details.get("statistics") or plan_statistics(case.models, probe_run.probe, probe_run.outputs)
    true_dice = None
    if case.reference is not None:
        true_dice = []
        for model in case.models:
            entry = per_model.get(model.name, {})
            if "evaluation" not in entry:
                entry["evaluation"] = case.evaluate(case.segment(case.probabilities(model.network)).labels)
                per_model[model.name] = entry
            true_dice.append(entry["evaluation"]["mean_dice"] or 0.0)
    # The label-free as-is score is the per-model score the merge itself used (whatever its statistic).
    statistic = plan.details.get("statistic", merge.statistic)
    uncertainty = plan.details.get("scores")
    if uncertainty is None:
        uncertainty = site_scores(stats, statistic)
    alpha = plan.body.tolist() if plan.method == "adaptive" and plan.body is not None else statistic_coefficients(
        stats, statistic, merge.temperature).tolist()
    return rank_models(case.models, case.inputs, probe_run.probe, source, case.device, probe_run.tapped,
                       uncertainty=[float(u) for u in uncertainty], statistic=statistic, entropy=stats["entropy"],
                       alpha=alpha, true_dice=true_dice, seed=ranking.seed)
