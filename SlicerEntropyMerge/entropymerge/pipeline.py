"""One case from files to files: the engine's flow as a short sequence of calls.

read volume -> load and check site models -> model space -> stable features (cached)
-> probe passes of the K site models -> coefficients (alpha body, beta head) -> merged model
-> sliding-window inference -> labels and entropy on the input grid -> outputs + summary.json
"""

from __future__ import annotations

import contextlib
import datetime
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .adaptation import adapt
from .artefact import check_model_folder, merged_model_card, write_model_artefact
from .compatibility import check_compatible, check_runs
from .entropy import predicted_labels
from .errors import UserInputError
from .features import FeatureCache, get_extractor, model_inputs
from .inference import InferenceReport, Segmentation, describe_device, predict_logits, resolve_device, segmentation_from_probabilities
from .merging import STATISTICS, MergePlan, one_hot, plan_statistics, site_scores, statistic_coefficients
from .methods import PlanContext, get_method
from .metrics import evaluate
from .modelcard import InferenceSettings, ModelCard
from .models import SiteModel, expand_model_paths, load_site_models, model_files
from .outputs import OutputFolder, safe_file_stem
from .padding import fit_to_volume, network_multiple, round_up
from .preprocessing import ModelSpaceImage, labels_to_model_space, to_model_space
from .probe import Probe, default_probe_size, probe_batch_size, probe_probabilities, select_probe
from .progress import Progress
from .ranking import LabelSource, rank_models, scribble_labels
from .settings import AdaptationSettings, MergeSettings
from .summary import (
    AdaptationRecord,
    Coefficients,
    Evaluation,
    FeatureRecord,
    InferenceRecord,
    LabelRecord,
    ModelRecord,
    ModelResult,
    RankingRecord,
    RunSummary,
    VolumeRecord,
    output_key,
    probability_key,
)
from .taps import Taps, find_taps, tapped_pass
from .validation import physical_memory_bytes
from .volume import Geometry, Volume, detached_data_files, read_label_map, read_volume

DEFAULT_TEMPERATURE = 0.05


@dataclass
class RunOptions:
    """Everything ``entropymerge run`` needs; defaults are the CLI's defaults."""

    volume: Path
    models: list[Path]
    out: Path | None = None
    method: str = "adaptive"
    single_model: str | None = None
    temperature: float = DEFAULT_TEMPERATURE
    head_temperature: float | None = None
    decouple_head: bool = True
    statistic: str = MergeSettings.statistic
    refine: bool = False
    batchnorm: str = "merge"
    probe: str = "patches"
    probe_patches: int = 8
    probe_size: tuple[int, int, int] | None = None
    features: str | None = None
    anatomix_weights: Path | None = None
    feature_cache: Path | None = None
    no_feature_cache: bool = False
    reference: Path | None = None
    per_model: bool = False
    rank: bool = False
    scribbles: Path | None = None
    unlabelled_value: int = 255
    seed: int = 0
    segment: bool = True  # False: rank only (the merged model runs only when its prediction is the label source)
    device: str = "auto"
    roi_size: tuple[int, int, int] | None = None
    overlap: float | None = None
    sw_batch_size: int | None = None
    probabilities: bool = False
    volume_format: str = "nii.gz"
    trust_code: bool = False
    overwrite: bool = False
    adapt: str = "none"  # test-time adaptation of the merged network: none, tent or dsbr
    adapt_steps: int = AdaptationSettings.steps
    adapt_lr: float = AdaptationSettings.learning_rate
    adapt_reliable: float | None = None  # reliable-voxel filter of the adaptation loss (fraction of log C)
    adapt_prior: float = 0.0  # weight of the class-proportion term of the adaptation loss
    report: bool = False  # also write report.html (made from the committed outputs)
    memory_limit_gb: float | None = None  # refuse runs estimated to need more (default: this computer's memory)
    save_model: Path | None = None  # folder for the network that segmented the volume (safetensors + model card)

    def merge_settings(self) -> MergeSettings:
        return MergeSettings(self.method, self.single_model, self.temperature, self.head_temperature, self.decouple_head,
                             self.statistic, self.refine, self.batchnorm)

    def adaptation_settings(self) -> AdaptationSettings:
        return AdaptationSettings(self.adapt, self.adapt_steps, self.adapt_lr, self.seed, reliable_below=self.adapt_reliable,
                                   prior_weight=self.adapt_prior)


class Timings(dict):
    """Wall time (s) of each stage, in the order they ran."""

    @contextlib.contextmanager
    def measure(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(self.get(name, 0.0) + time.perf_counter() - start, 4)


@dataclass
class Case:
    """A target volume in the site models' space, ready for probe passes and inference."""

    volume: Volume
    models: list[SiteModel]
    image: ModelSpaceImage
    inputs: torch.Tensor  # (1, C_in, X, Y, Z)
    settings: InferenceSettings
    device: torch.device
    reference: Volume | None = None
    features_cached: bool = False
    report: InferenceReport = field(default_factory=lambda: InferenceReport("cpu", []))
    scribbles: Volume | None = None  # --scribbles as class values (unlabelled: --unlabelled-value), on the input grid

    @property
    def labels(self):
        return self.models[0].card.labels

    def probabilities(self, network: torch.nn.Module, progress=None) -> torch.Tensor:
        """Sliding-window class probabilities of ``network`` on the model grid: (C, X, Y, Z)."""
        logits = predict_logits(network, self.inputs, self.settings, self.device, progress, self.report)
        return torch.softmax(logits[0].float(), dim=0)

    def select_probe(self, patch_size=None, patches: int = 8, mode: str = "patches") -> Probe:
        """The probe for this case; ``patch_size`` None: the default (``default_probe_size``)."""
        multiple = self.settings.spatial_multiple
        return select_probe(self.inputs, patch_size or default_probe_size(self.settings.roi_size, multiple), patches, mode,
                            multiple)

    def segment(self, probabilities: torch.Tensor, keep_probabilities: bool = False) -> Segmentation:
        return segmentation_from_probabilities(probabilities, self.image, keep_probabilities)

    def evaluate(self, labels: np.ndarray) -> dict | None:
        if self.reference is None:
            return None
        return evaluate(labels, self.reference.array, self.labels, self.volume.geometry.spacing)


def validate_options(options: RunOptions) -> None:
    """Cheap checks of option values, before any file is read."""
    method = get_method(options.method)
    for name in ("temperature", "head_temperature"):
        value = getattr(options, name)
        if value is not None and not value > 0:
            raise UserInputError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if options.statistic not in STATISTICS:
        raise UserInputError(f"unknown statistic {options.statistic!r}; choose one of {', '.join(STATISTICS)}")
    if method.needs_reference and options.reference is None:
        raise UserInputError(f"--method {method.name} ({method.description}) needs --reference")
    if options.overlap is not None and not 0 <= options.overlap < 1:
        raise UserInputError(f"--overlap must be in [0, 1), got {options.overlap}")
    if options.adapt != "none":
        if method.combine == "average":
            raise UserInputError(f"--adapt adapts the single merged network, but --method {method.name} runs every model")
        options.adaptation_settings().check()
    if options.save_model is not None and method.combine == "average":
        raise UserInputError(f"--save-model saves the one network that segments the volume, but --method {method.name} runs every model")


def inference_settings(model: SiteModel, options: RunOptions) -> InferenceSettings:
    """The model card's inference settings with the user's overrides applied (an ROI means sliding windows)
    and the size multiple the network needs."""
    settings = replace(model.card.inference, spatial_multiple=network_multiple(model.card.network))
    if options.roi_size:
        settings = replace(settings, roi_size=tuple(options.roi_size), inferer="sliding_window")
    if options.overlap is not None:
        settings = replace(settings, overlap=options.overlap)
    if options.sw_batch_size:
        settings = replace(settings, sw_batch_size=options.sw_batch_size)
    return settings


# Floats per window voxel held by a network's activations during a forward pass (an estimate for
# UNet-like networks; what matters is refusing runs that are off by orders of magnitude).
WINDOW_FLOATS_PER_VOXEL = 64


def estimated_memory_bytes(geometry: Geometry, card: ModelCard, settings: InferenceSettings) -> float:
    """Bytes a run is estimated to need: the volume on the model grid with its input channels,
    class probabilities and entropy; the outputs on the input grid; and the sliding windows."""
    millimetres = np.prod(np.asarray(geometry.shape, float) * np.asarray(geometry.spacing))
    model_voxels = millimetres / np.prod(card.preprocessing.spacing) if card.preprocessing.spacing else np.prod(np.asarray(geometry.shape, float))
    input_voxels = np.prod(np.asarray(geometry.shape, float))
    window_voxels = np.prod(np.asarray(settings.roi_size, float)) * settings.sw_batch_size
    floats = (model_voxels * (card.input_channels + 3 * card.num_classes + 2) + input_voxels * (card.num_classes + 2)
              + window_voxels * WINDOW_FLOATS_PER_VOXEL)
    return float(4 * floats)


def check_memory(geometry: Geometry, card: ModelCard, settings: InferenceSettings, limit_gb: float | None) -> None:
    """Refuse, before anything large is allocated, a run estimated to need more than ``limit_gb`` GiB
    (default: this computer's memory)."""
    needed = estimated_memory_bytes(geometry, card, settings)
    limit = limit_gb * 2**30 if limit_gb else physical_memory_bytes()
    if needed > limit:
        spacing = "x".join(f"{s:g}" for s in card.preprocessing.spacing) if card.preprocessing.spacing else "as stored"
        raise UserInputError(
            f"this run would need about {needed / 2**30:,.1f} GiB of memory (volume {geometry.describe()}; model spacing "
            f"{spacing} mm, {card.num_classes} classes, window {'x'.join(map(str, settings.roi_size))} x {settings.sw_batch_size}); "
            f"the limit is {limit / 2**30:,.1f} GiB{'' if limit_gb else ' (this computer)'}: raise it with --memory-limit GB"
        )


def load_case(options: RunOptions, progress: Progress, timings: Timings) -> Case:
    """Read and check the inputs, move the volume into the models' space and add the feature channels."""
    progress.stage("load", "reading the volume and the site models")
    with timings.measure("load"):
        volume = read_volume(options.volume)
        models = load_site_models(options.models, options.trust_code)
        check_compatible(models)
        card = models[0].card
        settings = inference_settings(models[0], options)
        check_memory(volume.geometry, card, settings, options.memory_limit_gb)
        reference = None
        if options.reference:
            reference = read_label_map(options.reference, volume.geometry)
            unknown = sorted(set(np.unique(reference.array).tolist()) - {l.value for l in card.labels})
            if unknown:
                raise UserInputError(
                    f"reference segmentation {options.reference} holds label values {unknown} that the models do not know "
                    f"(they predict {', '.join(f'{l.value}={l.name}' for l in card.labels)})"
                )
        scribbles = None
        if options.scribbles:  # checked now, not after the probe passes
            painted = read_label_map(options.scribbles, volume.geometry, "scribbles", allow_negative=True)
            scribbles = Volume(scribble_labels(painted, len(card.labels), options.unlabelled_value, options.scribbles), painted.geometry)
        device = resolve_device(options.device)
        # One forward pass at the probe's size checks channels and classes (an eighth of a window's cost);
        # a window the user chose is checked at the size it will run at (rounded up to the network's multiple).
        multiple = settings.spatial_multiple
        fitted = lambda size: tuple(round_up(s, m) for s, m in zip(size, multiple))
        check_runs(models[0], fitted(options.probe_size or default_probe_size(settings.roi_size, multiple)), "probe patch", device)
        if options.roi_size:
            check_runs(models[0], fitted(settings.roi_size), device=device)
    for model in models:
        for note in model.notes:
            progress.note(f"{model.name}: {note}")

    progress.stage("preprocess", f"resampling to the models' space ({card.preprocessing.orientation or 'as stored'})")
    with timings.measure("preprocess"):
        image = to_model_space(volume, card.preprocessing)

    spec = card.features
    if options.features and options.features != (spec.extractor if spec else "none"):
        raise UserInputError(
            f"--features {options.features}: the models were trained with "
            f"{spec.extractor + ' features' if spec else 'the image alone'}; they need exactly those input channels"
        )
    progress.stage("features", f"stable features: {spec.extractor}" if spec else "image only (no stable features)")
    with timings.measure("features"):
        extractor = get_extractor(spec.extractor, options.anatomix_weights, options.feature_cache) if spec else None
        cache = None if options.no_feature_cache or spec is None else FeatureCache(
            options.feature_cache / "features" if options.feature_cache else None)
        features = model_inputs(image.tensor.as_tensor(), spec, extractor, cache)
    if spec:
        progress.update(1.0, "stable features from the cache" if features.cached else "stable features computed")
    notes: list[str] = []
    settings = fit_to_volume(inference_settings(models[0], options), image.tensor.shape[1:], notes,
                             "--roi-size" if options.roi_size else "the model's sliding-window ROI")
    for note in notes:
        progress.note(note)
    return Case(volume, models, image, features.inputs, settings, device, reference, features.cached,
                InferenceReport(str(device), []), scribbles)


def site_probe_outputs(case: Case, probe: Probe, progress: Progress, taps: Taps | None = None):
    """Forward passes of every site model on the probe (the only passes the K models make).

    Returns the softmax outputs, and with ``taps`` also each model's tapped features (for ranking).
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
    outputs: list[torch.Tensor]
    tapped: list | None = None


def run_probe(case: Case, options: RunOptions, progress: Progress, timings: Timings) -> ProbeRun:
    progress.stage("probe", f"probe passes of {len(case.models)} site models")
    with timings.measure("probe"):
        probe = case.select_probe(options.probe_size, options.probe_patches, options.probe)
        for note in probe.notes:
            progress.note(note)
        taps = find_taps(case.models[0], probe.patches[:1]) if options.rank else None
        outputs, tapped = site_probe_outputs(case, probe, progress, taps)
    return ProbeRun(probe, outputs, tapped)


def plan_merge(case: Case, options: RunOptions, progress: Progress, timings: Timings) -> tuple[MergePlan, ProbeRun | None]:
    """The merge coefficients for ``options.method`` (from the method registry); returns the plan and the
    probe passes (if any). With one site model every method is that model: no probe, no merge."""
    models = case.models
    method = get_method(options.method)
    if len(models) == 1:
        progress.stage("merge", f"one site model: {models[0].name}")
        if method.name != "single":
            progress.note(f"one site model: the {method.label} is that model itself; no probe and no merge")
        return MergePlan(method.name, one_hot(0, 1)), None
    probe_run = run_probe(case, options, progress, timings) if method.uses_probe or options.rank else None
    if method.runs_every_model:
        progress.stage("merge", f"{method.label}: every site model runs on the whole volume")
        return MergePlan(method.name, None), probe_run
    progress.stage("merge", f"{method.label} of {len(models)} site models")
    context = PlanContext(models, options.merge_settings(), case.device, options.single_model)
    if probe_run is not None:
        context.probe, context.outputs = probe_run.probe, probe_run.outputs
        context.batch_size = probe_batch_size(probe_run.probe, case.settings.roi_size)
    with timings.measure("merge") if method.uses_probe else contextlib.nullcontext():
        return method.plan(context), probe_run


def run(options: RunOptions, progress: Progress | None = None) -> RunSummary:
    """Segment ``options.volume`` with the site models combined by ``options.method`` and write the outputs.

    Args:
        options: the run's options (``options.out``: the output folder).
        progress: receives stages, fractions and notes (default: silent).

    Returns:
        The run's summary, as written to ``summary.json``; its ``outputs`` are the written files' paths
        (with ``report`` and the saved model's files when asked for).
    """
    progress = progress or Progress()
    validate_options(options)
    if options.scribbles and not options.rank:
        options = replace(options, rank=True)  # scribbles are only used to rank
    if options.out is None:
        raise UserInputError("an output folder (--out) is needed")
    if options.save_model is not None:  # before the output folder takes its lock: the two may be one folder
        check_model_folder(options.save_model, options.overwrite, input_paths(options))
    output = OutputFolder(options.out, options.overwrite, input_paths(options), options.volume_format)
    timings = Timings()
    method = get_method(options.method)
    per_model_runs = options.per_model or (options.rank and options.reference)  # each site model's own result
    runs_every_model = method.runs_every_model or per_model_runs
    progress.plan([("load", 1), ("preprocess", 1), ("features", 2), ("probe", 2), ("merge", 1),
                   ("site models", 6 * len(options.models) if runs_every_model else 0),
                   ("adapt", 3 if options.adapt != "none" else 0), ("inference", 6),
                   ("evaluate", 1 if options.reference else 0), ("rank", 2 if options.rank else 0), ("write", 1)])
    try:
        output.expect(*(f"{name}.{options.volume_format}" for name in ("segmentation", "entropy") if options.segment),
                      *(["report.html"] if options.report else []))
        case = load_case(options, progress, timings)
        models = case.models
        if options.rank and len(models) < 2:
            raise UserInputError(f"--rank needs at least two models; {len(models)} given")
        plan, probe_run = plan_merge(case, options, progress, timings)
        per_model: dict[str, dict] = {}
        if plan.body is None or per_model_runs:  # plan.body None: the method combines full runs of every model
            average = plan.body is None and method.combine == "average"
            ensemble_sum, best = _run_every_model(case, options, output, per_model, progress, timings, average)
            if average:
                plan.details["members"] = [m.name for m in models]
            elif plan.body is None:
                plan = MergePlan(method.name, one_hot(best, len(models)), details={"selected": models[best].name})

        adapted, adaptation = adapt_merged(case, options, plan, probe_run, progress, timings)  # --adapt
        segmentation, evaluation, pseudo_labels, network = None, None, None, None
        if options.segment or not (options.reference or options.scribbles):
            progress.stage("inference", f"segmenting on {describe_device(case.device)}")
            with timings.measure("inference"):
                if plan.body is None:
                    probabilities = ensemble_sum / len(models)
                else:
                    network = adapted if adapted is not None else plan.network(models)
                    probabilities = case.probabilities(network, lambda f: progress.update(f, "segmenting"))
                segmentation = case.segment(probabilities, options.probabilities)
                pseudo_labels = predicted_labels(probabilities, dim=0).numpy() if options.rank else None
                del probabilities
            for note in case.report.notes:
                progress.note(note)
        if case.reference is not None and segmentation is not None:
            progress.stage("evaluate", "comparing with the reference segmentation")
            with timings.measure("evaluate"):
                evaluation = case.evaluate(segmentation.labels)

        ranking = None
        if options.rank:
            progress.stage("rank", "ranking the site models")
            with timings.measure("rank"):
                ranking = rank_case(case, options, probe_run, plan, pseudo_labels, per_model)
            output.json("ranking", "ranking.json", ranking.to_json())
            output.text("ranking_csv", "ranking.csv", ranking.to_csv())

        progress.stage("write", "writing the outputs")
        with timings.measure("write"):
            if options.segment:
                write_segmentation(output, "", segmentation, case)
        summary = build_summary(options, case, plan, timings, progress, evaluation, per_model)
        summary.ranking = RankingRecord(**ranking.to_json()) if ranking else None
        summary.adaptation = AdaptationRecord(**adaptation) if adaptation else None
        if options.save_model is not None and network is not None:
            summary.saved_model = save_run_model(case, options, plan, network, adaptation)
        outputs = output.commit(summary.to_json(), release=not options.report)
        outputs.update(summary.saved_model or {})
    except BaseException:
        output.abort()
        raise
    if options.report:  # after the commit: a report that fails never costs the run's results
        from .report import write_report

        try:
            outputs["report"] = str(write_report(options.out, overwrite=True, progress=progress))
        finally:
            output.release()
    progress.done(outputs)
    return replace(summary, outputs=outputs)


def adapt_merged(case: Case, options: RunOptions, plan: MergePlan, probe_run: ProbeRun | None, progress: Progress,
                 timings: Timings) -> tuple[torch.nn.Module | None, dict | None]:
    """--adapt: the merged network after collapse-safe test-time adaptation on the run's probe, and its record."""
    if options.adapt == "none" or not options.segment:
        return None, None
    probe_run = probe_run or run_probe(case, options, progress, timings)
    settings = options.adaptation_settings()
    progress.stage("adapt", f"test-time adaptation: {options.adapt.upper()}, {options.adapt_steps} steps")
    with timings.measure("adapt"):
        names = [label.name for label in case.labels]
        network, result = adapt(plan.network(case.models), probe_run.probe, settings, case.device,
                                probe_batch_size(probe_run.probe, case.settings.roi_size), names, progress)
    return network, result.describe(names, settings)


def save_run_model(case: Case, options: RunOptions, plan: MergePlan, network: torch.nn.Module, adaptation: dict | None) -> dict:
    """--save-model: write the network that segmented the volume as a site model (weights + card)."""
    adapted = None if adaptation is None else {key: adaptation[key] for key in (
        "method", "steps", "steps_run", "learning_rate", "seed", "reliable_below", "guard_fired", "restored")}
    volume = Path(options.volume).name
    card = merged_model_card(case.models, network, name=f"merged-{volume.split('.')[0]}", method=plan.method,
                             body=plan.body, head=plan.head, head_keys=plan.head_keys,
                             volume=volume, inference=inference_settings(case.models[0], options), adaptation=adapted)
    return write_model_artefact(network, card, options.save_model)


def label_source(case: Case, options: RunOptions, pseudo_labels: np.ndarray | None) -> LabelSource:
    """The labels the ranking trusts most: reference, then scribbles, then the merged prediction."""
    if case.scribbles is not None:
        in_model_space = labels_to_model_space(case.scribbles, case.image).numpy()
        return LabelSource("scribbles", in_model_space, f"scribbles {options.scribbles} (unlabelled = {options.unlabelled_value})")
    if case.reference is not None:
        return LabelSource("reference", labels_to_model_space(case.reference, case.image).numpy(), f"reference {options.reference}")
    if pseudo_labels is None:
        raise UserInputError("ranking needs labels: a reference, scribbles, or the merged prediction")
    return LabelSource("pseudo-label", pseudo_labels.astype(np.int64), "the merged model's own prediction (pseudo-label)")


def rank_case(case: Case, options: RunOptions, probe_run: ProbeRun, plan: MergePlan, pseudo_labels, per_model: dict):
    """Rank the site models on this case, reusing the run's probe passes and per-model results."""
    source = label_source(case, options, pseudo_labels)
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
    statistic = plan.details.get("statistic", options.statistic)
    uncertainty = plan.details.get("scores")
    if uncertainty is None:
        uncertainty = site_scores(stats, statistic)
    alpha = plan.body.tolist() if plan.method == "adaptive" and plan.body is not None else statistic_coefficients(
        stats, statistic, options.temperature).tolist()
    return rank_models(case.models, case.inputs, probe_run.probe, source, case.device, probe_run.tapped,
                       uncertainty=[float(u) for u in uncertainty], statistic=statistic, entropy=stats["entropy"],
                       alpha=alpha, true_dice=true_dice, seed=options.seed)


def _run_every_model(case: Case, options: RunOptions, output: OutputFolder, per_model: dict, progress: Progress, timings: Timings,
                     average: bool = False):
    """Full inference of each site model (per-model outputs, ensemble, oracle), one at a time in memory; with
    ``average`` also the sum of their softmax outputs. Returns that sum (or None) and the best model's index by Dice."""
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
            if options.per_model:
                write_segmentation(output, model.name, segmentation, case)
            per_model[model.name] = entry
    return ensemble_sum, best


def write_segmentation(output: OutputFolder, model_name: str, segmentation: Segmentation, case: Case) -> None:
    """Labels, entropy and (when kept) probabilities on the input grid; per-model files get the model's name."""
    suffix = f"_{safe_file_stem(model_name)}" if model_name else ""
    geometry = case.volume.geometry
    output.volume(output_key("segmentation", model_name), f"segmentation{suffix}", segmentation.labels, geometry)
    output.volume(output_key("entropy", model_name), f"entropy{suffix}", segmentation.entropy, geometry)
    if segmentation.probabilities is not None:
        for label, probability in zip(case.labels, segmentation.probabilities):
            output.volume(probability_key(label.name, model_name), f"probability_{safe_file_stem(label.name)}{suffix}", probability, geometry)


def input_paths(options: RunOptions) -> tuple[Path, ...]:
    """Every file or folder the run reads (volume, label maps, model files), which no output may replace."""
    paths = [Path(p) for p in (options.volume, options.reference, options.scribbles) if p]
    paths += [data for path in paths if path.is_file() for data in detached_data_files(path)]
    return tuple(paths + [file for model in expand_model_paths(options.models) for file in model_files(model)])


def _named(models, values) -> dict[str, float] | None:
    if values is None:
        return None
    return {m.name: round(float(v), 6) for m, v in zip(models, values)}


def build_summary(options: RunOptions, case: Case, plan: MergePlan, timings: Timings, progress: Progress,
                  evaluation: dict | None, per_model: dict) -> RunSummary:
    """The run's summary, without the ranking, adaptation and saved model (``run`` adds those).

    Args:
        options: the run's options.
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
        volume=VolumeRecord(str(options.volume), case.volume.geometry.describe()),
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
