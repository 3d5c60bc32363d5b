"""The interpolation path between two site models (ModelMix, METHODS.md section 5).

theta(lam) = (1 - lam) theta_A + lam theta_B for lam in [0, 1]. The merged model's probe entropy
(and its Dice, with a reference) along the path shows whether the two models are mode-connected,
that is, whether merging them can work at all. The endpoints, the mean merge (lam = 0.5) and the
entropy-adaptive coefficient (the alpha that the adaptive merge of the two gives model B) are
evaluated exactly and marked.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .artefact import merged_model_card  # noqa: E402
from .case import Case, Timings, input_paths, load_case  # noqa: E402
from .entropy import probe_statistics  # noqa: E402
from .errors import UserInputError  # noqa: E402
from .models import save_site_model  # noqa: E402
from .outputs import OutputFolder  # noqa: E402
from .probe import Probe, probe_batch_size, probe_probabilities  # noqa: E402
from .progress import Progress  # noqa: E402
from .settings import RunOptions  # noqa: E402
from .stages import plan_merge  # noqa: E402
from .weights import interpolate  # noqa: E402

STATISTICS = ("entropy", "foreground_entropy", "balanced_entropy", "foreground_fraction")


@dataclass
class PathPoint:
    """One merged model theta(lam) on the path."""

    lam: float  # weight of model B
    markers: tuple[str, ...]  # "A", "B", "mean", "adaptive"
    statistics: dict[str, float]  # the merged model's probe statistics (STATISTICS)
    evaluation: dict | None  # Dice and HD95 of its full-volume segmentation, with a reference


@dataclass
class InterpolationPath:
    """The path from model A (lam = 0) to model B (lam = 1), points in increasing lam."""

    model_a: str
    model_b: str
    adaptive_alpha_b: float  # the body weight the entropy-adaptive merge gives model B
    adaptive_beta_b: float | None  # its head weight, when the head is decoupled
    points: list[PathPoint]

    @property
    def has_dice(self) -> bool:
        """A reference with foreground labels was given."""
        return self.points[0].evaluation is not None and self.points[0].evaluation["mean_dice"] is not None

    def barrier(self, values: list[float]) -> float:
        """Largest rise of ``values`` above the straight line between its endpoint values (0 when convex)."""
        lams = np.array([p.lam for p in self.points])
        values = np.asarray(values, dtype=np.float64)
        line = (1.0 - lams) * values[0] + lams * values[-1]
        return float(max(0.0, (values - line).max()))

    def to_json(self) -> dict:
        """The path as summary data: the models, the adaptive coefficients, the entropy barrier (and,
        with a reference, the Dice barrier, of -Dice) and every point."""
        entropy = [p.statistics["entropy"] for p in self.points]
        result = {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "adaptive_alpha_b": self.adaptive_alpha_b,
            "adaptive_beta_b": self.adaptive_beta_b,
            "entropy_barrier": self.barrier(entropy),
            "points": [{"lambda": p.lam, "markers": list(p.markers), "probe": p.statistics, "evaluation": p.evaluation}
                       for p in self.points],
        }
        if self.has_dice:
            result["dice_barrier"] = self.barrier([-p.evaluation["mean_dice"] for p in self.points])
        return result

    def to_csv(self) -> str:
        """``path.csv``: per point lambda, both weights, the markers, the probe statistics and, with a
        reference, the mean and per-class Dice (6 decimals)."""
        classes = list(self.points[0].evaluation["per_class"]) if self.has_dice else []
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["lambda", f"weight_{self.model_a}", f"weight_{self.model_b}", "marker",
                         *(f"probe_{s}" for s in STATISTICS), *(["mean_dice"] if classes else []), *(f"dice_{c}" for c in classes)])
        for p in self.points:
            dice = [p.evaluation["mean_dice"], *(p.evaluation["per_class"][c]["dice"] for c in classes)] if classes else []
            writer.writerow([f"{p.lam:.6f}", f"{1.0 - p.lam:.6f}", f"{p.lam:.6f}", "+".join(p.markers),
                             *(f"{p.statistics[s]:.6f}" for s in STATISTICS), *("" if d is None else f"{d:.6f}" for d in dice)])
        return buffer.getvalue()


def path_lambdas(steps: int, adaptive_alpha_b: float) -> list[tuple[float, tuple[str, ...]]]:
    """The lambdas (weights of model B) to evaluate, with their markers.

    Args:
        steps: evenly spaced weights from 0 to 1, endpoints included (at least 2).
        adaptive_alpha_b: the adaptive merge's weight of B, added to the grid.

    Returns:
        Sorted (lam, markers) pairs: the grid plus 0.5 and ``adaptive_alpha_b``; markers among
        ``"A"`` (0), ``"B"`` (1), ``"mean"`` (0.5) and ``"adaptive"``.
    """
    grid = np.linspace(0.0, 1.0, steps)
    lams = sorted(set(grid.tolist()) | {0.5, float(adaptive_alpha_b)})
    marked = {0.0: "A", 1.0: "B", 0.5: "mean"}
    return [(lam, tuple(m for m in (marked.get(lam), "adaptive" if lam == adaptive_alpha_b else None) if m)) for lam in lams]


def interpolation_path(case: Case, probe: Probe, lambdas, adaptive: tuple[float, float | None], progress: Progress) -> InterpolationPath:
    """Probe statistics (and, with a reference, the evaluation) of theta(lam) for each (lam, markers) in ``lambdas``.

    Args:
        case: a loaded case with exactly two site models, A and B.
        probe: the probe the statistics are computed on.
        lambdas: (weight of B, markers) pairs (``path_lambdas``).
        adaptive: the adaptive merge's (alpha_B, beta_B or None), recorded in the path.
        progress: receives the fraction of points done.

    Returns:
        The ``InterpolationPath``.
    """
    model_a, model_b = case.models
    batch = probe_batch_size(probe, case.settings.roi_size)
    points = []
    for index, (lam, markers) in enumerate(lambdas):
        progress.update(index / len(lambdas), f"lambda = {lam:.3f}")
        network = interpolate(model_a, model_b, lam)
        stats = probe_statistics([probe_probabilities(network, probe, case.device, batch)])
        evaluation = case.evaluate(case.segment(case.probabilities(network)).labels) if case.reference is not None else None
        points.append(PathPoint(lam, markers, {s: stats[s][0] for s in STATISTICS}, evaluation))
    return InterpolationPath(model_a.name, model_b.name, adaptive[0], adaptive[1], points)


def path_figure(path: InterpolationPath, file: Path, title: str) -> Path:
    """Plot probe entropy (left axis) and Dice (right axis, with a reference) against lambda, with the markers.

    Args:
        path: the path.
        file: the PNG to write (8.5 x 5.2 inches at 120 dpi).
        title: the figure's title.

    Returns:
        ``file``.
    """
    lams = np.array([p.lam for p in path.points])
    figure, left = plt.subplots(figsize=(8.5, 5.2), layout="constrained")
    lines = [
        left.plot(lams, [p.statistics["entropy"] for p in path.points], "o-", color="#0072b2", markersize=3,
                  label="probe entropy (mean over voxels)")[0],
        left.plot(lams, [p.statistics["foreground_entropy"] for p in path.points], "s--", color="#56b4e9", markersize=3,
                  label="probe entropy (foreground-weighted)")[0],
    ]
    left.set_xlabel(f"λ: weight of model B (0 = A {path.model_a}, 1 = B {path.model_b}), unitless")
    left.set_ylabel("probe entropy, normalised (0 = certain, 1 = uniform)")
    left.set_xlim(-0.03, 1.03)
    if path.has_dice:
        right = left.twinx()
        lines.append(right.plot(lams, [p.evaluation["mean_dice"] for p in path.points], "^-", color="#d55e00", markersize=4,
                                label="mean Dice vs reference (full volume)")[0])
        right.set_ylabel("mean Dice vs reference (0 to 1)")
        right.set_ylim(0.0, 1.0)
    lines.append(left.axvline(0.5, color="#555555", linestyle=":", label="mean merge (λ = 0.5)"))
    lines.append(left.axvline(path.adaptive_alpha_b, color="#009e73", linestyle="-.",
                              label=f"entropy-adaptive merge (α_B = {path.adaptive_alpha_b:.3f})"))
    for point, name, align in ((path.points[0], f"A: {path.model_a}", "left"), (path.points[-1], f"B: {path.model_b}", "right")):
        left.plot(point.lam, point.statistics["entropy"], "o", color="black", markersize=9, fillstyle="none")
        left.annotate(name, (point.lam, point.statistics["entropy"]), textcoords="offset points", xytext=(0, 10),
                      ha=align, fontsize=9)
    left.legend(handles=lines, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9, frameon=False)
    left.set_title(title, fontsize=11)
    left.grid(alpha=0.3)
    figure.savefig(file, dpi=120)
    plt.close(figure)
    return file


def path_table(path: dict) -> str:
    """A plain-text table of a path's JSON record: lambda, markers, probe entropies, foreground fraction, mean Dice."""
    rows = [f"{'lambda':>7}  {'marker':<12} {'entropy':>8} {'fg entropy':>10} {'fg fraction':>11} {'mean Dice':>9}"]
    for p in path["points"]:
        dice = (p["evaluation"] or {}).get("mean_dice")
        rows.append(f"{p['lambda']:7.3f}  {'+'.join(p['markers']):<12} {p['probe']['entropy']:8.4f} "
                    f"{p['probe']['foreground_entropy']:10.4f} {p['probe']['foreground_fraction']:11.4f} "
                    f"{'-' if dice is None else format(dice, '.3f'):>9}")
    return "\n".join(rows)


def save_interpolated(case: Case, lam: float, volume: str, output: OutputFolder) -> None:
    """Stage theta(lam) as a site model in ``output``: ``interpolated.safetensors`` and ``interpolated.json``.

    Args:
        case: the loaded case with the two site models.
        lam: the weight of model B, in [0, 1].
        volume: the volume's file name, recorded in the card.
        output: the run's output folder (keys ``model_weights``, ``model_card``).
    """
    network = interpolate(*case.models, lam)
    card = merged_model_card(case.models, network, name="interpolated", method="interpolation", body=[1.0 - lam, lam],
                             volume=volume, inference=case.settings)
    save_site_model(network, card, output.staging, "interpolated")
    output.files.update(model_weights="interpolated.safetensors", model_card="interpolated.json")


def run_path(options: RunOptions, steps: int, progress: Progress | None = None, save_model_at: float | None = None) -> dict:
    """``entropymerge path``: the interpolation path between the two models of ``options``; writes
    path.csv, path.png and summary.json to ``options.out`` and returns the summary. With
    ``save_model_at`` also theta(save_model_at) as a site model (interpolated.safetensors + .json).

    Args:
        options: the run options (volume, exactly two models, output folder, merge settings).
        steps: evenly spaced lambdas from 0 to 1 (at least 2).
        progress: the progress reporter; None for notes only.
        save_model_at: the weight of model B of the model to save, in [0, 1]; None to save none.

    Returns:
        The summary, with ``outputs`` (key -> path).

    Raises:
        UserInputError: fewer than 2 steps, ``save_model_at`` outside [0, 1], no output folder, not
            exactly two models, or any problem of the inputs.
    """
    progress = progress or Progress()
    if steps < 2:
        raise UserInputError(f"--steps must be at least 2 (the two endpoints), got {steps}")
    if save_model_at is not None and not 0.0 <= save_model_at <= 1.0:
        raise UserInputError(f"--save-model-at must lie in [0, 1] (the weight of model B), got {save_model_at}")
    if options.out is None:
        raise UserInputError("an output folder (--out) is needed")
    output = OutputFolder(options.out, options.overwrite, input_paths(options.input_settings(), options.scribbles))
    timings = Timings()
    progress.plan([("load", 1), ("preprocess", 1), ("features", 2), ("probe", 1), ("merge", 1),
                   ("path", steps * (4 if options.reference else 1)), ("write", 1)])
    try:
        case = load_case(options.input_settings(), options.inference_overrides(), options.probe_settings(),
                         options.ranking_settings(), progress, timings)
        if len(case.models) != 2:
            raise UserInputError(f"path interpolates between exactly two site models; {len(case.models)} were given")
        plan, probe_run = plan_merge(case, options.merge_settings(), options.probe_settings(), options.rank, progress, timings)
        adaptive = (float(plan.body[1]), float(plan.head[1]) if plan.head is not None else None)
        progress.stage("path", f"{steps} steps from {case.models[0].name} to {case.models[1].name}")
        with timings.measure("path"):
            path = interpolation_path(case, probe_run.probe, path_lambdas(steps, adaptive[0]), adaptive, progress)
        progress.stage("write", "writing the path")
        output.text("path_csv", "path.csv", path.to_csv())
        path_figure(path, output.staging / "path.png",
                    f"Interpolation path θ(λ) = (1 − λ)·θ_A + λ·θ_B on {Path(options.volume).name}")
        output.files["path_png"] = "path.png"
        if save_model_at is not None:
            save_interpolated(case, save_model_at, Path(options.volume).name, output)
        summary = {"volume": str(options.volume), "steps": steps, "probe": probe_run.probe.describe(),
                   "path": path.to_json(), "device": str(case.device), "timings_s": timings, "notes": progress.notes}
        outputs = output.commit(summary)
    except BaseException:
        output.abort()
        raise
    progress.done(outputs)
    return dict(summary, outputs=outputs)
