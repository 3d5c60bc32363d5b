"""Test-time adaptation of the entropy-adaptive merge: none vs TENT vs DSBR (with and without the
reliable-voxel filter), each with and without the guard, for DropGen and image-only site models.

Targets: the bundled sample targets (unseen sites: strong shifts) and mild shifts of one scan from a
source site (riverside-t1, test seed): more blur, more noise, lower contrast, a stronger bias
field, all of the same subject. Each adaptation runs once with the guard watching but not
restoring: the unguarded Dice is that run's, the guarded Dice is the merge's own when the guard
fired (what ``entropymerge run --adapt`` gives) and the run's otherwise:

    python benchmarks/adaptation.py [--steps 10] [--lr 0.001] [--probe-patches 4] [--reliable 0.4] [--prior 100]
                                    [--model-sets dropgen image-only] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tables import publish

from entropymerge.adaptation import adapt
from entropymerge.case import load_case
from entropymerge.probe import probe_batch_size
from entropymerge.progress import Progress
from entropymerge.sampledata import SOURCE_SITES, bundled_models, bundled_targets, write_case
from entropymerge.settings import AdaptationSettings, RunOptions
from entropymerge.stages import plan_merge
from entropymerge.training import case_seed

SHIFT_SITE = "riverside-t1"


def low_contrast(scanner):
    """Tissue intensities pulled halfway towards the body's, with the noise kept at its absolute level."""
    body = scanner.contrast["body"]
    return replace(scanner, contrast={t: body + 0.5 * (v - body) for t, v in scanner.contrast.items()},
                   noise_level=2 * scanner.noise_level)


SHIFTS = {
    "blur": lambda s: replace(s, psf_mm=2.5),
    "noise": lambda s: replace(s, noise_level=3 * s.noise_level),
    "low-contrast": low_contrast,
    "bias-field": lambda s: replace(s, bias=0.8),
}


def shifted_targets(folder: Path, seed: int) -> list[tuple[str, Path, Path]]:
    """One source-site scan under each mild shift (the same subject and seed): (name, image, labels)."""
    targets = []
    for name, shift in SHIFTS.items():
        image, labels = write_case(shift(SOURCE_SITES[SHIFT_SITE]), seed, folder, f"{SHIFT_SITE}-{name}")
        targets.append((f"{SHIFT_SITE} {name}", image, labels))
    return targets


def mean_dice(case, network) -> float:
    return case.evaluate(case.segment(case.probabilities(network)).labels)["mean_dice"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=AdaptationSettings.steps)
    parser.add_argument("--lr", type=float, default=AdaptationSettings.learning_rate)
    parser.add_argument("--probe-patches", type=int, default=4, help="probe patches (the run's default is 8; 4 halves the cost)")
    parser.add_argument("--reliable", type=float, default=0.4, help="threshold of the reliable-voxel filter (fraction of log C)")
    parser.add_argument("--prior", type=float, default=0.0,
                        help="also DSBR with the class-proportion term at this weight (0: not run)")
    parser.add_argument("--model-sets", nargs="+", default=["dropgen", "image-only"])
    parser.add_argument("--only-shifts", action="store_true", help="skip the bundled targets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    adaptations = [("TENT", AdaptationSettings("tent", args.steps, args.lr, args.seed, restore_on_collapse=False)),
                   ("DSBR", AdaptationSettings("dsbr", args.steps, args.lr, args.seed, restore_on_collapse=False)),
                   (f"DSBR+filter {args.reliable:g}", AdaptationSettings("dsbr", args.steps, args.lr, args.seed,
                                                                          restore_on_collapse=False, reliable_below=args.reliable))]
    if args.prior:
        adaptations.append((f"DSBR+prior {args.prior:g}", AdaptationSettings("dsbr", args.steps, args.lr, args.seed,
                                                                               restore_on_collapse=False, prior_weight=args.prior)))
    shift_seed = case_seed(SHIFT_SITE, 0, "test")
    started = time.perf_counter()
    header = "| models | target | none | " + " | ".join(f"{name} | {name} guarded" for name, _ in adaptations) + " |"
    lines = [
        f"Site models: the bundled {' and '.join(args.model_sets)} models. Targets: "
        + ("" if args.only_shifts else f"the bundled sample targets ({', '.join(t.name for t in bundled_targets())}) and ")
        + f"one {SHIFT_SITE} scan (test seed {shift_seed}) under each mild shift ({', '.join(SHIFTS)}). "
        f"Start: the entropy-adaptive merge (default settings) on a probe of {args.probe_patches} patches. "
        f"Adam on the normalisation affines, {args.steps} steps, lr {args.lr:g}, seed {args.seed}. Mean Dice over the "
        "three structures; (Nx): the probe's foreground fraction after the last step relative to its start; "
        "'guarded' is what `run --adapt` gives (r@N: the guard restored the merge at step N).",
        "",
        header,
        "| --- " * (header.count("|") - 1) + "|",
    ]
    totals: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        targets = [] if args.only_shifts else [(t.name, t.image, t.labels) for t in bundled_targets()]
        targets += shifted_targets(Path(folder), shift_seed)
        for model_set in args.model_sets:
            for name, image, labels in targets:
                options = RunOptions(volume=image, models=[bundled_models(model_set)], reference=labels, device=args.device,
                                     seed=args.seed, probe_patches=args.probe_patches)
                case = load_case(options.input_settings(), options.inference_overrides(), progress=Progress())
                plan, probe_run = plan_merge(case, options.merge_settings(), options.probe_settings(), progress=Progress())
                merged = plan.network(case.models)
                batch = probe_batch_size(probe_run.probe, case.settings.roi_size)
                start = mean_dice(case, merged)
                cells = [f"{start:.3f}"]
                totals.setdefault(f"{model_set}|none", []).append(start)
                for label, settings in adaptations:
                    network, result = adapt(merged, probe_run.probe, settings, case.device, batch,
                                            [label.name for label in case.labels])
                    dice = mean_dice(case, network)
                    guarded = start if result.guard is not None else dice
                    totals.setdefault(f"{model_set}|{label}", []).append(dice)
                    totals.setdefault(f"{model_set}|{label} guarded", []).append(guarded)
                    growth = (1 - result.proportions[-1][0]) / (1 - result.proportions[0][0])
                    cells += [f"{dice:.3f} ({growth:.2f}x)", f"{guarded:.3f}" + (f" (r@{result.guard['step']})" if result.guard else "")]
                lines.append(f"| {model_set} | {name} | " + " | ".join(cells) + " |")
                print(lines[-1], file=sys.stderr, flush=True)
    columns = ["none"] + [f"{label}{suffix}" for label, _ in adaptations for suffix in ("", " guarded")]
    lines += ["", "| models | " + " | ".join(f"mean {c}" for c in columns) + " |", "| --- " * (len(columns) + 1) + "|"]
    for model_set in args.model_sets:
        lines.append(f"| {model_set} | " + " | ".join(f"{np.mean(totals[f'{model_set}|{c}']):.3f}" for c in columns) + " |")
    lines.append("")
    for model_set in args.model_sets:
        none = np.asarray(totals[f"{model_set}|none"])
        for label, _ in adaptations:
            guarded = np.asarray(totals[f"{model_set}|{label} guarded"])
            lines.append(f"- {model_set}, {label} guarded - none: mean {np.mean(guarded - none):+.4f} Dice, "
                         f">= none on {int(np.sum(guarded >= none))} of {len(none)} targets, "
                         f"worst {np.min(guarded - none):+.4f}, best {np.max(guarded - none):+.4f}")
    lines += ["", f"Device: {case.device}. Wall time {time.perf_counter() - started:.0f} s."]
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
