"""Whether site models can run and be merged: one trial pass per model, and the first difference that
stops two models being merged (architecture, labels, input channels, preprocessing, stable features)."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserInputError
from .modelcard import ModelCard
from .models import SiteModel, expand_model_paths, load_site_model, unique_names


def check_runs(model: SiteModel, window: tuple[int, int, int], what: str = "sliding window",
               device: torch.device | str = "cpu") -> None:
    """One forward pass of zeros, (1, C_in, *window), through ``model`` on ``device`` before any real work.

    Its card's input channels must fit the network, the window must suit the network's strides,
    and the output must be a segmentation on the window: (1, number of labels, *window). A CUDA
    out-of-memory error is not the model's fault and passes silently. The network is left on the CPU.

    Args:
        model: the loaded site model.
        window: the window size in voxels (X, Y, Z).
        what: how the message names the window (e.g. ``"probe patch"``).
        device: where to run the pass.

    Raises:
        UserInputError: the pass fails, or gives an output of another shape.
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
    """Check that every model can be merged with the first: same parameter names and shapes, network
    settings, labels, input channels, preprocessing and stable-feature spec.

    Raises:
        UserInputError: naming both models and the first difference found.
    """
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


def describe_models(paths: list[str | Path], trust_code: bool = False) -> list[dict]:
    """Each model behind ``paths`` (folders expanded) as a model list shows it, and whether it can join the set.

    Unlike ``load_site_models`` a bad path does not stop the others: its entry carries the problem.
    Every entry has ``source``, ``name``, ``compatible`` and ``problem`` (None when compatible);
    loaded models add ``site``, ``kind`` and ``labels``. Compatibility is judged against the first
    model that loads, with the same rules as ``check_compatible``.

    Args:
        paths: model cards, weights files, bundles or folders of them.
        trust_code: as ``models.load_site_model``.

    Returns:
        One entry per model found, in order, with unique names.
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
