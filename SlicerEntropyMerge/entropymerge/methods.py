"""The merge methods: one registry that names each method and says what it needs.

The pipeline, ``validate_options``, the side-by-side evaluation (demo, benchmarks), the CLI's
``--method`` choices and the Slicer module's method list all read this registry, so a new method is
one ``register(MergeMethod(...))`` call. Importing this module is cheap (no torch): the Slicer
module reads it at startup; the planning functions import the engine only when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import UserInputError


@dataclass
class PlanContext:
    """What a method's ``plan`` function may use: the K site models and, for methods that use the probe,
    the probe and the site models' softmax outputs on it (K x (P, C, X, Y, Z))."""

    models: list  # SiteModel
    settings: Any  # settings.MergeSettings (statistic, temperatures, head decoupling, single_model)
    device: Any  # torch.device
    probe: Any = None  # probe.Probe
    outputs: Optional[list] = None
    batch_size: int = 2


@dataclass(frozen=True)
class MergeMethod:
    """One way of combining the site models for a volume.

    ``plan(context) -> merging.MergePlan`` gives the coefficients of the single merged model. Methods without
    a plan run every site model over the whole volume and combine the results: ``combine="average"`` averages
    the softmax outputs (the ensemble), ``combine="best"`` keeps the site model with the best Dice against the
    reference (the oracle).
    """

    name: str
    label: str  # how panels and tables show it
    description: str  # one line for --help and the README
    uses_probe: bool = False  # the K site models run on the probe
    needs_reference: bool = False
    plan: Optional[Callable[[PlanContext], Any]] = None
    combine: Optional[str] = None  # "average" or "best", for methods without a plan
    compared: bool = True  # a row of the side-by-side comparison (single: every site model has its own row)
    one_model: bool = False  # one-hot coefficients: one site model runs as it is (tables name it, not a merge)

    @property
    def runs_every_model(self) -> bool:
        """The method has no plan: every site model runs on the whole volume (ensemble, oracle)."""
        return self.plan is None


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add (or replace) a merge method; it then appears in the CLI, the evaluation and the Slicer module."""
    if (method.plan is None) == (method.combine is None) or method.combine not in (None, "average", "best"):
        raise ValueError(f"merge method {method.name!r} needs either a plan or combine='average'/'best'")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove the merge method ``name`` (no error when there is none)."""
    METHODS.pop(name, None)


def one_model_used(method: str, body: dict[str, float]) -> Optional[str]:
    """The site model that ran as it is, for a one-model method (single, select, oracle).

    Args:
        method: the run's method name (an unregistered one, e.g. a plug-in absent here, is not a one-model method).
        body: the run's body coefficients alpha by model name (one-hot for a one-model method).

    Returns:
        The model's name, or None for a merge (even one whose alpha happens to be one-hot) or empty coefficients.
    """
    registered = METHODS.get(method)
    return max(body, key=body.get) if registered is not None and registered.one_model and body else None


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``.

    Raises:
        UserInputError: naming the registered methods when ``name`` is none of them.
    """
    if name not in METHODS:
        raise UserInputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def single_model_index(models: list, choice: Optional[str]) -> int:
    """The index of the model named (or numbered) ``choice``; the only model when there is one."""
    if choice is None:
        if len(models) == 1:
            return 0
        raise UserInputError(
            f"--method single runs one model but {len(models)} were given; name it with --single-model "
            f"({', '.join(m.name for m in models)})"
        )
    for index, model in enumerate(models):
        if choice in (model.name, str(index)):
            return index
    raise UserInputError(f"--single-model {choice!r} is none of the loaded models ({', '.join(m.name for m in models)})")


def _adaptive(context: PlanContext):
    from .merging import adaptive_plan

    return adaptive_plan(context.models, context.probe, context.outputs, context.settings, context.device,
                         context.batch_size)


def _mean(context: PlanContext):
    from .merging import MergePlan, mean_coefficients

    return MergePlan("mean", mean_coefficients(context.models))


def _single(context: PlanContext):
    from .merging import MergePlan, one_hot

    return MergePlan("single", one_hot(single_model_index(context.models, context.settings.single_model), len(context.models)))


def _select(context: PlanContext):
    import numpy as np

    from .merging import MergePlan, one_hot, plan_statistics, site_scores

    statistic = context.settings.statistic
    stats = plan_statistics(context.models, context.probe, context.outputs)
    scores = site_scores(stats, statistic)
    chosen = int(np.argmin(scores))
    return MergePlan("select", one_hot(chosen, len(context.models)), details={
        "statistics": stats, "scores": scores, "statistic": statistic, "selected": context.models[chosen].name,
        "probe": context.probe.describe()})


register(MergeMethod("adaptive", "entropy-adaptive merge",
                     "coefficients from each site model's uncertainty on the probe; body and head merged apart (default)",
                     uses_probe=True, plan=_adaptive))
register(MergeMethod("mean", "mean merge", "every site model weighs 1/K (model soup)", plan=_mean))
register(MergeMethod("ensemble", "ensemble of the site models", "average of the K models' softmax outputs (K inferences)",
                     combine="average"))
register(MergeMethod("single", "single site model", "one site model as it is (--single-model)", plan=_single,
                     compared=False, one_model=True))
register(MergeMethod("select", "entropy-selected model", "the site model with the lowest probe uncertainty",
                     uses_probe=True, plan=_select, one_model=True))
register(MergeMethod("oracle", "oracle best single model", "the site model with the best Dice against --reference",
                     needs_reference=True, combine="best", one_model=True))
