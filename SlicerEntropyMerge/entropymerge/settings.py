"""The engine's settings: one dataclass per stage, and the only place their defaults live.

Each stage of a run takes its own settings (``MergeSettings``, ``ProbeSettings``,
``InferenceOverrides``, ``AdaptationSettings``, ``RankingSettings``, ``OutputSettings``,
``InputSettings``). ``RunOptions`` is the flat form that the command line, batch runs and the
Slicer module fill in; it exists only at that boundary and splits into the stage settings.
``options_from_arguments`` is the one mapping from parsed command-line arguments to it.

Importing this module is cheap (no torch, no numpy): the Slicer module reads the defaults here.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Tuple

from .errors import UserInputError

Size3 = Tuple[int, int, int]

ADAPT_METHODS = ("none", "tent", "dsbr")
PROBE_MODES = ("patches", "whole")
BATCHNORM_POLICIES = ("merge", "reestimate")


@dataclass(frozen=True)
class MergeSettings:
    """How the site models are combined (METHODS.md section 2).

    Attributes:
        method: a name in the method registry (``methods.METHODS``).
        single_model: with ``method="single"``: the name or index of the model to use.
        temperature: tau of the body coefficients alpha = softmax(-s / tau).
        head_temperature: tau of the head coefficients beta; None: ``temperature``.
        decouple_head: merge the head with its own coefficients beta (False: with alpha).
        statistic: the per-model uncertainty score s_k (a name in ``merging.STATISTICS``).
        refine: forward-only search over a few candidate coefficient vectors.
        batchnorm: batch-norm statistics of the merged model: "merge" or "reestimate" on the probe.
    """

    method: str = "adaptive"
    single_model: Optional[str] = None
    temperature: float = 0.05
    head_temperature: Optional[float] = None
    decouple_head: bool = True
    statistic: str = "trimmed_mean"  # chosen by benchmarks/merging_quality.py (issue 12)
    refine: bool = False
    batchnorm: str = "merge"

    @property
    def head_tau(self) -> float:
        """The head's temperature: ``head_temperature``, or ``temperature`` when it is not set."""
        return self.temperature if self.head_temperature is None else self.head_temperature


@dataclass(frozen=True)
class ProbeSettings:
    """The probe: the few patches on which the K site models run (METHODS.md section 2).

    Attributes:
        mode: "patches" (ROI-sized patches over the body) or "whole" (the volume at half resolution).
        patches: how many patches.
        size: patch size in voxels (X, Y, Z); None: half the ROI, a multiple of 16.
    """

    mode: str = "patches"
    patches: int = 8
    size: Optional[Size3] = None


@dataclass(frozen=True)
class InferenceOverrides:
    """The user's overrides of the model card's inference settings.

    Attributes:
        device: "auto" (GPU when available), "cpu", "cuda" or "cuda:N".
        roi_size: sliding-window size in voxels; None: the card's inferer.
        overlap: sliding-window overlap in [0, 1); None: the card's.
        sw_batch_size: windows per forward pass; None: the card's.
        memory_limit_gb: refuse runs estimated to need more (GiB); None: this computer's memory.
    """

    device: str = "auto"
    roi_size: Optional[Size3] = None
    overlap: Optional[float] = None
    sw_batch_size: Optional[int] = None
    memory_limit_gb: Optional[float] = None


@dataclass(frozen=True)
class AdaptationSettings:
    """Test-time adaptation of the merged network on the probe (METHODS.md section 3).

    Attributes:
        method: "none", "tent" or "dsbr".
        steps: Adam steps.
        learning_rate: Adam learning rate.
        seed: seed of the patch order.
        restore_on_collapse: False: the guard only records when it would have fired (benchmarks).
        reliable_below: only voxels with normalised entropy below this fraction of log C count (SAR/EATA).
        prior_weight: weight of KL(start class proportions || now): holds the predicted class mix in place.
    """

    method: str = "none"
    steps: int = 10
    learning_rate: float = 1e-3
    seed: int = 0
    restore_on_collapse: bool = True
    reliable_below: Optional[float] = None
    prior_weight: float = 0.0

    def check(self) -> None:
        """Raise ``UserInputError`` for a value the adaptation cannot use."""
        if self.method not in ADAPT_METHODS:
            raise UserInputError(f"unknown adaptation {self.method!r}; choose one of {', '.join(ADAPT_METHODS)}")
        if self.steps < 1:
            raise UserInputError(f"--adapt-steps must be at least 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise UserInputError(f"--adapt-lr must be > 0, got {self.learning_rate}")
        if self.reliable_below is not None and not 0 < self.reliable_below <= 1:
            raise UserInputError(f"--adapt-reliable must be in (0, 1] (a fraction of log C), got {self.reliable_below}")
        if not self.prior_weight >= 0:
            raise UserInputError(f"--adapt-prior must be >= 0, got {self.prior_weight}")


@dataclass(frozen=True)
class RankingSettings:
    """The transferability ranking of the site models.

    Attributes:
        rank: rank the site models at all.
        scribbles: sparse label map (on the volume's grid) as the ranking's labels.
        unlabelled_value: the scribble value of unpainted voxels.
        seed: seed of the ranking's voxel sampling.
    """

    rank: bool = False
    scribbles: Optional[Path] = None
    unlabelled_value: int = 255
    seed: int = 0


@dataclass(frozen=True)
class OutputSettings:
    """What a run writes, and where.

    Attributes:
        out: the output folder.
        overwrite: replace the results of an earlier run in ``out``.
        volume_format: file format of the output volumes ("nii.gz", "nrrd", ...).
        probabilities: also write one probability map per class.
        per_model: also write each site model's segmentation and entropy map.
        report: also write report.html.
        save_model: folder for the network that segmented the volume (safetensors + model card).
        segment: False: rank only (the merged model runs only when its prediction is the label source).
    """

    out: Optional[Path] = None
    overwrite: bool = False
    volume_format: str = "nii.gz"
    probabilities: bool = False
    per_model: bool = False
    report: bool = False
    save_model: Optional[Path] = None
    segment: bool = True


@dataclass(frozen=True)
class InputSettings:
    """The files a run reads and how to read them.

    Attributes:
        volume: the target volume (NIfTI, NRRD, MHA/MHD or a DICOM series folder).
        models: site model files or folders.
        reference: reference segmentation on the volume's grid (adds Dice and HD95).
        features: the stable features the user expects ("mind-ssc", "anatomix", "none"); None: the card's.
        anatomix_weights: path of anatomix.pth.
        feature_cache: cache folder; None: $ENTROPYMERGE_CACHE or ~/.cache/entropymerge.
        no_feature_cache: always recompute the features.
        trust_code: allow code in bundles and TorchScript models.
    """

    volume: Path
    models: tuple
    reference: Optional[Path] = None
    features: Optional[str] = None
    anatomix_weights: Optional[Path] = None
    feature_cache: Optional[Path] = None
    no_feature_cache: bool = False
    trust_code: bool = False


_MERGE, _PROBE, _INFERENCE = MergeSettings(), ProbeSettings(), InferenceOverrides()
_ADAPTATION, _RANKING, _OUTPUT = AdaptationSettings(), RankingSettings(), OutputSettings()


@dataclass
class RunOptions:
    """Everything ``entropymerge run`` takes, flat, as the command line and the Slicer module give it.

    Only the boundary (CLI, batch, Slicer Lib, evaluation) builds one; the stages take the settings
    its methods return. The defaults are the stage settings' defaults.
    """

    volume: Path
    models: list
    out: Optional[Path] = _OUTPUT.out
    method: str = _MERGE.method
    single_model: Optional[str] = _MERGE.single_model
    temperature: float = _MERGE.temperature
    head_temperature: Optional[float] = _MERGE.head_temperature
    decouple_head: bool = _MERGE.decouple_head
    statistic: str = _MERGE.statistic
    refine: bool = _MERGE.refine
    batchnorm: str = _MERGE.batchnorm
    probe: str = _PROBE.mode
    probe_patches: int = _PROBE.patches
    probe_size: Optional[Size3] = _PROBE.size
    features: Optional[str] = None
    anatomix_weights: Optional[Path] = None
    feature_cache: Optional[Path] = None
    no_feature_cache: bool = False
    reference: Optional[Path] = None
    per_model: bool = _OUTPUT.per_model
    rank: bool = _RANKING.rank
    scribbles: Optional[Path] = _RANKING.scribbles
    unlabelled_value: int = _RANKING.unlabelled_value
    seed: int = _RANKING.seed  # also the adaptation's seed
    segment: bool = _OUTPUT.segment
    device: str = _INFERENCE.device
    roi_size: Optional[Size3] = _INFERENCE.roi_size
    overlap: Optional[float] = _INFERENCE.overlap
    sw_batch_size: Optional[int] = _INFERENCE.sw_batch_size
    probabilities: bool = _OUTPUT.probabilities
    volume_format: str = _OUTPUT.volume_format
    trust_code: bool = False
    overwrite: bool = _OUTPUT.overwrite
    adapt: str = _ADAPTATION.method
    adapt_steps: int = _ADAPTATION.steps
    adapt_lr: float = _ADAPTATION.learning_rate
    adapt_reliable: Optional[float] = _ADAPTATION.reliable_below
    adapt_prior: float = _ADAPTATION.prior_weight
    report: bool = _OUTPUT.report
    memory_limit_gb: Optional[float] = _INFERENCE.memory_limit_gb
    save_model: Optional[Path] = _OUTPUT.save_model

    def merge_settings(self) -> MergeSettings:
        """The merge's settings."""
        return MergeSettings(self.method, self.single_model, self.temperature, self.head_temperature, self.decouple_head,
                             self.statistic, self.refine, self.batchnorm)

    def probe_settings(self) -> ProbeSettings:
        """The probe's settings (the patch size as a tuple)."""
        return ProbeSettings(self.probe, self.probe_patches, tuple(self.probe_size) if self.probe_size else None)

    def inference_overrides(self) -> InferenceOverrides:
        """The user's overrides of the model card's inference settings."""
        return InferenceOverrides(self.device, tuple(self.roi_size) if self.roi_size else None, self.overlap,
                                  self.sw_batch_size, self.memory_limit_gb)

    def adaptation_settings(self) -> AdaptationSettings:
        """The test-time adaptation's settings (its seed is ``seed``)."""
        return AdaptationSettings(self.adapt, self.adapt_steps, self.adapt_lr, self.seed, reliable_below=self.adapt_reliable,
                                  prior_weight=self.adapt_prior)

    def ranking_settings(self) -> RankingSettings:
        """The ranking's settings (its seed is ``seed``)."""
        return RankingSettings(self.rank, self.scribbles, self.unlabelled_value, self.seed)

    def output_settings(self) -> OutputSettings:
        """What the run writes, and where."""
        return OutputSettings(self.out, self.overwrite, self.volume_format, self.probabilities, self.per_model, self.report,
                              self.save_model, self.segment)

    def input_settings(self) -> InputSettings:
        """The files the run reads (the models as a tuple)."""
        return InputSettings(self.volume, tuple(self.models), self.reference, self.features, self.anatomix_weights,
                             self.feature_cache, self.no_feature_cache, self.trust_code)


RUN_OPTION_NAMES = frozenset(f.name for f in fields(RunOptions))
# parsed arguments that steer the command line itself, not the run
COMMAND_LINE_ONLY = frozenset({"command", "progress"})


def options_from_arguments(arguments: argparse.Namespace | Mapping, ignore: Iterable[str] = ()) -> RunOptions:
    """The one mapping from parsed command-line arguments to ``RunOptions``.

    Args:
        arguments: an ``argparse.Namespace`` (or a mapping) whose names are ``RunOptions`` fields.
        ignore: names of the command's own arguments that are not run options (e.g. ``steps`` of ``path``).

    Returns:
        The run options. A name that is neither a field nor ignored raises ``TypeError``: a misspelt
        ``dest`` fails loudly instead of being silently dropped.
    """
    values = dict(arguments) if isinstance(arguments, Mapping) else dict(vars(arguments))
    for name in COMMAND_LINE_ONLY | set(ignore):
        values.pop(name, None)
    unknown = sorted(set(values) - RUN_OPTION_NAMES)
    if unknown:
        raise TypeError(f"arguments that are not run options: {', '.join(unknown)}")
    return RunOptions(**values)
