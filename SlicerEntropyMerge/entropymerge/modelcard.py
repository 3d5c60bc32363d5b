"""The model card: everything the engine must know about a site model besides its weights.

One schema serves models we train, plain weights from other sites, TorchScript exports, and
MONAI bundles (whose card is derived from ``metadata.json`` and the inference config). The README
documents every field; ``ModelCard.from_json`` validates a card and names the offending field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError
from .safeconfig import INTENSITY_TRANSFORMS, array_transform_name
from .validation import read_config

CARD_FORMAT = "entropymerge-model-card"
CARD_VERSION = 1
AXCODES = frozenset("LRAPSI")

# Distinct, colour-blind-aware defaults for labels without a colour (Okabe-Ito, then extras).
DEFAULT_COLORS = (
    "#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7",
    "#999999", "#882255", "#44aa99", "#117733", "#aa4499",
)


@dataclass(frozen=True)
class Label:
    """One output class: its channel index ``value`` (0 is background), ``name`` and ``#rrggbb`` colour."""

    value: int
    name: str
    color: str  # "#rrggbb"

    @property
    def rgb(self) -> tuple[float, float, float]:
        """The colour as (r, g, b) floats in [0, 1]."""
        return tuple(int(self.color[i : i + 2], 16) / 255.0 for i in (1, 3, 5))


@dataclass(frozen=True)
class FeatureSpec:
    """Which stable-feature extractor produced the extra input channels (``channels`` of them), and which version of it."""

    extractor: str
    version: str
    channels: int


@dataclass(frozen=True)
class Preprocessing:
    """Where the model works and how intensities are normalised.

    Attributes:
        orientation: axis codes of the model grid (e.g. ``"RAS"``); None keeps the input's.
        spacing: voxel spacing of the model grid in mm along its x, y, z; None keeps the input's.
        intensity: MONAI intensity steps ``{"_target_": name, **arguments}``, applied in order.
    """

    orientation: str | None = None
    spacing: tuple[float, float, float] | None = None
    intensity: tuple[dict, ...] = ()

    def to_json(self) -> dict:
        """The card's ``preprocessing`` object."""
        return {
            "orientation": self.orientation,
            "spacing": list(self.spacing) if self.spacing else None,
            "intensity": [dict(step) for step in self.intensity],
        }


INFERERS = ("sliding_window", "whole")
BLEND_MODES = ("gaussian", "constant")
PADDING_MODES = ("replicate", "reflect", "constant", "circular")


@dataclass(frozen=True)
class InferenceSettings:
    """How a network runs over a volume: in sliding windows of ``roi_size`` (voxels), or on the whole
    volume at once (``inferer="whole"``, a bundle's SimpleInferer; ``roi_size`` is then the fallback
    window when the whole volume does not fit in memory)."""

    roi_size: tuple[int, int, int]
    overlap: float = 0.25
    sw_batch_size: int = 1
    inferer: str = "sliding_window"
    blend_mode: str = "gaussian"  # how overlapping windows are weighted (MONAI's ``mode``)
    padding_mode: str = "replicate"  # how the volume is padded up to the size the network needs
    spatial_multiple: tuple[int, int, int] = (1, 1, 1)  # from the network's strides, not stored in the card


@dataclass
class ModelCard:
    """Everything the engine must know about a site model besides its weights (the README documents each field).

    ``labels`` are the output channels in order (background first); ``input_channels`` is 1 (the
    image) plus the feature channels of ``features``; ``network`` is a MONAI network spec (None for
    TorchScript); ``weights`` a file name beside the card; ``head`` and ``feature_taps`` name modules
    of the network; ``training`` is free-form provenance.
    """

    name: str
    labels: tuple[Label, ...]
    input_channels: int
    preprocessing: Preprocessing
    inference: InferenceSettings
    network: dict | None = None
    weights: str | None = None
    features: FeatureSpec | None = None
    site: str | None = None
    description: str = ""
    head: tuple[str, ...] | None = None
    feature_taps: dict[str, str] = field(default_factory=dict)
    training: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """The number of output channels (labels, background included)."""
        return len(self.labels)

    def to_json(self) -> dict:
        """The card as JSON data (``from_json`` reads it back)."""
        return {
            "format": CARD_FORMAT,
            "format_version": CARD_VERSION,
            "name": self.name,
            "site": self.site,
            "description": self.description,
            "weights": self.weights,
            "network": self.network,
            "input_channels": self.input_channels,
            "labels": [{"value": l.value, "name": l.name, "color": l.color} for l in self.labels],
            "preprocessing": self.preprocessing.to_json(),
            "features": (
                {"extractor": self.features.extractor, "version": self.features.version, "channels": self.features.channels}
                if self.features
                else None
            ),
            "inference": {
                "roi_size": list(self.inference.roi_size),
                "overlap": self.inference.overlap,
                "sw_batch_size": self.inference.sw_batch_size,
                "inferer": self.inference.inferer,
                "mode": self.inference.blend_mode,
                "padding_mode": self.inference.padding_mode,
            },
            "head": list(self.head) if self.head else None,
            "feature_taps": dict(self.feature_taps),
            "training": self.training,
        }

    def save(self, path: str | Path) -> Path:
        """Write the card to ``path`` as indented UTF-8 JSON; returns ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, data: Any, source: str | Path) -> "ModelCard":
        """Validate a parsed card.

        Args:
            data: the parsed JSON.
            source: where it came from, for messages.

        Returns:
            The card.

        Raises:
            UserInputError: the first problem, as ``model card <source>: field '<name>' ...``.
        """
        check = _Checker(source)
        check.that(isinstance(data, dict), "", "the model card must be a JSON object")
        check.that(data.get("format") == CARD_FORMAT, "format", f"must be {CARD_FORMAT!r}")
        check.that(data.get("format_version") == CARD_VERSION, "format_version", f"must be {CARD_VERSION}")
        known = {
            "format", "format_version", "name", "site", "description", "weights", "network", "input_channels",
            "labels", "preprocessing", "features", "inference", "head", "feature_taps", "training",
        }
        unknown = sorted(set(data) - known)
        check.that(not unknown, unknown[0] if unknown else "", "is not a model card field")
        name = check.string(data, "name")
        labels = _labels(data.get("labels"), check)
        input_channels = check.positive_int(data, "input_channels")
        features = _features(data.get("features"), check)
        if features:
            check.that(
                input_channels == 1 + features.channels,
                "input_channels",
                f"is {input_channels} but the image plus {features.channels} feature channels make {1 + features.channels}",
            )
        network = data.get("network")
        if network is not None:
            check.that(isinstance(network, dict) and "_target_" in network, "network", "must be a MONAI network spec with '_target_'")
            if "in_channels" in network:
                check.that(network["in_channels"] == input_channels, "network.in_channels", f"must equal input_channels ({input_channels})")
            if "out_channels" in network:
                check.that(network["out_channels"] == len(labels), "network.out_channels", f"must equal the number of labels ({len(labels)})")
        weights = data.get("weights")
        check.that(weights is None or isinstance(weights, str), "weights", "must be a file name")
        for key in ("site", "description"):
            check.that(data.get(key) is None or isinstance(data[key], str), key, f"must be text, got {data.get(key)!r}")
        head = data.get("head")
        names_ok = isinstance(head, list) and all(isinstance(h, str) for h in head) and head
        check.that(head is None or names_ok, "head", "must be a non-empty list of module names")
        taps = data.get("feature_taps") or {}
        check.that(isinstance(taps, dict) and set(taps) <= {"global", "local"} and all(isinstance(v, str) for v in taps.values()),
                   "feature_taps", "must map 'global' and/or 'local' to module names")
        return cls(
            name=name,
            site=data.get("site"),
            description=data.get("description") or "",
            labels=labels,
            input_channels=input_channels,
            preprocessing=_preprocessing(data.get("preprocessing") or {}, check),
            inference=_inference(data.get("inference"), check),
            network=network,
            weights=weights,
            features=features,
            head=tuple(head) if head else None,
            feature_taps=dict(taps),
            training=data.get("training") or {},
        )

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        """Read and validate the card file at ``path`` (``UserInputError`` for any problem)."""
        path = Path(path)
        return cls.from_json(read_config(path, "model card"), path)


def is_model_card_file(path: Path) -> bool:
    """True for a JSON file that declares itself an entropymerge model card."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == CARD_FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return False


def is_hex_color(value: Any) -> bool:
    """True for a colour written ``#rrggbb`` (hexadecimal digits), the only form written into pages and scenes."""
    return isinstance(value, str) and len(value) == 7 and value[0] == "#" and all(c in "0123456789abcdefABCDEF" for c in value[1:])


def default_labels(names: list[str]) -> tuple[Label, ...]:
    """Labels with values 0, 1, ... for ``names``: background black, the others ``DEFAULT_COLORS`` in turn."""
    return tuple(Label(i, name, DEFAULT_COLORS[(i - 1) % len(DEFAULT_COLORS)] if i else "#000000") for i, name in enumerate(names))


class _Checker:
    def __init__(self, source):
        self.source = source

    def fail(self, key: str, message: str):
        where = f"field '{key}' " if key else ""
        raise UserInputError(f"model card {self.source}: {where}{message}")

    def that(self, condition: bool, key: str, message: str):
        if not condition:
            self.fail(key, message)

    def string(self, data: dict, key: str) -> str:
        value = data.get(key)
        self.that(isinstance(value, str) and value.strip() != "", key, "must be a non-empty string")
        return value

    def positive_int(self, data: dict, key: str, prefix: str = "") -> int:
        value = data.get(key)
        self.that(isinstance(value, int) and not isinstance(value, bool) and value > 0, prefix + key, f"must be a positive integer, got {value!r}")
        return value


def _labels(raw, check: _Checker) -> tuple[Label, ...]:
    check.that(isinstance(raw, list) and len(raw) >= 2, "labels", "must list at least two labels (background and one structure)")
    labels = []
    for index, item in enumerate(raw):
        key = f"labels[{index}]"
        check.that(isinstance(item, dict) and isinstance(item.get("name"), str), key, "must be an object with a 'name'")
        check.that(item.get("value", index) == index, f"{key}.value", f"must be {index}: labels are the output channels in order")
        color = item.get("color") or (DEFAULT_COLORS[(index - 1) % len(DEFAULT_COLORS)] if index else "#000000")
        check.that(is_hex_color(color), f"{key}.color", f"must be '#rrggbb', got {color!r}")
        labels.append(Label(index, item["name"], color.lower()))
    names = [label.name for label in labels]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    check.that(not duplicates, "labels", f"names must be unique; repeated: {', '.join(duplicates)}")
    return tuple(labels)


def _features(raw, check: _Checker) -> FeatureSpec | None:
    if raw is None:
        return None
    check.that(isinstance(raw, dict), "features", "must be an object or null")
    extractor = check.string(raw, "extractor")
    version = raw.get("version")
    check.that(isinstance(version, str) and version, "features.version", "must be a string")
    channels = check.positive_int(raw, "channels", "features.")
    return FeatureSpec(extractor, version, channels)


def _preprocessing(raw, check: _Checker) -> Preprocessing:
    check.that(isinstance(raw, dict), "preprocessing", "must be an object")
    orientation = raw.get("orientation")
    if orientation is not None:
        valid = isinstance(orientation, str) and len(orientation) == 3 and set(orientation) <= AXCODES
        check.that(valid and {_axis(c) for c in orientation} == {0, 1, 2}, "preprocessing.orientation",
                   f"must be three axis codes such as 'RAS', got {orientation!r}")
    spacing = raw.get("spacing")
    if spacing is not None:
        check.that(
            isinstance(spacing, list) and len(spacing) == 3 and all(isinstance(s, (int, float)) and s > 0 for s in spacing),
            "preprocessing.spacing", f"must be three positive numbers (mm) or null, got {spacing!r}",
        )
    intensity = raw.get("intensity") or []
    check.that(isinstance(intensity, list), "preprocessing.intensity", "must be a list of MONAI intensity transforms")
    for index, step in enumerate(intensity):
        key = f"preprocessing.intensity[{index}]"
        check.that(isinstance(step, dict) and isinstance(step.get("_target_"), str), key, "must be an object with '_target_'")
        check.that(
            array_transform_name(step["_target_"]) in INTENSITY_TRANSFORMS,
            key, f"'{step['_target_']}' is not a supported intensity transform ({', '.join(sorted(INTENSITY_TRANSFORMS))})",
        )
    return Preprocessing(
        orientation=orientation,
        spacing=tuple(float(s) for s in spacing) if spacing else None,
        intensity=tuple(intensity),
    )


def _axis(code: str) -> int:
    return {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}[code]


def _inference(raw, check: _Checker) -> InferenceSettings:
    check.that(isinstance(raw, dict), "inference", "must be an object with 'roi_size'")
    roi = raw.get("roi_size")
    check.that(
        isinstance(roi, list) and len(roi) == 3 and all(isinstance(r, int) and r > 0 for r in roi),
        "inference.roi_size", f"must be three positive integers, got {roi!r}",
    )
    overlap = raw.get("overlap", 0.25)
    check.that(isinstance(overlap, (int, float)) and 0 <= overlap < 1, "inference.overlap", f"must be in [0, 1), got {overlap!r}")
    batch = raw.get("sw_batch_size", 1)
    check.that(isinstance(batch, int) and batch > 0, "inference.sw_batch_size", f"must be a positive integer, got {batch!r}")
    choices = {}
    for key, allowed, default in (("inferer", INFERERS, "sliding_window"), ("mode", BLEND_MODES, "gaussian"),
                                  ("padding_mode", PADDING_MODES, "replicate")):
        choices[key] = raw.get(key, default)
        check.that(choices[key] in allowed, f"inference.{key}", f"must be one of {', '.join(allowed)}, got {choices[key]!r}")
    return InferenceSettings(tuple(roi), float(overlap), batch, choices["inferer"], choices["mode"], choices["padding_mode"])
