"""Ranking the site models for one target, for two questions, from forward passes only.

"Which model can I trust on this case as it is?" (as-is columns, which order the rows): the
merge's own label-free per-model score and plain entropy, accuracy and Dice on scribbles, or the
true Dice against a reference. "Which model would do best after fine-tuning on a few labels of
this site?" (transfer columns): GRTD, LBTC, their fusion and LogME on features hooked inside each
model, as TopoTE computes them: GRTD over the decoder stages, LBTC over the encoder stages, each
stage weighted by a Gaussian. Feature taps are forward hooks, so the models stay untouched; the
stages are found automatically for UNet-like networks, or one module each is named in the model
card (``feature_taps``). Labels come, in order of trust, from a reference segmentation, from
scribbles (a sparse label map: painted voxels count, ``unlabelled_value`` voxels do not), or from
the merged model's own prediction (a pseudo-label: the ranking is then self-referenced).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .entropy import predicted_labels
from .errors import UserInputError
from .head import detect_head
from .models import SiteModel
from .probe import Probe, batched_forward, crop_patches, probe_batch_size
from .transferability import (
    UNLABELLED,
    decoder_stage_weights,
    encoder_stage_weights,
    fuse,
    fusion_weight,
    grtd,
    lbtc,
    logme,
    sample_voxels,
    weighted_taus,
)
from .volume import Volume

DEFAULT_UNLABELLED_VALUE = 255
LABEL_SOURCES = ("reference", "scribbles", "pseudo-label")


@dataclass(frozen=True)
class Tap:
    module: str
    reads: str = "output"  # or "input": the features entering the module (the head's input)


@dataclass(frozen=True)
class Taps:
    """Where the scores read features: GRTD on the decoder stages (coarse to fine, the head's input last),
    LBTC on the encoder stages (fine to coarse), each stage weighted as in TopoTE (a Gaussian over the stages)."""

    decoder: tuple[Tap, ...]
    encoder: tuple[Tap, ...]

    def describe(self) -> dict:
        def name(tap):
            return f"{tap.module} ({tap.reads})" if tap.reads == "input" else tap.module

        return {"decoder": [name(t) for t in self.decoder], "decoder_weights": decoder_stage_weights(len(self.decoder)).round(3).tolist(),
                "encoder": [name(t) for t in self.encoder], "encoder_weights": encoder_stage_weights(len(self.encoder)).round(3).tolist()}


def find_taps(model: SiteModel, example: torch.Tensor) -> Taps:
    """The model card's taps (``feature_taps``: ``global`` = one module whose input GRTD reads,
    ``local`` = one module whose output LBTC reads), else the network's stages found in one pass:
    encoder stages = the outermost module that halves the resolution to each level, decoder stages =
    the outermost module that doubles it back to each level (outside the head), then the head's input.
    ``example`` is one input patch; a 32-voxel corner of it is enough for the detection pass."""
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
    probabilities: torch.Tensor  # (P, C, X, Y, Z)
    decoder_features: list[torch.Tensor]  # per decoder tap: (P, F, ...) at that stage's resolution
    encoder_features: list[torch.Tensor]  # per encoder tap: (P, F, ...)


def tapped_pass(network: torch.nn.Module, patches: torch.Tensor, taps: Taps, device: torch.device, batch_size: int) -> TappedOutputs:
    """One forward pass over the patches recording every tap (hooks removed afterwards)."""
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


AS_IS = "as is"
TRANSFER = "transfer"
QUESTIONS = {AS_IS: "which site model can I trust on this case as it is?",
             TRANSFER: "which site model would do best after fine-tuning on a few labels of this site?"}


@dataclass(frozen=True)
class Column:
    """One ranking column: the question it answers, which way is better, and the labels it uses
    (``none``, ``scribbles``, ``reference``, or ``source``: the ranking's label source)."""

    key: str
    title: str
    question: str | None = None
    better: str | None = None
    labels: str = "none"


COLUMNS = (
    Column("rank", "as-is rank", AS_IS),
    Column("model", "model"),
    Column("uncertainty", "merge statistic", AS_IS, "lower"),
    Column("entropy", "mean entropy", AS_IS, "lower"),
    Column("alpha", "merge coefficient", AS_IS, "higher"),
    Column("scribble_accuracy", "accuracy on scribbles", AS_IS, "higher", "scribbles"),
    Column("scribble_dice", "Dice on scribbles", AS_IS, "higher", "scribbles"),
    Column("true_dice", "true Dice (the truth)", AS_IS, "higher", "reference"),
    Column("transfer_rank", "transfer rank", TRANSFER),
    Column("fused", "fused GRTD+LBTC", TRANSFER, "higher", "source"),
    Column("grtd", "GRTD", TRANSFER, "higher", "source"),
    Column("lbtc", "LBTC", TRANSFER, "higher", "source"),
    Column("logme", "LogME", TRANSFER, "higher", "source"),
)
SCORE_KEYS = tuple(c.key for c in COLUMNS if c.better and c.key != "true_dice")


@dataclass
class Ranking:
    """Two rankings of the same models: as is (rows in this order, ``rank``) and for transfer (``transfer_rank``)."""

    rows: list[dict]
    label_source: str
    self_referenced: bool
    description: str
    fusion_weight: float
    samples: dict
    as_is_basis: str  # the column that orders the as-is ranking
    statistic: str | None = None  # the merge statistic behind ``uncertainty``
    kendall_tau: dict | None = None  # {"additive": {column: tau}, "multiplicative": {...}} against the true Dice
    taps: dict | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def columns(self) -> list[dict]:
        """The columns these rows hold, each with its question, direction and labels."""
        present = [c for c in COLUMNS if any(row.get(c.key) is not None for row in self.rows)]
        described = []
        for column in present:
            title = f"{self.statistic} (merge statistic)" if column.key == "uncertainty" and self.statistic else column.title
            labels = self.description if column.labels == "source" else column.labels
            described.append({"key": column.key, "title": title, "question": column.question, "better": column.better, "labels": labels})
        return described

    def to_json(self) -> dict:
        return {
            "label_source": self.label_source, "self_referenced": self.self_referenced, "description": self.description,
            "questions": QUESTIONS, "as_is_basis": self.as_is_basis, "statistic": self.statistic, "columns": self.columns(),
            "fusion_weight": self.fusion_weight, "samples": self.samples, "taps": self.taps, "rows": self.rows,
            "weighted_kendall_tau": self.kendall_tau, "notes": self.notes, "seconds": round(self.seconds, 3),
        }

    def to_csv(self) -> str:
        keys = [c["key"] for c in self.columns()]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
        return buffer.getvalue()

    def table(self) -> str:
        return ranking_table(self.to_json())


def ranking_table(data: dict) -> str:
    """The ranking (as ``Ranking.to_json`` gives it) as a plain-text table: the as-is columns, then the
    transfer columns, each group headed by its question and the labels it used."""
    columns = {c["key"]: c for c in data["columns"]}
    short = {"uncertainty": data.get("statistic") or "score", "entropy": "H_k", "alpha": "alpha", "scribble_accuracy": "scr.acc",
             "scribble_dice": "scr.Dice", "true_dice": "Dice", "transfer_rank": "t.rank", "fused": "fused", "grtd": "GRTD",
             "lbtc": "LBTC", "logme": "LogME"}
    shown = [k for k in short if k in columns]
    width = max([5] + [len(row["model"]) for row in data["rows"]])
    names = [max(6, len(short[k])) for k in shown]

    def cell(row, key, size):
        value = row.get(key)
        if value is None:
            return "-".rjust(size)
        return str(value).rjust(size) if isinstance(value, int) else f"{value:{size}.3f}"

    as_is_labels = sorted({"none (label-free)" if c["labels"] == "none" else c["labels"]
                           for c in data["columns"] if c["question"] == AS_IS and c["better"]})
    basis = columns.get(data["as_is_basis"], {}).get("title", data["as_is_basis"])
    lines = [f"AS IS ({QUESTIONS[AS_IS]}): ranked by {basis}; labels used: {', '.join(as_is_labels)}",
             f"TRANSFER ({QUESTIONS[TRANSFER]}): ranked by fused; labels: {data['description']}"
             + (" (self-referenced: the merged prediction)" if data["self_referenced"] else ""),
             f"{'rank':>4}  {'model':<{width}} " + " ".join(short[k].rjust(n) for k, n in zip(shown, names))]
    for row in data["rows"]:
        lines.append(f"{row['rank']:>4}  {row['model']:<{width}} " + " ".join(cell(row, k, n) for k, n in zip(shown, names)))
    lower = [short[k] for k in shown if columns[k]["better"] == "lower"]
    if lower:
        lines.append(f"lower is better for {', '.join(lower)}; higher for the rest")
    taus = data.get("weighted_kendall_tau")
    if taus:
        for variant, values in taus.items():
            lines.append(f"weighted Kendall tau vs true Dice ({variant}): " + ", ".join(f"{short.get(k, k)} {v:+.3f}" for k, v in values.items()))
    lines += [f"note: {note}" for note in data.get("notes", [])]
    return "\n".join(lines)


def score_taus(rows: list[dict], truth: list[float] | None = None) -> dict[str, dict[str, float]]:
    """Both weighted Kendall tau variants (``weighted_taus``) of every score column the rows hold
    against ``truth`` (default: their ``true_dice``); lower-is-better columns are negated first."""
    dice = [row["true_dice"] for row in rows] if truth is None else truth
    better = {c.key: c.better for c in COLUMNS}
    result: dict[str, dict[str, float]] = {"additive": {}, "multiplicative": {}}
    for key in SCORE_KEYS:
        if any(row.get(key) is None for row in rows):
            continue
        values = [row[key] if better[key] == "higher" else -row[key] for row in rows]
        for variant, tau in weighted_taus(values, dice).items():
            result[variant][key] = round(tau, 4)
    return result


def labelled_agreement(probabilities: torch.Tensor, labels: np.ndarray) -> tuple[float, float | None]:
    """A model's accuracy and mean foreground Dice on the labelled voxels only (e.g. scribbles).

    ``probabilities`` (P, C, X, Y, Z), ``labels`` (P, X, Y, Z) with ``UNLABELLED`` elsewhere. Dice of
    class c counts the labelled voxels predicted c and those labelled c; ``None`` without a labelled
    foreground class."""
    predicted = predicted_labels(probabilities).numpy()
    known = labels != UNLABELLED
    guess, truth = predicted[known], labels[known]
    dices = [2.0 * float(((guess == c) & (truth == c)).sum()) / float((guess == c).sum() + (truth == c).sum())
             for c in np.unique(truth) if c > 0]
    return float((guess == truth).mean()), (float(np.mean(dices)) if dices else None)


def _as_is_order(scores: list[dict]) -> tuple[str, list[int]]:
    """The column the as-is ranking trusts most (true Dice, then scribbles, then the label-free
    statistic) and the model order it gives, best first."""
    for key, sign in (("true_dice", -1), ("scribble_dice", -1), ("scribble_accuracy", -1), ("uncertainty", 1), ("entropy", 1)):
        if all(s.get(key) is not None for s in scores):
            return key, sorted(range(len(scores)), key=lambda i: sign * scores[i][key])
    return "fused", sorted(range(len(scores)), key=lambda i: -scores[i]["fused"])


def _stage_score(function, stages: list[np.ndarray], weights: np.ndarray) -> tuple[float, list[float]]:
    values = [function(features) for features in stages]
    return float(np.dot(weights, values)), [round(v, 6) for v in values]


def rank_models(
    models: list[SiteModel],
    inputs: torch.Tensor | list[torch.Tensor],
    probe: Probe,
    source: LabelSource,
    device: torch.device,
    tapped: list[TappedOutputs] | None = None,
    uncertainty: list[float] | None = None,
    statistic: str | None = None,
    entropy: list[float] | None = None,
    alpha: list[float] | None = None,
    true_dice: list[float] | None = None,
    seed: int = 0,
) -> Ranking:
    """Score every model on the labelled voxels of the probe; ``tapped`` reuses passes already made.

    ``inputs`` is the model input (1, C_in, X, Y, Z) shared by all models, or one per model when
    their stable-feature specs differ (same model space, same probe locations). The label-free
    as-is columns come from the caller: ``uncertainty`` = each model's score under the run's merge
    ``statistic`` (lower = more trusted), ``entropy`` = plain mean entropy, ``alpha`` = its merge
    coefficient; ``true_dice`` = each model's Dice against a reference.
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
    decoder_weights, encoder_weights = decoder_stage_weights(len(taps.decoder)), encoder_stage_weights(len(taps.encoder))
    scores = []
    for index, model in enumerate(models):
        outputs = tapped[index] if tapped is not None and len(probe_for_labels.origins) == len(probe.origins) else None
        if outputs is None:
            patches = probe_for_labels.patches if per_model_inputs is None else crop_patches(
                per_model_inputs[index], probe_for_labels.origins, shape[1:])
            outputs = tapped_pass(model.network, patches, taps, device, batch)
        decoder = [features_at(f, positions, shape[1:]) for f in outputs.decoder_features]
        encoder = [(features_at(f, positions, shape[1:]), features_at(f, anchor_positions, shape[1:])) for f in outputs.encoder_features]
        grtd_score, grtd_stages = _stage_score(lambda f: grtd(f, sample.labels, np.random.default_rng(seed))[0], decoder, decoder_weights)
        lbtc_score, lbtc_stages = _stage_score(lambda f: lbtc(f[0], sample.labels, f[1], sample.anchor_labels), encoder, encoder_weights)
        score = {"model": model.name, "grtd": grtd_score, "lbtc": lbtc_score, "logme": logme(decoder[-1], sample.labels),
                 "grtd_stages": grtd_stages, "lbtc_stages": lbtc_stages}
        if source.kind == "scribbles":
            score["scribble_accuracy"], score["scribble_dice"] = labelled_agreement(outputs.probabilities, patch_labels)
        scores.append(score)
    fused = fuse([s["grtd"] for s in scores], [s["lbtc"] for s in scores], foreground)
    for k, s in enumerate(scores):
        s["fused"] = float(fused[k])
        for key, values in (("uncertainty", uncertainty), ("entropy", entropy), ("alpha", alpha), ("true_dice", true_dice)):
            s[key] = float(values[k]) if values is not None else None
    transfer_order = sorted(range(len(scores)), key=lambda i: -scores[i]["fused"])
    for position, i in enumerate(transfer_order, start=1):
        scores[i]["transfer_rank"] = position
    basis, order = _as_is_order(scores)
    rows = []
    for position, i in enumerate(order, start=1):
        row = {key: (round(v, 6) if isinstance(v, float) else v) for key, v in scores[i].items()}
        rows.append({"rank": position, **row})
    tau = score_taus(scores) if true_dice is not None else None
    if tau and tau["additive"].get("uncertainty", 0.0) < 0:
        notes.append(f"on this case the label-free as-is score ranks against the true Dice (weighted tau "
                     f"{tau['additive']['uncertainty']:+.2f}): without a reference, trust the scribbles' columns or check the segmentations")
    samples = {"voxels": int(len(sample.indices)), "anchors": int(len(sample.anchor_indices)),
               "per_class": {int(c): int((sample.labels == c).sum()) for c in np.unique(sample.labels)},
               "patches": len(probe_for_labels.origins)}
    return Ranking(rows, source.kind, source.self_referenced, source.description, fusion_weight(foreground), samples, basis,
                   statistic, tau, taps.describe(), notes, time.perf_counter() - start)
