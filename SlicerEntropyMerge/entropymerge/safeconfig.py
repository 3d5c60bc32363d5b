"""Building MONAI objects from untrusted declarative configs, without running their code.

A site model's config (a MONAI bundle's YAML/JSON, or our model card) names classes with
``_target_`` and other entries with ``@`` references. Here a ``_target_`` may only name a MONAI
network or an allow-listed MONAI intensity transform, ``@id`` and ``$@id`` references are
followed, and any other ``$`` expression is refused unless the caller trusts the bundle, in which
case MONAI's own ``ConfigParser`` evaluates it.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CodeExecutionRefused, UserInputError
from .validation import fetching_arguments

# Intensity-only MONAI transforms a model may ask for (array versions; dictionary versions map here).
INTENSITY_TRANSFORMS = frozenset(
    {
        "ScaleIntensity",
        "ScaleIntensityRange",
        "ScaleIntensityRangePercentiles",
        "NormalizeIntensity",
        "ClipIntensityPercentiles",
        "ThresholdIntensity",
        "ShiftIntensity",
    }
)
# Transforms that only load data or fix its type: the engine does this itself.
LOADING_TRANSFORMS = frozenset(
    {"LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor", "CastToType", "Identity", "AsChannelFirst"}
)
SPATIAL_TRANSFORMS = frozenset({"Orientation", "Spacing"})
# Keyword arguments of dictionary transforms that only route data between keys.
DICT_ONLY_ARGUMENTS = frozenset({"keys", "allow_missing_keys", "meta_keys", "meta_key_postfix", "image_only", "reader"})

# Resolved values one config may expand to: references that double at each level would otherwise
# grow without bound from a file of a few lines.
MAX_RESOLVED_VALUES = 200_000
PURE_REFERENCE = re.compile(r"^\$@([\w:#.\-]+)$")
ID_SEPARATOR = re.compile(r"::|#")


def short_name(target: str) -> str:
    """The class name of a dotted ``_target_`` (``monai.networks.nets.UNet`` -> ``UNet``)."""
    return target.rsplit(".", 1)[-1]


def array_transform_name(target: str) -> str:
    """``ScaleIntensityd`` / ``ScaleIntensityD`` / ``ScaleIntensityDict`` -> ``ScaleIntensity``."""
    import monai.transforms

    name = short_name(target)
    for suffix in ("Dict", "d", "D"):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and base and hasattr(monai.transforms, base):
            return base
    return name


def network_class(target: str, where: str) -> type[torch.nn.Module]:
    """The MONAI network class a ``_target_`` names; anything else is refused.

    Args:
        target: ``"UNet"`` or ``"monai.networks.nets.UNet"`` style name.
        where: where the target is written, for the message.

    Returns:
        The class from ``monai.networks.nets``.

    Raises:
        UserInputError: not a string, or not a network class of ``monai.networks.nets``.
    """
    import monai.networks.nets as nets

    if not isinstance(target, str):
        raise UserInputError(f"{where}: '_target_' must be a class name, got {target!r}")
    module_path, _, name = target.rpartition(".")
    candidate = getattr(nets, name, None)
    allowed_module = module_path == "" or module_path.startswith("monai.networks.nets")
    if not (allowed_module and inspect.isclass(candidate) and issubclass(candidate, torch.nn.Module)):
        raise UserInputError(
            f"{where}: '_target_: {target}' is not a MONAI network (monai.networks.nets); "
            "only MONAI networks are built from a site model's config"
        )
    return candidate


def build_network(spec: dict, where: str, trust_code: bool = False) -> torch.nn.Module:
    """Instantiate a MONAI network from a resolved spec such as ``{"_target_": "UNet", ...}``.

    Arguments with which the network would download or read weights itself (``pretrained``,
    ``*_url``, weight paths) are refused unless ``trust_code``: a model file may not reach the
    network or other files.

    Args:
        spec: ``{"_target_": name, **constructor arguments}``; keys starting with ``_`` are not passed.
        where: where the spec is written, for messages.
        trust_code: allow arguments that fetch or read weights.

    Returns:
        The network, randomly initialised.

    Raises:
        UserInputError: not a MONAI network, a fetching argument, or a constructor that fails.
    """
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise UserInputError(f"{where}: the network must be a mapping with a '_target_' MONAI network name")
    cls = network_class(spec["_target_"], where)
    kwargs = {key: value for key, value in spec.items() if not key.startswith("_")}
    fetching = {} if trust_code else fetching_arguments(cls, kwargs)
    if fetching:
        settings = ", ".join(f"{name}={value!r}" for name, value in fetching.items())
        raise UserInputError(
            f"{where}: {cls.__name__} with {settings} would download or read weights by itself; set "
            f"{'it' if len(fetching) == 1 else 'them'} to false/null (the model's own weights file is used), "
            "or trust this model (--trust-bundle-code)"
        )
    try:
        return cls(**kwargs)
    except Exception as error:  # constructor errors are user errors in the spec
        raise UserInputError(f"{where}: could not build {cls.__name__}({_format_kwargs(kwargs)}): {error}") from None


def build_intensity_transform(spec: dict, where: str) -> Callable:
    """Instantiate one allow-listed MONAI intensity transform.

    Args:
        spec: ``{"_target_": name, **kwargs}``; a dictionary transform's name (``ScaleIntensityd``)
            maps to its array version.
        where: where the step is written, for messages.

    Returns:
        The transform (a callable on (C, X, Y, Z) tensors).

    Raises:
        UserInputError: not in ``INTENSITY_TRANSFORMS``, or arguments its constructor refuses.
    """
    import monai.transforms

    if not isinstance(spec, dict) or "_target_" not in spec:
        raise UserInputError(f"{where}: each intensity step must be a mapping with a '_target_' transform name")
    name = array_transform_name(spec["_target_"])
    if name not in INTENSITY_TRANSFORMS:
        raise UserInputError(
            f"{where}: intensity transform '{spec['_target_']}' is not supported; "
            f"supported: {', '.join(sorted(INTENSITY_TRANSFORMS))}"
        )
    cls = getattr(monai.transforms, name)
    kwargs = {key: value for key, value in spec.items() if not key.startswith("_")}
    try:
        return cls(**kwargs)
    except Exception as error:
        raise UserInputError(f"{where}: could not build {name}({_format_kwargs(kwargs)}): {error}") from None


def _format_kwargs(kwargs: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in kwargs.items())


class ConfigResolver:
    """Resolves entries of a MONAI bundle config to plain data, following references safely.

    ``resolve(id)`` returns JSON-like data in which ``@`` references are replaced by what they point
    to; ``_target_`` mappings stay mappings (their arguments resolved) so that the caller decides
    what may be built. A ``$`` expression that is not a pure reference raises
    ``CodeExecutionRefused`` unless ``trust_code`` is set; then MONAI's ``ConfigParser`` evaluates it.
    """

    def __init__(self, config: dict, source: Path, trust_code: bool = False, overrides: dict | None = None):
        self.config = config
        self.source = source
        self.trust_code = trust_code
        self.overrides = overrides or {}
        self._parser = None
        self._resolved_count = 0

    def has(self, id: str) -> bool:
        """True when an entry exists at ``id`` (``a::b::0`` paths)."""
        try:
            self._lookup(id)
            return True
        except KeyError:
            return False

    def raw(self, id: str) -> Any:
        """The unresolved entry at ``id`` (``a::b::0`` paths), or KeyError."""
        return self._lookup(id)

    def resolve(self, id: str) -> Any:
        """The entry at ``id`` with every reference followed (see the class); ``UserInputError`` for
        circular, dangling or too deeply nested references and for more than ``MAX_RESOLVED_VALUES`` values."""
        try:
            return self.resolve_value(self._lookup(id), id, frozenset())
        except RecursionError:
            raise UserInputError(f"{self._where(id)}: references nest too deeply") from None

    def resolve_value(self, value: Any, id: str, visiting: frozenset = frozenset()) -> Any:
        """``value`` (found at ``id``) resolved; ``visiting``: the references being followed, to catch cycles."""
        self._resolved_count += 1
        if self._resolved_count > MAX_RESOLVED_VALUES:
            raise UserInputError(
                f"{self._where(id)}: the config's references expand to over {MAX_RESOLVED_VALUES:,} values; refused as a resource bomb"
            )
        if isinstance(value, str):
            return self._resolve_string(value, id, visiting)
        if isinstance(value, dict):
            if value.get("_mode_", "default") != "default":
                raise UserInputError(f"{self._where(id)}: '_mode_: {value['_mode_']}' is not supported")
            resolved = {}
            for key, item in value.items():
                if key in ("_requires_", "_desc_", "_mode_"):
                    continue
                resolved[key] = self.resolve_value(item, f"{id}::{key}", visiting)
            return resolved
        if isinstance(value, list):
            return [self.resolve_value(item, f"{id}::{index}", visiting) for index, item in enumerate(value)]
        return value

    def follow(self, id: str) -> tuple[str, Any]:
        """The id and unresolved entry that ``id`` finally points to through pure references."""
        raw, seen = self._lookup(id), {id}
        while isinstance(raw, str) and (target := _reference_target(raw)):
            raw = self._referenced(id, target, seen)
            id = target
            seen.add(id)
        return id, raw

    def _referenced(self, id: str, target: str, visited) -> Any:
        """The entry '@target' (written at ``id``) points to; ``visited``: the ids on the way there."""
        if target in visited:
            raise UserInputError(f"{self._where(id)}: circular reference to '@{target}'")
        try:
            return self._lookup(target)
        except KeyError:
            raise UserInputError(f"{self._where(id)}: reference '@{target}' points to nothing") from None

    def _resolve_string(self, value: str, id: str, visiting: frozenset) -> Any:
        target = _reference_target(value)
        if target:
            return self.resolve_value(self._referenced(id, target, visiting), target, visiting | {target})
        if value.startswith("$"):
            if not self.trust_code:
                raise CodeExecutionRefused(
                    f"{self._where(id)} is a Python expression ({value!r}); bundle code is never run unless "
                    "you trust this bundle (--trust-bundle-code)"
                )
            return self._monai_parser().get_parsed_content(id)
        if value.startswith("%"):
            raise UserInputError(f"{self._where(id)}: macro '{value}' (a reference into another file) is not supported")
        return value

    def _lookup(self, id: str) -> Any:
        if id in self.overrides:
            return self.overrides[id]
        node: Any = self.config
        for part in ID_SEPARATOR.split(id) if id else []:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise KeyError(id)
        return node

    def _monai_parser(self):
        if self._parser is None:
            from monai.bundle import ConfigParser

            self._parser = ConfigParser(self.config)
            for key, value in self.overrides.items():
                self._parser[key] = value
        return self._parser

    def _where(self, id: str) -> str:
        return f"{self.source}: '{id}'"


def _reference_target(value: str) -> str | None:
    """``x`` for the pure references ``@x`` and ``$@x``; None for anything else."""
    if value.startswith("@"):
        return value[1:]
    pure = PURE_REFERENCE.match(value)
    return pure.group(1) if pure else None
