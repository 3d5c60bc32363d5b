"""Loading site models from untrusted files, and checking that a set of them can be merged.

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
    """One site's model, ready to run: its card, its network with weights loaded, and provenance."""

    name: str
    source: Path
    card: ModelCard
    network: torch.nn.Module
    kind: str  # "weights", "bundle" or "torchscript"
    notes: list[str] = field(default_factory=list)
    weights: Path | None = None  # the weights (or TorchScript) file it was read from

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.network.state_dict()


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch file, never unpickling arbitrary objects."""
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
    """Each given path, with a plain folder replaced by the model cards and bundles inside it."""
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
    """Load every site model (folders expanded), giving each a unique display name."""
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


def describe_models(paths: list[str | Path], trust_code: bool = False) -> list[dict]:
    """Each model behind ``paths`` (folders expanded) as a model list shows it, and whether it can join the set.

    Unlike ``load_site_models`` a bad path does not stop the others: its entry carries the problem.
    Every entry has ``source``, ``name``, ``compatible`` and ``problem`` (None when compatible);
    loaded models add ``site``, ``kind`` and ``labels``. Compatibility is judged against the first
    model that loads, with the same rules as ``check_compatible``.
    """
    entries: list[dict] = []
    first: SiteModel | None = None
    reference: dict = {}
    for given in map(Path, paths):
        try:
            sources = expand_model_paths([given])
        except UserInputError as error:
            entries.append({"source": str(given), "name": given.name, "compatible": False, "problem": str(error)})
            continue
        for source in sources:
            try:
                model = load_site_model(source, trust_code)
            except UserInputError as error:
                entries.append({"source": str(source), "name": source.stem, "compatible": False, "problem": str(error)})
                continue
            problem = None
            if first is None:
                first, reference = model, {k: tuple(v.shape) for k, v in model.state_dict().items()}
            else:
                difference = _first_difference(first, reference, model)
                problem = f"cannot be used with '{first.name}': {difference}" if difference else None
            entries.append({
                "source": str(source), "name": model.name, "site": model.card.site, "kind": model.kind,
                "labels": [{"value": l.value, "name": l.name, "color": l.color} for l in model.card.labels],
                "compatible": problem is None, "problem": problem,
            })
    for entry, name in zip(entries, unique_names([entry["name"] for entry in entries])):
        entry["name"] = name
    return entries


def check_runs(model: SiteModel, window: tuple[int, int, int], what: str = "sliding window",
               device: torch.device | str = "cpu") -> None:
    """One forward pass of zeros, (1, C_in, *window), through ``model`` on ``device`` before any real work.

    Its card's input channels must fit the network, the window must suit the network's strides,
    and the output must be a segmentation on the window: (1, number of labels, *window).
    """
    card, size = model.card, "x".join(map(str, window))
    where = f"site model '{model.name}' ({model.source})"
    try:
        with torch.no_grad():
            output = model.network.to(device).eval()(torch.zeros(1, card.input_channels, *window, device=device))
    except torch.cuda.OutOfMemoryError:
        return  # not a problem of the model: inference falls back to smaller batches or the CPU
    except Exception as error:  # whatever the network raises, the cause is the card, the window or the network spec
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserInputError(f"{where} cannot run on a {what} of {size} voxels with {card.input_channels} input channel(s): "
                             f"{reason} (check the card's input_channels and network, and the window size)") from None
    finally:
        model.network.cpu()  # where the other site models are, for merging
    expected = (1, card.num_classes, *window)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != expected:
        raise UserInputError(f"{where} gives {shape} for a {what} of {size} voxels; a segmentation network with one output "
                             f"channel per label ({card.num_classes}: {', '.join(l.name for l in card.labels)}) gives {expected}")


def check_compatible(models: list[SiteModel]) -> None:
    """Raise ``UserInputError`` naming the first difference that stops these models being merged."""
    first = models[0]
    reference = {k: tuple(v.shape) for k, v in first.state_dict().items()}
    for other in models[1:]:
        problem = _first_difference(first, reference, other)
        if problem:
            raise UserInputError(
                f"site models '{first.name}' ({first.source}) and '{other.name}' ({other.source}) cannot be used "
                f"together: {problem}"
            )


def _first_difference(first: SiteModel, reference: dict, other: SiteModel) -> str | None:
    shapes = {k: tuple(v.shape) for k, v in other.state_dict().items()}
    for key in reference:
        if key not in shapes:
            return f"parameter '{key}' exists only in the first"
        if reference[key] != shapes[key]:
            return f"parameter '{key}' has shape {reference[key]} in the first and {shapes[key]} in the second"
    extra = next((k for k in shapes if k not in reference), None)
    if extra:
        return f"parameter '{extra}' exists only in the second"
    a, b = first.card, other.card
    if a.network and b.network and a.network != b.network:
        key = next(k for k in sorted(set(a.network) | set(b.network)) if a.network.get(k) != b.network.get(k))
        return f"network setting '{key}' is {a.network.get(key)!r} in the first and {b.network.get(key)!r} in the second"
    if [(l.value, l.name) for l in a.labels] != [(l.value, l.name) for l in b.labels]:
        return f"labels differ: {[l.name for l in a.labels]} vs {[l.name for l in b.labels]}"
    if a.input_channels != b.input_channels:
        return f"input channels differ: {a.input_channels} vs {b.input_channels}"
    if a.preprocessing != b.preprocessing:
        return f"preprocessing differs: {a.preprocessing.to_json()} vs {b.preprocessing.to_json()}"
    if a.features != b.features:
        return f"stable-feature specs differ: {_describe_features(a)} vs {_describe_features(b)}"
    return None


def _describe_features(card: ModelCard) -> str:
    f = card.features
    return f"{f.extractor} v{f.version} ({f.channels} channels)" if f else "none (image only)"


def save_site_model(network: torch.nn.Module, card: ModelCard, folder: str | Path, stem: str | None = None) -> Path:
    """Write ``<stem>.safetensors`` and its card ``<stem>.json`` into ``folder``; returns the card path."""
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
