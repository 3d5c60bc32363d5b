"""Reading a MONAI bundle (``configs/metadata.json``, ``configs/inference.json|yaml``, ``models/``)
into a model card, without running any of its code unless the user trusts it."""

from __future__ import annotations

import inspect
from pathlib import Path

from .errors import UserInputError
from .modelcard import BLEND_MODES, PADDING_MODES, InferenceSettings, ModelCard, Preprocessing, default_labels
from .safeconfig import DICT_ONLY_ARGUMENTS, INTENSITY_TRANSFORMS, LOADING_TRANSFORMS, SPATIAL_TRANSFORMS, ConfigResolver, array_transform_name
from .validation import inside_folder, read_config

INFERENCE_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
WEIGHT_FILE_NAMES = ("model.safetensors", "model.pt", "model.pth", "model.ts")
DEFAULT_ROI = (96, 96, 96)


def is_bundle(path: Path) -> bool:
    """True for a folder with a ``configs`` folder inside (a MONAI bundle)."""
    return path.is_dir() and (path / "configs").is_dir()


def read_config_file(path: Path) -> dict:
    """Parse a bundle's JSON or YAML config with a safe loader (no Python object tags).

    Returns:
        The top-level mapping.

    Raises:
        UserInputError: as ``validation.read_config``, or a top level that is not a mapping.
    """
    data = read_config(path, "bundle config")
    if not isinstance(data, dict):
        raise UserInputError(f"bundle config {path} must be a mapping at the top level")
    return data


def read_bundle(root: Path, trust_code: bool = False) -> tuple[ModelCard, Path, list[str]]:
    """Model card, weights file and notes for the MONAI bundle at ``root``.

    The card comes from ``configs/metadata.json`` (name, channels, labels from ``channel_def``) and
    ``configs/inference.json|yaml`` (``network_def``, the preprocessing transforms, the inferer); it
    meets the same checks as a model card file.

    Args:
        root: the bundle folder.
        trust_code: let MONAI evaluate ``$`` expressions in the config (refused otherwise).

    Returns:
        (card, weights, notes): the card, the first of ``models/model.safetensors|pt|pth|ts`` found,
        and what had to be assumed (for the user).

    Raises:
        UserInputError: missing configs or weights, files outside the bundle, unsupported transforms
            or inferer settings, or values of the wrong type.
        CodeExecutionRefused: a ``$`` expression is needed and ``trust_code`` is False.
    """
    configs = root / "configs"
    config_path = next((configs / name for name in INFERENCE_CONFIG_NAMES if (configs / name).is_file()), None)
    if config_path is None:
        raise UserInputError(f"bundle {root} has no configs/inference.json or configs/inference.yaml")
    metadata_path = configs / "metadata.json"
    for path in (config_path, metadata_path):
        inside_folder(path, root, f"bundle {root}: config")
    metadata = read_config_file(metadata_path) if metadata_path.is_file() else {}
    resolver = ConfigResolver(read_config_file(config_path), config_path, trust_code, {"bundle_root": str(root)})
    notes: list[str] = []

    network_id = next((key for key in ("network_def", "network") if resolver.has(key)), None)
    if network_id is None:
        raise UserInputError(f"{config_path} defines no 'network_def'")
    network = resolver.resolve(network_id)
    if not isinstance(network, dict) or "_target_" not in network:
        raise UserInputError(f"{config_path}: '{network_id}' must be a '_target_' network definition")

    weights = next((root / "models" / name for name in WEIGHT_FILE_NAMES if (root / "models" / name).is_file()), None)
    if weights is None:
        raise UserInputError(f"bundle {root} has no weights: expected one of models/{{{','.join(WEIGHT_FILE_NAMES)}}}")
    inside_folder(weights, root, f"bundle {root}: weights")
    try:
        card = _card(root, metadata, resolver, network, weights, notes)
    except (TypeError, ValueError, AttributeError) as error:  # a value of the wrong type or form in the bundle's files
        raise UserInputError(f"bundle {root}: metadata.json or {config_path.name} holds a value of the wrong type ({error})") from None
    # The same checks as a model card's, so that a bundle's metadata meets the same rules.
    return ModelCard.from_json(card.to_json(), f"{root} (bundle)"), weights, notes


def _card(root: Path, metadata: dict, resolver: ConfigResolver, network: dict, weights: Path, notes: list[str]) -> ModelCard:
    inputs, outputs = _data_format(metadata)
    return ModelCard(
        name=str(metadata.get("name") or "").strip() or root.name,
        site=None,
        description=str(metadata.get("description") or ""),
        labels=default_labels(_channel_names(outputs, network)),
        input_channels=int(inputs.get("num_channels") or network.get("in_channels") or 1),
        preprocessing=_preprocessing(resolver, notes),
        inference=_inference(resolver, inputs, notes),
        network=network,
        weights=str(weights.relative_to(root)),
        features=None,
        training={"source": "MONAI bundle", "version": metadata.get("version")},
    )


def _data_format(metadata: dict) -> tuple[dict, dict]:
    data_format = metadata.get("network_data_format") or {}
    inputs = next(iter((data_format.get("inputs") or {}).values()), {})
    outputs_all = data_format.get("outputs") or {}
    outputs = next((o for o in outputs_all.values() if o.get("format") == "segmentation"), None)
    return inputs, outputs or next(iter(outputs_all.values()), {})


def _channel_names(outputs: dict, network: dict) -> list[str]:
    channel_def = outputs.get("channel_def") or {}
    count = int(outputs.get("num_channels") or network.get("out_channels") or len(channel_def) or 0)
    if count < 2:
        raise UserInputError("the bundle's metadata does not say how many output classes the network has")
    return [str(channel_def.get(str(i), "background" if i == 0 else f"class {i}")) for i in range(count)]


def _preprocessing(resolver: ConfigResolver, notes: list[str]) -> Preprocessing:
    """Map the bundle's declarative preprocessing transforms onto the engine's preprocessing."""
    if not resolver.has("preprocessing"):
        notes.append("the bundle defines no 'preprocessing'; images are used as they are")
        return Preprocessing()
    transforms_id, root = resolver.follow("preprocessing")
    if isinstance(root, dict) and "transforms" in root:
        transforms_id, items = resolver.follow(f"{transforms_id}::transforms")
    else:
        items = root
    if not isinstance(items, list):
        raise UserInputError(f"{resolver.source}: '{transforms_id}' must be a list of transforms")

    orientation, spacing, intensity = None, None, []
    for index, item in enumerate(items):
        item_id, item = resolver.follow(f"{transforms_id}::{index}")
        if not isinstance(item, dict) or "_target_" not in item:
            raise UserInputError(f"{resolver.source}: '{item_id}' is not a transform with '_target_'")
        if item.get("_disabled_") is True:
            continue
        name = array_transform_name(resolver.resolve(f"{item_id}::_target_"))
        arguments = _transform_arguments(resolver, item, item_id, name)
        if name in LOADING_TRANSFORMS:
            continue
        if name == "Orientation":
            orientation = arguments.get("axcodes")
        elif name == "Spacing":
            pixdim = arguments.get("pixdim")
            spacing = tuple(float(p) for p in (pixdim if isinstance(pixdim, (list, tuple)) else [pixdim] * 3))
        elif name in INTENSITY_TRANSFORMS:
            intensity.append({"_target_": name, **arguments})
        else:
            raise UserInputError(
                f"{resolver.source}: preprocessing transform '{item['_target_']}' ('{item_id}') is not supported; "
                f"supported: {', '.join(sorted(INTENSITY_TRANSFORMS | SPATIAL_TRANSFORMS | LOADING_TRANSFORMS))}"
            )
    return Preprocessing(orientation=orientation, spacing=spacing, intensity=tuple(intensity))


def _transform_arguments(resolver: ConfigResolver, item: dict, item_id: str, name: str) -> dict:
    """Resolve the arguments that matter for the array transform; routing keys are never resolved."""
    if name in LOADING_TRANSFORMS:
        return {}
    import monai.transforms

    accepted = set(inspect.signature(getattr(monai.transforms, name)).parameters) if hasattr(monai.transforms, name) else set()
    arguments = {}
    for key in item:
        if key.startswith("_") or key in DICT_ONLY_ARGUMENTS or key not in accepted:
            continue
        value = resolver.resolve(f"{item_id}::{key}")
        if name == "Spacing" and key == "mode" and isinstance(value, (list, tuple)):
            value = value[0]  # per-key modes: the image is the first key
        arguments[key] = value
    return arguments


def _inference(resolver: ConfigResolver, inputs: dict, notes: list[str]) -> InferenceSettings:
    """The bundle's inferer as settings: SimpleInferer runs on the whole volume; SlidingWindowInferer keeps its
    ``roi_size``, ``overlap``, ``sw_batch_size``, ``mode`` and ``padding_mode`` (where unset: MONAI's defaults, but
    edge-value padding)."""
    shape = inputs.get("spatial_shape")
    stated_shape = isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)
    fallback_roi = tuple(shape) if stated_shape else DEFAULT_ROI
    inferer = resolver.raw("inferer") if resolver.has("inferer") else None
    target = str(inferer.get("_target_", "")) if isinstance(inferer, dict) else str(inferer or "")
    kind = target.rsplit(".", 1)[-1]
    if isinstance(inferer, dict) and kind in ("SlidingWindowInferer", "SlidingWindowInfererAdapt"):
        def argument(key, default):
            return resolver.resolve(f"inferer::{key}") if key in inferer else default

        roi = argument("roi_size", None)
        if not (isinstance(roi, (list, tuple)) and len(roi) == 3 and all(isinstance(r, int) and r > 0 for r in roi)):
            raise UserInputError(f"{resolver.source}: the SlidingWindowInferer's roi_size must be three positive integers, got {roi!r}")
        # padding: edge values unless the bundle says otherwise (zeros would skew the network's instance norm)
        mode, padding = str(argument("mode", "constant")), str(argument("padding_mode", "replicate"))
        if mode not in BLEND_MODES or padding not in PADDING_MODES:
            raise UserInputError(f"{resolver.source}: the SlidingWindowInferer's mode {mode!r} or padding_mode {padding!r} is not "
                                 f"supported ({'/'.join(BLEND_MODES)}; {'/'.join(PADDING_MODES)})")
        return InferenceSettings(tuple(roi), float(argument("overlap", 0.25)), int(argument("sw_batch_size", 1)),
                                 "sliding_window", mode, padding)
    if isinstance(inferer, dict) and kind == "SimpleInferer":
        return InferenceSettings(fallback_roi, inferer="whole")
    if target:
        notes.append(f"inferer {target!r} is not understood; using sliding windows of {fallback_roi}")
    elif not stated_shape:
        notes.append(f"the bundle states no inferer and no input size; using a {DEFAULT_ROI} sliding window")
    return InferenceSettings(fallback_roi)
