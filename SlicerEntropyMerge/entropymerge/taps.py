"""Forward taps: the features the transferability scores read inside each site model.

Feature taps are forward hooks, so the models stay untouched. GRTD reads the decoder stages, LBTC
the encoder stages, as TopoTE computes them; the stages are found automatically for UNet-like
networks (``find_taps``), or one module each is named in the model card (``feature_taps``).
``tapped_pass`` runs a model over the probe once, recording its outputs and every tap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserInputError
from .head import detect_head
from .models import SiteModel
from .probe import batched_forward
from .transferability import decoder_stage_weights, encoder_stage_weights


@dataclass(frozen=True)
class Tap:
    """One feature tap: the module, and whether its output or its input (the head's input) is read."""

    module: str
    reads: str = "output"  # or "input": the features entering the module (the head's input)


@dataclass(frozen=True)
class Taps:
    """Where the scores read features: GRTD on the decoder stages (coarse to fine, the head's input last),
    LBTC on the encoder stages (fine to coarse), each stage weighted as in TopoTE (a Gaussian over the stages)."""

    decoder: tuple[Tap, ...]
    encoder: tuple[Tap, ...]

    def describe(self) -> dict:
        """The taps for ranking.json: module names per group and the stage weights."""
        def name(tap):
            return f"{tap.module} ({tap.reads})" if tap.reads == "input" else tap.module

        return {"decoder": [name(t) for t in self.decoder], "decoder_weights": decoder_stage_weights(len(self.decoder)).round(3).tolist(),
                "encoder": [name(t) for t in self.encoder], "encoder_weights": encoder_stage_weights(len(self.encoder)).round(3).tolist()}


def find_taps(model: SiteModel, example: torch.Tensor) -> Taps:
    """The model card's taps (``feature_taps``: ``global`` = one module whose input GRTD reads,
    ``local`` = one module whose output LBTC reads), else the network's stages found in one pass:
    encoder stages = the outermost module that halves the resolution to each level, decoder stages =
    the outermost module that doubles it back to each level (outside the head), then the head's input.
    ``example`` is one input patch; a 32-voxel corner of it is enough for the detection pass.

    Args:
        model: a site model (the ranked models share its architecture).
        example: (1, C_in, X, Y, Z) input patch, at least 32 voxels per axis for deep networks.

    Returns:
        The decoder taps (coarse to fine) and encoder taps (fine to coarse). Raises ``UserInputError``
        when the model card names a module that does not exist or no stage can be found.
    """
    network, card = model.network, model.card
    example = example[:1, :, :32, :32, :32]  # deep networks (4 halvings) need 32 voxels to keep instance norm defined
    modules = dict(network.named_modules())
    for key, name in card.feature_taps.items():
        if name not in modules:
            raise UserInputError(f"model card of {model.name}: feature tap '{key}' names a module that does not exist: {name}")
    global_module = card.feature_taps.get("global")
    if global_module is None:
        head = detect_head(network, card.num_classes, card.head)
        if head is None or not head.module_name:
            raise UserInputError(f"{model.name}: cannot find the head to tap; name it in the model card ('feature_taps': {{'global': ...}})")
        global_module = head.module_name
    stages = _resolution_stages(network, example, global_module)
    head_input = Tap(global_module, "input")
    if card.feature_taps.get("global"):
        decoder: tuple[Tap, ...] = (head_input,)
    else:
        decoder = tuple(Tap(name) for name in stages.decoder) + (() if stages.head_input_is_last_stage else (head_input,))
    if card.feature_taps.get("local"):
        encoder: tuple[Tap, ...] = (Tap(card.feature_taps["local"]),)
    elif stages.encoder:
        encoder = tuple(Tap(name) for name in stages.encoder)
    else:
        raise UserInputError("no encoder stage that lowers the resolution was found; "
                             "name one in the model card ('feature_taps': {'local': ...})")
    return Taps(decoder, encoder)


@dataclass
class _Stages:
    encoder: list[str]
    decoder: list[str]
    head_input_is_last_stage: bool


def _resolution_stages(network: torch.nn.Module, example: torch.Tensor, head_module: str) -> _Stages:
    """One pass recording each module's input and output resolution (as a halving level)."""
    size = example.shape[2]
    records: dict[str, dict] = {}
    head_input: list[torch.Tensor] = []

    def level(tensor) -> int | None:
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != example.ndim or size % tensor.shape[2]:
            return None
        ratio = size // tensor.shape[2]
        return ratio.bit_length() - 1 if ratio & (ratio - 1) == 0 else None

    def on_start(name):
        def hook(module, args):
            records.setdefault(name, {"start": len(records), "in": level(args[0]) if args else None})
            if name == head_module and args:
                head_input.append(args[0])
        return hook

    def on_finish(name):
        def hook(module, args, out):
            records[name].update(out=level(out), tensor=out if isinstance(out, torch.Tensor) else None)
        return hook

    handles = []
    for name, module in network.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(on_start(name)), module.register_forward_hook(on_finish(name))]
    try:
        with torch.inference_mode():
            network.eval()(example)
    finally:
        for handle in handles:
            handle.remove()

    def inside_head(name):
        return name == head_module or name.startswith(head_module + ".") or head_module.startswith(name + ".")

    def outermost(changes):
        chosen: dict[int, str] = {}
        for name, record in sorted(records.items(), key=lambda item: item[1]["start"]):  # a parent starts before its children
            if record.get("out") is not None and record["in"] is not None and changes(record["in"], record["out"]) and not inside_head(name):
                chosen.setdefault(record["out"], name)
        return chosen

    down = outermost(lambda before, after: after > before)
    up = outermost(lambda before, after: after < before)
    decoder = [up[key] for key in sorted(up, reverse=True)]
    last = records[decoder[-1]].get("tensor") if decoder else None
    return _Stages([down[key] for key in sorted(down)], decoder,
                   bool(head_input) and last is not None and head_input[0] is last)


@dataclass
class TappedOutputs:
    """A model's outputs on the probe patches and the features at its taps, all on the CPU."""

    probabilities: torch.Tensor  # (P, C, X, Y, Z)
    decoder_features: list[torch.Tensor]  # per decoder tap: (P, F, ...) at that stage's resolution
    encoder_features: list[torch.Tensor]  # per encoder tap: (P, F, ...)


def tapped_pass(network: torch.nn.Module, patches: torch.Tensor, taps: Taps, device: torch.device, batch_size: int) -> TappedOutputs:
    """One forward pass over the patches recording every tap (hooks removed afterwards).

    Args:
        network: the site model's network (moved to ``device``, eval mode).
        patches: (P, C_in, X, Y, Z) input patches.
        taps: where to read features (``find_taps``).
        device: where the network runs.
        batch_size: patches per forward pass.

    Returns:
        The probabilities (P, C, X, Y, Z) and, per tap, the features (P, F, ...) at that stage's
        resolution, float32 on the CPU.
    """
    modules = dict(network.named_modules())
    parts: dict[tuple[str, Tap], list[torch.Tensor]] = {}
    handles = []
    for group, group_taps in (("decoder", taps.decoder), ("encoder", taps.encoder)):
        for tap in group_taps:
            store = parts.setdefault((group, tap), [])
            if tap.reads == "input":
                handles.append(modules[tap.module].register_forward_pre_hook(lambda m, args, store=store: store.append(args[0].float().cpu())))
            else:
                handles.append(modules[tap.module].register_forward_hook(lambda m, args, out, store=store: store.append(out.float().cpu())))
    try:
        probabilities = torch.cat(batched_forward(network, patches, device, batch_size))
    finally:
        for handle in handles:
            handle.remove()
    return TappedOutputs(probabilities, [torch.cat(parts[("decoder", t)]) for t in taps.decoder],
                         [torch.cat(parts[("encoder", t)]) for t in taps.encoder])


def features_at(features: torch.Tensor, positions: np.ndarray, patch_shape) -> np.ndarray:
    """Features of a tap interpolated (trilinear, voxel centres) at voxel positions of the full-resolution patches.

    Args:
        features: (P, F, fx, fy, fz) features of one tap.
        positions: (N, 4) integer rows (patch, x, y, z) in full-resolution voxels.
        patch_shape: the full-resolution patch size (X, Y, Z).

    Returns:
        (N, F) float32 features.
    """
    result = np.zeros((len(positions), features.shape[1]), dtype=np.float32)
    sizes = torch.tensor(patch_shape, dtype=torch.float32)
    for patch in np.unique(positions[:, 0]):
        rows = np.flatnonzero(positions[:, 0] == patch)
        voxels = torch.from_numpy(positions[rows, 1:].astype(np.float32))
        normalized = (2 * voxels + 1) / sizes - 1  # voxel centres, align_corners=False
        grid = normalized.flip(-1).view(1, -1, 1, 1, 3)  # grid_sample wants (z, y, x) for (X, Y, Z) tensors
        sampled = F.grid_sample(features[int(patch) : int(patch) + 1], grid, mode="bilinear", padding_mode="border", align_corners=False)
        result[rows] = sampled[0, :, :, 0, 0].T.numpy()
    return result
