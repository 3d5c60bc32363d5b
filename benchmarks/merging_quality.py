"""Merge quality on fresh targets from unseen sites: mean +- sd Dice per method, DropGen vs image-only.

Targets are simulated with test seeds (>= 900000, never used for training) for each unseen site;
every method runs on the same targets in the same process:

    python benchmarks/merging_quality.py [--per-site 4] [--sites lowfield-t1 cbct t2-fatsat] [--markdown FILE]

Defaults use the bundled sample site models (DropGen and image-only).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tables import publish

from entropymerge.evaluation import compare_methods
from entropymerge.merging import STATISTICS, AdaptiveSettings
from entropymerge.pipeline import RunOptions, Timings, load_case
from entropymerge.progress import Progress
from entropymerge.sampledata import TARGET_SITES, bundled_models, write_case
from entropymerge.training import case_seed

METHOD_ORDER = ["oracle", "adaptive", "adaptive-coupled", "mean", "ensemble", "select"]


def parse_variant(text: str) -> tuple[str, AdaptiveSettings]:
    """``statistic:temperature`` (e.g. ``consensus:0.03``) -> an adaptive variant."""
    statistic, _, temperature = text.partition(":")
    if statistic not in STATISTICS:
        raise SystemExit(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
    settings = AdaptiveSettings(statistic=statistic, temperature=float(temperature or 0.05), head_temperature=float(temperature or 0.05))
    return text, settings


def evaluate_model_set(models: Path, targets, settings: AdaptiveSettings, variants: dict, probe_patches: int, device: str, log) -> dict:
    """{method key: {target name: mean Dice}} for one set of site models."""
    dice: dict[str, dict[str, float]] = defaultdict(dict)
    for name, image, labels in targets:
        options = RunOptions(volume=image, models=[models], reference=labels, device=device, statistic=settings.statistic,
                             temperature=settings.temperature, head_temperature=settings.head_temperature)
        case = load_case(options, Progress(), Timings())
        comparison = compare_methods(case, settings, probe_patches=probe_patches, variants=variants)
        for result in comparison.results:
            key = "site models (mean of singles)" if result.key.startswith("site:") else result.key
            if key.startswith("site models"):
                dice[key].setdefault(name, [])
                dice[key][name].append(result.mean_dice)
            else:
                dice[key][name] = result.mean_dice
        log(f"  {name}: " + ", ".join(f"{k} {dice[k][name]:.3f}" for k in ("oracle", "adaptive", "mean", "ensemble")))
    dice["site models (mean of singles)"] = {n: float(np.mean(v)) for n, v in dice["site models (mean of singles)"].items()}
    return dice


def summarise(values: dict[str, float], names: list[str]) -> str:
    numbers = np.array([values[n] for n in names])
    return f"{numbers.mean():.3f} ± {numbers.std(ddof=1) if len(numbers) > 1 else 0.0:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", nargs="+", default=list(TARGET_SITES))
    parser.add_argument("--per-site", type=int, default=4, help="targets per unseen site")
    parser.add_argument("--dropgen", type=Path, help="DropGen site models (default: bundled)")
    parser.add_argument("--image-only", type=Path, help="image-only site models (default: bundled)")
    parser.add_argument("--statistic", default="foreground_entropy", choices=STATISTICS)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--variant", action="append", default=[], help="extra adaptive variant statistic:temperature; repeat")
    parser.add_argument("--probe-patches", type=int, default=8, help="probe patches per target (default 8, as entropymerge run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    settings = AdaptiveSettings(statistic=args.statistic, temperature=args.temperature, head_temperature=args.temperature)
    variants = dict(parse_variant(v) for v in args.variant)
    model_sets = {"DropGen (image + MIND-SSC)": args.dropgen or bundled_models("dropgen"),
                  "image-only": args.image_only or bundled_models("image-only")}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        targets = []
        for site in args.sites:
            for index in range(args.per_site):
                seed = case_seed(site, index, "test")
                image, labels = write_case(TARGET_SITES[site], seed, Path(folder))
                targets.append((f"{site}#{seed}", image, labels))
        results = {}
        for label, models in model_sets.items():
            print(f"{label}: {models}", file=sys.stderr)
            results[label] = evaluate_model_set(models, targets, settings, variants, args.probe_patches, args.device,
                                                lambda m: print(m, file=sys.stderr))
    names = [t[0] for t in targets]
    methods = ["site models (mean of singles)", *METHOD_ORDER, *(f"adaptive:{v}" for v in variants)]
    lines = [
        f"{len(targets)} targets: {args.per_site} per unseen site ({', '.join(args.sites)}), test seeds "
        f"{', '.join(str(case_seed(s, 0, 'test')) + '..' + str(case_seed(s, args.per_site - 1, 'test')) for s in args.sites)}. "
        f"Adaptive: statistic {args.statistic}, temperature {args.temperature}, {args.probe_patches} probe patches. "
        "Mean Dice over the three structures, mean ± sd over targets.",
        "",
        "| method | " + " | ".join(model_sets) + " |",
        "| --- | " + " | ".join("---" for _ in model_sets) + " |",
    ]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(summarise(results[s][method], names) for s in model_sets) + " |")
    lines += ["", "Per unseen site (DropGen models):", "", "| method | " + " | ".join(args.sites) + " |",
              "| --- | " + " | ".join("---" for _ in args.sites) + " |"]
    first = next(iter(model_sets))
    for method in methods:
        cells = [summarise(results[first][method], [n for n in names if n.startswith(site + "#")]) for site in args.sites]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    adaptive, mean = (np.array([results[first][m][n] for n in names]) for m in ("adaptive", "mean"))
    lines += ["", f"adaptive - mean merge (DropGen): {np.mean(adaptive - mean):+.3f} mean Dice; adaptive >= mean on "
              f"{int((adaptive >= mean - 1e-9).sum())} of {len(names)} targets. Wall time {time.perf_counter() - started:.0f} s."]
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
