"""Wall time of single-model inference, the entropy-adaptive merge, and the K-model ensemble, side by side.

All three run the full ``entropymerge run`` pipeline (read, preprocess, features, [probe + merge],
sliding-window inference, write) in one process on the same volume, with the stable features
already in the cache for all of them, and report the median of several repeats and the ratios:

    python benchmarks/merging_speed.py [--models DIR] [--size 128 128 96] [--repeats 3]

The models default to the bundled DropGen site models (K = 4); the volume is a simulated scan.

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

import torch
from tables import publish

from entropymerge.models import load_site_models
from entropymerge.pipeline import RunOptions, run
from entropymerge.progress import Progress
from entropymerge.sampledata import SOURCE_SITES, bundled_models, simulate
from entropymerge.training import case_seed
from entropymerge.volume import write_volume


def make_volume(path: Path, size) -> Path:
    """A simulated isotropic 1.5 mm scan (the summit-pd scanner) of exactly ``size`` voxels."""
    scanner = replace(SOURCE_SITES["summit-pd"], fov_mm=tuple(1.5 * s for s in size))
    image, _ = simulate(scanner, case_seed("summit-pd", 0, "test"))
    return write_volume(image.array, image.geometry, path)


def timed_run(options: RunOptions) -> float:
    start = time.perf_counter()
    run(options, Progress())
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="folder of K compatible site models (default: the bundled DropGen models)")
    parser.add_argument("--size", type=int, nargs=3, default=[128, 128, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model_paths = [args.models or bundled_models("dropgen")]
        models = load_site_models(model_paths)
        volume = make_volume(folder / "volume.nii.gz", args.size)
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
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
