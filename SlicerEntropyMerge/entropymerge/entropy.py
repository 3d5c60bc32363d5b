"""Prediction entropy: voxel-wise maps and per-model probe statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def normalized_entropy(probabilities: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Voxel-wise entropy of class probabilities divided by log(C), in [0, 1].

    A one-hot voxel gives 0, a uniform one gives 1.

    Args:
        probabilities: softmax outputs with C >= 2 classes along ``dim``, e.g. (N, C, X, Y, Z) or (C, I, J, K).
        dim: the class dimension.
        eps: probabilities are clamped to at least ``eps`` before the logarithm.

    Returns:
        float32 entropy with ``dim`` dropped, e.g. (N, X, Y, Z).

    Raises:
        ValueError: fewer than 2 classes along ``dim``.
    """
    num_classes = probabilities.shape[dim]
    if num_classes < 2:
        raise ValueError(f"entropy needs at least 2 classes along dim {dim}, got {num_classes}")
    p = probabilities.float().clamp_min(eps)
    entropy = -(p * p.log()).sum(dim=dim) / math.log(num_classes)
    return entropy.clamp_(0.0, 1.0)


def foreground_weights(probabilities: Sequence[torch.Tensor], background: int = 0) -> torch.Tensor:
    """w(v) = 1 - mean_k p_k,bg(v): how much the models together believe voxel v is not background.

    Args:
        probabilities: K softmax outputs, each (P, C, X, Y, Z).
        background: the channel of the background class.

    Returns:
        (P, X, Y, Z) float32 weights in [0, 1].
    """
    mean_background = torch.stack([p[:, background] for p in probabilities]).float().mean(dim=0)
    return 1.0 - mean_background


def predicted_labels(probabilities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """argmax over the class dimension (``max().indices``: several times faster than ``argmax`` on CPU).

    Args:
        probabilities: class scores with C classes along ``dim``, e.g. (N, C, X, Y, Z).
        dim: the class dimension.

    Returns:
        int64 class indices with ``dim`` dropped.
    """
    return probabilities.max(dim=dim).indices


def class_balanced_entropy(probabilities: torch.Tensor, entropy: torch.Tensor | None = None, predicted: torch.Tensor | None = None) -> float:
    """Mean over predicted classes of the mean entropy of the voxels predicted as that class.

    Every predicted class counts equally, so a model cannot look confident by predicting mostly
    easy background (the weighting of the DSBR loss, METHODS.md section 3).

    Args:
        probabilities: (P, C, X, Y, Z) softmax outputs of one model.
        entropy: its (P, X, Y, Z) ``normalized_entropy``, when already computed.
        predicted: its (P, X, Y, Z) ``predicted_labels``, when already computed.

    Returns:
        The class-balanced mean normalised entropy, in [0, 1].
    """
    entropy = normalized_entropy(probabilities, dim=1) if entropy is None else entropy
    predicted = predicted_labels(probabilities) if predicted is None else predicted
    counts = torch.bincount(predicted.flatten(), minlength=probabilities.shape[1]).double()
    sums = torch.bincount(predicted.flatten(), weights=entropy.flatten().double(), minlength=probabilities.shape[1])
    return float((sums * class_balanced_weights(counts)).sum())


def class_balanced_weights(counts: torch.Tensor) -> torch.Tensor:
    """Per class, the weight 1 / (|C_hat| n_c) of each voxel predicted as class c.

    C_hat is the set of predicted classes (n_c > 0); absent classes get 0. Summing weight x entropy
    over the voxels gives the class-balanced entropy.

    Args:
        counts: (C,) number of voxels predicted as each class.

    Returns:
        (C,) weights, of the dtype of ``counts``.
    """
    present = counts > 0
    return torch.where(present, 1.0 / (counts.clamp_min(1) * present.sum()), torch.zeros_like(counts))


def js_divergence_to_mean(probabilities: Sequence[torch.Tensor], weights: torch.Tensor | None = None) -> list[float]:
    """Per model, the (weighted) mean Jensen-Shannon divergence of its output to the models' mean.

    Args:
        probabilities: K softmax outputs, each (P, C, X, Y, Z).
        weights: (P, X, Y, Z) voxel weights (e.g. ``foreground_weights``); None for a plain mean.

    Returns:
        K divergences in bits, in [0, 1].
    """
    outputs = [p.float() for p in probabilities]
    mean = torch.stack(outputs).mean(dim=0)
    divergences = []
    for p in outputs:
        middle = 0.5 * (p + mean)
        js = (0.5 * _kl_divergence(p, middle) + 0.5 * _kl_divergence(mean, middle)) / math.log(2.0)
        divergences.append(float(_weighted_mean(js, weights)))
    return divergences


def leave_one_out_consensus(probabilities: Sequence[torch.Tensor], weights: torch.Tensor | None = None,
                            eps: float = 1e-8) -> tuple[list[float], list[float]]:
    """Per model k, the leave-one-out consensus cross-entropy and its KL part, both divided by log(C).

    CE_k = sum_v w_v [-sum_c pbar^(-k)_c(v) log p_k,c(v)] / sum_v w_v, where pbar^(-k) is the mean
    output of the OTHER models (DaWin, ICLR 2025); CE_k = H(pbar^(-k)) + KL(pbar^(-k) || p_k), and the
    KL part is unbounded: a model that is confident where the others disagree with it (one that
    finds nothing where the others see an organ) scores high.

    Args:
        probabilities: K softmax outputs, each (P, C, X, Y, Z).
        weights: (P, X, Y, Z) voxel weights w_v; None for a plain mean.
        eps: probabilities are clamped to at least ``eps`` before the logarithm.

    Returns:
        (cross-entropies, KL divergences): K floats each, normalised by log(C); all 0 with one model.
    """
    outputs = torch.stack([p.float() for p in probabilities])
    count = outputs.shape[0]
    if count < 2:
        return [0.0] * count, [0.0] * count
    total = outputs.sum(dim=0)
    log_c = math.log(outputs.shape[2])
    cross_entropies, divergences = [], []
    for k in range(count):
        others = (total - outputs[k]) / (count - 1)
        cross = -(others * outputs[k].clamp_min(eps).log()).sum(dim=1) / log_c
        own = -(others * others.clamp_min(eps).log()).sum(dim=1) / log_c
        cross_entropies.append(float(_weighted_mean(cross, weights)))
        divergences.append(float(_weighted_mean(cross - own, weights)))
    return cross_entropies, divergences


def prediction_bias(probabilities: Sequence[torch.Tensor], eps: float = 1e-3) -> list[float]:
    """Per model k, how far its predicted class proportions stray from the other models' (DSBR's mechanism).

    bias_k = mean over foreground classes c of |log((q_k,c + eps) / (qbar^(-k)_c + eps))|, with
    q_k,c the mean probability of class c over the probe and qbar^(-k) the mean of the other models'.
    A model that predicts no foreground where the others do, or floods the probe with one class,
    scores high; identical models score 0.

    Args:
        probabilities: K softmax outputs, each (P, C, X, Y, Z).
        eps: added to every proportion before the ratio.

    Returns:
        K biases (natural-log units, >= 0); all 0 with one model.
    """
    proportions = torch.stack([p.float().mean(dim=(0, *range(2, p.ndim))) for p in probabilities]).double()
    count = proportions.shape[0]
    if count < 2:
        return [0.0] * count
    total = proportions.sum(dim=0)
    biases = []
    for k in range(count):
        others = (total - proportions[k]) / (count - 1)
        biases.append(float(((proportions[k, 1:] + eps) / (others[1:] + eps)).log().abs().mean()))
    return biases


def _kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return (p * (p.clamp_min(eps).log() - q.clamp_min(eps).log())).sum(dim=1)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1e-8)


def probe_statistics(probabilities: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """Label-free statistics of K models on the same probe.

    Args:
        probabilities: K softmax outputs on the same probe patches, each (P, C, X, Y, Z).

    Returns:
        statistic name -> K floats, one per model, in input order:
    ``entropy``: mean normalised entropy H_k; ``foreground_entropy``: the same weighted by
    w = 1 - mean_k p_k,bg; ``balanced_entropy``: class-balanced entropy; ``disagreement``:
    foreground-weighted Jensen-Shannon divergence to the models' mean output;
    ``foreground_fraction``: fraction of probe voxels each model calls foreground;
    ``cross_entropy``, ``consensus_kl``: foreground-weighted leave-one-out consensus cross-entropy
    and its KL part;
    ``prediction_bias``: distance of each model's class proportions from the others'.
    """
    weights = foreground_weights(probabilities)
    stats: dict[str, list[float]] = {key: [] for key in ("entropy", "foreground_entropy", "balanced_entropy", "foreground_fraction")}
    for p in probabilities:
        entropy = normalized_entropy(p, dim=1)
        predicted = predicted_labels(p)
        stats["entropy"].append(float(entropy.mean()))
        stats["foreground_entropy"].append(float(_weighted_mean(entropy, weights)))
        stats["balanced_entropy"].append(class_balanced_entropy(p, entropy, predicted))
        stats["foreground_fraction"].append(float((predicted != 0).float().mean()))
    stats["disagreement"] = js_divergence_to_mean(probabilities, weights)
    stats["cross_entropy"], stats["consensus_kl"] = leave_one_out_consensus(probabilities, weights)
    stats["prediction_bias"] = prediction_bias(probabilities)
    return stats
