"""Merge coefficients: how much each site model weighs in the merged model, and why.

A merge method is a function ``(models, probe) -> coefficients`` that returns one non-negative
weight per site model, summing to 1 (``weights.merged_network`` then builds the single network).
The adaptive merge derives them from label-free statistics of the site models' outputs on the
probe: alpha = softmax(-s / tau) for the body, beta for the decoupled head (``adaptive_plan``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .entropy import probe_statistics
from .errors import UserInputError
from .fingerprint import fingerprint_distances, intensity_fingerprint
from .head import detect_head, head_probabilities
from .models import SiteModel
from .probe import Probe, apply_batchnorm_policy, probe_probabilities
from .settings import MergeSettings
from .weights import merged_network


def mean_coefficients(models: Sequence[SiteModel], probe=None) -> np.ndarray:
    """The naive mean merge (model soup): every site model weighs 1/K.

    Args:
        models: the K site models.
        probe: unused (the signature of a merge method).

    Returns:
        (K,) float64 coefficients, all 1/K.
    """
    return np.full(len(models), 1.0 / len(models))


def one_hot(index: int, count: int) -> np.ndarray:
    """Coefficients that pick one site model.

    Args:
        index: the model to pick.
        count: the number of models K.

    Returns:
        (K,) float64 coefficients: 1 at ``index``, 0 elsewhere.
    """
    values = np.zeros(count)
    values[index] = 1.0
    return values


# ---------------------------------------------------------------------------------------------
# Entropy-adaptive coefficients.

@dataclass(frozen=True)
class Statistic:
    """One label-free per-model score s_k behind alpha = softmax(-s / tau) (lower = more trusted).

    ``shrink``: pull alpha toward the mean merge as far as the models disagree (see ``shrink_toward_mean``).
    ``trim``: no softmax: the mean merge of the models whose score is not an outlier (see ``trimmed_mean``).
    ``alone``: it means something for one model on its own (an entropy), so ``--refine`` can score a
    merged candidate with it; the others compare models with each other or with their training data.
    """

    keys: tuple[str, ...]  # s_k is the sum of these probe statistics
    shrink: bool = False
    trim: bool = False
    description: str = ""
    alone: bool = False

    def score(self, stats: dict[str, list[float]]) -> list[float]:
        """s_k: the sum of this statistic's probe statistics for each model (K floats)."""
        return [float(sum(values)) for values in zip(*(stats[key] for key in self.keys))]


STATISTICS: dict[str, Statistic] = {
    "entropy": Statistic(("entropy",), alone=True, description="mean normalised entropy H_k"),
    "foreground_entropy": Statistic(("foreground_entropy",), alone=True, description="H_k weighted by 1 - mean_k p_k,bg"),
    "balanced_entropy": Statistic(("balanced_entropy",), alone=True, description="class-balanced entropy"),
    "consensus": Statistic(("foreground_entropy", "disagreement"), description="foreground entropy + Jensen-Shannon to the mean"),
    "cross_entropy": Statistic(("cross_entropy",), description="leave-one-out consensus cross-entropy"),
    "biased_entropy": Statistic(("balanced_entropy", "prediction_bias"), description="class-balanced entropy + prediction bias"),
    "entropy_kl": Statistic(("foreground_entropy", "consensus_kl"),
                            description="foreground entropy + KL of the others' mean output to the model's (unbounded)"),
    "cross_entropy_bias": Statistic(("cross_entropy", "prediction_bias"), description="consensus cross-entropy + prediction bias"),
    "trimmed_mean": Statistic(("cross_entropy", "prediction_bias"), trim=True,
                              description="mean merge of the sites whose consensus cross-entropy + bias is no outlier"),
    "shrunk_cross_entropy": Statistic(("cross_entropy",), shrink=True,
                                      description="consensus cross-entropy, shrunk toward the mean merge by disagreement"),
    "fingerprint": Statistic(("fingerprint_distance",), description="distance of the target's intensities to the site's training data"),
    "cross_entropy_fingerprint": Statistic(("cross_entropy", "fingerprint_distance"),
                                           description="consensus cross-entropy + intensity fingerprint distance"),
}


def plan_statistics(models: Sequence[SiteModel], probe: Probe, outputs: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """``probe_statistics`` of the site models' probe outputs, plus ``fingerprint_distance`` when every
    model card carries an intensity fingerprint of its training data.

    Args:
        models: the K site models.
        probe: the probe the outputs were computed on.
        outputs: K softmax outputs on the probe, each (P, C, X, Y, Z).

    Returns:
        Statistic name -> K floats, one per model.
    """
    stats = probe_statistics(outputs)
    distances = fingerprint_distances([m.card.training for m in models], intensity_fingerprint(probe.patches[:, 0]))
    if distances is not None:
        stats["fingerprint_distance"] = distances
    return stats


def softmax_coefficients(scores: Sequence[float], temperature: float) -> np.ndarray:
    """softmax(-score / temperature): lower uncertainty, larger weight.

    Args:
        scores: K per-model scores s_k (lower = more trusted).
        temperature: tau > 0; lower is sharper.

    Returns:
        (K,) float64 coefficients summing to 1.
    """
    if not temperature > 0:
        raise UserInputError(f"the temperature must be > 0, got {temperature}")
    logits = -np.asarray(scores, dtype=np.float64) / temperature
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def shrink_toward_mean(alpha: Sequence[float], disagreement: Sequence[float]) -> np.ndarray:
    """alpha' = lam alpha + (1 - lam) / K with lam = 1 - mean_k JS_k / ln 2 (T3-style agreement gating).

    ``disagreement``: each model's Jensen-Shannon divergence to the mean output, in units of ln 2
    (so in [0, 1]). Models that agree keep their adaptive weights; the more they disagree, the
    closer the merge comes to the mean merge.

    Args:
        alpha: (K,) coefficients.
        disagreement: K Jensen-Shannon divergences to the mean output, in units of ln 2.

    Returns:
        (K,) float64 coefficients summing to 1.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    agreement = 1.0 - float(np.clip(np.mean(disagreement), 0.0, 1.0))
    return agreement * alpha + (1.0 - agreement) / len(alpha)


def site_scores(stats: dict[str, list[float]], statistic: str) -> list[float]:
    """The per-model score s_k that drives alpha (see ``STATISTICS``).

    Args:
        stats: statistic name -> K floats (``plan_statistics``).
        statistic: a name in ``STATISTICS``.

    Returns:
        K scores, lower = more trusted. Raises ``UserInputError`` for an unknown statistic or one whose
        inputs ``stats`` lacks (the intensity fingerprints).
    """
    if statistic not in STATISTICS:
        raise UserInputError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
    if "fingerprint_distance" in STATISTICS[statistic].keys and "fingerprint_distance" not in stats:
        raise UserInputError(f"--statistic {statistic} needs an intensity fingerprint of the training data in every "
                             "model card (training.intensity_fingerprint, written by entropymerge train)")
    return STATISTICS[statistic].score(stats)


def trimmed_mean(scores: Sequence[float], spread: float = 3.0, relative: float = 0.5) -> np.ndarray:
    """Equal weights for every model except the outliers, which get 0.

    A model is an outlier when its score s_k exceeds the median by more than both ``spread`` robust standard
    deviations (1.4826 x the median absolute deviation) and ``relative`` x the median: a site that is far off
    the others' consensus (one that finds nothing, an inverted contrast) is dropped, while sites that differ
    only a little all keep 1/K' (a sharp softmax over small differences would discard good sites).

    Args:
        scores: K per-model scores s_k.
        spread: robust standard deviations above the median beyond which a score is an outlier.
        relative: fraction of the median beyond which a score is an outlier.

    Returns:
        (K,) float64 coefficients: 1/K' for the K' kept models, 0 for the outliers.
    """
    scores = np.asarray(scores, dtype=np.float64)
    median = float(np.median(scores))
    deviation = 1.4826 * float(np.median(np.abs(scores - median)))
    kept = scores - median <= max(spread * deviation, relative * abs(median))
    return kept / kept.sum()


def statistic_coefficients(stats: dict[str, list[float]], statistic: str, temperature: float) -> np.ndarray:
    """alpha from the probe statistics: softmax(-s / tau), shrunk toward the mean where the statistic says so,
    or the trimmed mean merge for a ``trim`` statistic (the temperature then plays no part).

    Args:
        stats: statistic name -> K floats (``plan_statistics``).
        statistic: a name in ``STATISTICS``.
        temperature: tau of the softmax.

    Returns:
        (K,) float64 coefficients summing to 1.
    """
    if STATISTICS[statistic].trim:
        return trimmed_mean(site_scores(stats, statistic))
    alpha = softmax_coefficients(site_scores(stats, statistic), temperature)
    return shrink_toward_mean(alpha, stats["disagreement"]) if STATISTICS[statistic].shrink else alpha


@dataclass
class MergePlan:
    """How the site models are combined for one volume, and the evidence for it.

    Attributes:
        method: the merge method's name.
        body: (K,) alpha; None for the ensemble (no merge).
        head: (K,) beta when the head is decoupled, else None (the head follows alpha).
        head_keys: the state-dict keys merged with beta.
        details: the evidence (statistics, scores, temperatures, probe), for the summary.
    """

    method: str
    body: np.ndarray | None  # alpha; None for the ensemble (no merge)
    head: np.ndarray | None = None  # beta when the head is decoupled
    head_keys: frozenset[str] = frozenset()
    details: dict = field(default_factory=dict)

    def network(self, models: Sequence[SiteModel]) -> torch.nn.Module:
        """The single merged network of ``models`` under this plan (``weights.merged_network``)."""
        if self.body is None:
            raise ValueError("the ensemble has no single merged network")
        return merged_network(models, self.body, self.head_keys, self.head)


def adaptive_plan(
    models: Sequence[SiteModel],
    probe: Probe,
    site_probabilities: Sequence[torch.Tensor],
    settings: MergeSettings,
    device: torch.device,
    batch_size: int = 2,
) -> MergePlan:
    """alpha = softmax(-H / tau) from the site models' probe outputs; beta from each head's entropy on
    the alpha-merged body's features; optionally the best of a few candidates by merged probe entropy.

    Args:
        models: the K site models.
        probe: the probe.
        site_probabilities: K softmax outputs on the probe, each (P, C, X, Y, Z).
        settings: the statistic, temperatures, head decoupling, refinement and batch-norm policy.
        device: where the merged networks run.
        batch_size: probe patches per forward pass.

    Returns:
        The plan: alpha, beta and the head's keys when the head is decoupled, and the evidence.
    """
    stats = plan_statistics(models, probe, site_probabilities)
    scores = site_scores(stats, settings.statistic)
    alpha = statistic_coefficients(stats, settings.statistic, settings.temperature)
    details: dict = {"statistics": stats, "scores": scores, "statistic": settings.statistic,
                     "temperature": settings.temperature, "probe": probe.describe()}
    plan = MergePlan("adaptive", alpha, details=details)
    head = detect_head(models[0].network, models[0].card.num_classes, models[0].card.head) if settings.decouple_head else None
    if settings.decouple_head and head is None:
        details["head_note"] = "the head could not be told apart from the body; it is merged with alpha"
    if head is not None:
        body = merged_network(models, alpha)
        apply_batchnorm_policy(body, probe, settings.batchnorm, device, batch_size)
        per_head = head_probabilities(body, head, models, probe, device, batch_size)
        head_stats = probe_statistics(per_head)
        if "fingerprint_distance" in stats:  # a property of the site's data, not of its head
            head_stats["fingerprint_distance"] = stats["fingerprint_distance"]
        head_scores = site_scores(head_stats, settings.statistic)
        plan.head = statistic_coefficients(head_stats, settings.statistic, settings.head_tau)
        plan.head_keys = head.keys
        details.update(head_module=head.module_name, head_scores=head_scores, head_temperature=settings.head_tau)
    if settings.refine:
        plan = refine_plan(models, probe, plan, settings, device, batch_size)
    return plan


def refine_plan(models, probe: Probe, plan: MergePlan, settings: MergeSettings, device, batch_size: int) -> MergePlan:
    """Forward-only search: alpha at other temperatures, the mean and each single model, scored by the
    merged model's own probe uncertainty (the statistic when it applies to one model alone, else the
    foreground entropy); keeps the lowest (no gradients).

    Args:
        models: the K site models.
        probe: the probe.
        plan: the adaptive plan (its ``details`` hold the probe statistics).
        settings: as for ``adaptive_plan``.
        device: where the candidates run.
        batch_size: probe patches per forward pass.

    Returns:
        The best candidate, its ``details`` extended with every candidate's score.
    """
    criterion = settings.statistic if STATISTICS[settings.statistic].alone else "foreground_entropy"
    count = len(models)
    candidates = [("adaptive", plan)]
    for factor in (0.5, 2.0):
        alpha = statistic_coefficients(plan.details["statistics"], settings.statistic, settings.temperature * factor)
        candidates.append((f"adaptive tau x{factor:g}", MergePlan("adaptive", alpha, alpha if plan.head is not None else None, plan.head_keys)))
    candidates.append(("mean", MergePlan("adaptive", mean_coefficients(models))))
    candidates += [(f"only {m.name}", MergePlan("adaptive", one_hot(i, count))) for i, m in enumerate(models)]
    results = []
    for label, candidate in candidates:
        network = candidate.network(models)
        apply_batchnorm_policy(network, probe, settings.batchnorm, device, batch_size)
        stats = probe_statistics([probe_probabilities(network, probe, device, batch_size)])
        results.append({"candidate": label, "score": site_scores(stats, criterion)[0],
                        "body": candidate.body.round(6).tolist()})
    best = min(range(len(results)), key=lambda i: results[i]["score"])
    chosen = candidates[best][1]
    chosen.details = dict(plan.details, candidates=results, chosen_candidate=results[best]["candidate"], refine_criterion=criterion)
    return chosen
