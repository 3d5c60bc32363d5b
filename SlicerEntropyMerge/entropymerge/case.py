"""One target volume in the site models' space: reading and checking the inputs of a run.

``load_case`` reads the volume, the site models and the label maps, checks them, moves the volume
into the models' space and adds the stable-feature channels; the ``Case`` it returns is what every
later stage (probe, merge, inference, ranking, writing) works on.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .compatibility import check_compatible, check_runs
from .errors import UserInputError
from .features import FeatureCache, get_extractor, model_inputs
from .inference import InferenceReport, Segmentation, predict_logits, resolve_device, segmentation_from_probabilities
from .merging import STATISTICS
from .methods import get_method
from .metrics import evaluate
from .modelcard import InferenceSettings, ModelCard
from .models import SiteModel, expand_model_paths, load_site_models, model_files
from .padding import fit_to_volume, network_multiple, round_up
from .preprocessing import ModelSpaceImage, to_model_space
from .probe import Probe, default_probe_size, select_probe
from .progress import Progress
from .ranking import scribble_labels
from .settings import AdaptationSettings, InferenceOverrides, InputSettings, MergeSettings, OutputSettings, ProbeSettings, RankingSettings
from .validation import physical_memory_bytes
from .volume import Geometry, Volume, detached_data_files, read_label_map, read_volume


class Timings(dict):
    """Wall time (s) of each stage, in the order they ran."""

    @contextlib.contextmanager
    def measure(self, name: str):
        """Add the wall time of the ``with`` block to stage ``name`` (seconds, rounded to 0.1 ms)."""
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
        """The models' labels (value, name, colour), in class order."""
        return self.models[0].card.labels

    def probabilities(self, network: torch.nn.Module, progress=None) -> torch.Tensor:
        """Sliding-window class probabilities of ``network`` on the model grid.

        Args:
            network: a site model's network or the merged one.
            progress: optional callback taking the fraction of windows done.

        Returns:
            Softmax probabilities, shape (C, X, Y, Z), float32, on the CPU.
        """
        logits = predict_logits(network, self.inputs, self.settings, self.device, progress, self.report)
        return torch.softmax(logits[0].float(), dim=0)

    def select_probe(self, patch_size=None, patches: int = ProbeSettings.patches, mode: str = ProbeSettings.mode) -> Probe:
        """The probe for this case.

        Args:
            patch_size: patch size in voxels (X, Y, Z); None: ``default_probe_size`` of the ROI.
            patches: how many patches.
            mode: "patches" or "whole" (the volume at half resolution).

        Returns:
            The probe: patches of shape (P, C_in, X, Y, Z) and their description.
        """
        multiple = self.settings.spatial_multiple
        return select_probe(self.inputs, patch_size or default_probe_size(self.settings.roi_size, multiple), patches, mode,
                            multiple)

    def segment(self, probabilities: torch.Tensor, keep_probabilities: bool = False) -> Segmentation:
        """Labels and entropy on the input grid from class probabilities (C, X, Y, Z) on the model grid."""
        return segmentation_from_probabilities(probabilities, self.image, keep_probabilities)

    def evaluate(self, labels: np.ndarray) -> dict | None:
        """Dice and HD95 (mm) of ``labels`` (input grid) against the reference; None without a reference."""
        if self.reference is None:
            return None
        return evaluate(labels, self.reference.array, self.labels, self.volume.geometry.spacing)


def validate_settings(merge: MergeSettings, inference: InferenceOverrides, adaptation: AdaptationSettings,
                      inputs: InputSettings, output: OutputSettings) -> None:
    """Cheap checks of the settings' values, before any file is read.

    Args:
        merge: the merge method and its parameters.
        inference: the user's inference overrides.
        adaptation: the test-time adaptation.
        inputs: the run's input files (only whether a reference is given is checked).
        output: what the run writes (only ``save_model`` is checked).

    Raises:
        UserInputError: naming the option and the value it cannot take.
    """
    method = get_method(merge.method)
    for name in ("temperature", "head_temperature"):
        value = getattr(merge, name)
        if value is not None and not value > 0:
            raise UserInputError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if merge.statistic not in STATISTICS:
        raise UserInputError(f"unknown statistic {merge.statistic!r}; choose one of {', '.join(STATISTICS)}")
    if method.needs_reference and inputs.reference is None:
        raise UserInputError(f"--method {method.name} ({method.description}) needs --reference")
    if inference.overlap is not None and not 0 <= inference.overlap < 1:
        raise UserInputError(f"--overlap must be in [0, 1), got {inference.overlap}")
    if adaptation.method != "none":
        if method.combine == "average":
            raise UserInputError(f"--adapt adapts the single merged network, but --method {method.name} runs every model")
        adaptation.check()
    if output.save_model is not None and method.combine == "average":
        raise UserInputError(f"--save-model saves the one network that segments the volume, but --method {method.name} runs every model")


def inference_settings(model: SiteModel, overrides: InferenceOverrides) -> InferenceSettings:
    """The model card's inference settings with the user's overrides applied.

    Args:
        model: the first site model (all share the card's inference settings).
        overrides: the user's ROI, overlap and windows per pass (an ROI means sliding windows).

    Returns:
        The inference settings, with the size multiple the network needs.
    """
    settings = replace(model.card.inference, spatial_multiple=network_multiple(model.card.network))
    if overrides.roi_size:
        settings = replace(settings, roi_size=tuple(overrides.roi_size), inferer="sliding_window")
    if overrides.overlap is not None:
        settings = replace(settings, overlap=overrides.overlap)
    if overrides.sw_batch_size:
        settings = replace(settings, sw_batch_size=overrides.sw_batch_size)
    return settings


# Floats per window voxel held by a network's activations during a forward pass (an estimate for
# UNet-like networks; what matters is refusing runs that are off by orders of magnitude).
WINDOW_FLOATS_PER_VOXEL = 64


def estimated_memory_bytes(geometry: Geometry, card: ModelCard, settings: InferenceSettings) -> float:
    """Bytes a run is estimated to need: the volume on the model grid with its input channels,
    class probabilities and entropy; the outputs on the input grid; and the sliding windows.

    Args:
        geometry: the input volume's grid.
        card: the site models' card (spacing, channels, classes).
        settings: the inference settings (ROI, windows per pass).

    Returns:
        The estimate in bytes (float32 everywhere).
    """
    millimetres = np.prod(np.asarray(geometry.shape, float) * np.asarray(geometry.spacing))
    model_voxels = millimetres / np.prod(card.preprocessing.spacing) if card.preprocessing.spacing else np.prod(np.asarray(geometry.shape, float))
    input_voxels = np.prod(np.asarray(geometry.shape, float))
    window_voxels = np.prod(np.asarray(settings.roi_size, float)) * settings.sw_batch_size
    floats = (model_voxels * (card.input_channels + 3 * card.num_classes + 2) + input_voxels * (card.num_classes + 2)
              + window_voxels * WINDOW_FLOATS_PER_VOXEL)
    return float(4 * floats)


def check_memory(geometry: Geometry, card: ModelCard, settings: InferenceSettings, limit_gb: float | None) -> None:
    """Refuse, before anything large is allocated, a run estimated to need more than ``limit_gb`` GiB
    (None: this computer's memory).

    Raises:
        UserInputError: with the estimate, what it depends on and how to raise the limit.
    """
    needed = estimated_memory_bytes(geometry, card, settings)
    limit = limit_gb * 2**30 if limit_gb else physical_memory_bytes()
    if needed > limit:
        spacing = "x".join(f"{s:g}" for s in card.preprocessing.spacing) if card.preprocessing.spacing else "as stored"
        raise UserInputError(
            f"this run would need about {needed / 2**30:,.1f} GiB of memory (volume {geometry.describe()}; model spacing "
            f"{spacing} mm, {card.num_classes} classes, window {'x'.join(map(str, settings.roi_size))} x {settings.sw_batch_size}); "
            f"the limit is {limit / 2**30:,.1f} GiB{'' if limit_gb else ' (this computer)'}: raise it with --memory-limit GB"
        )


def load_case(inputs: InputSettings, inference: InferenceOverrides = InferenceOverrides(),
              probe: ProbeSettings = ProbeSettings(), ranking: RankingSettings = RankingSettings(),
              progress: Progress | None = None, timings: Timings | None = None) -> Case:
    """Read and check the inputs, move the volume into the models' space and add the feature channels.

    Args:
        inputs: the volume, site models, reference and feature options.
        inference: the user's inference overrides (device, ROI, overlap, memory limit).
        probe: the probe (its patch size is checked with one forward pass).
        ranking: the scribbles and their unlabelled value, read and checked here.
        progress: reports the load, preprocess and features stages.
        timings: receives those stages' wall times.

    Returns:
        The case: the volume, the models, the inputs (1, C_in, X, Y, Z) on the model grid and the
        inference settings fitted to the volume.
    """
    progress = progress or Progress()
    timings = timings if timings is not None else Timings()
    progress.stage("load", "reading the volume and the site models")
    with timings.measure("load"):
        volume = read_volume(inputs.volume)
        models = load_site_models(list(inputs.models), inputs.trust_code)
        check_compatible(models)
        card = models[0].card
        settings = inference_settings(models[0], inference)
        check_memory(volume.geometry, card, settings, inference.memory_limit_gb)
        reference = None
        if inputs.reference:
            reference = read_label_map(inputs.reference, volume.geometry)
            unknown = sorted(set(np.unique(reference.array).tolist()) - {l.value for l in card.labels})
            if unknown:
                raise UserInputError(
                    f"reference segmentation {inputs.reference} holds label values {unknown} that the models do not know "
                    f"(they predict {', '.join(f'{l.value}={l.name}' for l in card.labels)})"
                )
        scribbles = None
        if ranking.scribbles:  # checked now, not after the probe passes
            painted = read_label_map(ranking.scribbles, volume.geometry, "scribbles", allow_negative=True)
            scribbles = Volume(scribble_labels(painted, len(card.labels), ranking.unlabelled_value, ranking.scribbles), painted.geometry)
        device = resolve_device(inference.device)
        # One forward pass at the probe's size checks channels and classes (an eighth of a window's cost);
        # a window the user chose is checked at the size it will run at (rounded up to the network's multiple).
        multiple = settings.spatial_multiple
        fitted = lambda size: tuple(round_up(s, m) for s, m in zip(size, multiple))
        check_runs(models[0], fitted(probe.size or default_probe_size(settings.roi_size, multiple)), "probe patch", device)
        if inference.roi_size:
            check_runs(models[0], fitted(settings.roi_size), device=device)
    for model in models:
        for note in model.notes:
            progress.note(f"{model.name}: {note}")

    progress.stage("preprocess", f"resampling to the models' space ({card.preprocessing.orientation or 'as stored'})")
    with timings.measure("preprocess"):
        image = to_model_space(volume, card.preprocessing)

    spec = card.features
    if inputs.features and inputs.features != (spec.extractor if spec else "none"):
        raise UserInputError(
            f"--features {inputs.features}: the models were trained with "
            f"{spec.extractor + ' features' if spec else 'the image alone'}; they need exactly those input channels"
        )
    progress.stage("features", f"stable features: {spec.extractor}" if spec else "image only (no stable features)")
    with timings.measure("features"):
        extractor = get_extractor(spec.extractor, inputs.anatomix_weights, inputs.feature_cache) if spec else None
        cache = None if inputs.no_feature_cache or spec is None else FeatureCache(
            inputs.feature_cache / "features" if inputs.feature_cache else None)
        features = model_inputs(image.tensor.as_tensor(), spec, extractor, cache)
    if spec:
        progress.update(1.0, "stable features from the cache" if features.cached else "stable features computed")
    notes: list[str] = []
    settings = fit_to_volume(inference_settings(models[0], inference), image.tensor.shape[1:], notes,
                             "--roi-size" if inference.roi_size else "the model's sliding-window ROI")
    for note in notes:
        progress.note(note)
    return Case(volume, models, image, features.inputs, settings, device, reference, features.cached,
                InferenceReport(str(device), []), scribbles)


def input_paths(inputs: InputSettings, scribbles: Path | None = None) -> tuple[Path, ...]:
    """Every file or folder the run reads, which no output may replace.

    Args:
        inputs: the volume, the reference and the site models.
        scribbles: the ranking's scribble label map, if any.

    Returns:
        The paths: the volume and label maps with their detached data files, and every model file.
    """
    paths = [Path(p) for p in (inputs.volume, inputs.reference, scribbles) if p]
    paths += [data for path in paths if path.is_file() for data in detached_data_files(path)]
    return tuple(paths + [file for model in expand_model_paths(list(inputs.models)) for file in model_files(model)])
