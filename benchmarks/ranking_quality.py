"""How well the training-free scores rank a varied pool of models against their true Dice on each target.

Pool: the bundled DropGen site models, the bundled image-only site models, and under-trained
DropGen checkpoints (a short training run made here and cached). Targets: fresh scans from the
unseen sites (test seeds). For every target and label source (reference, scribbles, pseudo-label),
the weighted Kendall tau of each score column against the true Dice ranking:

    python benchmarks/ranking_quality.py [--per-site 3] [--markdown FILE]

Scribbles follow `sampledata.simulate_scribbles` (3 strokes of 12 mm per class, background within
15 mm of the structures, seed = the target's seed). Pseudo-labels are the adaptive merge of the
DropGen site models.
"""

from __future__ import annotations

import argparse
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
from entropymerge.merging import AdaptiveSettings, adaptive_plan, crop_patches, probe_batch_size, probe_probabilities, select_probe
from entropymerge.metrics import evaluate
from entropymerge.models import load_site_models
from entropymerge.pipeline import default_probe_size
from entropymerge.preprocessing import labels_to_model_space, to_model_space
from entropymerge.ranking import LabelSource, crop_probe_labels, rank_models, score_taus
from entropymerge.sampledata import TARGET_SITES, bundled_models, simulate, simulate_scribbles
from entropymerge.training import TrainingConfig, case_seed, train_site_models
from entropymerge.volume import Volume

CACHE = Path(__file__).resolve().parent / ".cache"
COLUMNS = ["fused", "grtd", "lbtc", "logme", "entropy (lower better)"]
ROW_KEYS = {"entropy (lower better)": "entropy"}
# Parts of the pool ranked on their own (the whole pool is the first table): models that take the same
# inputs, the merged site models, the image-only models.
SUBPOOLS = {"DropGen + under-trained (same inputs)": ("dropgen/", "undertrained/"),
            "DropGen site models": ("dropgen/",), "image-only site models": ("image-only/",), "DropGen + image-only": ("dropgen/", "image-only/")}


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


def evaluate_target(pool, merge_set, image: Volume, labels: Volume, seed: int, device) -> dict:
    card = pool[0].card
    space = to_model_space(image, card.preprocessing)
    inputs_by_spec = {}
    for model in pool:
        spec = model.card.features
        if spec not in inputs_by_spec:
            inputs_by_spec[spec] = model_inputs(space.tensor.as_tensor(), spec).inputs
    inputs = [inputs_by_spec[m.card.features] for m in pool]
    probe = select_probe(inputs[0], default_probe_size(card.inference.roi_size), 8)

    true_dice = []
    for model, model_input in zip(pool, inputs):
        logits = predict_logits(model.network, model_input, model.card.inference, device)
        segmentation = segmentation_from_probabilities(torch.softmax(logits[0], 0), space)
        true_dice.append(evaluate(segmentation.labels, labels.array, card.labels, image.geometry.spacing)["mean_dice"] or 0.0)

    outputs = [probe_probabilities(m.network, replace(probe, patches=crop(x, probe)), device, probe_batch_size(probe, card.inference.roi_size))
               for m, x in zip(pool, inputs)]
    entropy = probe_statistics(outputs)["foreground_entropy"]

    merge_models = [pool[i] for i in merge_set]
    merge_outputs = [outputs[i] for i in merge_set]
    plan = adaptive_plan(merge_models, probe, merge_outputs, AdaptiveSettings(), device)
    merged = torch.softmax(predict_logits(plan.network(merge_models), inputs[merge_set[0]], card.inference, device)[0], 0)
    scribbles = simulate_scribbles(labels, seed)
    scribble_values = np.where(scribbles.array == 255, -1, scribbles.array).astype(np.int64)
    sources = {
        "reference": LabelSource("reference", labels_to_model_space(labels, space).numpy(), "reference"),
        "scribbles": LabelSource("scribbles", labels_to_model_space(Volume(scribble_values, labels.geometry), space).numpy(), "scribbles"),
        "pseudo-label": LabelSource("pseudo-label", predicted_labels(merged, dim=0).numpy().astype(np.int64), "merged prediction"),
    }
    result = {"true_dice": dict(zip((m.name for m in pool), true_dice)), "sources": {}}
    for name, source in sources.items():
        start = time.perf_counter()
        ranking = rank_models(pool, inputs, probe, source, device, entropy=entropy, true_dice=true_dice, seed=seed)
        result["sources"][name] = {"tau": ranking.kendall_tau, "seconds": time.perf_counter() - start, "rows": ranking.rows,
                                   "labelled_in_probe": int((crop_probe_labels(source.labels, probe) >= 0).sum())}
    return result


def crop(inputs, probe):
    return crop_patches(inputs, probe.origins, probe.patches.shape[2:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", nargs="+", default=list(TARGET_SITES))
    parser.add_argument("--per-site", type=int, default=3)
    parser.add_argument("--dropgen", type=Path)
    parser.add_argument("--image-only", type=Path)
    parser.add_argument("--undertrained", type=Path, help="folder of under-trained models (default: trained once into benchmarks/.cache)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path, help="also write every target's scores and true Dice here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pool = load_pool(args.dropgen or bundled_models("dropgen"), args.image_only or bundled_models("image-only"),
                     args.undertrained or undertrained_models(CACHE / "undertrained"))
    merge_set = [i for i, m in enumerate(pool) if m.name.startswith("dropgen/")]
    started = time.perf_counter()
    results = {}
    for site in args.sites:
        for index in range(args.per_site):
            seed = case_seed(site, index, "test")
            image, labels = simulate(TARGET_SITES[site], seed)
            results[f"{site}#{seed}"] = evaluate_target(pool, merge_set, image, labels, seed, device)
            taus = results[f"{site}#{seed}"]["sources"]["reference"]["tau"]
            print(f"{site}#{seed}: reference tau fused {taus['fused']:+.3f} logme {taus['logme']:+.3f}", file=sys.stderr)

    lines = [f"Pool of {len(pool)} models ({', '.join(m.name for m in pool)}); {len(results)} targets from "
             f"{', '.join(args.sites)} (test seeds, {args.per_site} per site). Weighted Kendall tau (hyperbolic weights on the "
             "true rank) of each score against the true Dice ranking; mean ± sd over targets.", "",
             "| label source | " + " | ".join(COLUMNS) + " | ranking time (s) |",
             "| --- | " + " | ".join("---" for _ in COLUMNS) + " | --- |"]
    for source in ("reference", "scribbles", "pseudo-label"):
        cells = []
        for column in COLUMNS:
            values = np.array([r["sources"][source]["tau"][column] for r in results.values()])
            cells.append(f"{values.mean():+.3f} ± {values.std(ddof=1):.3f}")
        seconds = np.mean([r["sources"][source]["seconds"] for r in results.values()])
        lines.append(f"| {source} | " + " | ".join(cells) + f" | {seconds:.1f} |")
    lines += ["", "The same scores on parts of the pool (reference labels; mean tau over targets):", "",
              "| models ranked | " + " | ".join(COLUMNS) + " |", "| --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    for title, prefixes in SUBPOOLS.items():
        taus = [score_taus([row for row in r["sources"]["reference"]["rows"] if row["model"].startswith(prefixes)])
                for r in results.values()]
        lines.append(f"| {title} | " + " | ".join(f"{np.mean([t[c] for t in taus]):+.3f}" for c in COLUMNS) + " |")
    lines += ["", "Mean over targets of each model's true Dice and scores (reference labels):", "",
              "| model | true Dice | " + " | ".join(COLUMNS) + " |", "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    for model in pool:
        rows = [next(row for row in r["sources"]["reference"]["rows"] if row["model"] == model.name) for r in results.values()]
        cells = [np.mean([row[ROW_KEYS.get(c, c)] for row in rows]) for c in ("true_dice", *COLUMNS)]
        lines.append(f"| {model.name} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s on {device}."]
    publish(lines, args.markdown)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
