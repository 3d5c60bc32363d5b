"""Ranking the site models for one target, training-free, from features hooked inside each model.

Feature taps are forward hooks, so the models stay untouched: the input of the head (for GRTD)
and a mid-encoder stage (for LBTC), found automatically for UNet-like networks or named in the
model card (``feature_taps``). Labels come, in order of trust, from a reference segmentation,
from scribbles (a sparse label map: painted voxels count, ``unlabelled_value`` voxels do not), or
from the merged model's own prediction (a pseudo-label: the ranking is then self-referenced).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserInputError
from .merging import Probe, crop_patches, detect_head, probe_batch_size
from .models import SiteModel
from .transferability import UNLABELLED, fuse, fusion_weight, grtd, lbtc, logme, sample_voxels, weighted_kendall_tau
from .volume import Volume

DEFAULT_UNLABELLED_VALUE = 255
LABEL_SOURCES = ("reference", "scribbles", "pseudo-label")


@dataclass(frozen=True)
class Taps:
    global_module: str  # GRTD reads the features entering this module (the head)
    local_module: str  # LBTC reads the output of this module (a mid-encoder stage)


def find_taps(model: SiteModel, example: torch.Tensor) -> Taps:
    """The model card's taps, else the head's input and the first module whose output is at a quarter
    of the input resolution (the second encoder stage of a UNet-like network). ``example`` is one
    input patch; a 16-voxel corner of it is enough for the detection pass."""
    network, card = model.network, model.card
    example = example[:1, :, :16, :16, :16]
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
    local_module = card.feature_taps.get("local") or _quarter_resolution_module(network, example)
    return Taps(global_module, local_module)


def _quarter_resolution_module(network: torch.nn.Module, example: torch.Tensor) -> str:
    """The outermost module that first produces output at a quarter of the input resolution."""
    target = [s // 4 for s in example.shape[2:]]
    started: dict[str, int] = {}
    found: list[str] = []
    def on_start(name):
        def hook(module, args):
            started.setdefault(name, len(started))  # returns None: the input stays as it is
        return hook

    def on_finish(name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor) and out.ndim == example.ndim and list(out.shape[2:]) == target:
                found.append(name)
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
    if not found:
        raise UserInputError("no encoder stage at a quarter of the input resolution was found; "
                             "name one in the model card ('feature_taps': {'local': ...})")
    return min(found, key=started.__getitem__)  # a parent starts before its children


@dataclass
class TappedOutputs:
    probabilities: torch.Tensor  # (P, C, X, Y, Z)
    global_features: torch.Tensor  # (P, Fg, ...) at the head's input resolution
    local_features: torch.Tensor  # (P, Fl, ...) at the tapped stage's resolution


def tapped_pass(network: torch.nn.Module, patches: torch.Tensor, taps: Taps, device: torch.device, batch_size: int) -> TappedOutputs:
    """One forward pass over the patches recording the two taps (hooks removed afterwards)."""
    from .inference import autocast

    modules = dict(network.named_modules())
    global_parts, local_parts, outputs = [], [], []
    handles = [
        modules[taps.global_module].register_forward_pre_hook(lambda m, args: global_parts.append(args[0].float().cpu())),
        modules[taps.local_module].register_forward_hook(lambda m, args, out: local_parts.append(out.float().cpu())),
    ]
    network = network.to(device).eval()
    try:
        with torch.inference_mode(), autocast(device):
            for start in range(0, patches.shape[0], batch_size):
                logits = network(patches[start : start + batch_size].to(device))
                outputs.append(torch.softmax(logits.float(), dim=1).cpu())
    finally:
        for handle in handles:
            handle.remove()
    return TappedOutputs(torch.cat(outputs), torch.cat(global_parts), torch.cat(local_parts))


def features_at(features: torch.Tensor, positions: np.ndarray, patch_shape) -> np.ndarray:
    """Features (P, F, fx, fy, fz) interpolated at voxel positions (N, 4: patch, x, y, z) of full-resolution
    patches of ``patch_shape``: (N, F)."""
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


# ---------------------------------------------------------------------------------------------
# Label sources


@dataclass
class LabelSource:
    kind: str
    labels: np.ndarray  # model-space label map (X, Y, Z); UNLABELLED where nothing is known
    description: str

    @property
    def self_referenced(self) -> bool:
        return self.kind == "pseudo-label"


def scribble_labels(scribbles: Volume, num_classes: int, unlabelled_value: int, path) -> np.ndarray:
    """Scribble map values: ``unlabelled_value`` = not painted; 0 .. C-1 = a painted class."""
    values = scribbles.array.astype(np.int64)
    painted = values != unlabelled_value
    if not painted.any():
        raise UserInputError(f"scribbles {path} hold no painted voxels (every voxel is the unlabelled value {unlabelled_value})")
    unknown = sorted(set(np.unique(values[painted]).tolist()) - set(range(num_classes)))
    if unknown:
        raise UserInputError(
            f"scribbles {path} hold values {unknown} that are neither classes (0..{num_classes - 1}) nor the unlabelled value {unlabelled_value}")
    classes = np.unique(values[painted])
    if len(classes) < 2:
        raise UserInputError(f"scribbles {path} paint only class {classes[0]}; paint at least two classes (e.g. background and a structure)")
    return np.where(painted, values, UNLABELLED)


def crop_probe_labels(labels: np.ndarray, probe: Probe) -> np.ndarray:
    """The label map cut into the probe's patches: (P, X, Y, Z), UNLABELLED beyond the volume."""
    size = probe.patches.shape[2:]
    padded = np.pad(labels, [(0, max(0, s - n)) for s, n in zip(size, labels.shape)], constant_values=UNLABELLED)
    return np.stack([padded[x : x + size[0], y : y + size[1], z : z + size[2]] for x, y, z in probe.origins])


def label_probe(inputs: torch.Tensor, labels: np.ndarray, probe: Probe) -> Probe:
    """The probe plus a patch around each labelled class it misses (scribbles are often outside it)."""
    covered = crop_probe_labels(labels, probe)
    size = probe.patches.shape[2:]
    extra = []
    for value in np.unique(labels[labels != UNLABELLED]):
        if not (covered == value).any():
            centre = np.argwhere(labels == value).mean(axis=0).round().astype(int)
            extra.append(tuple(int(np.clip(c - s // 2, 0, max(0, n - s))) for c, s, n in zip(centre, size, labels.shape)))
    if not extra:
        return probe
    notes = probe.notes + [f"{len(extra)} patch(es) added to the probe so every labelled class is sampled"]
    return Probe(torch.cat([probe.patches, crop_patches(inputs, extra, size)]), probe.origins + extra, probe.mode, notes)


# ---------------------------------------------------------------------------------------------
# The ranking


@dataclass
class Ranking:
    rows: list[dict]
    label_source: str
    self_referenced: bool
    description: str
    fusion_weight: float
    samples: dict
    kendall_tau: dict | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    COLUMNS = ("rank", "model", "fused", "grtd", "lbtc", "logme", "entropy", "alpha", "true_dice")

    def to_json(self) -> dict:
        return {
            "label_source": self.label_source, "self_referenced": self.self_referenced, "description": self.description,
            "fusion_weight": self.fusion_weight, "samples": self.samples, "rows": self.rows,
            "weighted_kendall_tau": self.kendall_tau, "notes": self.notes, "seconds": round(self.seconds, 3),
        }

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.COLUMNS})
        return buffer.getvalue()

    def table(self) -> str:
        return ranking_table(self.to_json())


def ranking_table(data: dict) -> str:
    """The ranking (as ``Ranking.to_json`` gives it) as a plain-text table."""
    def cell(row, key, fmt):
        return "-" if row.get(key) is None else format(row[key], fmt)

    header = f"{'rank':>4}  {'model':<16} {'fused':>6} {'GRTD':>6} {'LBTC':>6} {'LogME':>7} {'H_k':>6} {'alpha':>6} {'Dice':>6}"
    lines = [f"ranking from {data['description']}" + (" (self-referenced)" if data["self_referenced"] else ""), header]
    for row in data["rows"]:
        lines.append(f"{row['rank']:>4}  {row['model']:<16} {cell(row, 'fused', '6.3f')} {cell(row, 'grtd', '6.3f')} "
                     f"{cell(row, 'lbtc', '6.3f')} {cell(row, 'logme', '7.3f')} {cell(row, 'entropy', '6.3f')} "
                     f"{cell(row, 'alpha', '6.3f')} {cell(row, 'true_dice', '6.3f')}")
    if data.get("weighted_kendall_tau"):
        lines.append("weighted Kendall tau vs true Dice: " + ", ".join(f"{k} {v:+.3f}" for k, v in data["weighted_kendall_tau"].items()))
    return "\n".join(lines)


def score_taus(rows: list[dict]) -> dict[str, float]:
    """Weighted Kendall tau of each score column of ranking rows against their ``true_dice``
    (the entropy column counts lower as better; entropy and alpha only when the rows have them)."""
    dice = [row["true_dice"] for row in rows]
    columns = {name: [row[name] for row in rows] for name in ("fused", "grtd", "lbtc", "logme")}
    if rows[0].get("entropy") is not None:
        columns["entropy (lower better)"] = [-row["entropy"] for row in rows]
    if rows[0].get("alpha") is not None:
        columns["alpha"] = [row["alpha"] for row in rows]
    return {name: round(weighted_kendall_tau(values, dice), 4) for name, values in columns.items()}


def rank_models(
    models: list[SiteModel],
    inputs: torch.Tensor | list[torch.Tensor],
    probe: Probe,
    source: LabelSource,
    device: torch.device,
    tapped: list[TappedOutputs] | None = None,
    entropy: list[float] | None = None,
    alpha: list[float] | None = None,
    true_dice: list[float] | None = None,
    seed: int = 0,
) -> Ranking:
    """Score every model on the labelled voxels of the probe; ``tapped`` reuses passes already made.

    ``inputs`` is the model input (1, C_in, X, Y, Z) shared by all models, or one per model when
    their stable-feature specs differ (same model space, same probe locations).
    """
    if len(models) < 2:
        raise UserInputError(f"ranking needs at least two models; {len(models)} given")
    start = time.perf_counter()
    notes: list[str] = []
    per_model_inputs = inputs if isinstance(inputs, list) else None
    probe_for_labels = label_probe(per_model_inputs[0] if per_model_inputs else inputs, source.labels, probe)
    notes += probe_for_labels.notes[len(probe.notes):]
    patch_labels = crop_probe_labels(source.labels, probe_for_labels)
    rng = np.random.default_rng(seed)
    sample = sample_voxels(patch_labels, rng)
    if len(np.unique(sample.labels)) < 2:
        raise UserInputError(f"the {source.kind} has fewer than two classes where the models can be probed; ranking needs two")
    shape = patch_labels.shape
    positions = np.stack(np.unravel_index(sample.indices, shape), axis=1)
    anchor_positions = np.stack(np.unravel_index(sample.anchor_indices, shape), axis=1)
    batch = probe_batch_size(probe_for_labels, probe_for_labels.patches.shape[2:])
    foreground = len([c for c in np.unique(sample.labels) if c > 0])
    taps = find_taps(models[0], probe_for_labels.patches[:1])  # ranked models share one architecture
    scores = []
    for index, model in enumerate(models):
        outputs = tapped[index] if tapped is not None and len(probe_for_labels.origins) == len(probe.origins) else None
        if outputs is None:
            patches = probe_for_labels.patches if per_model_inputs is None else crop_patches(
                per_model_inputs[index], probe_for_labels.origins, shape[1:])
            outputs = tapped_pass(model.network, patches, taps, device, batch)
        global_features = features_at(outputs.global_features, positions, shape[1:])
        local_features = features_at(outputs.local_features, positions, shape[1:])
        local_anchors = features_at(outputs.local_features, anchor_positions, shape[1:])
        grtd_score, per_class = grtd(global_features, sample.labels, np.random.default_rng(seed))
        scores.append({
            "model": model.name, "grtd": grtd_score, "grtd_per_class": per_class,
            "lbtc": lbtc(local_features, sample.labels, local_anchors, sample.anchor_labels),
            "logme": logme(global_features, sample.labels),
            "taps": {"global": taps.global_module, "local": taps.local_module},
        })
    fused = fuse([s["grtd"] for s in scores], [s["lbtc"] for s in scores], foreground)
    for s, value, k in zip(scores, fused, range(len(scores))):
        s["fused"] = float(value)
        s["entropy"] = entropy[k] if entropy is not None else None
        s["alpha"] = alpha[k] if alpha is not None else None
        s["true_dice"] = true_dice[k] if true_dice is not None else None
    order = sorted(range(len(scores)), key=lambda i: -scores[i]["fused"])
    rows = []
    for position, i in enumerate(order, start=1):
        row = {key: (round(v, 6) if isinstance(v, float) else v) for key, v in scores[i].items()}
        rows.append({"rank": position, **row})
    tau = score_taus(scores) if true_dice is not None else None
    samples = {"voxels": int(len(sample.indices)), "anchors": int(len(sample.anchor_indices)),
               "per_class": {int(c): int((sample.labels == c).sum()) for c in np.unique(sample.labels)},
               "patches": len(probe_for_labels.origins)}
    return Ranking(rows, source.kind, source.self_referenced, source.description, fusion_weight(foreground), samples, tau,
                   notes, time.perf_counter() - start)
