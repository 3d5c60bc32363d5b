"""Merged models as artefacts: the one network a merge (or a merge and an adaptation) produced,
written as ``<name>.safetensors`` + ``<name>.json``, a model card that loads back as a site model.

The card takes labels, input channels, preprocessing, stable features, head and feature taps from
the source models, and the sliding-window settings of the run; ``training`` records the provenance:
the source models with the SHA-256 of their weights files, the method, the coefficients alpha
(body) and beta (head), the volume and the entropymerge version.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import UserInputError
from .modelcard import InferenceSettings, ModelCard
from .models import SiteModel, save_site_model
from .outputs import safe_file_stem
from .safeconfig import build_network, network_class
from .summary import read_summary_file
from .validation import check_writable_folder

NORM_ARGUMENTS = ("norm", "norm_name")  # how MONAI networks name their normalisation layer argument


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, as 64 hexadecimal digits (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_record(model: SiteModel) -> dict:
    """One source model in the provenance: name, site, the file it came from, and its weights' SHA-256."""
    weights = model.weights or model.source
    return {"name": model.name, "site": model.card.site, "source": str(model.source), "weights": str(weights),
            "sha256": file_sha256(weights) if weights.is_file() else None}


def named_coefficients(models: Sequence[SiteModel], values) -> dict[str, float] | None:
    """{model name: coefficient} at full precision (the card must reproduce the merge exactly); None for None."""
    return None if values is None else {m.name: float(v) for m, v in zip(models, values)}


def check_model_folder(folder: Path, overwrite: bool, protected: Sequence[Path] = ()) -> None:
    """Refuse, before any work, a model folder that holds files unless ``overwrite``, or that holds an input.

    Args:
        folder: where the merged model will be written.
        overwrite: allow a folder that already holds files.
        protected: the command's inputs (the source models, the volume).

    Raises:
        UserInputError: a file where the folder should be, a non-empty folder without ``overwrite``,
            a folder holding an input, or a folder that cannot be written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"model folder {folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UserInputError(f"model folder {folder} is not empty; choose another folder or add --overwrite")
    resolved = folder.resolve()
    for path in protected:
        if Path(path).resolve().parent == resolved or Path(path).resolve() == resolved:
            raise UserInputError(f"model folder {folder} holds an input of this command ({path}); choose another folder")
    check_writable_folder(folder, "model folder")


def network_spec(network: torch.nn.Module, spec: dict) -> dict:
    """The network spec that builds a network with exactly ``network``'s state-dict layout.

    Usually ``spec`` itself. After adaptation, normalisation layers built without affine
    parameters carry the identity affines they were given (and then trained): the spec is then
    the same network with affine normalisation (``norm=(name, {"affine": True})``).

    Args:
        network: the merged (and perhaps adapted) network.
        spec: the sources' network spec.

    Returns:
        ``spec``, or ``spec`` with affine normalisation.

    Raises:
        UserInputError: neither spec builds a network with ``network``'s parameter names and shapes.
    """
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    layouts = lambda s: {k: tuple(v.shape) for k, v in build_network(s, "merged model").state_dict().items()}
    if layouts(spec) == expected:
        return spec
    candidate = _with_affine_norms(spec)
    if candidate is not None and layouts(candidate) == expected:
        return candidate
    raise UserInputError(f"the adapted network's parameters do not fit the network '{spec.get('_target_')}' of its sources, "
                         "even with affine normalisation; it cannot be saved as weights and a model card")


def _with_affine_norms(spec: dict) -> dict | None:
    """``spec`` with affine=True added to its normalisation argument, or None when it has none."""
    parameters = inspect.signature(network_class(spec["_target_"], "merged model")).parameters
    key = next((k for k in NORM_ARGUMENTS if k in spec or k in parameters), None)
    if key is None:
        return None
    norm = spec.get(key, parameters[key].default)
    if isinstance(norm, str):
        name, arguments = norm, {}
    elif isinstance(norm, (list, tuple)) and len(norm) == 2 and isinstance(norm[1], dict):
        name, arguments = norm
    else:
        return None
    return {**spec, key: [name, {**arguments, "affine": True}]}


def merged_model_card(
    models: Sequence[SiteModel],
    network: torch.nn.Module,
    *,
    name: str,
    method: str,
    body: Sequence[float],
    head: Sequence[float] | None = None,
    head_keys: Sequence[str] = (),
    volume: str | None = None,
    inference: InferenceSettings | None = None,
    adaptation: dict | None = None,
) -> ModelCard:
    """The card of a merged network: the sources' card fields and the merge's provenance in ``training``.

    Args:
        models: the K source models (the first one's card is the template).
        network: the merged network.
        name: the new model's name.
        method: the merge method's name.
        body, head: the K body coefficients alpha and, with a decoupled head, the K head coefficients beta.
        head_keys: the state-dict keys merged with ``head``.
        volume: the volume the coefficients were chosen for (file name), if any.
        inference: the run's sliding-window settings; None for the first card's.
        adaptation: the record of a test-time adaptation, if any.

    Returns:
        The card (``weights`` unset until it is saved).

    Raises:
        UserInputError: the sources are TorchScript programs (no network spec to write).
    """
    first = models[0].card
    if first.network is None:
        raise UserInputError(f"'{models[0].name}' is a TorchScript program: a merge of it cannot be saved as weights and a model card")
    names = ", ".join(m.name for m in models)
    training = {
        "merged_by": f"entropymerge {__version__}",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "method": method,
        "sources": [source_record(m) for m in models],
        "coefficients": {"body": named_coefficients(models, body), "head": named_coefficients(models, head)},
        "head_parameters": sorted(head_keys) if head is not None else None,  # the state-dict keys merged with beta
        "volume": volume,
        "adaptation": adaptation,
    }
    return replace(
        first,
        name=name,
        site=f"merged from {len(models)} site models",
        description=f"{method} merge of {names}" + (f" for {volume}" if volume else "")
                    + (f", adapted with {adaptation['method'].upper()}" if adaptation and not adaptation.get("restored") else ""),
        weights=None,
        network=network_spec(network, first.network),
        inference=inference or first.inference,
        training=training,
    )


def write_model_artefact(network: torch.nn.Module, card: ModelCard, folder: Path) -> dict[str, str]:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``folder``; returns their paths.

    Callers check the folder first (``check_model_folder``), before any work. Both files are
    written in a hidden folder beside them and moved into place, the card last, so a folder never
    holds a card whose weights are missing or half written.

    Args:
        network: the merged network.
        card: its card (``merged_model_card``); the file stem is ``safe_file_stem(card.name)``.
        folder: the model folder (made if needed).

    Returns:
        ``{"model_weights": path, "model_card": path}``.

    Raises:
        UserInputError: the folder cannot be written.
    """
    folder = Path(folder)
    stem = safe_file_stem(card.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".entropymerge-model-", dir=folder))
    except OSError as error:
        raise UserInputError(f"cannot write to model folder {folder}: {error.strerror or error}") from None
    try:
        save_site_model(network, card, staging, stem)
        for suffix in (".safetensors", ".json"):
            os.replace(staging / f"{stem}{suffix}", folder / f"{stem}{suffix}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"model_weights": str(folder / f"{stem}.safetensors"), "model_card": str(folder / f"{stem}.json")}


def parse_coefficients(text: str, count: int, option: str) -> np.ndarray:
    """``"0.5,0.3,0.2"`` -> (K,) coefficients; exit-2 errors for a wrong count, a negative value or a sum other than 1.

    They are not normalised: a sum other than 1 is more likely a typo than an intent.

    Args:
        text: comma-separated numbers, one per model in the order given.
        count: K, the number of models.
        option: the option's name for messages (e.g. ``"--coefficients"``).

    Returns:
        (K,) float64 coefficients, divided by their sum (which is within 1e-4 of 1).

    Raises:
        UserInputError: not numbers, not K of them, negative or not finite, or a sum other than 1.
    """
    try:
        values = np.array([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        raise UserInputError(f"{option} must be comma-separated numbers such as 0.5,0.3,0.2; got {text!r}") from None
    return checked_coefficients(values, count, option)


def checked_coefficients(values, count: int, option: str) -> np.ndarray:
    """``values`` as (count,) float64 coefficients, after the checks of ``parse_coefficients`` (``option`` names them)."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (count,):
        raise UserInputError(f"{option} has {values.size} values but {count} models were given; give one per model, in order")
    if not np.isfinite(values).all() or (values < 0).any():
        raise UserInputError(f"{option} must be finite and non-negative; got {values.tolist()}")
    if abs(values.sum() - 1.0) > 1e-4:
        raise UserInputError(f"{option} must sum to 1 (they are not normalised for you); got {values.tolist()}, "
                             f"which sum to {values.sum():.6g}")
    return values / values.sum()  # removes the rounding of printed values (|sum - 1| <= 1e-4)


def coefficients_from_summary(path: Path, models: Sequence[SiteModel]) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Body and head coefficients of a finished run (its ``summary.json``), in the order of ``models``.

    Args:
        path: the run's ``summary.json``.
        models: the run's site models (any order; matched by name).

    Returns:
        (alpha, beta, record): (K,) body coefficients, (K,) head coefficients or None when the head
        was not decoupled, and the run's ``{"method", "volume" (file name), "adaptation"}``.

    Raises:
        UserInputError: an unreadable summary, a method that merges no weights, other model names, or
            coefficients that fail ``checked_coefficients``.
    """
    try:
        summary = read_summary_file(path)
    except UserInputError as error:
        raise UserInputError(f"--from-summary {path}: not a readable run summary ({error})") from None
    method, coefficients = summary.method, summary.coefficients
    if coefficients.body is None:
        raise UserInputError(f"--from-summary {path}: the run used --method {method}, which merges no weights")
    names = [m.name for m in models]
    if sorted(coefficients.body) != sorted(names):
        raise UserInputError(f"--from-summary {path} names the models {', '.join(coefficients.body)}, but "
                             f"{', '.join(names)} were given; give the run's models")
    body = checked_coefficients([coefficients.body[n] for n in names], len(models), "the summary's body coefficients")
    head = None
    if summary.decoupled_head and coefficients.head:
        head = checked_coefficients([coefficients.head[n] for n in names], len(models), "the summary's head coefficients")
    record = {"method": method, "volume": Path(summary.volume.path).name or None,
              "adaptation": vars(summary.adaptation).copy() if summary.adaptation else None}
    return body, head, record


def merge_to_folder(model_paths: Sequence[Path], folder: Path, *, coefficients: str | None = None,
                    head_coefficients: str | None = None, from_summary: Path | None = None, name: str = "merged",
                    overwrite: bool = False, trust_code: bool = False, notes: list[str] | None = None) -> dict[str, str]:
    """``entropymerge merge``: merge the site models with given (or a run's) coefficients, without a volume,
    and write the merged network as a site model into ``folder``. Without coefficients: the mean merge.

    Args:
        model_paths: the site models (cards, weights files, bundles or folders of them).
        folder: the model folder (checked before any work, see ``check_model_folder``).
        coefficients: the body coefficients as text (``parse_coefficients``); None for the mean.
        head_coefficients: the head coefficients as text; None to merge the head like the body.
        from_summary: a finished run's ``summary.json`` whose coefficients to reuse.
        name: the merged model's name (and file stem).
        overwrite: allow a folder that already holds files.
        trust_code: as ``models.load_site_model``.
        notes: receives notes for the user.

    Returns:
        ``{"model_weights": path, "model_card": path}``.

    Raises:
        UserInputError: conflicting options, models that cannot be merged, bad coefficients, head
            coefficients for models whose head is not known, or a folder that cannot be used.
    """
    from .compatibility import check_compatible
    from .head import detect_head
    from .merging import mean_coefficients
    from .models import expand_model_paths, load_site_models
    from .weights import merged_network

    if coefficients and from_summary:
        raise UserInputError("give --coefficients or --from-summary, not both")
    if head_coefficients and from_summary:
        raise UserInputError("--from-summary takes the head coefficients from the run; do not also give --head-coefficients")
    check_model_folder(folder, overwrite, expand_model_paths(list(model_paths)))
    models = load_site_models(list(model_paths), trust_code)
    check_compatible(models)
    record: dict = {"method": "mean" if coefficients is None else "weighted", "volume": None, "adaptation": None}
    head = None
    if from_summary:
        body, head, record = coefficients_from_summary(from_summary, models)
        if record["adaptation"] and not record["adaptation"].get("restored"):
            (notes if notes is not None else []).append(
                "the run adapted its merged model; this is the merge before adaptation (run --save-model keeps the adapted one)")
    else:
        body = parse_coefficients(coefficients, len(models), "--coefficients") if coefficients else mean_coefficients(models)
        if head_coefficients:
            head = parse_coefficients(head_coefficients, len(models), "--head-coefficients")
    head_keys: frozenset[str] = frozenset()
    if head is not None:
        found = detect_head(models[0].network, models[0].card.num_classes, models[0].card.head)
        if found is None:
            raise UserInputError("the head of these models could not be told apart from the body, so it cannot have its own "
                                 "coefficients; name it in the model card's 'head'")
        head_keys = found.keys
    network = merged_network(models, body, head_keys, head)
    card = merged_model_card(models, network, name=name, method=record["method"], body=body, head=head,
                             head_keys=head_keys, volume=record["volume"])
    return write_model_artefact(network, card, folder)
