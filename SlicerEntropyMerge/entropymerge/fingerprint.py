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

    Args:
        image: (X, Y, Z) or (P, X, Y, Z) model-space intensities (the first input channel, after the
            card's intensity normalisation); the body is found per volume or patch with
            ``probe.body_mask``, and all voxels count when no body is found.

    Returns:
        ``len(QUANTILES)`` floats (normalised intensity units), rounded to 5 decimals; at most about
        500 000 evenly strided voxels are used.
    """
    from .probe import body_mask

    volumes = image.float() if image.ndim == 4 else image.float()[None]
    inside = torch.cat([volume[body_mask(volume)] for volume in volumes])
    if inside.numel() == 0:
        inside = volumes.flatten()
    sample = inside[:: max(1, inside.numel() // 500_000)].numpy()  # quantiles from a sample
    return [round(float(q), 5) for q in np.quantile(sample, QUANTILES)]


def mean_fingerprint(fingerprints: Sequence[Sequence[float]]) -> list[float]:
    """The site's fingerprint: the mean over its training cases, per quantile.

    Args:
        fingerprints: one ``intensity_fingerprint`` per training case, all of the same length Q.

    Returns:
        Q floats, rounded to 5 decimals.
    """
    return [round(float(v), 5) for v in np.mean(np.asarray(fingerprints, dtype=np.float64), axis=0)]


def fingerprint_distances(training: Sequence[dict], target: Sequence[float]) -> list[float] | None:
    """Per model, the mean absolute difference between its training fingerprint and the target's.

    Args:
        training: the ``training`` record of each model's card (K dicts).
        target: the target probe's ``intensity_fingerprint`` (Q floats).

    Returns:
        K distances in normalised intensity units; None when any card has no fingerprint, or one of
        another length.
    """
    stored = [entry.get(FINGERPRINT_KEY) for entry in training]
    if any(s is None or len(s) != len(target) for s in stored):
        return None
    return [float(np.mean(np.abs(np.asarray(s) - np.asarray(target)))) for s in stored]
