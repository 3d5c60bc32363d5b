"""Merge quality per model pool: every method and every candidate statistic side by side, on fresh targets.

One table per pool; every method runs on the same targets in the same process:

- ``dropgen``: the four bundled DropGen site models (image + MIND-SSC);
- ``image-only``: the four bundled image-only site models (no stable features);
- ``mixed``: the DropGen models plus the bundled ``heterogeneous/northgate-t2``, a site model that
  finds (almost) no foreground on other sites' scans and is therefore the most certain: the
  demo's pool;
- ``contrast``: the real MONAI template bundle and two fine-tunes of it on other contrasts
  (``contrast_pool.py``); on every target at least one site is confidently wrong.

Statistics that need an intensity fingerprint in the model cards run only on pools whose cards have one.

Simulated targets use test seeds (>= 900000, never trained on) from ``--seed-index`` on; the
contrast pool's phantoms use seeds 5000 + ``--seed-index`` on (its fine-tunes train on 1000-3999):

    python benchmarks/merging_quality.py [--pools dropgen image-only mixed contrast] [--per-site 2] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from contrast_pool import TARGET_CONTRASTS, contrast_pool, write_target
from tables import publish

from entropymerge.case import load_case
from entropymerge.evaluation import compare_methods
from entropymerge.fingerprint import FINGERPRINT_KEY
from entropymerge.merging import STATISTICS
from entropymerge.models import load_site_models
from entropymerge.progress import Progress
from entropymerge.sampledata import TARGET_SITES, bundled_models, write_case
from entropymerge.settings import MergeSettings, RunOptions
from entropymerge.training import case_seed

METHOD_ORDER = ["oracle", "adaptive", "adaptive-coupled", "mean", "ensemble", "select"]
POOLS = ("dropgen", "image-only", "mixed", "contrast")


def pool_models(pool: str) -> list[Path]:
    if pool == "contrast":
        return [contrast_pool()]
    if pool == "mixed":
        return [bundled_models("dropgen"), bundled_models("heterogeneous")]
    return [bundled_models(pool)]


def pool_targets(pool: str, per_site: int, first_index: int, folder: Path) -> list[tuple[str, Path, Path]]:
    """(name, image, labels) of each target of a pool, written into ``folder``."""
    targets = []
    if pool == "contrast":
        for contrast in TARGET_CONTRASTS:
            for index in range(first_index, first_index + per_site):
                seed = 5000 + index
                targets.append((f"{contrast}#{seed}", *write_target(contrast, seed, folder)))
        return targets
    for site in TARGET_SITES:
        for index in range(first_index, first_index + per_site):
            seed = case_seed(site, index, "test")
            targets.append((f"{site}#{seed}", *write_case(TARGET_SITES[site], seed, folder)))
    return targets


def evaluate_pool(models: list[Path], targets, settings: MergeSettings, variants: dict, probe_patches: int, device: str, log) -> dict:
    """{method key: {target name: mean Dice}} for one pool."""
    dice: dict[str, dict[str, float]] = defaultdict(dict)
    singles: dict[str, list[float]] = defaultdict(list)
    for name, image, labels in targets:
        options = RunOptions(volume=image, models=models, reference=labels, device=device, statistic=settings.statistic,
                             temperature=settings.temperature, head_temperature=settings.head_temperature)
        case = load_case(options.input_settings(), options.inference_overrides(), progress=Progress())
        comparison = compare_methods(case, settings, probe_patches=probe_patches, variants=variants)
        for result in comparison.results:
            if result.key.startswith("site:"):
                singles[name].append(result.mean_dice or 0.0)
            else:
                dice[result.key][name] = result.mean_dice or 0.0
        log(f"  {name}: " + ", ".join(f"{k} {dice[k][name]:.3f}" for k in ("oracle", "adaptive", "mean", "ensemble")))
    dice["site models (mean of singles)"] = {n: float(np.mean(v)) for n, v in singles.items()}
    return dice


def pool_table(pool: str, dice: dict, names: list[str], methods: list[str], default: str) -> list[str]:
    """Mean +- sd over targets, the worst difference to the mean merge, and targets > 0.02 below it."""
    mean = np.array([dice["mean"][n] for n in names])
    lines = ["| method | mean Dice ± sd | − mean merge | worst target − mean merge | targets < mean − 0.02 |",
             "| --- | --- | --- | --- | --- |"]
    for method in methods:
        values = np.array([dice[method][n] for n in names])
        sd = values.std(ddof=1) if len(values) > 1 else 0.0
        marker = f"**{method}** (default: {default})" if method == "adaptive" else method
        lines.append(f"| {marker} | {values.mean():.3f} ± {sd:.3f} | {np.mean(values - mean):+.3f} | "
                     f"{np.min(values - mean):+.3f} | {int((values < mean - 0.02).sum())} of {len(names)} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", nargs="+", default=list(POOLS), choices=POOLS)
    parser.add_argument("--per-site", type=int, default=2, help="targets per unseen site (per target contrast in the contrast pool)")
    parser.add_argument("--seed-index", type=int, default=200, help="index of the first test seed of each site (fresh: 200)")
    parser.add_argument("--statistic", default=MergeSettings.statistic, choices=STATISTICS)
    parser.add_argument("--temperature", type=float, default=MergeSettings.temperature)
    parser.add_argument("--variant", action="append", default=None,
                        help="adaptive variant statistic:temperature; repeat (default: every other statistic at --temperature)")
    parser.add_argument("--probe-patches", type=int, default=8, help="probe patches per target (default 8, as entropymerge run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    settings = MergeSettings(statistic=args.statistic, temperature=args.temperature, head_temperature=args.temperature)
    texts = args.variant if args.variant is not None else [f"{s}:{args.temperature:g}" for s in STATISTICS if s != args.statistic]
    variants = {}
    for text in texts:
        statistic, _, temperature = text.partition(":")
        if statistic not in STATISTICS:
            raise SystemExit(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
        tau = float(temperature or args.temperature)
        variants[text] = MergeSettings(statistic=statistic, temperature=tau, head_temperature=tau)
    methods = ["site models (mean of singles)", *METHOD_ORDER, *(f"adaptive:{v}" for v in variants)]
    started = time.perf_counter()
    lines = [f"Adaptive (default): statistic {args.statistic}, temperature {args.temperature:g}, decoupled head, "
             f"{args.probe_patches} probe patches; variants `statistic:temperature` on the same probe. Mean Dice over "
             "the foreground classes per target; mean ± sd over targets."]
    for pool in args.pools:
        models = pool_models(pool)
        fingerprints = all(FINGERPRINT_KEY in m.card.training for m in load_site_models(models))
        pool_variants = {k: v for k, v in variants.items() if fingerprints or "fingerprint" not in v.statistic}
        pool_methods = [m for m in methods if not m.startswith("adaptive:") or m[len("adaptive:"):] in pool_variants]
        with tempfile.TemporaryDirectory() as folder:
            targets = pool_targets(pool, args.per_site, args.seed_index, Path(folder))
            print(f"pool {pool}: {', '.join(map(str, models))}", file=sys.stderr)
            dice = evaluate_pool(models, targets, settings, pool_variants, args.probe_patches, args.device, lambda m: print(m, file=sys.stderr))
        names = [t[0] for t in targets]
        adaptive, mean, ensemble, oracle = (np.mean([dice[m][n] for n in names]) for m in ("adaptive", "mean", "ensemble", "oracle"))
        lines += ["", f"### Pool `{pool}`", "", f"Models: {', '.join(str(m) for m in models)}. {len(names)} targets: "
                  f"{', '.join(names)}.", "", *pool_table(pool, dice, names, pool_methods, args.statistic), "",
                  f"adaptive − max(mean merge, ensemble) = {adaptive - max(mean, ensemble):+.3f}; adaptive − mean merge = "
                  f"{adaptive - mean:+.3f}; oracle − adaptive = {oracle - adaptive:+.3f}."]
        print("\n".join(lines[-8:]), file=sys.stderr)
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s."]
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
