"""Ranking the site models for one target, for two questions, from forward passes only.

"Which model can I trust on this case as it is?" (as-is columns, which order the rows): the
merge's own label-free per-model score and plain entropy, accuracy and Dice on scribbles, or the
true Dice against a reference. "Which model would do best after fine-tuning on a few labels of
this site?" (transfer columns): GRTD, LBTC, their fusion and LogME on features hooked inside each
model (``taps``), as TopoTE computes them: GRTD over the decoder stages, LBTC over the encoder
stages, each stage weighted by a Gaussian. Labels come, in order of trust, from a reference
segmentation, from scribbles (a sparse label map: painted voxels count, ``unlabelled_value`` voxels
do not), or from the merged model's own prediction (a pseudo-label: the ranking is then
self-referenced). The columns and the plain-text table are in ``rankingtable``.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .entropy import predicted_labels
from .errors import UserInputError
from .models import SiteModel
from .probe import Probe, crop_patches, probe_batch_size
from .rankingtable import COLUMNS, QUESTIONS, SCORE_KEYS, ranking_table
from .taps import TappedOutputs, features_at, find_taps, tapped_pass
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

# ---------------------------------------------------------------------------------------------
# Label sources


@dataclass
class LabelSource:
    """The labels a ranking scores against: "reference", "scribbles" or "pseudo-label" (the merged prediction)."""

    kind: str
    labels: np.ndarray  # model-space label map (X, Y, Z); UNLABELLED where nothing is known
    description: str

    @property
    def self_referenced(self) -> bool:
        """Whether the labels are the merged model's own prediction."""
        return self.kind == "pseudo-label"


def scribble_labels(scribbles: Volume, num_classes: int, unlabelled_value: int, path) -> np.ndarray:
    """Scribble map values: ``unlabelled_value`` = not painted; 0 .. C-1 = a painted class.

    Args:
        scribbles: the scribble map on the model-space grid.
        num_classes: C.
        unlabelled_value: the value of unpainted voxels (``settings.RankingSettings.unlabelled_value`` by default).
        path: the scribble file, for messages.

    Returns:
        (X, Y, Z) int64 labels, ``UNLABELLED`` where nothing is painted. Raises ``UserInputError`` for
        an empty map, values that are no class, or fewer than two painted classes.
    """
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
    """The label map cut into the probe's patches.

    Args:
        labels: (X, Y, Z) model-space labels.
        probe: the probe (its origins and patch size).

    Returns:
        (P, x, y, z) labels, ``UNLABELLED`` beyond the volume.
    """
    size = probe.patches.shape[2:]
    padded = np.pad(labels, [(0, max(0, s - n)) for s, n in zip(size, labels.shape)], constant_values=UNLABELLED)
    return np.stack([padded[x : x + size[0], y : y + size[1], z : z + size[2]] for x, y, z in probe.origins])


def label_probe(inputs: torch.Tensor, labels: np.ndarray, probe: Probe) -> Probe:
    """The probe plus a patch around each labelled class it misses (scribbles are often outside it).

    Args:
        inputs: (1, C_in, X, Y, Z) model input the extra patches are cut from.
        labels: (X, Y, Z) model-space labels, ``UNLABELLED`` where unknown.
        probe: the probe.

    Returns:
        ``probe`` itself when it samples every labelled class, else a new probe with the extra patches
        appended (and a note).
    """
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
        """The ranking as summary.json and ranking.json hold it."""
        return {
            "label_source": self.label_source, "self_referenced": self.self_referenced, "description": self.description,
            "questions": QUESTIONS, "as_is_basis": self.as_is_basis, "statistic": self.statistic, "columns": self.columns(),
            "fusion_weight": self.fusion_weight, "samples": self.samples, "taps": self.taps, "rows": self.rows,
            "weighted_kendall_tau": self.kendall_tau, "notes": self.notes, "seconds": round(self.seconds, 3),
        }

    def to_csv(self) -> str:
        """The rows as CSV text (ranking.csv): one column per present column key, empty for a missing value."""
        keys = [c["key"] for c in self.columns()]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
        return buffer.getvalue()

    def table(self) -> str:
        """The ranking as a plain-text table (``rankingtable.ranking_table``)."""
        return ranking_table(self.to_json())

def score_taus(rows: list[dict], truth: list[float] | None = None) -> dict[str, dict[str, float]]:
    """Both weighted Kendall tau variants (``weighted_taus``) of every score column the rows hold
    against ``truth`` (default: their ``true_dice``); lower-is-better columns are negated first.

    Args:
        rows: one dict per model with the score columns (``rankingtable.SCORE_KEYS``).
        truth: one true score per row; None: the rows' ``true_dice``.

    Returns:
        {"additive": {column: tau}, "multiplicative": {column: tau}}, tau rounded to 4 decimals, for
        every column that every row holds.
    """
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

    Dice of class c counts the labelled voxels predicted c and those labelled c.

    Args:
        probabilities: (P, C, X, Y, Z) the model's probabilities on the probe.
        labels: (P, X, Y, Z) labels, ``UNLABELLED`` where unknown.

    Returns:
        (accuracy, mean foreground Dice), the Dice None without a labelled foreground class.
    """
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

    Args:
        models: the K >= 2 site models (one architecture).
        inputs: (1, C_in, X, Y, Z) model input, or K of them.
        probe: the probe (patches are added around labelled classes it misses).
        source: the labels to score against.
        device: where the models run.
        tapped: K ``TappedOutputs`` on ``probe`` already made (reused when no patch was added).
        uncertainty, entropy, alpha, true_dice: K values each for the as-is columns, or None.
        statistic: the merge statistic behind ``uncertainty``.
        seed: seed of the voxel sampling.

    Returns:
        The ranking: rows in as-is order with both ranks, the columns, the samples and notes.
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
