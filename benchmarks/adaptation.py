"""Test-time adaptation of the entropy-adaptive merge on the bundled sample targets: TENT vs DSBR.

For each target, Dice and foreground fraction of the merged model after 0 and after N steps of
TENT and of DSBR (N = 5, 20, 50 by default), at one or more learning rates. The guard watches but
does not restore here, so the table shows where each loss drives the model; the guard column says
at which step (and by which rule) it would have restored the merged weights, and the last column
is the Dice that ``entropymerge run --adapt METHOD --adapt-steps N`` gives with the guard on:

    python benchmarks/adaptation.py [--steps 5 20 50] [--lr 0.001 0.01] [--device auto] [--markdown FILE]

Foreground fractions: of the full-volume segmentation on the input grid (the reference's in
brackets) and of the probe, relative to the merged model's before adaptation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tables import publish

from entropymerge.adaptation import AdaptationSettings, adapt
from entropymerge.merging import probe_batch_size
from entropymerge.pipeline import RunOptions, Timings, load_case, plan_merge
from entropymerge.progress import Progress
from entropymerge.sampledata import bundled_models, bundled_targets

METHODS = ("tent", "dsbr")


def outcome(case, network) -> tuple[float, float]:
    """Mean Dice against the reference and the foreground fraction of the full-volume segmentation."""
    labels = case.segment(case.probabilities(network)).labels
    return case.evaluate(labels)["mean_dice"], float((labels != 0).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--lr", type=float, nargs="+", default=[AdaptationSettings.learning_rate])
    parser.add_argument("--models", type=Path, help="site models (default: the bundled DropGen models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    models = args.models or bundled_models("dropgen")
    started = time.perf_counter()
    lines = [
        f"Site models: {args.models or 'the bundled DropGen models'}. "
        f"Targets: the bundled sample targets ({', '.join(t.name for t in bundled_targets())}). "
        f"Start: the entropy-adaptive merge (default settings) and its probe (8 patches). Adam on the normalisation "
        f"affines, seed {args.seed}. fg = foreground fraction of the full-volume segmentation (reference in brackets); "
        "probe fg = foreground fraction on the probe relative to its start.",
        "",
        "| target | method | lr | steps | mean Dice | fg | probe fg | guard (would restore at) | Dice with guard |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for target in bundled_targets():
        options = RunOptions(volume=target.image, models=[models], reference=target.labels, device=args.device, seed=args.seed)
        case = load_case(options, Progress(), Timings())
        plan, probe_run = plan_merge(case, options, Progress(), Timings())
        merged = plan.network(case.models)
        names = [label.name for label in case.labels]
        batch = probe_batch_size(probe_run.probe, case.settings.roi_size)
        reference_fg = float((case.reference.array != 0).mean())
        start_dice, start_fg = outcome(case, merged)
        lines.append(f"| {target.name} | merged | - | 0 | {start_dice:.3f} | {start_fg:.4f} ({reference_fg:.4f}) | 1.00 | - | {start_dice:.3f} |")
        print(lines[-1], file=sys.stderr)
        for method in METHODS:
            for lr in args.lr:
                for steps in args.steps:
                    settings = AdaptationSettings(method, steps, lr, args.seed, restore_on_collapse=False)
                    network, result = adapt(merged, probe_run.probe, settings, case.device, batch, names)
                    dice, fg = outcome(case, network)
                    probe_fg = (1 - result.proportions[-1][0]) / (1 - result.proportions[0][0])
                    guard = "-" if result.guard is None else f"step {result.guard['step']}: {result.guard['rule'].replace('_', ' ')}"
                    guarded = start_dice if result.guard is not None else dice
                    lines.append(f"| {target.name} | {method.upper()} | {lr:g} | {steps} | {dice:.3f} | {fg:.4f} ({reference_fg:.4f}) "
                                 f"| {probe_fg:.2f} | {guard} | {guarded:.3f} |")
                    print(lines[-1], file=sys.stderr)
    lines += ["", f"Device: {case.device}. Wall time {time.perf_counter() - started:.0f} s."]
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
