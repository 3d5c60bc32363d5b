"""Prediction entropy: voxel-wise maps and per-model probe statistics."""

from __future__ import annotations

import math

import torch


def normalized_entropy(probabilities: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Voxel-wise entropy of class probabilities divided by log(C), in [0, 1].

    ``probabilities`` holds C >= 2 classes along ``dim`` (e.g. shape (N, C, X, Y, Z)); the result
    drops that dimension. A one-hot voxel gives 0, a uniform one gives 1.
    """
    num_classes = probabilities.shape[dim]
    if num_classes < 2:
        raise ValueError(f"entropy needs at least 2 classes along dim {dim}, got {num_classes}")
    p = probabilities.float().clamp_min(eps)
    entropy = -(p * p.log()).sum(dim=dim) / math.log(num_classes)
    return entropy.clamp_(0.0, 1.0)
