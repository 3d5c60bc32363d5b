"""Merging site models' weights into one model.

A merge method is a function ``(models, probe) -> coefficients`` that returns one non-negative
weight per site model, summing to 1; ``merge_state_dicts`` then forms the weighted sum of the
models' parameters and ``merged_network`` builds the single network that runs on the volume.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .models import SiteModel


def merge_state_dicts(
    states: Sequence[Mapping[str, torch.Tensor]],
    coefficients: Sequence[float],
    head_keys: frozenset[str] = frozenset(),
    head_coefficients: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """theta = sum_k c_k theta_k for every floating tensor; integer buffers come from the first state.

    Keys in ``head_keys`` are merged with ``head_coefficients`` instead (the decoupled head).
    """
    coefficients = check_coefficients(coefficients, len(states))
    head = check_coefficients(head_coefficients, len(states)) if head_coefficients is not None else coefficients
    merged = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            merged[key] = first.clone()
            continue
        weights = head if key in head_keys else coefficients
        total = torch.zeros_like(first, dtype=torch.float32)
        for weight, state in zip(weights, states):
            if weight != 0.0:
                total.add_(state[key].float(), alpha=float(weight))
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


def mean_coefficients(models: Sequence[SiteModel], probe=None) -> np.ndarray:
    """The naive mean merge (model soup): every site model weighs 1/K."""
    return np.full(len(models), 1.0 / len(models))


def one_hot(index: int, count: int) -> np.ndarray:
    values = np.zeros(count)
    values[index] = 1.0
    return values
