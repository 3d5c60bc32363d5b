"""``entropymerge demo``: the whole story on the bundled sample, in one command.

Four site models (same network, fine-tuned at four simulated hospitals) meet two scans from
sites none of them has seen. For each target the demo runs every site model alone, the mean
merge, the entropy-adaptive merge with and without a decoupled head, the ensemble and the oracle
best single model, prints one table, and writes segmentations, entropy maps, a summary and a figure.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .case import Case, load_case
from .evaluation import Comparison, compare_methods, comparison_summary, comparison_table
from .figures import ENTROPY_COLORMAP, ENTROPY_LABEL, canonical, intensity_window, most_different_slice, show_image, show_labels
from .merging import site_scores
from .outputs import OutputFolder, safe_file_stem
from .progress import Progress
from .sampledata import bundled_models, bundled_targets
from .settings import InferenceOverrides, RunOptions
from .summary import output_key

DEFAULT_FOLDER = "entropymerge-demo"


def fresh_folder(requested: Path | None) -> Path:
    """The requested folder, or ./entropymerge-demo, -2, -3 ... (never over earlier results)."""
    if requested:
        return requested
    candidate, number = Path(DEFAULT_FOLDER), 1
    while candidate.exists():
        number += 1
        candidate = Path(f"{DEFAULT_FOLDER}-{number}")
    return candidate


def run_demo(out: Path | None = None, device: str = InferenceOverrides.device, overwrite: bool = False,
             progress: Progress | None = None, print_=print) -> dict:
    """``entropymerge demo``: every method on the bundled sample targets, with a figure and a summary.

    Args:
        out: the output folder; None: ./entropymerge-demo (or -2, -3 ... when it exists).
        device: "auto", "cpu", "cuda" or "cuda:N".
        overwrite: replace earlier demo results in ``out``.
        progress: reports one stage per target and the figure.
        print_: where the per-target story goes (the console by default).

    Returns:
        The demo's summary, as written to summary.json (per target: the methods' Dice and coefficients).
    """
    progress = progress or Progress()
    folder = fresh_folder(out)
    output = OutputFolder(folder, overwrite)
    targets = bundled_targets()
    models = [bundled_models("dropgen"), bundled_models("heterogeneous")]
    progress.plan([(t.name, 1) for t in targets] + [("figure", 0.1)])
    summary: dict = {"models": [str(m) for m in models], "targets": {}}
    figure_rows = []
    started = time.perf_counter()
    try:
        for target in targets:
            progress.stage(target.name, f"target {target.name}")
            options = RunOptions(volume=target.image, models=models, reference=target.labels, device=device)
            case = load_case(options.input_settings(), options.inference_overrides(), progress=Progress())
            comparison = compare_methods(case, options.merge_settings(), options.probe_patches,
                                         progress=_StageProgress(progress))
            print_(_report(target.name, case, comparison, options.statistic))
            for result in comparison.results:
                stem = safe_file_stem(result.key.replace("site:", "site_"))
                key = f"{target.name}/{output_key('segmentation', stem)}"  # also the file's name
                output.volume(key, key, result.segmentation.labels, case.volume.geometry)
                if result.key in ("adaptive", "mean") or result.key.startswith("site:"):
                    key = f"{target.name}/{output_key('entropy', stem)}"
                    output.volume(key, key, result.segmentation.entropy, case.volume.geometry)
            summary["targets"][target.name] = dict(comparison_summary(comparison), volume=str(target.image), reference=str(target.labels))
            figure_rows.append((target.name, case, comparison))
        progress.stage("figure", "drawing the figure")
        figure_path = output.staging / "demo.png"
        demo_figure(figure_rows, figure_path)
        output.files["figure"] = "demo.png"
        summary["seconds"] = round(time.perf_counter() - started, 1)
        outputs = output.commit(summary)
    except BaseException:
        output.abort()
        raise
    progress.done(outputs)
    print_(f"\nresults in {folder}/ : per-target segmentations and entropy maps, summary.json, demo.png")
    return summary


class _StageProgress(Progress):
    """Forwards a sub-task's fraction to the current stage of the demo's progress."""

    def __init__(self, parent: Progress):
        super().__init__()
        self.parent = parent

    def update(self, stage_fraction: float, message: str = "") -> None:
        self.parent.update(stage_fraction, message)


def _report(name: str, case: Case, comparison: Comparison, statistic: str) -> str:
    adaptive = comparison.get("adaptive")
    models = [m.name for m in case.models]
    stats = {key: [values[m] for m in models] for key, values in comparison.statistics.items()}
    lines = [
        "",
        f"=== target {name}: {case.volume.geometry.describe()}",
        comparison_table(comparison, case),
        "",
        "merge coefficients (adaptive):  " + "  ".join(
            f"{model}: body {adaptive.coefficients['body'][model]:.3f} / "
            f"head {adaptive.coefficients.get('head', adaptive.coefficients['body'])[model]:.3f}"
            for model in adaptive.coefficients["body"]),
        f"probe score s_k ({statistic}):  " + "  ".join(f"{m}: {v:.3f}" for m, v in zip(models, site_scores(stats, statistic))),
        "times: as if each method ran alone (shared reading and features excluded; the ensemble runs all models).",
        _story(comparison, statistic),
    ]
    return "\n".join(lines)


def _story(comparison: Comparison, statistic: str) -> str:
    """One paragraph: what the mean merge does with the least trusted site, and what the adaptive merge does."""
    mean, adaptive = comparison.get("mean"), comparison.get("adaptive")
    alpha = adaptive.coefficients["body"]
    beta = adaptive.coefficients.get("head", alpha)
    least = min(alpha, key=alpha.get)
    stats = comparison.statistics
    fraction = stats["foreground_fraction"]
    others = [v for m, v in fraction.items() if m != least]
    certain = min(stats["foreground_entropy"], key=stats["foreground_entropy"].get)
    return (f"story: the mean merge gives every site 1/{len(alpha)} and reaches Dice {mean.mean_dice:.3f}; the adaptive merge "
            f"({statistic}) gives {least} alpha {alpha[least]:.3f} / beta {beta[least]:.3f} and reaches Dice {adaptive.mean_dice:.3f} "
            f"({adaptive.mean_dice - mean.mean_dice:+.3f}). {least} calls {100 * fraction[least]:.1f} % of the probe foreground "
            f"(the others {100 * min(others):.1f}-{100 * max(others):.1f} %); by foreground entropy alone the most certain site is {certain}.")


def demo_figure(rows, path: Path) -> Path:
    """Per target: the scan, ground truth, mean-merge and adaptive-merge overlays, and the adaptive
    merge's entropy over the dimmed scan, on the axial slice where the two merges differ most.

    Args:
        rows: (target name, case, comparison) per target.
        path: the PNG file to write.

    Returns:
        ``path``.
    """
    columns = ["target", "ground truth", "mean merge", "entropy-adaptive merge", "adaptive: entropy"]
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(3.2 * len(columns), 3.6 * len(rows) + 0.8), squeeze=False,
                                layout="constrained")
    for row, (name, case, comparison) in zip(axes, rows):
        geometry = case.volume.geometry
        image = canonical(case.volume.array.astype(np.float32), geometry)
        truth = canonical(case.reference.array, geometry)
        mean, adaptive = comparison.get("mean"), comparison.get("adaptive")
        mean_labels, adaptive_labels = canonical(mean.segmentation.labels, geometry), canonical(adaptive.segmentation.labels, geometry)
        index = most_different_slice(mean_labels, adaptive_labels, truth)
        window = intensity_window(image.array)
        labels = case.labels
        panels = [
            (None, "target"),
            (truth, "ground truth"),
            (mean_labels, f"mean merge\nDice {mean.mean_dice:.2f} (whole volume)"),
            (adaptive_labels, f"adaptive merge\nDice {adaptive.mean_dice:.2f} (whole volume)"),
        ]
        for axes_, (overlay, title) in zip(row, panels):
            show_image(axes_, image, "axial", index, window)
            if overlay is not None:
                show_labels(axes_, overlay, "axial", index, labels)
            axes_.set_title(title, fontsize=10)
        row[0].set_ylabel(name, fontsize=11)
        entropy = canonical(adaptive.segmentation.entropy, geometry)
        plane, aspect = entropy.slice("axial", index)
        show_image(row[4], image, "axial", index, window, brightness=0.35)
        shown = row[4].imshow(np.ma.masked_less(plane, 0.02), cmap=ENTROPY_COLORMAP, origin="lower", aspect=aspect, vmin=0, vmax=1,
                              alpha=0.85, interpolation="nearest")
        row[4].set_title("adaptive merge: entropy\nover the dimmed scan", fontsize=10)
        bar = figure.colorbar(shown, ax=row[4], fraction=0.046, pad=0.04)
        bar.set_label(ENTROPY_LABEL, fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=label.rgb) for label in rows[0][1].labels[1:]]
    figure.legend(handles, [label.name for label in rows[0][1].labels[1:]], loc="outside lower center", ncol=len(handles), frameon=False)
    figure.suptitle("Unseen-site targets: the mean merge vs the entropy-adaptive merge, on the axial slice where they differ most "
                    "(radiological view; Dice over the whole volume)", fontsize=11)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
