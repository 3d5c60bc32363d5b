"""Wall time of single-model inference, the entropy-adaptive merge, and the K-model ensemble, side by side.

All three run the full ``entropymerge run`` pipeline (read, preprocess, features, [probe + merge],
inference, write) in one process on the same volume, with the stable features already in the
cache for all of them, and report the median of several repeats, the ratios, and the median time
of each stage from the runs' ``summary.json``:

    python benchmarks/merging_speed.py [--models DIR] [--size 128 128 96 | --target t2-fatsat] [--repeats 3]

The models default to the bundled DropGen site models (K = 4); the volume is a simulated scan of
``--size`` voxels, or a bundled target (``--target``).

Goals: adaptive / single <= 1.2, ensemble / adaptive >= 2.5 (K = 4), probe + merge <= 20% of one
model's inference.
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

import nibabel
import torch
from tables import publish

from entropymerge.models import load_site_models
from entropymerge.pipeline import run
from entropymerge.progress import Progress
from entropymerge.sampledata import SOURCE_SITES, bundled_models, bundled_targets, simulate
from entropymerge.settings import RunOptions
from entropymerge.training import case_seed
from entropymerge.volume import write_volume

STAGES = ("load", "preprocess", "features", "probe", "merge", "site models", "inference", "write")


def make_volume(path: Path, size) -> Path:
    """A simulated isotropic 1.5 mm scan (the summit-pd scanner) of exactly ``size`` voxels."""
    scanner = replace(SOURCE_SITES["summit-pd"], fov_mm=tuple(1.5 * s for s in size))
    image, _ = simulate(scanner, case_seed("summit-pd", 0, "test"))
    return write_volume(image.array, image.geometry, path)


def timed_run(options: RunOptions) -> tuple[float, dict]:
    """Wall time (s) of one whole run, and its stage times from the summary."""
    start = time.perf_counter()
    summary = run(options, Progress())
    return time.perf_counter() - start, summary.timings_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, help="folder of K compatible site models (default: the bundled DropGen models)")
    parser.add_argument("--size", type=int, nargs=3, default=[128, 128, 96])
    parser.add_argument("--target", help="a bundled target volume (e.g. t2-fatsat) instead of a simulated scan")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model_paths = [args.models or bundled_models("dropgen")]
        models = load_site_models(model_paths)
        if args.target:
            volume = next((t.image for t in bundled_targets() if t.name == args.target), None)
            if volume is None:
                parser.error(f"no bundled target {args.target!r}; choose one of {', '.join(t.name for t in bundled_targets())}")
        else:
            volume = make_volume(folder / "volume.nii.gz", args.size)
        shape = nibabel.load(str(volume)).shape
        common = dict(volume=volume, models=model_paths, feature_cache=folder / "cache", device=args.device, overwrite=True)
        contenders = {
            "single": RunOptions(method="single", single_model=models[0].name, out=folder / "single", **common),
            "adaptive": RunOptions(method="adaptive", out=folder / "adaptive", **common),
            "ensemble": RunOptions(method="ensemble", out=folder / "ensemble", **common),
        }
        timed_run(contenders["single"])  # warm-up: fills the feature cache, loads libraries
        times = {name: [] for name in contenders}
        stages = {name: {} for name in contenders}
        for _ in range(args.repeats):
            for name, options in contenders.items():  # interleaved, so drift affects all alike
                seconds, timings = timed_run(options)
                times[name].append(seconds)
                for stage, value in timings.items():
                    stages[name].setdefault(stage, []).append(value)
        median = {name: statistics.median(values) for name, values in times.items()}
        stage_median = {name: {stage: statistics.median(v) for stage, v in values.items()} for name, values in stages.items()}

    device = "cuda" if (args.device == "auto" and torch.cuda.is_available()) else args.device
    stage_names = [stage for stage in STAGES if any(stage in stage_median[name] for name in contenders)]
    adaptive = stage_median["adaptive"]
    probe_share = (adaptive.get("probe", 0.0) + adaptive.get("merge", 0.0)) / adaptive["inference"]
    lines = [
        f"Volume {args.target + ' ' if args.target else ''}{'x'.join(map(str, shape))} voxels, K = {len(models)} site models "
        f"({sum(p.numel() for p in models[0].network.parameters()):,} parameters each), device {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} runs, features cached.",
        "",
        "| pipeline | median wall time (s) | runs (s) | " + " | ".join(stage_names) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in stage_names) + " |",
        *[f"| {name} | {median[name]:.2f} | {', '.join(f'{t:.2f}' for t in times[name])} | "
          + " | ".join(f"{stage_median[name][s]:.2f}" if s in stage_median[name] else "-" for s in stage_names) + " |"
          for name in contenders],
        "",
        f"adaptive / single = {median['adaptive'] / median['single']:.2f} (goal <= 1.2)",
        f"ensemble / adaptive = {median['ensemble'] / median['adaptive']:.2f} (goal >= 2.5)",
        f"(probe + merge) / inference of the merged model = {probe_share:.2f} (goal <= 0.20)",
    ]
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
