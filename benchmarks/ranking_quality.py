"""How well each ranking answers its own question, checked against its own truth.

- As is ("which model can I trust on this case?"): the label-free score the merge computes (the
  default statistic of the adaptive merge) and plain entropy, and each model's accuracy / Dice on
  simulated scribbles, against each model's zero-shot Dice on the target.
- Transfer ("which model should we fine-tune?"): GRTD, LBTC, their fusion and LogME (labels: the
  reference, the scribbles or the merged prediction) against each model's Dice after a small
  fine-tuning on labelled cases of the target's site, measured on the held-out targets.

Pool: the bundled DropGen site models, the bundled image-only site models, and under-trained
DropGen checkpoints (a short training run made here and cached). Targets: fresh scans from the
unseen sites (test seeds). Fine-tuning: every model, on ``--finetune-cases`` scans of each target
site (train seeds), ``--finetune-steps`` Adam steps (cosine schedule, the model's own recipe: channel
dropout for DropGen models), cached under benchmarks/.cache/.

    python benchmarks/ranking_quality.py [--per-site 3] [--finetune-steps 30] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tables import publish

from entropymerge.entropy import predicted_labels, probe_statistics
from entropymerge.features import model_inputs
from entropymerge.inference import predict_logits, segmentation_from_probabilities
from entropymerge.merging import STATISTICS, adaptive_plan, site_scores
from entropymerge.metrics import evaluate
from entropymerge.models import load_site_models
from entropymerge.outputs import safe_file_stem
from entropymerge.preprocessing import labels_to_model_space, to_model_space
from entropymerge.probe import crop_patches, default_probe_size, probe_batch_size, probe_probabilities, select_probe
from entropymerge.ranking import LabelSource, rank_models
from entropymerge.sampledata import TARGET_SITES, bundled_models, simulate, simulate_scribbles
from entropymerge.settings import MergeSettings, RankingSettings
from entropymerge.training import TrainingConfig, case_seed, prepare_cases, train_site_models, train_stage
from entropymerge.transferability import fuse, weighted_taus
from entropymerge.volume import Volume

CACHE = Path(__file__).resolve().parent / ".cache"
SOURCES = ("reference", "scribbles", "pseudo-label")
AS_IS = {"uncertainty": "label-free: merge statistic", "entropy": "label-free: plain entropy",
         "scribble_dice": "scribbles: Dice", "scribble_accuracy": "scribbles: accuracy"}
TRANSFER = {"fused": "fused", "grtd": "GRTD (+mean δ)", "lbtc": "LBTC", "logme": "LogME",
            "fused_official_sign": "fused, GRTD −mean δ", "grtd_official_sign": "GRTD −mean δ"}
LOWER_BETTER = {"uncertainty", "entropy"}
# Parts of the pool ranked on their own (the mixed pool is the whole pool).
POOLS = {"mixed (all 10)": ("dropgen/", "image-only/", "undertrained/"), "DropGen": ("dropgen/",),
         "DropGen + under-trained": ("dropgen/", "undertrained/"), "image-only": ("image-only/",)}


def undertrained_models(folder: Path) -> Path:
    """Two DropGen site models trained for a few steps only (made once, then cached)."""
    config = TrainingConfig(base_steps=150, site_steps=30, base_cases=4, site_cases=2, validation_cases=1,
                            sites=("riverside-t1", "valley-t2"), seed=1)
    if not all((folder / f"{s}.json").exists() for s in config.sites):
        train_site_models(folder, config, log=lambda m: print(m, file=sys.stderr))
    return folder


def load_pool(dropgen: Path, image_only: Path, undertrained: Path):
    pool = []
    for prefix, folder in (("dropgen", dropgen), ("image-only", image_only), ("undertrained", undertrained)):
        for model in load_site_models([folder]):
            model.name = f"{prefix}/{model.name}"
            pool.append(model)
    return pool


def finetune(pool, site: str, cases: int, steps: int, learning_rate: float, folder: Path) -> list[torch.nn.Module]:
    """Each model fine-tuned on ``cases`` labelled scans of ``site`` for ``steps`` steps (checkpoints cached)."""
    prepared: dict = {}
    networks = []
    for model in pool:
        spec = model.card.features
        if spec not in prepared:
            prepared[spec] = prepare_cases(TARGET_SITES[site], [case_seed(site, i, "train") for i in range(cases)], model.card)
        config = TrainingConfig(features=spec.extractor if spec else "none", patch_size=32, batch_size=2, seed=0, checkpoint_every=steps)
        network = copy.deepcopy(model.network)
        checkpoint = folder / site / f"{safe_file_stem(model.name)}.pt"
        train_stage(network, prepared[spec], steps, learning_rate, config, f"finetune-{site}", checkpoint)
        networks.append(network.eval())
    return networks


def mean_dice(network, model_input, space, labels: Volume, card, image: Volume, device) -> float:
    logits = predict_logits(network, model_input, card.inference, device)
    segmentation = segmentation_from_probabilities(torch.softmax(logits[0], 0), space)
    return evaluate(segmentation.labels, labels.array, card.labels, image.geometry.spacing)["mean_dice"] or 0.0


def evaluate_target(pool, merge_set, finetuned, image: Volume, labels: Volume, seed: int, device) -> dict:
    card = pool[0].card
    space = to_model_space(image, card.preprocessing)
    inputs_by_spec = {}
    for model in pool:
        spec = model.card.features
        if spec not in inputs_by_spec:
            inputs_by_spec[spec] = model_inputs(space.tensor.as_tensor(), spec).inputs
    inputs = [inputs_by_spec[m.card.features] for m in pool]
    probe = select_probe(inputs[0], default_probe_size(card.inference.roi_size), 8)
    zero_shot = [mean_dice(m.network, x, space, labels, card, image, device) for m, x in zip(pool, inputs)]
    tuned = [mean_dice(n, x, space, labels, card, image, device) for n, x in zip(finetuned, inputs)]

    outputs = [probe_probabilities(m.network, replace(probe, patches=crop(x, probe)), device, probe_batch_size(probe, card.inference.roi_size))
               for m, x in zip(pool, inputs)]
    stats = probe_statistics(outputs)
    settings = MergeSettings()  # the label-free as-is score follows the merge's default statistic
    uncertainty = site_scores(stats, settings.statistic)

    merge_models = [pool[i] for i in merge_set]
    plan = adaptive_plan(merge_models, probe, [outputs[i] for i in merge_set], settings, device)
    merged = torch.softmax(predict_logits(plan.network(merge_models), inputs[merge_set[0]], card.inference, device)[0], 0)
    unlabelled = RankingSettings().unlabelled_value
    scribbles = simulate_scribbles(labels, seed, unlabelled=unlabelled)
    scribble_values = np.where(scribbles.array == unlabelled, -1, scribbles.array.astype(np.int64))  # int64 first: -1 does not fit uint8
    sources = {
        "reference": LabelSource("reference", labels_to_model_space(labels, space).numpy(), "reference"),
        "scribbles": LabelSource("scribbles", labels_to_model_space(Volume(scribble_values, labels.geometry), space).numpy(), "scribbles"),
        "pseudo-label": LabelSource("pseudo-label", predicted_labels(merged, dim=0).numpy().astype(np.int64), "merged prediction"),
    }
    names = [m.name for m in pool]
    result = {"zero_shot": zero_shot, "finetuned": tuned, "statistic": settings.statistic, "sources": {},
              "label_free": {statistic: site_scores(stats, statistic) for statistic in usable_statistics(stats)}}
    for name, source in sources.items():
        start = time.perf_counter()
        ranking = rank_models(pool, inputs, probe, source, device, uncertainty=uncertainty, statistic=settings.statistic,
                              entropy=stats["entropy"], true_dice=zero_shot, seed=seed)
        seconds = time.perf_counter() - start
        by_name = {row["model"]: row for row in ranking.rows}
        rows = [by_name[n] for n in names]  # pool order
        foreground = sum(1 for c in ranking.samples["per_class"] if int(c) > 0)
        official = fuse([-r["grtd"] for r in rows], [r["lbtc"] for r in rows], foreground)
        for row, value in zip(rows, official):
            row["fused_official_sign"], row["grtd_official_sign"] = float(value), -row["grtd"]
        result["sources"][name] = {"rows": rows, "seconds": seconds}
    return result


def usable_statistics(stats: dict) -> list[str]:
    """The merge statistics whose inputs ``stats`` holds: those that need an intensity fingerprint of the
    training data in every model card are left out (the benchmark's models carry none)."""
    return [name for name, statistic in STATISTICS.items() if all(key in stats for key in statistic.keys)]


def crop(inputs, probe):
    return crop_patches(inputs, probe.origins, probe.patches.shape[2:])


def defined_taus(values, truth) -> dict[str, float]:
    """Both tau variants; 0 where scipy's is undefined (a score equal for every model ranks nothing).
    TopoTE's variant counts such ties as concordant, so it gives +1 there."""
    return {k: (0.0 if np.isnan(v) else v) for k, v in weighted_taus(values, truth).items()}


def taus_of(rows, column: str, truth) -> dict[str, float]:
    return defined_taus([(-r[column] if column in LOWER_BETTER else r[column]) for r in rows], truth)


def top1(rows, column: str, truth) -> bool:
    """Whether the model this column puts first is a truly best one."""
    values = [(-r[column] if column in LOWER_BETTER else r[column]) for r in rows]
    return truth[int(np.argmax(values))] == max(truth)


def summarise(results: dict, pool_names: list[str], prefixes, column: str, source: str, truth_key: str) -> tuple[dict, float]:
    """Mean of both tau variants and the top-1 hit rate over targets, on the models whose names start with ``prefixes``."""
    keep = [i for i, name in enumerate(pool_names) if name.startswith(prefixes)]
    taus, hits = {"additive": [], "multiplicative": []}, []
    for result in results.values():
        rows = [result["sources"][source]["rows"][i] for i in keep]
        truth = [result[truth_key][i] for i in keep]
        for variant, value in taus_of(rows, column, truth).items():
            taus[variant].append(value)
        hits.append(top1(rows, column, truth))
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0) for k, v in taus.items()}, float(np.mean(hits))


def cell(stat) -> str:
    return f"{stat[0]:+.3f} ± {stat[1]:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", nargs="+", default=list(TARGET_SITES))
    parser.add_argument("--per-site", type=int, default=3)
    parser.add_argument("--finetune-cases", type=int, default=2)
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a loaded machine)")
    parser.add_argument("--dropgen", type=Path)
    parser.add_argument("--image-only", type=Path)
    parser.add_argument("--undertrained", type=Path, help="folder of under-trained models (default: trained once into benchmarks/.cache)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path, help="also write every target's scores and Dice here")
    parser.add_argument("--from-json", type=Path, help="only write the tables of an earlier run's --json")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text(encoding="utf-8"))
        publish(tables(saved["targets"], saved["models"], args, "(from " + args.from_json.name + ")"), args.markdown)
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pool = load_pool(args.dropgen or bundled_models("dropgen"), args.image_only or bundled_models("image-only"),
                     args.undertrained or undertrained_models(CACHE / "undertrained"))
    names = [m.name for m in pool]
    merge_set = [i for i, name in enumerate(names) if name.startswith("dropgen/")]
    started = time.perf_counter()
    tuning = CACHE / f"finetune-{args.finetune_cases}cases-{args.finetune_steps}steps-lr{args.finetune_lr:g}"
    results = {}
    for site in args.sites:
        begin = time.perf_counter()
        finetuned = finetune(pool, site, args.finetune_cases, args.finetune_steps, args.finetune_lr, tuning)
        print(f"{site}: fine-tuned {len(pool)} models in {time.perf_counter() - begin:.0f} s", file=sys.stderr)
        for index in range(args.per_site):
            seed = case_seed(site, index, "test")
            image, labels = simulate(TARGET_SITES[site], seed)
            results[f"{site}#{seed}"] = evaluate_target(pool, merge_set, finetuned, image, labels, seed, device)
            print(f"{site}#{seed} done at {time.perf_counter() - started:.0f} s", file=sys.stderr)

    device_text = f"Wall time {time.perf_counter() - started:.0f} s on {device}, {args.threads} thread(s)."
    publish(tables(results, names, args, device_text), args.markdown)
    if args.json:
        args.json.write_text(json.dumps({"models": names, "targets": results}, indent=1, default=float) + "\n", encoding="utf-8")
    return 0


def tables(results: dict, names: list[str], args, footer: str) -> list[str]:
    """The Markdown tables of the per-target results."""
    statistic = next(iter(results.values()))["statistic"]
    lines = [f"Pool of {len(names)} models ({', '.join(names)}); {len(results)} targets from {', '.join(args.sites)} "
             f"(test seeds, {args.per_site} per site). Fine-tuning: each model on {args.finetune_cases} labelled scans of the "
             f"target's site (train seeds), {args.finetune_steps} Adam steps, lr {args.finetune_lr:g} (cosine), batch 2 of 32³ "
             f"patches, the model's own channel dropout; fine-tuned Dice measured on the same held-out targets. "
             f"Label-free as-is score: the adaptive merge's default statistic ({statistic}). Weighted Kendall τ (hyperbolic "
             "weights on the true rank; additive = scipy's weightedtau, multiplicative = TopoTE's Eq. 7); mean ± sd over targets; "
             "top-1 = share of targets whose first model is a truly best one.", "",
             "**As is**: score against each model's zero-shot Dice on the target.", "",
             "| pool | score | τ additive | τ multiplicative | top-1 |", "| --- | --- | --- | --- | --- |"]
    for pool_name, prefixes in POOLS.items():
        for column, title in AS_IS.items():
            source = "scribbles" if column.startswith("scribble") else "pseudo-label"
            taus, hits = summarise(results, names, prefixes, column, source, "zero_shot")
            lines.append(f"| {pool_name} | {title} | {cell(taus['additive'])} | {cell(taus['multiplicative'])} | {hits:.0%} |")
    lines += ["", f"Every label-free statistic the merge offers, as an as-is score (lower = trusted), mixed pool "
              f"(the default, {statistic}, is the 'merge statistic' row above):", "",
              "| statistic | τ additive | τ multiplicative | top-1 |", "| --- | --- | --- | --- |"]
    for candidate in STATISTICS:
        if any(candidate not in result["label_free"] for result in results.values()):
            print(f"note: statistic {candidate} skipped: its inputs ({', '.join(STATISTICS[candidate].keys)}) are missing "
                  "(the models' cards carry no intensity fingerprint)", file=sys.stderr)
            continue
        taus = {"additive": [], "multiplicative": []}
        hits = []
        for result in results.values():
            values = [-v for v in result["label_free"][candidate]]
            for variant, value in defined_taus(values, result["zero_shot"]).items():
                taus[variant].append(value)
            hits.append(result["zero_shot"][int(np.argmax(values))] == max(result["zero_shot"]))
        lines.append(f"| {candidate} | " + " | ".join(cell((np.mean(v), np.std(v, ddof=1) if len(v) > 1 else 0.0)) for v in taus.values())
                     + f" | {np.mean(hits):.0%} |")
    lines += ["", "**Transfer**: score against each model's Dice after fine-tuning on the target's site "
              "(and, for contrast, against its zero-shot Dice); mixed pool.", "",
              "| labels | score | τ add. vs fine-tuned | τ mult. vs fine-tuned | top-1 fine-tuned | τ add. vs zero-shot |",
              "| --- | --- | --- | --- | --- | --- |"]
    for source in SOURCES:
        for column, title in TRANSFER.items():
            taus, hits = summarise(results, names, POOLS["mixed (all 10)"], column, source, "finetuned")
            zero, _ = summarise(results, names, POOLS["mixed (all 10)"], column, source, "zero_shot")
            lines.append(f"| {source} | {title} | {cell(taus['additive'])} | {cell(taus['multiplicative'])} | {hits:.0%} | "
                         f"{cell(zero['additive'])} |")
    lines += ["", "Mean over targets of each model's Dice and scores (scores with reference labels; scribble Dice with scribbles):", "",
              "| model | zero-shot Dice | fine-tuned Dice | " + " | ".join(["merge statistic", "entropy", "scribble Dice", "fused", "GRTD",
                                                                         "LBTC", "LogME"]) + " |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, name in enumerate(names):
        values = [np.mean([r["zero_shot"][i] for r in results.values()]), np.mean([r["finetuned"][i] for r in results.values()])]
        for column, source in (("uncertainty", "reference"), ("entropy", "reference"), ("scribble_dice", "scribbles"), ("fused", "reference"),
                               ("grtd", "reference"), ("lbtc", "reference"), ("logme", "reference")):
            values.append(np.mean([r["sources"][source]["rows"][i][column] for r in results.values()]))
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    seconds = {source: np.mean([r["sources"][source]["seconds"] for r in results.values()]) for source in SOURCES}
    lines += ["", "Ranking time for the 10 models on one target (tapped probe passes, sampling, GRTD, LBTC, LogME), mean: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + f". {footer}"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
