"""The contrast-specialist pool: the real MONAI template bundle and fine-tunes of it on other contrasts.

Sites: the bundle as published (``../shared/data/monai_bundle_segmentation_template``: bright
spheres on a dark background), and fine-tunes of its weights on the same kind of phantom seen
through another contrast (inverted; gamma-compressed with a bias field). Targets: fresh phantoms
through a shifted version of each contrast, so that on every target at least one site is
confidently wrong (a bright-sphere model on an inverted scan, and the reverse).

Phantoms: ``monai.data.create_test_image_3d(64, 64, 64, num_objs=6, num_seg_classes=3,
noise_max=0.3)``, min-max scaled, then the contrast. Fine-tunes are made once (seeded) and cached
in ``benchmarks/.cache/contrast-pool`` as ``.safetensors`` + model card. The bundle is read, never
copied into the repository.

    python benchmarks/contrast_pool.py   # train (or find) the pool and print where it is
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from entropymerge.fingerprint import FINGERPRINT_KEY, intensity_fingerprint, mean_fingerprint
from entropymerge.modelcard import InferenceSettings
from entropymerge.models import load_site_model, save_site_model
from entropymerge.training import Case, TrainingConfig, train_stage
from entropymerge.volume import Geometry, write_volume

BUNDLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "monai_bundle_segmentation_template"
CACHE = Path(__file__).resolve().parent / ".cache" / "contrast-pool"
SIZE = 64
TRAIN_CASES, STEPS, LEARNING_RATE = 12, 80, 1e-3


def _bias(shape, rng: np.random.Generator) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    return np.exp(0.3 * np.tensordot(rng.normal(0, 1, 3), grid, axes=1) / 3)


# Each contrast maps a [0, 1] phantom to a stored image; ``rng`` draws its per-case variation.
CONTRASTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "bright": lambda x, rng: x,
    "inverted": lambda x, rng: 1.0 - x,
    "compressed": lambda x, rng: (0.3 + 0.4 * x ** 2.0) * _bias(x.shape, rng),
}
# Targets: each site's contrast, shifted (a contrast none of the sites saw exactly).
TARGET_CONTRASTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "bright-gamma": lambda x, rng: x ** rng.uniform(1.4, 1.8),
    "inverted-gamma": lambda x, rng: (1.0 - x) ** rng.uniform(0.6, 0.8),
    "compressed-bias": lambda x, rng: (0.35 + 0.3 * x ** 2.5) * _bias(x.shape, rng) ** 2,
}


def phantom(seed: int, contrast: Callable) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (64, 64, 64), labels uint8 in 0..3) of one seeded sphere phantom."""
    from monai.data import create_test_image_3d

    image, labels = create_test_image_3d(SIZE, SIZE, SIZE, num_objs=6, num_seg_classes=3, noise_max=0.3,
                                         random_state=np.random.RandomState(seed))
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
    return contrast(image, np.random.default_rng(seed)).astype(np.float32), labels.astype(np.uint8)


def write_target(name: str, seed: int, folder: Path) -> tuple[Path, Path]:
    """A target phantom as NIfTI image + labels (1 mm, identity direction)."""
    image, labels = phantom(seed, TARGET_CONTRASTS[name])
    geometry = Geometry(image.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    return (write_volume(image, geometry, folder / f"{name}_{seed}_image.nii.gz"),
            write_volume(labels, geometry, folder / f"{name}_{seed}_labels.nii.gz"))


def contrast_pool(cache: Path = CACHE, log=lambda m: print(m, file=sys.stderr)) -> Path:
    """The pool's folder: one card + weights per contrast (the bundle as is for ``bright``). Each card
    carries the intensity fingerprint of its contrast's phantoms (for ``bright``: the phantoms the
    bundle was trained on)."""
    if not BUNDLE.is_dir():
        raise SystemExit(f"the contrast-specialist pool needs the MONAI template bundle at {BUNDLE}")
    template = load_site_model(BUNDLE)
    # The phantoms are 64^3: the whole volume in one window, as the bundle's SimpleInferer does.
    card = replace(template.card, inference=InferenceSettings((SIZE,) * 3, 0.25, 1))
    config = TrainingConfig(features="none", channel_dropout=0.0, batch_size=2, patch_size=SIZE, seed=0, checkpoint_every=STEPS)
    for index, name in enumerate(CONTRASTS):
        if (cache / f"{name}.json").exists():
            continue
        network = template.network
        network.load_state_dict(load_site_model(BUNDLE).state_dict())
        cases = []
        for case in range(TRAIN_CASES):
            image, labels = phantom(1000 * (index + 1) + case, CONTRASTS[name])
            image = (image - image.min()) / (image.max() - image.min())  # as the bundle's ScaleIntensity
            cases.append(Case(torch.from_numpy(image)[None].half(), torch.from_numpy(labels), case))
        if name != "bright":
            result = train_stage(network, cases, STEPS, LEARNING_RATE, config, f"contrast-{name}", cache / "work" / f"{name}.pt")
            log(f"{name}: {STEPS} fine-tuning steps, final loss {result.final_loss:.3f}, {result.seconds:.0f} s")
        site_card = replace(card, name=name, site=f"spheres, {name} contrast",
                            training={"source": "MONAI template bundle" + ("" if name == "bright" else f", fine-tuned on {name} contrast"),
                                      "steps": 0 if name == "bright" else STEPS,
                                      "train_seeds": [] if name == "bright" else [1000 * (index + 1) + c for c in range(TRAIN_CASES)],
                                      FINGERPRINT_KEY: mean_fingerprint([intensity_fingerprint(c.inputs[0]) for c in cases])})
        save_site_model(network, site_card, cache, name)
    return cache


if __name__ == "__main__":
    print(contrast_pool())
