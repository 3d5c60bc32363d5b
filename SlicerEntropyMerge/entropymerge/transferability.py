"""Training-free transferability: which site model's features fit this target's labels.

Scores (METHODS.md section 4), computed from features hooked inside each model at sampled voxels:

- GRTD (global representation topology divergence): on the minimum spanning tree of the sampled
  voxels' feature distances, for each class c the share of the MST weight around c that is not
  explained by label changes, delta_c = (sum w_f - sum w_sem) / sum w_f, with w_sem = 0 within a
  label and min(w_f, lambda) across labels (lambda = median distance). delta_c approaches 1 when
  the classes form separate clusters (few, long bridges between them) and drops as they mix, so
  GRTD = mean_c delta_c, higher is better. (METHODS.md writes the score as -mean delta; with the
  definitions above that would rank perfectly separating features last, so the sign is flipped.)
- LBTC (local boundary-aware topological consistency): around boundary voxels of each class, the
  fraction rho of local-MST edges (anchor + k nearest feature neighbours) joining different labels;
  LBTC = clip(1 - mean rho, 0, 1).
- Fusion: a = tanh(log|C_fg| / 2); S = a * GRTD_n + (1 - a) * LBTC_n after min-max normalisation
  across the candidate models. GRTD and LBTC are each a weighted mean over network stages
  (``decoder_stage_weights``, ``encoder_stage_weights``: TopoTE's Gaussian "paper" profile).
- Rankings are compared with the truth by two weighted Kendall tau variants (``weighted_taus``).
- LogME (You et al., ICML 2021) as a baseline: the log marginal evidence of a Bayesian linear model
  from features to one-hot labels, per voxel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist
from scipy.stats import weightedtau

FOREGROUND_BUDGET = 256
BACKGROUND_BUDGET = 2560
MST_CAP = 800
ANCHORS = 50
NEIGHBOURS = 16
UNLABELLED = -1


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass
class VoxelSample:
    """Sampled voxels of a label array.

    Attributes:
        indices: (N,) flat (C-order) indices of the sampled voxels.
        labels: (N,) their labels.
        anchor_indices: (A,) flat indices of boundary voxels (drawn independently of ``indices``).
        anchor_labels: (A,) their labels.
    """

    indices: np.ndarray
    labels: np.ndarray
    anchor_indices: np.ndarray
    anchor_labels: np.ndarray


def sample_voxels(
    labels: np.ndarray,
    rng: np.random.Generator,
    foreground_budget: int = FOREGROUND_BUDGET,
    background_budget: int = BACKGROUND_BUDGET,
    anchors: int = ANCHORS,
    minimum_per_class: int = 16,
) -> VoxelSample:
    """Sample labelled voxels of an integer label array (any shape; ``UNLABELLED`` voxels are never drawn).

    The foreground budget is split over the classes by voxel count, with at least
    ``minimum_per_class`` (or all) voxels of each so small structures keep a voice; background
    (label 0) gets its own budget. Anchors: voxels on the boundary of each foreground class (the
    mask minus its 6-connected erosion), drawn across classes.

    Args:
        labels: integer labels of any shape (e.g. (X, Y, Z)); ``UNLABELLED`` (-1) is never drawn.
        rng: the random generator.
        foreground_budget: voxels drawn over all foreground classes together.
        background_budget: voxels drawn from the background.
        anchors: boundary voxels drawn.
        minimum_per_class: the least drawn from each foreground class (all of it when smaller).

    Returns:
        The ``VoxelSample``.
    """
    flat = labels.reshape(-1)
    classes = [c for c in np.unique(flat) if c > 0]
    counts = {c: int((flat == c).sum()) for c in classes}
    total = sum(counts.values())
    chosen_indices, chosen_labels = [], []
    for c in classes:
        where = np.flatnonzero(flat == c)
        wanted = max(min(minimum_per_class, len(where)), int(round(foreground_budget * counts[c] / total)))
        picked = rng.choice(where, size=min(wanted, len(where)), replace=False)
        chosen_indices.append(picked)
        chosen_labels.append(np.full(len(picked), c))
    background = np.flatnonzero(flat == 0)
    if len(background):
        picked = rng.choice(background, size=min(background_budget, len(background)), replace=False)
        chosen_indices.append(picked)
        chosen_labels.append(np.zeros(len(picked), dtype=int))
    indices = np.concatenate(chosen_indices) if chosen_indices else np.zeros(0, dtype=int)
    sampled_labels = np.concatenate(chosen_labels) if chosen_labels else np.zeros(0, dtype=int)

    boundary = np.zeros(labels.shape, dtype=bool)
    structure = ndimage.generate_binary_structure(labels.ndim, 1)
    for c in classes:
        mask = labels == c
        boundary |= mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=1)
    candidates = np.flatnonzero(boundary.reshape(-1))
    anchor_indices = rng.choice(candidates, size=min(anchors, len(candidates)), replace=False) if len(candidates) else candidates
    return VoxelSample(indices, sampled_labels.astype(int), anchor_indices, flat[anchor_indices].astype(int))


def cap_per_class(labels: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Positions into ``labels`` (N,) keeping at most ``cap`` randomly chosen points of each class, sorted."""
    keep = []
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        keep.append(rng.choice(where, size=min(cap, len(where)), replace=False) if len(where) > cap else where)
    return np.sort(np.concatenate(keep))


# ---------------------------------------------------------------------------------------------
# Scores


def minimum_spanning_tree_edges(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The N - 1 edges (rows, cols) of a minimum spanning tree of a dense symmetric (N, N) distance
    matrix, by Prim's algorithm: O(N^2) with vector steps, much faster than sorting all N^2 edges,
    and zero distances stay edges (duplicate points are joined at zero cost)."""
    count = len(distances)
    in_tree = np.zeros(count, dtype=bool)
    in_tree[0] = True
    best = distances[0].astype(np.float64, copy=True)
    parent = np.zeros(count, dtype=np.int64)
    best[0] = np.inf
    rows, cols = np.zeros(count - 1, dtype=np.int64), np.zeros(count - 1, dtype=np.int64)
    for edge in range(count - 1):
        nearest = int(np.argmin(best))
        rows[edge], cols[edge] = parent[nearest], nearest
        in_tree[nearest] = True
        best[nearest] = np.inf
        closer = ~in_tree & (distances[nearest] < best)
        best[closer] = distances[nearest][closer]
        parent[closer] = nearest
    return rows, cols


def grtd(features: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cap: int = MST_CAP) -> tuple[float, dict]:
    """GRTD of sampled features against their labels (see the module docstring).

    Args:
        features: (N, F) feature vectors.
        labels: (N,) integer labels.
        rng: draws the at most ``cap`` points per class that enter the spanning tree.
        cap: points kept per class (the tree costs O(N^2)).

    Returns:
        (score, deltas): the mean of delta_c in [0, 1] (higher: classes better separated), and
        class -> delta_c.

    Raises:
        ValueError: fewer than two classes among the kept points.
    """
    keep = cap_per_class(labels, cap, rng)
    x, y = features[keep].astype(np.float64), labels[keep]
    if len(np.unique(y)) < 2:
        raise ValueError("GRTD needs at least two classes among the sampled voxels")
    distances = cdist(x, x)
    off_diagonal = distances[~np.eye(len(x), dtype=bool)]
    scale = float(np.median(off_diagonal))
    rows, cols = minimum_spanning_tree_edges(distances)
    weight = distances[rows, cols]
    cross = y[rows] != y[cols]
    semantic = np.where(cross, np.minimum(weight, scale), 0.0)
    deltas = {}
    for c in np.unique(y):
        touching = (y[rows] == c) | (y[cols] == c)
        total = weight[touching].sum()
        if total > 0:
            deltas[int(c)] = float((total - semantic[touching].sum()) / total)
    return float(np.mean(list(deltas.values()))), deltas


def lbtc(features: np.ndarray, labels: np.ndarray, anchor_features: np.ndarray, anchor_labels: np.ndarray,
         neighbours: int = NEIGHBOURS) -> float:
    """LBTC: for each boundary anchor, its k nearest sampled points in feature space form a local
    neighbourhood; neighbourhoods with one label are skipped; rho = share of local-MST edges that
    join different labels.

    Args:
        features: (N, F) sampled feature vectors.
        labels: (N,) their labels.
        anchor_features: (A, F) features of the boundary anchors.
        anchor_labels: (A,) their labels.
        neighbours: k, the neighbours per anchor.

    Returns:
        clip(1 - mean rho, 0, 1); 1 when every neighbourhood is pure (no label confusion anywhere
        along the boundaries).
    """
    tree = cKDTree(features)
    k = min(neighbours, len(features))
    _, nearest = tree.query(anchor_features, k=k)
    nearest = np.atleast_2d(nearest)
    fractions = []
    for anchor, anchor_label, neighbourhood in zip(anchor_features, anchor_labels, nearest):
        points = np.vstack([anchor[None], features[neighbourhood]])
        point_labels = np.concatenate([[anchor_label], labels[neighbourhood]])
        if len(np.unique(point_labels)) < 2:
            continue
        rows, cols = minimum_spanning_tree_edges(cdist(points, points))
        fractions.append(float(np.mean(point_labels[rows] != point_labels[cols])))
    if not fractions:
        return 1.0
    return float(np.clip(1.0 - np.mean(fractions), 0.0, 1.0))


def fusion_weight(foreground_classes: int) -> float:
    """a = tanh(log|C_fg| / 2): more classes, more weight on the global score."""
    return float(math.tanh(math.log(max(foreground_classes, 1)) / 2.0))


def min_max(values) -> np.ndarray:
    """``values`` scaled to [0, 1] across the candidates; all 0 when they are equal."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    return np.zeros_like(values) if not span > 0 else (values - values.min()) / span


def fuse(grtd_scores, lbtc_scores, foreground_classes: int) -> np.ndarray:
    """S = a * GRTD_n + (1 - a) * LBTC_n, normalised across the candidate models.

    Args:
        grtd_scores, lbtc_scores: one score per candidate model (K each).
        foreground_classes: |C_fg|, which sets a (``fusion_weight``).

    Returns:
        (K,) fused scores in [0, 1].
    """
    a = fusion_weight(foreground_classes)
    return a * min_max(grtd_scores) + (1 - a) * min_max(lbtc_scores)


def logme(features: np.ndarray, labels: np.ndarray, iterations: int = 100, tolerance: float = 1e-3) -> float:
    """LogME: mean over classes of the per-sample log evidence of y_c ~ F w + noise, w ~ N(0, 1/alpha),
    noise ~ N(0, 1/beta), with alpha and beta at their evidence maximum (MacKay's fixed point).

    Args:
        features: (N, D) feature vectors.
        labels: (N,) integer labels; each class present is one target y_c.
        iterations, tolerance: the fixed-point iteration's limit and relative stopping tolerance.

    Returns:
        The mean over classes of log evidence / N (higher: features explain the labels better).
    """
    f = features.astype(np.float64)
    n, d = f.shape
    # The SVD of the (n, d) features through the small (d, d) Gram matrix: sigma = s^2, u = f v / s.
    eigenvalues, vectors = np.linalg.eigh(f.T @ f)
    kept = eigenvalues > eigenvalues.max() * 1e-10
    sigma, vectors = eigenvalues[kept], vectors[:, kept]
    projection = vectors / np.sqrt(sigma)  # u = f @ projection
    scores = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        z = projection.T @ (f.T @ y)
        outside = max(float(y @ y - z @ z), 0.0)  # the part of y no feature direction explains
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            shrink = alpha + beta * sigma
            gamma = float((beta * sigma / shrink).sum())
            m2 = float((beta ** 2 * sigma * z ** 2 / shrink ** 2).sum())
            residual = float(((alpha * z / shrink) ** 2).sum()) + outside
            new_alpha, new_beta = gamma / (m2 + 1e-12), (n - gamma) / (residual + 1e-12)
            converged = abs(new_alpha - alpha) / alpha < tolerance and abs(new_beta - beta) / beta < tolerance
            alpha, beta = new_alpha, new_beta
            if converged:
                break
        shrink = alpha + beta * sigma
        m2 = float((beta ** 2 * sigma * z ** 2 / shrink ** 2).sum())
        residual = float(((alpha * z / shrink) ** 2).sum()) + outside
        log_det = float(np.log(shrink).sum()) + (d - len(sigma)) * math.log(alpha)
        evidence = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - n / 2 * math.log(2 * math.pi)
                    - beta / 2 * residual - alpha / 2 * m2 - log_det / 2)
        scores.append(evidence / n)
    return float(np.mean(scores))


def _true_rank(truth) -> np.ndarray:
    """Rank of each item by ``truth``, 0 = best (highest); ties keep their input order."""
    return np.argsort(np.argsort(-np.asarray(truth, dtype=np.float64), kind="stable"), kind="stable")


def weighted_kendall_tau(scores, truth) -> float:
    """Weighted Kendall tau between a score ranking and the true ranking, with hyperbolic weights
    1 / (r + 1) on the true rank r (0 = best) and additive pair weights (scipy's weightedtau).

    Args:
        scores: (K,) a score per model, higher = predicted better.
        truth: (K,) the true quality per model (e.g. Dice), higher = better.

    Returns:
        tau in [-1, 1]; 1 when the scores order the models as the truth does.
    """
    truth = np.asarray(truth, dtype=np.float64)
    return float(weightedtau(np.asarray(scores, dtype=np.float64), truth, rank=_true_rank(truth)).statistic)


def weighted_kendall_tau_multiplicative(scores, truth) -> float:
    """TopoTE's weighted Kendall tau (their Eq. 7): 1 - 2 * sum_{i<j} w(i) w(j) [discordant] / sum_{i<j} w(i) w(j),
    with the items in true order (best first), w(i) = 1 / (i + 1), and a pair discordant when the
    better item scores strictly lower (a tie in the scores counts as concordant, as in their code).
    A pair's weight is the product of its two weights, so swaps among the top items cost most.

    Args:
        scores, truth: (K,) as ``weighted_kendall_tau``.

    Returns:
        tau in [-1, 1]; 0 for fewer than two models.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) < 2:
        return 0.0
    in_true_order = scores[np.argsort(_true_rank(truth), kind="stable")]
    weights = 1.0 / np.arange(1, len(scores) + 1)
    pair_weights = np.triu(np.outer(weights, weights), k=1)
    discordant = np.triu(in_true_order[:, None] < in_true_order[None, :], k=1)
    return float(1.0 - 2.0 * pair_weights[discordant].sum() / pair_weights.sum())


def weighted_taus(scores, truth) -> dict[str, float]:
    """Both weighted Kendall tau variants of a score list against the truth: ``additive`` (scipy's
    weightedtau, hyperbolic rank weights added per pair) and ``multiplicative`` (TopoTE's Eq. 7)."""
    return {"additive": weighted_kendall_tau(scores, truth), "multiplicative": weighted_kendall_tau_multiplicative(scores, truth)}


# TopoTE's layer weights: a Gaussian over the stages, centred on the middle decoder stage and on the
# stage just past the middle of the encoder (their "paper" profile fits sigma 0.8 and 0.9).
DECODER_SIGMA = 0.8
ENCODER_SIGMA = 0.9


def stage_weights(count: int, centre: float, sigma: float) -> np.ndarray:
    """Normalised Gaussian weights exp(-(i - centre)^2 / (2 sigma^2)) over stages i = 0 .. count-1.

    Returns:
        (count,) weights summing to 1.
    """
    raw = np.exp(-0.5 * ((np.arange(count) - centre) / sigma) ** 2)
    return raw / raw.sum()


def decoder_stage_weights(count: int) -> np.ndarray:
    """GRTD's weights over ``count`` decoder stages (coarse to fine), centred on the middle one."""
    return stage_weights(count, (count - 1) / 2, DECODER_SIGMA)


def encoder_stage_weights(count: int) -> np.ndarray:
    """LBTC's weights over ``count`` encoder stages (fine to coarse), centred at count / 2 (clipped to the last)."""
    return stage_weights(count, min(count / 2, count - 1), ENCODER_SIGMA)
