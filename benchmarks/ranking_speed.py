"""How long ranking the pool of 10 models takes on one target (reference labels): ``rank_models`` alone,
its tapped probe passes included, median of a few repeats.

    python benchmarks/ranking_speed.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from ranking_quality import CACHE, load_pool, undertrained_models

from entropymerge.features import model_inputs
from entropymerge.preprocessing import labels_to_model_space, to_model_space
from entropymerge.probe import default_probe_size, select_probe
from entropymerge.ranking import LabelSource, rank_models
from entropymerge.sampledata import TARGET_SITES, bundled_models, simulate
from entropymerge.training import case_seed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", default="lowfield-t1", choices=list(TARGET_SITES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pool = load_pool(bundled_models("dropgen"), bundled_models("image-only"), undertrained_models(CACHE / "undertrained"))
    seed = case_seed(args.site, 0, "test")
    image, labels = simulate(TARGET_SITES[args.site], seed)
    card = pool[0].card
    space = to_model_space(image, card.preprocessing)
    inputs_by_spec = {}
    for model in pool:
        if model.card.features not in inputs_by_spec:
            inputs_by_spec[model.card.features] = model_inputs(space.tensor.as_tensor(), model.card.features).inputs
    inputs = [inputs_by_spec[m.card.features] for m in pool]
    probe = select_probe(inputs[0], default_probe_size(card.inference.roi_size), 8)
    source = LabelSource("reference", labels_to_model_space(labels, space).numpy(), "reference")
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        rank_models(pool, inputs, probe, source, torch.device("cpu"))
        seconds.append(time.perf_counter() - start)
    print(f"ranking {len(pool)} models on {args.site}#{seed} (reference labels), {args.threads} thread(s): "
          f"median {np.median(seconds):.2f} s (runs {', '.join(f'{s:.2f}' for s in seconds)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
