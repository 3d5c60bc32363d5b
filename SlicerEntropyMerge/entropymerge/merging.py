"""Merging site models' weights into one model.

A merge method is a function ``(models, probe) -> coefficients`` that returns one non-negative
weight per site model, summing to 1; ``merge_state_dicts`` then forms the weighted sum of the
models' parameters and ``merged_network`` builds the single network that runs on the volume.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .entropy import probe_statistics
from .errors import UserInputError
from .features import pad_to_multiple
from .fingerprint import fingerprint_distances, intensity_fingerprint
from .inference import fit_window
from .models import SiteModel


def merge_state_dicts(
    states: Sequence[Mapping[str, torch.Tensor]],
    coefficients: Sequence[float],
    head_keys: frozenset[str] = frozenset(),
    head_coefficients: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """theta = sum_k c_k theta_k for every floating tensor; integer buffers come from the first state.

    Keys in ``head_keys`` are merged with ``head_coefficients`` instead (the decoupled head).
    Terms with weight 0 are skipped and the sum starts from the first term (not from zeros, which
    would turn -0.0 into +0.0), in at least float32: a one-hot merge returns a model bit for bit.
    """
    coefficients = check_coefficients(coefficients, len(states))
    head = check_coefficients(head_coefficients, len(states)) if head_coefficients is not None else coefficients
    merged = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            merged[key] = first.clone()
            continue
        weights = head if key in head_keys else coefficients
        dtype = torch.promote_types(first.dtype, torch.float32)
        total = None
        for weight, state in zip(weights, states):
            if weight != 0.0:
                value = state[key].to(dtype)
                total = value * float(weight) if total is None else total.add_(value, alpha=float(weight))
        merged[key] = total.to(first.dtype)
    return merged


def check_coefficients(coefficients: Sequence[float], count: int) -> np.ndarray:
    values = np.asarray(coefficients, dtype=np.float64)
    if values.shape != (count,):
        raise ValueError(f"expected {count} coefficients, got shape {values.shape}")
    if (values < -1e-9).any() or not np.isclose(values.sum(), 1.0, atol=1e-6):
        raise ValueError(f"coefficients must be non-negative and sum to 1, got {values.tolist()}")
    return values


def merged_network(
    models: Sequence[SiteModel],
    coefficients: Sequence[float],
    head_keys: frozenset[str] = frozenset(),
    head_coefficients: Sequence[float] | None = None,
) -> torch.nn.Module:
    """A new network (a copy of the first model's) carrying the merged weights; site models are untouched."""
    states = [model.state_dict() for model in models]
    network = copy.deepcopy(models[0].network)
    network.load_state_dict(merge_state_dicts(states, coefficients, head_keys, head_coefficients))
    return network.eval()


def interpolate(model_a: SiteModel, model_b: SiteModel, lam: float) -> torch.nn.Module:
    """theta(lam) = (1 - lam) theta_A + lam theta_B as a new network (a copy of A's), lam in [0, 1].

    The point at ``lam`` on the straight path between two site models (ModelMix, METHODS.md
    section 5); exactly model A at 0 and exactly model B at 1.
    """
    if not 0.0 <= lam <= 1.0:
        raise UserInputError(f"the interpolation weight must lie in [0, 1], got {lam}")
    return merged_network([model_a, model_b], [1.0 - lam, lam])


def mean_coefficients(models: Sequence[SiteModel], probe=None) -> np.ndarray:
    """The naive mean merge (model soup): every site model weighs 1/K."""
    return np.full(len(models), 1.0 / len(models))


def one_hot(index: int, count: int) -> np.ndarray:
    values = np.zeros(count)
    values[index] = 1.0
    return values


# ---------------------------------------------------------------------------------------------
# The probe: a bounded part of the target volume that every site model sees.


@dataclass
class Probe:
    """Patches of the model-space input that the site models run on: (P, C_in, X, Y, Z)."""

    patches: torch.Tensor
    origins: list[tuple[int, int, int]]
    mode: str
    notes: list[str] = field(default_factory=list)

    @property
    def voxels(self) -> int:
        return int(self.patches.shape[0] * np.prod(self.patches.shape[2:]))

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "patches": int(self.patches.shape[0]),
            "patch_size": list(self.patches.shape[2:]),
            "voxels": self.voxels,
            "origins": [list(o) for o in self.origins],
        }


def body_mask(image: torch.Tensor) -> torch.Tensor:
    """Voxels that differ clearly from the background value (the median of the volume's faces).

    Works for dark (MR, CT air) and bright backgrounds alike: (X, Y, Z) image -> bool mask.
    """
    faces = torch.cat([image[0].flatten(), image[-1].flatten(), image[:, 0].flatten(), image[:, -1].flatten(),
                       image[:, :, 0].flatten(), image[:, :, -1].flatten()])
    background = float(faces.median())
    sample = image.flatten()[:: max(1, image.numel() // 250_000)].float().numpy()  # percentiles from a sample
    low, high = np.percentile(sample, [1, 99])
    return (image - background).abs() > 0.1 * max(high - low, 1e-6)


def select_probe(inputs: torch.Tensor, patch_size, max_patches: int = 4, mode: str = "patches",
                 multiple=(16, 16, 16)) -> Probe:
    """Choose the probe from the model input (1, C_in, X, Y, Z), deterministically.

    ``patches``: up to ``max_patches`` patches that cover the body (most body voxels first, then as
    far apart as possible); the patch size is rounded up to the network's size ``multiple`` (with a
    note) and shrunk to the volume rounded up to it, so the volume is padded (edge values) by less
    than one multiple at most. ``whole``: the whole volume at half resolution, padded to the multiple.
    """
    notes: list[str] = []
    if mode == "whole":
        half = torch.nn.functional.interpolate(inputs.float(), scale_factor=0.5, mode="trilinear", align_corners=False)
        padded, _ = pad_to_multiple(half, tuple(multiple))
        return Probe(padded, [(0, 0, 0)], "whole", notes)
    if mode != "patches":
        raise UserInputError(f"unknown probe mode {mode!r}; use patches or whole")
    if max_patches < 1:
        raise UserInputError(f"--probe-patches must be at least 1, got {max_patches}")
    spatial = inputs.shape[2:]
    size = list(fit_window(patch_size, spatial, multiple, "the probe patch size", notes))
    if any(p > s for p, s in zip(size, spatial)):
        pads = [max(p - s, 0) for p, s in zip(size, spatial)]
        inputs = torch.nn.functional.pad(inputs, [a for pad in reversed(pads) for a in (0, pad)], mode="replicate")
        spatial = inputs.shape[2:]
    mask = body_mask(inputs[0, 0]).double()
    integral = torch.nn.functional.pad(mask.cumsum(0).cumsum(1).cumsum(2), (1, 0, 1, 0, 1, 0))
    stride = [max(p // 2, 1) for p in size]
    starts = [sorted(set(range(0, s - p + 1, st)) | {s - p}) for s, p, st in zip(spatial, size, stride)]
    candidates = [
        (_box_mean(integral, origin, size), origin)
        for origin in ((x, y, z) for x in starts[0] for y in starts[1] for z in starts[2])
    ]
    candidates.sort(key=lambda c: (-c[0], c[1]))
    wanted = min(max_patches, len(candidates))
    if wanted < max_patches:
        notes.append(f"the volume holds only {len(candidates)} distinct probe patches; using {wanted} instead of {max_patches}")
    # Most body first, then as far from the chosen ones as possible among well-covered patches.
    eligible = [c for c in candidates if c[0] >= 0.5 * candidates[0][0]]
    pool = eligible if len(eligible) >= wanted else candidates
    chosen = [pool[0]]
    while len(chosen) < wanted:
        remaining = [c for c in pool if c not in chosen]
        chosen.append(max(remaining, key=lambda c: (min(np.linalg.norm(np.subtract(c[1], o[1])) for o in chosen), c[0])))
    origins = [c[1] for c in chosen]
    return Probe(crop_patches(inputs, origins, size), origins, "patches", notes)


def crop_patches(inputs: torch.Tensor, origins, size) -> torch.Tensor:
    """Patches of ``size`` at ``origins`` from (1, C, X, Y, Z) inputs, replicate-padded past the far edges: (P, C, *size)."""
    spatial = inputs.shape[2:]
    pads = [max(0, max(o[axis] for o in origins) + size[axis] - spatial[axis]) for axis in range(3)]
    if any(pads):
        inputs = torch.nn.functional.pad(inputs, [a for pad in reversed(pads) for a in (0, pad)], mode="replicate")
    return torch.cat([inputs[:, :, x : x + size[0], y : y + size[1], z : z + size[2]] for x, y, z in origins])


def _box_mean(integral: torch.Tensor, origin, size) -> float:
    """Mean of the mask over a box, from its zero-padded 3D cumulative sum."""
    (x0, y0, z0), (x1, y1, z1) = origin, [o + s for o, s in zip(origin, size)]
    total = (
        integral[x1, y1, z1] - integral[x0, y1, z1] - integral[x1, y0, z1] - integral[x1, y1, z0]
        + integral[x0, y0, z1] + integral[x0, y1, z0] + integral[x1, y0, z0] - integral[x0, y0, z0]
    )
    return float(total) / float(np.prod(size))


def probe_batch_size(probe: Probe, roi_size, windows: int = 4) -> int:
    """Probe patches per forward pass: as many as fit in ``windows`` ROI windows' worth of voxels."""
    patch_voxels = int(np.prod(probe.patches.shape[2:]))
    return max(1, min(probe.patches.shape[0], windows * int(np.prod(roi_size)) // patch_voxels))


def probe_probabilities(network: torch.nn.Module, probe: Probe, device: torch.device, batch_size: int = 2) -> torch.Tensor:
    """Softmax output of ``network`` on every probe patch: (P, C, X, Y, Z) on the CPU."""
    from .inference import autocast

    network = network.to(device).eval()
    outputs = []
    with torch.inference_mode(), autocast(device):
        for start in range(0, probe.patches.shape[0], batch_size):
            logits = network(probe.patches[start : start + batch_size].to(device))
            outputs.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------------------
# The classification head: merged with its own coefficients.


@dataclass(frozen=True)
class Head:
    """The final layer(s) that map features to class logits: one module and its state-dict keys."""

    module_name: str
    keys: frozenset[str]


def _out_channels(name: str, module: torch.nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
        return None
    type_name = getattr(module, "original_name", type(module).__name__)
    return int(weight.shape[1] if "Transpose" in type_name else weight.shape[0])


def detect_head(network: torch.nn.Module, num_classes: int, names: tuple[str, ...] | None = None) -> Head | None:
    """The head named in the model card, or the smallest module holding the trailing layers whose
    output channels equal the number of classes. None when it cannot be told apart from the body."""
    state_keys = list(network.state_dict())
    modules = dict(network.named_modules())
    if names:
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise UserInputError(f"model card 'head' names modules that do not exist: {', '.join(unknown)}")
        prefix = names[0] if len(names) == 1 else ""
        keys = frozenset(k for k in state_keys if any(k.startswith(n + ".") for n in names))
        return Head(prefix, keys) if keys else None
    layers = [(name, _out_channels(name, m)) for name, m in modules.items() if _out_channels(name, m) is not None]
    trailing = []
    for name, out in reversed(layers):
        if out != num_classes:
            break
        trailing.append(name)
    if not trailing:
        return None
    parts = [name.split(".") for name in trailing]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    prefix = ".".join(common)
    if len(trailing) == 1:
        prefix = trailing[0]
    if not prefix:
        return None
    keys = frozenset(k for k in state_keys if k.startswith(prefix + "."))
    return Head(prefix, keys) if keys and len(keys) < len(state_keys) else None


def head_probabilities(body_network: torch.nn.Module, head: Head, models: Sequence[SiteModel], probe: Probe, device: torch.device,
                       batch_size: int = 2) -> list[torch.Tensor]:
    """Each site model's head applied to the merged body's features on the probe: K x (P, C, ...).

    The merged body runs once; a forward pre-hook captures the head's input and every head is
    applied to it with its own parameters.
    """
    from torch.func import functional_call

    from .inference import autocast

    network = body_network.to(device).eval()
    head_module = dict(network.named_modules())[head.module_name]
    captured: list[tuple] = []
    handle = head_module.register_forward_pre_hook(lambda module, args: captured.append(args))
    outputs: list[list[torch.Tensor]] = [[] for _ in models]
    start_length = len(head.module_name) + 1
    head_states = [{k[start_length:]: v.to(device) for k, v in m.state_dict().items() if k in head.keys} for m in models]
    try:
        with torch.inference_mode(), autocast(device):
            for start in range(0, probe.patches.shape[0], batch_size):
                captured.clear()
                network(probe.patches[start : start + batch_size].to(device))
                for k, state in enumerate(head_states):
                    logits = functional_call(head_module, state, captured[0])
                    outputs[k].append(torch.softmax(logits.float(), dim=1).cpu())
    finally:
        handle.remove()
    return [torch.cat(o) for o in outputs]


# ---------------------------------------------------------------------------------------------
# Entropy-adaptive coefficients.

@dataclass(frozen=True)
class Statistic:
    """One label-free per-model score s_k behind alpha = softmax(-s / tau) (lower = more trusted).

    ``shrink``: pull alpha toward the mean merge as far as the models disagree (see ``shrink_toward_mean``).
    ``trim``: no softmax: the mean merge of the models whose score is not an outlier (see ``trimmed_mean``).
    ``alone``: it means something for one model on its own (an entropy), so ``--refine`` can score a
    merged candidate with it; the others compare models with each other or with their training data.
    """

    keys: tuple[str, ...]  # s_k is the sum of these probe statistics
    shrink: bool = False
    trim: bool = False
    description: str = ""
    alone: bool = False

    def score(self, stats: dict[str, list[float]]) -> list[float]:
        return [float(sum(values)) for values in zip(*(stats[key] for key in self.keys))]


STATISTICS: dict[str, Statistic] = {
    "entropy": Statistic(("entropy",), alone=True, description="mean normalised entropy H_k"),
    "foreground_entropy": Statistic(("foreground_entropy",), alone=True, description="H_k weighted by 1 - mean_k p_k,bg"),
    "balanced_entropy": Statistic(("balanced_entropy",), alone=True, description="class-balanced entropy"),
    "consensus": Statistic(("foreground_entropy", "disagreement"), description="foreground entropy + Jensen-Shannon to the mean"),
    "cross_entropy": Statistic(("cross_entropy",), description="leave-one-out consensus cross-entropy"),
    "biased_entropy": Statistic(("balanced_entropy", "prediction_bias"), description="class-balanced entropy + prediction bias"),
    "entropy_kl": Statistic(("foreground_entropy", "consensus_kl"),
                            description="foreground entropy + KL of the others' mean output to the model's (unbounded)"),
    "cross_entropy_bias": Statistic(("cross_entropy", "prediction_bias"), description="consensus cross-entropy + prediction bias"),
    "trimmed_mean": Statistic(("cross_entropy", "prediction_bias"), trim=True,
                              description="mean merge of the sites whose consensus cross-entropy + bias is no outlier"),
    "shrunk_cross_entropy": Statistic(("cross_entropy",), shrink=True,
                                      description="consensus cross-entropy, shrunk toward the mean merge by disagreement"),
    "fingerprint": Statistic(("fingerprint_distance",), description="distance of the target's intensities to the site's training data"),
    "cross_entropy_fingerprint": Statistic(("cross_entropy", "fingerprint_distance"),
                                           description="consensus cross-entropy + intensity fingerprint distance"),
}


def plan_statistics(models: Sequence[SiteModel], probe: Probe, outputs: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """``probe_statistics`` of the site models' probe outputs, plus ``fingerprint_distance`` when every
    model card carries an intensity fingerprint of its training data."""
    stats = probe_statistics(outputs)
    distances = fingerprint_distances([m.card.training for m in models], intensity_fingerprint(probe.patches[:, 0]))
    if distances is not None:
        stats["fingerprint_distance"] = distances
    return stats


def softmax_coefficients(scores: Sequence[float], temperature: float) -> np.ndarray:
    """softmax(-score / temperature): lower uncertainty, larger weight."""
    if not temperature > 0:
        raise UserInputError(f"the temperature must be > 0, got {temperature}")
    logits = -np.asarray(scores, dtype=np.float64) / temperature
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def shrink_toward_mean(alpha: Sequence[float], disagreement: Sequence[float]) -> np.ndarray:
    """alpha' = lam alpha + (1 - lam) / K with lam = 1 - mean_k JS_k / ln 2 (T3-style agreement gating).

    ``disagreement``: each model's Jensen-Shannon divergence to the mean output, in units of ln 2
    (so in [0, 1]). Models that agree keep their adaptive weights; the more they disagree, the
    closer the merge comes to the mean merge.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    agreement = 1.0 - float(np.clip(np.mean(disagreement), 0.0, 1.0))
    return agreement * alpha + (1.0 - agreement) / len(alpha)


def site_scores(stats: dict[str, list[float]], statistic: str) -> list[float]:
    """The per-model score s_k that drives alpha (see ``STATISTICS``)."""
    if statistic not in STATISTICS:
        raise UserInputError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
    if "fingerprint_distance" in STATISTICS[statistic].keys and "fingerprint_distance" not in stats:
        raise UserInputError(f"--statistic {statistic} needs an intensity fingerprint of the training data in every "
                             "model card (training.intensity_fingerprint, written by entropymerge train)")
    return STATISTICS[statistic].score(stats)


def trimmed_mean(scores: Sequence[float], spread: float = 3.0, relative: float = 0.5) -> np.ndarray:
    """Equal weights for every model except the outliers, which get 0.

    A model is an outlier when its score s_k exceeds the median by more than both ``spread`` robust standard
    deviations (1.4826 x the median absolute deviation) and ``relative`` x the median: a site that is far off
    the others' consensus (one that finds nothing, an inverted contrast) is dropped, while sites that differ
    only a little all keep 1/K' (a sharp softmax over small differences would discard good sites).
    """
    scores = np.asarray(scores, dtype=np.float64)
    median = float(np.median(scores))
    deviation = 1.4826 * float(np.median(np.abs(scores - median)))
    kept = scores - median <= max(spread * deviation, relative * abs(median))
    return kept / kept.sum()


def statistic_coefficients(stats: dict[str, list[float]], statistic: str, temperature: float) -> np.ndarray:
    """alpha from the probe statistics: softmax(-s / tau), shrunk toward the mean where the statistic says so,
    or the trimmed mean merge for a ``trim`` statistic (the temperature then plays no part)."""
    if STATISTICS[statistic].trim:
        return trimmed_mean(site_scores(stats, statistic))
    alpha = softmax_coefficients(site_scores(stats, statistic), temperature)
    return shrink_toward_mean(alpha, stats["disagreement"]) if STATISTICS[statistic].shrink else alpha


@dataclass
class MergePlan:
    """How the site models are combined for one volume, and the evidence for it."""

    method: str
    body: np.ndarray | None  # alpha; None for the ensemble (no merge)
    head: np.ndarray | None = None  # beta when the head is decoupled
    head_keys: frozenset[str] = frozenset()
    details: dict = field(default_factory=dict)

    def network(self, models: Sequence[SiteModel]) -> torch.nn.Module:
        if self.body is None:
            raise ValueError("the ensemble has no single merged network")
        return merged_network(models, self.body, self.head_keys, self.head)


@dataclass
class AdaptiveSettings:
    temperature: float = 0.05
    head_temperature: float = 0.05
    decouple_head: bool = True
    statistic: str = "trimmed_mean"  # chosen by benchmarks/merging_quality.py (issue 12)
    refine: bool = False
    batchnorm: str = "merge"  # or "reestimate" on the probe


def adaptive_plan(
    models: Sequence[SiteModel],
    probe: Probe,
    site_probabilities: Sequence[torch.Tensor],
    settings: AdaptiveSettings,
    device: torch.device,
    batch_size: int = 2,
) -> MergePlan:
    """alpha = softmax(-H / tau) from the site models' probe outputs; beta from each head's entropy on
    the alpha-merged body's features; optionally the best of a few candidates by merged probe entropy."""
    stats = plan_statistics(models, probe, site_probabilities)
    scores = site_scores(stats, settings.statistic)
    alpha = statistic_coefficients(stats, settings.statistic, settings.temperature)
    details: dict = {"statistics": stats, "scores": scores, "statistic": settings.statistic,
                     "temperature": settings.temperature, "probe": probe.describe()}
    plan = MergePlan("adaptive", alpha, details=details)
    head = detect_head(models[0].network, models[0].card.num_classes, models[0].card.head) if settings.decouple_head else None
    if settings.decouple_head and head is None:
        details["head_note"] = "the head could not be told apart from the body; it is merged with alpha"
    if head is not None:
        body = merged_network(models, alpha)
        apply_batchnorm_policy(body, probe, settings.batchnorm, device, batch_size)
        per_head = head_probabilities(body, head, models, probe, device, batch_size)
        head_stats = probe_statistics(per_head)
        if "fingerprint_distance" in stats:  # a property of the site's data, not of its head
            head_stats["fingerprint_distance"] = stats["fingerprint_distance"]
        head_scores = site_scores(head_stats, settings.statistic)
        plan.head = statistic_coefficients(head_stats, settings.statistic, settings.head_temperature)
        plan.head_keys = head.keys
        details.update(head_module=head.module_name, head_scores=head_scores, head_temperature=settings.head_temperature)
    if settings.refine:
        plan = refine_plan(models, probe, plan, settings, device, batch_size)
    return plan


def refine_plan(models, probe: Probe, plan: MergePlan, settings: AdaptiveSettings, device, batch_size: int) -> MergePlan:
    """Forward-only search: alpha at other temperatures, the mean and each single model, scored by the
    merged model's own probe uncertainty (the statistic when it applies to one model alone, else the
    foreground entropy); keeps the lowest (no gradients)."""
    criterion = settings.statistic if STATISTICS[settings.statistic].alone else "foreground_entropy"
    count = len(models)
    candidates = [("adaptive", plan)]
    for factor in (0.5, 2.0):
        alpha = statistic_coefficients(plan.details["statistics"], settings.statistic, settings.temperature * factor)
        candidates.append((f"adaptive tau x{factor:g}", MergePlan("adaptive", alpha, alpha if plan.head is not None else None, plan.head_keys)))
    candidates.append(("mean", MergePlan("adaptive", mean_coefficients(models))))
    candidates += [(f"only {m.name}", MergePlan("adaptive", one_hot(i, count))) for i, m in enumerate(models)]
    results = []
    for label, candidate in candidates:
        network = candidate.network(models)
        apply_batchnorm_policy(network, probe, settings.batchnorm, device, batch_size)
        stats = probe_statistics([probe_probabilities(network, probe, device, batch_size)])
        results.append({"candidate": label, "score": site_scores(stats, criterion)[0],
                        "body": candidate.body.round(6).tolist()})
    best = min(range(len(results)), key=lambda i: results[i]["score"])
    chosen = candidates[best][1]
    chosen.details = dict(plan.details, candidates=results, chosen_candidate=results[best]["candidate"], refine_criterion=criterion)
    return chosen


def apply_batchnorm_policy(network: torch.nn.Module, probe: Probe, policy: str, device: torch.device, batch_size: int = 2) -> None:
    """``merge``: keep the merged running statistics; ``reestimate``: recompute them on the probe."""
    if policy == "merge":
        return
    if policy != "reestimate":
        raise UserInputError(f"unknown batch-norm policy {policy!r}; use merge or reestimate")
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    network.to(device)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the probe batches
        norm.train()
    with torch.no_grad():
        for start in range(0, probe.patches.shape[0], batch_size):
            network(probe.patches[start : start + batch_size].to(device))
    network.eval()
