"""Wall time of single-model inference, the entropy-adaptive merge, and the K-model ensemble, side by side.

All three run the full ``entropymerge run`` pipeline (read, preprocess, features, [probe + merge],
sliding-window inference, write) in one process on the same volume, with the stable features
already in the cache for all of them, and report the median of several repeats and the ratios:

    python benchmarks/merging_speed.py [--models DIR] [--size 128 128 96] [--repeats 3]

Targets (CPU): adaptive / single <= 1.3 and ensemble / adaptive >= 2.5.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from entropymerge.modelcard import FeatureSpec, InferenceSettings, ModelCard, Preprocessing, default_labels
from entropymerge.models import load_site_models, save_site_model
from entropymerge.pipeline import RunOptions, run
from entropymerge.progress import Progress
from entropymerge.safeconfig import build_network
from entropymerge.volume import Geometry, write_volume

NETWORK = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 13, "out_channels": 4, "channels": [8, 16, 32, 64],
           "strides": [2, 2, 2], "num_res_units": 2, "norm": ["instance", {"affine": True}]}


def make_models(folder: Path, count: int, spacing) -> list[Path]:
    """``count`` compatible models from one initialisation (weights perturbed as by fine-tuning)."""
    card = ModelCard(
        name="site", labels=default_labels(["background", "organ", "vessel", "lesion"]), input_channels=13,
        preprocessing=Preprocessing("RAS", tuple(spacing), ({"_target_": "ScaleIntensityRangePercentiles", "lower": 0.5,
                                                            "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True},)),
        inference=InferenceSettings((64, 64, 64), 0.25, 2), network=NETWORK, features=FeatureSpec("mind-ssc", "1", 12),
    )
    torch.manual_seed(0)
    base = build_network(NETWORK, "benchmark")
    paths = []
    for k in range(count):
        network = build_network(NETWORK, "benchmark")
        network.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(0.02 * torch.randn_like(parameter))
        paths.append(save_site_model(network, replace(card, name=f"site{k}"), folder, f"site{k}"))
    return paths


def make_volume(path: Path, size, spacing) -> Path:
    geometry = Geometry(tuple(size), tuple(spacing), (0.0, 0.0, 0.0), ((-1, 0, 0), (0, -1, 0), (0, 0, 1)))
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in size], indexing="ij"))
    body = ((grid ** 2).sum(0) < 0.8).astype(np.float32)
    image = 200 * body + 300 * (((grid[0] - 0.2) ** 2 + grid[1] ** 2 + grid[2] ** 2) < 0.1)
    image += np.random.default_rng(0).normal(0, 20, size)
    return write_volume(image.astype(np.float32), geometry, path)


def timed_run(options: RunOptions) -> float:
    start = time.perf_counter()
    run(options, Progress())
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="folder of K compatible site models (default: generated)")
    parser.add_argument("--count", type=int, default=4, help="K when models are generated")
    parser.add_argument("--size", type=int, nargs=3, default=[128, 128, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        spacing = (1.5, 1.5, 1.5)
        model_paths = [args.models] if args.models else make_models(folder / "models", args.count, spacing)
        models = load_site_models(model_paths)
        if args.models:
            spacing = models[0].card.preprocessing.spacing or spacing
        volume = make_volume(folder / "volume.nii.gz", args.size, spacing)
        common = dict(volume=volume, models=model_paths, feature_cache=folder / "cache", device=args.device, overwrite=True)
        contenders = {
            "single": RunOptions(method="single", single_model=models[0].name, out=folder / "single", **common),
            "adaptive": RunOptions(method="adaptive", out=folder / "adaptive", **common),
            "ensemble": RunOptions(method="ensemble", out=folder / "ensemble", **common),
        }
        timed_run(contenders["single"])  # warm-up: fills the feature cache, loads libraries
        times = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, options in contenders.items():  # interleaved, so drift affects all alike
                times[name].append(timed_run(options))
        median = {name: statistics.median(values) for name, values in times.items()}

    device = "cuda" if (args.device == "auto" and torch.cuda.is_available()) else args.device
    lines = [
        f"Volume {'x'.join(map(str, args.size))} voxels, K = {len(models)} site models "
        f"({sum(p.numel() for p in models[0].network.parameters()):,} parameters each), device {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} runs, features cached.",
        "",
        "| pipeline | median wall time (s) | runs (s) |",
        "| --- | --- | --- |",
        *[f"| {name} | {median[name]:.2f} | {', '.join(f'{t:.2f}' for t in times[name])} |" for name in contenders],
        "",
        f"adaptive / single = {median['adaptive'] / median['single']:.2f} (target <= 1.3)",
        f"ensemble / adaptive = {median['ensemble'] / median['adaptive']:.2f} (target >= 2.5)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
