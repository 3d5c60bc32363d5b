"""Intensity fingerprint of a site's training data, and how far a target lies from it.

A site model's card may carry, in ``training["intensity_fingerprint"]``, the quantiles of its
normalised input intensities inside the body, averaged over its training cases (written at training
time). The same quantiles of the target's probe give a domain distance that ignores the model's
head, so a confident head cannot fool it (a cheap cousin of BNE's feature-statistics distance,
METHODS.md section 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

QUANTILES = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 5 %, 10 %, ..., 95 %
FINGERPRINT_KEY = "intensity_fingerprint"


def intensity_fingerprint(image: torch.Tensor) -> list[float]:
    """Quantiles ``QUANTILES`` of the voxels inside the body of one normalised image channel.

    ``image``: (X, Y, Z) or (P, X, Y, Z) model-space intensities (the first input channel); the body
    is found per volume or patch with ``probe.body_mask``. Returns len(QUANTILES) floats.
    """
    from .probe import body_mask

    volumes = image.float() if image.ndim == 4 else image.float()[None]
    inside = torch.cat([volume[body_mask(volume)] for volume in volumes])
    if inside.numel() == 0:
        inside = volumes.flatten()
    sample = inside[:: max(1, inside.numel() // 500_000)].numpy()  # quantiles from a sample
    return [round(float(q), 5) for q in np.quantile(sample, QUANTILES)]


def mean_fingerprint(fingerprints: Sequence[Sequence[float]]) -> list[float]:
    """The site's fingerprint: the mean over its training cases, per quantile."""
    return [round(float(v), 5) for v in np.mean(np.asarray(fingerprints, dtype=np.float64), axis=0)]


def fingerprint_distances(training: Sequence[dict], target: Sequence[float]) -> list[float] | None:
    """Per model, the mean absolute difference between its training fingerprint and the target's
    (normalised intensity units); None when a model's card has no fingerprint."""
    stored = [entry.get(FINGERPRINT_KEY) for entry in training]
    if any(s is None or len(s) != len(target) for s in stored):
        return None
    return [float(np.mean(np.abs(np.asarray(s) - np.asarray(target)))) for s in stored]
