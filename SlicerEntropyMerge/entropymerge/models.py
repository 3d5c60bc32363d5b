"""Loading site models from untrusted files (``compatibility`` checks that a set of them can be merged).

A site model is given as a model card (``*.json`` that names its weights), as a weights file with
its card beside it (``site.safetensors`` + ``site.json``), as a MONAI bundle folder, or as a folder
holding several of these. Weights are read with safetensors or ``torch.load(weights_only=True)``;
TorchScript files are programs and load only when the user trusts them.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .bundle import is_bundle, read_bundle
from .errors import CodeExecutionRefused, UserInputError
from .modelcard import ModelCard, is_model_card_file
from .outputs import safe_file_stem
from .safeconfig import build_network
from .validation import inside_folder, no_network, regular_file

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
TORCHSCRIPT_SUFFIXES = (".ts",)
STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "network", "net", "weights")
# Tensor types a state dict may hold: real floating-point parameters and integer buffers (counters).
WEIGHT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64,
                           torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool})


@dataclass
class SiteModel:
    """One site's model, ready to run: its card, its network with weights loaded, and provenance.

    Attributes:
        name: display name, unique within a run (``load_site_models``).
        source: the path it was loaded from (card, weights file or bundle folder).
        card: its model card.
        network: the network in eval mode on the CPU, weights loaded.
        kind: ``"weights"``, ``"bundle"`` or ``"torchscript"``.
        notes: what loading had to assume (e.g. a bundle without preprocessing).
        weights: the weights (or TorchScript) file it was read from.
    """

    name: str
    source: Path
    card: ModelCard
    network: torch.nn.Module
    kind: str  # "weights", "bundle" or "torchscript"
    notes: list[str] = field(default_factory=list)
    weights: Path | None = None  # the weights (or TorchScript) file it was read from

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The network's parameters and buffers by name."""
        return self.network.state_dict()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch file, never unpickling arbitrary objects.

    Args:
        path: a ``.safetensors`` file, or a ``torch.save`` file read with ``weights_only=True``; a state
            dict wrapped in ``{"state_dict": ...}`` (or another ``STATE_DICT_WRAPPERS`` key) is unwrapped,
            and a DataParallel ``module.`` prefix dropped.

    Returns:
        Parameter name -> tensor, on the CPU.

    Raises:
        UserInputError: not a regular file, not a weights file, Python objects other than tensors
            (refused, they could run code), no state dict inside, tensors of a type outside
            ``WEIGHT_DTYPES``, or NaN/infinite values.
    """
    regular_file(path, "weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise UserInputError(f"could not read weights {path}: not a valid safetensors file ({error})") from None
    else:
        if not _looks_like_torch_file(path):
            raise UserInputError(f"could not read weights {path}: not a PyTorch weights file")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise UserInputError(
                f"refused to load {path}: it holds Python objects other than tensors, which could run code when "
                f"loaded ({_unpickling_reason(error)}). Site model files are read as plain weights only."
            ) from None
        except Exception as error:  # a damaged archive or pickle fails in many ways; none of them is our bug
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise UserInputError(f"could not read weights {path}: not a PyTorch weights file ({reason})") from None
    state = _unwrap_state_dict(loaded, path)
    for key, tensor in state.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            raise UserInputError(f"weights {path}: '{key}' has the unsupported type {str(tensor.dtype).replace('torch.', '')}; "
                                 "site model weights must be real floating-point numbers")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserInputError(f"weights {path} contain NaN or infinite values (first in '{key}')")
    return state


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, in its legacy format, a pickle that starts with 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as stream:
        return stream.read(1) == b"\x80"


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    lines = [line.strip() for line in str(error).splitlines()]
    return next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")), "unsupported content")


def _unwrap_state_dict(loaded, path: Path) -> dict[str, torch.Tensor]:
    def is_state_dict(obj) -> bool:
        return isinstance(obj, Mapping) and len(obj) > 0 and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        )

    if not is_state_dict(loaded) and isinstance(loaded, Mapping):
        loaded = next((loaded[k] for k in STATE_DICT_WRAPPERS if is_state_dict(loaded.get(k))), loaded)
    if not is_state_dict(loaded):
        raise UserInputError(
            f"{path} does not contain a state dict (a mapping of parameter names to tensors); got {type(loaded).__name__}"
        )
    state = dict(loaded)
    if all(key.startswith("module.") for key in state):  # saved from DataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def load_weights_into(network: torch.nn.Module, state: dict[str, torch.Tensor], weights: Path, card_source) -> None:
    """Load ``state`` into ``network`` strictly.

    Args:
        network: the network built from the card.
        state: the weights (``load_state_dict_file``).
        weights, card_source: the weights file and the card (or bundle) path, for the message.

    Raises:
        UserInputError: missing, unexpected or wrongly shaped parameters (the first four of each are named).
    """
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        details = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs network)", wrong_shape)):
            if items:
                details.append(f"{title}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
        raise UserInputError(f"weights {weights} do not fit the network described by {card_source}: {'; '.join(details)}")
    network.load_state_dict(state, strict=True)


def load_site_model(path: str | Path, trust_code: bool = False) -> SiteModel:
    """Load one site model from a card, a weights or TorchScript file with its card, or a bundle.

    Nothing it does reaches the network (``no_network``), and a model's files must lie in its folder.
    What libraries print meanwhile goes to stderr: stdout carries JSON (``--progress json``, ``models --json``).

    Args:
        path: a model card (``.json``), a weights or TorchScript file with its card beside it
            (same stem, ``.json``), or a MONAI bundle folder.
        trust_code: allow what runs a model's own code: TorchScript, bundle ``$`` expressions, and
            network arguments that fetch weights.

    Returns:
        The ``SiteModel``, on the CPU in eval mode.

    Raises:
        UserInputError: anything wrong with the files (one sentence naming the file and the problem).
        CodeExecutionRefused: the model needs its own code to run and ``trust_code`` is False.
    """
    with no_network(f"site model {path}"), contextlib.redirect_stdout(sys.stderr):
        return _load_site_model(Path(path), trust_code)


def _load_site_model(path: Path, trust_code: bool) -> SiteModel:
    if not path.exists():
        raise UserInputError(f"model not found: {path}")
    if is_bundle(path):
        return _load_bundle(path, trust_code)
    if path.is_dir():
        raise UserInputError(f"{path} is a folder but not a MONAI bundle (no configs/ inside)")
    suffix = path.suffix.lower()
    if suffix == ".json":
        card_path = path
    elif suffix in WEIGHT_SUFFIXES + TORCHSCRIPT_SUFFIXES:
        card_path = path.with_suffix(".json")
        if not card_path.is_file():
            raise UserInputError(
                f"no model card for {path}: expected {card_path.name} beside it (see 'Model card' in the README)"
            )
    else:
        raise UserInputError(
            f"{path} is not a site model: give a model card (.json), a weights file "
            f"({', '.join(WEIGHT_SUFFIXES + TORCHSCRIPT_SUFFIXES)}) with its card beside it, or a MONAI bundle folder"
        )
    card = ModelCard.load(card_path)
    weights = path if suffix != ".json" else _card_weights(card, card_path)
    if weights.suffix.lower() in TORCHSCRIPT_SUFFIXES:
        return _load_torchscript(weights, card, trust_code)
    if card.network is None:
        raise UserInputError(f"model card {card_path} has no 'network'; it is needed to build the model from plain weights")
    network = build_network(card.network, f"model card {card_path}: 'network'", trust_code)
    load_weights_into(network, load_state_dict_file(weights), weights, card_path)
    return SiteModel(card.name, path, card, network.eval(), "weights", weights=weights)


def _card_weights(card: ModelCard, card_path: Path) -> Path:
    if not card.weights:
        raise UserInputError(f"model card {card_path} does not name its 'weights' file")
    return inside_folder(card_path.parent / card.weights, card_path.parent, f"model card {card_path}: weights")


def _load_bundle(root: Path, trust_code: bool) -> SiteModel:
    card, weights, notes = read_bundle(root, trust_code)
    if weights.suffix.lower() in TORCHSCRIPT_SUFFIXES:
        model = _load_torchscript(weights, card, trust_code)
        model.source, model.kind, model.notes = root, "bundle", notes
        return model
    where = f"bundle {root}: 'network_def'"
    network = build_network(card.network, where, trust_code)
    load_weights_into(network, load_state_dict_file(weights), weights, where)
    return SiteModel(card.name, root, card, network.eval(), "bundle", notes, weights)


def _load_torchscript(path: Path, card: ModelCard, trust_code: bool) -> SiteModel:
    if not trust_code:
        raise CodeExecutionRefused(
            f"{path} is a TorchScript program, not plain weights; it runs only if you trust it (--trust-bundle-code)"
        )
    try:
        network = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as error:
        raise UserInputError(f"could not load TorchScript model {path}: {str(error).splitlines()[0]}") from None
    return SiteModel(card.name, path, card, network.eval(), "torchscript", weights=path)


def expand_model_paths(paths: list[str | Path]) -> list[Path]:
    """Each given path, with a plain folder replaced by the model cards and bundles inside it (sorted by name).

    Raises:
        UserInputError: a folder holds no model card and no bundle.
    """
    expanded: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and not is_bundle(path):
            found = sorted(p for p in path.iterdir() if is_model_card_file(p) or is_bundle(p))
            if not found:
                raise UserInputError(f"folder {path} holds no model cards (*.json) or MONAI bundles")
            expanded.extend(found)
        else:
            expanded.append(path)
    return expanded


def model_files(path: Path) -> list[Path]:
    """The files a site model is read from (a bundle: its folder), which no output may replace."""
    if path.is_dir():
        return [path]
    card = path if path.suffix.lower() == ".json" else path.with_suffix(".json")
    files = [path, card]
    try:
        weights = json.loads(card.read_text(encoding="utf-8")).get("weights")
    except (OSError, ValueError, AttributeError, RecursionError):
        weights = None  # loading the model reports what is wrong with its card
    return files + ([card.parent / weights] if isinstance(weights, str) else [])


def load_site_models(paths: list[str | Path], trust_code: bool = False) -> list[SiteModel]:
    """Load every site model (folders expanded, see ``expand_model_paths``), giving each a unique display name
    (``unique_names``); ``trust_code`` and errors as ``load_site_model``."""
    models = [load_site_model(path, trust_code) for path in expand_model_paths(paths)]
    for model, name in zip(models, unique_names([m.name for m in models])):
        model.name = name
    return models


def unique_names(names: list[str]) -> list[str]:
    """``names`` made unique, in order: a repeated name gets ``-2``, ``-3``, ... skipping any name that is taken or
    that another model brings. Names that differ only in case or in characters a file name cannot hold count as
    the same (per-model output files are named after the model)."""
    def key(name: str) -> str:
        return safe_file_stem(name).lower()

    brought = {key(name) for name in names}
    taken: set[str] = set()
    unique = []
    for name in names:
        candidate, number = name, 1
        while key(candidate) in taken or (candidate != name and key(candidate) in brought):
            number += 1
            candidate = f"{name}-{number}"
        taken.add(key(candidate))
        unique.append(candidate)
    return unique


def save_site_model(network: torch.nn.Module, card: ModelCard, folder: str | Path, stem: str | None = None) -> Path:
    """Write a network as a site model: ``<stem>.safetensors`` and its card ``<stem>.json``.

    Args:
        network: the network whose state dict is saved (copied to the CPU, contiguous).
        card: its card; ``weights`` is set to the new file's name.
        folder: where both files go (made if needed; existing files are replaced).
        stem: the file name stem; None for ``card.name``.

    Returns:
        The path of the card.
    """
    from dataclasses import replace

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem or card.name
    weights = folder / f"{stem}.safetensors"
    state = {key: value.detach().cpu().contiguous() for key, value in network.state_dict().items()}
    save_file(state, str(weights))
    weights.chmod(0o644)  # safetensors writes owner-only files; models are meant to be shared
    return replace(card, weights=weights.name).save(folder / f"{stem}.json")
