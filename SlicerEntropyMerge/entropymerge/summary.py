"""The run summary (``summary.json``): one typed record that the engine writes and the report, batch,
the command line and the Slicer scene read.

A run writes ``RunSummary.to_json()`` as its ``summary.json`` (the output folder adds the file list
last). ``read_summary`` and ``read_summary_file`` are the only way to read one: they accept the
current format and every older one (a summary without ``format_version`` is format 1), refuse a
newer format, and explain a missing key or a corrupt file as a ``UserInputError``.

Standard library only: the Slicer module imports this before the engine's packages are installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UserInputError

FORMAT_VERSION = 2  # 2: adds "format_version"; otherwise as format 1 (the summaries written before it had a version)
SUMMARY_NAME = "summary.json"


def output_key(kind: str, model_name: str = "") -> str:
    """The key of an output file in ``RunSummary.outputs``.

    Args:
        kind: what the file holds: ``"segmentation"``, ``"entropy"`` or ``"probability_<label>"``.
        model_name: the site model whose own result it is; empty for the run's (merged) result.

    Returns:
        ``kind`` for the run's result, ``kind_<model_name>`` for a site model's.
    """
    return f"{kind}_{model_name}" if model_name else kind


def probability_key(label_name: str, model_name: str = "") -> str:
    """The key of a class-probability map in ``RunSummary.outputs``.

    Args:
        label_name: the label (class) whose probability the map holds.
        model_name: the site model whose own result it is; empty for the run's (merged) result.

    Returns:
        ``probability_<label_name>``, followed by ``_<model_name>`` for a site model's map.
    """
    return output_key(f"probability_{label_name}", model_name)


class _MissingKey(Exception):
    """A required key is absent; ``args[0]`` is its dotted path in the summary."""


def _get(data: dict, key: str, where: str) -> Any:
    """``data[key]``, or ``_MissingKey`` naming ``where.key``."""
    if not isinstance(data, dict):
        raise TypeError(f"{where or 'the summary'} is {type(data).__name__}, not an object")
    if key not in data:
        raise _MissingKey(f"{where}.{key}" if where else key)
    return data[key]


def _record(cls, data: dict, where: str):
    """A record of type ``cls`` from its JSON object: every field required."""
    return cls(**{item.name: _get(data, item.name, where) for item in fields(cls)})


@dataclass
class VolumeRecord:
    """The target volume: its path as given, and ``Geometry.describe()`` of its grid."""

    path: str = ""
    geometry: str = ""


@dataclass
class ModelRecord:
    """One site model of the run."""

    name: str
    site: str | None
    source: str  # the file or folder it was loaded from
    kind: str  # the model format
    parameters: int


@dataclass
class LabelRecord:
    """One class the models predict: its value in the label map, name and colour (``#rrggbb``)."""

    value: int
    name: str
    color: str


@dataclass
class Coefficients:
    """Merging coefficients per model name, body (alpha) and head (beta); None for methods that merge no weights."""

    body: dict[str, float] | None = None
    head: dict[str, float] | None = None


@dataclass
class FeatureRecord:
    """The stable-feature extractor the models were trained with (``spec``: extractor, version, channels;
    None for the image alone), and whether this volume's features came from the cache."""

    spec: dict[str, Any] | None = None
    from_cache: bool = False


@dataclass
class InferenceRecord:
    """The inference settings the run used (sliding-window ROI in model-grid voxels)."""

    inferer: str = ""
    roi_size: list[int] = field(default_factory=list)
    overlap: float = 0.0
    sw_batch_size: int = 1
    mode: str = ""
    padding_mode: str = ""


@dataclass
class ClassScores:
    """Dice (0 to 1) and HD95 (mm) of one foreground class; ``in_reference``: the reference holds the class."""

    dice: float | None
    hd95_mm: float | None
    in_reference: bool


@dataclass
class Evaluation:
    """A segmentation against the reference: scores per class name, and their means over the classes present."""

    per_class: dict[str, ClassScores]
    mean_dice: float | None
    mean_hd95_mm: float | None
    classes_in_reference: list[str]

    @classmethod
    def from_json(cls, data: dict, where: str = "evaluation") -> Evaluation:
        """The record from ``metrics.evaluate``'s dict (or its JSON); ``where``: its key path, for messages."""
        per_class = _get(data, "per_class", where)
        return cls({name: _record(ClassScores, scores, f"{where}.per_class.{name}") for name, scores in per_class.items()},
                   *(_get(data, key, where) for key in ("mean_dice", "mean_hd95_mm", "classes_in_reference")))

    def to_json(self) -> dict:
        """The record as ``metrics.evaluate`` gives it (plain JSON types, same key order)."""
        return {"per_class": {name: vars(scores).copy() for name, scores in self.per_class.items()}, "mean_dice": self.mean_dice,
                "mean_hd95_mm": self.mean_hd95_mm, "classes_in_reference": list(self.classes_in_reference)}


@dataclass
class ModelResult:
    """A site model's own full run on the volume (``--per-model``, ensembles, ranking with a reference)."""

    evaluation: Evaluation | None = None

    @classmethod
    def from_json(cls, data: dict, where: str) -> ModelResult:
        """The record from ``{}`` or ``{"evaluation": ...}``; ``where``: its key path, for messages."""
        if not isinstance(data, dict):
            raise TypeError(f"{where} is {type(data).__name__}, not an object")
        evaluation = data.get("evaluation")
        return cls(Evaluation.from_json(evaluation, f"{where}.evaluation") if evaluation else None)

    def to_json(self) -> dict:
        """``{"evaluation": ...}``, or ``{}`` when the model ran without a reference."""
        return {"evaluation": self.evaluation.to_json()} if self.evaluation else {}


@dataclass
class RankingRecord:
    """The transferability ranking (``--rank``), as ``ranking.Ranking.to_json`` gives it.

    ``columns``: one dict per table column (key, title, question, labels, better); ``rows``: one dict
    per model, keyed by column key; ``as_is_basis``: the column key the rows are ordered by.
    """

    label_source: str
    self_referenced: bool
    description: str
    questions: dict[str, str]
    as_is_basis: str
    statistic: str | None
    columns: list[dict[str, Any]]
    fusion_weight: float | None
    samples: Any
    taps: Any
    rows: list[dict[str, Any]]
    weighted_kendall_tau: dict[str, dict[str, float]] | None
    notes: list[str]
    seconds: float


@dataclass
class AdaptationRecord:
    """Test-time adaptation of the merged network (``--adapt``), as ``AdaptationResult.describe`` gives it;
    proportions are class fractions by class name."""

    method: str
    steps: int
    steps_run: int
    learning_rate: float
    seed: int
    adapted_parameters: Any
    identity_affine_layers: Any
    reliable_below: float | None
    prior_weight: float
    reliable_fraction_per_step: list[float]
    loss_per_step: list[float]
    proportions_before: dict[str, float]
    proportions_after: dict[str, float]
    foreground_fraction_per_step: list[float]
    guard_fired: bool
    guard: Any
    restored: bool


def _copy(record) -> dict:
    return dict(vars(record))


@dataclass
class RunSummary:
    """Everything a finished run records, in the order ``summary.json`` lists it.

    ``outputs`` maps an output key (``output_key``, ``probability_key``; also ``ranking``, ``ranking_csv``,
    ``summary``, ``report``, ``model_card``, ``model_weights``) to its file: a path inside the run folder
    as returned by ``pipeline.run`` and ``read_summary``. ``timings_s``: wall seconds per stage, in the
    order the stages ran. ``merge_details``: what the method reports (e.g. ``statistic``, ``scores`` per
    model). ``probe_statistics``: per statistic, its value per model name.
    """

    entropymerge_version: str = __version__
    created: str = ""
    volume: VolumeRecord = field(default_factory=VolumeRecord)
    models: list[ModelRecord] = field(default_factory=list)
    labels: list[LabelRecord] = field(default_factory=list)
    method: str = ""
    coefficients: Coefficients = field(default_factory=Coefficients)
    decoupled_head: bool = False
    probe_statistics: dict[str, dict[str, float]] | None = None
    merge_details: dict[str, Any] = field(default_factory=dict)
    features: FeatureRecord = field(default_factory=FeatureRecord)
    device: str = ""
    inference: InferenceRecord = field(default_factory=InferenceRecord)
    evaluation: Evaluation | None = None
    per_model: dict[str, ModelResult] | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    ranking: RankingRecord | None = None
    adaptation: AdaptationRecord | None = None
    saved_model: dict[str, str] | None = None  # --save-model: model_card and model_weights files; absent from the file when None
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def model_names(self) -> list[str]:
        """The site models' names, in the run's order."""
        return [model.name for model in self.models]

    @property
    def has_segmentation(self) -> bool:
        """False for a ranking-only run, which writes no segmentation."""
        return output_key("segmentation") in self.outputs

    def to_json(self) -> dict:
        """The summary as ``summary.json`` holds it (plain JSON types, same key order).

        Returns:
            A dict with ``format_version`` first, then the fields in declaration order; ``saved_model``
            only when a model was saved.
        """
        data: dict[str, Any] = {"format_version": FORMAT_VERSION}
        data.update(entropymerge_version=self.entropymerge_version, created=self.created, volume=_copy(self.volume),
                    models=[_copy(m) for m in self.models], labels=[_copy(l) for l in self.labels], method=self.method,
                    coefficients=_copy(self.coefficients), decoupled_head=self.decoupled_head,
                    probe_statistics=self.probe_statistics, merge_details=self.merge_details, features=_copy(self.features),
                    device=self.device, inference=_copy(self.inference),
                    evaluation=self.evaluation.to_json() if self.evaluation else None,
                    per_model={name: entry.to_json() for name, entry in self.per_model.items()} if self.per_model else None,
                    timings_s=dict(self.timings_s), notes=list(self.notes), versions=dict(self.versions),
                    ranking=_copy(self.ranking) if self.ranking else None,
                    adaptation=_copy(self.adaptation) if self.adaptation else None)
        if self.saved_model is not None:
            data["saved_model"] = dict(self.saved_model)
        data["outputs"] = dict(self.outputs)
        return data

    @classmethod
    def from_json(cls, data: dict) -> RunSummary:
        """The summary from its JSON form (any format up to ``FORMAT_VERSION``); raises ``_MissingKey``, ``TypeError``."""
        def get(key: str):
            return _get(data, key, "")

        def optional(key: str, read):
            # absent or null: summaries written before this stage existed (evaluation, per_model, ranking, adaptation) read too
            value = data.get(key)
            return None if value is None else read(value, key)

        return cls(
            entropymerge_version=get("entropymerge_version"), created=get("created"), volume=_record(VolumeRecord, get("volume"), "volume"),
            models=[_record(ModelRecord, m, f"models.{i}") for i, m in enumerate(get("models"))],
            labels=[_record(LabelRecord, l, f"labels.{i}") for i, l in enumerate(get("labels"))],
            method=get("method"), coefficients=_record(Coefficients, get("coefficients"), "coefficients"), decoupled_head=get("decoupled_head"),
            probe_statistics=get("probe_statistics"), merge_details=get("merge_details"),
            features=_record(FeatureRecord, get("features"), "features"),
            device=get("device"), inference=_record(InferenceRecord, get("inference"), "inference"),
            evaluation=optional("evaluation", Evaluation.from_json),
            per_model=optional("per_model", lambda entries, where: {
                name: ModelResult.from_json(entry, f"{where}.{name}") for name, entry in entries.items()}),
            timings_s=get("timings_s"), notes=get("notes"), versions=get("versions"),
            ranking=optional("ranking", lambda data, where: _record(RankingRecord, data, where)),
            adaptation=optional("adaptation", lambda data, where: _record(AdaptationRecord, data, where)),
            saved_model=data.get("saved_model"), outputs=get("outputs"),
        )


def read_summary(folder: str | Path) -> RunSummary:
    """The summary of the finished run in ``folder``.

    Args:
        folder: the run's output folder (it holds ``summary.json``).

    Returns:
        The summary, with ``outputs`` as paths inside ``folder``.

    Raises:
        UserInputError: the folder holds no finished run, or its summary is unreadable (see ``read_summary_file``).
    """
    folder = Path(folder)
    if not (folder / SUMMARY_NAME).is_file():
        raise UserInputError(f"{folder} holds no finished run ({SUMMARY_NAME} is missing)")
    return read_summary_file(folder / SUMMARY_NAME)


def read_summary_file(path: str | Path) -> RunSummary:
    """A run summary file (format 1, the summaries without ``format_version``, up to ``FORMAT_VERSION``).

    Args:
        path: the ``summary.json`` file.

    Returns:
        The summary, with ``outputs`` as paths beside ``path``.

    Raises:
        UserInputError: the file is missing or not valid JSON, was written in a newer format, or lacks a
            required key (the message names the key and the file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"no run summary at {path}") from None
    except OSError as error:
        raise UserInputError(f"cannot read {path}: {error.strerror or error}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path} is not a run summary (it holds a JSON {type(data).__name__}, not an object)")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserInputError(f"{path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise UserInputError(f"{path} is in run-summary format {version}, newer than this entropymerge ({__version__}) reads "
                             f"(up to format {FORMAT_VERSION}); update entropymerge to read it")
    try:
        summary = RunSummary.from_json(data)
        summary.outputs = {key: str(path.parent / name) for key, name in summary.outputs.items()}
    except _MissingKey as missing:
        raise UserInputError(f"{path} is not a complete run summary: the key {missing.args[0]!r} is missing") from None
    except (TypeError, AttributeError) as error:
        raise UserInputError(f"{path} is not a valid run summary: {error}") from None
    return summary
