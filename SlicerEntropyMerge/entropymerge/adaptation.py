"""Collapse-safe test-time adaptation of the merged network on the probe (METHODS.md section 3).

Both methods adapt only the affine weight and bias of the normalisation layers, for a few Adam
steps on the probe, starting from the merged model. Layers built without affine parameters (MONAI's
default instance norm) get an identity affine (weight 1, bias 0) on the adapted copy, which leaves
its output bit for bit unchanged until the first step. Optionally only reliable voxels count in the
loss (SAR/EATA): those whose normalised entropy is below a given fraction (of log C); and a
class-proportion term (KL divergence of the probe's soft class mix to its start) can hold the
predicted class mix in place. TENT minimises the mean voxel entropy; DSBR
minimises the class-balanced entropy, in which every class predicted on the probe counts equally,
so the loss cannot be lowered by growing the easy background. A guard tracks the predicted class
proportions on the probe after every step and, when a class present at the start vanishes or the
foreground fraction leaves [0.5x, 1.25x] of its start value, restores the pre-adaptation weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .entropy import class_balanced_weights, normalized_entropy, predicted_labels
from .errors import UserInputError
from .inference import autocast
from .probe import Probe, apply_batchnorm_policy, patch_batches
from .progress import Progress
from .settings import AdaptationSettings

# allowed foreground fraction, relative to its value before adaptation; growth beyond 1.25x never helped in
# benchmarks/adaptation.py (DSBR grew it 1.3-2x and lost up to 0.25 Dice), shrinking to 0.7x sometimes did (TENT)
FOREGROUND_RANGE = (0.5, 1.25)
NORMALIZATION_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)  # batch and instance norm share _NormBase


@dataclass
class AdaptationResult:
    """What one adaptation did, step by step."""

    method: str
    parameters: int  # adapted scalars: the normalisation layers' weights and biases
    identity_affine_layers: int = 0  # normalisation layers that had no affine and got an identity one to adapt
    losses: list[float] = field(default_factory=list)  # loss of step t, on the weights before its update
    proportions: list[np.ndarray] = field(default_factory=list)  # (C,) predicted class fractions on the probe: start, after each step
    reliable_fractions: list[float] = field(default_factory=list)  # share of probe voxels counted in the loss of each step
    guard: dict | None = None  # the first collapse the guard saw: rule, step, message
    restored: bool = False  # the pre-adaptation weights segment the volume

    def describe(self, class_names: Sequence[str], settings: AdaptationSettings) -> dict:
        """The record for summary.json; ``proportions_after`` are those after the last step that ran."""
        named = lambda fractions: {name: round(float(f), 6) for name, f in zip(class_names, fractions)}
        return {
            "method": self.method,
            "steps": settings.steps,
            "steps_run": len(self.losses),
            "learning_rate": settings.learning_rate,
            "seed": settings.seed,
            "adapted_parameters": self.parameters,
            "identity_affine_layers": self.identity_affine_layers,
            "reliable_below": settings.reliable_below,
            "prior_weight": settings.prior_weight,
            "reliable_fraction_per_step": [round(v, 6) for v in self.reliable_fractions],
            "loss_per_step": [round(v, 6) for v in self.losses],
            "proportions_before": named(self.proportions[0]),
            "proportions_after": named(self.proportions[-1]),
            "foreground_fraction_per_step": [round(1.0 - float(p[0]), 6) for p in self.proportions],
            "guard_fired": self.guard is not None,
            "guard": self.guard,
            "restored": self.restored,
        }


def normalization_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The affine weight and bias of every batch, instance, group and layer norm of ``network``.

    Args:
        network: the network.

    Returns:
        The parameters (the network's own, not copies), in module order, weight before bias.
    """
    return [
        parameter
        for module in network.modules() if isinstance(module, NORMALIZATION_LAYERS)
        for parameter in (module.weight, module.bias) if parameter is not None
    ]


def add_identity_affines(network: torch.nn.Module) -> int:
    """Give every normalisation layer of ``network`` that has no affine weight an identity one, in place.

    Weight 1 and bias 0 per channel (per element for layer norm), as trainable parameters: the
    layer's output is unchanged until they are trained.

    Args:
        network: the network, changed in place.

    Returns:
        The number of layers that got an identity affine.
    """
    changed = 0
    for module in network.modules():
        if not isinstance(module, NORMALIZATION_LAYERS) or module.weight is not None:
            continue
        if isinstance(module, torch.nn.LayerNorm):
            shape, module.elementwise_affine = module.normalized_shape, True
        else:
            shape = (module.num_channels if isinstance(module, torch.nn.GroupNorm) else module.num_features,)
            module.affine = True
        module.weight = torch.nn.Parameter(torch.ones(shape))
        module.bias = torch.nn.Parameter(torch.zeros(shape))
        changed += 1
    return changed


def adaptation_loss(probabilities: torch.Tensor, method: str, counts: torch.Tensor | None = None,
                    reliable_below: float | None = None) -> torch.Tensor:
    """The entropy loss of softmax ``probabilities`` (N, C, X, Y, Z), a scalar with gradient.

    ``tent``: mean normalised voxel entropy. ``dsbr``: (1/|C_hat|) sum_c (1/n_c) sum_{v: y_v = c} h(v),
    with y_v = argmax p(v) and n_c = |{v: y_v = c}| a stop-gradient count. With ``reliable_below``
    only voxels with h(v) below it count (and n_c counts only those). ``counts`` (C,) are these
    counts over the whole probe when ``probabilities`` is only a batch of it; the losses of the
    batches then sum to the loss of the probe.

    Args:
        probabilities: (N, C, X, Y, Z) softmax output, with gradient.
        method: "tent" or "dsbr".
        counts: (C,) voxels per predicted class over the whole probe; None: those of ``probabilities``.
        reliable_below: only voxels whose normalised entropy is below this count; None: all.

    Returns:
        The loss, a scalar tensor with gradient.
    """
    entropy = normalized_entropy(probabilities, dim=1)
    predicted = predicted_labels(probabilities.detach())
    if reliable_below is not None:
        entropy = entropy * (entropy.detach() < reliable_below)
    if counts is None:
        counts = loss_counts(probabilities.detach(), reliable_below)
    counts = counts.to(entropy.device, torch.float32)
    if method == "tent":
        return entropy.sum() / counts.sum().clamp_min(1)
    if method == "dsbr":
        return (entropy * class_balanced_weights(counts)[predicted]).sum()
    raise ValueError(f"unknown adaptation loss {method!r}")


def proportion_loss(probabilities: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """KL(start || now) / log C of the soft class proportions: ``probabilities`` (N, C, X, Y, Z) give
    ``now`` (C,), their mean over voxels; ``start`` (C,) is the same mean before adaptation. Zero
    (with zero gradient) while the proportions are unchanged; it counters the drift of the class
    mix (foreground shrinking under TENT, growing under DSBR).

    Args:
        probabilities: (N, C, X, Y, Z) softmax output, with gradient.
        start: (C,) mean class probabilities before adaptation.

    Returns:
        The loss, a scalar tensor in units of log C.
    """
    now = probabilities.mean(dim=(0, *range(2, probabilities.dim()))).clamp_min(1e-8)
    start = start.clamp_min(1e-8)
    return (start * (start.log() - now.log())).sum() / math.log(probabilities.shape[1])


def loss_counts(probabilities: torch.Tensor, reliable_below: float | None = None) -> torch.Tensor:
    """Voxels predicted as each class; with ``reliable_below`` only those whose normalised entropy is below it.

    Args:
        probabilities: (N, C, ...) softmax output.
        reliable_below: the normalised-entropy threshold; None: every voxel counts.

    Returns:
        (C,) int64 counts, on the device of ``probabilities``.
    """
    predicted = predicted_labels(probabilities)
    if reliable_below is not None:
        predicted = predicted[normalized_entropy(probabilities, dim=1) < reliable_below]
    return torch.bincount(predicted.flatten(), minlength=probabilities.shape[1])


def collapse(start: np.ndarray, now: np.ndarray, class_names: Sequence[str]) -> tuple[str, str] | None:
    """The guard: (rule, message) when the class proportions ``now`` have collapsed against ``start``, else None.

    Args:
        start: (C,) fractions of the probe voxels predicted as each class before adaptation; class 0 is the background.
        now: (C,) the same fractions now.
        class_names: C names, for the message.

    Returns:
        (rule, message) with rule "class_vanished" or "foreground_fraction", or None while nothing collapsed.
    """
    vanished = [name for name, before, after in zip(class_names, start, now) if before > 0 and after == 0]
    if vanished:
        return "class_vanished", f"no probe voxel is predicted as {', '.join(vanished)} any more"
    before, after = 1.0 - float(start[0]), 1.0 - float(now[0])
    low, high = FOREGROUND_RANGE
    if before > 0 and not low * before <= after <= high * before:
        return "foreground_fraction", (f"the foreground fraction went from {before:.4f} to {after:.4f}, "
                                       f"outside [{low:g}x, {high:g}x] of its start")
    return None


def adapt(
    network: torch.nn.Module,
    probe: Probe,
    settings: AdaptationSettings,
    device: torch.device,
    batch_size: int = 2,
    class_names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> tuple[torch.nn.Module, AdaptationResult]:
    """Adapt a copy of ``network`` on the probe; ``network`` itself is never changed.

    Returns the network to segment with (the adapted copy, or ``network`` when the guard restored
    the pre-adaptation weights) and the record. Batch norms normalise with the probe's batch
    statistics while adapting (TENT) and have their running statistics re-estimated on the probe
    afterwards; instance norms need neither. Normalisation layers without affine parameters get
    identity ones on the copy (``add_identity_affines``), so the adapted copy may hold more
    parameters than ``network``.

    Args:
        network: the merged network.
        probe: the probe; its (P, C_in, X, Y, Z) patches are the adaptation data.
        settings: method, steps, learning rate, seed, guard and loss options.
        device: where the adaptation runs.
        batch_size: probe patches per step's forward pass (the gradient sums over all batches).
        class_names: C names for the record and the guard's messages; None: "class c".
        progress: progress reports, one per step.

    Returns:
        (the network to segment with, the record of the adaptation).
    """
    settings.check()
    progress = progress or Progress()
    adapted = copy.deepcopy(network)
    identity_affines = add_identity_affines(adapted)
    adapted = adapted.to(device).eval()
    adapted.requires_grad_(False)
    parameters = normalization_parameters(adapted)
    if not parameters:
        raise UserInputError("--adapt changes the normalisation layers' affine weights, but this network has no "
                             "batch, instance, group or layer normalisation")
    for parameter in parameters:
        parameter.requires_grad_(True)
    batch_norms = [m for m in adapted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in batch_norms:
        norm.train()
    result = AdaptationResult(settings.method, sum(p.numel() for p in parameters), identity_affines)
    optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate)
    batches = patch_batches(probe.patches, batch_size)
    with _deterministic(settings.seed, device):
        counts, in_loss = _predicted_counts(adapted, batches, device, settings.reliable_below)
        result.proportions.append((counts / counts.sum()).numpy())
        names = list(class_names or [f"class {c}" for c in range(len(counts))])
        start_proportions: list[torch.Tensor] = []  # per batch, its soft class proportions before adaptation
        for step in range(1, settings.steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            for index, batch in enumerate(batches):
                with autocast(device):
                    logits = adapted(batch.to(device))
                probabilities = torch.softmax(logits.float(), dim=1)
                batch_loss = adaptation_loss(probabilities, settings.method, in_loss, settings.reliable_below)
                if settings.prior_weight:
                    if step == 1:
                        start_proportions.append(probabilities.detach().mean(dim=(0, 2, 3, 4)))
                    share = batch.shape[0] / probe.patches.shape[0]
                    batch_loss = batch_loss + settings.prior_weight * share * proportion_loss(probabilities, start_proportions[index])
                batch_loss.backward()
                loss += float(batch_loss.detach())
            optimizer.step()
            result.reliable_fractions.append(float(in_loss.sum() / counts.sum()))
            counts, in_loss = _predicted_counts(adapted, batches, device, settings.reliable_below)
            result.losses.append(loss)
            result.proportions.append((counts / counts.sum()).numpy())
            progress.update(step / settings.steps, f"{settings.method.upper()} step {step}/{settings.steps}, loss {loss:.4f}")
            collapsed = result.guard is None and collapse(result.proportions[0], result.proportions[-1], names)
            if collapsed:
                rule, message = collapsed
                result.guard = {"rule": rule, "step": step, "message": message}
                if settings.restore_on_collapse:
                    result.restored = True
                    progress.note(f"{settings.method.upper()} adaptation stopped at step {step}: {message}; "
                                  "the pre-adaptation weights are used")
                    return network, result
    adapted.requires_grad_(False)
    if batch_norms:
        apply_batchnorm_policy(adapted, probe, "reestimate", device, batch_size)
    return adapted.eval(), result


def _predicted_counts(network: torch.nn.Module, batches: list[torch.Tensor], device: torch.device,
                      reliable_below: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """How many probe voxels ``network`` predicts as each class, all and those that count in the loss:
    two (C,) float64 tensors on the CPU (the same one without ``reliable_below``)."""
    counts, in_loss = 0, 0
    with torch.no_grad():
        for batch in batches:
            with autocast(device):
                logits = network(batch.to(device))
            probabilities = torch.softmax(logits.float(), dim=1)
            counts = counts + loss_counts(probabilities).cpu().double()
            if reliable_below is not None:
                in_loss = in_loss + loss_counts(probabilities, reliable_below).cpu().double()
    return counts, (counts if reliable_below is None else in_loss)


@contextlib.contextmanager
def _deterministic(seed: int, device: torch.device):
    """Seeded random state and deterministic cuDNN kernels for the adaptation only; restored afterwards."""
    cuda = device.type == "cuda"
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(seed)
        if cuda:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            yield
        finally:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
