"""Segmentation quality against a reference: Dice per class and HD95 in millimetres (MONAI)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from .modelcard import Label


def dice(prediction: np.ndarray, reference: np.ndarray, value: int) -> float | None:
    """Dice overlap of one label between two label maps.

    Args:
        prediction: integer label map, any shape (e.g. (I, J, K)).
        reference: integer label map of the same shape.
        value: the label value to compare.

    Returns:
        2 |P & R| / (|P| + |R|) in [0, 1]; None when the label is in neither map.
    """
    predicted, truth = prediction == value, reference == value
    total = int(predicted.sum()) + int(truth.sum())
    return None if total == 0 else 2.0 * int((predicted & truth).sum()) / total


def hd95_mm(prediction: np.ndarray, reference: np.ndarray, value: int, spacing: Sequence[float]) -> float | None:
    """95th-percentile symmetric Hausdorff distance of one label (MONAI's ``compute_hausdorff_distance``).

    Args:
        prediction: (I, J, K) integer label map.
        reference: (I, J, K) integer label map on the same grid.
        value: the label value to compare.
        spacing: voxel spacing in mm along i, j, k.

    Returns:
        The distance in mm; None when either map lacks the label or the distance is not finite.
    """
    predicted, truth = prediction == value, reference == value
    if not predicted.any() or not truth.any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distance = compute_hausdorff_distance(
            torch.from_numpy(predicted)[None, None], torch.from_numpy(truth)[None, None],
            include_background=True, percentile=95, spacing=[float(s) for s in spacing],
        )
    value = float(distance.flatten()[0])
    return None if math.isnan(value) or math.isinf(value) else value


def evaluate(prediction: np.ndarray, reference: np.ndarray, labels: Sequence[Label], spacing: Sequence[float]) -> dict:
    """Dice and HD95 per foreground label, and their means over the labels present in the reference.

    Args:
        prediction: (I, J, K) integer label map.
        reference: (I, J, K) integer label map on the same grid.
        labels: the model's labels, background first (``labels[0]`` is not scored).
        spacing: voxel spacing in mm along i, j, k.

    Returns:
        ``{"per_class": {name: {"dice", "hd95_mm", "in_reference"}}, "mean_dice", "mean_hd95_mm",
        "classes_in_reference"}``. ``mean_dice`` averages over the labels present in the reference
        (a label the prediction misses counts 0); ``mean_hd95_mm`` over those with a finite
        distance; both are None when no label is present.
    """
    present = [label for label in labels[1:] if (reference == label.value).any()]
    per_class = {}
    for label in labels[1:]:
        per_class[label.name] = {
            "dice": dice(prediction, reference, label.value),
            "hd95_mm": hd95_mm(prediction, reference, label.value, spacing),
            "in_reference": label in present,
        }
    dices = [per_class[l.name]["dice"] or 0.0 for l in present]
    distances = [per_class[l.name]["hd95_mm"] for l in present if per_class[l.name]["hd95_mm"] is not None]
    return {
        "per_class": per_class,
        "mean_dice": float(np.mean(dices)) if dices else None,
        "mean_hd95_mm": float(np.mean(distances)) if distances else None,
        "classes_in_reference": [l.name for l in present],
    }
