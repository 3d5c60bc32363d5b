"""Every merge method and baseline on one prepared case, side by side (the demo and the benchmarks).

Work the methods share (reading, preprocessing, stable features, the probe passes of the K site
models) is done once; each method's wall time is reported as if it ran alone: its own stages plus
the probe it needs, excluding the shared reading and feature stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from .case import Case
from .inference import Segmentation
from .merging import MergePlan, one_hot, plan_statistics
from .methods import METHODS, MergeMethod, PlanContext
from .probe import probe_batch_size
from .progress import Progress
from .settings import MergeSettings, ProbeSettings
from .stages import site_probe_outputs


@dataclass
class MethodResult:
    """One method's segmentation of the case, its wall time (seconds), its evaluation against the
    reference (``metrics.evaluate``; None without one) and its coefficients (``{"body": {name: alpha}, "head": ...}``)."""

    key: str  # e.g. "site:riverside-t1", "mean", "adaptive", "adaptive-coupled", "ensemble", "select", "oracle"
    label: str  # how the table shows it
    segmentation: Segmentation
    seconds: float
    evaluation: dict | None = None
    coefficients: dict | None = None

    @property
    def mean_dice(self) -> float | None:
        """The mean Dice over the reference's labels; None without a reference."""
        return self.evaluation["mean_dice"] if self.evaluation else None


@dataclass
class Comparison:
    """Every method's result on one case, with the site models' probe statistics and the probe's description."""

    results: list[MethodResult] = field(default_factory=list)
    statistics: dict | None = None
    probe: dict | None = None

    def get(self, key: str) -> MethodResult:
        """The result under ``key`` (e.g. ``"adaptive"``, ``"site:<model name>"``); StopIteration when absent."""
        return next(r for r in self.results if r.key == key)


def _timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def compare_methods(
    case: Case,
    settings: MergeSettings = MergeSettings(),
    probe_patches: int = ProbeSettings.patches,
    probe_size=None,
    progress: Progress | None = None,
    variants: dict[str, MergeSettings] | None = None,
) -> Comparison:
    """Run each site model alone, the mean merge, the entropy-adaptive merge with and without a
    decoupled head, the ensemble, the entropy-selected model and (with a reference) the oracle.

    Args:
        case: the loaded case (volume in model space, K site models, the reference if any).
        settings: the merge settings of the methods that plan a merge.
        probe_patches: how many probe patches the site models see.
        probe_size: the probe patch size in voxels; None for the default.
        progress: receives the fraction of methods done.
        variants: name -> settings of further adaptive merges (other statistics or temperatures)
            on the same probe.

    Returns:
        The ``Comparison``, in the order: site models, then the registry's compared methods.
    """
    progress = progress or Progress()
    models = case.models
    names = [m.name for m in models]
    comparison = Comparison()

    def named(values):
        return {n: round(float(v), 6) for n, v in zip(names, values)}

    def finish(key, label, probabilities, seconds, coefficients=None):
        segmentation = case.segment(probabilities)
        comparison.results.append(MethodResult(key, label, segmentation, seconds, case.evaluate(segmentation.labels), coefficients))

    progress.update(0.0, "probe passes")
    probe, probe_seconds = _timed(lambda: case.select_probe(probe_size, probe_patches))
    (outputs, _), pass_seconds = _timed(lambda: site_probe_outputs(case, probe, Progress()))
    probe_seconds += pass_seconds
    comparison.probe = probe.describe()
    stats = plan_statistics(models, probe, outputs)
    comparison.statistics = {k: named(v) for k, v in stats.items()}
    batch = probe_batch_size(probe, case.settings.roi_size)

    site_seconds, ensemble_sum = [], None
    for index, model in enumerate(models):
        progress.update((index + 0.5) / (len(models) + 4), f"site model {model.name}")
        probabilities, seconds = _timed(lambda: case.probabilities(model.network))
        ensemble_sum = probabilities if ensemble_sum is None else ensemble_sum + probabilities
        site_seconds.append(seconds)
        finish(f"site:{model.name}", f"site model {model.name}", probabilities, seconds, named(one_hot(index, len(models))))
    context = PlanContext(models, settings, case.device, probe=probe, outputs=outputs, batch_size=batch)

    def merged(method: MergeMethod, key: str, plan_function, label: str | None = None):
        """The plan's merged model on the volume; a one-hot plan reuses that site model's result (no new pass)."""
        plan, plan_seconds = _timed(plan_function)
        spent = plan_seconds + (probe_seconds if method.uses_probe else 0.0)
        coefficients = {"body": named(plan.body)}
        if plan.head is not None:
            coefficients["head"] = named(plan.head)
        chosen = [i for i, c in enumerate(plan.body) if c == 1.0]
        if chosen and plan.head is None:
            site = comparison.get(f"site:{names[chosen[0]]}")
            comparison.results.append(MethodResult(key, label or f"{method.label} ({names[chosen[0]]})", site.segmentation,
                                                   spent + site_seconds[chosen[0]], site.evaluation, coefficients))
            return
        network, merge_seconds = _timed(lambda: plan.network(models))
        probabilities, seconds = _timed(lambda: case.probabilities(network))
        head = " (decoupled head)" if plan.head is not None else ""
        finish(key, label or f"{method.label}{head}", probabilities, spent + merge_seconds + seconds, coefficients)

    compared = [method for method in METHODS.values() if method.compared]
    for step, method in enumerate(compared):
        progress.update((len(models) + step + 1) / (len(models) + len(compared) + 1), method.label)
        if method.combine == "average":
            finish(method.name, f"{method.label} (mean of {len(models)} softmax outputs)", ensemble_sum / len(models),
                   sum(site_seconds))
        elif method.combine == "best":
            if case.reference is not None:
                best = max(range(len(models)), key=lambda i: comparison.get(f"site:{names[i]}").mean_dice or 0.0)
                merged(method, method.name, lambda best=best: MergePlan(method.name, one_hot(best, len(models))))
        else:
            merged(method, method.name, lambda method=method: method.plan(context))
        if method.name == "adaptive":
            coupled = replace(context, settings=replace(settings, decouple_head=False))
            merged(method, "adaptive-coupled", lambda: method.plan(coupled), f"{method.label} (head not decoupled)")
            for name, variant in (variants or {}).items():
                merged(method, f"adaptive:{name}", lambda variant=variant: method.plan(replace(context, settings=variant)),
                       f"{method.label} [{name}]")
    del ensemble_sum
    progress.update(1.0, "methods compared")
    return comparison


def comparison_table(comparison: Comparison, case: Case) -> str:
    """A plain-text table: Dice per class, mean Dice, mean HD95 (mm) and wall time (seconds) of each method.

    Args:
        comparison: the methods' results.
        case: the case (its labels name the Dice columns).

    Returns:
        The table, one method per line after a header and a rule; ``-`` where a value is missing.
    """
    classes = [label.name for label in case.labels[1:]]
    header = ["method", *[f"Dice {c}" for c in classes], "mean Dice", "HD95 mm", "time s"]
    rows = []
    for result in comparison.results:
        evaluation = result.evaluation or {}
        per_class = evaluation.get("per_class", {})
        cells = [result.label]
        for name in classes:
            value = per_class.get(name, {}).get("dice")
            cells.append("-" if value is None else f"{value:.3f}")
        mean = evaluation.get("mean_dice")
        hd = evaluation.get("mean_hd95_mm")
        cells += ["-" if mean is None else f"{mean:.3f}", "-" if hd is None else f"{hd:.1f}", f"{result.seconds:.2f}"]
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def comparison_summary(comparison: Comparison) -> dict:
    """The comparison as JSON data: the probe, the probe statistics, and per method its key, label,
    seconds, coefficients and evaluation."""
    return {
        "probe": comparison.probe,
        "probe_statistics": comparison.statistics,
        "methods": [
            {"key": r.key, "label": r.label, "seconds": round(r.seconds, 3), "coefficients": r.coefficients, "evaluation": r.evaluation}
            for r in comparison.results
        ],
    }

