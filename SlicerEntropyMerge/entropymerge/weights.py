"""Weight averaging: the one place where site models' parameters are combined.

``merge_state_dicts`` forms the weighted sum theta = sum_k c_k theta_k of the models' parameters
(optionally with other coefficients for the head), ``merged_network`` builds the single network
that carries it, and ``interpolate`` is the two-model special case on the straight path.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .errors import UserInputError
from .models import SiteModel


def merge_state_dicts(
    states: Sequence[Mapping[str, torch.Tensor]],
    coefficients: Sequence[float],
    head_keys: frozenset[str] = frozenset(),
    head_coefficients: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """theta = sum_k c_k theta_k for every floating tensor; integer buffers come from the first state.

    Terms with weight 0 are skipped and the sum starts from the first term (not from zeros, which
    would turn -0.0 into +0.0), in at least float32: a one-hot merge returns a model bit for bit.

    Args:
        states: K state dicts with the same keys and shapes.
        coefficients: K non-negative weights summing to 1 (alpha, the body's).
        head_keys: keys merged with ``head_coefficients`` instead (the decoupled head).
        head_coefficients: K weights for ``head_keys`` (beta); None: ``coefficients``.

    Returns:
        The merged state dict: each tensor in the dtype of the first state's.
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
    """Merge coefficients as a float64 array, checked.

    Args:
        coefficients: one weight per model.
        count: the number of models K.

    Returns:
        (K,) float64 array. Raises ``ValueError`` unless it has K entries, none negative, summing to 1.
    """
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
    """A new network (a copy of the first model's) carrying the merged weights; site models are untouched.

    Args:
        models: K site models of one architecture.
        coefficients, head_keys, head_coefficients: as for ``merge_state_dicts``.

    Returns:
        The merged network, in eval mode, on the first model's device.
    """
    states = [model.state_dict() for model in models]
    network = copy.deepcopy(models[0].network)
    network.load_state_dict(merge_state_dicts(states, coefficients, head_keys, head_coefficients))
    return network.eval()


def interpolate(model_a: SiteModel, model_b: SiteModel, lam: float) -> torch.nn.Module:
    """theta(lam) = (1 - lam) theta_A + lam theta_B as a new network (a copy of A's).

    The point at ``lam`` on the straight path between two site models (ModelMix, METHODS.md
    section 5); exactly model A at 0 and exactly model B at 1.

    Args:
        model_a, model_b: two site models of one architecture.
        lam: the position on the path, in [0, 1].

    Returns:
        The interpolated network, in eval mode.
    """
    if not 0.0 <= lam <= 1.0:
        raise UserInputError(f"the interpolation weight must lie in [0, 1], got {lam}")
    return merged_network([model_a, model_b], [1.0 - lam, lam])
